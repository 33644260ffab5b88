"""Perplexity (dovetail_ext.evaluate and `dovetail perplexity`) on the default model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dovetail_ext.evaluate import perplexity

TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    import dovetail_ext
    return dovetail_ext.load(default_gguf_path, context=256, threads=2, draft=None, max_batch=128)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def test_perplexity_scores_the_second_half_of_each_chunk(gen):
    """Chunks of 200 tokens (two target calls of max_batch 128 each, the scored rows split
    between them): the result is exp(mean NLL) of tokens 101..199 of each chunk (llama-perplexity's
    count), computed here from the engine's logits of every row."""
    r = perplexity(gen, TEXT, chunk=200, max_chunks=2)
    ids = gen.tokenizer.encode(TEXT, add_bos=False)
    nll = []
    for c in range(2):
        part = ids[c * 200:(c + 1) * 200]
        gen.target.truncate(0)
        lp = []
        for start in (0, 128):
            logits, _ = gen.target.forward(part[start:start + 128], logit_rows=range(len(part[start:start + 128])))
            gen.target.commit()
            lp.append(_log_softmax(logits))
        lp = np.concatenate(lp)
        nll += [-lp[j - 1, part[j]] for j in range(101, 200)]
    gen.reset()
    assert (r.tokens, r.chunks, r.chunk, r.text_tokens) == (198, 2, 200, len(ids))
    assert r.nll == pytest.approx(np.mean(nll), rel=1e-12)
    assert r.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-12)
    assert r.stderr == pytest.approx(r.perplexity * np.std(nll, ddof=1) / math.sqrt(198), rel=1e-9)
    assert r.seconds > 0 and r.tokens_per_s > 0


def test_perplexity_against_the_fp32_reference(gen, default_source, torch_one_thread):
    """Against the PyTorch fp32 reference model of the same weights (the engine quantizes
    its activations to int8 per block): within 1%; a shuffled text is far less likely."""
    torch = pytest.importorskip("torch")
    from dovetail_ext import reference
    model = reference.LlamaReference.from_source(default_source)
    ids = gen.tokenizer.encode(TEXT, add_bos=False)[:128]
    with torch.no_grad():
        logits, _ = model.forward(torch.tensor(ids), None, None, model.new_cache(128))
    lp = _log_softmax(logits.numpy())
    want = math.exp(-np.mean([lp[j - 1, ids[j]] for j in range(65, 128)]))
    r = perplexity(gen, TEXT, chunk=128, max_chunks=1)
    assert r.perplexity == pytest.approx(want, rel=0.01)
    # The same number of chunks of each (a single chunk's perplexity moves with the text):
    # 88 against 400-780 for shuffles of the README of 2026-11-27.
    shuffled = " ".join(np.random.default_rng(0).permutation(TEXT.split()).tolist())
    real = perplexity(gen, TEXT, chunk=128, max_chunks=8).perplexity
    assert perplexity(gen, shuffled, chunk=128, max_chunks=8).perplexity > 2.5 * real


def test_bos_starts_each_chunk_when_the_tokenizer_adds_one(gen, monkeypatch):
    seen = []
    monkeypatch.setattr(gen.tokenizer, "add_bos", True)
    monkeypatch.setattr(gen.tokenizer, "bos_id", 1)
    real = gen.score
    monkeypatch.setattr(gen, "score", lambda ids, first: seen.append(list(ids)) or real(ids, first))
    perplexity(gen, TEXT, chunk=64, max_chunks=3)
    ids = gen.tokenizer.encode(TEXT, add_bos=False)
    assert [s[0] for s in seen] == [1, 1, 1] and [s[1:] for s in seen] == [ids[c * 64 + 1:(c + 1) * 64] for c in range(3)]


def test_bad_arguments(gen):
    with pytest.raises(ValueError, match="generator must be"):
        perplexity("model.gguf", TEXT)
    with pytest.raises(ValueError, match="text must be a string"):
        perplexity(gen, b"abc")
    with pytest.raises(ValueError, match="chunk must be an integer >= 4"):
        perplexity(gen, TEXT, chunk=3)
    with pytest.raises(ValueError, match="exceeds the generator's context of 256"):
        perplexity(gen, TEXT, chunk=512)
    with pytest.raises(ValueError, match="fewer than one chunk of 128"):
        perplexity(gen, "a short text", chunk=128)
    with pytest.raises(ValueError, match="max_chunks"):
        perplexity(gen, TEXT, chunk=128, max_chunks=0)
    with pytest.raises(ValueError, match="lone surrogate"):
        perplexity(gen, "a\udc80b" * 200, chunk=8)


def test_cli_perplexity(gen, default_gguf_path, tmp_path, monkeypatch, capsys):
    from dovetail_ext.cli import main
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    args = ["perplexity", "--model", str(default_gguf_path), "--threads", "2", "--chunk", "128", "--max-chunks", "2"]
    assert main(args + [str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = perplexity(gen, TEXT, chunk=128, max_chunks=2)
    assert out["perplexity"] == want.perplexity and out["tokens"] == 126 and out["chunks"] == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    assert main(args + ["-"]) == 0
    assert f"perplexity {want.perplexity:.4f} +/- {want.stderr:.4f} (126 tokens scored in 2 chunks of 128" \
        in capsys.readouterr().out
    assert main(args + [str(tmp_path / "missing.txt")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(args[:-4] + ["--chunk", "0", str(f)]) == 2
    assert "--chunk must be at least 4" in capsys.readouterr().err
    assert main(args + ["--context", "64", str(f)]) == 2
    assert "--chunk 128 exceeds --context 64" in capsys.readouterr().err
