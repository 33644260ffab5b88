"""DaViT native ops against their float64 PyTorch twins and timm's modules, on every ISA path."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dovetail_ext import _core  # noqa: E402
from dovetail_ext.davit import ops, reference  # noqa: E402

from davit_helpers import ISAS, assert_derived, isa_path, max_err  # noqa: E402

# (B, H, W, C, heads, window): padding on both axes, windows larger than the map,
# head dims 8 / 12 / 32, C not a multiple of the SIMD width.
WINDOW_CASES = [
    (1, 56, 56, 96, 3, 7),
    (3, 13, 11, 36, 3, 7),
    (2, 9, 16, 40, 5, 4),
    (1, 3, 5, 16, 2, 7),
    (2, 15, 8, 24, 2, 7),
]
# (B, N, C, groups). N >= 4C takes the Gram form (one image shared by all threads, or with
# B >= 2 threads images owned by threads); smaller N the direct two-pass form.
CHANNEL_CASES = [
    (1, 3136, 96, 3),
    (5, 300, 24, 2),
    (3, 97, 36, 3),
    (2, 50, 40, 5),
    (1, 1, 32, 1),
    (2, 1025, 24, 2),
]


def _weights(C: int, gen: torch.Generator):
    s = C ** -0.5  # keeps logits O(1): attention maps far from uniform, no saturation
    return (torch.randn(3 * C, C, generator=gen) * s, torch.randn(3 * C, generator=gen) * 0.5,
            torch.randn(C, C, generator=gen) * s, torch.randn(C, generator=gen) * 0.5)


def _f64(ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "x".join(map(str, c)))
def test_window_attention_matches_reference(isa, case):
    B, H, W, C, heads, ws = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, H, W, C, generator=gen)
    w = _weights(C, gen)
    ref64 = reference.window_attention(x.double(), *_f64(w), heads, ws)
    ref32 = reference.window_attention(x, *w, heads, ws)
    with isa_path(isa):
        y = ops.window_attention(x, *w, heads, ws)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    assert_derived(y, ref64, ref32, what=f"window {case} on {isa}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_channel_attention_matches_reference(isa, case):
    B, N, C, groups = case
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, N, C, generator=gen)
    w = _weights(C, gen)
    ref64 = reference.channel_attention(x.double(), *_f64(w), groups)
    ref32 = reference.channel_attention(x, *w, groups)
    with isa_path(isa):
        y = ops.channel_attention(x.numpy(), *[t.numpy() for t in w], groups)
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    assert_derived(y, ref64, ref32, what=f"channel {case} on {isa}")


@pytest.mark.parametrize("isa", ["avx2", "avxvnni", "avx512", "avx512bf16"])
def test_simd_paths_agree_with_scalar(isa):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 12, 40, generator=gen)
    w = _weights(40, gen)
    with isa_path("scalar"):
        ys = ops.window_attention(x, *w, 5, 7)
        cs = ops.channel_attention(x.view(2, 120, 40), *w, 5)
    with isa_path(isa):
        yv = ops.window_attention(x, *w, 5, 7)
        cv = ops.channel_attention(x.view(2, 120, 40), *w, 5)
    # Same math, different summation order (FMA, vector lanes): a few ulps of the output.
    ref64 = reference.window_attention(x.double(), *_f64(w), 5, 7)
    ref32 = reference.window_attention(x, *w, 5, 7)
    assert max_err(yv, ys) <= 2 * max_err(ref32, ref64) + 1e-6
    ref64 = reference.channel_attention(x.view(2, 120, 40).double(), *_f64(w), 5)
    ref32 = reference.channel_attention(x.view(2, 120, 40), *w, 5)
    assert max_err(cv, cs) <= 2 * max_err(ref32, ref64) + 1e-6


# ---- the GEMM tile and the model helpers ---------------------------------------------------------
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 17), (13, 97, 33), (50, 64, 65), (97, 130, 100)])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_tile(isa, m, k, n, gelu):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * k ** -0.5
    b = rng.standard_normal(n, dtype=np.float32)
    r = rng.standard_normal((m, n), dtype=np.float32)
    f = torch.nn.functional
    ref64 = f.linear(torch.from_numpy(x).double(), torch.from_numpy(w).double(), torch.from_numpy(b).double())
    ref32 = f.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
    if gelu:
        ref64, ref32 = f.gelu(ref64), f.gelu(ref32)
    ref64, ref32 = ref64 + torch.from_numpy(r).double(), ref32 + torch.from_numpy(r)
    with isa_path(isa):
        packed = _core.davit_pack_linear(w, b)
        # residual is added before the GELU in the kernel; test it only without GELU
        y = _core.davit_linear(x, packed, None if gelu else r, gelu)
    if gelu:
        y = y + r
    assert_derived(y, ref64, ref32, what=f"linear {m}x{k}x{n} gelu={gelu} on {isa}")


@pytest.mark.parametrize("isa", ISAS)
def test_model_helpers(isa):
    gen = torch.Generator().manual_seed(4)
    B, H, W, C = 2, 9, 6, 40
    x = torch.randn(B, H, W, C, generator=gen)
    g, b = 1 + 0.1 * torch.randn(C, generator=gen), 0.1 * torch.randn(C, generator=gen)
    cw, cb = torch.randn(C, 1, 3, 3, generator=gen) * 0.3, torch.randn(C, generator=gen) * 0.1
    f1w, f1b = torch.randn(4 * C, C, generator=gen) * C ** -0.5, torch.randn(4 * C, generator=gen) * 0.1
    f2w, f2b = torch.randn(C, 4 * C, generator=gen) * (4 * C) ** -0.5, torch.randn(C, generator=gen) * 0.1
    F = torch.nn.functional
    with isa_path(isa):
        ln = _core.davit_layer_norm(x.numpy(), g.numpy(), b.numpy(), 1e-5)
        cpe = _core.davit_conv_pos_enc(x.numpy(), cw.numpy(), cb.numpy())
        mlp = _core.davit_mlp(x.numpy(), g.numpy(), b.numpy(), _core.davit_pack_linear(f1w.numpy(), f1b.numpy()),
                              _core.davit_pack_linear(f2w.numpy(), f2b.numpy()), 1e-5)
    d = [t.double() for t in (x, g, b, cw, cb, f1w, f1b, f2w, f2b)]
    assert_derived(ln, F.layer_norm(d[0], (C,), d[1], d[2]), F.layer_norm(x, (C,), g, b), what="layer_norm")
    assert_derived(cpe, reference.conv_pos_enc(d[0], d[3], d[4]), reference.conv_pos_enc(x, cw, cb), what="cpe")
    assert_derived(mlp, reference.mlp(d[0], *d[1:3], *d[5:]), reference.mlp(x, g, b, f1w, f1b, f2w, f2b), what="mlp")


# ---- against timm's own modules, at the stage sizes of a 231 x 197 image -------------------------
@pytest.fixture(scope="module")
def timm_davit():
    return pytest.importorskip("timm.models.davit")


# Tiny's stages at 231x197: 58x50 (pads to 63x56), 29x25, 15x13, 8x7; and at 224x224: 56..7.
TIMM_STAGES = [(58, 50, 96, 3), (29, 25, 192, 6), (15, 13, 384, 12), (8, 7, 768, 24), (56, 56, 96, 3),
               (7, 7, 768, 24)]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stage", TIMM_STAGES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_ops_match_timm_modules(timm_davit, batch, stage):
    H, W, C, heads = stage
    F = torch.nn.functional
    torch.manual_seed(5)
    wa = timm_davit.WindowAttention(C, (7, 7), heads).eval()
    ca = timm_davit.ChannelAttention(C, heads, qkv_bias=True).eval()
    with torch.no_grad():
        for lin in (wa.qkv, wa.proj, ca.qkv, ca.proj):
            lin.bias.normal_(0, 0.2)
    x = torch.randn(batch, H, W, C)
    with torch.no_grad():
        def timm_window(mod, t):
            pad_r, pad_b = (7 - W % 7) % 7, (7 - H % 7) % 7
            tp = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
            Hp, Wp = tp.shape[1:3]
            win = timm_davit.window_partition(tp, (7, 7)).view(-1, 49, C)
            o = mod(win).view(-1, 7, 7, C)
            return timm_davit.window_reverse(o, (7, 7), Hp, Wp)[:, :H, :W, :]

        t32 = timm_window(wa, x)
        t64 = timm_window(wa.double(), x.double())
        wa.float()
        y = ops.window_attention(x, wa.qkv.weight, wa.qkv.bias, wa.proj.weight, wa.proj.bias, heads)
        assert_derived(y, t64, t32, what=f"window vs timm {stage} b{batch}")

        xc = x.reshape(batch, H * W, C)
        c32 = ca(xc)
        c64 = ca.double()(xc.double())
        ca.float()
        yc = ops.channel_attention(xc, ca.qkv.weight, ca.qkv.bias, ca.proj.weight, ca.proj.bias, heads)
        assert_derived(yc, c64, c32, what=f"channel vs timm {stage} b{batch}")


# ---- input handling and errors ---------------------------------------------------------------
def test_non_contiguous_inputs_are_handled():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(2, 32, 9, 11, generator=gen)
    x = base.permute(0, 2, 3, 1)  # [B, H, W, C] view with channels-first strides
    w = _weights(32, gen)
    assert not x.is_contiguous()
    y = ops.window_attention(x, *w, 4)
    np.testing.assert_array_equal(y.numpy(), ops.window_attention(x.contiguous(), *w, 4).numpy())
    xn = np.asfortranarray(x.reshape(2, 99, 32).numpy())
    wn = [t.numpy() for t in w]
    np.testing.assert_array_equal(ops.channel_attention(xn, *wn, 4),
                                  ops.channel_attention(np.ascontiguousarray(xn), *wn, 4))


def test_thread_count():
    """set_num_threads: the ops give the same bits at 1 and 3 threads (each output's sums do
    not depend on the split); counts out of range or not integers are refused, naming them."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 13, 11, 36, generator=gen), _weights(36, gen)
    xc = torch.randn(2, 300, 24, generator=gen)
    wc = _weights(24, gen)
    before = ops.get_num_threads()
    try:
        outs = []
        for n in (1, 3):
            ops.set_num_threads(n)
            assert ops.get_num_threads() == n
            outs.append((ops.window_attention(x, *w, 3), ops.channel_attention(xc, *wc, 2)))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        for bad in (0, -1, 1025, 2 ** 31, 2.0, True, "2", None):
            with pytest.raises(ValueError, match="threads must be"):
                ops.set_num_threads(bad)
        assert ops.get_num_threads() == 3
        ops.set_num_threads(np.int64(2))
        assert ops.get_num_threads() == 2
    finally:
        ops.set_num_threads(before)


