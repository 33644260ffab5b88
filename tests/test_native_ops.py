"""Each native op against its PyTorch twin (dovetail_ext.reference), at awkward sizes, for
every weight format and every ISA path; fast paths against the scalar path; batch
invariance; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dovetail_ext import _core, reference
from dovetail_ext.quant import quantize, quantize_activations_q8
from native_helpers import isa_params, random_tree, tree_ancestors, use_isa

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
SHAPES = [(1, 32, 1), (3, 96, 7), (17, 160, 33), (5, 576, 100), (2, 1568, 19), (64, 288, 40)]  # (T, K, N)


@pytest.fixture(params=isa_params())
def isa(request):
    with use_isa(request.param):
        yield request.param


def _packed(w):
    return _core.PackedWeight(w.dtype, w.shape[0], w.shape[1], np.ascontiguousarray(w.data))


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,N", SHAPES)
def test_linear_matches_twin(isa, dtype, T, K, N):
    rng = np.random.default_rng(T * 1000 + K + N)
    x = _rand(rng, T, K)
    x[0, :5] *= 30.0  # an outlier block, as real activations have
    w = quantize(_rand(rng, N, K, scale=K ** -0.5), dtype)
    y = _core.linear(x, _packed(w), threads=2)
    want = reference.linear_q8(torch.from_numpy(x).double(), w).numpy()
    from dovetail_ext.quant import dequantize
    bound = np.abs(x).astype(np.float64) @ np.abs(dequantize(w)).T.astype(np.float64)
    # fp32 accumulation error grows ~ sqrt(K) * eps32 * sum |terms| (random rounding).
    assert np.all(np.abs(y - want) <= 2 * np.sqrt(K) * 6e-8 * bound + 1e-6), f"max err {np.abs(y - want).max()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_batch_invariant(isa, dtype):
    """A row's result is bitwise the same alone, in a batch of any size, with any threads."""
    rng = np.random.default_rng(7)
    K, N = 352, 45
    x = _rand(rng, 33, K)
    pw = _packed(quantize(_rand(rng, N, K, scale=0.1), dtype))
    full = _core.linear(x, pw, threads=2)
    for T in (1, 2, 5, 16):
        part = _core.linear(x[:T], pw, threads=1)
        np.testing.assert_array_equal(part, full[:T])
    np.testing.assert_array_equal(_core.linear(x[7:8], pw), full[7:8])


@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_paths_match_scalar(dtype):
    rng = np.random.default_rng(3)
    x = _rand(rng, 9, 224)
    pw = _packed(quantize(_rand(rng, 31, 224, scale=0.1), dtype))
    with use_isa("scalar"):
        ref = _core.linear(x, pw)
    for name in _core.supported_isas():
        with use_isa(name):
            np.testing.assert_allclose(_core.linear(x, pw), ref, rtol=1e-5, atol=1e-5)


def test_bf16_activation_rounding_on_every_isa():
    """The bf16 rounding of activations (the AVX-512 path's integer vector code, the scalar
    fp32_to_bf16 elsewhere) is quant.round_bf16's, on every path: ties to even, values that
    round up to infinity, NaN and infinities; a linear over them gives the same bits (NaN
    where a NaN or inf*0 enters)."""
    from dovetail_ext.quant import round_bf16
    rng = np.random.default_rng(5)
    x = _rand(rng, 3, 45)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00000001, 0x80000000], np.uint32)
    x[0, :5] = ties.view(np.float32)  # halfway cases, a denormal, -0
    x[1, 3], x[1, 7], x[2, 44] = np.nan, np.inf, -np.inf
    x[2, 0] = np.array([0x7F7FFFFF], np.uint32).view(np.float32)[0]  # rounds up to infinity
    w = quantize(_rand(rng, 5, 45), "bf16")
    eye = quantize(np.eye(45, dtype=np.float32), "bf16")  # y = x rounded, exactly
    with use_isa("scalar"):
        ref = _core.linear(x, _packed(w))
    for name in _core.supported_isas():
        with use_isa(name):
            np.testing.assert_array_equal(_core.linear(x, _packed(w)), ref, err_msg=name)
            got = _core.linear(x[:1], _packed(eye))
        np.testing.assert_array_equal(got, round_bf16(x[:1]), err_msg=name)
    assert np.isinf(round_bf16(x[2:3])[0, 0]) and np.isnan(ref[1]).all()


