"""Fuzz the tokenizer builders: Hugging Face tokenizer files and GGUF vocabularies.

    python fuzz/fuzz_tokenizer.py [libFuzzer flags] [CORPUS_DIR ...]

The first byte of an input picks what the rest is:

- ``J``: ``tokenizer.json`` [SEP ``tokenizer_config.json``] -> ``tokenizer_from_hf_directory``
- ``S``: SentencePiece ``tokenizer.model`` [SEP ``tokenizer_config.json``] -> the same
- ``G``: a GGUF vocabulary as JSON (``model``, ``tokens``, ``types``, ``merges``,
  ``scores``, ``pre``, ``bos``, ``eos``, ``add_bos``, ``add_space_prefix``, ``template``)
  -> ``tokenizer_from_gguf_vocab``. Values are first brought to the types a GGUF file
  can hold (lists of str / int / float); inputs that do not fit are skipped.

Contract (``fuzzlib``): a tokenizer is built or ``FormatError`` is raised; a built one
encodes and decodes (whole and streamed) without error.
Seeds: ``python fuzz/seeds.py OUT`` (``OUT/tokenizer``).
"""

from __future__ import annotations

import json
from typing import Any

import atheris
import numpy as np

from fuzzlib import Scratch, loader_errors, run, split_files, tokenizer_smoke

with atheris.instrument_imports(include=["dovetail_ext"]):
    from dovetail_ext.formats.tokenizer import tokenizer_from_gguf_vocab, tokenizer_from_hf_directory

ERRORS = loader_errors()
scratch = Scratch()


def _list_of(value: Any, kind: type) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise TypeError
    return value


def _float32s(values: list | None) -> list[float] | None:
    """GGUF stores scores as float32: out-of-range values become inf, as a file holds them."""
    if not values:
        return None
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(np.float32).tolist()


def _gguf_vocab(text: bytes) -> dict[str, Any] | None:
    """The builder's keyword arguments from the JSON text, or None if it does not fit."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            return None
        eos = _list_of(doc.get("eos") or [], int)
        bos = doc.get("bos")
        ints = [bos] if bos is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and -2**31 <= i < 2**32 for i in ints + eos):
            return None
        opts = {k: doc.get(k) for k in ("model", "pre", "template")}
        flags = {k: doc.get(k) for k in ("add_bos", "add_space_prefix")}
        if not all(v is None or isinstance(v, str) for v in opts.values()) \
                or not all(v is None or isinstance(v, bool) for v in flags.values()):
            return None
        types = _list_of(doc.get("types"), int)
        if types is not None and not all(-2**31 <= t < 2**31 for t in types):
            return None
        return dict(model=opts["model"] or "", tokens=_list_of(doc.get("tokens") or [], str), token_types=types,
                    merges=_list_of(doc.get("merges"), str),
                    scores=_float32s(_list_of(doc.get("scores"), (int, float))),
                    pre=opts["pre"], bos_id=bos, eos_ids=eos, add_bos=flags["add_bos"],
                    add_space_prefix=flags["add_space_prefix"], chat_template=opts["template"], source="fuzz")
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[:1], data[1:]
    if mode == b"G":
        kwargs = _gguf_vocab(rest)
        if kwargs is None:
            return
        try:
            tok = tokenizer_from_gguf_vocab(**kwargs)
        except ERRORS:
            return
    else:
        main, config = split_files(rest, 2)
        name, other = ("tokenizer.model", "tokenizer.json") if mode == b"S" else ("tokenizer.json", "tokenizer.model")
        directory = scratch.write({name: main, other: None, "tokenizer_config.json": config})
        try:
            tok = tokenizer_from_hf_directory(directory, bos_id=None, eos_ids=())
        except ERRORS:
            return
    tokenizer_smoke(tok)


if __name__ == "__main__":
    run(test_one_input)