def test_bias_may_be_absent():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 8, 9, 16, generator=gen)
    qw, _, pw, _ = _weights(16, gen)
    y = ops.window_attention(x, qw, None, pw, None, 2, 7)
    ref = reference.window_attention(x.double(), qw.double(), None, pw.double(), None, 2, 7)
    assert max_err(y, ref) < 1e-4


@pytest.mark.parametrize("bad,match", [
    (dict(heads=5), "C=16 is not divisible by num_heads=5"),
    (dict(heads=0), "num_heads must be a positive integer"),
    (dict(qkv_weight=torch.zeros(16, 16)), r"qkv_weight has shape \(16, 16\), expected \(48, 16\)"),
    (dict(proj_bias=torch.zeros(17)), r"proj_bias has shape \(17,\), expected \(16,\)"),
    (dict(x=torch.zeros(1, 8, 8, 16, dtype=torch.float64)), "x must be float32, got torch.float64"),
    (dict(qkv_bias=torch.zeros(48, dtype=torch.float16)), "qkv_bias must be float32"),
    (dict(x=torch.zeros(1, 64, 16)), r"x must be \[B, H, W, C\]"),
    (dict(x=torch.zeros(1, 0, 8, 16)), "x must not be empty"),
    (dict(window_size=0), "window_size must be an integer in"),
    (dict(window_size=True), "window_size must be an integer in"),
    (dict(x=[[1.0]]), "x must be a torch tensor or a numpy array"),
    (dict(qkv_weight=torch.zeros(48, 16).tolist()), "qkv_weight must be a torch tensor or a numpy array, got list"),
    (dict(x=torch.zeros(1, 8, 8, 16, requires_grad=True)), "no backward pass"),
    (dict(proj_weight=torch.zeros(16, 16, requires_grad=True)), "no backward pass"),
])
def test_window_attention_rejects_bad_input(bad, match):
    args = dict(x=torch.zeros(1, 8, 8, 16), qkv_weight=torch.zeros(48, 16), qkv_bias=torch.zeros(48),
                proj_weight=torch.zeros(16, 16), proj_bias=torch.zeros(16), heads=2, window_size=7)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.window_attention(args["x"], args["qkv_weight"], args["qkv_bias"], args["proj_weight"],
                             args["proj_bias"], args["heads"], args["window_size"])