@pytest.mark.parametrize("T,K", [(1, 32), (7, 256), (9, 96), (3, 576), (2, 544), (5, 1536), (1, 1056)])
def test_quantize_acts_bitwise_twin(T, K):
    """On every ISA path: bit for bit the NumPy twin (round half to even, all-zero blocks,
    large and tiny magnitudes; rows of 1 to 48 blocks, the AVX-512 path taking 16 at a time)."""
    rng = np.random.default_rng(K + T)
    x = _rand(rng, T, K)
    x[0, :32] = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 126.5] * 4, np.float32)  # exact halves
    x[T // 2, -32:] = 0.0  # an all-zero block
    x[-1, :] *= 1e4
    if K >= 64:
        x[0, 32:64] *= 1e-30
    q2, d2, s2 = quantize_activations_q8(x)
    for name in _core.supported_isas():
        with use_isa(name):
            q, d, ds = _core.quantize_acts(x)
        np.testing.assert_array_equal(q, q2, err_msg=name)
        np.testing.assert_array_equal(d, d2, err_msg=name)
        np.testing.assert_array_equal(ds, d2 * s2.astype(np.float32), err_msg=name)


def test_quantize_acts_simd_equals_scalar_on_nan_and_inf():
    """Non-finite activations (never valid, but never a crash): every ISA path gives the
    scalar path's codes and scales."""
    x = np.random.default_rng(4).standard_normal((3, 608)).astype(np.float32)  # 19 blocks a row
    x[0, 3], x[1, 40], x[2, 70], x[2, 71] = np.nan, np.inf, -np.inf, np.nan
    x[0, 600], x[1, 512:544] = np.inf, np.nan  # in the second group of 16 blocks; a block all NaN
    with use_isa("scalar"):
        ref = _core.quantize_acts(x)
    for name in _core.supported_isas():
        with use_isa(name):
            got = _core.quantize_acts(x)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_row(dtype):
    from dovetail_ext.quant import dequantize
    rng = np.random.default_rng(2)
    rows, cols = 37, 96 if dtype.startswith("q") else 99  # 3 panels, the last one partial; odd K
    w = quantize(_rand(rng, rows, cols), dtype)
    pw = _packed(w)
    for r in range(rows):
        np.testing.assert_array_equal(pw.dequantize_row(r), dequantize(w)[r])


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T,K,N", [(1, 32, 1), (3, 97, 7), (9, 162, 33), (17, 576, 100), (8, 1538, 19)])
def test_float_linear_same_bits_on_every_isa(dtype, T, K, N):
    """Float weights: every ISA path gives the scalar path's bits (the same two FMA chains
    per output; for bf16 vdpbf16ps on the avx512bf16 path and the same sums as two FMAs
    on every other path), for odd K, padded pairs, partial panels and token tiles; values in
    the normal range (vdpbf16ps flushes denormals, the FMAs do not)."""
    rng = np.random.default_rng(T + K + N)
    x = _rand(rng, T, K, scale=float(rng.uniform(0.01, 100.0)))
    pw = _packed(quantize(_rand(rng, N, K, scale=K ** -0.5), dtype))
    with use_isa("scalar"):
        ref = _core.linear(x, pw, threads=2)
    for name in _core.supported_isas():
        with use_isa(name):
            np.testing.assert_array_equal(_core.linear(x, pw, threads=2), ref, err_msg=name)


@pytest.mark.skipif("avxvnni" not in _core.supported_isas(), reason="CPU lacks avxvnni (AVX-VNNI or AVX512_VNNI + VL)")
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("T,K,N", [(1, 32, 1), (2, 96, 9), (3, 160, 17), (4, 576, 100), (5, 64, 8), (9, 1568, 23),
                                   (17, 288, 40)])
def test_vnni_sums_are_avx2s(dtype, T, K, N):
    """The avxvnni path's vpdpbusd block sums equal the avx2 path's pmaddubsw sums (both
    exact), so its outputs are the avx2 path's bit for bit: token sub-tiles of 1 to 4 and
    their tails, partial panels and halves, odd block counts, saturation-prone extremes
    (q4 codes 0 and 15, q8_0 codes -127 and 127, against activations of +-127)."""
    rng = np.random.default_rng(T * 7 + K + N)
    x = _rand(rng, T, K)
    x[0, :32] = np.where(np.arange(32) % 2, 1.0, -1.0) * 50.0  # a block quantized to +-127
    w = _rand(rng, N, K, scale=K ** -0.5)
    w[0, :32] = np.where(np.arange(32) % 2, 1.0, -1.0)  # a block at both ends of the code range
    pw = _packed(quantize(w, dtype))
    with use_isa("avx2"):
        ref = _core.linear(x, pw, threads=2)
    with use_isa("avxvnni"):
        got = _core.linear(x, pw, threads=2)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(_core.linear(x[T - 1:], pw, threads=1), ref[T - 1:])  # alone, one thread


@pytest.mark.parametrize("T,D", [(1, 8), (3, 97), (4, 576)])
def test_rmsnorm(T, D):
    rng = np.random.default_rng(D)
    x, w = _rand(rng, T, D, scale=3.0), _rand(rng, D)
    y = _core.rmsnorm(x, w, 1e-5)
    want = reference.rmsnorm(torch.from_numpy(x), torch.from_numpy(w), 1e-5).numpy()
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("Dh", [2, 6, 16, 64, 128])
def test_rope(Dh):
    rng = np.random.default_rng(Dh)
    T, H = 5, 3
    x = _rand(rng, T, H, Dh)
    pos = np.array([0, 1, 77, 4095, 8191], dtype=np.int32)
    y = _core.rope(x, pos, 100000.0, 8192)
    want = reference.rope(torch.from_numpy(x), torch.from_numpy(pos).long(), 100000.0).numpy()
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * np.abs(x).max() * 4)


