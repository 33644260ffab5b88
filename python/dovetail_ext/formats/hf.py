"""Hugging Face loader: a LLaMA, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 or SmolLM3 checkpoint directory -> :class:`ModelSource`.

What it is: ``config.json`` (``LlamaForCausalLM``; ``Qwen2ForCausalLM``: LLaMA with q/k/v
biases; ``Qwen3ForCausalLM``: LLaMA with q/k head norms; ``Gemma3ForCausalLM``, model_type
``gemma3_text``: see ``config.LlamaConfig``, its norm weights stored as 1 + w as GGUF files
do; ``Gemma2ForCausalLM``: Gemma 3's layers without the head norms, with soft-capping;
``Phi3ForCausalLM``: LLaMA with fused q|k|v and gate|up matrices, split at load, and a
sliding window in every layer when config.json gives one; ``SmolLM3ForCausalLM``: LLaMA
with no RoPE in every n-th layer) to :class:`LlamaConfig`, the weights of
``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``, and the
tokenizer (``tokenizer.json`` or ``tokenizer.model``, ``tokenizer_config.json``).
What it is not: a PyTorch loader (``pytorch_model.bin`` is refused) or a general model zoo.

Weights are memory-mapped: each safetensors header is parsed here (8-byte little-endian
length, then JSON with ``dtype``, ``shape``, ``data_offsets`` per tensor) and checked
against the file size before anything is mapped, so a truncated file or a header claiming
a terabyte fails with :class:`FormatError` instead of an allocation. Reading the bytes
directly also keeps bf16 (``uint16`` bit patterns), which numpy cannot hold as floats, and
avoids the copy ``safetensors.safe_open(..., framework="numpy")`` makes of every tensor.

``weights`` chooses the stored format of the matrices: ``"auto"`` keeps F32/F16/BF16 as
stored (zero copy); ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``, ``"q4_0"``, ``"q4_1"``
convert each matrix at load from a float32 copy of that one matrix (``gguf.quants``).
1-D weights (norms, biases) are always float32. Hugging Face q/k rows already are in rotate-half
order, which is the canonical layout.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ARCHITECTURES, LlamaConfig
from ..errors import FormatError
from .base import (WEIGHT_DTYPES, ModelSource, Weight, read_json_object, row_nbytes, stored_tensors_per_layer,
                   stored_weight_shapes, unfuse)
from .tokenizer import tokenizer_from_hf_directory

__all__ = ["load_hf", "HF_WEIGHT_CHOICES"]

#: Accepted values of ``load_hf(weights=...)``.
HF_WEIGHT_CHOICES = ("auto",) + WEIGHT_DTYPES

_ST_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
# A safetensors header is JSON text: even 100k tensors stay far below this.
_MAX_HEADER = 100 << 20
# Largest magnitude each conversion target holds: f16 values, and the f16 scales of the
# quantized blocks (q8_0 d = amax / 127, q4_0 d = amax / 8, q4_1 m = min).
_CONVERT_LIMIT = {"f16": 65504.0, "q8_0": 65504.0 * 127, "q4_0": 65504.0 * 8, "q4_1": 65504.0}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_gate_up",  # (Phi-3's fused matrices)
}
# Gemma 2 and 3: four norms per layer: post_attention_layernorm is the attention output's.
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_BIASED = ("attn_q", "attn_k", "attn_v")  # Qwen2's biases


def _canonical(hf_name: str, gemma: bool = False) -> str | None:
    """Canonical name of a Hugging Face tensor name (``formats.base``), or None if unknown."""
    top = {"model.embed_tokens.weight": "token_embd", "lm_head.weight": "output",
           "model.norm.weight": "output_norm"}
    if hf_name in top:
        return top[hf_name]
    names = _GEMMA_LAYER_NAMES if gemma else _LAYER_NAMES
    m = _LAYER_RE.fullmatch(hf_name)
    if not m or m.group(2) not in names:
        return None
    name = f"blk.{int(m.group(1))}.{names[m.group(2)]}"
    if m.group(3) == "bias":
        return name + ".bias" if names[m.group(2)] in _BIASED else None
    return name


class _SafetensorsFile:
    """One ``.safetensors`` file: the validated header and a read-only map of the data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{path}: file is truncated ({size} bytes, no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise FormatError(f"{path}: header claims {n} bytes, but the file has {size} "
                                      f"(limit {_MAX_HEADER}): truncated or not safetensors")
                raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e}") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: the safetensors header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise FormatError(f"{path}: the safetensors header is not a JSON object")
        self.data_start, self.size = 8 + n, size
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = self._check(name, entry)
        self._map: np.memmap | None = None

    def _check(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, after checking it against the file."""
        bad = FormatError(f"{self.path}: tensor {name}: malformed header entry {entry!r}")
        if not isinstance(entry, dict):
            raise bad
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad
        if dtype not in _ST_DTYPES:
            raise FormatError(f"{self.path}: tensor {name} has dtype {dtype}, which is not supported "
                              f"(supported: {', '.join(_ST_DTYPES)})")
        itemsize = np.dtype(_ST_DTYPES[dtype][1]).itemsize
        nbytes = int(np.prod(shape, dtype=object)) * itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FormatError(f"{self.path}: tensor {name} of shape {shape} in {dtype} needs {nbytes} "
                              f"bytes, its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        if self.data_start + offsets[1] > self.size:
            raise FormatError(f"{self.path}: tensor {name} ends at byte {self.data_start + offsets[1]}, "
                              f"past the end of the file ({self.size} bytes): file is truncated")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def tensor(self, name: str) -> tuple[str, np.ndarray]:
        """(weight dtype, read-only array view) of ``name``; bf16 as uint16 bit patterns."""
        dtype, shape, begin, end = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        wdtype, np_dtype = _ST_DTYPES[dtype]
        raw = self._map[self.data_start + begin:self.data_start + end]
        return wdtype, raw.view(np_dtype).reshape(shape)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FormatError(f"{path.parent}: missing {path.name}")
    return read_json_object(path)


_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "smollm3": "SmolLM3ForCausalLM"}
_ARCH_OF = {"gemma3_text": "gemma3"}  # model_type -> our architecture name, where they differ


def _hf_arch(cfg: dict[str, Any], path: Path) -> str:
    """Our architecture name (``config.ARCHITECTURES``) for the model_type or class of
    _HF_CLASSES a config.json names."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = next((a for a, c in _HF_CLASSES.items() if model_type == a or c in archs), None)
    if arch is None:
        raise FormatError(f"{path}: model_type {model_type!r} / architectures {archs} is not a "
                          f"LLaMA, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 or SmolLM3 model (model_type "
                          f"{' / '.join(map(repr, _HF_CLASSES))}, {' / '.join(_HF_CLASSES.values())})")
    return _ARCH_OF.get(arch, arch)


def _config(cfg: dict[str, Any], path: Path, has_lm_head: bool, arch: str) -> tuple[LlamaConfig, np.ndarray | None]:
    """LlamaConfig from a parsed config.json of architecture ``arch`` (:func:`_hf_arch`), and
    the RoPE frequency divisors of "llama3" or "linear" scaling (None without it); every
    problem names the key.

    The LM head is tied when config.json says so or the checkpoint has no ``lm_head``.
    """

    def get(key: str, kind: type | tuple[type, ...], default: Any = ..., *, src: dict = cfg) -> Any:
        if key not in src or src[key] is None:
            if default is ...:
                raise FormatError(f"{path}: missing key {key!r}")
            return default
        value = src[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise FormatError(f"{path}: {key} = {value!r} has the wrong type "
                              f"(expected {getattr(kind, '__name__', 'a number')})")
        return value

    gemma = arch in ("gemma2", "gemma3")
    act = get("hidden_activation", str, None) or get("hidden_act", str, "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise FormatError(f"{path}: activation {act!r} is not supported "
                          f"(only {'gelu_pytorch_tanh' if gemma else 'silu'!r} for this model type)")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window", "use_bidirectional_attention"):
        if get(flag, bool, False):
            raise FormatError(f"{path}: {flag} = true is not supported")
    # transformers >= 5 nests RoPE settings in rope_parameters; older files use top-level keys.
    rope = get("rope_parameters", dict, {})
    extra: dict[str, Any] = {}
    if gemma:
        rope, extra = _gemma(cfg, path, get, rope, arch)
    if arch == "phi3":  # (transformers >= 5 keeps partial_rotary_factor in rope_parameters)
        partial = get("partial_rotary_factor", (int, float), get("partial_rotary_factor", (int, float), 1.0, src=rope))
        if partial != 1.0:
            raise FormatError(f"{path}: partial_rotary_factor {partial!r} (partial rotary embeddings) is not "
                              f"supported")
        window = get("sliding_window", int, 0)  # (transformers applies it in every layer)
        if 0 < window < get("max_position_embeddings", int, 2048):  # (a larger one changes nothing)
            extra = dict(sliding_window=window, sliding_window_pattern=0)
    if arch == "smollm3":  # NoPE: no_rope_layers[i] 0 for a layer without RoPE, every n-th one
        uses = get("no_rope_layers", list, None)
        n_layers = get("num_hidden_layers", int)
        interval = get("no_rope_layer_interval", int, 4)
        if uses is None:
            uses = [int((i + 1) % interval != 0) for i in range(n_layers)]
        nopes = [i for i, u in enumerate(uses) if not u]
        interval = nopes[0] + 1 if nopes else 0
        if [int(interval == 0 or (i + 1) % interval != 0) for i in range(n_layers)] != [int(bool(u)) for u in uses]:
            raise FormatError(f"{path}: no_rope_layers {uses} is not one layer without RoPE every n: not supported")
        extra = dict(nope_interval=interval)
    scaling = get("rope_scaling", dict, {}) or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", None, "llama3", "linear", "longrope"):
        raise FormatError(f"{path}: RoPE scaling {rope_type!r} is not supported")
    longrope = None
    if rope_type == "longrope":
        if extra.get("sliding_window"):
            raise FormatError(f"{path}: LongRoPE with a sliding window is not supported")
        longrope, fields = _longrope(cfg, path, get, scaling)
        extra = {**extra, **fields}
    for key in _LLAMA3_KEYS if rope_type == "llama3" else ("factor",) if rope_type == "linear" else ():
        get(key, (int, float), src=scaling)
    if rope_type == "linear" and not scaling["factor"] > 0:
        raise FormatError(f"{path}: RoPE scaling factor {scaling['factor']!r} must be positive")
    theta = get("rope_theta", (int, float), src=rope) if "rope_theta" in rope \
        else get("rope_theta", (int, float), 10000.0)
    eos = get("eos_token_id", (int, list), [])
    eos = [eos] if isinstance(eos, int) else eos
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        raise FormatError(f"{path}: eos_token_id = {eos!r} must be an int or a list of ints")
    heads = get("num_attention_heads", int)
    try:
        config = LlamaConfig(
            vocab_size=get("vocab_size", int),
            hidden_size=get("hidden_size", int),
            intermediate_size=get("intermediate_size", int),
            num_layers=get("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", int, heads),
            head_dim=get("head_dim", int, 0),
            rope_theta=float(theta),
            rms_norm_eps=float(get("rms_norm_eps", (int, float), 1e-6)),
            max_context=get("max_position_embeddings", int, 2048),
            tie_word_embeddings=get("tie_word_embeddings", bool, False) or not has_lm_head,
            bos_token_id=get("bos_token_id", int, None),
            eos_token_ids=tuple(eos),
            architecture=arch,
            **ARCHITECTURES[arch],
            **extra,
            rope_freq_factors=rope_type in ("llama3", "linear", "longrope"),
        )
    except FormatError:
        raise  # (a key's own message already names the file)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from e
    if longrope is not None:
        if longrope.shape[1] != config.head_dim // 2:
            raise FormatError(f"{path}: LongRoPE short_factor has {longrope.shape[1]} entries, expected "
                              f"{config.head_dim // 2} (head_dim / 2)")
        return config, longrope
    if rope_type == "linear":  # positions divided by the factor: every frequency divided by it
        return config, np.full(config.head_dim // 2, float(scaling["factor"]), dtype=np.float32)
    if rope_type != "llama3":
        return config, None
    return config, llama3_rope_factors(config.rope_theta, config.head_dim,
                                       *(float(scaling[k]) for k in _LLAMA3_KEYS))


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _longrope(cfg: dict[str, Any], path: Path, get: Any, scaling: dict) -> tuple[np.ndarray, dict[str, Any]]:
    """LongRoPE (Phi-3 128k, Phi-3.5) as transformers computes it: short and long factors (RoPE
    frequency divisors; transformers takes the long ones once a sequence outgrows the original
    context, the engine for a context larger than it, as llama.cpp does), and the attention
    factor on cos and sin (given, or sqrt(1 + ln(factor) / ln(original)) with factor =
    max_position_embeddings / original when above 1). Returns ([short, long] factors,
    LlamaConfig fields)."""
    original = get("original_max_position_embeddings", int, None, src=scaling) or \
        get("original_max_position_embeddings", int)
    short = scaling.get("short_factor")
    if not (isinstance(short, list) and short and all(isinstance(f, (int, float)) and f > 0 for f in short)):
        raise FormatError(f"{path}: LongRoPE short_factor must be a list of positive numbers, got {short!r}")
    factor = get("factor", (int, float), None, src=scaling) or get("max_position_embeddings", int) / original
    attn = get("attention_factor", (int, float), None, src=scaling)
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = scaling.get("long_factor")
    if not (isinstance(long, list) and len(long) == len(short) and all(isinstance(f, (int, float)) and f > 0
                                                                        for f in long)):
        raise FormatError(f"{path}: LongRoPE long_factor must be a list of {len(short)} positive numbers, got {long!r}")
    return np.asarray([short, long], dtype=np.float32), dict(rope_attn_factor=float(attn), rope_long_context=original)


def _gemma(cfg: dict[str, Any], path: Path, get: Any, rope: dict, arch: str) -> tuple[dict, dict[str, Any]]:
    """Gemma 2's and 3's keys: the global layers' RoPE parameters (what LLaMA's keys would
    say) and the LlamaConfig fields of the local layers, the score scale (query_pre_attn_scalar)
    and the soft-capping (with transformers' defaults: on for Gemma 2, off for Gemma 3, whose
    scores are never capped, as in transformers). Refuses
    what the engine does not run: a layer pattern other than one global layer every n."""
    extra: dict[str, Any] = {}
    head_dim = get("head_dim", int, 0) or get("hidden_size", int) // get("num_attention_heads", int)
    scalar = get("query_pre_attn_scalar", (int, float), 256)  # (transformers' default)
    if not 0 < scalar < float("inf"):
        raise FormatError(f"{path}: query_pre_attn_scalar {scalar!r} must be a positive number")
    if scalar != head_dim:  # (the 27B models)
        extra["query_pre_attn_scalar"] = float(scalar)
    defaults = (50.0, 30.0) if arch == "gemma2" else (None, None)  # (transformers': Gemma 3 has none)
    for key, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), defaults):
        value = cfg.get(key, default)  # (null: off)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and value > 0):
            raise FormatError(f"{path}: {key} = {value!r} must be a positive number or null")
        if arch == "gemma3" and key == "attn_logit_softcapping":
            continue  # (transformers' Gemma 3 keeps the key but never caps the scores)
        extra[key] = float(value or 0.0)
    n_layers = get("num_hidden_layers", int)
    kinds = get("layer_types", list, None)
    if kinds is None:  # (transformers < 4.53: a pattern instead of the list; Gemma 2 alternates)
        pattern = get("sliding_window_pattern", int, 6) if arch == "gemma3" else 2
    else:
        pattern = next((i + 1 for i, k in enumerate(kinds) if k == "full_attention"), 0)
        want = ["sliding_attention" if pattern == 0 or (i + 1) % pattern else "full_attention"
                for i in range(n_layers)]
        if kinds != want:
            raise FormatError(f"{path}: layer_types {kinds} are not one global layer every n: not supported")
    if "full_attention" in rope or "sliding_attention" in rope:  # transformers >= 5: per layer type
        local, glob = rope.get("sliding_attention", {}), rope.get("full_attention", {})
        if local.get("rope_type", "default") != "default":
            raise FormatError(f"{path}: RoPE scaling of the local layers is not supported")
        local_theta = local.get("rope_theta", 10000.0)
    elif arch == "gemma3":
        local_theta, glob = get("rope_local_base_freq", (int, float), 10000.0), rope
    else:  # Gemma 2: one RoPE base
        local_theta, glob = 0.0, rope
    return glob, dict(extra, sliding_window=get("sliding_window", int), sliding_window_pattern=pattern,
                      rope_theta_local=float(local_theta))


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """LLaMA 3.1's RoPE scaling as per-frequency divisors (llama.cpp's ``rope_freqs``):
    frequencies whose wavelength is under ``original / high_freq_factor`` positions keep 1,
    those over ``original / low_freq_factor`` are divided by ``factor``, and the ones between
    blend the two, ``1 / ((1 - s) / factor + s)`` with ``s = (original / wavelength -
    low_freq_factor) / (high_freq_factor - low_freq_factor)``. Returns float32 [Dh/2]."""
    inv_freq = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = np.where(wavelen < high_wavelen, 1.0,
                   np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _open_weights(directory: Path) -> dict[str, _SafetensorsFile]:
    """Tensor name -> the (header-checked) safetensors file holding it."""
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{index_path}: 'weight_map' must map tensor names to file names")
        shards: dict[str, _SafetensorsFile] = {}
        for file in sorted(set(weight_map.values())):
            if Path(file).name != file:
                raise FormatError(f"{index_path}: shard {file!r} is not a file name in the directory")
            if not (directory / file).is_file():
                raise FormatError(f"{directory}: missing weight shard {file}")
            shards[file] = _SafetensorsFile(directory / file)
        for name, file in weight_map.items():
            if name not in shards[file].entries:
                raise FormatError(f"{shards[file].path}: tensor {name} is listed in the index but not in the file")
        return {name: shards[file] for name, file in weight_map.items()}
    if single.is_file():
        st = _SafetensorsFile(single)
        return {name: st for name in st.entries}
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(found)}: only safetensors are read)" if found else ""
    raise FormatError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _as_f32(dtype: str, data: np.ndarray) -> np.ndarray:
    if dtype == "bf16":  # bf16 is the top half of a float32
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def _convert(dtype: str, data: np.ndarray, target: str) -> Weight:
    """A matrix in ``target`` storage, made from a float32 copy of ``data`` (one matrix at a time)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if target == dtype:
        return Weight(dtype, data.shape, data)
    rows, cols = data.shape
    if target in ("q8_0", "q4_0", "q4_1"):
        row_nbytes(target, cols)  # raises on a column count that is not a multiple of 32
    f32 = _as_f32(dtype, data)
    limit = _CONVERT_LIMIT.get(target)
    if limit is not None:
        # NaN, inf or a value past the range would be stored as inf / NaN without a word.
        amax = float(np.max(np.abs(f32)))
        if not amax <= limit:
            raise ValueError(f"it holds values of magnitude {amax:g}, which {target} cannot store "
                             f"(limit {limit:g})")
    if target == "f32":
        out = f32
    elif target == "f16":
        out = f32.astype(np.float16)
    elif target == "bf16":
        out = quants.quantize(f32, Q.BF16).view(np.uint16)  # round to nearest even, NaN kept
    else:
        # A block whose range is below float32's normal range overflows 1/d inside the
        # quantizer; its f16 scale rounds to 0, so it is stored as its offset (error < range).
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            out = quants.quantize(f32, {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[target])
    return Weight(target, (rows, cols), out)


def load_hf(directory: str | Path, weights: str = "auto") -> ModelSource:
    """Loads a Hugging Face LLaMA checkpoint directory.

    Args:
        directory: holds config.json, model.safetensors (or shards and their index) and
            tokenizer.json or tokenizer.model.
        weights: storage of the matrices, one of :data:`HF_WEIGHT_CHOICES` (see module doc).

    Returns:
        ModelSource with weights under canonical names; matrices ``[out, in]``, norms f32.
        The LM head is tied (no ``output`` weight) when config.json says
        ``tie_word_embeddings`` or the checkpoint has no ``lm_head.weight``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        FormatError: missing or malformed files, a non-LLaMA model, unsupported dtypes,
            missing tensors or wrong shapes.
        ValueError: an unknown ``weights`` choice.
    """
    if weights not in HF_WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {HF_WEIGHT_CHOICES}, got {weights!r}")
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"no such model directory: {directory}")
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory (a Hugging Face checkpoint is a directory)")
    config_path = directory / "config.json"
    raw_cfg = _read_json(config_path)

    arch = _hf_arch(raw_cfg, config_path)
    gemma = arch in ("gemma2", "gemma3")
    by_name: dict[str, tuple[str, _SafetensorsFile]] = {}  # canonical -> (hf name, file)
    for hf_name, st in _open_weights(directory).items():
        canonical = _canonical(hf_name, gemma)
        if canonical is None:
            if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
                continue
            raise FormatError(f"{st.path}: unexpected tensor {hf_name} (not part of a plain LLaMA, Qwen2, "
                              f"Qwen3, Gemma 2, Gemma 3, Phi-3 or SmolLM3 model)")
        by_name[canonical] = (hf_name, st)

    cfg, rope_factors = _config(raw_cfg, config_path, has_lm_head="output" in by_name, arch=arch)
    if cfg.tie_word_embeddings:
        by_name.pop("output", None)  # transformers ignores a saved lm_head when tied

    per_layer = stored_tensors_per_layer(cfg)
    if cfg.num_layers * per_layer > len(by_name):  # before stored_weight_shapes() builds the names per layer
        raise FormatError(f"{config_path}: num_hidden_layers = {cfg.num_layers} needs {cfg.num_layers * per_layer} "
                          f"layer tensors, the checkpoint has {len(by_name)} tensors")
    expected = stored_weight_shapes(cfg)
    extra = [by_name[n] for n in by_name if n not in expected]
    if extra:  # a bias in a LLaMA checkpoint
        raise FormatError(f"{extra[0][1].path}: unexpected tensor {extra[0][0]} (not part of a plain "
                          f"{cfg.architecture} model)")
    computed = {"rope_freqs", "rope_freqs_long"}  # from config.json, not checkpoint tensors
    missing = [n for n in expected if n not in by_name and n not in computed]
    if missing:
        raise FormatError(f"{directory}: missing tensors for {', '.join(missing[:5])}"
                          f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    loaded: dict[str, Weight] = {}
    for name, shape in expected.items():
        if name in computed:
            continue
        hf_name, st = by_name[name]
        dtype, data = st.tensor(hf_name)
        if data.shape != shape:
            raise FormatError(f"{st.path}: tensor {hf_name} has shape {list(data.shape)}, expected {list(shape)}")
        try:
            if len(shape) == 1:
                vec = _as_f32(dtype, data) if dtype != "f32" else data
                if gemma and "norm" in name:  # Gemma's RMSNorms scale by 1 + w, as GGUF files store them
                    vec = (vec + np.float32(1)).astype(np.float32)
                loaded[name] = Weight("f32", shape, vec)
            else:
                loaded[name] = _convert(dtype, data, dtype if weights == "auto" else weights)
        except ValueError as e:
            raise FormatError(f"{st.path}: tensor {hf_name}: cannot store as {weights}: {e}") from e

    unfuse(loaded, cfg)
    if cfg.rope_long_context:  # LongRoPE: [short, long]
        loaded["rope_freqs_long"] = Weight("f32", expected["rope_freqs_long"], rope_factors[1])
        rope_factors = rope_factors[0]
    if cfg.rope_freq_factors:
        loaded["rope_freqs"] = Weight("f32", expected["rope_freqs"], rope_factors)
    tokenizer = tokenizer_from_hf_directory(directory, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
    return ModelSource(config=cfg, weights=loaded, tokenizer=tokenizer,
                       chat_template=tokenizer.chat_template, name=directory.name, path=str(directory),
                       metadata={"format": "hf", "weights": weights,
                                 "torch_dtype": raw_cfg.get("dtype", raw_cfg.get("torch_dtype"))})
