"""The loader fuzzers (``fuzz/``) run in CI: 10,000 executions per target from the seed
corpora, in a subprocess each (atheris runs libFuzzer in-process, and a finding ends that
process). A finding fails the test with libFuzzer's report and the input it saved.
What the fuzzers found is kept below as plain regression tests.

Longer runs: see the README's Validation section (``python fuzz/fuzz_gguf.py
-max_total_time=3600 CORPUS``)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext.errors import FormatError

needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                   reason="atheris is not installed (pip install atheris; Linux x86-64 wheels)")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = {"gguf": "fuzz_gguf.py", "hf": "fuzz_safetensors_hf.py", "tokenizer": "fuzz_tokenizer.py",
           "draft": "fuzz_draft.py"}
RUNS = 10_000


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """Seed corpora of every target, made once (the default model's header seeds only
    when it is installed)."""
    sys.path.insert(0, str(FUZZ))
    try:
        import seeds
    finally:
        sys.path.remove(str(FUZZ))
    root = tmp_path_factory.mktemp("corpora")
    for target in TARGETS:
        assert seeds.write_seeds(target, root / target)
    return root


def _env() -> dict[str, str]:
    """The subprocess imports the same dovetail_ext as this test run."""
    package_root = str(Path(dovetail_ext.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}


@needs_atheris
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target(corpora: Path, tmp_path: Path, target: str) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    # libFuzzer reads peak RSS from getrusage, and Linux carries the high-water mark of a
    # forked process across exec: the child starts at this test process's peak (torch and
    # models loaded by earlier tests). The 3 GB budget is counted above that.
    import resource
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    cmd = [sys.executable, str(FUZZ / TARGETS[target]), f"-runs={RUNS}", "-seed=1", "-print_final_stats=1",
           "-max_total_time=240", f"-rss_limit_mb={3072 + inherited_mb}", f"-artifact_prefix={artifacts}/",
           str(corpora / target)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    log = proc.stderr + proc.stdout
    tail = "\n".join(line for line in log.splitlines() if not line.startswith(("#", "INFO:")))[-6000:]
    found = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not found, f"fuzz target {target} failed (rc {proc.returncode}, {found}):\n{tail}"
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))
    assert runs >= RUNS, f"only {runs} executions:\n{tail}"


# ------------------------------------------------------------------ findings, kept as tests

def _seeds_module():
    sys.path.insert(0, str(FUZZ))
    try:
        import seeds
        return seeds
    finally:
        sys.path.remove(str(FUZZ))


@pytest.mark.parametrize("value,target", [(np.inf, "q4_1"), (np.nan, "q8_0"), (1e6, "f16"), (7e4, "q4_1")])
def test_hf_conversion_refuses_values_the_format_cannot_hold(tmp_path: Path, value: float, target: str) -> None:
    """Found by fuzz_safetensors_hf: converting inf / NaN / out-of-range values at load made
    numpy warn and stored inf or NaN scales; now the tensor is named in a FormatError."""
    import json

    from dovetail_ext.formats import load_hf
    seeds = _seeds_module()
    t = seeds.hf_tensors(seeds.HF_CONFIG)
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = value
    (tmp_path / "config.json").write_text(json.dumps(seeds.HF_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(seeds.safetensors_bytes(t))
    (tmp_path / "tokenizer.json").write_text(seeds.tiny_tokenizer_json())
    with pytest.raises(FormatError, match=rf"mlp\.up_proj\.weight: cannot store as {target}: .*magnitude"):
        load_hf(tmp_path, weights=target)
    assert load_hf(tmp_path, weights="bf16").weights["blk.0.ffn_up"].dtype == "bf16"  # bf16 holds it


def test_sentencepiece_piece_that_is_not_utf8_is_refused_at_load(tmp_path: Path) -> None:
    """Found by fuzz_tokenizer: a tokenizer.model whose piece is not UTF-8 loaded, then
    decode() raised UnicodeDecodeError in the middle of generation."""
    from dovetail_ext.formats.tokenizer import _pb_field, tokenizer_from_hf_directory

    pieces = [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("\u2581", 1), ("a", 1), (b"\x96b", 1)]
    proto = b"".join(_pb_field(1, _pb_field(1, p) + _pb_field(2, -float(i)) + _pb_field(3, k))
                     for i, (p, k) in enumerate(pieces))
    proto += _pb_field(2, _pb_field(3, 2) + _pb_field(40, 0) + _pb_field(41, 1) + _pb_field(42, 2)
                       + _pb_field(43, -1))
    (tmp_path / "tokenizer.model").write_bytes(proto)
    with pytest.raises(FormatError, match="piece 5 is not valid UTF-8"):
        tokenizer_from_hf_directory(tmp_path)
    good = proto.replace(b"\x96b", b"ab")
    (tmp_path / "tokenizer.model").write_bytes(good)
    tok = tokenizer_from_hf_directory(tmp_path)
    assert tok.decode(tok.encode("aab", add_bos=False)) == "aab"


def test_hf_conversion_of_values_below_the_normal_range_is_quiet(tmp_path: Path) -> None:
    """Found by fuzz_safetensors_hf (longer run): a block of values near 1e-39 made the
    quantizer overflow 1/d and numpy warn; it converts quietly, within its tiny range."""
    from dovetail_ext.formats.hf import _convert
    from dovetail_ext.quant import dequantize
    x = np.full((3, 64), 1e-39, np.float32)
    x[1, 7] = 3e-39
    for target in ("q8_0", "q4_0", "q4_1"):
        assert np.abs(dequantize(_convert("f32", x, target)) - x).max() <= 3e-39


def test_tokenizer_json_with_gaps_in_its_ids(tmp_path: Path) -> None:
    """Found by fuzz_tokenizer (longer run): a tokenizer.json whose ids skip numbers
    reported fewer ids than it produces; its size is now the largest id + 1."""
    import json

    from dovetail_ext.formats.tokenizer import tokenizer_from_hf_directory
    doc = json.loads(_seeds_module().tiny_tokenizer_json())
    vocab = doc["model"]["vocab"]
    top = max(vocab.values())
    vocab["\u0120t"] = top + 20  # the merged token of the first merge, far past the others
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = tokenizer_from_hf_directory(tmp_path)
    ids = tok.encode(" t t", add_bos=False)
    assert top + 20 in ids and tok.vocab_size == top + 21
    assert tok.decode(ids) == " t t"


def test_draft_layer_count_is_bounded_by_the_file(tmp_path: Path) -> None:
    """A draft.json claiming far more layers than the file holds is refused from the tensor
    count alone (no per-layer work), with a short message."""
    import json

    from dovetail_ext.draft_model import load_draft_weights
    seeds = _seeds_module()
    sys.path.insert(0, str(FUZZ))
    try:
        from fuzzlib import split_files
    finally:
        sys.path.remove(str(FUZZ))
    config, weights = split_files(seeds.draft_seeds()["draft-1-layers-f32"], 2)
    doc = json.loads(config)
    doc["config"]["num_layers"] = 10_000_000
    (tmp_path / "draft.json").write_text(json.dumps(doc))
    (tmp_path / "draft.safetensors").write_bytes(weights)
    with pytest.raises(FormatError, match="10000000-layer draft needs") as info:
        load_draft_weights(tmp_path)
    assert len(str(info.value)) < 2000
