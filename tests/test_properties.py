"""Property tests (hypothesis) of the native entry points: random shapes, strides, weight
formats, token ids, positions, ancestor sets and tree shapes. Each call either computes
what the PyTorch twin in ``dovetail_ext.reference`` computes (the tolerances of
``test_native_ops.py`` / ``test_engine.py``) or raises a clear ``ValueError`` /
``IndexError``, and a refused call leaves an engine as it was.

Example counts are bounded (the file runs in well under a minute) and derandomized, so
CI runs the same examples every time; a longer exploration:
``DOVETAIL_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovetail_ext import _core, reference
from dovetail_ext.quant import dequantize, quantize
from dovetail_ext.target import TargetEngine
from native_helpers import make_source, random_weights, tiny_config, tree_ancestors, use_isa

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
ISAS = tuple(_core.supported_isas())
_SCALE = int(os.environ.get("DOVETAIL_HYPOTHESIS_EXAMPLES", "0"))


def budget(n: int) -> settings:
    """``n`` examples (or the environment's count), no deadline, the same examples each run."""
    return settings(max_examples=_SCALE or n, deadline=None, derandomize=not _SCALE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])  # fixtures are read-only


def _rand(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values as ``a`` [R, C] in another memory layout: C order, Fortran order, or
    a strided view into a larger buffer."""
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros((a.shape[0] * 2, a.shape[1] * 3), np.float32)
        big[::2, ::3] = a
        return big[::2, ::3]
    return a


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_one_thread):
    yield


# ------------------------------------------------------------------ linear


@st.composite
def linear_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    blocks = draw(st.integers(1, 8))
    K = 32 * blocks if dtype.startswith("q") else draw(st.one_of(st.integers(1, 80), st.just(32 * blocks)))
    return dict(dtype=dtype, T=draw(st.integers(0, 9)), K=K, N=draw(st.integers(1, 40)),
                threads=draw(st.integers(1, 3)), isa=draw(st.sampled_from(ISAS)),
                scale=draw(st.sampled_from([1e-3, 1.0, 300.0])), layout=draw(st.sampled_from(["c", "fortran",
                                                                                              "strided"])),
                seed=draw(st.integers(0, 2**16)))


@budget(150)
@given(linear_case())
def test_linear_any_format_shape_and_layout(c):
    x = _layout(_rand(c["seed"], c["T"], c["K"], scale=c["scale"]), c["layout"])
    w = quantize(_rand(c["seed"] + 1, c["N"], c["K"], scale=c["K"] ** -0.5), c["dtype"])
    pw = _core.PackedWeight(w.dtype, c["N"], c["K"], np.ascontiguousarray(w.data))
    with use_isa(c["isa"]):
        y = _core.linear(x, pw, threads=c["threads"])
    assert y.shape == (c["T"], c["N"]) and y.dtype == np.float32
    want = reference.linear_q8(torch.from_numpy(np.ascontiguousarray(x)).double(), w).numpy()
    bound = np.abs(x).astype(np.float64) @ np.abs(dequantize(w)).T.astype(np.float64)
    assert np.all(np.abs(y - want) <= 2 * np.sqrt(c["K"]) * 6e-8 * bound + 1e-6)


POWERS = st.integers(0, 62).map(lambda e: 2**e)  # products of these wrap around 64 bits
SIZES = st.one_of(POWERS, st.integers(-3, 100), st.integers(-3, 2**62))


@budget(300)
@given(dtype=st.sampled_from(DTYPES), rows=SIZES, cols=SIZES, nbytes=st.one_of(st.just(0), st.integers(0, 4096)))
def test_packed_weight_refuses_shapes_its_bytes_do_not_hold(dtype, rows, cols, nbytes):
    """Any (rows, cols, buffer): a weight whose size is exactly the buffer's, or ValueError
    (never a wrapped size that lets the copy read past the buffer)."""
    data = np.zeros(nbytes, np.uint8)
    try:
        pw = _core.PackedWeight(dtype, rows, cols, data)
    except ValueError as e:
        assert "weight" in str(e)
        return
    assert 0 < rows and 0 < cols and (pw.rows, pw.cols) == (rows, cols)
    np.testing.assert_array_equal(pw.dequantize_row(rows - 1), np.zeros(cols, np.float32))
    with pytest.raises(IndexError):
        pw.dequantize_row(rows)


# ------------------------------------------------------------------ element-wise ops and top-k


@budget(80)
@given(T=st.integers(0, 9), D=st.integers(1, 300), eps=st.sampled_from([1e-6, 1e-5]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_rmsnorm_any_shape(T, D, eps, scale, seed):
    x, w = _rand(seed, T, D, scale=scale), _rand(seed + 1, D)
    want = reference.rmsnorm(torch.from_numpy(x).double(), torch.from_numpy(w).double(), eps).numpy()
    np.testing.assert_allclose(_core.rmsnorm(x, w, eps), want, rtol=2e-6, atol=2e-6 * max(1.0, np.abs(w).max()))
    with pytest.raises(ValueError, match="weight has shape"):
        _core.rmsnorm(x, np.ones(D + 1, np.float32), eps)


@budget(80)
@given(T=st.integers(1, 8), H=st.integers(1, 4), half=st.integers(1, 64), theta=st.sampled_from([1e4, 5e5]),
       context=st.integers(1, 5000), data=st.data())
def test_rope_any_shape_and_position(T, H, half, theta, context, data):
    Dh = 2 * half
    pos = np.array(data.draw(st.lists(st.integers(0, context - 1), min_size=T, max_size=T)), np.int32)
    x = _rand(T * H + Dh, T, H, Dh)
    want = reference.rope(torch.from_numpy(x).double(), torch.from_numpy(pos).long(), theta).numpy()
    np.testing.assert_allclose(_core.rope(x, pos, theta, context), want, rtol=0, atol=4e-6 * np.abs(x).max())
    bad = pos.copy()
    bad[data.draw(st.integers(0, T - 1))] = data.draw(st.sampled_from([-1, context, context + 7]))
    with pytest.raises(ValueError, match="outside"):
        _core.rope(x, bad, theta, context)


@budget(80)
@given(n=st.integers(0, 5), V=st.integers(1, 300), isa=st.sampled_from(ISAS), data=st.data(),
       seed=st.integers(0, 2**16))
def test_topk_log_softmax_any_shape(n, V, isa, data, seed):
    k = data.draw(st.integers(1, V))
    x = _rand(seed, n, V, scale=data.draw(st.sampled_from([0.1, 3.0, 30.0])))
    with use_isa(isa):
        ids, logp = _core.topk_log_softmax(x, k)
    assert ids.shape == logp.shape == (n, k)
    ref = torch.log_softmax(torch.from_numpy(x).double(), dim=-1)
    want = torch.topk(ref, k, dim=-1).values.numpy()
    # fp32 logit minus an fp32 log-sum-exp: a rounding of each (eps32 = 1.2e-7).
    lse = torch.logsumexp(torch.from_numpy(x).double(), dim=-1, keepdim=True).numpy()
    tol = 1e-6 + 2.4e-7 * (np.abs(lse) + np.abs(want))
    assert np.all(np.abs(logp - want) <= tol)
    for r in range(n):  # the ids hold those values, best first, each once
        assert len(set(ids[r].tolist())) == k
        assert np.all(np.abs(ref[r, ids[r]].numpy() - logp[r]) <= tol[r])
    with pytest.raises(ValueError, match="k must be in"):
        _core.topk_log_softmax(x, V + 1)


@budget(60)
@given(n=st.integers(0, 4), V=st.integers(1, 300), ties=st.booleans(), isa=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16))
def test_argmax_rows_any_shape(n, V, ties, isa, seed):
    """The first maximum per row, as numpy's argmax, ties (rounded logits) included, on
    every ISA path."""
    x = _rand(seed, n, V, scale=3.0)
    if ties:
        x = np.round(x).astype(np.float32)
    with use_isa(isa):
        got = _core.argmax_rows(x)
    np.testing.assert_array_equal(got, np.argmax(x, axis=1) if n else np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="x has shape"):
        _core.argmax_rows(x.reshape(-1))


@budget(120)
@given(V=st.integers(1, 300), big=st.booleans(), ties=st.booleans(), masked=st.integers(0, 3),
       temperature=st.sampled_from([0.05, 0.7, 1.0, 3.0]), top_k=st.sampled_from([0, 1, 2, 5, 64, 400]),
       top_p=st.sampled_from([0.05, 0.5, 0.9, 0.999, 1.0]), scale=st.sampled_from([0.01, 2.0, 30.0]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_sampling_dist_any_row(V, big, ties, masked, temperature, top_k, top_p, scale, isa, seed):
    """Every ISA path gives the scalar path's distribution bit for bit (the exponentials
    and their 16-lane sums are the same operations in the same order), at awkward sizes,
    with ties, masked (-inf) tokens and flat rows (the head growing to the whole row); the
    probabilities sum to 1 and follow the float64 specification."""
    from dovetail_ext.sampling import SamplingParams, target_probs_by_full_sort
    V = V + 4096 if big else V
    x = _rand(seed, V, scale=scale)
    if ties:
        x = np.round(x).astype(np.float32)
    x[np.random.default_rng(seed).permutation(V)[:min(masked, V - 1)]] = -np.inf
    with use_isa("scalar"):
        want_ids, want_p = _core.sampling_dist(x, temperature, top_k, top_p)
    with use_isa(isa):
        ids, p = _core.sampling_dist(x, temperature, top_k, top_p)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(p, want_p)
    assert np.all(np.diff(ids) > 0) and np.all(p > 0) and abs(p.sum() - 1) < 1e-10
    assert not np.isin(np.flatnonzero(np.isneginf(x)), ids).any()
    spec = target_probs_by_full_sort(x, SamplingParams(temperature, top_p=top_p, top_k=top_k))
    common = np.intersect1d(ids, np.flatnonzero(spec))
    assert len(common) >= 0.98 * max(len(ids), np.count_nonzero(spec)) - 1  # boundaries within rounding
    dense = np.zeros(V)
    dense[ids] = p
    np.testing.assert_allclose(dense[common], spec[common], rtol=3e-5)


# ------------------------------------------------------------------ attention


@st.composite
def ancestor_set(draw, T: int) -> np.ndarray:
    """A random ancestor matrix: a tree's, a chain's, or any lower-triangular 0/1 set with
    the diagonal set (not every valid set is a tree)."""
    kind = draw(st.sampled_from(["tree", "chain", "any"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "chain":
        return np.tril(np.ones((T, T), bool))
    if kind == "tree":
        parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, T)])
        return tree_ancestors(parents)
    return np.tril(rng.random((T, T)) < draw(st.floats(0.0, 1.0))) | np.eye(T, dtype=bool)


@budget(150)
@given(T=st.integers(1, 20), KV=st.integers(1, 3), G=st.integers(1, 3), Dh=st.integers(1, 40),
       n_past=st.integers(0, 20), spare=st.integers(0, 3), kv_dtype=st.sampled_from(["f32", "bf16"]),
       threads=st.integers(1, 3), isa=st.sampled_from(ISAS), data=st.data(), seed=st.integers(0, 2**16))
def test_attention_any_ancestor_set(T, KV, G, Dh, n_past, spare, kv_dtype, threads, isa, data, seed):
    anc = data.draw(ancestor_set(T))
    H, S = KV * G, n_past + T + spare
    q, k, v = _rand(seed, T, H, Dh), _rand(seed + 1, KV, S, Dh), _rand(seed + 2, KV, S, Dh)
    if kv_dtype == "bf16":
        k, v = quantize(k, "bf16").data.reshape(k.shape), quantize(v, "bf16").data.reshape(v.shape)
    with use_isa(isa):
        out = _core.attention(q, k, v, n_past, anc, threads=threads)
    if kv_dtype == "bf16":
        k, v = ((a.astype(np.uint32) << 16).view(np.float32) for a in (k, v))
    L = n_past + T
    want = reference.attention(torch.from_numpy(q).double(), torch.from_numpy(k[:, :L]).double(),
                               torch.from_numpy(v[:, :L]).double(), n_past, torch.from_numpy(anc)).numpy()
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * np.sqrt(L))


@budget(60)
@given(T=st.integers(1, 8), n_past=st.integers(0, 4), data=st.data())
def test_attention_refuses_sets_that_are_not_ancestor_sets(T, n_past, data):
    anc = data.draw(ancestor_set(T))
    t = data.draw(st.integers(0, T - 1))
    bad = anc.copy()
    if T > 1 and data.draw(st.booleans()):
        bad[t, data.draw(st.integers(t + 1, T - 1)) if t < T - 1 else t - 1] = True
        if t == T - 1:
            bad[t, t] = False  # no later token to point at: clear the diagonal instead
    else:
        bad[t, t] = False
    q, kv = np.zeros((T, 2, 8), np.float32), np.zeros((1, n_past + T, 8), np.float32)
    with pytest.raises(ValueError, match="diagonal|lower-triangular"):
        _core.attention(q, kv, kv, n_past, bad)
    with pytest.raises(ValueError, match="n_past"):
        _core.attention(q, kv, kv, n_past + 1, anc)
    with pytest.raises(ValueError, match="threads"):
        _core.attention(q, kv, kv, n_past, anc, threads=10**6)


# ------------------------------------------------------------------ the target engine

CFG = tiny_config(gqa=2, tied=False, layers=2, vocab=53, heads=4, head_dim=8, ffn=64)
CONTEXT, MAX_BATCH = 40, 16


@pytest.fixture(scope="module")
def models():
    """dtype -> (source, reference model) over the same random weights."""
    w = random_weights(CFG, seed=21)
    out = {}
    for dtype in ("f32", "q8_0", "q4_1"):
        src = make_source(CFG, w, dtype, embd_dtype="q8_0" if dtype != "f32" else None)
        out[dtype] = (src, reference.LlamaReference.from_source(src))
    return out


@budget(60)
@given(dtype=st.sampled_from(["f32", "q8_0", "q4_1"]), prefix=st.integers(0, 10), T=st.integers(1, MAX_BATCH),
       kv_dtype=st.sampled_from(["f32", "bf16"]), data=st.data(), seed=st.integers(0, 2**16))
def test_engine_tree_call_matches_reference(models, dtype, prefix, T, kv_dtype, data, seed):
    """A committed prefix, then one call over T tokens at any positions with any ancestor
    set: every logit row equals the reference model's."""
    src, model = models[dtype]
    rng = np.random.default_rng(seed)
    anc = data.draw(ancestor_set(T))
    ids = rng.integers(0, CFG.vocab_size, prefix + T)
    pos = rng.integers(0, CONTEXT, T)
    eng = TargetEngine(src, context=CONTEXT, max_batch=MAX_BATCH, threads=data.draw(st.integers(1, 2)),
                       kv_dtype=kv_dtype)
    cache = model.new_cache(CONTEXT)
    with torch.no_grad():
        if prefix:
            eng.forward(ids[:prefix])
            eng.commit()
            model(torch.from_numpy(ids[:prefix]), None, None, cache)
            cache.commit()
        logits, feats = eng.forward(ids[prefix:], pos, anc, logit_rows=range(T), feature_rows=range(T))
        want_l, want_f = model(torch.from_numpy(ids[prefix:]), torch.from_numpy(pos), torch.from_numpy(anc), cache)
    tol = 3e-4 if dtype == "f32" else 4e-2
    if kv_dtype == "bf16":
        tol = max(tol, 2e-2)
    np.testing.assert_allclose(logits, want_l.numpy(), rtol=0, atol=tol * np.abs(want_l.numpy()).max())
    np.testing.assert_allclose(feats, want_f.numpy(), rtol=0, atol=tol * np.abs(want_f.numpy()).max())


