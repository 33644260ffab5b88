"""An OpenAI-compatible HTTP server over one :class:`~dovetail_ext.api.Generator`.

    dovetail serve                          # the default model on http://127.0.0.1:8000/v1

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model=client.models.list().data[0].id,
                                       messages=[{"role": "user", "content": "Hi"}], max_tokens=32)

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true``
sends server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``),
``POST /v1/embeddings`` (``Generator.embed``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``GET /metrics`` (Prometheus). Responses carry OpenAI's
``usage`` and a ``dovetail`` object with the timing of the call (tokens_per_s,
acceptance_length, mode, prefill_s, decode_s, queue_s, ...).

Stack: Starlette on uvicorn. Starlette is the small, actively maintained ASGI toolkit
(routing, requests, responses; its only dependency is anyio) that FastAPI itself is built
on; FastAPI's additions (pydantic request models, OpenAPI pages) would have to be undone
here, since validation errors must come back in OpenAI's error shape rather than
FastAPI's 422 body. uvicorn is the reference ASGI server from the same maintainers.

One engine: a worker thread takes requests from a FIFO queue and runs them one at a time,
so native compute never blocks the event loop and requests are served in arrival order;
text pieces come back to the event loop through an asyncio queue. With ``parallel`` N, N
workers each run one request on a sequence of their own, and their decode steps are joined
into one pass over the weights (``batching.SequenceBatcher``). Each request
has a watcher on its ASGI receive channel: when the client goes away, the worker drops
the generation at the next token (or skips it if it has not started) and takes the next
request.

Log-probabilities (chat: ``logprobs`` / ``top_logprobs``; completions: ``logprobs``, up to
20 alternatives) are the target's own distribution at each step (temperature 1, before
top-k / top-p), the same with or without speculation.

Completions take token-id prompts and ``echo`` (the prompt scored too with ``logprobs``;
``max_tokens`` 0 allowed then: how evaluation harnesses score text).

``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` adjust the logits as OpenAI
does (speculation stays on: each verified node is judged by the adjusted logits).

``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}}}`` constrains the output to JSON (``grammar.Grammar.json``;
needs the ``llguidance`` package; speculation stays on); on the completions endpoint too.

``n`` choices are generated one after another, the i-th of a prompt sampling with seed + i;
completions take several prompts (choices in prompt order, n each); 64 choices at most.

Tools (chat): ``tools``, ``tool_choice`` ("auto", "none", "required" or a named function:
the last two constrain the reply to calls), ``parallel_tool_calls`` (default false); the
calls come back as ``message.tool_calls`` (streamed: one chunk per choice holding its calls
whole) with ``finish_reason: "tool_calls"``; history may hold assistant ``tool_calls`` and
``tool`` messages (:mod:`dovetail_ext.tools`).

What it is not: no speculation for parallel requests; no echo in chat, suffix or legacy
``functions`` (rejected with 400 rather than silently ignored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .api import MAX_LOGPROBS, GenerationStats, Generator, TokenLogprob
from .grammar import Grammar
from .tools import Tool, ToolCall, parse_tool_choice, parse_tools, tool_grammar
from .errors import as_int, check_text
from .sampling import SamplingParams
from .target import TargetEngine

__all__ = ["create_app", "serve", "default_model_id"]

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


# -- errors ------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered with OpenAI's body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _internal(e: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


# -- request parsing ---------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and abs(v) != float("inf")


def _utf8(v: str, param: str) -> str:
    """``v``, checked to be encodable: JSON's escapes can spell lone surrogates (``"\\ud800"``)."""
    try:
        return check_text(v, f"'{param}'")
    except ValueError as e:
        raise ApiError(400, str(e), param) from None


@dataclass
class _Params:
    """What one request asks of the engine."""

    kind: str                       # "chat", "completion" or "embeddings"
    prompts: list[Any]              # chat: [messages]; completions: raw strings or token-id lists
    max_tokens: int | None          # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None     # alternatives per token with log-probabilities; None: none
    echo: bool = False              # completions: the prompt comes back before the completion
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1                      # choices, generated one after another (choice i: seed + i)
    grammar: Grammar | None = None  # response_format json_object / json_schema
    tools: list[Tool] | None = None  # chat: the tools offered (None: none, or tool_choice "none")
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = False
    encoding_format: str = "float"  # embeddings: "float" or "base64"


def _check_model(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model is not None and _utf8(model, "model") != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_id}'",
                       "model", "model_not_found")


