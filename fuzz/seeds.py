"""Seed corpora for the loader fuzzers, made from real files.

    python fuzz/seeds.py OUT_DIR            # OUT_DIR/{gguf,hf,tokenizer,draft}/...

Sources: the default model's GGUF header (its real metadata and chat template, the token
arrays cut to a few hundred entries, the tensor table whole or cut after a few entries:
the 98 MB file itself is far too large to mutate), and small valid files made the way the
tests make them (``tests/conftest.py`` GGUF writer in every weight type, the Hugging Face
checkpoint of ``tests/test_bad_files.py``, draft checkpoints saved by
``DovetailDraft.save``). Valid seeds let the fuzzer reach the late checks (shapes, the
tokenizer, the engine) instead of dying at the magic number. The default model is
optional: without it its seeds are left out.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' file writers

from fuzzlib import join_files  # noqa: E402

TARGETS = ("gguf", "hf", "tokenizer", "draft")


# ---------------------------------------------------------------------------- GGUF

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Header:
    """The raw records of a GGUF header: (key, raw value bytes) and tensor-info bytes."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.version, self.n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        off = 24
        self.kv: list[tuple[bytes, int, int, int]] = []  # key, type, value start, value end
        for _ in range(n_kv):
            key, off = self._string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            start = off + 4
            end = self._skip(start, vtype)
            self.kv.append((key, vtype, start, end))
            off = end
        self.infos: list[tuple[int, int]] = []
        for _ in range(self.n_tensors):
            start = off
            _, off = self._string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            off += 4 + 8 * n_dims + 4 + 8
            self.infos.append((start, off))

    def _string(self, off: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", self.buf, off)
        return self.buf[off + 8:off + 8 + n], off + 8 + n

    def _skip(self, off: int, vtype: int) -> int:
        if vtype in _SCALAR:
            return off + _SCALAR[vtype]
        if vtype == 8:
            return self._string(off)[1]
        itype, count = struct.unpack_from("<IQ", self.buf, off)
        off += 12
        for _ in range(count):
            off = self._skip(off, itype)
        return off

    def array_items(self, start: int) -> tuple[int, list[bytes]]:
        """(item type, raw bytes of each item) of the array value at ``start``."""
        itype, count = struct.unpack_from("<IQ", self.buf, start)
        off, items = start + 12, []
        for _ in range(count):
            end = self._skip(off, itype)
            items.append(self.buf[off:end])
            off = end
        return itype, items

    def rebuild(self, keep: dict[bytes, list[int]], n_infos: int) -> bytes:
        """The header with the arrays named in ``keep`` cut to those item indices and only
        the first ``n_infos`` tensor infos; the tensor count still claims them all."""
        out = bytearray(self.buf[:8] + struct.pack("<QQ", self.n_tensors, len(self.kv)))
        for key, vtype, start, end in self.kv:
            out += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype)
            if key in keep:
                itype, items = self.array_items(start)
                chosen = [items[i] for i in keep[key]]
                out += struct.pack("<IQ", itype, len(chosen)) + b"".join(chosen)
            else:
                out += self.buf[start:end]
        for start, end in self.infos[:n_infos]:
            out += self.buf[start:end]
        return bytes(out)


def default_model_vocab(n_tokens: int = 400) -> dict[str, Any] | None:
    """The default model's first ``n_tokens`` tokens, their types, the merges among them,
    its chat template and header, or None when the model is not installed."""
    try:
        from dovetail_ext.models import default_model_path
        path = default_model_path()
    except FileNotFoundError:
        return None
    with open(path, "rb") as f:
        head = f.read(4 << 20)  # the header (vocabulary included) is about 1.8 MB
    header = _Header(head)
    fields = {key: (vtype, start, end) for key, vtype, start, end in header.kv}

    def strings(key: bytes) -> list[str]:
        return [item[8:].decode("utf-8") for item in header.array_items(fields[key][1])[1]]

    tokens = strings(b"tokenizer.ggml.tokens")[:n_tokens]
    known = set(tokens)
    merges = [i for i, m in enumerate(strings(b"tokenizer.ggml.merges"))
              if set(m.split(" ")) <= known and m.replace(" ", "") in known]
    types = [struct.unpack("<i", b)[0] for b in header.array_items(fields[b"tokenizer.ggml.token_type"][1])[1]]
    _, start, end = fields[b"tokenizer.chat_template"]
    return dict(header=header, tokens=tokens, types=types[:n_tokens],
                merges=[strings(b"tokenizer.ggml.merges")[i] for i in merges], merge_index=merges,
                template=head[start + 8:end].decode("utf-8"))


def small_byte_vocab() -> dict[str, Any]:
    """A small valid gpt2-type vocabulary (the tests' kind, fewer byte tokens: fast to parse)."""
    from dovetail_ext.formats.tokenizer import _bytes_to_unicode

    spell = _bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [spell[b] for b in b" \nabcdefghijklmnopqrstuvwxyz,.!0123456789"] + ["\u0120t", "he"]
    return dict(model="gpt2", pre="smollm", tokens=tokens, types=[3, 3, 3] + [1] * (len(tokens) - 3),
                merges=["\u0120 t", "h e"], bos=1, eos=2)


