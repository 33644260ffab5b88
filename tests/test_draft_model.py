"""The Dovetail draft (draft_model.py) and the append mode of the reference KV cache.

Oracles: the DGF gate and a single-token forward written out in float64 numpy; the draft's
own inference path run as a chain, as one causal batch, and as forward_train (three
different attention codes: cache + reference.attention per token, the same over a batch,
torch's SDPA); tree nodes grown by appending calls against their root-to-node paths run
causally on a fresh cache. Checkpoints: round trips, and every way a file can be wrong.

Tolerances: the inference path does float64 matmuls rounded to fp32 and fp32 attention,
forward_train fp32 matmuls and SDPA; for a 2-layer draft with outputs of order 1 two such
correct programs agree to a few ulp per op (about 1e-6 relative), so ATOL = 2e-5 * scale
passes every correct variant while a wrong mask, position, head mapping or missing norm
moves outputs by 1e-2 .. 1 of their scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dovetail_ext import reference as ref
from dovetail_ext.draft_model import (CONFIG_FILE, WEIGHTS_FILE, DovetailDraft, DraftConfig,
                                      TargetSignature, check_vocab_map, expected_draft_shapes,
                                      load_draft, load_draft_weights)
from dovetail_ext.errors import DraftMismatchError, FormatError
from dovetail_ext.quant import dequantize
from native_helpers import make_source, random_weights, tiny_config, tree_ancestors

REL = 2e-5  # see the module docstring


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def target():
    """A tiny tied target: D 96 = 6 heads x 16, 2 KV heads (GQA 3), V 301, F 160."""
    cfg = tiny_config(layers=1)
    return make_source(cfg, random_weights(cfg, seed=0))


@pytest.fixture(scope="module")
def embed(target):
    return torch.from_numpy(dequantize(target.weights["token_embd"]))


def make_draft(target, layers: int = 2, ffn: int | None = 64, seed: int = 0) -> DovetailDraft:
    """A random draft whose norms are not all ones and whose attention is peaked.

    std 0.1 (not the 0.02 of a training init) gives attention scores of order 1, so a wrong
    mask, position or head mapping shows; norms around 1 +- 0.2 make a skipped or misplaced
    norm show.
    """
    cfg = DraftConfig.for_target(target, num_layers=layers, intermediate_size=ffn)
    w = DovetailDraft.random(cfg, seed=seed, std=0.1).state_weights()
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in w.items():
        if t.dim() == 1:
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    return DovetailDraft(cfg, w)


def inputs(n: int, D: int = 96, V: int = 301, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """features [n, D] of RMS about 2 (target features are not unit scale), tokens [n]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 2, torch.randint(0, V, (n,), generator=g)


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=rel * scale)


# ----------------------------------------------------------------------------------------
# Shapes, gate math, layer 0


def test_shapes_and_parameter_count(target):
    cfg = DraftConfig.for_target(target, num_layers=3, intermediate_size=64)
    D, QD, KVD, F, L = 96, 96, 32, 64, 3
    shapes = expected_draft_shapes(cfg)
    assert shapes["fuse.e_norm"] == (D,) and shapes["fuse.w1"] == (D, D)
    assert shapes["fuse.w2"] == (D, D) and shapes["fuse.wz"] == (D, 2 * D)
    assert shapes["blk.2.attn_q"] == (QD, D) and shapes["blk.2.attn_k"] == (KVD, D)
    assert shapes["blk.2.attn_v"] == (KVD, D) and shapes["blk.2.attn_output"] == (D, QD)
    assert shapes["blk.1.ffn_gate"] == (F, D) and shapes["blk.1.ffn_up"] == (F, D)
    assert shapes["blk.1.ffn_down"] == (D, F) and shapes["blk.1.attn_norm"] == (D,)
    assert "blk.0.attn_norm" not in shapes and "blk.0.ffn_norm" in shapes
    assert not {"token_embd", "output", "output_norm"} & set(shapes)

    draft = DovetailDraft.random(cfg, seed=3)
    state = draft.state_weights()
    assert list(state) == list(shapes)  # parameter names are the canonical names, in order
    assert {n: tuple(t.shape) for n, t in state.items()} == shapes
    per_layer = 2 * QD * D + 2 * KVD * D + 3 * F * D + D  # attention, FFN, ffn_norm
    want = D + 4 * D * D + L * per_layer + (L - 1) * D    # fuse; layers; attn_norm of 1..L-1
    assert sum(p.numel() for p in draft.parameters()) == want
    assert all(p.requires_grad and p.dtype == torch.float32 for p in draft.parameters())
    # seeded init: norms 1, matrices N(0, std^2), reproducible
    assert torch.equal(state["blk.1.attn_norm"], torch.ones(D))
    assert abs(float(state["fuse.w1"].std()) - 0.02) < 2e-3
    again = DovetailDraft.random(cfg, seed=3).state_weights()
    assert all(torch.equal(state[n], again[n]) for n in state)
    assert not torch.equal(DovetailDraft.random(cfg, seed=4).state_weights()["fuse.w1"], state["fuse.w1"])


