"""The target model on the CPU: a thin wrapper over the native ``LlamaEngine``.

One call serves prefill, single-token decode and tree verification::

    logits, feats = target.forward(tokens, positions, ancestors, logit_rows, feature_rows)
    target.commit(kept_rows)

No math happens here; this module converts a :class:`ModelSource` into the buffers the
engine packs once, and gives the engine a Python-friendly surface.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np

from . import _core
from .errors import as_int
from .formats.base import ModelSource

__all__ = ["TargetEngine", "check_device_name", "default_threads", "parse_device"]


def _check_int32(**arrays: np.ndarray) -> None:
    """ValueError naming the first integer array with values outside the int32 range."""
    for name, arr in arrays.items():
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside the int32 range")


def _device_index(device) -> int | None:
    """The CUDA index of "cuda" / "cuda:N" (0 for "cuda"); None for the other names."""
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        index = device[5:] or "0"
        if not index.isdigit():
            raise ValueError(f"bad CUDA device {device!r}: use 'cuda' or 'cuda:N'")
        return int(index)
    if device in ("cpu", "emulated"):
        return None
    raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'emulated'")


def check_device_name(device: str, name: str = "device") -> str:
    """Refuse a device that is misspelt, whether or not this build or machine has it (for a
    setting that may go unused, such as the offload device without offloaded layers)."""
    try:
        _device_index(device)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return device


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` / ``"emulated"`` -> (backend, device index)."""
    index = _device_index(device)
    if index is None:
        return ("cpu", 0) if device == "cpu" else ("host", 0)
    if not _core.cuda_compiled():
        raise ValueError(f"device={device!r} needs a build with CUDA (DOVETAIL_CUDA=ON); this build has none")
    if index >= _core.cuda_device_count():
        raise ValueError(f"device={device!r}: {_core.cuda_device_count()} CUDA device(s) visible")
    return "cuda", index


