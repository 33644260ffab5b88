"""Several conversations decoding together on one target engine.

A :class:`SequenceBatcher` shares a :class:`~dovetail_ext.target.TargetEngine` built with
``sequences=N`` among N generators, one per thread: :meth:`SequenceBatcher.generator` gives a
:class:`~dovetail_ext.api.Generator` bound to one sequence. Each generator runs as it would
alone (prefill, stop strings, sampling, log-probabilities, the same tokens), but the one-token
decode steps that its threads take at about the same time become one ``forward_sequences``
call: one pass over the weights for all of them. On a CPU where a one-token call is bound by
the weights' memory traffic, S sequences then cost little more than one.

Generators bound to sequences decode plainly (no draft, no prompt lookup): speculation
would verify trees per sequence, one call each.

    engine = TargetEngine(model, sequences=4)
    batcher = SequenceBatcher(engine)
    gens = [batcher.generator(s) for s in range(4)]   # one per thread

Every other engine call of a sequence (prefill chunks, truncation) runs alone, between
batches, with the engine's single-sequence calls on that sequence (``select``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from .api import Generator
from .errors import as_int
from .target import TargetEngine

__all__ = ["SequenceBatcher", "SequenceTarget"]


class SequenceBatcher:
    """Shares ``engine`` (built with ``sequences`` > 1) among one generator per sequence.

    Args:
        engine: the target engine; only the batcher's targets use it from now on.
        wait_s: how long a decode step waits for the other decoding sequences' steps before
            it runs with those that came (default 2 ms): a sequence busy with a prefill or
            between generations does not hold the others up for longer.

    ``calls`` and ``rows`` count the batched decode calls and the tokens they decoded.
    """

    def __init__(self, engine: TargetEngine, wait_s: float = 0.002) -> None:
        if not isinstance(engine, TargetEngine):
            raise ValueError(f"engine must be a TargetEngine, got {type(engine).__name__}")
        if engine.gpu_layers:
            raise ValueError("a SequenceBatcher needs every layer on the CPU (gpu_layers 0)")
        if engine.sequences > engine.max_batch:
            raise ValueError(f"{engine.sequences} sequences exceed the engine's max_batch {engine.max_batch}")
        if not (isinstance(wait_s, (int, float)) and 0 <= wait_s <= 1):
            raise ValueError(f"wait_s must be a number of seconds in [0, 1], got {wait_s!r}")
        self.engine = engine
        self.wait_s = float(wait_s)
        self.calls = self.rows = 0
        self.engine_lock = threading.RLock()  # one native call at a time (and select with it)
        self._cv = threading.Condition()
        self._waiting: dict[int, int] = {}          # sequence -> the token its step decodes
        self._results: dict[int, Any] = {}          # sequence -> logits [1, V] or an exception
        self._decoding: set[int] = set()            # sequences in their decode loops
        self._running = False
        self._targets = [SequenceTarget(self, s) for s in range(engine.sequences)]

    def target(self, sequence: int) -> SequenceTarget:
        """The target engine as sequence ``sequence`` sees it."""
        s = as_int("sequence", sequence, lo=0)
        if s >= len(self._targets):
            raise ValueError(f"sequence {s} outside [0, {len(self._targets)})")
        return self._targets[s]

    def generator(self, sequence: int, source=None) -> Generator:
        """A plain-decoding :class:`Generator` on sequence ``sequence`` (for one thread); when
        one of its generations ends, the other sequences' steps stop waiting for it."""
        return _SequenceGenerator(source or self.engine.source, self.target(sequence), None, lookup=None)

    def idle(self, sequence: int) -> None:
        """Sequence ``sequence`` takes no decode steps for now (its generation ended): the
        others' steps stop waiting for it."""
        with self._cv:
            self._decoding.discard(sequence)
            self._cv.notify_all()

    def step(self, sequence: int, token: int) -> np.ndarray:
        """Decode ``token`` next in ``sequence`` together with the other sequences' steps that
        come within ``wait_s``; its logits [1, V] (committed)."""
        with self._cv:
            self._decoding.add(sequence)
            self._waiting[sequence] = token
            deadline = time.monotonic() + self.wait_s
            while sequence not in self._results:
                now = time.monotonic()
                if not self._running and (len(self._waiting) >= len(self._decoding) or now >= deadline):
                    self._run_batch()
                else:
                    self._cv.wait(max(deadline - now, 1e-4) if not self._running else None)
            out = self._results.pop(sequence)
        if isinstance(out, BaseException):
            raise out
        return out

    def _run_batch(self) -> None:
        """Decode every waiting step in one call (the condition held on entry and exit)."""
        batch, self._waiting = self._waiting, {}
        self._running = True
        seqs = list(batch)
        results: dict[int, Any] = {}
        self._cv.release()
        try:
            results = self._decode(batch, seqs)
        except BaseException as e:  # noqa: BLE001 - (whatever it is, every waiting step hears of it)
            results = {s: e for s in seqs}
        finally:
            self._cv.acquire()
            self._results.update(results)
            self.calls += 1
            self.rows += len(seqs)
            self._running = False
            self._cv.notify_all()

    def _decode(self, batch: dict[int, int], seqs: list[int]) -> dict[int, Any]:
        """Logits [1, V] (or the exception) of each sequence's step; a refused call is retried
        one sequence at a time, so that only the step at fault fails."""
        try:
            with self.engine_lock:
                logits = self.engine.forward_sequences([batch[s] for s in seqs], seqs)
            return {s: logits[r:r + 1] for r, s in enumerate(seqs)}
        except BaseException as e:  # noqa: BLE001 - raised in the thread of the step it belongs to
            if len(seqs) == 1 or not isinstance(e, ValueError):
                return {s: e for s in seqs}
            return {s: self._decode(batch, [s])[s] for s in seqs}


