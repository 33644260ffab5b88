"""Structured output: decoding constrained to a grammar.

A :class:`Grammar` says which texts the output may be: a JSON object, a JSON Schema, a
regular expression, one of a list of strings, or a Lark or GBNF grammar. Generation then
follows it token by token (``Generator.generate(..., grammar=Grammar.json(schema))``, the
server's ``response_format``, ``dovetail generate --json-schema FILE``).

The rule: before each token is chosen, every token that cannot continue a text of the
grammar gets the logit -inf (EOS only where the text may end; where the grammar forces the
next bytes, every token but the first of their tokenization by the tokenizer), then
temperature, top-k, top-p and min-p apply as usual. Greedy decoding therefore picks the target's most likely token among
those the grammar allows; sampling draws from the target distribution restricted to them.
When the grammar admits nothing after the text so far (a JSON value closed), the output
ends there (``stop_reason == "grammar"``).

The token masks come from ``llguidance`` (an optional dependency: ``pip install
'dovetail-ext[grammar]'``), about 0.1 ms per token for the default model's 49,152 tokens.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Sequence

import numpy as np

__all__ = ["Grammar", "Constraint"]

_INSTALL = "structured output needs the llguidance package: pip install 'dovetail-ext[grammar]'"

# JSON whitespace between tokens: at most this many characters in a row, so that a small
# model cannot fill its budget with blank lines inside an object.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,64}"


def _llg():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return llguidance


def closed_schema(schema: Any) -> Any:
    """A JSON Schema whose objects that do not say otherwise take no properties beyond those
    they list (what OpenAI's ``strict`` mode asks for)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) if k not in ("properties", "$defs", "definitions") else
           {name: closed_schema(s) for name, s in v.items()} if isinstance(v, dict) else v
           for k, v in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


class Grammar:
    """What the output may be, checked when it is made (a ValueError names the problem).

    Build it with :meth:`json`, :meth:`regex`, :meth:`choice`, :meth:`lark` or :meth:`gbnf`.
    A Grammar holds no decoding state: one may serve any number of generations.

    ``free_until``: a text before which the grammar allows (nearly) any text; the tool-call
    grammar of tool_choice "auto" sets it to ``<tool_call>``. Decoding then runs without
    masks, on the fast native steps, checking each token it emits, until that text is out or
    the grammar refuses a token; from there it goes on under the grammar. The output is
    that of masked decoding throughout (for sampling: the masked distribution).
    """

    def __init__(self, kind: str, source: str, spec: str) -> None:
        problem = _llg().LLMatcher.validate_grammar(spec)
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"invalid {kind} grammar: {problem.strip()}")
        self.kind, self.source, self.spec = kind, source, spec
        self.free_until: str | None = None

    def __repr__(self) -> str:
        src = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"Grammar.{self.kind}({src!r})"

    @classmethod
    def json(cls, schema: dict | str | None = None, *, compact: bool = False, strict: bool = False) -> Grammar:
        """A JSON value following ``schema`` (a dict, or its JSON text); None: any JSON
        object (OpenAI's JSON mode). ``compact``: no whitespace between tokens; otherwise
        runs of up to 64 whitespace characters are allowed where JSON allows them.
        ``strict``: objects that do not say otherwise take no properties beyond those they
        list (:func:`closed_schema`; OpenAI's strict mode)."""
        llg = _llg()
        if schema is None:
            schema = {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema is an object (a dict), got {type(schema).__name__}")
        if strict:
            schema = closed_schema(schema)
        options = {"whitespace_flexible": False} if compact else {"whitespace_pattern": JSON_WHITESPACE}
        try:
            spec = llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid JSON schema: {e}") from None
        return cls("json", json.dumps(schema, separators=(",", ":")), spec)

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching the regular expression as a whole (Rust ``regex`` syntax)."""
        if not isinstance(pattern, str):
            raise ValueError(f"a regular expression is a str, got {type(pattern).__name__}")
        return cls("regex", pattern, _llg().LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of ``options``."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options \
                or not all(isinstance(o, str) and o for o in options):
            raise ValueError("choice takes a non-empty list of non-empty strings")
        alts = " | ".join(json.dumps(o) for o in options)
        return cls("choice", json.dumps(list(options)), _llg().LLMatcher.grammar_from_lark(f"start: {alts}\n"))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar (llguidance's dialect: ``start:`` rule, ``/regex/`` terminals,
        ``%json {schema}`` for embedded JSON)."""
        if not isinstance(text, str):
            raise ValueError(f"a Lark grammar is a str, got {type(text).__name__}")
        return cls("lark", text, _llg().LLMatcher.grammar_from_lark(text))

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A llama.cpp GBNF grammar (``root ::= ...``); Lark text is taken as it is."""
        if not isinstance(text, str):
            raise ValueError(f"a GBNF grammar is a str, got {type(text).__name__}")
        llg = _llg()
        try:
            lark = llg.gbnf_to_lark.any_to_lark(text)
        except Exception as e:  # the converter raises its own error class, or a plain one
            raise ValueError(f"invalid GBNF grammar: {e}") from None
        return cls("gbnf", text, llg.LLMatcher.grammar_from_lark(lark))


# One llguidance tokenizer per (tokenizer, vocabulary size, EOS ids): building it reads
# every token's bytes (~0.2 s for 49k tokens). The lock: generators on several threads.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def token_table(tokenizer: Any, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Every token's bytes (b"" where it has none, and past the tokenizer's vocabulary) and
    the special tokens' ids; a special token (one that ``decode(skip_special=True)`` drops)
    is its text behind a 0xFF byte, which no UTF-8 text contains, so no grammar text
    matches it."""
    tokens: list[bytes] = []
    special: list[int] = []
    for i in range(vocab_size):
        if i >= tokenizer.vocab_size:
            tokens.append(b"")
            continue
        text = tokenizer.decode([i])
        if text and not tokenizer.decode([i], skip_special=True):
            special.append(i)
            tokens.append(b"\xff" + text.encode("utf-8"))
        else:
            tokens.append(tokenizer.token_bytes(i) or b"")
    return tokens, special


def _lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    llg = _llg()
    eos = tuple(sorted(eos_ids))
    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if (vocab_size, eos) not in per:
            per[vocab_size, eos] = _build_lltokenizer(llg, tokenizer, vocab_size, eos)
        return per[vocab_size, eos]


def _build_lltokenizer(llg: Any, tokenizer: Any, vocab_size: int, eos: tuple[int, ...]) -> Any:
    tokens, special = token_table(tokenizer, vocab_size)

    class _Wrapped:  # what llguidance.TokenizerWrapper reads
        eos_token_id = eos[0]
        bos_token_id = tokenizer.bos_id
        special_token_ids = special

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: bytes | str) -> list[int]:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text, add_bos=False)

    return llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size, eos_token=list(eos))


