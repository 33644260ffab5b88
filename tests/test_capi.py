"""The C API (include/dovetail/dovetail.h, libdovetail).

- examples/c/greedy.c, compiled by the system C compiler (and as C++) with -Wall -Wextra
  -pedantic -Werror against the header and library that get_include()/get_library()
  find, prints the same greedy ids as dovetail_ext.load() on the default model.
- Through ctypes, the library's target and draft engines give the same results as the
  Python binding's on tiny random models (the same kernels run: bitwise when both come
  from one build, up to float32 rounding when the library was compiled apart, e.g. with
  sanitizers).
- Bad arguments (NULL handles, bad dtypes, shapes, sizes, rows, ancestors, configs) return
  the documented error code with a message naming the problem, and leave the engine usable.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import dovetail_ext
from dovetail_ext import _core, capi
from dovetail_ext.quant import quantize
from dovetail_ext.tree import TreeParams
from native_helpers import random_weights, tiny_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "c" / "greedy.c"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
STRICT = ["-Wall", "-Wextra", "-pedantic", "-Werror"]


# ---- locating the library, the header and a compiler -------------------------------------

@pytest.fixture(scope="module")
def library() -> Path:
    try:
        return capi.get_library()
    except FileNotFoundError as e:
        if capi._source_root() is None:
            raise  # an installed package must carry its library
        pytest.skip(f"libdovetail is not built in this source checkout: {e}")


@pytest.fixture(scope="module")
def include() -> Path:
    return capi.get_include()


def _tool(env: str, *names: str) -> str | None:
    """$ENV's program, else the first of `names` on PATH."""
    cmd = os.environ.get(env)
    return next((p for p in map(shutil.which, [cmd.split()[0]] if cmd else names) if p), None)


@pytest.fixture(scope="module")
def cc() -> str:
    path = _tool("CC", "cc", "gcc", "clang")
    if path is None:
        pytest.skip("no C compiler on PATH (cc, gcc or clang; or set CC)")
    return path


