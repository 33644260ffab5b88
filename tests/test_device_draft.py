"""The device draft engine (model/device_draft.h): the CUDA draft's orchestration, run here on
its host backend (``Draft(device="emulated")``: the same buffers, transfer layout, KV slots,
ancestor bitsets, commit compaction and top-k selection with scalar kernels over the same
per-element math as the CUDA kernels), and on a GPU when there is one (tests marked cuda).

What the host backend cannot show (the CUDA kernels' parallel reductions, cuBLAS, graphs,
streams) is covered by the cuda tests and by bench/run_gpu_suite.sh on a machine with a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from dovetail_ext import _core
from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.lookup import LookupParams, NgramLookup
from dovetail_ext.sampling import SamplingParams, TokenChooser
from dovetail_ext.speculative import SpecTimes, speculative_step
from dovetail_ext.tree import TreeParams
from test_speculative import SHAPES, plain_greedy, start_state, tiny_target

HAVE_GPU = _core.cuda_compiled() and _core.cuda_device_count() > 0
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU and a build with CUDA "
                               f"(CUDA compiled: {_core.cuda_compiled()}, devices: {_core.cuda_device_count()})")


@pytest.fixture(scope="module")
def tiny():
    return tiny_target()


def module_for(src, seed=0, std=0.05, layers=2):
    return DovetailDraft.random(DraftConfig.for_target(src, num_layers=layers), seed=seed, std=std)


def bf16(x):
    """Round fp32 to bf16 (nearest even) and back, as the device engine stores activations."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


def inputs(src, T, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, src.config.hidden_size)).astype(np.float32),
            rng.integers(0, src.config.vocab_size, T), np.arange(T))


def test_emulated_engine_matches_the_cpu_draft(tiny):
    """Same model, bf16 weights and activations on the device engine vs fp32 on the CPU engine."""
    src, target = tiny
    for layers in (1, 3):
        module = module_for(src, layers=layers)
        cpu, emu = Draft.from_module(module, target, weights_dtype="f32"), Draft.from_module(module, target, device="emulated")
        f, toks, pos = inputs(src, 9)
        h1, i1, l1 = cpu.forward(f, toks, pos, topk_rows=range(9), k=5)
        h2, i2, l2 = emu.forward(f, toks, pos, topk_rows=range(9), k=5)
        assert np.abs(h1 - h2).max() <= 2e-2 * np.abs(h1).max(), layers
        np.testing.assert_allclose(l2, l1, atol=0.15)
        clear = (l1[:, 0] - l1[:, 1]) > 0.15  # rows without a near tie for the first place
        assert clear.sum() >= 3
        np.testing.assert_array_equal(i2[clear, 0], i1[clear, 0])


def test_head_and_topk_over_the_reduced_vocabulary():
    """ids / log-probs are exactly the top-k of the bf16 head over the vocab_map rows applied
    to the engine's own (bf16-rounded) hidden rows, as target ids, best first."""
    src, target = tiny_target(dtype="f32")
    module = module_for(src, std=0.2)
    rng = np.random.default_rng(3)
    vmap = np.sort(rng.choice(src.config.vocab_size, 97, replace=False))
    weights = {k: v.detach().float().numpy() for k, v in module.state_weights().items() if k != "vocab_map"}
    emu = Draft(module.config, {**weights, "vocab_map": vmap}, target, device="emulated")
    f, toks, pos = inputs(src, 6, seed=1)
    hidden, ids, logp = emu.forward(f, toks, pos, topk_rows=[5, 0, 3], k=7)
    head = bf16(src.weights["token_embd"].data.astype(np.float32))[vmap].astype(np.float64)
    logits = bf16(hidden[[5, 0, 3]]).astype(np.float64) @ head.T
    lse = logits.max(1, keepdims=True) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    order = np.argsort(-logits, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, vmap[order])
    np.testing.assert_allclose(logp, np.take_along_axis(logits - lse, order, 1), atol=2e-4)
    assert np.all(np.diff(logp, axis=1) <= 0)