def _parse(body: Any, kind: str, model_id: str, vocab_size: int) -> _Params:
    """Validates a request body; raises :class:`ApiError` naming the offending field."""
    _check_model(body, model_id)

    def get(key: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
        v = body.get(key)
        if v is None:
            return default
        if not check(v):
            raise ApiError(400, f"'{key}' must be {what}, got {json.dumps(v)[:80]}", key)
        return v

    n = get("n", _is_int, "an integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", "n")
    for key in ("suffix", "best_of", "functions") + (("echo",) if kind == "chat" else ("tools",)):
        v = body.get(key)
        if v not in (None, False, 0, "", [], {}) and not (key == "best_of" and v == 1):
            raise ApiError(400, f"'{key}' is not supported by this server", key, "unsupported_parameter")
    grammar = _response_format(body.get("response_format"))

    if kind == "chat":
        prompts = [_messages(body.get("messages"))]
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        prompts = _completion_prompts(body.get("prompt"), vocab_size)
        max_key = "max_tokens"
    echo = kind == "completion" and get("echo", lambda v: isinstance(v, bool), "a boolean", False)
    max_tokens = get(max_key, _is_int, "an integer")
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        raise ApiError(400, f"'{max_key}' must be at least {0 if echo else 1}"
                            f"{'' if echo else ' (0 only with echo)'}, got {max_tokens}", max_key)
    temperature = get("temperature", _is_num, "a number", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = get("top_p", _is_num, "a number", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = get("top_k", _is_int, "an integer", 0)
    if top_k < 0:
        raise ApiError(400, f"'top_k' must be >= 0, got {top_k}", "top_k")
    min_p = get("min_p", _is_num, "a number", 0.0)
    if not 0 <= min_p <= 1:
        raise ApiError(400, f"'min_p' must be in [0, 1], got {min_p}", "min_p")
    seed = get("seed", _is_int, "an integer")
    if seed is not None and seed < 0:
        raise ApiError(400, f"'seed' must be >= 0, got {seed}", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    for s in stop:
        _utf8(s, "stop")
    try:  # the generator's own rules (a temperature too small to invert, top_k's range...)
        SamplingParams(float(temperature), float(top_p), top_k, seed, float(min_p))
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split()[0]) from None
    stream = get("stream", lambda v: isinstance(v, bool), "a boolean", False)
    opts = get("stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", "stream_options")
    if kind == "chat":  # logprobs: a boolean; top_logprobs: how many alternatives
        want = get("logprobs", lambda v: isinstance(v, bool), "a boolean", False)
        top = get("top_logprobs", _is_int, "an integer")
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want else None
        key = "top_logprobs"
    else:  # logprobs: how many alternatives (0: the chosen token's alone)
        logprobs = get("logprobs", _is_int, "an integer")
        key = "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'{key}' must be in [0, {MAX_LOGPROBS}], got {logprobs}", key)
    penalties = {}
    for key in ("presence_penalty", "frequency_penalty"):
        penalties[key] = get(key, _is_num, "a number", 0.0)
        if not -2 <= penalties[key] <= 2:
            raise ApiError(400, f"'{key}' must be in [-2, 2], got {penalties[key]}", key)
    raw_bias = get("logit_bias", lambda v: isinstance(v, dict), "an object of token id -> bias", {})
    bias = {}
    for t, b in raw_bias.items():
        if not (t.isascii() and t.isdigit() and len(t) <= 10 and int(t) < vocab_size):
            raise ApiError(400, f"'logit_bias' key {json.dumps(t)[:40]} is not a token id in [0, {vocab_size})",
                           "logit_bias")
        if not (_is_num(b) and -100 <= b <= 100):
            raise ApiError(400, f"'logit_bias' of token {t} must be a number in [-100, 100], got "
                                f"{json.dumps(b)[:40]}", "logit_bias")
        bias[int(t)] = float(b)
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n = {n} asks for {len(prompts) * n} choices, more than "
                            f"{MAX_CHOICES}", "prompt")
    tools, tool_choice, parallel = None, body.get("tool_choice", "auto"), False
    if kind == "chat" and body.get("tools") is not None:
        try:
            tools = parse_tools(body["tools"])
            choice = parse_tool_choice(tool_choice, tools)
        except ValueError as e:
            raise ApiError(400, str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
        parallel = get("parallel_tool_calls", lambda v: isinstance(v, bool), "a boolean", False)
        if choice == "none":
            tools = None
        elif logprobs is not None:
            raise ApiError(400, "'logprobs' are not given with tools", "logprobs")
        elif choice != "auto":
            if grammar is not None:
                raise ApiError(400, f"tool_choice {json.dumps(tool_choice)} constrains the reply to tool calls: "
                                    "drop response_format", "response_format")
            try:  # (the generator builds it again for each choice; a schema it refuses is refused here)
                tool_grammar(tools, choice, parallel)
            except ImportError as e:
                raise ApiError(400, f"this server cannot constrain output: {e}", "tool_choice",
                               "unsupported_parameter") from None
            except ValueError as e:
                raise ApiError(400, f"'tools': {e}", "tools") from None
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
    return _Params(kind, prompts, max_tokens, float(temperature), float(top_p), top_k, seed, float(min_p), stop,
                   stream, include_usage, logprobs, echo, float(penalties["presence_penalty"]),
                   float(penalties["frequency_penalty"]), bias, n, grammar, tools, tool_choice, parallel)


def _response_format(fmt: Any) -> Grammar | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
    "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}}}``; the last two become a :class:`Grammar` for the output."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}, "
                            f"got {json.dumps(fmt)[:80]}", "response_format")
    if fmt["type"] == "text":
        return None
    schema = None
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "'response_format.json_schema' must be an object with the 'schema'",
                           "response_format")
        if not isinstance(spec.get("name", ""), str):
            raise ApiError(400, "'response_format.json_schema.name' must be a string", "response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON Schema object",
                           "response_format")
        if not isinstance(spec.get("strict", False), bool):
            raise ApiError(400, "'response_format.json_schema.strict' must be a boolean", "response_format")
    try:
        return Grammar.json(schema, strict=fmt["type"] == "json_schema" and fmt["json_schema"].get("strict", False))
    except ImportError as e:
        raise ApiError(400, f"this server cannot constrain output: {e}", "response_format",
                       "unsupported_parameter") from None
    except ValueError as e:
        raise ApiError(400, f"'response_format': {e}", "response_format") from None