def default_threads() -> int:
    """Physical-core-sized default: all CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class TargetEngine:
    """A LLaMA model executing its weights in their stored format.

    Args:
        source: what a loader returned (config, weights, tokenizer), or a model path
            (``.gguf`` file or checkpoint directory) for :func:`~dovetail_ext.formats.load_model_source`.
        context: KV slots to preallocate (committed tokens plus one batch).
        threads: OpenMP threads for native compute.
        max_batch: the largest number of tokens one forward may take.
        kv_dtype: ``"f32"`` or ``"bf16"`` KV cache.
        gpu_layers: run the first N layers on a device (partial offload): their weights
            in bf16 and their KV cache live there, the hidden states after layer N-1 come
            back to the CPU, which runs the rest. Every layer on both sides computes a
            token's result independently of the batch, so greedy speculation stays exact.
        device: where those layers run: ``"cuda"``, ``"cuda:N"``, or ``"emulated"`` (the
            device engine on the CPU with scalar kernels, for tests).
        sequences: KV caches for that many independent sequences (``select`` picks the one
            ``forward`` / ``commit`` / ``truncate`` / ``n_past`` act on;
            ``forward_sequences`` decodes one token of several in one pass). Each costs a
            full KV cache (``kv_bytes``).
    """

    def __init__(self, source: ModelSource | str | os.PathLike, *, context: int | None = None,
                 threads: int | None = None,
                 max_batch: int = 128, kv_dtype: str = "f32", gpu_layers: int = 0, device: str = "cuda",
                 graphs: bool = True, sequences: int = 1) -> None:
        if isinstance(source, (str, os.PathLike)):
            from .formats import load_model_source
            source = load_model_source(source)
        elif not isinstance(source, ModelSource):
            raise TypeError(f"source must be a ModelSource or a model path, got {type(source).__name__}")
        cfg = source.config
        self.config = cfg
        self.source = source
        if context is None:
            context = min(cfg.max_context, 4096)
        # (types here; the native engine checks the ranges, naming them)
        context = as_int("context", context)
        threads = as_int("threads", default_threads() if threads is None else threads, bits=32)
        max_batch = as_int("max_batch", max_batch)
        if not isinstance(kv_dtype, str):
            raise ValueError(f"kv_dtype must be 'f32' or 'bf16', got {kv_dtype!r}")
        weights = {}
        for name, w in source.weights.items():
            data = w.data
            if len(w.shape) == 1 and w.dtype != "f32":  # norms run in fp32
                from .quant import dequantize
                data, dtype = np.ascontiguousarray(dequantize(w), dtype=np.float32), "f32"
            else:
                dtype = w.dtype
            weights[name] = (dtype, tuple(w.shape), np.ascontiguousarray(data))
        long_factors = weights.pop("rope_freqs_long", None)
        if long_factors is not None and context > cfg.rope_long_context:  # (LongRoPE beyond the original context)
            weights["rope_freqs"] = long_factors
        if not isinstance(gpu_layers, int) or isinstance(gpu_layers, bool) or not 0 <= gpu_layers < cfg.num_layers:
            raise ValueError(f"gpu_layers must be an integer in [0, {cfg.num_layers}) (at least one layer runs "
                             f"on the CPU), got {gpu_layers!r}")
        check_device_name(device, "offload device")  # (also when unused: a misspelt name is an error either way)
        sequences = as_int("sequences", sequences)
        if sequences > 1 and gpu_layers:
            raise ValueError("sequences > 1 needs every layer on the CPU (gpu_layers 0)")
        if gpu_layers:
            backend, index = parse_device(device)
            if backend == "cpu":
                raise ValueError("gpu_layers needs a device: 'cuda', 'cuda:N' or 'emulated'")
        self._engine = _core.LlamaEngine(asdict(cfg), weights, context=context, max_batch=max_batch,
                                         threads=threads, kv_dtype=kv_dtype, first_layer=gpu_layers,
                                         sequences=sequences)
        self._prefix = None
        self._verifier = None  # verify_greedy's native state, made on first use
        if gpu_layers:
            self._prefix = _core.DeviceTargetPrefix(asdict(cfg), weights, self._engine, layers=gpu_layers,
                                                    context=context, max_batch=max_batch, backend=backend,
                                                    device=index, graphs=graphs)

    # -- the one call --------------------------------------------------------------------
    def forward(self, tokens, positions=None, ancestors=None, logit_rows=None,
                feature_rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Run T new tokens after the committed prefix.

        Args:
            tokens: int [T] token ids.
            positions: int [T]; default ``n_past + arange(T)`` (causal continuation).
            ancestors: bool [T, T], row t marks the batch tokens t attends to (diagonal set,
                lower-triangular); None means causal within the batch.
            logit_rows: batch rows whose logits to return; default: the last row.
            feature_rows: batch rows whose final-norm hidden states to return; default none.

        Returns:
            (logits float32 [len(logit_rows), V], features float32 [len(feature_rows), D]).
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        T = tokens.shape[0]
        if positions is None:
            positions = self.n_past + np.arange(T)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        _check_int32(tokens=tokens, positions=positions)
        if logit_rows is None:
            logit_rows = [T - 1] if T else []
        tokens, positions = tokens.astype(np.int32), positions.astype(np.int32)
        logit_rows = np.asarray(logit_rows, dtype=np.int64)
        feature_rows = None if feature_rows is None else np.asarray(feature_rows, dtype=np.int64)
        if self._prefix is not None:  # the first layers on the device, the rest here
            hidden = self._prefix.forward(tokens, positions, ancestors)
            return self._engine.forward_hidden(hidden, positions, ancestors, logit_rows, feature_rows)
        return self._engine.forward(tokens, positions, ancestors, logit_rows, feature_rows)

    def verify_greedy(self, tokens, parents, features: bool = True,
                      rows: bool = False) -> tuple[list[int], np.ndarray | None, float, np.ndarray | None] | None:
        """Verify a tree of tokens after the committed prefix in one call, accept it greedily
        and commit the accepted path, all in native code: the same call, acceptance and
        commit as :meth:`forward` followed by :func:`dovetail_ext.sampling.accept_greedy` and
        :meth:`commit`, without the logits leaving the engine.

        Args:
            tokens: int [K], the root first.
            parents: int [K], -1 for the root, each parent before its children.
            features: return the target features of the committed rows.
            rows: return the logits row each emitted token was chosen from.

        Returns:
            (emitted tokens: the accepted tree tokens and the bonus token, features
            [len(emitted), D] or None, the seconds the target call took, rows
            [len(emitted), V] or None); or None with a partly offloaded target, which
            verifies through :meth:`forward`.
        """
        if self._prefix is not None:
            return None
        if self._verifier is None:
            self._verifier = _core.GreedyVerifier(self._engine)
        tokens = np.asarray(tokens).reshape(-1)
        parents = np.asarray(parents).reshape(-1)
        for name, arr in (("tokens", tokens), ("parents", parents)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got {arr.dtype}")
        _check_int32(tokens=tokens)
        emitted, feats, verify_s, _, logits = self._verifier.verify(tokens.astype(np.int32), parents.astype(np.int64),
                                                                  features, rows)
        return emitted.tolist(), feats, verify_s, logits

    def forward_sequences(self, tokens, sequences, positions=None) -> np.ndarray:
        """One new token for each of S distinct sequences, in one pass over the weights:
        ``tokens[r]`` continues sequence ``sequences[r]`` (at ``positions[r]``, default that
        sequence's ``n_past``). Returns logits float32 [S, V], each row bit for bit what a
        one-token ``forward`` on its sequence gives; every row is committed to its sequence.
        The selected sequence must have no uncommitted rows."""
        seqs = np.asarray(sequences)
        tokens = np.asarray(tokens)
        if seqs.ndim != 1 or tokens.shape != seqs.shape or not np.issubdtype(seqs.dtype, np.integer) \
                or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("tokens and sequences must be 1-D integer arrays of one length")
        if positions is None:
            positions = [self._engine.n_past_of(int(s)) if 0 <= s < self.sequences else 0 for s in seqs.tolist()]
        positions = np.asarray(positions)
        if positions.shape != seqs.shape or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError("positions must be a 1-D integer array, one per sequence")
        _check_int32(tokens=tokens, positions=positions)
        return self._engine.forward_sequences(tokens.astype(np.int32), positions.astype(np.int32),
                                              seqs.astype(np.int64))

    def select(self, sequence: int) -> None:
        """Make ``sequence`` the one ``forward`` / ``commit`` / ``truncate`` / ``n_past`` act on
        (the selected one's rows committed or truncated first)."""
        self._engine.select_sequence(as_int("sequence", sequence, lo=0))

    @property
    def sequence(self) -> int:
        """The selected sequence."""
        return self._engine.sequence

    @property
    def sequences(self) -> int:
        return self._engine.sequences

    def n_past_of(self, sequence: int) -> int:
        return self._engine.n_past_of(as_int("sequence", sequence, lo=0))

    @property
    def kv_bytes(self) -> int:
        """Bytes of every sequence's KV cache."""
        return self._engine.kv_bytes

    def commit(self, kept=None) -> None:
        """Keep rows ``kept`` of the last forward (all rows when None), compacted after the prefix."""
        if kept is None:
            kept = np.arange(self._engine.pending)
        kept = np.asarray(kept, dtype=np.int64)
        if self._prefix is not None:
            self._prefix.commit(kept)  # same checks: a bad `kept` leaves both sides unchanged
        self._engine.commit(kept)

    def truncate(self, n: int) -> None:
        """Forget committed tokens past ``n``."""
        if self._prefix is not None:
            self._prefix.truncate(n)
        self._engine.truncate(n)

    def reset(self) -> None:
        self.truncate(0)

    def read_kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Committed keys and values of ``layer`` as fp32 [KV, n_past, Dh]."""
        if self._prefix is not None:
            if layer < self.gpu_layers:
                return self._prefix.read_kv(layer, self.n_past)
            return self._engine.read_kv(layer - self.gpu_layers)
        return self._engine.read_kv(layer)

    @property
    def gpu_layers(self) -> int:
        """Layers run on the device (0: all on the CPU)."""
        return self._engine.first_layer

    @property
    def device_stats(self) -> dict | None:
        """With gpu_layers: the device side's transfer and call counters."""
        return None if self._prefix is None else self._prefix.stats

    @property
    def n_past(self) -> int:
        return self._engine.n_past

    @property
    def context(self) -> int:
        return self._engine.context

    @property
    def max_batch(self) -> int:
        return self._engine.max_batch

    @property
    def threads(self) -> int:
        return self._engine.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._engine.set_threads(n)

    @property
    def weight_bytes(self) -> int:
        return self._engine.weight_bytes
