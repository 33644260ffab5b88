"""Shared benchmark fixtures: the default model, thread count, and a results recorder.

Every benchmark records its figures with ``record(group, name, **numbers)``; at the end of
the session the figures are written to ``bench/results/latest.json`` and ratios between
entries of one group are computed in the same process (timings on a shared machine move
from run to run: only side-by-side ratios are meaningful).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

THREADS = int(os.environ.get("DOVETAIL_BENCH_THREADS", "2"))
RESULTS = Path(__file__).parent / "results"
_records: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="session")
def threads() -> int:
    return THREADS


@pytest.fixture(scope="session")
def record():
    def _record(group: str, name: str, **numbers):
        _records.setdefault(group, {})[name] = numbers
    return _record


@pytest.fixture(scope="session")
def default_source():
    from dovetail_ext.formats import load_model_source
    from dovetail_ext.models import default_model_path
    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")
    return load_model_source(None)


@pytest.fixture(scope="session")
def extra_source():
    """Another GGUF to measure next to the default model (a larger or K-quant model, such as
    Qwen2.5-Coder-1.5B-Instruct Q4_K_M): the file ``DOVETAIL_BENCH_GGUF`` names."""
    path = os.environ.get("DOVETAIL_BENCH_GGUF")
    if not path:
        pytest.skip("DOVETAIL_BENCH_GGUF is not set (the path of another GGUF model to measure)")
    from dovetail_ext.formats import load_model_source
    return load_model_source(path)


@pytest.fixture(scope="session")
def bf16_source(default_source):
    """The default model with its matrices decoded and stored in bf16 (what ``--weights
    bf16`` makes of a Hugging Face checkpoint): a target whose decoding is bound by memory
    traffic, where the Q4_1 file's is bound by compute."""
    import dataclasses

    from dovetail_ext.quant import dequantize, quantize
    return dataclasses.replace(default_source, weights={
        k: quantize(dequantize(w), "bf16") if len(w.shape) == 2 else w for k, w in default_source.weights.items()})


def pytest_sessionfinish(session, exitstatus):
    if not _records or session.config.getoption("benchmark_disable", False):
        return
    # DOVETAIL_BENCH_OUT keeps another machine's figures apart from latest.json.
    path = Path(os.environ.get("DOVETAIL_BENCH_OUT") or RESULTS / "latest.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    from dovetail_ext import _core
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
           "cpu": _cpu_name(), "cpu_path": _core.get_isa(), "threads": THREADS, "groups": _records}
    old = json.loads(path.read_text()) if path.exists() else {"groups": {}}
    old_groups = old.get("groups", {})
    old_groups.update(_records)  # a partial run keeps the other groups' last figures
    out["groups"] = old_groups
    _add_ratios(old_groups)
    path.write_text(json.dumps(out, indent=1) + "\n")


def _add_ratios(groups: dict) -> None:
    """Speculative vs plain from the same run; whether their outputs were identical."""
    spec = groups.get("speculative", {})

    def same(a: dict, b: dict) -> bool:  # (both outputs recorded, and equal)
        return a.get("outputs_sha256") is not None and a.get("outputs_sha256") == b.get("outputs_sha256")
    if "plain" in spec and "speculative" in spec:
        a, b = spec["plain"], spec["speculative"]
        spec["ratio"] = {"speculative_over_plain": b["tokens_per_s"] / a["tokens_per_s"],
                         "outputs_identical": same(a, b)}
        for other in [m for m in spec if m not in ("plain", "speculative", "ratio")]:
            spec["ratio"][f"{other}_over_plain"] = spec[other]["tokens_per_s"] / a["tokens_per_s"]
            spec["ratio"][f"{other}_outputs_identical"] = same(a, spec[other])


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
