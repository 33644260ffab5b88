"""Fuzz the GGUF loader: one input is one ``.gguf`` file.

    python fuzz/fuzz_gguf.py [libFuzzer flags] [CORPUS_DIR ...]

Contract (``fuzzlib``): ``load_gguf`` loads the file or raises ``FormatError``; what
loads runs one token through a native engine and encodes text with its tokenizer.
Seeds: ``python fuzz/seeds.py OUT`` (``OUT/gguf``).
"""

from __future__ import annotations

import atheris

from fuzzlib import Scratch, engine_smoke, loader_errors, run, tokenizer_smoke

with atheris.instrument_imports(include=["dovetail_ext", "gguf"]):
    import gguf  # noqa: F401  (the reader parses the file in Python: instrument it too)

    from dovetail_ext.formats import load_gguf
    from dovetail_ext.formats import tokenizer as _tokenizer  # noqa: F401

ERRORS = loader_errors()
scratch = Scratch()


def test_one_input(data: bytes) -> None:
    path = scratch.write({"model.gguf": data}) / "model.gguf"
    try:
        src = load_gguf(path)
    except ERRORS:
        return
    engine_smoke(src)
    tokenizer_smoke(src.tokenizer)


if __name__ == "__main__":
    run(test_one_input)