def test_source_rows_equal_host_features(tiny):
    """Features taken from the previous call's output on the device give bitwise the same
    result as the same rows sent from the host."""
    src, target = tiny
    module = module_for(src)
    a, b = (Draft.from_module(module, target, device="emulated") for _ in range(2))
    f, toks, pos = inputs(src, 4)
    ha, _, _ = a.forward(f, toks, pos, topk_rows=[3], k=3)
    hb, _, _ = b.forward(f, toks, pos, topk_rows=[3], k=3)
    a.commit(); b.commit()
    src_rows = np.array([3, 1, 3])
    anc = np.eye(3, dtype=bool)
    _, ia, la = a._forward_rows(src_rows, None, [7, 8, 9], [4, 4, 4], anc, False, np.arange(3), 4)
    hb2, ib, lb = b.forward(hb[src_rows], [7, 8, 9], [4, 4, 4], anc, topk_rows=np.arange(3), k=4)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)
    # ... and the device-side call moved no features in and no hidden state out.
    st = a.stats
    lay = _core.DeviceDraftEngine.transfer_layout(3, 0, src.config.hidden_size, 3, 4, False, False)
    assert st["last_h2d_bytes"] == lay["in_bytes"] < 3 * src.config.hidden_size * 4
    assert st["last_d2h_bytes"] == lay["out_bytes"] == 2 * 64  # ids and log-probs, 64-byte aligned


def test_transfer_layout():
    lay = _core.DeviceDraftEngine.transfer_layout(5, 70, 64, 2, 3, True, True)
    assert lay["feat"] == 64 and lay["tokens"] == 64 + 5 * 64 * 4
    assert lay["bits"] - lay["positions"] == 64 and lay["rows"] - lay["bits"] == 128  # 5 tokens x 2 words
    assert lay["in_bytes"] == lay["rows"] + 64 and lay["out_bytes"] == 64 + 64 + 5 * 64 * 4
    offsets = sorted(v for k, v in lay.items() if not k.endswith("bytes"))
    assert all(o % 64 == 0 for o in offsets)


def test_commit_compacts_the_cache_like_a_direct_path(tiny):
    """A tree, then commit of a root-to-leaf path, leaves bitwise the KV that running that
    path alone and committing it leaves."""
    src, target = tiny
    module = module_for(src)
    tree, direct = (Draft.from_module(module, target, device="emulated") for _ in range(2))
    f, toks, pos = inputs(src, 3, seed=2)
    for d in (tree, direct):
        d.forward(f, toks, pos, topk_rows=[2], k=2)
        d.commit()
    # tree over scratch rows: 0 -> {1, 2}, 2 -> {3}, 1 -> {4}; the path 0, 2, 3
    parents = [-1, 0, 0, 2, 1]
    anc = np.zeros((5, 5), dtype=bool)
    for i, p in enumerate(parents):
        anc[i] = anc[p] if p >= 0 else False
        anc[i, i] = True
    depth = [0, 1, 1, 2, 2]
    tf, ttok, _ = inputs(src, 5, seed=3)
    tree.forward(tf, ttok, 3 + np.array(depth), anc)
    tree.commit([0, 2, 3])
    path = [0, 2, 3]
    direct.forward(tf[path], ttok[path], 3 + np.array([0, 1, 2]))
    direct.commit()
    assert tree.n_past == direct.n_past == 6
    for layer in range(2):
        ka, va = tree._engine.read_kv(layer, 6)
        kb, vb = direct._engine.read_kv(layer, 6)
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(va, vb)


def _lookup_greedy(target, draft, params, prompt, truth, lookup):
    """Speculative steps to len(truth) tokens; with ``lookup``, every other step verifies a
    prompt-lookup chain where the context repeats (its pairs reach the device draft at the
    next drafting step)."""
    state = start_state(target, draft, prompt, truth[0])
    out, times = [truth[0]], SpecTimes()
    look = NgramLookup(list(prompt) + out, LookupParams(1, 3, 5)) if lookup else None
    while len(out) < len(truth):
        chain = look.propose() if look is not None and len(times.history) % 2 == 0 else None
        emitted, _ = speculative_step(state, target, draft, params, SamplingParams(),
                                      TokenChooser(SamplingParams()), times, chain=chain)
        if look is not None:
            look.extend(emitted)
        out += emitted
    assert out[:len(truth)] == truth, (params, lookup)
    assert (times.lookup_steps > 0) == lookup
    return times