def _completion_prompts(prompt: Any, vocab_size: int, key: str = "prompt") -> list[str | list[int]]:
    """A completions ``prompt`` (or an embeddings ``input``): a string, a list of token ids,
    or a list of several of either (one choice each, in order); each is checked (UTF-8, ids
    in the vocabulary)."""
    if prompt is None:
        raise ApiError(400, f"'{key}' is required", key)
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt):
        raise ApiError(400, f"'{key}' must be a string, a list of token ids, or a non-empty list of either", key)
    for k, one in enumerate(prompt):
        where = key if len(prompt) == 1 else f"{key}[{k}]"
        if isinstance(one, list) and one and all(_is_int(t) for t in one):
            bad = next((t for t in one if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"'{where}' holds token id {bad}, outside the vocabulary of {vocab_size}", key)
        elif isinstance(one, str):
            if not one:
                raise ApiError(400, f"'{where}' must not be empty", key)
            _utf8(one, key)
        else:
            raise ApiError(400, f"'{where}' must be a string or a non-empty list of token ids", key)
    return prompt


MAX_EMBEDDING_INPUTS = 2048  # (OpenAI's limit)


def _parse_embeddings(body: Any, model_id: str, vocab_size: int, width: int) -> _Params:
    """An embeddings request: ``input`` (as a completions prompt), ``encoding_format``
    ("float" or "base64"), ``dimensions`` (only the model's own width)."""
    _check_model(body, model_id)
    inputs = _completion_prompts(body.get("input"), vocab_size, "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"'input' holds {len(inputs)} inputs, more than {MAX_EMBEDDING_INPUTS}", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {json.dumps(fmt)[:40]}",
                       "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims != width):
        raise ApiError(400, f"'dimensions' must be this model's width, {width}, got {json.dumps(dims)[:40]}",
                       "dimensions")
    return _Params("embeddings", inputs, None, encoding_format=fmt)


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, checked: ``[{"id", "type": "function",
    "function": {"name", "arguments": JSON text}}]``."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)
                and c.get("type", "function") == "function" and isinstance(c.get("id", ""), str)):
            raise ApiError(400, f"{where}[{j}] must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                                "'arguments': JSON text}}}}", where)
        _utf8(f["arguments"], where)
        out.append({"id": c.get("id", ""), "type": "function",
                    "function": {"name": f["name"], "arguments": f["arguments"]}})
    return out


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> the ``[{"role", "content"}]`` strings the chat template takes.
    Content may be a string or a list of text parts; ``developer`` is a system turn."""
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of message objects", "messages")
    out = []
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = m.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"{where}.role must be one of {sorted(_ROLES)}, got {json.dumps(role)}",
                           f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content[{j}] must be a text part "
                                   "({'type': 'text', 'text': ...}); other parts are not supported",
                                   f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        _utf8(content, f"{where}.content")
        message: dict[str, Any] = {"role": _ROLES[role], "content": content}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise ApiError(400, f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


#: The most choices one request may ask for (``n``, times the prompts of a completions request).
MAX_CHOICES = 64

#: Request bodies above this size are refused (413) while they are read.
MAX_BODY_BYTES = 32 << 20


def prompt_byte_limit(generator: Generator) -> int:
    """A size no prompt text that fits the context can exceed: every token stands for at most
    as many bytes as its vocabulary piece takes in UTF-8 (byte-level and SentencePiece pieces
    alike), times 4 for normalizations that shrink text, plus 64 KiB."""
    tok = generator.tokenizer
    longest = max((len(tok.id_to_piece(i).encode("utf-8", "replace")) for i in range(tok.vocab_size)), default=1)
    return 4 * generator.target.context * max(longest, 1) + (64 << 10)


def _prompt_bytes(prompt: str | list[dict[str, str]] | list[int]) -> int:
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8"))
    if not isinstance(prompt[0], dict):
        return 0  # token ids: the engine counts them exactly
    return sum(len(m["content"].encode("utf-8")) + sum(len(c["function"]["arguments"].encode("utf-8"))
                                                       for c in m.get("tool_calls", ())) for m in prompt)


# -- the engine --------------------------------------------------------------------------

@dataclass
class _Job:
    """One request on its way through the engine. Events go from the worker thread to the
    request's event loop: ("start",), ("piece", text, log-probabilities, choice),
    ("tools", index, [ToolCall]) when a choice called tools, ("choice", index, stats) at
    the end of each choice, ("done", [stats of each choice]),
    ("error", ApiError), and ("gone",) from the disconnect watcher."""

    params: _Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_piece: float = 0.0  # when the first text was handed on (0: not yet)

    def emit(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# A prompt continues a slot's conversation when it holds all of it but this many tokens (the
# reply's last tokens can encode differently once it is text in the next prompt).
CONTINUE_SLACK = 8


def choose_slot(slots: Sequence[tuple[int, int]], last_used: Sequence[float]) -> int:
    """The cache slot for a prompt, from each slot's (tokens held, tokens of the prompt it
    holds) and the time it was last used:

    1. a slot whose conversation the prompt continues (it holds all of it but
       ``CONTINUE_SLACK`` tokens, and at least half), the longest such;
    2. else an empty slot, so that a new conversation does not push out one that is
       going on (two conversations may share a system prompt and a short first turn);
    3. else a slot whose conversation the prompt would keep at least half of (the same
       conversation with its last turn edited), the one holding most of it;
    4. else the least recently used slot, whose conversation it replaces.

    Ties go to the most recently used slot (rules 1 and 3) or the lowest index (rule 2)."""
    idx = range(len(slots))
    cont = [s for s in idx if slots[s][0] > 0 and slots[s][1] >= slots[s][0] - CONTINUE_SLACK
            and 2 * slots[s][1] >= slots[s][0]]
    if cont:
        return max(cont, key=lambda s: (slots[s][1], last_used[s]))
    empty = [s for s in idx if slots[s][0] == 0]
    if empty:
        return empty[0]
    keep = [s for s in idx if 2 * slots[s][1] >= slots[s][0]]
    if keep:
        return max(keep, key=lambda s: (slots[s][1], last_used[s]))
    return min(idx, key=lambda s: last_used[s])


class Metrics:
    """Counters and latency histograms of served requests, written in Prometheus' text
    format by :meth:`render` (``GET /metrics``)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    COUNTERS = {"prompt_tokens": "prompt tokens of served requests (each prompt once)",
                "cached_prompt_tokens": "prompt tokens whose K/V were reused from the call before",
                "generation_tokens": "tokens generated for served requests",
                "target_calls": "target model calls while decoding (generation tokens / calls = tau)",
                "lookup_steps": "target calls that verified a chain copied from the context or the corpus",
                "lookup_accepted": "chain tokens those calls accepted",
                "corpus_steps": "of the lookup steps, chains from the corpus",
                "corpus_accepted": "corpus chain tokens accepted",
                "prefill_seconds": "seconds spent reading prompts",
                "decode_seconds": "seconds spent generating"}
    HISTOGRAMS = {"request_seconds": "from arrival to the last token",
                  "queue_seconds": "from arrival to the start of generation",
                  "first_token_seconds": "from arrival to the first text handed on"}

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals = dict.fromkeys(self.COUNTERS, 0.0)
        self.hist = {name: [[0] * len(self.BUCKETS), 0.0, 0] for name in self.HISTOGRAMS}

    def record(self, job: _Job, choices: list[GenerationStats]) -> None:
        """A served request: its choices' numbers and its latencies."""
        now = time.perf_counter()
        n = job.params.n
        with self._lock:
            t = self.totals
            t["prompt_tokens"] += sum(c.prompt_tokens for c in choices[::n])
            t["cached_prompt_tokens"] += sum(c.cached_prompt_tokens for c in choices[::n])
            t["generation_tokens"] += sum(c.new_tokens for c in choices)
            t["target_calls"] += sum(c.target_calls for c in choices)
            for name in ("lookup_steps", "lookup_accepted", "corpus_steps", "corpus_accepted"):
                t[name] += sum(getattr(c, name) for c in choices)
            t["prefill_seconds"] += sum(c.prefill_s for c in choices)
            t["decode_seconds"] += sum(c.decode_s for c in choices)
            self._observe("request_seconds", now - job.submitted)
            self._observe("queue_seconds", job.started - job.submitted)
            if job.first_piece:
                self._observe("first_token_seconds", job.first_piece - job.submitted)

    def _observe(self, name: str, seconds: float) -> None:
        h = self.hist[name]
        for i, edge in enumerate(self.BUCKETS):
            if seconds <= edge:
                h[0][i] += 1
        h[1] += seconds
        h[2] += 1

    def render(self, gauges: dict[str, tuple[str, float]], counts: dict[str, int],
               extra: dict[str, tuple[str, float]]) -> str:
        """The text format: ``gauges`` and ``extra`` counters as name -> (help, value)."""
        out = ["# HELP dovetail_requests_total requests by outcome", "# TYPE dovetail_requests_total counter"]
        out += [f'dovetail_requests_total{{outcome="{k}"}} {v}' for k, v in counts.items()]
        with self._lock:
            counters = {**{k: (self.COUNTERS[k], v) for k, v in self.totals.items()}, **extra}
            for name, (text, value) in counters.items():
                out += [f"# HELP dovetail_{name}_total {text}", f"# TYPE dovetail_{name}_total counter",
                        f"dovetail_{name}_total {value:g}"]
            for name, (text, value) in gauges.items():
                out += [f"# HELP dovetail_{name} {text}", f"# TYPE dovetail_{name} gauge", f"dovetail_{name} {value:g}"]
            for name, text in self.HISTOGRAMS.items():
                buckets, total, count = self.hist[name]
                out += [f"# HELP dovetail_{name} {text}", f"# TYPE dovetail_{name} histogram"]
                out += [f'dovetail_{name}_bucket{{le="{edge:g}"}} {c}' for edge, c in zip(self.BUCKETS, buckets)]
                out += [f'dovetail_{name}_bucket{{le="+Inf"}} {count}', f"dovetail_{name}_sum {total:g}",
                        f"dovetail_{name}_count {count}"]
        return "\n".join(out) + "\n"


