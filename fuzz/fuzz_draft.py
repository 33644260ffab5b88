"""Fuzz the draft checkpoint reader: ``draft.json`` and ``draft.safetensors``.

    python fuzz/fuzz_draft.py [libFuzzer flags] [CORPUS_DIR ...]

One input is ``draft.json`` and ``draft.safetensors`` joined by ``fuzzlib.SEP`` (a missing
part is a missing file). Contract (``fuzzlib``): ``load_draft_weights`` (the numpy-only
reader the native draft uses) returns a valid config and float32 arrays of exactly the
expected shapes, or raises ``FormatError`` / ``FileNotFoundError``.
Seeds: ``python fuzz/seeds.py OUT`` (``OUT/draft``).
"""

from __future__ import annotations

import atheris
import numpy as np

from fuzzlib import Scratch, loader_errors, run, split_files

with atheris.instrument_imports(include=["dovetail_ext.draft_model", "dovetail_ext.formats"]):
    from dovetail_ext.draft_model import expected_draft_shapes, load_draft_weights

ERRORS = loader_errors()
scratch = Scratch()


def test_one_input(data: bytes) -> None:
    config, weights = split_files(data, 2)
    directory = scratch.write({"draft.json": config, "draft.safetensors": weights})
    try:
        cfg, loaded = load_draft_weights(directory)
    except ERRORS:
        return
    shapes = expected_draft_shapes(cfg)
    assert list(loaded) == list(shapes), (list(loaded), list(shapes))
    for name, a in loaded.items():
        assert a.dtype == np.float32 and a.shape == shapes[name], (name, a.dtype, a.shape)


if __name__ == "__main__":
    run(test_one_input)
