"""DaViT benchmarks: native ops and the DaViT-Tiny forward against timm, in the same process.

Run:  OMP_NUM_THREADS=2 pytest bench/bench_davit.py --benchmark-only -s
Each case times the native call with pytest-benchmark and timm's eager equivalent (fp32)
with the same repeat count right after; `extra_info` records both sides and the speedup
(timm / native). Shapes: DaViT-Tiny's four stages at 224x224 and the whole model, batch 1
and 8; native precision fp32 (same math as timm) and bf16 (bf16 projections/MLP, fp32 sums).
"""

from __future__ import annotations

import statistics
import time

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models import davit as timm_davit  # noqa: E402

from dovetail_ext import _core  # noqa: E402
from dovetail_ext.davit import PackedAttention, create_model, load_timm_state_dict  # noqa: E402

THREADS = 2
STAGES = [(56, 96, 3), (28, 192, 6), (14, 384, 12), (7, 768, 24)]  # Tiny at 224: side, C, heads


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(THREADS)


def _times_ms(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return times


def _compare(benchmark, native, eager, rounds: int, flops: float | None = None):
    """Times both sides with the same round count. The speedup is reported from medians and
    from minima: on a shared machine the minimum is the stable figure (interference only
    ever adds time), the median shows what a contended run sees."""
    for _ in range(2):  # warm both: first calls allocate and pack caches
        native()
        eager()
    benchmark.pedantic(native, rounds=rounds, iterations=1)
    if not benchmark.enabled:  # --benchmark-disable: a smoke run, nothing to compare
        return
    st = benchmark.stats.stats
    native_med, native_min = 1e3 * st.median, 1e3 * st.min
    timm_times = _times_ms(eager, rounds)
    timm_med, timm_min = statistics.median(timm_times), min(timm_times)
    info = dict(native_ms=round(native_med, 4), timm_ms=round(timm_med, 4), native_min_ms=round(native_min, 4),
                timm_min_ms=round(timm_min, 4), speedup=round(timm_med / native_med, 3),
                speedup_min=round(timm_min / native_min, 3), isa=_core.get_isa(), threads=THREADS)
    if flops:
        info["native_gflops_min"] = round(flops / native_min / 1e6, 1)
    benchmark.extra_info.update(info)
    benchmark.extra_info["precision"] = benchmark.name.split("-")[-1].rstrip("]")
    print(f"\n  {benchmark.name}: min native {native_min:.3f} ms / timm {timm_min:.3f} ms = "
          f"x{timm_min / native_min:.2f}; median x{timm_med / native_med:.2f}"
          + (f"; {flops / native_min / 1e6:.0f} GFLOP/s" if flops else ""))


def _attn_flops(B, N, C, core):  # qkv + proj GEMMs + attention core (multiply-add = 2 flops)
    return 2.0 * B * N * 4 * C * C + 4.0 * B * N * core * C


PRECISIONS = ["fp32", "bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s[0]}x{s[0]}x{s[1]}")
def test_window_attention(benchmark, batch, stage, precision):
    side, C, heads = stage
    torch.manual_seed(0)
    mod = timm_davit.WindowAttention(C, (7, 7), heads).eval()
    packed = PackedAttention(mod.qkv.weight, mod.qkv.bias, mod.proj.weight, mod.proj.bias, precision)
    x = torch.randn(batch, side, side, C)
    xn = x.numpy()

    @torch.no_grad()
    def eager():  # timm's SpatialBlock attention part (224-sized maps need no padding)
        win = timm_davit.window_partition(x, (7, 7)).view(-1, 49, C)
        out = mod(win).view(-1, 7, 7, C)
        return timm_davit.window_reverse(out, (7, 7), side, side).contiguous()

    _compare(benchmark, lambda: packed.window(xn, heads, 7), eager, rounds=40 if batch == 1 else 15,
             flops=_attn_flops(batch, side * side, C, 49))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s[0]}x{s[0]}x{s[1]}")
def test_channel_attention(benchmark, batch, stage, precision):
    side, C, heads = stage
    torch.manual_seed(0)
    mod = timm_davit.ChannelAttention(C, heads, qkv_bias=True).eval()
    packed = PackedAttention(mod.qkv.weight, mod.qkv.bias, mod.proj.weight, mod.proj.bias, precision)
    x = torch.randn(batch, side * side, C)
    xn = x.numpy()
    _compare(benchmark, lambda: packed.channel(xn, heads), torch.no_grad()(lambda: mod(x)),
             rounds=40 if batch == 1 else 15, flops=_attn_flops(batch, side * side, C, C // heads))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch", [1, 8])
def test_davit_tiny_forward(benchmark, batch, precision):
    torch.manual_seed(0)
    ref = timm.create_model("davit_tiny", pretrained=False).eval()
    ours = load_timm_state_dict(create_model("davit_tiny"), ref.state_dict()).set_precision(precision)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        _compare(benchmark, lambda: ours(x), lambda: ref(x), rounds=15 if batch == 1 else 5,
                 flops=2 * 4.52e9 * batch)