def test_channel_attention_rejects_bad_input():
    w = [torch.zeros(48, 16), torch.zeros(48), torch.zeros(16, 16), torch.zeros(16)]
    with pytest.raises(ValueError, match="C=16 is not divisible by num_groups=3"):
        ops.channel_attention(torch.zeros(1, 5, 16), *w, 3)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        ops.channel_attention(torch.zeros(1, 5, 4, 16), *w, 2)


def test_packed_attention_checks_its_arguments():
    """PackedAttention.window / .channel check sizes before the native call: a window side
    of 65536 would square to 0 in 32 bits; a 2**31 or a float would be pybind11's TypeError
    quoting the whole input."""
    gen = torch.Generator().manual_seed(3)
    p = ops.PackedAttention(*_weights(8, gen))
    x = np.random.default_rng(0).random((1, 4, 4, 8), dtype=np.float32)
    for ws in (65536, 131072, 2 ** 31, 17, 2.5, True):
        with pytest.raises(ValueError, match="window_size must be an integer in") as e:
            p.window(x, 2, ws)
        assert len(str(e.value)) < 120
    for bad in (2 ** 31, 3, 2.0, 0):
        with pytest.raises(ValueError, match="num_heads"):
            p.window(x, bad, 2)
        with pytest.raises(ValueError, match="num_groups"):
            p.channel(x.reshape(1, 16, 8), bad)
    # the native check itself, in 64 bits
    with pytest.raises(ValueError, match="window_size must be in"):
        _core.davit_window_attention(x, p.qkv, p.proj, 2, 65536)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [3, 100])  # the direct form, and the Gram form (N >= 4C)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_channel_attention_spreads_nan_like_its_twin(isa, n, bad):
    """A NaN or inf token reaches every entry of its image's channel maps, so every output of
    that image is NaN, as in the PyTorch twin; the other images are untouched."""
    gen = torch.Generator().manual_seed(11)
    w = _weights(8, gen)
    x = torch.randn(2, n, 8, generator=gen)
    x[0, 1, 2] = bad
    with isa_path(isa):
        y = ops.channel_attention(x, *w, 2)
    ref = reference.channel_attention(x.double(), *(t.double() for t in w), 2)
    assert torch.isnan(ref[0]).all() and torch.isnan(y[0]).all()
    assert torch.isfinite(y[1]).all() and max_err(y[1], ref[1]) < 1e-4


