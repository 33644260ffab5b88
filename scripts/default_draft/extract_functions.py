"""Fourth feature cache of the shipped draft: the target's own greedy answers (at most 256
tokens) to requests to complete a Python function, given its signature and docstring as
HumanEval gives them (``train-draft --data python-functions``: the standard library's
documented functions; nothing from HumanEval, which stays the evaluation set).

    python extract_functions.py OUT_DIR [MAX_TOKENS] [PART/PARTS]

PART/PARTS (e.g. 0/2) takes every PARTS-th prompt from the PART-th on, so that one process
per core fills its own cache.
"""
import sys

from caches import extract
from dovetail_ext.train.data import python_function_prompts
from dovetail_ext.train.features import FeatureSettings

part, parts = map(int, (sys.argv[3] if len(sys.argv) > 3 else "0/1").split("/"))
extract(python_function_prompts(seed=0)[part::parts],
        FeatureSettings(data=f"python-stdlib-functions-part{part}of{parts}", seed=0, max_len=1024,
                        self_distill=256, distill_fraction=1.0, max_prompt_tokens=512, shard_size=32,
                        val_conversations=0))
