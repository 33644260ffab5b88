"""Shared by the scripts that made the extra feature caches of the shipped draft."""
import json

import numpy as np

from dovetail_ext.train.data import load_conversations, parse_record, sharegpt_path

def sharegpt_in_order():
    """ShareGPT conversations with their ids, in train-draft's seed-0 order (checked against
    load_conversations), and the ids' thread prefix."""
    text = sharegpt_path().read_text(encoding="utf-8")
    dec = json.JSONDecoder(); i = text.index("[") + 1; n = len(text)
    ids, convs = [], []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:  # the file is cut off at the end
            break
        c = parse_record(rec)
        if c is not None:
            ids.append(str(rec.get("id", ""))); convs.append(c)
    order = np.random.default_rng(0).permutation(len(convs))
    ids = [ids[k] for k in order]; convs = [convs[k] for k in order]
    ref = load_conversations("sharegpt", seed=0)
    assert len(ref) == len(convs) and all(a == b for a, b in zip(ref[:1500], convs[:1500])), "order mismatch"
    return ids, convs


def thread(conv_id: str) -> str:
    return conv_id.rsplit("_", 1)[0]  # ShareGPT splits long chats into parts: id_0, id_1, ...


def unused(ids, convs, val=64, first=1408):
    """Indices after the first cache's conversations (val + shards), sharing no thread and no
    opening with a held-out val conversation."""
    val_threads = {thread(x) for x in ids[:val]}
    val_first = {json.dumps(c[:2]) for c in convs[:val]}
    return [k for k in range(first, len(convs))
            if thread(ids[k]) not in val_threads and json.dumps(convs[k][:2]) not in val_first]