def test_native_layer_checks_name_the_problem():
    q = _core.davit_pack_linear(np.zeros((48, 16), np.float32))
    p = _core.davit_pack_linear(np.zeros((16, 16), np.float32))
    x = np.zeros((1, 7, 7, 16), np.float32)
    with pytest.raises(ValueError, match="qkv maps 16 -> 48 features, expected 32 -> 96"):
        _core.davit_window_attention(np.zeros((1, 7, 7, 32), np.float32), q, p, 2)
    with pytest.raises(ValueError, match="proj maps 16 -> 48"):
        _core.davit_channel_attention(x.reshape(1, 49, 16), q, q, 2)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        _core.davit_pack_linear(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="must have dtype float32"):
        _core.davit_window_attention(x.astype(np.float64), q, p, 2)
    with pytest.raises(ValueError, match="residual has shape"):
        _core.davit_window_attention(x, q, p, 2, 7, np.zeros((1, 7, 7, 8), np.float32))
    with pytest.raises(ValueError, match="unknown ISA path"):
        _core.set_isa("sse9")


# ---- CUDA ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not (_core.cuda_compiled() and _core.cuda_device_count() > 0 and torch.cuda.is_available()),
    reason="needs a CUDA device and a CUDA build of dovetail_ext")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", WINDOW_CASES[:4], ids=lambda c: "x".join(map(str, c)))