@pytest.mark.parametrize("lookup", [False, True], ids=["tree", "lookup"])
@pytest.mark.parametrize("native", [True, False], ids=["native-step", "python-step"])
@pytest.mark.parametrize("params", SHAPES, ids=str)
def test_greedy_with_emulated_device_draft_equals_plain(tiny, params, native, lookup):
    src, target = tiny
    draft = Draft.from_module(module_for(src, std=0.2, layers=1), target, device="emulated")
    draft.native_greedy = native
    prompt = [5, 17, 42, 99, 3]
    truth = plain_greedy(target, prompt, 40)
    times = _lookup_greedy(target, draft, params, prompt, truth, lookup)
    st = draft.stats
    assert st["calls"] >= times.steps - times.lookup_steps > 0 and st["d2h_bytes"] > 0


def test_same_trees_as_the_cpu_draft_for_a_confident_draft(tiny):
    """With clear preferences (no near ties) the device engine proposes the CPU engine's trees."""
    src, target = tiny
    module = module_for(src, std=0.2, layers=1)
    cpu, emu = Draft.from_module(module, target, weights_dtype="f32"), Draft.from_module(module, target, device="emulated")
    f, toks, _ = inputs(src, 4, seed=5)
    same = 0
    for params in (TreeParams(1, 4, 5), TreeParams(3, 3, 8)):
        for d in (cpu, emu):
            d.truncate(0)
        t_cpu, t_emu = cpu.propose(f, toks, params), emu.propose(f, toks, params)
        same += np.array_equal(t_cpu.tokens, t_emu.tokens) and np.array_equal(t_cpu.parents, t_emu.parents)
    assert same >= 1


def test_native_steps_grow_the_python_trees_on_the_device_engine(tiny):
    """GreedySpeculator over the device engine (its host backend) grows Draft.propose's
    trees on the same engine: the source rows it names hold the right history rows."""
    from dovetail_ext import _core
    src, target = tiny
    emu = Draft.from_module(module_for(src, std=0.5, layers=1), target, device="emulated")
    spec = _core.GreedySpeculator(target._engine, emu._engine)
    for seed, params in enumerate([TreeParams(1, 4, 5), TreeParams(3, 3, 8), TreeParams(4, 4, 12, 0.01),
                                   TreeParams(2, 1, 2)]):
        f, toks, _ = inputs(src, 4, seed=seed)
        emu.truncate(0)
        tree = emu.propose(f, toks, params)
        emu.truncate(0)
        tokens, parents = spec.propose(f, toks, params.top_k, params.depth, params.total_tokens, params.min_score)
        np.testing.assert_array_equal(tokens, tree.tokens)
        np.testing.assert_array_equal(parents, tree.parents)