@pytest.mark.parametrize("gate", ["swiglu", "geglu"])
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 101, 1536])
def test_gated_activations(gate, n):
    """Every ISA path against the PyTorch twin (the SIMD paths use a polynomial exp), over
    the whole range of the exp (saturating ends included). GeGLU's exp argument is the
    cubic a(g) = g (kGeluA + kGeluB g^2) computed in float32: its rounding grows the
    result's relative error by up to |a| ulps of a. (The float64 twin loses the tail of
    GELU for large negative g to cancellation in 1 + tanh: hence an absolute term of a
    float64 ulp of g u.)"""
    rng = np.random.default_rng(n)
    g, u = _rand(rng, 3, n, scale=4.0), _rand(rng, 3, n)
    g.flat[:6] = [0.0, -0.0, 90.0, -90.0, 200.0, -200.0][:g.size]
    gt, ut = torch.from_numpy(g.astype(np.float64)), torch.from_numpy(u.astype(np.float64))
    want = getattr(reference, gate)(gt, ut).numpy()
    a = np.abs(g.astype(np.float64)) * (1 if gate == "swiglu" else 1.5957691216 + 0.0713548163 * g.astype(np.float64) ** 2)
    tol = 2e-6 * np.abs(want) * (1 if gate == "swiglu" else 1 + np.minimum(a, 90)) + 1e-30
    if gate == "geglu":
        tol += 1e-15 * np.abs(g.astype(np.float64) * u)
    for name in _core.supported_isas():
        with use_isa(name):
            got = getattr(_core, gate)(g, u)
        assert np.all(np.abs(got - want) <= tol), (name, float(np.max(np.abs(got - want) / tol)))


