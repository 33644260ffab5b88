"""Threads and Ctrl-C: engines used from several Python threads, the GIL released around
native compute, and generation interrupted by KeyboardInterrupt at any point.

- Two engines (or generators) driven from two threads at once give exactly what each
  gives alone.
- One engine shared by two threads: each native call is serialized (its result equals the
  sequential one); one Generator shared by two threads either gives a caller its
  sequential result or raises a RuntimeError that says why, and stays usable.
- A Python thread makes progress while an engine computes.
- KeyboardInterrupt (a ``stream`` consumer raising it, ``_thread.interrupt_main`` during
  ``generate``, or raised at every line the generation loop executes) leaves the Generator
  usable, and its next outputs are a fresh generator's.
- SIGINT stops ``dovetail train-draft`` cleanly, and ``--resume`` finishes the run.
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext import _core
from dovetail_ext.draft import Draft
from dovetail_ext.draft_model import DovetailDraft, DraftConfig
from dovetail_ext.target import TargetEngine
from dovetail_ext.tree import TreeParams
from native_helpers import make_source, random_weights, tiny_config

PROMPTS = ["hello there", "the cat sat on the mat", "1 2 3 4"]
TREE = TreeParams(3, 3, 6)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama_gguf_writer) -> Path:
    """A small random LLaMA with a byte-level tokenizer (generation in milliseconds)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    llama_gguf_writer(path, dtype="q8_0", n_layers=2, hidden=64, n_head=4, n_kv=2, ffn=96, seed=3)
    return path


def tiny_generator(path: Path, speculative: bool = False):
    # Not adaptive: which steps draft would then depend on timings, and the tests that
    # interrupt at the n-th line need the same lines each run.
    gen = dovetail_ext.load(path, context=96, threads=1, draft=None, max_batch=32, adaptive=False)
    if speculative:
        module = DovetailDraft.random(DraftConfig.for_target(gen.source, num_layers=1), seed=1, std=0.05)
        gen.set_draft(Draft.from_module(module, gen.target))
    return gen


def fresh_outputs(path: Path, speculative: bool, **kw) -> dict[str, list[int]]:
    """Each prompt's tokens from a freshly loaded generator."""
    out = {}
    for p in PROMPTS:
        out[p] = tiny_generator(path, speculative).generate(p, raw=True, speculative=speculative, tree=TREE,
                                                            **kw).tokens
    return out