def small_spm_vocab() -> dict[str, Any]:
    """A small valid llama-type (SentencePiece) vocabulary (SentencePiece's byte fallback
    needs all 256 byte pieces, too many for a fast seed: unknown text maps to <unk>)."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "<|im_end|>"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, 0.0]
    return dict(model="llama", tokens=tokens, types=types, scores=scores, merges=None, bos=1, eos=2)


def gguf_seeds() -> dict[str, bytes]:
    from conftest import write_llama_gguf

    seeds: dict[str, bytes] = {}
    real = default_model_vocab()
    if real is not None:
        h: _Header = real["header"]
        keep = {b"tokenizer.ggml.tokens": list(range(len(real["tokens"]))),
                b"tokenizer.ggml.token_type": list(range(len(real["tokens"]))),
                b"tokenizer.ggml.merges": real["merge_index"]}
        seeds["default-header-4-tensors.gguf"] = h.rebuild(keep, 4)
        seeds["default-header-all-tensors.gguf"] = h.rebuild(keep, len(h.infos))
    dims = dict(n_layers=1, hidden=32, n_head=2, n_kv=1, ffn=32)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.gguf"
        for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"):
            write_llama_gguf(p, dtype=dtype, vocab=small_byte_vocab(), **dims)
            seeds[f"tiny-{dtype}.gguf"] = p.read_bytes()
        write_llama_gguf(p, dtype="q4_1", tied=False, vocab=small_byte_vocab(), n_layers=2, hidden=32, n_head=4,
                         n_kv=2, ffn=64)
        seeds["tiny-untied-2-layers.gguf"] = p.read_bytes()
        write_llama_gguf(p, dtype="q8_0", vocab=small_spm_vocab(), **dims,
                         meta=lambda w: w.add_chat_template(real["template"] if real else "{{ messages }}"))
        seeds["tiny-spm-template.gguf"] = p.read_bytes()
        # Qwen2 (q/k/v biases) with K-quant and Q5_0 matrices, converted at load.
        from gguf import GGMLQuantizationType as Q

        from conftest import random_k_blocks

        def k_blocks(qtype):
            return lambda value: (qtype, *random_k_blocks(qtype, *value.shape))
        write_llama_gguf(p, arch="qwen2", dtype="q8_0", vocab=small_byte_vocab(), n_layers=1, hidden=256, n_head=4,
                         n_kv=2, ffn=256, types={"blk.0.ffn_up": Q.Q5_0, "blk.0.ffn_gate": k_blocks(Q.Q4_K),
                                                 "blk.0.ffn_down": k_blocks(Q.Q6_K)})
        seeds["tiny-qwen2-kquants.gguf"] = p.read_bytes()
        # Gemma 3 (post norms, sliding window) with a SentencePiece vocabulary and linear RoPE scaling.
        from gguf import RopeScalingType
        write_llama_gguf(p, arch="gemma3", dtype="q8_0", vocab=small_spm_vocab(), n_layers=2, hidden=32, n_head=2,
                         n_kv=1, ffn=32, meta=lambda w: (w.add_sliding_window(8),
                                                         w.add_rope_scaling_type(RopeScalingType.LINEAR),
                                                         w.add_rope_scaling_factor(4.0)))
        seeds["tiny-gemma3.gguf"] = p.read_bytes()
    return seeds


# ---------------------------------------------------------------------------- Hugging Face

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 48, "hidden_size": 32,
             "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
             "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def safetensors_bytes(tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> bytes:
    """A safetensors file; ``dtypes`` may store a float32 tensor as "BF16" (truncated bits)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name, a in tensors.items():
        kind = (dtypes or {}).get(name) or {np.float32: "F32", np.float16: "F16"}[a.dtype.type]
        raw = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes() if kind == "BF16" \
            else a.tobytes()
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def hf_tensors(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    from test_bad_files import tensors
    rng = np.random.default_rng(seed)
    return {n: (t + rng.standard_normal(t.shape) * 0.02).astype(np.float32) for n, t in tensors(cfg).items()}


def tiny_tokenizer_json() -> str:
    """tokenizer.json of :func:`small_byte_vocab` (what the HF fuzzer puts beside each input)."""
    from dovetail_ext.formats.tokenizer import tokenizer_from_gguf_vocab
    v = small_byte_vocab()
    tok = tokenizer_from_gguf_vocab(model="gpt2", tokens=v["tokens"], token_types=v["types"], merges=v["merges"],
                                    scores=None, pre="smollm", bos_id=1, eos_ids=[2], add_bos=False,
                                    add_space_prefix=None, chat_template=None, source="seed")
    return tok.backend.to_str()


def hf_seeds() -> dict[str, bytes]:
    cfg = json.dumps(HF_CONFIG).encode()
    t = hf_tensors(HF_CONFIG)
    untied = {**HF_CONFIG, "tie_word_embeddings": False, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rope_scaling": None, "head_dim": 8, "eos_token_id": [2, 0]}
    t2 = hf_tensors(untied, seed=1)
    t2["lm_head.weight"] = t2["model.embed_tokens.weight"].copy()
    return {
        "f32": join_files(cfg, safetensors_bytes(t)),
        "f16": join_files(cfg, safetensors_bytes({n: a.astype(np.float16) if a.ndim == 2 else a
                                                  for n, a in t.items()})),
        "bf16-untied-2-layers": join_files(json.dumps(untied).encode(),
                                           safetensors_bytes(t2, {n: "BF16" for n in t2 if t2[n].ndim == 2})),
    }


# ---------------------------------------------------------------------------- tokenizers

def tokenizer_seeds() -> dict[str, bytes]:
    """Mode byte, then the files: J tokenizer.json [+ tokenizer_config.json], S a
    SentencePiece tokenizer.model [+ tokenizer_config.json], G a GGUF vocabulary as JSON."""
    from dovetail_ext.formats.tokenizer import _sentencepiece_from_vocab, tokenizer_from_gguf_vocab

    seeds: dict[str, bytes] = {}
    vocabs = {"small-bpe": small_byte_vocab(), "small-spm": small_spm_vocab()}
    real = default_model_vocab()
    if real is not None:
        vocabs["default-bpe-400"] = dict(model="gpt2", pre="smollm", tokens=real["tokens"], types=real["types"],
                                         merges=real["merges"], bos=1, eos=2, template=real["template"])
    for name, v in vocabs.items():
        doc = {"model": v["model"], "tokens": v["tokens"], "types": v["types"], "merges": v.get("merges"),
               "scores": v.get("scores"), "pre": v.get("pre"), "bos": v["bos"], "eos": [v["eos"]],
               "add_bos": None, "add_space_prefix": None, "template": v.get("template")}
        seeds[f"gguf-vocab-{name}"] = b"G" + json.dumps(doc, ensure_ascii=False).encode()
        if v["model"] == "gpt2":
            tok = tokenizer_from_gguf_vocab(model="gpt2", tokens=v["tokens"], token_types=v["types"],
                                            merges=v["merges"], scores=None, pre=v.get("pre"), bos_id=v["bos"],
                                            eos_ids=[v["eos"]], add_bos=False, add_space_prefix=None,
                                            chat_template=None, source="seed")
            tcfg = {"bos_token": v["tokens"][v["bos"]], "eos_token": {"content": v["tokens"][v["eos"]]},
                    "add_bos_token": False, "chat_template": v.get("template") or "{{ messages[0]['content'] }}"}
            seeds[f"tokenizer-json-{name}"] = b"J" + join_files(tok.backend.to_str().encode(),
                                                               json.dumps(tcfg).encode())
        else:
            sp = _sentencepiece_from_vocab(v["tokens"], v["types"], v["scores"], True, "seed")
            tcfg = {"bos_token": "<s>", "eos_token": "</s>",
                    "chat_template": [{"name": "default", "template": "{{ bos_token }}"}]}
            seeds[f"sentencepiece-{name}"] = b"S" + join_files(sp.serialized_model_proto(), json.dumps(tcfg).encode())
    return seeds


# ---------------------------------------------------------------------------- drafts

def draft_seeds() -> dict[str, bytes]:
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig, TargetSignature

    target = TargetSignature(architecture="llama", hidden_size=32, vocab_size=48,
                             embedding_sha256="0123456789abcdef" * 4, name="tiny")
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers, dtype in ((1, "f32"), (2, "bf16")):
            cfg = DraftConfig(hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=16,
                              intermediate_size=32, rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=48,
                              target=target)
            d = DovetailDraft.random(cfg, seed=layers).save(Path(tmp) / f"d{layers}", dtype=dtype,
                                                            card={"steps": 0, "note": "seed"})
            seeds[f"draft-{layers}-layers-{dtype}"] = join_files((d / "draft.json").read_bytes(),
                                                                 (d / "draft.safetensors").read_bytes())
    return seeds


def write_seeds(target: str, directory: str | Path) -> list[Path]:
    """Writes the seeds of ``target`` (one of :data:`TARGETS`) into ``directory``."""
    if target not in TARGETS:
        raise ValueError(f"unknown fuzz target {target!r}; expected one of {TARGETS}")
    seeds = {"gguf": gguf_seeds, "hf": hf_seeds, "tokenizer": tokenizer_seeds, "draft": draft_seeds}[target]()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
        out.append(directory / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for t in TARGETS:
        written = write_seeds(t, Path(sys.argv[1]) / t)
        print(f"{t}: {len(written)} seeds, {sum(p.stat().st_size for p in written)} bytes")