def test_dgf_gate_matches_numpy(target, embed):
    draft = make_draft(target)
    w = {n: t.double().numpy() for n, t in draft.state_weights().items()}
    f, tok = inputs(7)
    x = embed[tok].double().numpy()
    e = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w["fuse.e_norm"]
    h1 = f.double().numpy() @ w["fuse.w1"].T
    a = e @ w["fuse.w2"].T
    h2 = a / (1 + np.exp(-a))
    z = 1 / (1 + np.exp(-(np.concatenate([h1, h2], axis=1) @ w["fuse.wz"].T)))
    g = z * h1 + (1 - z) * h2
    assert_close(draft.fuse(f, embed[tok]), torch.from_numpy(g))


def test_single_token_forward_by_hand_layer0_has_no_input_norm(target, embed):
    """One token on an empty cache: attention returns its own V, so the 1-layer draft is
    ``h = g + Wo expand(Wv g); out = h + FFN(rmsnorm(h))`` with g un-normalized."""
    draft = make_draft(target, layers=1)
    w = {n: t.double().numpy() for n, t in draft.state_weights().items()}
    f, tok = inputs(1)
    g = draft.fuse(f, embed[tok]).detach().double().numpy()[0]
    assert abs(np.sqrt((g ** 2).mean()) - 1) > 0.3  # a norm on g would change the result
    v = (w["blk.0.attn_v"] @ g).reshape(2, 16)
    o = np.repeat(v, 3, axis=0).reshape(96)  # query head h reads KV head h // 3
    h = g + w["blk.0.attn_output"] @ o
    hn = h / np.sqrt((h ** 2).mean() + 1e-5) * w["blk.0.ffn_norm"]
    gate, up = w["blk.0.ffn_gate"] @ hn, w["blk.0.ffn_up"] @ hn
    want = h + w["blk.0.ffn_down"] @ (gate / (1 + np.exp(-gate)) * up)

    got = draft(f, tok, torch.tensor([0]), None, draft.new_cache(4), embed)
    assert_close(got[0], torch.from_numpy(want))
    assert_close(draft.forward_train(f[None], tok[None], embed)[0, 0], torch.from_numpy(want))

    weights = dict(draft.state_weights())
    with pytest.raises(ValueError, match=r"unexpected weights \['blk.0.attn_norm'\]"):
        DovetailDraft(draft.config, {**weights, "blk.0.attn_norm": torch.ones(96)})


def test_later_layers_do_use_their_input_norm(target, embed):
    draft = make_draft(target, layers=2)
    f, tok = inputs(5)
    before = draft.forward_train(f[None], tok[None], embed)
    with torch.no_grad():
        draft.blk[1].attn_norm.mul_(1.5)
    after = draft.forward_train(f[None], tok[None], embed)
    assert float((after - before).abs().max()) > 1e-2 * float(before.abs().max())


# ----------------------------------------------------------------------------------------
# Inference path vs training path


