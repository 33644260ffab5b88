"""Third feature cache of the shipped draft: the target's own greedy answers (at most 256
tokens) to the first user turn of ShareGPT conversations about code. It skips every
conversation the first two caches planned (the second took the first 23 shards of 64 of the
eligible list) and anything sharing a thread or an opening with a held-out val conversation.
HumanEval is not used: it stays the evaluation set.

    python extract_code.py OUT_DIR [MAX_TOKENS]
"""
import re

from caches import extract, sharegpt_in_order, unused
from dovetail_ext.train.features import FeatureSettings

CODE = re.compile(r"```|\bdef |\bfunction\b|\bpython\b|\bjavascript\b|\bjava\b|\bc\+\+|\bsql\b|\bcode\b"
                  r"|\bscript\b|\bclass\b|\bregex\b|\bbash\b", re.I)


def first_user(conv):
    return next((m["content"] for m in conv if m["role"] == "user"), "")


ids, convs = sharegpt_in_order()
eligible = unused(ids, convs)
taken = set(eligible[:23 * 64])  # the second cache's shards
extract([convs[k] for k in eligible if k not in taken and CODE.search(first_user(convs[k]) or "")],
        FeatureSettings(data="sharegpt-code-unused-no-val-threads", seed=0, max_len=1024, self_distill=256,
                        distill_fraction=1.0, max_prompt_tokens=512, shard_size=32, val_conversations=0))