class Constraint:
    """One generation's place in a grammar: masks each row of logits, then takes the
    chosen token (:meth:`consume`)."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        if not isinstance(grammar, Grammar):
            raise ValueError(f"grammar must be a dovetail_ext.Grammar (Grammar.json(), Grammar.regex(), ...), "
                             f"got {type(grammar).__name__}")
        if tokenizer is None:
            raise ValueError("a grammar needs the model's tokenizer, and this model has none")
        if not eos_ids:
            raise ValueError("a grammar needs an end-of-sequence token, and this model has none")
        self.grammar = grammar
        self.vocab_size = vocab_size
        self.matcher = _llg().LLMatcher(_lltokenizer(tokenizer, vocab_size, eos_ids), grammar.spec)
        self._check()
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"{self.grammar!r}: {self.matcher.get_error().strip()}")

    @property
    def stopped(self) -> bool:
        """Whether the grammar admits no further token (the output is complete)."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Which tokens may come next, as booleans [vocab_size]."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self.vocab_size].view(np.bool_)  # (0 / 1 bytes)

    def __call__(self, row: np.ndarray) -> np.ndarray:
        """``row`` with the logits of the tokens that may not come next set to -inf."""
        ok = self.allowed()
        if not ok.any():
            raise ValueError(f"{self.grammar!r}: no token of the vocabulary can continue the output")
        return np.where(ok, row, np.float32(-np.inf)).astype(np.float32, copy=False)

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that must come next: the tokenization of the bytes the
        grammar forces from here (a schema's next key, say); empty where it branches. A
        proposal to verify, not a choice: the target may spell the bytes otherwise."""
        return self.matcher.compute_ff_tokens()[:limit]

    def rollback(self, tokens: int) -> None:
        """Undo the last ``tokens`` consumed."""
        if tokens and not self.matcher.rollback(int(tokens)):
            raise ValueError(f"{self.grammar!r}: cannot roll back {tokens} tokens ({self.matcher.get_error()})")

    def consume(self, token: int) -> None:
        """Advance past the chosen token (one the last mask allowed)."""
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"{self.grammar!r}: token {token} does not continue the output "
                             f"({self.matcher.get_error().strip()})")
