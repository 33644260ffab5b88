"""Draft training (dovetail_ext.train): data rendering, the feature cache, the trainer, CLI.

Most tests run on a tiny random GGUF target (hidden 64, byte-level vocabulary of 261 tokens,
a ChatML template) written by the conftest writer, so the whole pipeline (native engine
features, self-distillation, PyTorch training, export) runs in seconds. Oracles: the
engine's own forward for features and greedy replies; ``forward_train`` on an explicitly
built sequence for the rollout attention; a second, uninterrupted run for resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dovetail_ext.draft_model import load_draft, load_draft_weights
from dovetail_ext.formats import load_model_source
from dovetail_ext.target import TargetEngine
from dovetail_ext.train import train_draft
from dovetail_ext.train.data import (first_turn, iter_jsonl, iter_sharegpt, iter_sharegpt_with_ids, iter_text,
                                     load_conversations, parse_record, python_function_prompts, render)
from dovetail_ext.train.features import (FeatureCache, FeatureSettings, extract_features, from_bf16_bits,
                                         to_bf16_bits)
from dovetail_ext.train.trainer import Trainer, TrainConfig, choose_vocab_map, evaluate, rollout

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

CONVS = [
    [{"role": "user", "content": f"question {i}: what is {i} plus {i}?"},
     {"role": "assistant", "content": f"the answer is {2 * i}. " * (1 + i % 3)},
     {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "you are welcome"}]
    for i in range(14)
]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, llama_gguf_writer) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    llama_gguf_writer(path, dtype="f32", meta=lambda w: w.add_chat_template(CHATML), seed=3)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model_source(tiny_path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return path


def settings(**kw) -> FeatureSettings:
    base = dict(data="chats", max_len=96, shard_size=3, val_conversations=2)
    return FeatureSettings(**{**base, **kw})


# -- data ------------------------------------------------------------------------------------

def test_render_masks_only_assistant_tokens(tiny):
    tok = tiny.tokenizer
    toks, mask = render(tok, CONVS[4])
    assert toks.dtype == np.int32 and mask.dtype == np.uint8 and toks.shape == mask.shape
    # the whole render is the template's text
    assert tok.decode(toks.tolist()) == tok.apply_chat_template(CONVS[4], add_generation_prompt=False)
    # masked runs are exactly the assistant replies, each with its end token
    runs, cur = [], []
    for t, m in zip(toks.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r) for r in runs] == [m["content"] + "<|im_end|>" for m in CONVS[4]
                                             if m["role"] == "assistant"]
    short, smask = render(tok, CONVS[4], max_tokens=20)
    assert np.array_equal(short, toks[:20]) and np.array_equal(smask, mask[:20])
    gen, gmask = render(tok, CONVS[4][:1], add_generation_prompt=True)
    assert tok.decode(gen.tolist()).endswith("<|im_start|>assistant\n") and not gmask.any()


def test_render_default_model_chat_template(default_source):
    tok = default_source.tokenizer
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    toks, mask = render(tok, conv)
    assert tok.encode(tok.apply_chat_template(conv, add_generation_prompt=False)) == toks.tolist()
    assert tok.decode(toks[mask.astype(bool)].tolist()) == "Hello! How can I help?<|im_end|>"


def test_sharegpt_reader_takes_whole_items_of_a_truncated_file(tmp_path):
    items = [{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "only me"}]},  # no user turn: dropped
             {"id": "c", "conversations": [{"from": "gpt", "value": "part 2"}, {"from": "human", "value": "q"},
                                           {"from": "gpt", "value": "a"}]}]
    text = json.dumps(items, indent=1)
    path = tmp_path / "sg.json"
    path.write_text(text[:-40])  # cut inside the last item
    convs = list(iter_sharegpt(path))
    assert convs == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    path.write_text(text)
    convs = list(iter_sharegpt(path))
    assert len(convs) == 2 and first_turn(convs[1]) == [{"role": "user", "content": "q"}]
    assert list(iter_sharegpt_with_ids(path)) == list(zip(["a", "c"], convs))  # the item ids come along


def test_jsonl_and_text_sources(tmp_path, data_file):
    assert list(iter_jsonl(data_file)) == CONVS
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"weird": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: unknown record shape"):
        list(iter_jsonl(bad))
    txt = tmp_path / "t.txt"
    txt.write_text("para one\nline two\n\n\npara two\n")
    assert [c[0]["content"] for c in iter_text(txt)] == ["para one\nline two", "para two"]
    a, b = load_conversations(data_file, seed=1), load_conversations(data_file, seed=1)
    assert a == b and sorted(map(str, a)) == sorted(map(str, CONVS)) and a != CONVS
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "missing.jsonl")
    # OpenAI's content parts: the text parts are joined, the others left out
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "image_url"},
                                                       {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}
    assert parse_record(parts) == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    # Non-UTF-8 bytes name the file and line
    raw = tmp_path / "latin.jsonl"
    raw.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xe9"):
        list(iter_jsonl(raw))


def test_python_function_prompts(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    doc = '"""Return x doubled, for any integer x that the caller gives.\n\n    >>> C().method(2)\n    4\n    """\n'
    (pkg / "mod.py").write_text(
        "import functools\n\n"
        'def short():\n    """Too short."""\n\n'
        "class C:\n"
        "    @functools.cache\n"
        "    def method(self, x: int) -> int:\n"
        "        " + doc.replace("\n    ", "\n        ") +
        "        return 2 * x\n\n"
        "def undocumented(y):\n    return y\n")
    (pkg / "broken.py").write_text("def (:\n")
    (pkg / "tests" / "test_mod.py").write_text('def test_a():\n    """A test function whose docstring is long enough."""\n')
    convs = python_function_prompts(pkg, seed=3)
    assert len(convs) == 1  # too short a docstring, no docstring, a syntax error, tests/: skipped
    user, reply = convs[0]
    assert reply == {"role": "assistant", "content": ""} and user["role"] == "user"
    ask, body = user["content"].split("\n\n", 1)
    # dedented, decorators kept, the body left out
    assert body == "@functools.cache\ndef method(self, x: int) -> int:\n    " + doc
    assert first_turn(convs[0]) == [user]  # what self-distillation answers
    stdlib = load_conversations("python-functions", seed=5)
    assert len(stdlib) > 1000 and stdlib == python_function_prompts(seed=5) != python_function_prompts(seed=6)
    assert all("def " in c[0]["content"] for c in stdlib)
    assert load_conversations("python-functions", limit=7, seed=5) == stdlib[:7]
    with pytest.raises(ValueError, match="self_distill > 0"):
        train_draft(None, "python-functions", tmp_path / "d")
    with pytest.raises(ValueError, match="distill_fraction 1.0"):
        train_draft(None, "python-functions", tmp_path / "d", self_distill=64, distill_fraction=0.5)


# -- features --------------------------------------------------------------------------------

def test_bf16_bits_round_to_nearest_even():
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -9, 3.0e38, 1e-30], np.float32)
    y = from_bf16_bits(to_bf16_bits(x))
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(y, ref)


def test_feature_cache_round_trip_and_resume(tiny, tmp_path):
    out = tmp_path / "f"
    lines: list[str] = []
    m1 = extract_features(tiny, CONVS, out, settings(), max_tokens=150, log=lines.append)
    names1 = [s["name"] for s in m1["shards"]]
    assert names1[0] == "val_00000" and 1 <= len(names1) - 1 < 4  # stopped early by the budget
    stamp = {n: (out / f"{n}.npz").stat().st_mtime_ns for n in names1}
    m2 = extract_features(tiny, CONVS, out, settings(), log=lines.append)
    names2 = [s["name"] for s in m2["shards"]]
    assert names2[:len(names1)] == names1 and len(names2) == 1 + 4  # 2 val + 12 train in shards of 3
    assert all((out / f"{n}.npz").stat().st_mtime_ns == stamp[n] for n in names1)  # not recomputed
    assert len(lines) == len(names2)
    cache = FeatureCache(out)
    train = cache.load("train")
    assert cache.tokens("train") == len(train["tokens"]) == train["offsets"][-1]
    # the stored features are the engine's final-norm features, rounded to bf16
    conv = CONVS[2 + 1]  # the second training conversation (no shuffling here)
    toks, mask = render(tiny.tokenizer, conv, 96)
    eng = TargetEngine(tiny, context=128)
    _, feats = eng.forward(toks, logit_rows=[], feature_rows=np.arange(len(toks)))
    s, e = train["offsets"][1], train["offsets"][2]
    assert np.array_equal(train["tokens"][s:e], toks) and np.array_equal(train["mask"][s:e], mask)
    assert np.array_equal(train["features"][s:e], to_bf16_bits(feats))
    with pytest.raises(ValueError, match="other settings"):
        extract_features(tiny, CONVS, out, settings(max_len=64))


def test_self_distillation_is_the_engine_greedy_reply(tiny, tmp_path):
    cache_dir = tmp_path / "sd"
    extract_features(tiny, CONVS[:4], cache_dir, settings(self_distill=12, val_conversations=0, shard_size=4))
    d = FeatureCache(cache_dir).load("train")
    assert FeatureCache(cache_dir).manifest["shards"][0]["distilled"] == 4
    prompt, _ = render(tiny.tokenizer, first_turn(CONVS[0]), add_generation_prompt=True)
    eng = TargetEngine(tiny, context=128)
    logits, f_prompt = eng.forward(prompt, feature_rows=np.arange(len(prompt)))
    eng.commit()
    reply, feats = [], [f_prompt]
    for _ in range(12):  # a random target never says EOS in 12 tokens, here it runs to the cap
        reply.append(int(np.argmax(logits[-1])))
        logits, f = eng.forward([reply[-1]], feature_rows=[0])
        eng.commit()
        feats.append(f)
    s, e = d["offsets"][0], d["offsets"][1]
    assert d["tokens"][s:e].tolist() == prompt.tolist() + reply
    assert d["mask"][s:e].tolist() == [0] * len(prompt) + [1] * len(reply)
    assert np.array_equal(d["features"][s:e], to_bf16_bits(np.concatenate(feats)))


# -- trainer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory) -> FeatureCache:
    out = tmp_path_factory.mktemp("cache")
    extract_features(tiny, CONVS, out, settings(max_len=64))
    return FeatureCache(out)


def small_cfg(**kw) -> TrainConfig:
    base = dict(draft_vocab_size=64, epochs=2, batch_tokens=256, warmup_steps=2, lr=3e-3, max_len=64,
                amp=False, val_depth=4, init_std=0.05)
    return TrainConfig(**{**base, **kw})


def test_vocab_map_choice():
    toks = np.array([5, 5, 5, 7, 7, 9, 3, 3, 3, 3], np.int32)
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], np.uint8)  # 3 is frequent but never an assistant token
    vm = choose_vocab_map(toks, mask, 4, 20, (2,))
    assert vm.tolist() == [2, 5, 7, 9]
    assert choose_vocab_map(toks, mask, 5, 20, (2,)).tolist() == [2, 3, 5, 7, 9]  # then any seen token


def test_rollout_attention_matches_explicit_chains(tiny, cache):
    torch.manual_seed(0)
    tr = Trainer(tiny, cache, small_cfg(draft_vocab_size=0, init_std=0.2), "/nonexistent-unused")
    d = tr.train
    f, x, _ = d.collate(np.array([0]))
    inp, nxt = f[:, :-1], x[:, 1:]
    with torch.no_grad():
        outs = rollout(tr.draft, inp, nxt, tr.embed, 3)
        for j in (0, 4, 9):  # chains from start j: step s is row j + s - 1
            feats, toks = inp[:, :j + 1].clone(), nxt[:, :j + 1].clone()
            for s in range(1, 4):
                h = tr.draft.forward_train(feats, toks, tr.embed)[:, -1]
                # two fp32 attention codes agree to ~1e-5 of the output scale; a wrong key
                # set or position moves outputs by ~1e-1 of it
                scale = float(h.abs().max())
                torch.testing.assert_close(outs[s - 1][:, j + s - 1], h, rtol=0, atol=2e-4 * scale)
                feats = torch.cat([feats, h[:, None]], dim=1)
                toks = torch.cat([toks, nxt[:, j + s:j + s + 1]], dim=1)


def test_training_reduces_loss_and_is_deterministic(tiny, cache, tmp_path):
    def run(work: Path, seed: int = 0) -> Trainer:
        tr = Trainer(tiny, cache, small_cfg(seed=seed, epochs=4), work)
        tr.fit()
        return tr

    fresh = Trainer(tiny, cache, small_cfg(), tmp_path / "x")
    before = evaluate(fresh.draft, fresh.train, fresh.embed, fresh.head, depth=2)["loss"]
    a = run(tmp_path / "a")
    after = evaluate(a.draft, a.train, a.embed, a.head, depth=2)["loss"]
    assert after < 0.8 * before
    b = run(tmp_path / "b")
    for (n, p), (_, q) in zip(a.draft.state_dict().items(), b.draft.state_dict().items()):
        assert torch.equal(p, q), n
    c = run(tmp_path / "c", seed=1)
    assert not torch.equal(a.draft.fuse.w1, c.draft.fuse.w1)
    m = a.history[-1]["metrics"]
    assert len(m["tau"]) == 4 and all(t2 >= t1 for t1, t2 in zip(m["tau"], m["tau"][1:]))
    assert m["tau"][0] == pytest.approx(1 + m["top1"])  # depth 1: one drafted token, accepted or not


def test_resume_equals_uninterrupted(tiny, cache, tmp_path):
    whole = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "whole")
    whole.fit()
    first = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "parts")
    first.fit(stop_after_steps=whole.steps_per_epoch + 1)  # stop inside an epoch
    second = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "parts")
    assert second.load_checkpoint() and second.step == whole.steps_per_epoch + 1
    second.fit()
    assert second.step == whole.step
    for (n, p), (_, q) in zip(whole.draft.state_dict().items(), second.draft.state_dict().items()):
        assert torch.equal(p, q), n
    other = Trainer(tiny, cache, small_cfg(epochs=3, lr=1e-2), tmp_path / "parts")
    with pytest.raises(ValueError, match="other settings.*lr"):
        other.load_checkpoint()


@pytest.mark.parametrize("where", ["after_update", "before_backward"])
def test_sigint_saves_a_checkpoint_and_resume_loses_no_step(tiny, cache, tmp_path, where):
    """A SIGINT during training raises KeyboardInterrupt after a checkpoint of the last
    finished step; resuming from it gives the uninterrupted run's weights bit for bit. An
    interrupt right after the optimizer step (before the step counter moves) must not leave
    a checkpoint whose counters miss that update."""
    import signal

    whole = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "whole")
    whole.fit()
    k = whole.steps_per_epoch + 1  # inside the second epoch
    tr = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "parts")
    calls = {"n": 0}
    if where == "after_update":
        step = tr.opt.step

        def hooked(*a, **kw):
            out = step(*a, **kw)
            calls["n"] += 1
            if calls["n"] == k:
                signal.raise_signal(signal.SIGINT)
            return out
        tr.opt.step = hooked
        done = k  # the update under way is finished and counted
    else:
        zero = tr.opt.zero_grad

        def hooked(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                signal.raise_signal(signal.SIGINT)
            return zero(*a, **kw)
        tr.opt.zero_grad = hooked
        done = k - 1  # step k had not updated anything yet
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    again = Trainer(tiny, cache, small_cfg(epochs=3, rollout=2), tmp_path / "parts")
    assert again.load_checkpoint() and again.step == done and again.history == tr.history
    again.fit()
    assert again.step == whole.step
    for (n, p), (_, q) in zip(whole.draft.state_dict().items(), again.draft.state_dict().items()):
        assert torch.equal(p, q), n


def test_extra_feature_caches_add_training_data_only(tiny, cache, tmp_path):
    more = [[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]
            for w in ("apple", "pear", "plum", "fig", "kiwi", "lime")]
    extract_features(tiny, more, tmp_path / "more", settings(max_len=64, val_conversations=0))
    extra = FeatureCache(tmp_path / "more")
    assert extra.tokens("val") == 0 and extra.tokens("train") > 0
    base = Trainer(tiny, cache, small_cfg(), tmp_path / "a")
    both = Trainer(tiny, cache, small_cfg(), tmp_path / "b", extra_train=[extra])
    assert len(both.train) == len(base.train) + len(more)
    assert len(both.train.tokens) == len(base.train.tokens) + extra.tokens("train")
    np.testing.assert_array_equal(both.val.tokens, base.val.tokens)  # validation: the main cache's only
    last = both.train.starts[-1]
    np.testing.assert_array_equal(both.train.features[last:last + both.train.lens[-1]],
                                  extra.load("train")["features"][-int(both.train.lens[-1]):])
    both.fit(stop_after_steps=2)
    # a cache of another target is refused
    import shutil
    shutil.copytree(tmp_path / "more", tmp_path / "other")
    m = json.loads((tmp_path / "other" / "manifest.json").read_text())
    m["target"]["embedding_sha256"] = "0" * 64
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="another target"):
        Trainer(tiny, cache, small_cfg(), tmp_path / "c", extra_train=[FeatureCache(tmp_path / "other")])
    # ... but not one of the same target file under another name (the signature leaves names out)
    m["target"] = {**json.loads((tmp_path / "more" / "manifest.json").read_text())["target"], "name": "renamed.gguf"}
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(m))
    Trainer(tiny, cache, small_cfg(), tmp_path / "d", extra_train=[FeatureCache(tmp_path / "other")])


def test_init_fine_tunes_an_existing_draft(tiny, cache, tmp_path):
    """``init`` starts from a saved draft: its weights and its draft vocabulary (not one
    chosen from this run's data), and training goes on from there."""
    a = Trainer(tiny, cache, small_cfg(epochs=4), tmp_path / "a")
    a.fit()
    eos = set(tiny.config.eos_token_ids)
    top = [t for t in range(tiny.config.vocab_size - 1, -1, -1) if t not in eos][:64 - len(eos)]
    chosen, a.draft.vocab_map = a.draft.vocab_map, torch.tensor(sorted(eos | set(top)), dtype=torch.int64)
    assert not torch.equal(chosen, a.draft.vocab_map)  # a vocabulary this data would not choose
    a.draft.save(tmp_path / "init", dtype="f32")
    tuned = Trainer(tiny, cache, small_cfg(init=str(tmp_path / "init")), tmp_path / "b")
    for (n, p), (_, q) in zip(a.draft.state_dict().items(), tuned.draft.state_dict().items()):
        assert torch.equal(p, q), n
    fresh = Trainer(tiny, cache, small_cfg(), tmp_path / "c")
    loss = lambda tr: evaluate(tr.draft, tr.train, tr.embed, tr.head, depth=2)["loss"]  # noqa: E731
    assert loss(tuned) < 0.8 * loss(fresh)
    tuned.fit(stop_after_steps=2)
    assert tuned.step == 2 and torch.equal(tuned.draft.vocab_map, a.draft.vocab_map)
    assert not torch.equal(tuned.draft.fuse.w1, a.draft.fuse.w1)
    with pytest.raises(ValueError, match="num_layers 1, this training asks for 2"):
        Trainer(tiny, cache, small_cfg(init=str(tmp_path / "init"), layers=2), tmp_path / "d")
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Trainer(tiny, cache, small_cfg(init=str(tmp_path / "init"), draft_vocab_size=32), tmp_path / "e")


def test_time_budget_stops_training(tiny, cache, tmp_path):
    tr = Trainer(tiny, cache, small_cfg(epochs=50, time_budget_s=1e-6), tmp_path / "t")
    tr.fit()
    assert tr.step == 1 and tr.history  # one step exceeds the budget; the run still validates


# -- end to end ------------------------------------------------------------------------------

def test_train_draft_exports_a_loadable_draft(tiny, tiny_path, data_file, tmp_path):
    out = train_draft(tiny_path, data_file, tmp_path / "d", epochs=2, draft_vocab_size=48, max_len=64,
                      val_conversations=2, shard_size=4, batch_tokens=256, warmup_steps=2, amp=False,
                      self_distill=8, distill_fraction=0.5, command="test")
    draft = load_draft(out, target=tiny)
    cfg, weights = load_draft_weights(out)
    assert cfg.draft_vocab_size == 48 and weights["vocab_map"].dtype == np.int64
    assert 2 in weights["vocab_map"].tolist()
    card = json.loads((out / "draft.json").read_text())["card"]
    shards = FeatureCache(out / "features").manifest["shards"]
    n_train = sum(sh["conversations"] for sh in shards if sh["split"] == "train")
    assert card["command"] == "test" and card["data"]["train"]["conversations"] == n_train >= 10
    assert 0 < card["data"]["train"]["self_distilled"] < n_train
    assert len(card["metrics"]["val_tau_chain_depth_1_to_7"]) == 7 and card["time"]["train_seconds"] > 0
    h, head = torch.randn(3, 64), torch.randn(tiny.config.vocab_size, 64)
    torch.testing.assert_close(draft.logits(h, head), (h @ head.T)[:, torch.from_numpy(weights["vocab_map"])])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_train_draft_for_a_qwen_target(tmp_path, llama_gguf_writer, data_file, arch):
    """A target with q/k/v biases (Qwen2) or q/k head norms (Qwen3): its features train a
    draft (plain LLaMA layers), which then speculates with output equal to the target's
    greedy decoding."""
    from dovetail_ext.api import load
    path = tmp_path / f"{arch}.gguf"
    llama_gguf_writer(path, arch=arch, dtype="f32", meta=lambda w: w.add_chat_template(CHATML), seed=4)
    out = train_draft(path, data_file, tmp_path / "d", epochs=1, draft_vocab_size=48, max_len=64,
                      val_conversations=2, shard_size=4, batch_tokens=256, warmup_steps=2, amp=False,
                      command="test")
    gen = load(path, draft=out, threads=1)
    assert gen.draft is not None and gen.source.config.architecture == arch
    prompt = [{"role": "user", "content": "question 3: what is 3 plus 3?"}]
    plain = gen.generate(prompt, max_new_tokens=24, speculative=False)
    spec = gen.generate(prompt, max_new_tokens=24, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats.mode == "speculative" and spec.stats.draft_s > 0  # the draft proposed


def test_cli_train_draft(tiny_path, data_file, tmp_path, capsys):
    from dovetail_ext.cli import main

    out = tmp_path / "cli"
    args = ["train-draft", "--target", str(tiny_path), "--data", str(data_file), "--out", str(out),
            "--epochs", "1", "--vocab-size", "32", "--max-len", "80", "--val-conversations", "2",
            "--batch-tokens", "256", "--warmup-steps", "1", "--threads", "1"]
    assert main(args) == 0
    assert f"draft written to {out}" in capsys.readouterr().out
    assert load_draft_weights(out)[0].draft_vocab_size == 32
    # a second run with --resume finds the finished checkpoint and the cached features
    assert main(args + ["--resume"]) == 0
    assert main(["train-draft", "--target", str(tiny_path), "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(out)]) == 2
    assert "no such data file" in capsys.readouterr().err
    # Bad settings are refused before the features are extracted; so is an output path that is a file.
    bad = tmp_path / "bad"
    for extra, msg in [(["--layers", "0"], "layers, rollout and val_depth must be >= 1"),
                       (["--epochs", "-1"], "epochs and lr must be finite positive numbers"),
                       (["--vocab-size", "-5"], "draft_vocab_size must be >= 0")]:
        assert main(["train-draft", "--target", str(tiny_path), "--data", str(data_file), "--out", str(bad)]
                    + extra) == 2
        assert msg in capsys.readouterr().err
        assert not bad.exists()
    (tmp_path / "a-file").write_text("")
    assert main(["train-draft", "--target", str(tiny_path), "--data", str(data_file), "--out",
                 str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err


def _train_args(target, data, out, *extra) -> list[str]:
    return ["train-draft", "--target", str(target), "--data", str(data), "--out", str(out), "--epochs", "1",
            "--vocab-size", "32", "--max-len", "80", "--val-conversations", "2", "--batch-tokens", "256",
            "--warmup-steps", "1", "--threads", "1", *map(str, extra)]


def test_cli_train_draft_refuses_what_would_train_wrongly(tiny_path, data_file, tmp_path, capsys, llama_gguf_writer):
    """Settings, data and files that would train on the wrong data, diverge, or end in a
    traceback are refused with one line naming them, before any features are extracted
    where the settings allow it."""
    from dovetail_ext.cli import main

    def refused(args, msg):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err

    out = tmp_path / "o"
    for extra, msg in [(["--max-conversations", "0"], "max_conversations must be a positive integer"),
                       (["--max-conversations", "-1"], "max_conversations must be a positive integer"),
                       (["--lr", "inf"], "epochs and lr must be finite positive numbers"),
                       (["--epochs", "inf"], "epochs and lr must be finite positive numbers"),
                       (["--noise", "nan"], "noise must be a finite number"),
                       (["--device", "bogus"], "--device 'bogus'"),
                       (["--features", str(data_file)], "is a file; a feature cache is a directory"),
                       (["--extra-features", str(tmp_path)], "not a feature cache")]:
        refused(_train_args(tiny_path, data_file, out, *extra), msg)
        assert not (out / "features").exists(), extra
    refused(_train_args(tiny_path, data_file, data_file / "sub"), "Not a directory")
    text = tmp_path / "plain.txt"
    text.write_text("Some text.\n\nMore text.\n")
    refused(_train_args(tiny_path, text, out, "--self-distill", "8"), "holds plain text, with no user turns")
    # A .json list whose middle item is broken is refused, naming the item.
    items = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(4)]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(items).replace('"q1"', '"q1'))
    refused(_train_args(tiny_path, broken, out), "item 1 (character")
    # The features of a data file are not reused for other contents, or another share of it.
    assert main(_train_args(tiny_path, data_file, out, "--max-conversations", "6")) == 0
    refused(_train_args(tiny_path, data_file, out), "the cached features were made with other settings")
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    assert main(_train_args(tiny_path, other, tmp_path / "o2")) == 0
    other.write_text("".join(data_file.read_text().splitlines(keepends=True)[:-1]))
    refused(_train_args(tiny_path, other, tmp_path / "o2"), "the cached features were made with other settings")
    # --resume with another target's checkpoint, or an unreadable one
    llama_gguf_writer(tmp_path / "t2.gguf", dtype="f32", meta=lambda w: w.add_chat_template(CHATML), seed=5)
    shutil.copytree(out / "checkpoints", tmp_path / "o3" / "checkpoints")
    refused(_train_args(tmp_path / "t2.gguf", data_file, tmp_path / "o3", "--max-conversations", "6", "--resume"),
            "the checkpoint trains a draft for another target")
    (tmp_path / "o5" / "checkpoints").mkdir(parents=True)
    (tmp_path / "o5" / "checkpoints" / "last.pt").write_text("garbage\n")
    refused(_train_args(tiny_path, data_file, tmp_path / "o5", "--max-conversations", "6", "--resume"),
            "not a readable training checkpoint")
    # A run that diverges stops, naming it, and writes no draft.
    refused(_train_args(tiny_path, data_file, tmp_path / "o4", "--lr", "1e30", "--val-conversations", "0"),
            "training diverged at step")
    assert not (tmp_path / "o4" / "draft.json").exists()


def test_drafts_with_non_finite_weights_are_refused(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig, load_draft_weights
    from dovetail_ext.errors import FormatError
    draft = DovetailDraft.random(DraftConfig.for_target(tiny), seed=0)
    draft.save(tmp_path / "d", dtype="f32")
    with torch.no_grad():
        next(draft.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        draft.save(tmp_path / "bad", dtype="f32")
    assert not (tmp_path / "bad" / "draft.json").exists()
    from safetensors.numpy import load_file, save_file
    w = load_file(str(tmp_path / "d" / "draft.safetensors"))
    name = sorted(k for k in w if k != "vocab_map")[0]
    w[name] = np.full_like(w[name], np.inf)
    save_file(w, str(tmp_path / "d" / "draft.safetensors"))
    with pytest.raises(FormatError, match=f"tensor {name} holds NaN or inf"):
        load_draft_weights(tmp_path / "d")


def test_chat_template_refusals_are_skipped_and_counted(tmp_path, llama_gguf_writer, data_file):
    """A conversation the target's chat template refuses (here: one that opens with the
    assistant, under a template that wants alternating roles from the user) is left out and
    counted in the manifest, instead of ending the extraction."""
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path / "strict.gguf"
    llama_gguf_writer(path, dtype="f32", meta=lambda w: w.add_chat_template(strict), seed=3)
    src = load_model_source(path)
    convs = load_conversations(data_file)
    convs.insert(3, [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "yes"}])
    manifest = extract_features(src, convs, tmp_path / "f", settings(val_conversations=0))
    assert sum(s["refused"] for s in manifest["shards"]) == 1
    assert sum(s["conversations"] for s in manifest["shards"]) == len(convs) - 1


def test_cli_train_draft_interrupted_exits_130_and_resumes(tiny_path, data_file, tmp_path, capsys, monkeypatch):
    """Ctrl-C during ``train-draft``: exit status 130 with a checkpoint, and ``--resume``
    ends with the same draft as an uninterrupted run (with --extra-features in both)."""
    import signal

    from dovetail_ext.cli import main

    extra = tmp_path / "extra"
    extract_features(load_model_source(tiny_path), CONVS[::-1], extra, settings(max_len=80, val_conversations=0))

    def args(out: Path) -> list[str]:
        return ["train-draft", "--target", str(tiny_path), "--data", str(data_file), "--out", str(out),
                "--features", str(tmp_path / "features"), "--extra-features", str(extra),
                "--epochs", "2", "--vocab-size", "32", "--max-len", "80", "--val-conversations", "2",
                "--batch-tokens", "256", "--warmup-steps", "1", "--threads", "1", "--no-amp"]

    assert main(args(tmp_path / "whole")) == 0
    card = json.loads((tmp_path / "whole" / "draft.json").read_text())["card"]
    assert card["data"]["train"]["tokens"] == sum(c["tokens"] for c in card["data"]["train_caches"])
    assert card["data"]["train_caches"][1]["tokens"] == FeatureCache(extra).tokens("train")
    steps = card["training"]["steps"]
    assert steps >= 4
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def hooked(self, *a, **kw):
        out = step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return out

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", hooked)
        assert main(args(tmp_path / "cut")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "--resume" in err
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["step"] == 3
    assert not (tmp_path / "cut" / "draft.safetensors").exists()
    assert main(args(tmp_path / "cut") + ["--resume"]) == 0
    assert "resumed at step 3" in capsys.readouterr().err
    assert json.loads((tmp_path / "cut" / "draft.json").read_text())["card"]["training"]["steps"] == steps
    assert (tmp_path / "cut" / "draft.safetensors").read_bytes() == (tmp_path / "whole" / "draft.safetensors").read_bytes()


def test_shipped_default_draft_matches_the_default_model(default_source):
    import dovetail_ext

    d = Path(dovetail_ext.__file__).parent / "drafts" / "smollm2-135m-instruct"
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 24 * 2 ** 20
    draft = load_draft(d, target=default_source)  # refuses a draft made for another target
    cfg = draft.config
    assert cfg.num_layers == 1 and cfg.draft_vocab_size > 0 and set(cfg.eos_token_ids) <= set(draft.vocab_map.tolist())
    header = json.loads((d / "draft.safetensors").read_bytes()[8:8 + int.from_bytes(
        (d / "draft.safetensors").read_bytes()[:8], "little")])
    assert {e["dtype"] for n, e in header.items() if n not in ("__metadata__", "vocab_map")} == {"BF16"}
    card = draft.card
    assert card["command"].startswith("dovetail train-draft") and card["data"]["source"] == "sharegpt"
    assert 0 < card["metrics"]["val_top1"] < 1 and len(card["metrics"]["val_tau_chain_depth_1_to_7"]) == 7



def test_shipped_corpus_matches_the_default_model(default_source):
    """The corpus shipped next to the default draft: made by build-corpus for the default
    model (its signature is checked), over a million tokens, taken by load() by default."""
    import dovetail_ext
    from dovetail_ext.lookup import CORPUS_FILE, TokenCorpus
    from dovetail_ext.models import packaged_corpus_for

    d = Path(dovetail_ext.__file__).parent / "drafts" / "smollm2-135m-instruct"
    assert packaged_corpus_for(default_source) == d / CORPUS_FILE
    corpus = TokenCorpus.load(d / CORPUS_FILE)
    corpus.check_target(default_source)
    assert len(corpus) > 1_000_000 and corpus.card["tokens"] == len(corpus)
    assert corpus.card["command"].startswith("dovetail build-corpus")
    assert {s["source"] for s in corpus.card["sources"]} == {"python-functions", "sharegpt"}
    assert int(corpus.tokens.max()) < default_source.config.vocab_size
    gen = dovetail_ext.load(context=64, threads=1)
    assert gen.corpus is not None and len(gen.corpus) == len(corpus)
    assert dovetail_ext.load(context=64, threads=1, corpus=None).corpus is None
    assert dovetail_ext.load(context=64, threads=1, lookup=None).corpus is None  # only the lookup uses it
