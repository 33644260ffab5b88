"""Fuzz the Hugging Face loader: ``config.json`` and ``model.safetensors`` of one checkpoint.

    python fuzz/fuzz_safetensors_hf.py [libFuzzer flags] [CORPUS_DIR ...]

One input is ``config.json`` and ``model.safetensors`` joined by ``fuzzlib.SEP`` (a
missing part is a missing file); a small valid ``tokenizer.json`` lies beside them.
Contract (``fuzzlib``): ``load_hf`` loads or raises ``FormatError`` / ``FileNotFoundError``;
what loads runs one token through a native engine. Each input is loaded as stored and,
when that works, converted to q4_1 at load (``weights=``), which reads every value.
Seeds: ``python fuzz/seeds.py OUT`` (``OUT/hf``).
"""

from __future__ import annotations

import atheris

from fuzzlib import Scratch, engine_smoke, loader_errors, run, split_files

with atheris.instrument_imports(include=["dovetail_ext"]):
    from dovetail_ext.formats import load_hf
    from dovetail_ext.formats import tokenizer as _tokenizer  # noqa: F401

from seeds import tiny_tokenizer_json  # noqa: E402

ERRORS = loader_errors()
scratch = Scratch()
scratch.write({"tokenizer.json": tiny_tokenizer_json().encode()})


def test_one_input(data: bytes) -> None:
    config, weights = split_files(data, 2)
    directory = scratch.write({"config.json": config, "model.safetensors": weights})
    try:
        src = load_hf(directory)
    except ERRORS:
        return
    engine_smoke(src)
    try:
        converted = load_hf(directory, weights="q4_1")
    except ERRORS:
        return  # a hidden size that is not a multiple of 32 cannot be stored as q4_1
    engine_smoke(converted)


if __name__ == "__main__":
    run(test_one_input)