@st.composite
def engine_call(draw):
    """Arguments of one forward, often invalid in one way (token id, position, batch size,
    ancestor matrix, output row)."""
    T = draw(st.integers(0, MAX_BATCH + 2))
    tokens = draw(st.lists(st.integers(-3, CFG.vocab_size + 3), min_size=T, max_size=T))
    positions = draw(st.lists(st.integers(-2, CONTEXT + 2), min_size=T, max_size=T))
    anc = None
    if T and draw(st.booleans()):
        anc = draw(ancestor_set(T))
        if draw(st.booleans()):
            anc = anc.copy()
            anc[draw(st.integers(0, T - 1)), draw(st.integers(0, T - 1))] ^= True
    rows = draw(st.lists(st.integers(-2, T + 1), max_size=4))
    return tokens, positions, anc, rows


@budget(150)
@given(dtype=st.sampled_from(["f32", "q4_1"]), prefix=st.integers(0, CONTEXT - 1), call=engine_call())
def test_engine_bad_calls_raise_and_change_nothing(models, dtype, prefix, call):
    src, _ = models[dtype]
    tokens, positions, anc, rows = call
    eng = TargetEngine(src, context=CONTEXT, max_batch=MAX_BATCH, threads=1)
    prompt = np.arange(prefix) % CFG.vocab_size
    for s in range(0, prefix, MAX_BATCH):
        eng.forward(prompt[s:s + MAX_BATCH])
        eng.commit()
    T = len(tokens)
    valid = (1 <= T <= MAX_BATCH and prefix + T <= CONTEXT and all(0 <= t < CFG.vocab_size for t in tokens)
             and all(0 <= p < CONTEXT for p in positions) and all(0 <= r < T for r in rows)
             and (anc is None or (np.array_equal(anc, np.tril(anc)) and anc.diagonal().all())))
    try:
        logits, _ = eng.forward(tokens, positions, anc, logit_rows=rows)
    except (ValueError, IndexError) as e:
        assert not valid, f"a valid call was refused: {e}"
        assert str(e)
    else:
        assert valid, "an invalid call was accepted"
        assert logits.shape == (len(rows), CFG.vocab_size) and np.isfinite(logits).all()
        return
    # Refused: nothing committed or pending changed, and the engine still answers as a
    # fresh one with the same prefix does.
    assert eng.n_past == prefix and eng._engine.pending == 0
    if prefix < CONTEXT:
        fresh = TargetEngine(src, context=CONTEXT, max_batch=MAX_BATCH, threads=1)
        for s in range(0, prefix, MAX_BATCH):
            fresh.forward(prompt[s:s + MAX_BATCH])
            fresh.commit()
        np.testing.assert_array_equal(eng.forward([5])[0], fresh.forward([5])[0])


@budget(80)
@given(T=st.integers(1, 8), kept=st.lists(st.integers(-2, 10), max_size=10), truncate=st.integers(-2, 12))
def test_engine_commit_and_truncate_any_rows(models, T, kept, truncate):
    src, _ = models["f32"]
    eng = TargetEngine(src, context=CONTEXT, max_batch=MAX_BATCH, threads=1)
    eng.forward(np.arange(4))
    eng.commit()
    eng.forward(np.arange(T) + 7)
    ok = all(0 <= r < T for r in kept) and all(a < b for a, b in zip(kept, kept[1:]))
    try:
        eng.commit(kept)
    except ValueError:
        assert not ok
        assert eng.n_past == 4
        eng.commit()  # the rows are still pending
        assert eng.n_past == 4 + T
    else:
        assert ok and eng.n_past == 4 + len(kept)
    n = eng.n_past
    try:
        eng.truncate(truncate)
    except ValueError:
        assert not 0 <= truncate <= n and eng.n_past == n
    else:
        assert 0 <= truncate <= n and eng.n_past == truncate