@pytest.mark.parametrize("gate", ["swiglu", "geglu"])
def test_gated_activation_result_does_not_depend_on_position(gate):
    """A value's result is the same wherever it sits, in the vector body or the tail (batch
    invariance of the FFN)."""
    rng = np.random.default_rng(9)
    g, u = _rand(rng, 1, 40, scale=4.0), _rand(rng, 1, 40)
    fn = getattr(_core, gate)
    for name in _core.supported_isas():
        with use_isa(name):
            whole = fn(g, u)
            for start in (1, 3, 9, 17, 33):
                part = fn(np.ascontiguousarray(g[:, start:]), np.ascontiguousarray(u[:, start:]))
                np.testing.assert_array_equal(part, whole[:, start:], err_msg=f"{name} from {start}")


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 101, 1536])
@pytest.mark.parametrize("cap", [0.5, 30.0])
def test_softcap(n, cap):
    """Gemma 2's soft-capping on every ISA path against the PyTorch twin (cap tanh(x / cap),
    float64), saturating ends included, within 4 float32 ulps of the cap; and a value's
    result does not depend on where it sits (the tail goes through the vector code)."""
    rng = np.random.default_rng(n)
    x = _rand(rng, 3, n, scale=2 * cap)
    x.flat[:6] = [0.0, -0.0, 90.0 * cap, -90.0 * cap, 1e30, -1e30][:x.size]
    want = reference.softcap(torch.from_numpy(x.astype(np.float64)), cap).numpy()
    for name in _core.supported_isas():
        with use_isa(name):
            got = _core.softcap(x, cap)
            tail = _core.softcap(np.ascontiguousarray(x[:, 1:]), cap)
        np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.spacing(np.float32(cap)), err_msg=name)
        assert np.all(np.abs(got) <= cap), name
        np.testing.assert_array_equal(tail, got[:, 1:], err_msg=name)
    with pytest.raises(ValueError, match="cap must be a positive number"):
        _core.softcap(x, 0.0)


def _bf16(a: np.ndarray) -> np.ndarray:
    from dovetail_ext.quant import quantize as q
    return q(a, "bf16").data.reshape(a.shape)


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("T,H,KV,Dh,n_past", [(1, 1, 1, 8, 0), (5, 9, 3, 64, 11), (16, 4, 4, 20, 3),
                                              (33, 6, 2, 16, 0), (70, 2, 1, 24, 5), (6, 4, 2, 152, 19),
                                              # past one key chunk (128): several chunks merged,
                                              # threads splitting the keys or the rows
                                              (1, 9, 3, 64, 300), (4, 9, 3, 64, 250), (2, 6, 2, 40, 517),
                                              (16, 3, 1, 16, 120), (20, 4, 2, 24, 260)])
def test_attention_matches_twin(isa, kv_dtype, T, H, KV, Dh, n_past):
    rng = np.random.default_rng(T * H + Dh)
    S = n_past + T + 3  # spare slots after the batch must be ignored
    q = _rand(rng, T, H, Dh)
    k, v = _rand(rng, KV, S, Dh), _rand(rng, KV, S, Dh)
    anc = tree_ancestors(random_tree(rng, T))
    if kv_dtype == "bf16":
        kb, vb = _bf16(k), _bf16(v)
        out = _core.attention(q, kb, vb, n_past, anc, threads=2)
        k = (kb.astype(np.uint32) << 16).view(np.float32)
        v = (vb.astype(np.uint32) << 16).view(np.float32)
    else:
        out = _core.attention(q, k, v, n_past, anc, threads=2)
    L = n_past + T
    want = reference.attention(torch.from_numpy(q).double(), torch.from_numpy(k[:, :L]).double(),
                               torch.from_numpy(v[:, :L]).double(), n_past, torch.from_numpy(anc)).numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * np.sqrt(L))


def test_attention_takes_tiled_keys(isa):
    """tile_keys gives the kernels' layout: attention over it equals attention over [KV, S, Dh]."""
    rng = np.random.default_rng(3)
    T, H, KV, Dh, n_past = 7, 6, 2, 24, 21  # 28 slots: the second tile half used
    q = _rand(rng, T, H, Dh)
    k, v = _rand(rng, KV, n_past + T, Dh), _rand(rng, KV, n_past + T, Dh)
    anc = tree_ancestors(random_tree(rng, T))
    kt = _core.tile_keys(k)
    assert kt.shape == (KV, 2, Dh, 16)
    np.testing.assert_array_equal(kt[1, 1, :, 11], k[1, 27])  # slot 27 = tile 1, lane 11
    assert not kt[:, 1, :, 12:].any()  # padding slots are zero
    vp = np.zeros((KV, 32, Dh), np.float32)
    vp[:, :n_past + T] = v
    np.testing.assert_array_equal(_core.attention(q, kt, vp, n_past, anc), _core.attention(q, k, v, n_past, anc))
    kb = _bf16(k)
    np.testing.assert_array_equal(_core.tile_keys(kb)[0, 0, :, 5], kb[0, 5])
    with pytest.raises(ValueError, match=r"v has shape \(2, 28, 24\), expected \(2, 32, 24\)"):
        _core.attention(q, kt, v, n_past, anc)  # v not padded to the tiled slot count
    with pytest.raises(ValueError, match="k must be"):
        _core.attention(q, k[0], v, n_past, anc)