class Engine:
    """Runs jobs in arrival order: one at a time on one worker thread, or with a
    :class:`~dovetail_ext.batching.SequenceBatcher` one per sequence on as many workers, whose
    decode steps the batcher joins into one engine call.

    ``history`` holds (job id, start, end) of recent jobs (``time.perf_counter``);
    ``counts`` the number of served, cancelled and failed jobs; ``metrics`` the token counts
    and latencies of the served ones (``GET /metrics``).
    """

    def __init__(self, generator: Generator, speculative: bool | None = None, batcher: Any = None,
                 cache_slots: int = 1) -> None:
        self.batcher = batcher
        self.cache_slots = cache_slots
        self._slot_used: dict[int, float] = {}
        # (sequences decode plainly: speculation verifies trees per sequence, one call each)
        self.generators = [generator] if batcher is None else \
            [batcher.generator(s, generator.source) for s in range(batcher.engine.sequences)]
        self.speculative = speculative if batcher is None else False
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.metrics = Metrics()
        self.history: deque[tuple[str, float, float]] = deque(maxlen=256)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._current: dict[int, _Job] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return bool(self._current)

    @property
    def running(self) -> int:
        """Jobs being generated now."""
        return len(self._current)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if not self._threads or not all(t.is_alive() for t in self._threads):
                self._threads = [threading.Thread(target=self._work, args=(i,), name=f"dovetail-engine-{i}",
                                                  daemon=True) for i in range(len(self.generators))]
                for t in self._threads:
                    t.start()
        self._queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        """Cancels the running and waiting jobs and stops the workers."""
        with self._lock:
            threads, self._threads = self._threads, []
        if not threads:
            return
        for current in list(self._current.values()):
            current.cancelled.set()
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join(timeout)

    def _work(self, worker: int) -> None:
        gen = self.generators[worker]
        while True:
            job = self._queue.get()
            if job is None:
                break
            self._current[worker] = job
            job.started = time.perf_counter()
            try:
                self._run(job, gen)
            except Exception as e:  # noqa: BLE001 - any failure is answered, and the worker goes on
                gen.reset()  # the cache may describe a half-run step
                self._count("failed")
                job.emit(("error", _internal(e)))
            finally:
                if self.batcher is not None:
                    self.batcher.idle(worker)  # (the other sequences' steps stop waiting for this one)
                self.history.append((job.id, job.started, time.perf_counter()))
                del self._current[worker]
        # Jobs left behind by close() get an answer instead of waiting for ever.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(("error", ApiError(503, "the server is shutting down", type="server_error",
                                            code="shutting_down")))

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def _run(self, job: _Job, gen: Generator) -> None:
        if job.cancelled.is_set():
            self._count("cancelled")
            return
        p = job.params
        if p.kind == "embeddings":
            return self._embed(job, gen)
        raw = p.kind == "completion"
        param = "messages" if p.kind == "chat" else "prompt"
        context = gen.target.context
        encoded = []  # each prompt's token ids, encoded once: the choices and the echo take them raw
        for k, prompt in enumerate(p.prompts):  # (every prompt is checked before any is run)
            where = param if len(p.prompts) == 1 else f"{param}[{k}]"
            try:
                encoded.append(gen.encode_prompt(prompt, raw=raw, tools=p.tools))
                n_prompt = len(encoded[-1])
            except ValueError as e:
                self._count("failed")
                job.emit(("error", ApiError(400, f"could not build the {where}: {e}", param)))
                return
            if n_prompt >= context + (p.echo and p.max_tokens == 0):  # (scoring alone needs no room for a new token)
                self._count("failed")
                job.emit(("error", ApiError(
                    400, f"the {where} has {n_prompt} tokens and does not fit this model's context of "
                         f"{context} tokens (which must also hold at least one new token)", param,
                    "context_length_exceeded")))
                return
        if self.cache_slots > 1:
            self._pick_slot(gen, encoded[0])
        job.emit(("start",))
        choices = []
        for prompt, ids in zip(p.prompts, encoded):
            echo = None
            if p.echo:  # the prompt first, scored when log-probabilities are asked for (it is then cached)
                scored = gen.prompt_logprobs(ids, raw=True, top=p.logprobs)[1] if p.logprobs is not None else []
                echo = (prompt if isinstance(prompt, str) else gen.tokenizer.decode(ids), scored)
            for i in range(p.n):  # one after another; the i-th choice of a prompt samples with seed + i
                index = len(choices)
                if echo is not None:
                    job.emit(("piece", echo[0], echo[1], index))
                stats = self._choice(job, gen, ids, index, None if p.seed is None else p.seed + i, param, context)
                if stats is None:
                    return
                choices.append(stats)
                job.emit(("choice", index, stats))
        self._count("served")
        self.metrics.record(job, choices)
        job.emit(("done", choices))

    def _pick_slot(self, gen: Generator, ids: list[int]) -> None:
        """Move ``gen`` to the cache slot for a prompt (:func:`choose_slot`)."""
        slots = range(self.cache_slots)
        slot = choose_slot([(len(gen.cached_tokens(s)), gen.cached_prefix(ids, s)) for s in slots],
                           [self._slot_used.get(s, 0.0) for s in slots])
        gen.use_sequence(slot)
        self._slot_used[slot] = time.perf_counter()

    def _embed(self, job: _Job, gen: Generator) -> None:
        """An embeddings job: ("start",), then ("embeddings", vectors [n, D], prompt tokens)."""
        try:
            ids = [gen.encode_prompt(x, raw=True) for x in job.params.prompts]
            vectors = gen.embed(ids)
        except ValueError as e:
            self._count("failed")
            job.emit(("error", ApiError(400, str(e), "input")))
            return
        job.emit(("start",))
        self._count("served")
        self.metrics.record(job, [GenerationStats(prompt_tokens=sum(len(i) for i in ids))])
        job.emit(("embeddings", vectors, sum(len(i) for i in ids)))

    def _choice(self, job: _Job, gen: Generator, ids: list[int], index: int, seed: int | None, param: str,
                context: int) -> GenerationStats | None:
        """One choice's generation from the prompt's token ids, its pieces handed on as
        events; its stats, or None when it ended the job (the client gone, or an argument
        refused)."""
        p = job.params
        pieces = gen.stream(ids, max_new_tokens=context if p.max_tokens is None else p.max_tokens,
                            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=seed,
                            stop=p.stop, raw=True, speculative=self.speculative, logprobs=p.logprobs,
                            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                            logit_bias=p.logit_bias, grammar=p.grammar, tools=p.tools,
                            tool_choice=p.tool_choice, parallel_tool_calls=p.parallel_tool_calls)
        # Each piece takes the log-probabilities of the tokens whose text it completes: text held
        # back (a possible stop string, part of a character) keeps its tokens' back too.
        sent, emitted, ends, decoder = 0, 0, [], gen.tokenizer.stream_decoder()
        try:
            for piece in pieces:
                if job.cancelled.is_set():  # checked between tokens: the client has gone
                    pieces.close()
                    self._count("cancelled")
                    return None
                if not job.first_piece:
                    job.first_piece = time.perf_counter()
                for e in gen.last_logprobs[len(ends):]:
                    ends.append((ends[-1] if ends else 0) + len(decoder.push(e.token)))
                emitted += len(piece)
                done = sent
                while done < len(ends) and ends[done] <= emitted:
                    done += 1
                job.emit(("piece", piece, gen.last_logprobs[sent:done], index))
                sent = done
        except ValueError as e:  # arguments the request parser let through
            gen.reset()
            self._count("failed")
            job.emit(("error", ApiError(400, str(e), param)))
            return None
        if sent < len(gen.last_logprobs):  # (tokens whose text a stop string left out)
            job.emit(("piece", "", gen.last_logprobs[sent:], index))
        if gen.last_tool_calls:
            job.emit(("tools", index, list(gen.last_tool_calls)))
        return replace(gen.last_stats)