def test_bad_calls_raise_and_leave_the_engine_unchanged(tiny):
    src, target = tiny
    emu = Draft.from_module(module_for(src), target, device="emulated")
    eng, D = emu._engine, src.config.hidden_size
    with pytest.raises(ValueError, match="no previous draft output"):
        eng.forward(None, [0], [1], [0])
    f, toks, pos = inputs(src, 3)
    emu.forward(f, toks, pos, topk_rows=[2], k=2)
    before = (eng.n_past, eng.pending, eng.stats["calls"])
    cases = [
        (lambda: eng.forward(None, [3], [1], [3]), r"source row 3 .* outside the output history \[0, 3\)"),
        (lambda: eng.forward(None, [-1], [1], [3]), "source row -1"),
        (lambda: eng.forward(f[:1], [0], [1], [3]), "either features or src_rows"),
        (lambda: eng.forward(None, None, [1], [3]), "either features or src_rows"),
        (lambda: eng.forward(None, [0, 1], [1], [3]), "src_rows has 2 entries"),
        (lambda: eng.forward(f[:1], None, [10**6], [3]), "outside the vocabulary"),
        (lambda: eng.forward(f[:1], None, [1], [3], topk_rows=[0], k=0), "top-k must be in"),
        (lambda: eng.forward(f[:1], None, [1], [3], topk_rows=[0], k=10**4), "top-k must be in"),
        (lambda: eng.forward(f[:1] * np.nan, None, [1], [3]), "finite"),
        (lambda: eng.forward(np.zeros((1, D + 1), np.float32), None, [1], [3]), "features"),
        (lambda: eng.forward(f[:1], None, [1], [10**7]), "outside the context"),
        (lambda: eng.commit([5]), "outside the pending rows"),
        (lambda: eng.commit([1, 0]), "strictly increasing"),
        (lambda: eng.truncate(-1), "truncate"),
        (lambda: eng.read_kv(7, 1), "layer 7"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()
        assert (eng.n_past, eng.pending, eng.stats["calls"]) == before


def test_device_argument_errors(tiny):
    src, target = tiny
    module = module_for(src)
    for bad in ("tpu", "cuda:x", "CUDA"):
        with pytest.raises(ValueError, match="device"):
            Draft.from_module(module, target, device=bad)
    if not HAVE_GPU:
        with pytest.raises(ValueError, match="CUDA"):
            Draft.from_module(module, target, device="cuda")


# -- on a GPU ------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_gpu
def test_cuda_engine_matches_the_emulated_engine(tiny):
    src, target = tiny
    module = module_for(src, std=0.2)
    emu, gpu = (Draft.from_module(module, target, device=d) for d in ("emulated", "cuda"))
    f, toks, pos = inputs(src, 9)
    h1, i1, l1 = emu.forward(f, toks, pos, topk_rows=range(9), k=5)
    h2, i2, l2 = gpu.forward(f, toks, pos, topk_rows=range(9), k=5)
    assert np.abs(h1 - h2).max() <= 1e-2 * np.abs(h1).max()
    np.testing.assert_allclose(l2, l1, atol=0.05)
    clear = (l1[:, 0] - l1[:, 1]) > 0.05
    np.testing.assert_array_equal(i2[clear, 0], i1[clear, 0])
    assert gpu._engine.backend == "cuda" and gpu._engine.device_name


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_with_cuda_draft_equals_plain(tiny, graphs):
    src, target = tiny
    draft = Draft.from_module(module_for(src, std=0.2, layers=1), target, device="cuda", graphs=graphs)
    prompt, n = [5, 17, 42, 99, 3], 60
    truth = plain_greedy(target, prompt, n)
    for params, native, lookup in [(p, native, lk) for p in SHAPES for native in (True, False)
                                   for lk in (False, True)]:
        draft.native_greedy = native
        _lookup_greedy(target, draft, params, prompt, truth, lookup)
    assert (draft.stats["replays"] > 0) == graphs


@pytest.mark.cuda
@needs_gpu
def test_cuda_graph_replay_equals_direct_launches(tiny):
    src, target = tiny
    module = module_for(src, std=0.2)
    a, b = (Draft.from_module(module, target, device="cuda", graphs=g) for g in (True, False))
    f, toks, _ = inputs(src, 4)
    for _ in range(3):  # the first call of a shape records, the next ones replay
        ta, tb = a.propose(f, toks, TreeParams(4, 3, 8)), b.propose(f, toks, TreeParams(4, 3, 8))
        np.testing.assert_array_equal(ta.tokens, tb.tokens)
        np.testing.assert_array_equal(ta.parents, tb.parents)
        a.truncate(0); b.truncate(0)
    assert a.stats["replays"] > 0 and b.stats["replays"] == 0


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("env", [{"DOVETAIL_CUDA_WAIT": "block"}, {"DOVETAIL_CUBLAS_WORKSPACE_MB": "0"}])
def test_cuda_wait_and_workspace_settings_keep_outputs(tiny, monkeypatch, env):
    src, target = tiny
    module = module_for(src, std=0.2)
    f, toks, pos = inputs(src, 5)
    ref = Draft.from_module(module, target, device="cuda").forward(f, toks, pos, topk_rows=range(5), k=3)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = Draft.from_module(module, target, device="cuda").forward(f, toks, pos, topk_rows=range(5), k=3)
    np.testing.assert_allclose(out[0], ref[0], rtol=0, atol=2e-2 * np.abs(ref[0]).max())
    np.testing.assert_allclose(out[2], ref[2], atol=0.05)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name,value", [("DOVETAIL_CUDA_WAIT", "spin"), ("DOVETAIL_CUBLAS_WORKSPACE_MB", "lots"),
                                        ("DOVETAIL_CUBLAS_WORKSPACE_MB", "-1")])
def test_cuda_settings_refuse_bad_values(tiny, monkeypatch, name, value):
    src, target = tiny
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Draft.from_module(module_for(src), target, device="cuda")
