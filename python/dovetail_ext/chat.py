"""Multi-turn conversations on a :class:`~dovetail_ext.api.Generator`.

    from dovetail_ext import ChatSession, load

    chat = ChatSession(load(), system="You are terse.")
    print(chat.send("Name a prime.").text)
    for piece in chat.stream("And the next one?"):
        print(piece, end="", flush=True)

Each turn renders the whole history through the model's chat template; the generator's KV
cache keeps the prefix it shares with the last call, so a turn reads only its own new tokens.
When the history no longer leaves room for a reply in the context, the oldest exchanges are
dropped (the system message stays), and ``last_dropped`` says how many.

With ``tools`` the replies may call them (:mod:`dovetail_ext.tools`): a reply's calls join
the history with it (``result.tool_calls``), and :meth:`ChatSession.send_tool_results`
answers them and generates the reply that follows::

    chat = ChatSession(load(), tools=[{"type": "function", "function": {"name": "get_weather", ...}}])
    r = chat.send("Weather in Oslo?", tool_choice="required")
    r = chat.send_tool_results({c.id: get_weather(**json.loads(c.arguments)) for c in r.tool_calls})
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .api import GenerationResult, Generator
from .errors import as_int, check_text
from .tools import Tool, ToolCall, parse_tools

__all__ = ["ChatSession"]


@dataclass
class _Turn:
    messages: list[dict[str, Any]]  # the conversation sent, the new user message (or tool results) last
    ids: list[int]                  # its tokens, as the chat template renders it
    dropped: int                    # exchanges dropped to fit it
    epoch: int
    max_new_tokens: int


class ChatSession:
    """A conversation with a generator.

    Args:
        generator: what :func:`~dovetail_ext.load` returned.
        system: an optional system message, kept through every trim.
        reply_room: tokens kept free for each reply when old exchanges are dropped (default:
            a quarter of the context, or the turn's ``max_new_tokens`` when smaller).
        tools: functions the replies may call (OpenAI's ``tools`` list); each turn takes
            ``tool_choice`` and ``parallel_tool_calls`` as ``Generator.generate`` does.
    """

    def __init__(self, generator: Generator, system: str | None = None, reply_room: int | None = None,
                 tools: list | None = None) -> None:
        if not isinstance(generator, Generator):
            raise ValueError(f"generator must be a dovetail_ext Generator (from load()), got {type(generator).__name__}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {system!r}")
        self.generator = generator
        self.system = None if system is None else check_text(system, "the system message")
        self.reply_room = None if reply_room is None else as_int("reply_room", reply_room)
        self.tools: list[Tool] | None = None if tools is None else parse_tools(tools)
        # Exchanges: each a user message, then the assistant's replies and the tool results
        # between them.
        self._turns: list[dict[str, Any]] = []
        self.last_dropped = 0  # exchanges dropped to fit the last turn
        self._epoch = 0  # bumped by each turn and reset: only the latest turn may join the history

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far, the system message first."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self._turns]

    def _exchange_starts(self) -> list[int]:
        return [i for i, m in enumerate(self._turns) if m["role"] == "user"] + [len(self._turns)]

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self._epoch += 1
        self._turns = []
        self.last_dropped = 0

    def _fit(self, new: list[dict[str, Any]], max_new_tokens: int,
             tools: list[Tool] | None) -> tuple[list[dict[str, Any]], list[int], int]:
        """The messages for the next turn (``new`` after the history), the oldest exchanges
        dropped until the rendered prompt leaves the reply room in the context (the exchange
        under way and the new messages are never dropped), their token ids, and how many
        were dropped."""
        context = self.generator.target.context
        room = min(max_new_tokens, self.reply_room if self.reply_room is not None else context // 4)
        head = self.messages[:1] if self.system is not None else []
        starts = self._exchange_starts()
        keep_from = starts[-2] if new[0]["role"] == "tool" and len(starts) > 1 else len(self._turns)
        dropped = 0
        while True:
            msgs = head + self._turns[min(starts[dropped], keep_from):] + new
            ids = self.generator.encode_prompt(msgs, tools=tools)
            if starts[dropped] >= keep_from or len(ids) + room <= context:
                break
            dropped += 1
        return msgs, ids, dropped

    def _prepare(self, new: list[dict[str, Any]], max_new_tokens: int, kwargs: dict[str, Any]) -> _Turn:
        if "raw" in kwargs:
            raise ValueError("a chat renders its messages through the chat template; raw= does not apply")
        if "tools" in kwargs:
            raise ValueError("a ChatSession's tools are given when it is made: ChatSession(gen, tools=[...])")
        if kwargs.get("tool_choice", "auto") != "auto" and self.tools is None:
            raise ValueError("tool_choice needs tools: ChatSession(gen, tools=[...])")
        kwargs["tools"] = self.tools
        max_new_tokens = as_int("max_new_tokens", max_new_tokens, lo=0)
        tools = None if kwargs.get("tool_choice") == "none" else self.tools
        msgs, ids, dropped = self._fit(new, max_new_tokens, tools)
        self._epoch += 1  # (a turn started before this one can no longer change the history)
        return _Turn(msgs, ids, dropped, self._epoch, max_new_tokens)

    @staticmethod
    def _user(text: str) -> list[dict[str, Any]]:
        if not isinstance(text, str):
            raise ValueError(f"the message must be a string, got {type(text).__name__}")
        return [{"role": "user", "content": check_text(text, "the message")}]

    def stream(self, text: str, max_new_tokens: int = 512, **kwargs: Any) -> Iterator[str]:
        """Send a user message and yield the reply's text as it is decoded; the other
        arguments are :meth:`Generator.stream`'s (temperature, top_p, top_k, min_p, seed, stop,
        speculative, tree, logprobs, the penalties, logit_bias, grammar, and with the
        session's tools tool_choice and parallel_tool_calls). The reply (with its tool calls)
        joins the history when it ends; a reply cut
        short (the iterator closed, or Ctrl-C) joins as far as it got. A turn that fails
        (a message longer than the context) leaves the history as it was. The turn's stats
        are in ``generator.last_stats`` once the iterator is exhausted."""
        turn = self._prepare(self._user(text), max_new_tokens, kwargs)
        return self._stream(turn, kwargs)

    def _stream(self, turn: _Turn, kwargs: dict[str, Any]) -> Iterator[str]:
        pieces: list[str] = []
        it = self.generator.stream(turn.ids, max_new_tokens=turn.max_new_tokens, raw=True, **kwargs)
        try:
            for piece in it:
                pieces.append(piece)
                yield piece
        except (GeneratorExit, KeyboardInterrupt):
            if pieces:
                self._commit(turn, "".join(pieces), [])
            raise
        finally:
            it.close()
        self._commit(turn, "".join(pieces), self.generator.last_tool_calls)

    def send(self, text: str, max_new_tokens: int = 512, **kwargs: Any) -> GenerationResult:
        """:meth:`stream`, collected: the reply's text, its token ids and the turn's stats
        (and with tools, its ``tool_calls``)."""
        return self._send(self._prepare(self._user(text), max_new_tokens, kwargs), kwargs)

    def send_tool_results(self, results: Any, max_new_tokens: int = 512, **kwargs: Any) -> GenerationResult:
        """Answer the last reply's tool calls and generate the reply that follows, as
        :meth:`send` does. ``results``: ``{call id: result text}``, or (call id, text)
        pairs, one for each call of the last reply."""
        last = self._turns[-1] if self._turns else None
        calls = {c["id"]: c for c in last.get("tool_calls", ())} if last and last["role"] == "assistant" else {}
        if not calls:
            raise ValueError("the last reply called no tools: there are no results to send")
        pairs = list(results.items()) if isinstance(results, dict) else list(results)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[1], str) for p in pairs):
            raise ValueError("results must be {call id: text} or (call id, text) pairs")
        if sorted(i for i, _ in pairs) != sorted(calls):
            raise ValueError(f"results must answer each call of the last reply once: {sorted(calls)}, "
                             f"got {sorted(i for i, _ in pairs)}")
        new = [{"role": "tool", "tool_call_id": i, "content": check_text(text, f"the result of {i}")}
               for i, text in pairs]
        return self._send(self._prepare(new, max_new_tokens, kwargs), kwargs)

    def _send(self, turn: _Turn, kwargs: dict[str, Any]) -> GenerationResult:
        result = self.generator.generate(turn.ids, max_new_tokens=turn.max_new_tokens, raw=True, **kwargs)
        self._commit(turn, result.text, result.tool_calls)
        return result

    def _commit(self, turn: _Turn, reply: str, calls: list[ToolCall]) -> None:
        """The turn and its reply become the history, unless a later turn or a reset came
        after it (a stream closed late, by the garbage collector)."""
        if turn.epoch != self._epoch:
            return
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if calls:
            message["tool_calls"] = [c.spec() for c in calls]
        self._turns = [dict(m) for m in turn.messages[1 if self.system is not None else 0:]] + [message]
        self.last_dropped = turn.dropped