# -- responses ---------------------------------------------------------------------------

def _finish_reason(stats: GenerationStats, calls: bool = False) -> str:
    return "tool_calls" if calls else "length" if stats.stop_reason in ("length", "context") else "stop"


def _usage(choices: list[GenerationStats], n: int) -> dict[str, int]:
    """Each prompt once (its n choices come in a row), the completion tokens of every choice."""
    prompt, completion = sum(s.prompt_tokens for s in choices[::n]), sum(s.new_tokens for s in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timing(choices: list[GenerationStats], job: _Job) -> dict[str, Any]:
    """The engine's numbers for a request: sums over its choices (one with n = 1), the first
    choice's prompt caching, the last one's stop reason."""
    new, decode_s = sum(s.new_tokens for s in choices), sum(s.decode_s for s in choices)
    calls = sum(s.target_calls for s in choices)
    return {"mode": choices[0].mode, "tokens_per_s": new / decode_s if decode_s > 0 else 0.0,
            "acceptance_length": sum(s.acceptance_length * s.target_calls for s in choices) / calls if calls else 0.0,
            "prefill_s": sum(s.prefill_s for s in choices), "decode_s": decode_s,
            "queue_s": job.started - job.submitted, "cached_prompt_tokens": choices[0].cached_prompt_tokens,
            "target_calls": calls, "lookup_steps": sum(s.lookup_steps for s in choices),
            "corpus_steps": sum(s.corpus_steps for s in choices), "stop_reason": choices[-1].stop_reason}


class _Reply:
    """OpenAI's objects for one request (ids, chunk and completion shapes). With ``tokenizer``
    (a request for log-probabilities) the chunks and the whole reply carry them."""

    def __init__(self, kind: str, model: str, tokenizer: Any = None) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.tokenizer = tokenizer
        # completions' text_offset, per choice: a decoder and the characters before its next token
        self._offsets: dict[int, list] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _token(self, token: int) -> tuple[str, list[int] | None]:
        """A token's text and bytes (``Tokenizer.token_bytes``); a token that is part of a
        character is written as its bytes, ``bytes:\\xe2\\x80``, as OpenAI writes them."""
        raw = self.tokenizer.token_bytes(token)
        if raw is None:
            return self.tokenizer.decode([token]), None
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def logprobs(self, entries: list[TokenLogprob], index: int = 0) -> dict[str, Any] | None:
        """The ``logprobs`` object of choice ``index`` for these tokens (None without a request)."""
        if self.tokenizer is None:
            return None
        if self.kind == "chat":
            content = []
            for e in entries:
                text, raw = self._token(e.token)
                top = []
                for i, lp in e.top:
                    t, b = self._token(i)
                    top.append({"token": t, "logprob": lp, "bytes": b})
                content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content, "refusal": None}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = self._offsets.setdefault(index, [self.tokenizer.stream_decoder(), 0])
        tok = self.tokenizer
        for e in entries:  # (an echoed prompt's first token has no log-probability: null)
            out["tokens"].append(self._token(e.token)[0])
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(None if e.logprob is None else {self._token(i)[0]: lp for i, lp in e.top})
            out["text_offset"].append(at[1])
            if e.logprob is None and tok.add_bos and e.token == tok.bos_id:
                continue  # (the BOS the tokenizer put before an echoed prompt is not in its text)
            at[1] += len(at[0].push(e.token))
        return out

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None, index: int = 0,
              calls: list[ToolCall] | None = None) -> dict[str, Any]:
        lp = self.logprobs(logprobs, index) if logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:  # each call whole, in one chunk
                delta["tool_calls"] = [{"index": i, **c.spec()} for i, c in enumerate(calls)]
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def whole(self, texts: list[str], choices: list[GenerationStats], job: _Job,
              logprobs: list[list[TokenLogprob]], calls: dict[int, list[ToolCall]]) -> dict[str, Any]:
        out = []
        for index, (text, stats, lps) in enumerate(zip(texts, choices, logprobs)):
            lp = self.logprobs(lps, index)
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if index in calls:
                    message["content"] = text or None
                    message["tool_calls"] = [c.spec() for c in calls[index]]
                out.append({"index": index, "message": message, "logprobs": lp,
                            "finish_reason": _finish_reason(stats, index in calls)})
            else:
                out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": _finish_reason(stats)})
        head = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        return {**head, "choices": out, "usage": _usage(choices, job.params.n), "dovetail": _timing(choices, job)}

    def usage_chunk(self, choices: list[GenerationStats], job: _Job) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(choices, job.params.n),
                "dovetail": _timing(choices, job)}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(Response):
    """Server-sent events from an async iterator of bytes. Unlike Starlette's streaming
    response it never reads the receive channel (the request's disconnect watcher owns
    it) and calls ``on_close`` however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.events, self.on_close = events, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.on_close()


# -- the app -----------------------------------------------------------------------------

def default_model_id(generator: Generator) -> str:
    """The id a generator is served under: its model file or directory name."""
    path = getattr(generator.source, "path", None)
    if path:
        p = Path(path)
        return p.stem if p.suffix == ".gguf" else p.name
    return generator.source.name or "dovetail"


async def _watch_disconnect(receive: Receive, job: _Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            job.events.put_nowait(("gone",))
            return


def create_app(generator: Generator, model_id: str | None = None, speculative: bool | None = None,
               api_key: str | None = None, parallel: int = 1, cache_slots: int = 1) -> Starlette:
    """The ASGI app serving ``generator``.

    Args:
        generator: from :func:`dovetail_ext.load`; only the app's worker thread uses it
            from now on.
        model_id: the name clients pass as ``model`` (default :func:`default_model_id`).
        speculative: None speculates when the generator has a draft (without one, by prompt
            lookup when the generator has it on); False never does.
        api_key: when given, every ``/v1`` request must carry ``Authorization: Bearer
            <api_key>`` (401 otherwise, before its body is read); ``/health`` and ``/metrics`` stay open.
        parallel: requests generated at once (default 1). Above 1 the generator's target
            must hold that many sequences (``load(..., sequences=N)``): each request gets one,
            and their decode steps run together, one pass over the weights for all
            (``batching.SequenceBatcher``); they decode plainly.
        cache_slots: conversations whose K/V stay cached at once (default 1; with parallel
            1 only). Above 1 the generator's target must hold that many sequences: each
            request goes to the slot holding the longest part of its prompt (a slot whose
            conversation it continues), or else to an empty or the least recently used
            slot, so conversations that take turns are each read once.

    The engine is ``app.state.engine`` (:class:`Engine`); it stops with the app's lifespan.
    """
    model_id = model_id or default_model_id(generator)
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string (or None: no key)")
    parallel = as_int("parallel", parallel)
    cache_slots = as_int("cache_slots", cache_slots, lo=1)
    if cache_slots > 1 and parallel > 1:
        raise ValueError("cache_slots above 1 is for parallel 1 (parallel requests each keep a sequence)")
    if cache_slots > 1 and getattr(generator.target, "sequences", 1) < cache_slots:
        raise ValueError(f"cache_slots={cache_slots} needs a generator whose target holds {cache_slots} sequences "
                         f"(load(..., sequences={cache_slots})), not {getattr(generator.target, 'sequences', 1)}")
    batcher = None
    if parallel > 1:
        from .batching import SequenceBatcher
        if not isinstance(generator.target, TargetEngine) or generator.target.sequences != parallel:
            raise ValueError(f"parallel={parallel} needs a generator whose target holds {parallel} sequences "
                             f"(load(..., sequences={parallel})), not {getattr(generator.target, 'sequences', 1)}")
        batcher = SequenceBatcher(generator.target)
    engine = Engine(generator, speculative, batcher, cache_slots)
    created = int(time.time())
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "dovetail"}

    max_prompt_bytes = prompt_byte_limit(generator)

    async def read_body(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as e:  # (JSONDecodeError, UnicodeDecodeError; nesting, huge ints)
            raise ApiError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}") from None

    def refuse_oversized(n_bytes: int, param: str) -> None:
        """A prompt whose text the context cannot hold is refused before the engine spends
        time tokenizing it."""
        if n_bytes > max_prompt_bytes:
            raise ApiError(400, f"'{param}' holds {n_bytes} bytes of text, more than the model's context of "
                                f"{generator.target.context} tokens can hold", param, "context_length_exceeded")

    async def embeddings(request: Request) -> Response:
        params = _parse_embeddings(await read_body(request), model_id, generator.config.vocab_size,
                                   generator.config.hidden_size)
        refuse_oversized(max(_prompt_bytes(x) for x in params.prompts), "input")
        job = _Job(params, asyncio.get_running_loop())
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job))
        try:
            engine.submit(job)
            while True:
                event = await job.events.get()
                if event[0] == "embeddings":
                    vectors, tokens = event[1], event[2]
                    data = [{"object": "embedding", "index": i,
                             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                             if params.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
                    return JSONResponse({"object": "list", "data": data, "model": model_id,
                                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
                if event[0] == "error":
                    raise event[1]
                if event[0] == "gone":
                    return Response(status_code=499)
        finally:
            watcher.cancel()

    async def completions(request: Request, kind: str) -> Response:
        body = await read_body(request)
        params = _parse(body, kind, model_id, generator.config.vocab_size)
        refuse_oversized(max(_prompt_bytes(prompt) for prompt in params.prompts) +
                         sum(len(json.dumps(t.spec()).encode("utf-8")) for t in params.tools or ()),
                         "messages" if kind == "chat" else "prompt")
        job = _Job(params, asyncio.get_running_loop())
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job))
        handed_over = False
        try:
            engine.submit(job)
            event = await job.events.get()
            if event[0] == "error":
                raise event[1]
            if event[0] == "gone":
                return Response(status_code=499)  # nobody reads it
            reply = _Reply(kind, model_id, generator.tokenizer if params.logprobs is not None else None)
            if params.stream:
                handed_over = True
                return _EventStream(_stream(job, reply), watcher.cancel)
            count = len(params.prompts) * params.n
            texts, entries = [[] for _ in range(count)], [[] for _ in range(count)]
            calls: dict[int, list[ToolCall]] = {}
            while True:
                event = await job.events.get()
                if event[0] == "piece":
                    texts[event[3]].append(event[1])
                    entries[event[3]].extend(event[2])
                elif event[0] == "tools":
                    calls[event[1]] = event[2]
                elif event[0] == "choice":
                    continue
                elif event[0] == "done":
                    return JSONResponse(reply.whole(["".join(t) for t in texts], event[1], job, entries, calls))
                elif event[0] == "error":
                    raise event[1]
                else:
                    return Response(status_code=499)
        finally:
            if not handed_over:
                watcher.cancel()

    async def _stream(job: _Job, reply: _Reply) -> AsyncIterator[bytes]:
        done = False
        called: set[int] = set()  # choices that called tools
        try:
            if reply.kind == "chat":
                for index in range(len(job.params.prompts) * job.params.n):
                    yield _sse(reply.chunk("", role=True, index=index))
            while True:
                event = await job.events.get()
                if event[0] == "piece":
                    yield _sse(reply.chunk(event[1], logprobs=event[2], index=event[3]))
                elif event[0] == "tools":
                    called.add(event[1])
                    yield _sse(reply.chunk(None, index=event[1], calls=event[2]))
                elif event[0] == "choice":  # one choice ends: its finish reason and numbers
                    index, stats = event[1], event[2]
                    yield _sse({**reply.chunk(None if reply.kind == "chat" else "",
                                              _finish_reason(stats, index in called), index=index),
                                "dovetail": _timing([stats], job)})
                elif event[0] == "done":
                    if job.params.include_usage:
                        yield _sse(reply.usage_chunk(event[1], job))
                    yield b"data: [DONE]\n\n"
                    done = True
                    return
                elif event[0] == "error":
                    done = True
                    yield _sse(event[1].body())
                    return
                else:
                    return
        finally:
            if not done:  # the client went away, or the server is stopping
                job.cancelled.set()

    async def chat(request: Request) -> Response:
        return await completions(request, "chat")

    async def completion(request: Request) -> Response:
        return await completions(request, "completion")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise ApiError(404, f"the model '{request.path_params['model']}' does not exist", "model",
                           "model_not_found")
        return JSONResponse(model_card)

    async def metrics(request: Request) -> Response:
        gauges = {"requests_running": ("requests being generated", engine.running),
                  "requests_queued": ("requests waiting for the engine", engine.queued)}
        extra = {} if batcher is None else {
            "batched_calls": ("engine calls that decoded several sequences' tokens together", batcher.calls),
            "batched_tokens": ("tokens decoded in those calls", batcher.rows)}
        return Response(engine.metrics.render(gauges, engine.counts, extra),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: Request) -> Response:
        batched = {} if batcher is None else {"batched_calls": batcher.calls, "batched_tokens": batcher.rows}
        return JSONResponse({"status": "ok", "model": model_id, "busy": engine.busy, "queued": engine.queued,
                             "parallel": parallel, "cache_slots": cache_slots, "running": engine.running, **batched,
                             **engine.counts})

    def keyed(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """``handler`` behind the API key, when there is one (compared in constant time)."""
        if api_key is None:
            return handler

        async def checked(request: Request) -> Response:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            return await handler(request)
        return checked

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response() if isinstance(exc, ApiError) else _internal(exc).response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = Starlette(routes=[
        Route("/v1/chat/completions", keyed(chat), methods=["POST"]),
        Route("/v1/completions", keyed(completion), methods=["POST"]),
        Route("/v1/embeddings", keyed(embeddings), methods=["POST"]),
        Route("/v1/models", keyed(models), methods=["GET"]),
        Route("/v1/models/{model:path}", keyed(model), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: api_error},
        lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id
    return app


def serve(generator: Generator, *, host: str = "127.0.0.1", port: int = 8000, model_id: str | None = None,
          speculative: bool | None = None, log_level: str = "info", api_key: str | None = None,
          parallel: int = 1, cache_slots: int = 1) -> None:
    """Serves ``generator`` with uvicorn until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(create_app(generator, model_id, speculative, api_key, parallel, cache_slots), host=host, port=port,
                log_level=log_level)