class _SequenceGenerator(Generator):
    """A Generator on one sequence of a batcher: tells the batcher when a generation ends."""

    def _run(self, *args: Any, **kwargs: Any):
        try:
            yield from super()._run(*args, **kwargs)
        finally:
            self.target._b.idle(self.target.sequence)


class SequenceTarget:
    """What a :class:`Generator` needs of a target engine, for one sequence of a shared one:
    a one-token decode step (no positions, ancestors or row choices) goes through the
    batcher; every other call runs alone with the sequence selected, a forward holding the
    engine until its commit or truncate."""

    def __init__(self, batcher: SequenceBatcher, sequence: int) -> None:
        self._b = batcher
        self.sequence = sequence
        self.config = batcher.engine.config
        self.source = batcher.engine.source
        self._stepped = False  # the last forward was a batched step (committed already)
        self._held = False     # a forward alone holds the engine until its commit

    # -- the calls Generator makes ---------------------------------------------------------
    def forward(self, tokens, positions=None, ancestors=None, logit_rows=None,
                feature_rows=None) -> tuple[np.ndarray, np.ndarray]:
        toks = np.asarray(tokens).reshape(-1)
        if toks.size == 1 and positions is None and ancestors is None and feature_rows is None and \
                (logit_rows is None or list(logit_rows) == [0]) and not self._held:
            logits = self._b.step(self.sequence, int(toks[0]))
            self._stepped = True
            return logits, np.zeros((0, self.config.hidden_size), np.float32)
        self._b.idle(self.sequence)
        self._stepped = False
        self._hold()
        try:
            return self._b.engine.forward(tokens, positions, ancestors, logit_rows, feature_rows)
        except BaseException:
            self._release()
            raise

    def commit(self, kept=None) -> None:
        if self._stepped:
            self._stepped = False
            if kept is not None and list(kept) != [0]:
                raise ValueError("a decode step's one row is committed already: commit() or commit([0])")
            return
        self._hold()
        try:
            self._b.engine.commit(kept)
        finally:
            self._release()

    def truncate(self, n: int) -> None:
        self._b.idle(self.sequence)
        self._stepped = False
        self._hold()
        try:
            self._b.engine.truncate(n)
        finally:
            self._release()

    def reset(self) -> None:
        self.truncate(0)

    @property
    def n_past(self) -> int:
        with self._b.engine_lock:
            return self._b.engine.n_past_of(self.sequence)

    @property
    def context(self) -> int:
        return self._b.engine.context

    @property
    def max_batch(self) -> int:
        return self._b.engine.max_batch

    @property
    def threads(self) -> int:
        return self._b.engine.threads

    @property
    def gpu_layers(self) -> int:
        return 0

    # -- holding the engine ----------------------------------------------------------------
    def _hold(self) -> None:
        """The engine to this sequence (selected) until _release: a forward's rows stay
        uncommitted until its commit, and no batch may run across them."""
        if not self._held:
            self._b.engine_lock.acquire()
            self._held = True
            try:
                self._b.engine.select(self.sequence)
            except BaseException:
                self._release()
                raise

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._b.engine_lock.release()
