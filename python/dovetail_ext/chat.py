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
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .api import GenerationResult, Generator
from .errors import as_int, check_text

__all__ = ["ChatSession"]


@dataclass
class _Turn:
    messages: list[dict[str, str]]  # the conversation sent, the new user message last
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
    """

    def __init__(self, generator: Generator, system: str | None = None, reply_room: int | None = None) -> None:
        if not isinstance(generator, Generator):
            raise ValueError(f"generator must be a dovetail_ext Generator (from load()), got {type(generator).__name__}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {system!r}")
        self.generator = generator
        self.system = None if system is None else check_text(system, "the system message")
        self.reply_room = None if reply_room is None else as_int("reply_room", reply_room)
        self._turns: list[dict[str, str]] = []  # user / assistant messages, alternating
        self.last_dropped = 0  # exchanges dropped to fit the last turn
        self._epoch = 0  # bumped by each turn and reset: only the latest turn may join the history

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation so far, the system message first."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self._turns]

    def reset(self) -> None:
        """Forget the exchanges (the system message stays)."""
        self._epoch += 1
        self._turns = []
        self.last_dropped = 0

    def _fit(self, text: str, max_new_tokens: int) -> tuple[list[dict[str, str]], list[int], int]:
        """The messages for the next turn, the oldest exchanges dropped until the rendered
        prompt leaves the reply room in the context (the new message itself is never dropped),
        their token ids, and how many were dropped."""
        context = self.generator.target.context
        room = min(max_new_tokens, self.reply_room if self.reply_room is not None else context // 4)
        head = self.messages[:1] if self.system is not None else []
        user = {"role": "user", "content": text}
        dropped = 0
        while True:
            msgs = head + self._turns[2 * dropped:] + [user]
            ids = self.generator.encode_prompt(msgs)
            if dropped * 2 >= len(self._turns) or len(ids) + room <= context:
                break
            dropped += 1
        return msgs, ids, dropped

    def _prepare(self, text: str, max_new_tokens: int, kwargs: dict[str, Any]) -> _Turn:
        if not isinstance(text, str):
            raise ValueError(f"the message must be a string, got {type(text).__name__}")
        if "raw" in kwargs:
            raise ValueError("a chat renders its messages through the chat template; raw= does not apply")
        if kwargs.get("tools") is not None or kwargs.get("tool_choice", "auto") != "auto":
            raise ValueError("a ChatSession keeps no tool calls or results: call Generator.generate(messages, "
                             "tools=...) with the conversation's messages")
        max_new_tokens = as_int("max_new_tokens", max_new_tokens, lo=0)
        msgs, ids, dropped = self._fit(check_text(text, "the message"), max_new_tokens)
        self._epoch += 1  # (a turn started before this one can no longer change the history)
        return _Turn(msgs, ids, dropped, self._epoch, max_new_tokens)

    def stream(self, text: str, max_new_tokens: int = 512, **kwargs: Any) -> Iterator[str]:
        """Send a user message and yield the reply's text as it is decoded; the other
        arguments are :meth:`Generator.stream`'s (temperature, top_p, top_k, min_p, seed, stop,
        speculative, tree, logprobs, the penalties, logit_bias, grammar; not tools). The
        exchange joins the history when the reply ends; a reply cut
        short (the iterator closed, or Ctrl-C) joins as far as it got. A turn that fails
        (a message longer than the context) leaves the history as it was. The turn's stats
        are in ``generator.last_stats`` once the iterator is exhausted."""
        turn = self._prepare(text, max_new_tokens, kwargs)
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
                self._commit(turn, "".join(pieces))
            raise
        finally:
            it.close()
        self._commit(turn, "".join(pieces))

    def send(self, text: str, max_new_tokens: int = 512, **kwargs: Any) -> GenerationResult:
        """:meth:`stream`, collected: the reply's text, its token ids and the turn's stats."""
        turn = self._prepare(text, max_new_tokens, kwargs)
        result = self.generator.generate(turn.ids, max_new_tokens=turn.max_new_tokens, raw=True, **kwargs)
        self._commit(turn, result.text)
        return result

    def _commit(self, turn: _Turn, reply: str) -> None:
        """The turn and its reply become the history, unless a later turn or a reset came
        after it (a stream closed late, by the garbage collector)."""
        if turn.epoch != self._epoch:
            return
        self._turns = [dict(m) for m in turn.messages[1 if self.system is not None else 0:]] + \
                      [{"role": "assistant", "content": reply}]
        self.last_dropped = turn.dropped