@pytest.mark.parametrize("T,n_past", [(12, 7), (5, 120), (5, 250), (5, 600), (12, 300)])
def test_attention_batch_invariant(isa, T, n_past):
    """A tree token's output is bitwise equal to computing it after committing its
    ancestors; past several 128-key chunks too (their edges follow a key's place in the
    token's list, also where the committed ancestors cross one), and the same whether the
    threads share a head's keys (2 threads, few rows) or each take whole rows (1 thread)."""
    rng = np.random.default_rng(5 + n_past)
    H, KV, Dh = 6, 2, 32
    anc = tree_ancestors(random_tree(rng, T))
    q = _rand(rng, T, H, Dh)
    k, v = _rand(rng, KV, n_past + T, Dh), _rand(rng, KV, n_past + T, Dh)
    tree_out = _core.attention(q, k, v, n_past, anc, threads=2)
    np.testing.assert_array_equal(_core.attention(q, k, v, n_past, anc, threads=1), tree_out)
    for t in range(T):
        path = np.flatnonzero(anc[t])  # ancestors in batch order, t last
        kk = np.concatenate([k[:, :n_past], k[:, n_past + path]], axis=1)
        vv = np.concatenate([v[:, :n_past], v[:, n_past + path]], axis=1)
        for threads in (1, 2):
            alone = _core.attention(q[t:t + 1], kk, vv, n_past + len(path) - 1, np.ones((1, 1), bool),
                                    threads=threads)
            np.testing.assert_array_equal(alone[0], tree_out[t])


def test_bad_inputs():
    rng = np.random.default_rng(0)
    w = quantize(_rand(rng, 4, 64), "q4_0")
    pw = _packed(w)
    with pytest.raises(ValueError, match="dtype float32"):
        _core.linear(np.zeros((2, 64), np.float64), pw)
    with pytest.raises(ValueError, match=r"shape \(2, 63\)"):
        _core.linear(np.zeros((2, 63), np.float32), pw)
    with pytest.raises(ValueError, match="needs 144 bytes"):
        _core.PackedWeight("q4_0", 4, 64, np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.PackedWeight("q8_0", 1, 40, np.zeros(40, np.uint8))
    with pytest.raises(ValueError, match="unknown weight dtype"):
        _core.PackedWeight("q5_k", 1, 32, np.zeros(32, np.uint8))
    with pytest.raises(ValueError, match="unknown ISA"):
        _core.set_isa("neon")
    q = np.zeros((3, 2, 8), np.float32)
    kv = np.zeros((1, 3, 8), np.float32)
    with pytest.raises(ValueError, match="lower-triangular"):
        _core.attention(q, kv, kv, 0, np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="diagonal"):
        _core.attention(q, kv, kv, 0, np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="ancestors has shape"):
        _core.attention(q, kv, kv, 0, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="n_past"):
        _core.attention(q, kv, kv, 1, np.tril(np.ones((3, 3), bool)))
    with pytest.raises(ValueError, match="outside"):
        _core.rope(np.zeros((1, 1, 4), np.float32), np.array([9], np.int32), 1e4, 8)
    with pytest.raises(ValueError, match="even"):
        _core.rope(np.zeros((1, 1, 5), np.float32), np.array([0], np.int32), 1e4, 8)


def test_non_contiguous_input_is_handled():
    rng = np.random.default_rng(0)
    pw = _packed(quantize(_rand(rng, 8, 64), "f32"))
    x = _rand(rng, 64, 4).T  # a transposed view
    np.testing.assert_allclose(_core.linear(x, pw), _core.linear(np.ascontiguousarray(x), pw), rtol=0, atol=0)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    np.testing.assert_array_equal(_core.linear(xt, pw), _core.linear(np.ascontiguousarray(x), pw))
