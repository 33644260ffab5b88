"""Shared by the scripts that made the extra feature caches of the shipped draft."""
import json
import sys
import time

import numpy as np

from dovetail_ext.formats import load_model_source
from dovetail_ext.train.data import iter_sharegpt_with_ids, load_conversations
from dovetail_ext.train.features import extract_features


def sharegpt_in_order():
    """ShareGPT item ids and conversations in train-draft's seed-0 order (checked against
    load_conversations)."""
    items = list(iter_sharegpt_with_ids())
    order = np.random.default_rng(0).permutation(len(items))
    ids = [items[k][0] for k in order]
    convs = [items[k][1] for k in order]
    ref = load_conversations("sharegpt", seed=0)
    assert len(ref) == len(convs) and all(a == b for a, b in zip(ref[:1500], convs[:1500])), "order mismatch"
    return ids, convs


def thread(conv_id: str) -> str:
    return conv_id.rsplit("_", 1)[0]  # the chat an item belongs to (see iter_sharegpt_with_ids)


def unused(ids, convs, val=64, first=1408):
    """Indices after the first cache's conversations (val + shards), sharing no thread and no
    opening with a held-out val conversation."""
    val_threads = {thread(x) for x in ids[:val]}
    val_first = {json.dumps(c[:2]) for c in convs[:val]}
    return [k for k in range(first, len(convs))
            if thread(ids[k]) not in val_threads and json.dumps(convs[k][:2]) not in val_first]


def extract(convs, settings):
    """The default model's features of ``convs`` into the cache at argv[1] (resumable), at
    most argv[2] training tokens, 1 thread, progress on stdout."""
    print(f"{len(convs)} conversations eligible", flush=True)
    extract_features(load_model_source(None), convs, sys.argv[1], settings, threads=1,
                     max_tokens=int(sys.argv[2]) if len(sys.argv) > 2 else None,
                     log=lambda s: print(time.strftime("%H:%M:%S"), s, flush=True))