def test_chain_equals_batch_equals_forward_train(target, embed):
    draft = make_draft(target, layers=2)
    N = 9
    f, tok = inputs(N)

    cache = draft.new_cache(16)
    batch = draft(f, tok, None, None, cache, embed)  # positions n_past + arange, causal
    assert cache.n_pending == N

    cache = draft.new_cache(16)
    chain = []
    for t in range(N):
        chain.append(draft(f[t:t + 1], tok[t:t + 1], torch.tensor([t]), None, cache, embed))
        cache.commit()
    chain = torch.cat(chain)
    assert cache.n_past == N

    f2, tok2 = inputs(N, seed=1)  # a second sequence in the batch must not leak into the first
    train = draft.forward_train(torch.stack([f, f2]), torch.stack([tok, tok2]), embed)
    assert train.shape == (2, N, 96)
    assert_close(batch, chain)
    assert_close(train[0], chain)
    assert_close(train[1], draft(f2, tok2, None, None, draft.new_cache(16), embed))
    # relative positions matter (RoPE), so the comparison above could fail; a common shift
    # of every position must not
    spread = draft(f, tok, torch.arange(N) * 2, None, draft.new_cache(16), embed)
    assert float((spread - batch)[1:].abs().max()) > 1e-3 * float(batch.abs().max())
    assert_close(draft(f, tok, torch.arange(N) + 3, None, draft.new_cache(16), embed), batch)


def test_forward_train_gradients_and_logits(target, embed):
    draft = make_draft(target, layers=2)
    f, tok = inputs(6)
    hidden = draft.forward_train(f[None], tok[None], embed)
    logits = draft.logits(hidden, embed)  # the tiny target ties its head to the embedding
    assert logits.shape == (1, 6, 301)
    assert_close(logits, hidden.double() @ embed.double().T)
    loss = torch.nn.functional.smooth_l1_loss(hidden, torch.zeros_like(hidden)) + logits.logsumexp(-1).mean()
    loss.backward()
    for name, p in draft.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert embed.grad is None  # the target's embedding is an input, not a parameter
    with pytest.raises(ValueError, match="LM head"):
        draft.logits(hidden, embed[:, :10])
    with pytest.raises(ValueError, match="embed must be the target's token embedding"):
        draft.forward_train(f[None], tok[None], embed[:100])
    with pytest.raises(ValueError, match="next_tokens must be long"):
        draft.forward_train(f[None], tok[None].int(), embed)

    bf16 = make_draft(target, layers=2).to(torch.bfloat16)
    out = bf16.forward_train(f[None], tok[None], embed)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), hidden.detach(), rel=5e-2)  # bf16 keeps ~3 significant digits


# ----------------------------------------------------------------------------------------
# Append mode: growing a tree over several calls on scratch


# Tree over a committed prefix: nodes 0, 1 hang off the prefix (depth 1); three calls add
# one level each. Node ids are the scratch rows they get.
PARENTS = np.array([-1, -1, 0, 0, 1, 2, 4, 3])
LEVELS = [[0, 1], [2, 3, 4], [5, 6, 7]]


