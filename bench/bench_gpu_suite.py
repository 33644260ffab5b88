"""bench/gpu_suite.py keeps working: a short run of the GPU suite's benchmark, on the GPU
when there is one, else with the draft on the CUDA engine's host backend (``emulated``:
the same orchestration and transfer accounting, scalar kernels; its speed means nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def test_gpu_suite_smoke(tmp_path, default_source):
    import gpu_suite
    from dovetail_ext import _core
    device = "cuda" if _core.cuda_compiled() and _core.cuda_device_count() > 0 else "emulated"
    rc = gpu_suite.main(["--device", device, "--prompts", "1", "--tokens", "8", "--gpu-layers", "1,2",
                         "--sweep-threads", "1,2", "--sweep-trees", "1:1:2,2:2:4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert rc == 0 and all(m["identical_to_plain"] for m in result["modes"])
    modes = {m["mode"]: m for m in result["modes"]}
    # Each offload count gives a plain and a speculative row, compared with its own plain row.
    assert [(m["mode"], m["gpu_layers"]) for m in result["modes"] if "gpu_layers" in m] == \
        [("offload-plain", 1), ("offload-spec", 1), ("offload-plain", 2), ("offload-spec", 2)]
    assert set(modes) == {"cpu-plain", "cpu-spec", "cpu-spec-python", "gpu-spec", "gpu-spec-eager",
                          "gpu-spec-python", "gpu-spec-overlap", "offload-plain", "offload-spec"}
    # Per step the device draft takes the accepted features in and gives token ids back.
    assert 0 < modes["gpu-spec-eager"]["d2h_bytes_per_step"] < modes["gpu-spec-eager"]["h2d_bytes_per_step"]
    assert (tmp_path / "gpu_suite.md").read_text().count("|") > 20
    # The sweep: plain decoding per thread count, the GPU-draft mode per thread count and tree.
    sweep = [(r["threads"], r["mode"], r["tree"]) for r in result["sweep"]]
    assert sweep == [(t, m, tree) for t in (1, 2) for m, tree in
                     (("cpu-plain", "-"), ("gpu-spec", "1:1:2"), ("gpu-spec", "2:2:4"))]
    assert all(r["identical_to_plain"] for r in result["sweep"])
    # The figure of the modes draws from that JSON (bench/plot_gpu.py).
    import plot_gpu
    assert plot_gpu.main(["plot_gpu.py", str(tmp_path / "modes.png"), str(tmp_path / "gpu_suite.json")]) == 0
    assert (tmp_path / "modes.png").stat().st_size > 10_000
    # The sweep on an offloaded target: its plain rows and speculative rows, all its own outputs.
    rc = gpu_suite.main(["--device", device, "--prompts", "1", "--tokens", "8", "--gpu-layers", "2",
                         "--sweep-gpu-layers", "2", "--sweep-threads", "2", "--sweep-trees", "1:1:2,2:1:3:0.1",
                         "--out", str(tmp_path / "offload")])
    sweep = json.loads((tmp_path / "offload" / "gpu_suite.json").read_text())["sweep"]
    assert rc == 0 and [(r["mode"], r["gpu_layers"], r["tree"]) for r in sweep] == \
        [("offload-plain", 2, "-"), ("offload-spec", 2, "1:1:2"), ("offload-spec", 2, "2:1:3:0.1")]
    assert all(r["identical_to_plain"] for r in sweep)
    for bad in ("1:2", "1:1:2:0.1:5", "a:1:2"):  # a tree is top_k:depth:total_tokens[:min_prob]
        with pytest.raises(SystemExit):
            gpu_suite.main(["--device", device, "--sweep-trees", bad])


def test_device_profile_smoke(tmp_path, default_source):
    """bench/device_profile.py: call times split into the device prefix and the CPU's rest
    per batch size (with a GPU also its kernels, through torch's profiler)."""
    import device_profile
    from dovetail_ext import _core
    gpu = _core.cuda_compiled() and _core.cuda_device_count() > 0
    rc = device_profile.main(["--device", "cuda" if gpu else "emulated", "--gpu-layers", "2", "--batch", "1,3",
                              "--calls", "2", "--context", "40", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "device_profile.json").read_text())
    assert rc == 0 and result["gpu_layers"] == 2 and [r["T"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert 0 < r["prefix_ms"] < r["call_ms"] and 0 < r["cpu_rest_ms"] < r["call_ms"]
        assert (r["kernels_per_call"] > 0) == gpu
    with pytest.raises(SystemExit):
        device_profile.main(["--batch", "0"])