def _build(compiler: str, args: list[str], include: Path, library: Path, out: Path) -> Path:
    cmd = [compiler, *args, str(EXAMPLE), f"-I{include}", f"-L{library.parent}",
           f"-Wl,-rpath,{library.parent}", "-ldovetail", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return out


@pytest.fixture(scope="module")
def greedy_bin(cc, include, library, tmp_path_factory) -> Path:
    return _build(cc, ["-std=c99", "-O2", *STRICT], include, library, tmp_path_factory.mktemp("capi") / "greedy")


@pytest.fixture(scope="module")
def c_weights(default_gguf_path, tmp_path_factory) -> Path:
    return capi.export_c_weights(tmp_path_factory.mktemp("capi") / "smollm2.dtw", default_gguf_path)


@pytest.fixture(scope="module")
def c_draft_weights(default_gguf_path, tmp_path_factory) -> Path:
    return capi.export_c_draft(tmp_path_factory.mktemp("capi") / "smollm2-draft.dtw", default_gguf_path)


@pytest.fixture(scope="module")
def c_corpus(default_gguf_path, tmp_path_factory) -> Path:
    return capi.export_c_corpus(tmp_path_factory.mktemp("capi") / "smollm2-corpus.dtw", default_gguf_path)


@pytest.fixture(scope="module")
def generator(default_gguf_path):
    return dovetail_ext.load(default_gguf_path, threads=1)


def test_get_library_honours_env(library, monkeypatch, tmp_path):
    monkeypatch.setenv(capi.LIBRARY_ENV, str(library))
    assert capi.get_library() == library.resolve()
    monkeypatch.setenv(capi.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match=capi.LIBRARY_ENV):
        capi.get_library()


def test_header_version_matches_package(include, library):
    text = (include / "dovetail" / "dovetail.h").read_text()
    parts = [re.search(rf"#define DT_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    assert ".".join(parts) == dovetail_ext.__version__
    lib = CApi(library)
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    s = lib.dt_version_string(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    assert s.decode() == dovetail_ext.__version__ == f"{major.value}.{minor.value}.{patch.value}"


# ---- the C example against the Python API ------------------------------------------------

def test_example_builds_as_cpp(include, library, tmp_path):
    cxx = _tool("CXX", "c++", "g++", "clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH (c++, g++ or clang++; or set CXX)")
    exe = _build(cxx, ["-x", "c++", "-std=c++17", "-O1", *STRICT], include, library, tmp_path / "greedy_cpp")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("prompt", PROMPTS)
def test_example_greedy_matches_python(greedy_bin, c_weights, generator, prompt):
    ids = generator.encode_prompt(prompt, raw=True)
    want = generator.generate(prompt, raw=True, max_new_tokens=12)
    r = subprocess.run([str(greedy_bin), str(c_weights), "12", *map(str, ids)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    got = [int(t) for t in r.stdout.split()]
    assert got == want.tokens, (f"C example {got} != dovetail_ext {want.tokens} (stop: {want.stats.stop_reason}); "
                                f"libdovetail and _core must be built from the same sources")
    assert len(got) == 12 or want.stats.stop_reason == "eos"


@pytest.mark.parametrize("lookup", ["1", "0"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_example_speculative_matches_python(greedy_bin, c_weights, c_draft_weights, generator, prompt, lookup):
    """greedy -d DRAFT: the shipped draft exported to the container, speculative steps
    through dt_speculator_step, with prompt lookup (the default) and without (-l 0); the
    same ids as greedy decoding in Python."""
    ids = generator.encode_prompt(prompt, raw=True)
    want = generator.generate(prompt, raw=True, max_new_tokens=24, speculative=False)
    r = subprocess.run([str(greedy_bin), "-d", str(c_draft_weights), "-l", lookup, str(c_weights), "24",
                        *map(str, ids)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == want.tokens
    steps, per_step = re.search(r"(\d+) speculative steps, ([\d.]+) tokens per step", r.stderr).groups()
    assert 0 < int(steps) < len(want.tokens) and float(per_step) > 1.0  # drafted tokens were accepted


@pytest.mark.parametrize("prompt", PROMPTS)
def test_example_corpus_matches_python(greedy_bin, c_weights, c_draft_weights, c_corpus, generator, prompt):
    """greedy -d DRAFT -c CORPUS: the shipped corpus exported to the container and set with
    dt_speculator_set_corpus; the same ids as greedy decoding in Python."""
    from dovetail_ext.lookup import TokenCorpus
    from dovetail_ext.models import packaged_corpus_for
    ids = generator.encode_prompt(prompt, raw=True)
    want = generator.generate(prompt, raw=True, max_new_tokens=24, speculative=False)
    r = subprocess.run([str(greedy_bin), "-d", str(c_draft_weights), "-c", str(c_corpus), str(c_weights), "24",
                        *map(str, ids)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == want.tokens
    shipped = TokenCorpus.load(packaged_corpus_for(generator.source))
    assert f"corpus of {len(shipped)} tokens" in r.stderr


def test_example_refuses_a_container_without_a_corpus(greedy_bin, c_weights, c_draft_weights):
    r = subprocess.run([str(greedy_bin), "-d", str(c_draft_weights), "-c", str(c_draft_weights), str(c_weights),
                        "4", "1", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "not a corpus container" in r.stderr, r.stderr


def test_example_threads_and_chunked_prefill(greedy_bin, c_weights, generator):
    # 2 threads, and a prompt longer than max_batch (128) so that the prefill is chunked.
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    ids = generator.encode_prompt(prompt, raw=True)
    assert len(ids) > 128
    want = generator.generate(prompt, raw=True, max_new_tokens=6).tokens
    r = subprocess.run([str(greedy_bin), "-t", "2", str(c_weights), "6", *map(str, ids)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == want


def test_example_refuses_bad_input(greedy_bin, c_weights, generator, tmp_path):
    truncated = tmp_path / "truncated.dtw"
    with open(c_weights, "rb") as f:
        truncated.write_bytes(f.read(5000))
    for args, code, message in [
        (["-d", str(truncated), str(c_weights), "4", "1", "2"], 1, "not a valid weight container"),
        (["-d", str(c_weights), str(c_weights), "4", "1", "2"], 1, "dt_draft_create"),  # a target, not a draft
        ([str(truncated), "4", "1", "2"], 1, "not a valid weight container"),
        ([str(tmp_path / "missing.dtw"), "4", "1"], 1, "missing.dtw"),
        ([str(c_weights), "4", "1", "x"], 2, "not a non-negative integer"),
        ([str(c_weights), "4", "99999999"], 1, "DT_ERR_INVALID: dt_target_forward: token id 99999999"),
        ([str(c_weights), "9999999", "1"], 2, "exceed the model's context"),
        (["-l", "2", str(c_weights), "4", "1"], 2, "-l takes 0"),
        (["-c", str(c_weights), str(c_weights), "4", "1"], 2, "-c needs a draft"),
        (["-d", str(c_weights), "-l", "0", "-c", str(c_weights), str(c_weights), "4", "1"], 2, "-c needs a draft"),
    ]:
        r = subprocess.run([str(greedy_bin), *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr)


def test_export_cli_reports_a_missing_model(tmp_path, capsys):
    from dovetail_ext.export_c_weights import main
    assert main([str(tmp_path / "out.dtw"), "--model", str(tmp_path / "missing.gguf")]) == 1
    assert "missing.gguf" in capsys.readouterr().err
    assert not (tmp_path / "out.dtw").exists()


def test_export_cli_writes_nothing_it_cannot_finish(tmp_path, capsys, llama_gguf_writer, monkeypatch):
    """Every input is read and checked before anything is written: a draft that cannot be
    had leaves no target file; the model itself, a directory, the same file twice, or
    --draft without --draft-out are refused; a write that fails leaves no .tmp file."""
    from dovetail_ext.export_c_weights import main
    model = tmp_path / "m.gguf"
    llama_gguf_writer(model, dtype="f32")
    out = tmp_path / "o.dtw"
    for args, msg in [([str(out), "--draft-out", str(tmp_path / "d.dtw")], "no draft ships for"),
                      ([str(model)], "is the model itself"), ([str(tmp_path)], "not a file name"),
                      ([str(out), "--draft-out", str(out)], "is another output file too"),
                      ([str(out), "--corpus-out", str(out)], "is another output file too"),
                      ([str(out), "--draft", str(tmp_path)], "give --draft-out FILE too"),
                      ([str(out), "--corpus", str(tmp_path)], "give --corpus-out FILE too"),
                      ([str(out), "--corpus-out", str(tmp_path / "c.dtw")], "no corpus ships for"),
                      ([str(model / "x.dtw")], "cannot write")]:
        assert main([*args, "--model", str(model)]) == 1, args
        assert msg in capsys.readouterr().err, args
        assert not out.exists() and model.read_bytes()[:4] == b"GGUF"
    assert not list(tmp_path.glob("*.tmp"))

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(capi.os, "replace", full)  # (the .tmp file is whole by then)
    assert main([str(out), "--model", str(model)]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("arch", ["gemma3", "phi3", "gemma2", "smollm3"])
def test_example_runs_gemma_and_longrope_containers(greedy_bin, tmp_path, llama_gguf_writer, arch):
    """Through export_c_weights and the C example, the greedy tokens are the Python engine's:
    a Gemma 3 GGUF (sliding window 4, linear RoPE scaling), whose container fields reach
    dt_target_create; a Gemma 2 GGUF with its soft-capping; a Phi-3 LongRoPE GGUF, written
    with its short factors, its attention factor and its original context as the
    container's max_context."""
    from gguf import RopeScalingType

    from dovetail_ext.formats import load_gguf
    from dovetail_ext.target import TargetEngine
    path = tmp_path / "g.gguf"
    if arch == "gemma3":
        llama_gguf_writer(path, arch="gemma3", dtype="q8_0", hidden=64, n_head=4, n_kv=1, n_layers=7, meta=lambda w: (
            w.add_sliding_window(4), w.add_rope_scaling_type(RopeScalingType.LINEAR), w.add_rope_scaling_factor(2.0)))
    elif arch == "smollm3":
        llama_gguf_writer(path, arch="smollm3", dtype="q8_0", n_layers=4)
    elif arch == "gemma2":
        llama_gguf_writer(path, arch="gemma2", dtype="q8_0", n_layers=3, meta=lambda w: (
            w.add_sliding_window(4), w.add_float32("gemma2.attn_logit_softcapping", 0.05),
            w.add_float32("gemma2.final_logit_softcapping", 0.5)))
    else:
        llama_gguf_writer(path, arch="phi3", dtype="q8_0", tied=False, n_layers=3,
                          meta=lambda w: (w.add_rope_scaling_attn_factors(1.5), w.add_rope_scaling_orig_ctx_len(48)),
                          shapes={"rope_factors_short": (8,), "rope_factors_long": (8,)})
    out = capi.export_c_weights(tmp_path / "g.dtw", path)
    head = out.read_bytes()
    assert head[8:12] == (3).to_bytes(4, "little")
    if arch == "phi3":
        assert int.from_bytes(head[88:96], "little") == 48 and np.frombuffer(head[164:168], np.float32)[0] == 1.5
    ids = [1, 5, 9, 17, 33, 2, 8, 40, 3]
    r = subprocess.run([str(greedy_bin), str(out), "10", *map(str, ids)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    eng = TargetEngine(load_gguf(path), context=32, threads=1)
    lg, _ = eng.forward(ids); eng.commit()
    want = []
    while len(want) < 10:
        want.append(int(lg[0].argmax()))
        lg, _ = eng.forward(want[-1:]); eng.commit()
    got = [int(t) for t in r.stdout.split()]
    assert got == want[:len(got)] and (len(got) == 10 or got[-1] in eng.source.config.eos_token_ids), (got, want)


def test_export_cli_writes_the_draft(default_gguf_path, tmp_path, capsys):
    from dovetail_ext.export_c_weights import main
    out, draft = tmp_path / "t.dtw", tmp_path / "d.dtw"
    assert main([str(out), "--model", str(default_gguf_path), "--draft-out", str(draft)]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(draft)]
    assert draft.read_bytes()[:8] == capi.C_WEIGHTS_MAGIC and b"vocab_map" in draft.read_bytes()[:4096]
    assert main([str(out), "--model", str(default_gguf_path), "--draft-out", str(draft),
                 "--draft", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


# ---- ctypes view of the API --------------------------------------------------------------

class Weight(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4), ("data", ctypes.c_void_p), ("nbytes", ctypes.c_uint64)]


_DIMS = ["hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"]
_OPTS = [("rope_theta", ctypes.c_float), ("rms_norm_eps", ctypes.c_float), ("context", ctypes.c_int64),
         ("max_batch", ctypes.c_int64), ("threads", ctypes.c_int32), ("kv_dtype", ctypes.c_int32)]


class TargetConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("vocab_size", ctypes.c_int64),
                *[(n, ctypes.c_int64) for n in _DIMS], *_OPTS,
                ("activation", ctypes.c_int32), ("scale_embeddings", ctypes.c_int32),
                ("sliding_window", ctypes.c_int64), ("sliding_window_pattern", ctypes.c_int64),
                ("rope_theta_local", ctypes.c_float), ("rope_attn_factor", ctypes.c_float),
                ("query_pre_attn_scalar", ctypes.c_float), ("attn_logit_softcapping", ctypes.c_float),
                ("final_logit_softcapping", ctypes.c_float), ("nope_interval", ctypes.c_int64)]


class TreeShape(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("top_k", ctypes.c_int64), ("depth", ctypes.c_int64),
                ("total_tokens", ctypes.c_int64), ("min_prob", ctypes.c_double)]


class LookupParams(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("min_n", ctypes.c_int64), ("max_n", ctypes.c_int64),
                ("max_tokens", ctypes.c_int64)]


class CorpusParams(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("min_n", ctypes.c_int64), ("max_n", ctypes.c_int64),
                ("max_tokens", ctypes.c_int64), ("min_count", ctypes.c_int64), ("min_frac", ctypes.c_double)]


class DraftConfig(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), *[(n, ctypes.c_int64) for n in _DIMS], *_OPTS]


def _status_codes() -> dict[str, int]:
    text = (REPO / "include" / "dovetail" / "dovetail.h").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(DT_(?:OK|ERR_\w+)) = (\d+)", text)}


ST = _status_codes()
P = ctypes.c_void_p
I64P, I32P, F32P, U8P = (ctypes.POINTER(t) for t in (ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_uint8))


def ptr(a: np.ndarray | None, ctype=P):
    return None if a is None else a.ctypes.data_as(ctype)


class CApi:
    """libdovetail through ctypes (the GIL is released during each call)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        i64, i32, sz = ctypes.c_int64, ctypes.c_int32, ctypes.c_size_t
        sigs = {
            "dt_last_error": ([], ctypes.c_char_p),
            "dt_status_name": ([ctypes.c_int], ctypes.c_char_p),
            "dt_version_string": ([P, P, P], ctypes.c_char_p),
            "dt_target_config_init": ([P], None),
            "dt_target_create": ([P, P, sz, P], ctypes.c_int),
            "dt_target_forward": ([P, I32P, I32P, i64, U8P, I64P, i64, F32P, I64P, i64, F32P], ctypes.c_int),
            "dt_target_commit": ([P, I64P, i64], ctypes.c_int),
            "dt_target_truncate": ([P, i64], ctypes.c_int),
            "dt_target_n_past": ([P, P], ctypes.c_int),
            "dt_target_pending": ([P, P], ctypes.c_int),
            "dt_target_set_threads": ([P, i32], ctypes.c_int),
            "dt_target_destroy": ([P], None),
            "dt_draft_config_init": ([P], None),
            "dt_draft_create": ([P, P, P, sz, I32P, i64, P], ctypes.c_int),
            "dt_draft_forward": ([P, F32P, I32P, I32P, i64, U8P, ctypes.c_int, F32P, I64P, i64, i64, I32P, F32P],
                                 ctypes.c_int),
            "dt_draft_commit": ([P, I64P, i64], ctypes.c_int),
            "dt_draft_truncate": ([P, i64], ctypes.c_int),
            "dt_draft_n_past": ([P, P], ctypes.c_int),
            "dt_draft_pending": ([P, P], ctypes.c_int),
            "dt_draft_set_threads": ([P, i32], ctypes.c_int),
            "dt_draft_destroy": ([P], None),
            "dt_tree_shape_init": ([P], None),
            "dt_speculator_create": ([P, P, P], ctypes.c_int),
            "dt_speculator_step": ([P, F32P, I32P, i64, P, I32P, F32P, P], ctypes.c_int),
            "dt_speculator_destroy": ([P], None),
            "dt_lookup_params_init": ([P], None),
            "dt_speculator_set_lookup": ([P, P], ctypes.c_int),
            "dt_speculator_reset": ([P], ctypes.c_int),
            "dt_corpus_params_init": ([P], None),
            "dt_speculator_set_corpus": ([P, I32P, i64, P], ctypes.c_int),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)

    def error(self) -> str:
        return self.dt_last_error().decode()


def weight_array(weights: dict[str, tuple[str, tuple[int, ...], np.ndarray]]):
    """dt_weight[] over the arrays (kept alive by the returned list)."""
    arr = (Weight * len(weights))()
    keep = []
    for w, (name, (dtype, shape, data)) in zip(arr, weights.items()):
        data = np.ascontiguousarray(data)
        keep.append(data)
        w.name, w.dtype, w.ndim = name.encode(), capi.C_DTYPE_CODES[dtype], len(shape)
        for d, s in enumerate(shape):
            w.shape[d] = s
        w.data, w.nbytes = data.ctypes.data, data.nbytes
    return arr, keep


def tiny_target_weights(dtype="q8_0", tied=False, seed=3, bias=False, rope_factors=False, qk_norm=False, window=0):
    cfg = tiny_config(gqa=3, tied=tied, vocab=301, bias=bias, rope_factors=rope_factors, qk_norm=qk_norm,
                      window=window)
    out = {}
    for name, w in random_weights(cfg, seed=seed).items():
        q = quantize(w, "f32" if w.ndim == 1 else dtype)
        out[name] = (q.dtype, q.shape, np.ascontiguousarray(q.data))
    return cfg, out


def target_config(lib: CApi, cfg, context=64, max_batch=16, threads=1) -> TargetConfig:
    c = TargetConfig()
    lib.dt_target_config_init(ctypes.byref(c))
    c.vocab_size = cfg.vocab_size
    for n, v in zip(_DIMS, (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim)):
        setattr(c, n, v)
    c.rope_theta, c.rms_norm_eps = cfg.rope_theta, cfg.rms_norm_eps
    c.context, c.max_batch, c.threads = context, max_batch, threads
    c.activation, c.scale_embeddings = int(cfg.activation == "gelu_tanh"), int(cfg.scale_embeddings)
    c.sliding_window, c.sliding_window_pattern = cfg.sliding_window, cfg.sliding_window_pattern
    c.rope_theta_local = cfg.rope_theta_local
    c.rope_attn_factor = cfg.rope_attn_factor
    c.query_pre_attn_scalar, c.attn_logit_softcapping = cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping
    c.final_logit_softcapping = cfg.final_logit_softcapping
    c.nope_interval = cfg.nope_interval
    return c


@pytest.fixture(scope="module")
def lib(library) -> CApi:
    return CApi(library)


class CTarget:
    """A dt_target handle with numpy-friendly calls that assert success."""

    def __init__(self, lib: CApi, cfg, weights, **opts) -> None:
        self.lib, self.cfg = lib, cfg
        arr, keep = weight_array(weights)
        self.h = P()
        st = lib.dt_target_create(ctypes.byref(target_config(lib, cfg, **opts)), arr, len(arr), ctypes.byref(self.h))
        assert st == 0, lib.error()
        del keep  # copied by the library

    def forward_status(self, tokens, positions=None, ancestors=None, logit_rows=(), feature_rows=()):
        tokens = np.asarray(tokens, dtype=np.int32)
        pos = None if positions is None else np.asarray(positions, dtype=np.int32)
        anc = None if ancestors is None else np.ascontiguousarray(ancestors, dtype=np.uint8)
        lr, fr = np.asarray(logit_rows, dtype=np.int64), np.asarray(feature_rows, dtype=np.int64)
        logits = np.full((len(lr), self.cfg.vocab_size), np.nan, dtype=np.float32)
        feats = np.full((len(fr), self.cfg.hidden_size), np.nan, dtype=np.float32)
        st = self.lib.dt_target_forward(self.h, ptr(tokens, I32P), ptr(pos, I32P), len(tokens), ptr(anc, U8P),
                                        ptr(lr, I64P), len(lr), ptr(logits, F32P), ptr(fr, I64P), len(fr),
                                        ptr(feats, F32P))
        return st, logits, feats

    def forward(self, *a, **kw):
        st, logits, feats = self.forward_status(*a, **kw)
        assert st == 0, self.lib.error()
        return logits, feats

    def commit(self, kept=None) -> None:
        k = None if kept is None else np.asarray(kept, dtype=np.int64)
        assert self.lib.dt_target_commit(self.h, ptr(k, I64P), 0 if k is None else len(k)) == 0, self.lib.error()

    def n_past(self) -> int:
        v = ctypes.c_int64()
        assert self.lib.dt_target_n_past(self.h, ctypes.byref(v)) == 0
        return v.value

    def close(self) -> None:
        self.lib.dt_target_destroy(self.h)
        self.h = P()


def py_target(cfg, weights, context=64, max_batch=16):
    return _core.LlamaEngine(asdict(cfg), weights, context=context, max_batch=max_batch, threads=1, kv_dtype="f32")


def tree_ancestors(parents) -> np.ndarray:
    T = len(parents)
    anc = np.zeros((T, T), dtype=np.uint8)
    for t in range(T):
        j = t
        while j >= 0:
            anc[t, j] = 1
            j = parents[j]
    return anc


# ---- ctypes: same results as the Python binding ------------------------------------------

def same(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 rounding (see the module doc); wrong positions, ancestors or
    rows would differ by orders of magnitude more."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def same_draft(got, want) -> None:
    """(hidden, top-k ids, top-k log-probs) of two draft calls."""
    same(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    same(got[2], want[2])


@pytest.mark.parametrize("dtype,tied,extra", [("q8_0", False, ""), ("q4_1", True, ""), ("f32", True, ""),
                                             ("q8_0", False, "bias"), ("q4_1", True, "rope_factors"),
                                             ("q8_0", True, "qk_norm"), ("q8_0", True, "gemma3"),
                                             ("q4_1", False, "longrope"), ("q8_0", False, "gemma2"),
                                             ("q8_0", True, "smollm3")])
def test_target_matches_binding(lib, dtype, tied, extra):
    """bias: a Qwen2 model; qk_norm: a Qwen3 model; rope_factors: LLaMA 3.1+ RoPE scaling.
    The C API takes all three as weights (no config flag). gemma3: Gemma 3 (its post norms
    as weights, its gate, embedding scale and windows of 4 in the config's Gemma fields).
    longrope: factors as weights and the attention factor in the config. gemma2: Gemma 2
    (soft-capping and a 27B-like score scale in the config)."""
    cfg, weights = tiny_target_weights(dtype, tied, bias=extra == "bias",
                                       rope_factors=extra in ("rope_factors", "longrope"),
                                       qk_norm=extra == "qk_norm", window=4 if extra in ("gemma3", "gemma2") else 0)
    import dataclasses
    if extra == "longrope":
        cfg = dataclasses.replace(cfg, rope_attn_factor=1.4)
    if extra == "gemma2":
        cfg = dataclasses.replace(cfg, architecture="gemma2", qk_norm=False, sliding_window_pattern=2,
                                  rope_theta_local=0.0, attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
                                  query_pre_attn_scalar=24.0)
        weights = {k: v for k, v in weights.items() if not k.endswith(("attn_q_norm", "attn_k_norm"))}
    if extra == "smollm3":
        cfg = dataclasses.replace(cfg, architecture="smollm3", nope_interval=2)
    c, py = CTarget(lib, cfg, weights), py_target(cfg, weights)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, 9)
    want = py.forward(prompt.astype(np.int32), np.arange(9, dtype=np.int32), None, np.arange(9), np.array([2, 8]))
    got = c.forward(prompt, None, None, np.arange(9), [2, 8])  # positions NULL: n_past + 0..T-1
    same(got[0], want[0])
    same(got[1], want[1])
    c.commit(); py.commit(np.arange(9))
    # A tree of 6 tokens verified at once, then a path of it committed.
    parents = [-1, 0, 0, 1, 3, 2]
    toks, pos = rng.integers(0, cfg.vocab_size, 6), 9 + np.array([0, 1, 1, 2, 3, 2])
    anc = tree_ancestors(parents)
    want = py.forward(toks.astype(np.int32), pos.astype(np.int32), anc.astype(bool), np.arange(6), np.arange(6))
    got = c.forward(toks, pos, anc, np.arange(6), np.arange(6))
    same(got[0], want[0])
    same(got[1], want[1])
    c.commit([0, 1, 3]); py.commit(np.array([0, 1, 3]))
    assert c.n_past() == py.n_past == 12
    want = py.forward(np.array([5], dtype=np.int32), np.array([12], dtype=np.int32), None, np.array([0]), None)
    same(c.forward([5], None, None, [0])[0], want[0])
    c.close()


def draft_weights(cfg, seed=7, layers=2):
    rng = np.random.default_rng(seed)
    D, F, QD, KD = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"fuse.e_norm": (D,), "fuse.w1": (D, D), "fuse.w2": (D, D), "fuse.wz": (D, 2 * D)}
    for i in range(layers):
        p = f"blk.{i}."
        if i:
            shapes[p + "attn_norm"] = (D,)
        shapes.update({p + "attn_q": (QD, D), p + "attn_k": (KD, D), p + "attn_v": (KD, D), p + "attn_output": (D, QD),
                       p + "ffn_norm": (D,), p + "ffn_gate": (F, D), p + "ffn_up": (F, D), p + "ffn_down": (D, F)})
    out = {}
    for name, shape in shapes.items():
        w = (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
             0.3 * rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        out[name] = ("f32", shape, w)
    return out


def draft_config(lib: CApi, cfg, layers=2, context=96, max_batch=32) -> DraftConfig:
    c = DraftConfig()
    lib.dt_draft_config_init(ctypes.byref(c))
    for n, v in zip(_DIMS, (cfg.hidden_size, cfg.intermediate_size, layers, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim)):
        setattr(c, n, v)
    c.rope_theta, c.rms_norm_eps, c.context, c.max_batch = cfg.rope_theta, cfg.rms_norm_eps, context, max_batch
    return c


def c_draft(lib, target: CTarget, cfg, weights, vocab_map=None, **kw):
    arr, _keep = weight_array(weights)
    vm = None if vocab_map is None else np.asarray(vocab_map, dtype=np.int32)
    h = P()
    st = lib.dt_draft_create(target.h, ctypes.byref(draft_config(lib, cfg, **kw)), arr, len(arr), ptr(vm, I32P),
                             0 if vm is None else len(vm), ctypes.byref(h))
    return st, h


def c_draft_forward(lib, h, D, feats, toks, pos, anc=None, append=False, rows=(), k=1):
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    toks, pos = np.asarray(toks, dtype=np.int32), np.asarray(pos, dtype=np.int32)
    anc = None if anc is None else np.ascontiguousarray(anc, dtype=np.uint8)
    rows = np.asarray(rows, dtype=np.int64)
    hidden = np.empty((len(toks), D), dtype=np.float32)
    ids = np.empty((len(rows), k), dtype=np.int32)
    logp = np.empty((len(rows), k), dtype=np.float32)
    st = lib.dt_draft_forward(h, ptr(feats, F32P), ptr(toks, I32P), ptr(pos, I32P), len(toks), ptr(anc, U8P),
                              int(append), ptr(hidden, F32P), ptr(rows, I64P), len(rows), k, ptr(ids, I32P),
                              ptr(logp, F32P))
    return st, hidden, ids, logp


@pytest.mark.parametrize("reduced", [False, True])
def test_draft_matches_binding(lib, reduced):
    cfg, weights = tiny_target_weights("q8_0", tied=True)
    ct, pt = CTarget(lib, cfg, weights), py_target(cfg, weights)
    dw = draft_weights(cfg)
    vocab_map = np.sort(np.random.default_rng(1).choice(cfg.vocab_size, 90, replace=False)) if reduced else None
    st, h = c_draft(lib, ct, cfg, dw, vocab_map)
    assert st == 0, lib.error()
    ct.close()  # the draft keeps the embedding and head it shares
    dcfg = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "num_layers": 2}
    pd = _core.DraftEngine(dcfg, dw, pt, context=96, max_batch=32, threads=1, kv_dtype="f32",
                           vocab_map=vocab_map)
    rng = np.random.default_rng(2)
    D = cfg.hidden_size
    feats = rng.standard_normal((7, D)).astype(np.float32)
    toks, pos = rng.integers(0, cfg.vocab_size, 7), np.arange(7)
    st, *got = c_draft_forward(lib, h, D, feats, toks, pos, rows=[6], k=5)
    assert st == 0, lib.error()
    want = pd.forward(feats, toks.astype(np.int32), pos.astype(np.int32), None, False, np.array([6]), 5)
    same_draft(got, want)
    assert lib.dt_draft_commit(h, None, 0) == 0
    pd.commit(np.arange(7))
    # Tree expansion: two appended levels, each seeing its parent row.
    for level in range(2):
        P0 = 2 * level
        anc = np.zeros((2, P0 + 2), dtype=np.uint8)
        anc[0, P0], anc[1, P0 + 1] = 1, 1
        if level:
            anc[:, 0] = 1
        f2 = rng.standard_normal((2, D)).astype(np.float32)
        t2, p2 = rng.integers(0, cfg.vocab_size, 2), np.array([7 + level] * 2)
        st, *got = c_draft_forward(lib, h, D, f2, t2, p2, anc, True, [0, 1], 3)
        assert st == 0, lib.error()
        want = pd.forward(f2, t2.astype(np.int32), p2.astype(np.int32), anc.astype(bool), True, np.array([0, 1]), 3)
        same_draft(got, want)
        if reduced:
            assert np.isin(got[1], vocab_map).all()
    pending = ctypes.c_int64()
    assert lib.dt_draft_pending(h, ctypes.byref(pending)) == 0 and pending.value == 4
    lib.dt_draft_destroy(h)


def tree_shape(lib: CApi, top_k=1, depth=1, total_tokens=2, min_prob=0.0) -> TreeShape:
    s = TreeShape()
    lib.dt_tree_shape_init(ctypes.byref(s))
    d = TreeParams()  # dt_tree_shape_init gives the Python defaults
    assert (s.struct_size, s.top_k, s.depth, s.total_tokens, s.min_prob) == \
        (ctypes.sizeof(TreeShape), d.top_k, d.depth, d.total_tokens, d.min_prob)
    s.top_k, s.depth, s.total_tokens, s.min_prob = top_k, depth, total_tokens, min_prob
    return s


def lookup_params(lib: CApi, min_n=3, max_n=4, max_tokens=6) -> LookupParams:
    p = LookupParams()
    lib.dt_lookup_params_init(ctypes.byref(p))
    assert (p.struct_size, p.min_n, p.max_n, p.max_tokens) == (ctypes.sizeof(LookupParams), 3, 4, 6)
    p.min_n, p.max_n, p.max_tokens = min_n, max_n, max_tokens
    return p


def corpus_params(lib: CApi, **kw) -> CorpusParams:
    p = CorpusParams()
    lib.dt_corpus_params_init(ctypes.byref(p))
    assert (p.struct_size, p.min_n, p.max_n, p.max_tokens, p.min_count, p.min_frac) == \
        (ctypes.sizeof(CorpusParams), 3, 6, 4, 4, 0.7)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def c_spec_step(lib, h, D, feats, toks, shape, room=None):
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    toks = np.asarray(toks, dtype=np.int32)
    room = room or shape.depth + 1
    emitted = np.full(room, -1, dtype=np.int32)
    out = np.full((room, D), np.nan, dtype=np.float32)
    n = ctypes.c_int64(-1)
    st = lib.dt_speculator_step(h, ptr(feats, F32P), ptr(toks, I32P), len(toks), ctypes.byref(shape),
                                ptr(emitted, I32P), ptr(out, F32P), ctypes.byref(n))
    return st, emitted[:max(n.value, 0)], out[:max(n.value, 0)]


@pytest.mark.parametrize("shape_args,lookup,corpus", [((1, 1, 2, 0.0), None, False), ((3, 3, 6, 0.0), None, False),
                                                      ((4, 4, 12, 0.01), None, False),
                                                      ((1, 1, 2, 0.0), (1, 3, 5), False),
                                                      ((3, 3, 6, 0.0), (2, 2, 8), False),
                                                      ((1, 1, 2, 0.0), (4, 4, 5), True)], ids=str)
def test_speculator_emits_the_greedy_tokens(lib, shape_args, lookup, corpus):
    """dt_speculator_step from the C API: the target's plain greedy tokens, and the same
    steps (tokens and features) as the Python binding's GreedySpeculator on the same weights;
    the speculator keeps working after its target and draft handles are destroyed. With
    prompt lookup on (dt_speculator_set_lookup), some steps verify lookup chains (longer
    than depth + 1 tokens at times) and the tokens are still the greedy ones. With a corpus
    (dt_speculator_set_corpus) holding greedy text of the same target, where the context
    has no match of 4 tokens, corpus chains are verified too."""
    cfg, weights = tiny_target_weights("q8_0", tied=True)
    ct, pt = CTarget(lib, cfg, weights, context=96, max_batch=16), py_target(cfg, weights, context=96, max_batch=16)
    dw = draft_weights(cfg)
    st, hd = c_draft(lib, ct, cfg, dw)
    assert st == 0, lib.error()
    dcfg = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "num_layers": 2}
    pd = _core.DraftEngine(dcfg, dw, pt, context=96, max_batch=32, threads=1, kv_dtype="f32")
    py_spec = _core.GreedySpeculator(pt, pd)
    hs = P()
    assert lib.dt_speculator_create(ct.h, hd, ctypes.byref(hs)) == 0, lib.error()
    room = None
    if lookup is not None:
        lp = lookup_params(lib, *lookup)
        assert lib.dt_speculator_set_lookup(hs, ctypes.byref(lp)) == 0, lib.error()
        py_spec.set_lookup(SimpleNamespace(min_n=lookup[0], max_n=lookup[1], max_tokens=lookup[2]))
        room = max(shape_args[1], lookup[2]) + 1
    lib.dt_draft_destroy(hd)
    D, shape = cfg.hidden_size, tree_shape(lib, *shape_args)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, 7)
    logits, feats = ct.forward(prompt, logit_rows=[6], feature_rows=range(7))
    ct.commit()
    ct.close()  # the speculator keeps the engine
    # plain greedy decoding on the binding's engine, then reset it for the speculator twin
    truth = [int(np.argmax(logits[0]))]
    l, f_py = pt.forward(prompt.astype(np.int32), np.arange(7, dtype=np.int32), None, np.array([6]), np.arange(7))
    pt.commit(np.arange(7))
    while len(truth) < 30:
        l, _ = pt.forward(np.array(truth[-1:], dtype=np.int32), np.array([pt.n_past], dtype=np.int32), None,
                          np.array([0]), None)
        pt.commit(np.arange(1))
        truth.append(int(np.argmax(l[0])))
    pt.truncate(7)
    if corpus:
        # the target's greedy text after another prompt, and the end of this one's: min_count 1
        body = np.array(truth[10:] + [0] + truth[:12], dtype=np.int32)
        cp = corpus_params(lib, min_count=1, min_n=2, max_n=3)
        assert lib.dt_speculator_set_corpus(hs, ptr(body, I32P), len(body), ctypes.byref(cp)) == 0, lib.error()
        py_spec.set_corpus(_core.TokenCorpus(body, 2, 3, 4, 1, 0.6))
    out, toks = [truth[0]], np.append(prompt[1:], truth[0])
    f_c, t_py = feats, toks
    longest = 0
    while len(out) < 30:
        st, emitted, f_c = c_spec_step(lib, hs, D, f_c, toks, shape, room)
        assert st == 0, lib.error()
        longest = max(longest, len(emitted))
        e_py, f_py2, *_ = py_spec.step(f_py if len(out) > 1 else feats, t_py, shape.top_k, shape.depth,
                                       shape.total_tokens, np.log(shape.min_prob) if shape.min_prob else -np.inf)
        assert emitted.tolist() == e_py.tolist()
        np.testing.assert_array_equal(f_c, f_py2)
        f_py, t_py = f_py2, e_py
        out += emitted.tolist()
        toks = emitted
    assert out[:30] == truth
    if lookup is not None:
        assert py_spec.lookup_steps > 0, "no lookup chain was verified"
        assert longest > shape_args[1] + 1, longest  # a chain step emitted more than a tree can
        assert (py_spec.corpus_steps > 0) == corpus, py_spec.corpus_steps
        assert lib.dt_speculator_reset(hs) == 0 and lib.dt_speculator_set_lookup(hs, None) == 0
    lib.dt_speculator_destroy(hs)


def test_speculator_refuses_bad_input(lib):
    cfg, weights = tiny_target_weights("q8_0", tied=True)
    ct, other = CTarget(lib, cfg, weights, context=32), CTarget(lib, cfg, weights)
    st, hd = c_draft(lib, ct, cfg, draft_weights(cfg))
    assert st == 0, lib.error()
    hs = P()
    assert lib.dt_speculator_create(None, hd, ctypes.byref(hs)) == ST["DT_ERR_NULL"] and not hs
    assert lib.dt_speculator_create(other.h, hd, ctypes.byref(hs)) == ST["DT_ERR_INVALID"]
    assert "another target" in lib.error() and not hs
    assert lib.dt_speculator_create(ct.h, hd, ctypes.byref(hs)) == 0, lib.error()
    D = cfg.hidden_size
    f, t = np.zeros((2, D), dtype=np.float32), [1, 2]
    bad = tree_shape(lib)
    bad.struct_size = 4
    assert c_spec_step(lib, hs, D, f, t, bad)[0] == ST["DT_ERR_INVALID"] and "struct_size" in lib.error()
    assert c_spec_step(lib, hs, D, f, t, tree_shape(lib, min_prob=1.0))[0] == ST["DT_ERR_INVALID"]
    assert "min_prob" in lib.error()
    assert c_spec_step(lib, hs, D, f, t, tree_shape(lib, top_k=0))[0] == ST["DT_ERR_INVALID"]
    assert "top_k" in lib.error()
    assert c_spec_step(lib, hs, D, f, [1, 99999], tree_shape(lib))[0] == ST["DT_ERR_INVALID"]
    assert lib.dt_speculator_step(hs, None, None, 0, None, None, None, None) == ST["DT_ERR_NULL"]
    for chunk in (range(16), range(16, 31)):
        ct.forward(list(chunk))
        ct.commit()
    assert c_spec_step(lib, hs, D, f, t, tree_shape(lib))[0] == ST["DT_ERR_INVALID"] and "free slots" in lib.error()
    assert ct.n_past() == 31  # refused before anything changed
    lp = lookup_params(lib)
    assert lib.dt_speculator_set_lookup(None, ctypes.byref(lp)) == ST["DT_ERR_NULL"]
    assert lib.dt_speculator_reset(None) == ST["DT_ERR_NULL"]
    lp.struct_size = 4
    assert lib.dt_speculator_set_lookup(hs, ctypes.byref(lp)) == ST["DT_ERR_INVALID"] and "struct_size" in lib.error()
    for bad, msg in [((0, 4, 6), "min_n"), ((3, 2, 6), "max_n"), ((3, 65, 6), "max_n"), ((3, 4, 0), "max_tokens")]:
        lp = lookup_params(lib, *bad)
        assert lib.dt_speculator_set_lookup(hs, ctypes.byref(lp)) == ST["DT_ERR_INVALID"] and msg in lib.error()
    cp = corpus_params(lib)
    body = np.array([1, 2, 3], dtype=np.int32)
    assert lib.dt_speculator_set_corpus(None, ptr(body, I32P), 3, ctypes.byref(cp)) == ST["DT_ERR_NULL"]
    assert lib.dt_speculator_set_corpus(hs, None, 3, ctypes.byref(cp)) == ST["DT_ERR_NULL"]
    assert lib.dt_speculator_set_corpus(hs, ptr(body, I32P), 3, None) == ST["DT_ERR_NULL"]
    assert lib.dt_speculator_set_corpus(hs, ptr(body, I32P), -1, ctypes.byref(cp)) == ST["DT_ERR_INVALID"]
    cp.struct_size = 4
    assert lib.dt_speculator_set_corpus(hs, ptr(body, I32P), 3, ctypes.byref(cp)) == ST["DT_ERR_INVALID"]
    assert "struct_size" in lib.error()
    for bad, msg in [(dict(min_n=0), "min_n"), (dict(max_n=1, min_n=2), "max_n"), (dict(max_tokens=65), "max_tokens"),
                     (dict(min_count=0), "min_count"), (dict(min_frac=1.5), "min_frac")]:
        cp = corpus_params(lib, **bad)
        assert lib.dt_speculator_set_corpus(hs, ptr(body, I32P), 3, ctypes.byref(cp)) == ST["DT_ERR_INVALID"]
        assert msg in lib.error(), lib.error()
    neg = np.array([1, -5], dtype=np.int32)
    assert lib.dt_speculator_set_corpus(hs, ptr(neg, I32P), 2, ctypes.byref(corpus_params(lib))) == ST["DT_ERR_INVALID"]
    assert "negative" in lib.error()
    assert lib.dt_speculator_set_corpus(hs, None, 0, None) == 0, lib.error()  # removes it
    lib.dt_speculator_destroy(hs)
    lib.dt_speculator_destroy(None)
    lib.dt_draft_destroy(hd)


def test_speculator_refuses_before_changing_state(lib):
    """Shapes and lookup settings that could not run are refused when given, and a step
    the draft has no room for changes neither engine: tree sizes whose product overflows
    int64, lookup chains longer than a target call takes, more new pairs than the draft's
    free slots."""
    cfg, weights = tiny_target_weights("q8_0", tied=True)
    ct = CTarget(lib, cfg, weights, context=96, max_batch=16)
    st, hd = c_draft(lib, ct, cfg, draft_weights(cfg), context=20, max_batch=16)
    assert st == 0, lib.error()
    hs = P()
    assert lib.dt_speculator_create(ct.h, hd, ctypes.byref(hs)) == 0, lib.error()
    D = cfg.hidden_size
    f, t = np.zeros((2, D), dtype=np.float32), [1, 2]
    for top_k, depth in [(2, 2 ** 62 + 1), (4, 2 ** 63 - 1), (2, 10)]:
        st, *_ = c_spec_step(lib, hs, D, f, t, tree_shape(lib, top_k=top_k, depth=depth, total_tokens=4), room=4)
        expect(lib, st, "DT_ERR_INVALID", "draft scratch rows")
    for max_tokens in (16, 2 ** 63 - 1):
        expect(lib, lib.dt_speculator_set_lookup(hs, ctypes.byref(lookup_params(lib, max_tokens=max_tokens))),
               "DT_ERR_INVALID", "exceeds the target's max_batch 16")
    assert lib.dt_speculator_set_lookup(hs, ctypes.byref(lookup_params(lib, max_tokens=15))) == 0, lib.error()
    n_past = ctypes.c_int64()
    for lookup in (True, False):
        if not lookup:
            assert lib.dt_speculator_set_lookup(hs, None) == 0
        prompt = np.arange(43) % 7  # repeats: lookup finds chains in it
        for chunk in (prompt[:16], prompt[16:32], prompt[32:]):
            ct.forward(chunk)
            ct.commit()
        feats = np.zeros((43, D), dtype=np.float32)
        st, *_ = c_spec_step(lib, hs, D, feats, np.roll(prompt, -1), tree_shape(lib), room=16)
        expect(lib, st, "DT_ERR_INVALID", "the draft has 20 free slots, fewer than the 43 new pairs")
        assert lib.dt_draft_n_past(hd, ctypes.byref(n_past)) == 0 and n_past.value == 0
        assert ct.n_past() == 43
        assert lib.dt_target_truncate(ct.h, 0) == 0
    lib.dt_speculator_destroy(hs)
    lib.dt_draft_destroy(hd)
    ct.close()


def test_concurrent_calls(lib):
    """Two threads on one handle are serialized; two handles run side by side; each
    result equals the one computed alone."""
    cfg, weights = tiny_target_weights("q8_0")
    a, b = CTarget(lib, cfg, weights, threads=2), CTarget(lib, cfg, weights)
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, cfg.vocab_size, 1 + i % 16) for i in range(8)]
    alone = [a.forward(t, None, None, [len(t) - 1], [0])[0] for t in batches]
    errors: list[str] = []

    def run(target: CTarget, order) -> None:
        for _ in range(6):
            for i in order:
                st, logits, _ = target.forward_status(batches[i], None, None, [len(batches[i]) - 1], [0])
                if st != 0 or not np.array_equal(logits, alone[i]):
                    errors.append(f"batch {i}: status {st}")

    threads = [threading.Thread(target=run, args=(t, o)) for t, o in
               [(a, range(8)), (a, range(7, -1, -1)), (b, range(8)), (b, range(3, 8))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a.close(); b.close()


# ---- error paths -------------------------------------------------------------------------

def expect(lib: CApi, status: int, code: str, *fragments: str) -> None:
    msg = lib.error()
    assert status == ST[code], f"{lib.dt_status_name(status).decode()} ({msg}), expected {code}"
    assert lib.dt_status_name(status).decode() == code
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_null_handles(lib):
    i64 = ctypes.c_int64()
    one = np.array([1], dtype=np.int32)
    expect(lib, lib.dt_target_forward(None, ptr(one, I32P), None, 1, None, None, 0, None, None, 0, None),
           "DT_ERR_NULL", "dt_target_forward", "target handle is NULL")
    expect(lib, lib.dt_target_commit(None, None, 0), "DT_ERR_NULL", "dt_target_commit")
    expect(lib, lib.dt_target_truncate(None, 0), "DT_ERR_NULL", "dt_target_truncate")
    expect(lib, lib.dt_target_n_past(None, ctypes.byref(i64)), "DT_ERR_NULL", "dt_target_n_past")
    expect(lib, lib.dt_target_pending(None, ctypes.byref(i64)), "DT_ERR_NULL", "dt_target_pending")
    expect(lib, lib.dt_target_set_threads(None, 1), "DT_ERR_NULL", "dt_target_set_threads")
    expect(lib, lib.dt_draft_forward(None, None, None, None, 1, None, 0, None, None, 0, 1, None, None),
           "DT_ERR_NULL", "dt_draft_forward", "draft handle is NULL")
    expect(lib, lib.dt_draft_commit(None, None, 0), "DT_ERR_NULL", "dt_draft_commit")
    expect(lib, lib.dt_draft_truncate(None, 0), "DT_ERR_NULL", "dt_draft_truncate")
    expect(lib, lib.dt_draft_n_past(None, ctypes.byref(i64)), "DT_ERR_NULL", "dt_draft_n_past")
    expect(lib, lib.dt_draft_pending(None, ctypes.byref(i64)), "DT_ERR_NULL", "dt_draft_pending")
    expect(lib, lib.dt_draft_set_threads(None, 1), "DT_ERR_NULL", "dt_draft_set_threads")
    cfg, weights = tiny_target_weights()
    arr, _keep = weight_array(weights)
    expect(lib, lib.dt_target_create(ctypes.byref(target_config(lib, cfg)), arr, len(arr), None),
           "DT_ERR_NULL", "out is NULL")
    h = P(1234)
    expect(lib, lib.dt_target_create(None, arr, len(arr), ctypes.byref(h)), "DT_ERR_NULL", "cfg is NULL")
    assert not h.value  # *out is cleared on failure
    expect(lib, lib.dt_target_create(ctypes.byref(target_config(lib, cfg)), None, 3, ctypes.byref(h)),
           "DT_ERR_NULL", "weights is NULL")
    expect(lib, lib.dt_draft_create(None, ctypes.byref(draft_config(lib, cfg)), arr, len(arr), None, 0, ctypes.byref(h)),
           "DT_ERR_NULL", "target handle is NULL")
    lib.dt_target_destroy(None)
    lib.dt_draft_destroy(None)


def _create(lib, cfg, weights, config=None):
    arr, _keep = weight_array(weights)
    h = P()
    st = lib.dt_target_create(ctypes.byref(config or target_config(lib, cfg)), arr, len(arr), ctypes.byref(h))
    assert (st == 0) == bool(h.value)
    if h.value:
        lib.dt_target_destroy(h)
    return st


def test_bad_weights(lib):
    cfg, good = tiny_target_weights("q8_0")
    q = good["blk.0.attn_q"]

    def with_(name, value):
        w = dict(good)
        if value is None:
            del w[name]
        else:
            w[name] = value
        return w

    cases = [
        (with_("blk.0.attn_q", ("f32", q[1], q[2])), "DT_ERR_INVALID", "'blk.0.attn_q'", "needs", "bytes"),
        (with_("blk.0.attn_q", (q[0], (q[1][0] + 1, q[1][1]), q[2])), "DT_ERR_INVALID", "needs", "bytes"),
        (with_("blk.0.attn_q", (q[0], (q[1][0], q[1][1] - 1), q[2])), "DT_ERR_INVALID",
         "multiple of 32 columns", "'blk.0.attn_q'"),
        (with_("blk.1.ffn_down", None), "DT_ERR_INVALID", "missing weight 'blk.1.ffn_down'"),
        (with_("output_norm", ("f32", (48,), good["output_norm"][2][:48])), "DT_ERR_INVALID",
         "weight 'output_norm' has shape (48,), expected (96,)"),
        (with_("output_norm", ("f32", (1, 96), good["output_norm"][2])), "DT_ERR_INVALID",
         "weight 'output_norm' has shape (1, 96), expected (96,)"),  # (norms are 1-D, as the header says)
        (with_("blk.0.attn_q", (q[0], (q[1][0] // 2, q[1][1]), q[2][: q[1][0] // 2])), "DT_ERR_INVALID",
         "weight 'blk.0.attn_q' has shape (48, 96), expected (96, 96)"),
    ]
    for weights, code, *frags in cases:
        expect(lib, _create(lib, cfg, weights), code, "dt_target_create", *frags)

    # Fields a dict of (dtype, shape, data) cannot express: patch the descriptors directly.
    names = list(good)
    i = names.index("blk.0.attn_k")
    for field, value, code, frag in [("dtype", 9, "DT_ERR_INVALID", "unknown dtype code 9"),
                                     ("dtype", -1, "DT_ERR_INVALID", "unknown dtype code -1"),
                                     ("ndim", 3, "DT_ERR_INVALID", "ndim 3"),
                                     ("ndim", 0, "DT_ERR_INVALID", "ndim 0"),
                                     ("data", None, "DT_ERR_NULL", "'blk.0.attn_k' data is NULL"),
                                     ("name", None, "DT_ERR_NULL", f"weights[{i}].name is NULL"),
                                     ("nbytes", 2 ** 63, "DT_ERR_INVALID", "nbytes is 9223372036854775808")]:
        arr, _keep = weight_array(good)
        setattr(arr[i], field, value)
        h = P()
        st = lib.dt_target_create(ctypes.byref(target_config(lib, cfg)), arr, len(arr), ctypes.byref(h))
        expect(lib, st, code, frag)
        assert not h.value
    arr, _keep = weight_array(good)
    arr[i].shape[0] = 1 << 40
    expect(lib, lib.dt_target_create(ctypes.byref(target_config(lib, cfg)), arr, len(arr), ctypes.byref(P())),
           "DT_ERR_INVALID", "shape[0] = 1099511627776")
    arr, _keep = weight_array(good)
    arr[i].name = b"blk.0.attn_q"
    expect(lib, lib.dt_target_create(ctypes.byref(target_config(lib, cfg)), arr, len(arr), ctypes.byref(P())),
           "DT_ERR_INVALID", "'blk.0.attn_q' is given twice")


def test_misaligned_weights_are_accepted(lib):
    cfg, weights = tiny_target_weights("f32")
    shifted = {}
    for name, (dtype, shape, data) in weights.items():
        raw = np.zeros(data.nbytes + 1, dtype=np.uint8)
        raw[1:] = data.reshape(-1).view(np.uint8)
        shifted[name] = (dtype, shape, raw[1:])  # odd address
    a, b = CTarget(lib, cfg, weights), CTarget(lib, cfg, shifted)
    np.testing.assert_array_equal(a.forward([1, 2, 3], logit_rows=[2])[0], b.forward([1, 2, 3], logit_rows=[2])[0])
    a.close(); b.close()


def test_bad_config(lib):
    cfg, weights = tiny_target_weights()
    for field, value, frag in [("struct_size", 0, "dt_target_config_init"), ("vocab_size", 0, "vocab_size"),
                               ("head_dim", -16, "head_dim"), ("num_heads", 1 << 40, "num_heads"),
                               ("rope_theta", float("nan"), "rope_theta"), ("rms_norm_eps", 0.0, "rms_norm_eps"),
                               ("kv_dtype", 7, "kv_dtype"), ("threads", 0, "threads"), ("context", 0, "context"),
                               ("max_batch", 5000, "max_batch"), ("vocab_size", 300, "token_embd"),
                               ("activation", 7, "DT_ACT_GELU_TANH"), ("sliding_window", -1, "sliding_window"),
                               ("rope_theta_local", float("nan"), "rope_theta_local"),
                               ("rope_theta_local", float("inf"), "rope_theta_local must be finite")]:
        c = target_config(lib, cfg)
        setattr(c, field, value)
        expect(lib, _create(lib, cfg, weights, c), "DT_ERR_INVALID", frag)


def test_bad_calls_leave_engine_usable(lib):
    cfg, weights = tiny_target_weights()
    t, fresh = CTarget(lib, cfg, weights, context=10, max_batch=8), CTarget(lib, cfg, weights, context=10, max_batch=8)
    t.forward([1, 2, 3]); t.commit()
    V = cfg.vocab_size
    bad_forward = [
        (dict(tokens=[]), "DT_ERR_INVALID", "n_tokens must be >= 1"),
        (dict(tokens=[1] * 9), "DT_ERR_INVALID", "exceeds the engine's max_batch 8"),
        (dict(tokens=[1, V]), "DT_ERR_INVALID", f"token id {V} at index 1 is outside the vocabulary"),
        (dict(tokens=[1, -1]), "DT_ERR_INVALID", "token id -1"),
        (dict(tokens=[1], positions=[12]), "DT_ERR_INVALID", "position 12"),
        (dict(tokens=[1, 2], logit_rows=[2]), "DT_ERR_INVALID", "logit row 2 outside the batch"),
        (dict(tokens=[1, 2], feature_rows=[-1]), "DT_ERR_INVALID", "feature row -1"),
        (dict(tokens=[1, 2], ancestors=[[1, 1], [1, 1]]), "DT_ERR_INVALID", "may only see earlier batch tokens"),
        (dict(tokens=[1, 2], ancestors=[[1, 0], [1, 0]]), "DT_ERR_INVALID", "a token always sees itself"),
        (dict(tokens=[1, 2], ancestors=[[1, 0], [2, 1]]), "DT_ERR_INVALID", "0/1 matrix"),
        (dict(tokens=[1] * 8), "DT_ERR_INVALID", "context full"),
    ]
    for kw, code, frag in bad_forward:
        st, _, _ = t.forward_status(**kw)
        expect(t.lib, st, code, "dt_target_forward", frag)
    one = np.array([1], dtype=np.int32)
    row = np.array([0], dtype=np.int64)
    expect(lib, lib.dt_target_forward(t.h, ptr(one, I32P), None, 1, None, ptr(row, I64P), 1, None, None, 0, None),
           "DT_ERR_NULL", "logits is NULL")
    expect(lib, lib.dt_target_forward(t.h, None, None, 1, None, None, 0, None, None, 0, None), "DT_ERR_NULL",
           "tokens is NULL")
    expect(lib, lib.dt_target_forward(t.h, ptr(one, I32P), None, 1, None, None, -1, None, None, 0, None),
           "DT_ERR_INVALID", "n_logit_rows must be >= 0")
    t.forward([4, 5, 6])
    for kept, n, code, frag in [([1, 0], 2, "DT_ERR_INVALID", "strictly increasing"),
                                ([5], 1, "DT_ERR_INVALID", "kept row 5 outside the pending rows"),
                                ([0], -1, "DT_ERR_INVALID", "n_kept must be >= 0"),
                                (None, 2, "DT_ERR_NULL", "kept is NULL")]:
        k = None if kept is None else np.asarray(kept, dtype=np.int64)
        expect(lib, lib.dt_target_commit(t.h, ptr(k, I64P), n), code, "dt_target_commit", frag)
    expect(lib, lib.dt_target_truncate(t.h, 4), "DT_ERR_INVALID", "truncate to 4 outside [0, 3]")
    expect(lib, lib.dt_target_truncate(t.h, -1), "DT_ERR_INVALID", "truncate to -1")
    expect(lib, lib.dt_target_set_threads(t.h, 0), "DT_ERR_INVALID", "threads must be in [1, 1024]")
    expect(lib, lib.dt_target_n_past(t.h, None), "DT_ERR_NULL", "out is NULL")
    # After all that, the engine continues as a fresh one fed the same tokens.
    t.commit([0, 2])
    fresh.forward([1, 2, 3]); fresh.commit()
    fresh.forward([4, 5, 6]); fresh.commit([0, 2])
    assert t.n_past() == fresh.n_past() == 5
    np.testing.assert_array_equal(t.forward([7], logit_rows=[0])[0], fresh.forward([7], logit_rows=[0])[0])
    t.close(); fresh.close()


def test_bad_draft_calls(lib):
    cfg, weights = tiny_target_weights("q8_0", tied=True)
    t = CTarget(lib, cfg, weights)
    dw = draft_weights(cfg, layers=1)
    for vm, n, kw, code, frag in [
        ([5, 3], None, {}, "DT_ERR_INVALID", "strictly ascending"),
        ([1, 301], None, {}, "DT_ERR_INVALID", "vocab_map entry 301"),
        (None, 4, {}, "DT_ERR_NULL", "vocab_map must be NULL with n_vocab_map 0"),
        ([1, 2], -2, {}, "DT_ERR_INVALID", "n_vocab_map -2"),
        (None, None, {"layers": 2}, "DT_ERR_INVALID", "missing weight 'blk.1.attn_norm'"),
    ]:
        arr, _keep = weight_array(dw)
        v = None if vm is None else np.asarray(vm, dtype=np.int32)
        h = P()
        st = lib.dt_draft_create(t.h, ctypes.byref(draft_config(lib, cfg, **kw)), arr, len(arr), ptr(v, I32P),
                                 (0 if v is None else len(v)) if n is None else n, ctypes.byref(h))
        expect(lib, st, code, "dt_draft_create", frag)
        assert not h.value
    c = draft_config(lib, cfg, layers=1)
    c.hidden_size = cfg.hidden_size + 2
    arr, _keep = weight_array(dw)
    expect(lib, lib.dt_draft_create(t.h, ctypes.byref(c), arr, len(arr), None, 0, ctypes.byref(P())),
           "DT_ERR_INVALID")
    vm = np.arange(0, 300, 3)
    st, h = c_draft(lib, t, cfg, dw, vm, layers=1)
    assert st == 0, lib.error()
    D = cfg.hidden_size
    f = np.ones((2, D), dtype=np.float32)
    for kw, code, frag in [
        (dict(rows=[0], k=101), "DT_ERR_INVALID", "top-k must be in [1, min(256, 100)]"),
        (dict(rows=[2], k=1), "DT_ERR_INVALID", "top-k row 2 outside the batch"),
        (dict(feats=np.full((2, D), np.nan)), "DT_ERR_INVALID", "features must be finite"),
        (dict(toks=[1, 999]), "DT_ERR_INVALID", "token id 999"),
        (dict(anc=[[1, 1], [1, 1]]), "DT_ERR_INVALID", "may only see earlier"),
    ]:
        args = dict(feats=f, toks=[1, 2], pos=[0, 1], anc=None, rows=(), k=1) | kw
        st, *_ = c_draft_forward(lib, h, D, args["feats"], args["toks"], args["pos"], args["anc"], False,
                                 args["rows"], args["k"])
        expect(lib, st, code, "dt_draft_forward", frag)
    toks, pos = np.array([1, 2], dtype=np.int32), np.array([0, 1], dtype=np.int32)
    expect(lib, lib.dt_draft_forward(h, ptr(f, F32P), ptr(toks, I32P), ptr(pos, I32P), 2, None, 0, None, None, 0, 1,
                                     None, None), "DT_ERR_NULL", "hidden is NULL")
    for append in (2, -1):
        st, *_ = c_draft_forward(lib, h, D, f, [1, 2], [0, 1], append=append)
        expect(lib, st, "DT_ERR_INVALID", "dt_draft_forward", "append must be 0 or 1")
    st, _, ids, _ = c_draft_forward(lib, h, D, f, [1, 2], [0, 1], rows=[1], k=4)
    assert st == 0 and np.isin(ids, vm).all()
    lib.dt_draft_destroy(h)
    t.close()


def test_last_error_is_per_thread(lib):
    assert lib.dt_target_truncate(None, 0) == ST["DT_ERR_NULL"]
    before = lib.error()

    def other():
        lib.dt_target_set_threads(None, 1)
        assert "dt_target_set_threads" in lib.error()

    th = threading.Thread(target=other)
    th.start(); th.join()
    assert lib.error() == before and "dt_target_truncate" in before