def run_threads(fns) -> list:
    """Runs each fn in its own thread, all released at once; returns results (or exceptions)."""
    barrier = threading.Barrier(len(fns))
    results: list = [None] * len(fns)

    def body(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # returned to the caller, which checks what it is
            results[i] = e

    threads = [threading.Thread(target=body, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread did not finish"
    return results


# ------------------------------------------------------------------ engines in threads


def _decode(src, steps: int, seed: int, threads: int) -> np.ndarray:
    """Greedy decoding for ``steps`` tokens on a fresh engine: every logits row, stacked."""
    eng = TargetEngine(src, context=128, max_batch=32, threads=threads)
    ids = list(np.random.default_rng(seed).integers(0, src.config.vocab_size, 20))
    logits, _ = eng.forward(ids)
    eng.commit()
    rows = [logits[0]]
    for _ in range(steps):
        logits, _ = eng.forward([int(np.argmax(rows[-1]))])
        eng.commit()
        rows.append(logits[0])
    return np.stack(rows)


@pytest.fixture(scope="module")
def two_sources():
    cfg = tiny_config(layers=3, heads=8, head_dim=32, ffn=512, vocab=777)
    return (make_source(cfg, random_weights(cfg, seed=1), "q4_1", embd_dtype="q8_0"),
            make_source(cfg, random_weights(cfg, seed=2), "bf16"))


def test_two_engines_in_two_threads_equal_alone(two_sources):
    a, b = two_sources
    alone = [_decode(a, 60, 0, 2), _decode(b, 60, 1, 2)]
    for _ in range(3):
        got = run_threads([lambda: _decode(a, 60, 0, 2), lambda: _decode(b, 60, 1, 2)])
        for g, want in zip(got, alone):
            assert not isinstance(g, Exception), g
            np.testing.assert_array_equal(g, want)


def test_one_engine_shared_by_two_threads_serializes_each_call(two_sources):
    src = two_sources[0]
    eng = TargetEngine(src, context=128, max_batch=32, threads=2)
    eng.forward(np.arange(10))
    eng.commit()
    calls = [np.random.default_rng(s).integers(0, src.config.vocab_size, int(n)) for s, n in [(1, 17), (2, 5)]]
    want = [eng.forward(c, logit_rows=range(len(c)), feature_rows=range(len(c))) for c in calls]

    def hammer(c):
        return [eng.forward(c, logit_rows=range(len(c)), feature_rows=range(len(c))) for _ in range(25)]

    got = run_threads([lambda: hammer(calls[0]), lambda: hammer(calls[1])])
    for results, (wl, wf) in zip(got, want):
        assert not isinstance(results, Exception), results
        for lg, ft in results:
            np.testing.assert_array_equal(lg, wl)
            np.testing.assert_array_equal(ft, wf)
    assert eng.n_past == 10


def test_two_generators_in_two_threads_equal_alone(tiny_gguf):
    for spec in (False, True):
        want = fresh_outputs(tiny_gguf, spec, max_new_tokens=40)
        gens = [tiny_generator(tiny_gguf, spec), tiny_generator(tiny_gguf, spec)]

        def run(g, prompts):
            return [g.generate(p, raw=True, max_new_tokens=40, speculative=spec, tree=TREE).tokens for p in prompts]

        got = run_threads([lambda: run(gens[0], PROMPTS * 3), lambda: run(gens[1], PROMPTS[::-1] * 3)])
        assert got[0] == [want[p] for p in PROMPTS * 3]
        assert got[1] == [want[p] for p in PROMPTS[::-1] * 3]


def test_default_model_generators_in_two_threads(default_gguf_path):
    prompts = ["Name a color.", "Write a word that rhymes with cat."]
    gens = [dovetail_ext.load(default_gguf_path, context=256, threads=1, draft=None) for _ in prompts]
    alone = [g.generate(p, max_new_tokens=24).tokens for g, p in zip(gens, prompts)]
    for g in gens:
        g.reset()
    got = run_threads([lambda g=g, p=p: g.generate(p, max_new_tokens=24).tokens for g, p in zip(gens, prompts)])
    assert got == alone


def test_one_generator_shared_by_two_threads_serializes_or_refuses(tiny_gguf):
    for spec in (False, True):
        want = fresh_outputs(tiny_gguf, spec, max_new_tokens=60)
        gen = tiny_generator(tiny_gguf, spec)
        refused = 0
        for _ in range(4):
            got = run_threads([lambda p=p: gen.generate(p, raw=True, max_new_tokens=60, speculative=spec,
                                                        tree=TREE).tokens for p in PROMPTS[:2]])
            for p, g in zip(PROMPTS[:2], got):
                if isinstance(g, Exception):
                    assert isinstance(g, RuntimeError) and "another generate" in str(g), repr(g)
                    refused += 1
                else:
                    assert g == want[p]
            assert any(not isinstance(g, Exception) for g in got)
        # still usable, and as a fresh one
        assert [gen.generate(p, raw=True, max_new_tokens=60, speculative=spec, tree=TREE).tokens
                for p in PROMPTS] == [want[p] for p in PROMPTS]


def test_interleaved_streams_on_one_generator(tiny_gguf):
    """A stream left open while another call runs on the same generator is superseded:
    resuming it raises instead of producing text from a cache it no longer owns."""
    want = fresh_outputs(tiny_gguf, False, max_new_tokens=30)
    gen = tiny_generator(tiny_gguf)
    first = gen.stream(PROMPTS[0], raw=True, max_new_tokens=30)
    next(first)
    assert gen.generate(PROMPTS[1], raw=True, max_new_tokens=30).tokens == want[PROMPTS[1]]
    with pytest.raises(RuntimeError, match="another generate"):
        list(first)
    assert gen.generate(PROMPTS[0], raw=True, max_new_tokens=30).tokens == want[PROMPTS[0]]


# ------------------------------------------------------------------ the GIL


def _progress_during(call) -> tuple[float, float]:
    """(increments per second a Python thread makes while ``call`` runs, while sleeping).

    A short switch interval keeps the slack small: a call that holds the GIL lets the
    other thread run only for a few intervals around it (a GIL-holding op of 50 ms measured
    3 % to 7 % of the idle rate here, an engine call 50 % to 90 %)."""
    count = [0]
    stop = threading.Event()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)
        c0, s0 = count[0], time.perf_counter()
        time.sleep(0.2)
        idle = (count[0] - c0) / (time.perf_counter() - s0)
        c0, s0 = count[0], time.perf_counter()
        call()
        busy = (count[0] - c0) / (time.perf_counter() - s0)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    return busy, idle


def test_gil_is_released_during_native_compute(two_sources):
    src = two_sources[0]
    eng = TargetEngine(src, context=2048, max_batch=1024, threads=1)
    for n in (256, 512, 1024):  # a call long enough to measure, however fast the kernels are
        tokens = np.arange(n) % src.config.vocab_size
        start = time.perf_counter()
        eng.forward(tokens)
        one_call = time.perf_counter() - start
        if one_call > 0.05:
            break
    assert one_call > 0.02, "the call is too short to measure"
    busy, idle = _progress_during(lambda: eng.forward(tokens))  # one native call
    # With the GIL held the thread could not run during the call.
    assert busy > 0.2 * idle, (busy, idle, one_call)
    # The measurement tells the two apart: this op binding keeps the GIL (a small op).
    x = np.ones((4096, 8192), np.float32)  # long enough to measure with the SIMD quantizer
    held, idle = _progress_during(lambda: _core.quantize_acts(x))
    assert held < 0.15 * idle, (held, idle)


# ------------------------------------------------------------------ Ctrl-C


def test_keyboard_interrupt_in_a_stream_consumer(tiny_gguf):
    for spec in (False, True):
        want = fresh_outputs(tiny_gguf, spec, max_new_tokens=50)
        gen = tiny_generator(tiny_gguf, spec)
        for stop_after in (0, 3, 11):
            with pytest.raises(KeyboardInterrupt):
                for i, _ in enumerate(gen.stream(PROMPTS[0], raw=True, max_new_tokens=50, speculative=spec,
                                                 tree=TREE)):
                    if i == stop_after:
                        raise KeyboardInterrupt
            for p in PROMPTS:
                assert gen.generate(p, raw=True, max_new_tokens=50, speculative=spec, tree=TREE).tokens == want[p]


class _InterruptAtLine:
    """A tracer that raises KeyboardInterrupt at the n-th line executed in dovetail_ext's
    Python code: an interrupt landing between any two lines of the generation loop."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.fired = n, 0, False

    def __call__(self, frame, event, arg):
        if "dovetail_ext" not in frame.f_code.co_filename:
            return None
        if event == "line" and not self.fired:
            self.seen += 1
            if self.seen == self.n:
                self.fired = True
                raise KeyboardInterrupt
        return self


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
def test_keyboard_interrupt_at_every_line_of_generation(tiny_gguf, spec):
    """Interrupt a generation (prompt, prefill, three decoding steps: every line the loop
    runs) at its n-th line, for every n; after each, the next generation equals a fresh
    generator's. The interrupted call reuses part of the cache the previous one left."""
    want = fresh_outputs(tiny_gguf, spec, max_new_tokens=16)
    gen = tiny_generator(tiny_gguf, spec)

    def interrupted(n: int) -> _InterruptAtLine:
        tracer = _InterruptAtLine(n)
        sys.settrace(tracer)
        try:
            gen.generate(PROMPTS[n % 2], raw=True, max_new_tokens=4, speculative=spec, tree=TREE)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        return tracer

    lines = interrupted(0).seen
    assert lines > 100
    for n in range(1, lines + 1):
        # The cache holds another prompt (a, the last one checked) when b is interrupted;
        # then a is checked against the cache b's call may have left half-updated, and b.
        a, b = PROMPTS[(n + 1) % 2], PROMPTS[n % 2]
        assert interrupted(n).fired
        for p in (a, b):
            assert gen.generate(p, raw=True, max_new_tokens=16, speculative=spec, tree=TREE).tokens == want[p], n
    print(f"\n{lines} interruption points")


def test_interrupt_main_during_generate(default_gguf_path):
    """A real Ctrl-C (the main thread interrupted from a timer) during generate, with and
    without a draft: the generator's next outputs are a fresh generator's."""
    prompt = "Write a short story about a lighthouse keeper."
    gen = dovetail_ext.load(default_gguf_path, context=512, threads=2, draft=None)
    module = DovetailDraft.random(DraftConfig.for_target(gen.source, num_layers=1), seed=0, std=0.05)
    draft = Draft.from_module(module, gen.target)
    fresh = dovetail_ext.load(default_gguf_path, context=512, threads=2, draft=None)
    want = fresh.generate(prompt, max_new_tokens=12).tokens
    want_other = fresh.generate("Name a fruit.", max_new_tokens=12).tokens
    del fresh
    gen.set_draft(draft)
    # The interrupt lands at fractions of the whole generation's measured time, so it comes
    # mid-generation however fast the kernels are. The faster of two runs is the measure: a
    # run slowed by a first use or a busy machine would put the interrupt after the end.
    runs = []
    for spec in (False, True):
        full = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            gen.generate(prompt, max_new_tokens=400, speculative=spec, tree=TREE)
            full = min(full, time.perf_counter() - start)
        assert full > 0.1, "the generation is too short to interrupt"
        runs += [(spec, 0.15 * full), (spec, 0.5 * full)]
    for spec, delay in runs:
        timer = threading.Timer(delay, _thread.interrupt_main)
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                gen.generate(prompt, max_new_tokens=400, speculative=spec, tree=TREE)
        finally:
            timer.join()
        assert gen.generate("Name a fruit.", max_new_tokens=12, speculative=spec, tree=TREE).tokens == want_other
        assert gen.generate(prompt, max_new_tokens=12, speculative=not spec, tree=TREE).tokens == want


def test_native_calls_still_raise_clear_errors_from_threads(two_sources):
    """A bad call from a worker thread raises there, like on the main thread."""
    eng = TargetEngine(two_sources[0], context=16, max_batch=8, threads=1)
    got = run_threads([lambda: eng.forward([10**6]), lambda: _core.rope(np.zeros((1, 1, 3), np.float32),
                                                                       np.zeros(1, np.int32), 1e4, 8)])
    assert isinstance(got[0], ValueError) and "outside the vocabulary" in str(got[0])
    assert isinstance(got[1], ValueError) and "even" in str(got[1])


# ------------------------------------------------------------------ Ctrl-C in training

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


@pytest.fixture(scope="module")
def training_files(tmp_path_factory, llama_gguf_writer) -> tuple[Path, Path]:
    import json
    root = tmp_path_factory.mktemp("train")
    llama_gguf_writer(root / "tiny.gguf", dtype="f32", meta=lambda w: w.add_chat_template(CHATML), seed=3)
    convs = [[{"role": "user", "content": f"question {i}: what is {i} plus {i}?"},
              {"role": "assistant", "content": f"the answer is {2 * i}. " * (1 + i % 3)}] for i in range(14)]
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return root / "tiny.gguf", root / "chats.jsonl"


def _train_cmd(target: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dovetail_ext.cli", "train-draft", "--target", str(target), "--data", str(data),
            "--out", str(out), "--epochs", "60", "--vocab-size", "32", "--max-len", "80", "--val-conversations", "2",
            "--batch-tokens", "256", "--warmup-steps", "1", "--threads", "1"]


def _interrupted_training(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Starts ``cmd``, sends SIGINT once training steps are being reported, returns (exit
    status, stderr)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    try:
        while b"train:" not in err:  # tqdm's progress: the training loop runs
            chunk = proc.stderr.read1(4096)
            assert chunk, f"training ended before it could be interrupted: {err.decode()[-2000:]}"
            err += chunk
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        err += proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err.decode(errors="replace")


def test_ctrl_c_stops_training_cleanly_and_resume_finishes_it(training_files, tmp_path):
    """``dovetail train-draft`` interrupted by SIGINT exits with 130 and a message; run again
    with ``--resume`` it finishes, and the draft is the one an uninterrupted run makes.
    (The trainer checkpoints every 300 s, so a short run resumes from its start.)"""
    import os
    import subprocess

    target, data = training_files
    env = {**os.environ, "PYTHONPATH": str(Path(dovetail_ext.__file__).resolve().parent.parent)}
    rc, err = _interrupted_training(_train_cmd(target, data, tmp_path / "cut"), env)
    assert rc == 130 and "interrupted" in err, err[-2000:]
    assert not (tmp_path / "cut" / "draft.json").exists()
    for out, extra in ((tmp_path / "cut", ["--resume"]), (tmp_path / "whole", [])):
        done = subprocess.run(_train_cmd(target, data, out) + extra, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cut" / "draft.safetensors").read_bytes() == \
        (tmp_path / "whole" / "draft.safetensors").read_bytes()


def test_pool_stats_and_fallback_switch():
    """pool_stats counts the jobs the pool split across threads; with the stall fallback
    off, no job runs on the caller alone, and the switch goes back on."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 256)).astype(np.float32)
    pw = _core.PackedWeight("f32", 512, 256, w)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    assert _core.pool_stats()["fallback"] is True
    _core.set_pool_fallback(False)
    try:
        _core.reset_pool_stats()
        want = x @ w.T
        for _ in range(20):
            np.testing.assert_allclose(_core.linear(x, pw, threads=2), want, rtol=1e-5, atol=1e-4)
        s = _core.pool_stats()
        assert s["fallback"] is False
        assert s["parallel_jobs"] == 20 and s["fallback_jobs"] == 0 and s["stretches"] == 0
        _core.reset_pool_stats()
        assert _core.pool_stats()["parallel_jobs"] == 0
    finally:
        _core.set_pool_fallback(True)
    assert _core.pool_stats()["fallback"] is True