def test_window_attention_cuda(case):
    B, H, W, C, heads, ws = case
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(B, H, W, C, generator=gen)
    w = _weights(C, gen)
    y = ops.window_attention(x.cuda(), *[t.cuda() for t in w], heads, ws)
    assert y.is_cuda
    assert_derived(y.cpu(), reference.window_attention(x.double(), *_f64(w), heads, ws),
                   reference.window_attention(x, *w, heads, ws), what=f"cuda window {case}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_channel_attention_cuda(case):
    B, N, C, groups = case
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, N, C, generator=gen)
    w = _weights(C, gen)
    y = ops.channel_attention(x.cuda(), *[t.cuda() for t in w], groups)
    assert_derived(y.cpu(), reference.channel_attention(x.double(), *_f64(w), groups),
                   reference.channel_attention(x, *w, groups), what=f"cuda channel {case}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_weights_on_other_device_are_refused():
    w = [torch.zeros(48, 16), torch.zeros(48), torch.zeros(16, 16), torch.zeros(16)]
    with pytest.raises(ValueError, match="must be a tensor on cuda"):
        ops.window_attention(torch.zeros(1, 7, 7, 16, device="cuda"), *w, 2)


# ---- bf16 projections ----------------------------------------------------------------------------
def _bf16_round(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).bfloat16().double().numpy()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 17), (13, 97, 33), (50, 64, 65), (97, 130, 100)])
def test_linear_tile_bf16(isa, m, k, n):
    """The bf16 tile must equal the product of the bf16-rounded operands up to fp32 summation."""
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * k ** -0.5
    b = rng.standard_normal(n, dtype=np.float32)
    xr, wr = _bf16_round(x), _bf16_round(w)
    ref64 = xr @ wr.T + b
    ref32 = (torch.from_numpy(xr).float() @ torch.from_numpy(wr).float().T + torch.from_numpy(b)).numpy()
    with isa_path(isa):
        y = _core.davit_linear(x, _core.davit_pack_linear(w, b, bf16=True))
    assert_derived(y, ref64, ref32, what=f"bf16 linear {m}x{k}x{n} on {isa}")


@pytest.mark.parametrize("isa", ["avx512", "avx512bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 17), (6, 64, 64), (13, 97, 33), (50, 64, 65), (97, 130, 100)])
def test_linear_tile_bf16_same_bits_as_scalar(isa, m, k, n):
    """The AVX-512 bf16 tiles (the pair sums as two FMAs, or vdpbf16ps) give the scalar
    tile's bits: row tails, column tails past 16, 32 and 64, odd k (a padded pair); values
    in the normal range (vdpbf16ps flushes denormals)."""
    rng = np.random.default_rng(m * 5 + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * k ** -0.5
    b = rng.standard_normal(n, dtype=np.float32)
    packed = _core.davit_pack_linear(w, b, bf16=True)
    with isa_path("scalar"):
        want = _core.davit_linear(x, packed)
    with isa_path(isa):
        np.testing.assert_array_equal(_core.davit_linear(x, packed), want)


@pytest.mark.parametrize("isa", ["scalar", "avx512", "avx512bf16"])
@pytest.mark.parametrize("case", [(2, 9, 16, 40, 5, 4), (1, 15, 13, 96, 3, 7)], ids=lambda c: "x".join(map(str, c)))
def test_window_attention_bf16(isa, case):
    """bf16 projections: error against the float64 op within 2x PyTorch's own bf16 matmuls."""
    B, H, W, C, heads, ws = case
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(B, H, W, C, generator=gen)
    w = _weights(C, gen)
    ref64 = reference.window_attention(x.double(), *_f64(w), heads, ws)
    torch_bf16 = reference.window_attention(x, *w, heads, ws, linear_dtype=torch.bfloat16)
    with isa_path(isa):
        y = ops.window_attention(x, *w, heads, ws, precision="bf16")
    assert_derived(y, ref64, torch_bf16, factor=2.0, what=f"bf16 window {case} on {isa}")


@pytest.mark.parametrize("isa", ["scalar", "avx512", "avx512bf16"])
@pytest.mark.parametrize("case", [(3, 97, 36, 3), (2, 196, 384, 12), (1, 800, 96, 3)],
                         ids=lambda c: "x".join(map(str, c)))
def test_channel_attention_bf16(isa, case):
    B, N, C, groups = case
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, N, C, generator=gen)
    w = _weights(C, gen)
    ref64 = reference.channel_attention(x.double(), *_f64(w), groups)
    torch_bf16 = reference.channel_attention(x, *w, groups, linear_dtype=torch.bfloat16)
    with isa_path(isa):
        y = ops.channel_attention(x, *w, groups, precision="bf16")
    assert_derived(y, ref64, torch_bf16, factor=2.0, what=f"bf16 channel {case} on {isa}")


def test_bad_precision_is_refused():
    w = [torch.zeros(48, 16), torch.zeros(48), torch.zeros(16, 16), torch.zeros(16)]
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        ops.window_attention(torch.zeros(1, 7, 7, 16), *w, 2, precision="fp16")
