"""Second feature cache of the shipped draft: ShareGPT conversations as written (prefill
only, no self-distillation), after the conversations of the first cache (train-draft's own
cache: 64 val + 42 shards of 32, seed-0 order), without any conversation that shares a
thread or an opening with a held-out val conversation.

    python extract_sharegpt.py OUT_DIR [MAX_TOKENS]
"""
from caches import extract, sharegpt_in_order, unused
from dovetail_ext.train.features import FeatureSettings

ids, convs = sharegpt_in_order()
extract([convs[k] for k in unused(ids, convs)],
        FeatureSettings(data="sharegpt[1408:]-no-val-threads", seed=0, max_len=1024, self_distill=0,
                        distill_fraction=0.0, max_prompt_tokens=512, shard_size=64, val_conversations=0))