def _path(node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(PARENTS[node])
    return path[::-1]


def test_append_mode_tree_expansion_matches_paths(target, embed):
    draft = make_draft(target, layers=2)
    P = 5
    fp, tp = inputs(P, seed=2)     # the committed prefix
    fn, tn = inputs(len(PARENTS), seed=3)  # one (feature, token) per tree node
    anc = torch.from_numpy(tree_ancestors(PARENTS))  # [8, 8] ancestor-or-self
    depth = torch.tensor([len(_path(i)) - 1 for i in range(len(PARENTS))])

    cache = draft.new_cache(32)
    draft(fp, tp, None, None, cache, embed)
    cache.commit()
    out = torch.zeros(len(PARENTS), 96)
    for level in LEVELS:
        rows = torch.tensor(level)
        end = level[-1] + 1  # ancestors over every pending row so far, this batch last
        out[rows] = draft(fn[rows], tn[rows], P + depth[rows], anc[rows, :end], cache, embed,
                          append=True)
        assert cache.n_pending == end and cache.n_past == P

    def run_path(path: list[int], extra: tuple | None = None) -> torch.Tensor:
        c = draft.new_cache(32)
        draft(fp, tp, None, None, c, embed)
        c.commit()
        f, t = fn[path], tn[path]
        if extra is not None:
            f, t = torch.cat([f, extra[0]]), torch.cat([t, extra[1]])
        return draft(f, t, P + torch.arange(len(t)), None, c, embed)[-1]

    for node in range(len(PARENTS)):
        assert_close(out[node], run_path(_path(node)))
    # siblings see different ancestors: the check above can tell them apart
    assert float((out[5] - out[7]).abs().max()) > 1e-2 * float(out.abs().max())

    # commit indexes every pending row: keep the path to node 6, then decode one more token
    cache.commit(_path(6))
    assert cache.n_past == P + 3 and cache.n_pending == 0
    fx, tx = inputs(1, seed=4)
    nxt = draft(fx, tx, torch.tensor([P + 3]), None, cache, embed)
    assert_close(nxt[0], run_path(_path(6), (fx, tx)))


def test_append_mode_errors_and_plain_call_drops_scratch(target, embed):
    draft = make_draft(target, layers=1)
    f, tok = inputs(3)
    cache = draft.new_cache(8)
    draft(f[:2], tok[:2], None, None, cache, embed)
    with pytest.raises(ValueError, match=r"ancestors must be \[1, 3\]"):
        draft(f[2:], tok[2:], torch.tensor([2]), ref.causal_ancestors(1), cache, embed, append=True)
    with pytest.raises(ValueError, match="needs explicit positions"):
        draft(f[2:], tok[2:], None, None, cache, embed, append=True)
    # ancestors None when appending: causal within the batch, no earlier scratch row seen
    alone = draft(f[2:], tok[2:], torch.tensor([0]), None, draft.new_cache(8), embed)
    appended = draft(f[2:], tok[2:], torch.tensor([0]), None, cache, embed, append=True)
    assert cache.n_pending == 3
    assert_close(appended, alone)
    draft(f[:1], tok[:1], None, None, cache, embed)  # a plain call replaces the scratch
    assert cache.n_pending == 1
    with pytest.raises(ValueError, match="exceed max_len"):
        draft(torch.cat([f] * 3), torch.cat([tok] * 3), None, None, cache, embed)


def test_reference_target_append_matches_one_tree_call(target):
    """LlamaReference.forward(append=True) over two calls = the whole tree in one call."""
    model = ref.LlamaReference.from_source(target)
    prompt = torch.tensor([5, 17, 42])
    tree = torch.tensor([7, 8, 9, 10, 11, 12, 13, 14])
    anc = torch.from_numpy(tree_ancestors(PARENTS))
    pos = 3 + torch.tensor([len(_path(i)) - 1 for i in range(len(PARENTS))])

    cache = model.new_cache(16)
    model(prompt, None, None, cache)
    cache.commit()
    whole, _ = model(tree, pos, anc, cache)

    cache = model.new_cache(16)
    model(prompt, None, None, cache)
    cache.commit()
    first, _ = model(tree[:4], pos[:4], anc[:4, :4], cache)
    second, _ = model(tree[4:], pos[4:], anc[4:], cache, append=True)
    assert_close(torch.cat([first, second]), whole)
    with pytest.raises(ValueError, match="keys, expected n_prefix"):
        ref.attention(torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), 1,
                      torch.ones(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------
# Checkpoints


def test_save_load_round_trip_f32_and_bf16(target, embed, tmp_path):
    draft = make_draft(target, layers=2)
    draft.card = {"data": "synthetic", "steps": 0}
    f, tok = inputs(4)
    want = draft.forward_train(f[None], tok[None], embed)

    draft.save(tmp_path / "f32", dtype="f32")
    doc = json.loads((tmp_path / "f32" / CONFIG_FILE).read_text())
    assert doc["format"] == "dovetail-draft" and doc["version"] == 1
    assert doc["target"] == draft.config.target.to_dict() and "target" not in doc["config"]
    assert doc["card"] == {"data": "synthetic", "steps": 0}
    loaded = load_draft(tmp_path / "f32", target=target)
    assert loaded.config == draft.config and loaded.card == draft.card
    state, got = draft.state_weights(), loaded.state_weights()
    assert list(got) == list(state) and all(torch.equal(got[n], state[n]) for n in state)
    assert torch.equal(loaded.forward_train(f[None], tok[None], embed), want)

    draft.save(tmp_path / "bf16", dtype="bf16", card={"note": "rounded"})
    cfg, arrays = load_draft_weights(tmp_path / "bf16")
    assert cfg == draft.config and list(arrays) == list(state)
    for name, t in state.items():
        rounded = t.to(torch.bfloat16).float()
        assert arrays[name].dtype == np.float32 and arrays[name].flags.writeable
        np.testing.assert_array_equal(arrays[name], rounded.numpy(), err_msg=name)
        assert ((rounded - t).abs() <= 2 ** -8 * t.abs()).all()  # bf16 unit roundoff 2^-8
    assert load_draft(tmp_path / "bf16").card == {"note": "rounded"}
    assert (tmp_path / "bf16" / WEIGHTS_FILE).stat().st_size < (tmp_path / "f32" / WEIGHTS_FILE).stat().st_size
    with pytest.raises(ValueError, match="dtype must be one of"):
        draft.save(tmp_path / "f16", dtype="f16")


@pytest.fixture
def checkpoint(target, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    draft = make_draft(target, layers=2)
    draft.save(tmp_path / "ckpt", dtype="f32")
    return tmp_path / "ckpt", {n: t.clone() for n, t in draft.state_weights().items()}


def _both_loaders_raise(directory: Path, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        load_draft_weights(directory)
    with pytest.raises(exc, match=match):
        load_draft(directory)


@pytest.mark.parametrize("change,match", [
    (lambda w: w.pop("blk.1.ffn_up"), r"missing tensor\(s\) blk\.1\.ffn_up"),
    (lambda w: w.update({"blk.0.attn_norm": torch.ones(96)}), r"unexpected tensor\(s\) blk\.0\.attn_norm"),
    (lambda w: w.update({"blk.2.attn_q": torch.ones(96, 96)}), r"unexpected tensor\(s\) blk\.2\.attn_q"),
    (lambda w: w.update({"fuse.wz": w["fuse.wz"].T.contiguous()}), r"tensor fuse\.wz has shape \[192, 96\], "
                                                                   r"expected \[96, 192\]"),
    (lambda w: w.update({"blk.1.attn_k": torch.ones(96, 96)}), r"tensor blk\.1\.attn_k has shape"),
], ids=["missing", "unexpected-norm", "unexpected-layer", "transposed", "wrong-kv-size"])
def test_strict_keys_and_shapes(checkpoint, change, match):
    directory, weights = checkpoint
    change(weights)
    save_file(weights, str(directory / WEIGHTS_FILE))
    _both_loaders_raise(directory, FormatError, match)


def test_bad_weight_files(checkpoint, target):
    directory, weights = checkpoint
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[:-100])
    _both_loaders_raise(directory, FormatError, "truncated")
    os.remove(directory / WEIGHTS_FILE)
    _both_loaders_raise(directory, FormatError, f"missing {WEIGHTS_FILE}")
    with pytest.raises(FileNotFoundError, match="no such draft directory"):
        load_draft(directory / "nope")
    # the constructor is as strict as the loader, and names the key
    with pytest.raises(ValueError, match=r"missing weights \['fuse.w2'\]"):
        DovetailDraft(DraftConfig.for_target(target, num_layers=2, intermediate_size=64),
                      {n: t for n, t in weights.items() if n != "fuse.w2"})
    with pytest.raises(ValueError, match=r"weight blk\.0\.ffn_down has shape \(64, 96\)"):
        DovetailDraft(DraftConfig.for_target(target, num_layers=2, intermediate_size=64),
                      {**weights, "blk.0.ffn_down": weights["blk.0.ffn_down"].T})


def _edit_json(doc: dict, key: str, value) -> None:
    """Set ``a.b`` paths; the value ``...`` deletes the key."""
    *parents, last = key.split(".")
    for p in parents:
        doc = doc[p]
    if value is ...:
        del doc[last]
    else:
        doc[last] = value


@pytest.mark.parametrize("key,value,match", [
    ("format", "something-else", "format is 'something-else'"),
    ("version", 2, "version 2 is not supported"),
    ("config", ..., "'config' must be a JSON object"),
    ("target", [1, 2], "'target' must be a JSON object"),
    ("card", "free text", "'card' must be a JSON object"),
    ("config.num_heads", ..., r"missing keys \['num_heads'\]"),
    ("config.colour", "blue", r"unknown keys \['colour'\]"),
    ("config.num_heads", 0, "num_heads must be a positive integer"),
    ("config.num_kv_heads", 4, "not a multiple of num_kv_heads"),
    ("config.rope_theta", "big", "rope_theta must be a positive finite number"),
    ("config.hidden_size", 64, "hidden_size = 64 differs from the target's 96"),
    ("config.target", {}, "must not hold 'target'"),
    ("target.embedding_sha256", ..., r"missing keys \['embedding_sha256'\]"),
    ("target.embedding_sha256", "abc", "64 lowercase hex digits"),
])
def test_malformed_json(checkpoint, key, value, match):
    directory, _ = checkpoint
    doc = json.loads((directory / CONFIG_FILE).read_text())
    _edit_json(doc, key, value)
    (directory / CONFIG_FILE).write_text(json.dumps(doc))
    _both_loaders_raise(directory, FormatError, match)


@pytest.mark.parametrize("text,match", [(None, f"missing {CONFIG_FILE}"), ("{not json", "cannot read JSON"),
                                        ("[1, 2]", "expected a JSON object"), ("\udcff", "cannot read JSON")],
                         ids=["absent", "syntax", "array", "not-utf8"])
def test_unreadable_json(checkpoint, text, match):
    directory, _ = checkpoint
    path = directory / CONFIG_FILE
    if text is None:
        path.unlink()
    else:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    _both_loaders_raise(directory, FormatError, match)


def test_draft_for_another_target_is_refused(checkpoint, target):
    directory, _ = checkpoint
    cfg = target.config
    other = make_source(cfg, random_weights(cfg, seed=1))
    other.name = "other-model"
    with pytest.raises(DraftMismatchError, match=r"made for target 'tiny', not for 'other-model': "
                                                 r"embedding_sha256: '[0-9a-f]{64}' vs '[0-9a-f]{64}'$"):
        load_draft(directory, target=other)
    # the same values stored in another format are another target file: refused too
    same_bf16 = make_source(cfg, random_weights(cfg, seed=0), embd_dtype="bf16")
    with pytest.raises(DraftMismatchError, match="embedding_sha256"):
        load_draft(directory, target=same_bf16)
    bigger = tiny_config(layers=1, vocab=311)
    with pytest.raises(DraftMismatchError, match="vocab_size: 301 vs 311"):
        load_draft(directory, target=make_source(bigger, random_weights(bigger)))
    wider = dataclasses.replace(cfg, architecture="mistral")
    src = make_source(cfg, random_weights(cfg, seed=0))
    src.config = wider
    with pytest.raises(DraftMismatchError, match="architecture: 'llama' vs 'mistral'"):
        load_draft(directory, target=src)
    assert load_draft(directory, target=make_source(cfg, random_weights(cfg, seed=0))).config.num_layers == 2


def test_load_draft_weights_needs_no_torch(checkpoint):
    """The native engine's loader runs where torch is not installed."""
    directory, weights = checkpoint
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import numpy as np
from dovetail_ext.draft_model import DovetailDraft, load_draft_weights
cfg, arrays = load_draft_weights({str(directory)!r})
assert cfg.num_layers == 2 and all(a.dtype == np.float32 for a in arrays.values())
np.save({str(directory / 'w1.npy')!r}, arrays["fuse.w1"])
try:
    DovetailDraft(cfg)
except ImportError as e:
    assert "needs PyTorch" in str(e)
else:
    raise AssertionError("DovetailDraft built without torch")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(directory / "w1.npy"), weights["fuse.w1"].numpy())


# ----------------------------------------------------------------------------------------
# Configs


def test_config_round_trip_and_validation(target):
    cfg = DraftConfig.for_target(target, num_layers=3)
    assert cfg.intermediate_size == 160 and cfg.head_dim == 16 and cfg.num_kv_heads == 2
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DraftConfig.from_dict(d) == cfg
    lc = cfg.layer_config()
    assert (lc.num_layers, lc.hidden_size, lc.num_heads, lc.num_kv_heads, lc.head_dim,
            lc.intermediate_size, lc.rope_theta, lc.rms_norm_eps) == (3, 96, 6, 2, 16, 160, 1e4, 1e-5)

    sig = cfg.target
    assert sig == TargetSignature.from_source(make_source(target.config, random_weights(target.config)))
    assert dataclasses.replace(sig, name="renamed") == sig  # the name is not compared
    assert TargetSignature.from_dict(sig.to_dict()) == sig

    bad = [({"num_layers": 0}, "num_layers must be a positive integer"),
           ({"num_heads": True}, "num_heads must be a positive integer"),
           ({"head_dim": 15}, "head_dim must be even"),
           ({"num_kv_heads": 4}, "not a multiple of num_kv_heads 4"),
           ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive finite number"),
           ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number"),
           ({"vocab_size": 300}, "vocab_size = 300 differs from the target's 301"),
           ({"target": "tiny"}, "target must be a TargetSignature")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(cfg, **change)
    with pytest.raises(ValueError, match="no token_embd"):
        TargetSignature.from_source(dataclasses.replace(target, weights={}))


def test_signature_hash_remembered_only_while_the_embedding_cannot_change(target):
    """A read-only embedding (a memory map of the model file) is hashed once per weight;
    new data, or data that may be written in place, is hashed again."""
    import hashlib

    def plain_hash(w):
        h = hashlib.sha256(f"{w.dtype}:{list(w.shape)}:".encode())
        h.update(np.ascontiguousarray(w.data).view(np.uint8))
        return h.hexdigest()

    src = make_source(target.config, random_weights(target.config))
    w = src.weights["token_embd"]
    w.data = np.array(w.data)
    w.data.flags.writeable = False
    first = TargetSignature.from_source(src).embedding_sha256
    assert first == plain_hash(w) == TargetSignature.from_source(src).embedding_sha256
    changed = np.array(w.data)  # another array, one bit different
    changed.view(np.uint8).reshape(-1)[0] ^= 1
    changed.flags.writeable = False
    w.data = changed
    assert TargetSignature.from_source(src).embedding_sha256 == plain_hash(w) != first
    w.data = np.array(w.data)  # writeable: changed in place, hashed again
    TargetSignature.from_source(src)
    w.data.view(np.uint8).reshape(-1)[0] ^= 1
    assert TargetSignature.from_source(src).embedding_sha256 == plain_hash(w) == first


# ----------------------------------------------------------------------------------------
# Reduced draft vocabulary (vocab_map)


def _vocab_draft(target, size: int = 40, seed: int = 0) -> DovetailDraft:
    cfg = DraftConfig.for_target(target, num_layers=1, intermediate_size=64, draft_vocab_size=size)
    cfg = dataclasses.replace(cfg, eos_token_ids=(2,))  # the tiny config names no EOS
    w = DovetailDraft.random(cfg, seed=seed, std=0.1).state_weights()
    rng = np.random.default_rng(seed)
    w["vocab_map"] = torch.from_numpy(np.sort(np.union1d(rng.choice(np.arange(3, 301), size - 1, replace=False), [2])))
    return DovetailDraft(cfg, w)


def test_vocab_map_logits_and_round_trip(target, embed, tmp_path):
    draft = _vocab_draft(target)
    assert draft.config.eos_token_ids == (2,) and draft.vocab_map.dtype == torch.int64
    h = torch.randn(5, 96)
    full = h @ embed.T
    torch.testing.assert_close(draft.logits(h, embed), full[:, draft.vocab_map])  # column j: vocab_map[j]
    with pytest.raises(ValueError, match="head must be the target's LM head"):
        draft.logits(h, embed[draft.vocab_map])  # the caller passes the full head
    for dtype in ("f32", "bf16"):
        draft.save(tmp_path / dtype, dtype=dtype)
        cfg, arrays = load_draft_weights(tmp_path / dtype)
        assert cfg == draft.config and cfg.draft_vocab_size == 40 and list(arrays)[-1] == "vocab_map"
        assert arrays["vocab_map"].dtype == np.int64
        np.testing.assert_array_equal(arrays["vocab_map"], draft.vocab_map.numpy())
        loaded = load_draft(tmp_path / dtype, target=target)
        assert torch.equal(loaded.vocab_map, draft.vocab_map)
    assert expected_draft_shapes(draft.config)["vocab_map"] == (40,)
    # a full-vocabulary draft has no map, and its files have no such tensor
    assert "vocab_map" not in expected_draft_shapes(DraftConfig.for_target(target))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m[::-1].copy(), "strictly ascending"),
    (lambda m: np.concatenate([m[:-1], [301]]), r"outside \[0, 301\)"),
    (lambda m: np.concatenate([m[:-2], [m[-1], m[-1]]]), "strictly ascending"),
    (lambda m: np.sort(np.concatenate([[0], m[m != 2]])), r"lacks the EOS id\(s\) \[2\]"),
    (lambda m: m[:-1], r"vocab_map has shape \(39,\), expected \(40,\)"),
], ids=["unsorted", "out-of-range", "duplicate", "missing-eos", "wrong-length"])
def test_bad_vocab_maps_are_refused(target, tmp_path, edit, match):
    draft = _vocab_draft(target)
    good = draft.vocab_map.numpy()
    bad = torch.from_numpy(edit(good).astype(np.int64))
    with pytest.raises(ValueError, match=match):
        DovetailDraft(draft.config, {**draft.state_weights(), "vocab_map": bad})
    draft.save(tmp_path / "ckpt", dtype="f32")
    weights = {n: t.contiguous() for n, t in draft.state_weights().items()}
    weights["vocab_map"] = bad
    save_file(weights, str(tmp_path / "ckpt" / WEIGHTS_FILE))
    _both_loaders_raise(tmp_path / "ckpt", FormatError, match.replace(r"\(39,\), expected \(40,\)",
                                                                      r"\[39\], expected \[40\]"))


def test_vocab_map_dtype_and_config_compatibility(target, tmp_path):
    draft = _vocab_draft(target)
    draft.save(tmp_path / "ckpt", dtype="f32")
    weights = {n: t.contiguous() for n, t in draft.state_weights().items()}
    save_file({**weights, "vocab_map": weights["vocab_map"].float()}, str(tmp_path / "ckpt" / WEIGHTS_FILE))
    _both_loaders_raise(tmp_path / "ckpt", FormatError, "vocab_map must be I64")
    save_file({**weights, "fuse.w1": weights["fuse.w1"].long()}, str(tmp_path / "ckpt" / WEIGHTS_FILE))
    _both_loaders_raise(tmp_path / "ckpt", FormatError, "fuse.w1 has integer dtype")
    save_file({n: t for n, t in weights.items() if n != "vocab_map"}, str(tmp_path / "ckpt" / WEIGHTS_FILE))
    _both_loaders_raise(tmp_path / "ckpt", FormatError, r"missing tensor\(s\) vocab_map")
    # draft.json files written before draft_vocab_size / eos_token_ids existed still load
    old = make_draft(target, layers=1)
    old.save(tmp_path / "old", dtype="f32")
    doc = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    del doc["config"]["draft_vocab_size"], doc["config"]["eos_token_ids"]
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(doc))
    loaded = load_draft(tmp_path / "old")
    assert loaded.config.draft_vocab_size == 0 and loaded.config.eos_token_ids == () and loaded.vocab_map is None
    cfg = DraftConfig.for_target(target)
    for change, match in [({"draft_vocab_size": -1}, "draft_vocab_size must be an integer in"),
                          ({"draft_vocab_size": 302}, "draft_vocab_size must be an integer in"),
                          ({"eos_token_ids": (400,)}, "eos_token_ids must be token ids")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(cfg, **change)
    with pytest.raises(ValueError, match=r"unexpected weights \['vocab_map'\]"):
        DovetailDraft(cfg, {**DovetailDraft.random(cfg).state_weights(), "vocab_map": torch.arange(5)})
    with pytest.raises(ValueError, match="vocab_map given for a full-vocabulary draft"):
        check_vocab_map(cfg, np.arange(5))
