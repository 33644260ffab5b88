"""Multi-turn conversations: ChatSession on the default model (with its shipped draft) and
`dovetail chat`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from dovetail_ext.chat import ChatSession


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    import dovetail_ext
    return dovetail_ext.load(default_gguf_path, context=256, threads=2)


def test_turns_equal_one_shot_generation_of_the_history(gen):
    """Each reply is what generate() gives for the whole history (greedy), while the turn
    reads only its new tokens (the rest is the cached prefix); the system message leads."""
    chat = ChatSession(gen, system="You are terse.")
    first = chat.send("Name a fruit.", max_new_tokens=12)
    second = chat.send("And a vegetable?", max_new_tokens=12)
    assert first.text and second.text
    assert second.stats.cached_prompt_tokens >= first.stats.prompt_tokens
    msgs = chat.messages
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == first.text and msgs[4]["content"] == second.text
    gen.reset()
    again = gen.generate(msgs[:4], max_new_tokens=12)
    assert again.tokens == second.tokens and again.stats.cached_prompt_tokens == 0
    streamed = ChatSession(gen, system="You are terse.")
    assert "".join(streamed.stream("Name a fruit.", max_new_tokens=12)) == first.text
    assert "".join(streamed.stream("And a vegetable?", max_new_tokens=12)) == second.text
    assert streamed.messages == msgs
    streamed.reset()
    assert streamed.messages == msgs[:1] and streamed.last_dropped == 0


def test_old_exchanges_are_dropped_to_fit_the_context(gen):
    """Past the context, the earliest exchanges go (the system message stays), each turn leaves
    its reply room, and a message the context cannot hold at all is refused without touching
    the history."""
    chat = ChatSession(gen, system="Answer in one word.", reply_room=16)
    dropped = []
    for i in range(12):
        chat.send(f"Question {i}: name a colour that is not {i}.", max_new_tokens=16)
        dropped.append(chat.last_dropped)
        assert len(gen.encode_prompt(chat.messages[:-1])) + 16 <= gen.target.context
    assert dropped[0] == 0 and max(dropped) >= 1
    msgs = chat.messages
    assert msgs[0] == {"role": "system", "content": "Answer in one word."}
    assert msgs[-2]["content"].startswith("Question 11") and not any("Question 0:" in m["content"] for m in msgs)
    with pytest.raises(ValueError, match="does not fit the context"):
        chat.send("word " * 400, max_new_tokens=4)
    assert chat.messages == msgs


def test_a_reply_cut_short_joins_the_history_as_far_as_it_got(gen):
    chat = ChatSession(gen)
    it = chat.stream("Count from one to twenty in words.", max_new_tokens=40)
    got = next(it) + next(it)
    it.close()
    assert chat.messages == [{"role": "user", "content": "Count from one to twenty in words."},
                             {"role": "assistant", "content": got}]
    assert chat.send("Go on.", max_new_tokens=4).text  # the generator is free for the next turn


def test_a_stream_closed_after_a_later_turn_changes_nothing(gen):
    """A stream left open and closed later (by the garbage collector) does not write over the
    turns that came after it, nor bring back a conversation that reset() cleared; a failed
    turn leaves last_dropped as the last successful turn set it."""
    chat = ChatSession(gen)
    old = chat.stream("Name a fruit.", max_new_tokens=8)
    next(old)
    chat.send("Name a colour.", max_new_tokens=4)
    after = chat.messages
    old.close()
    assert chat.messages == after and after[0]["content"] == "Name a colour."
    old = chat.stream("Name a fruit.", max_new_tokens=8)
    next(old)
    chat.reset()
    del old
    assert chat.messages == []
    chat.last_dropped = 3
    with pytest.raises(ValueError, match="does not fit the context"):
        chat.send("word " * 400)
    assert chat.last_dropped == 3 and chat.messages == []
    assert chat.send("Hi.", max_new_tokens=np.int64(2)).stats.new_tokens <= 2
    assert gen.generate("Hi.", max_new_tokens=np.int64(2)).stats.new_tokens <= 2


def test_bad_arguments_are_refused(gen):
    with pytest.raises(ValueError, match="generator must be"):
        ChatSession("model.gguf")
    with pytest.raises(ValueError, match="system must be"):
        ChatSession(gen, system=5)
    with pytest.raises(ValueError, match="reply_room"):
        ChatSession(gen, reply_room=0)
    chat = ChatSession(gen)
    with pytest.raises(ValueError, match="raw= does not apply"):
        chat.send("hi", raw=True)
    with pytest.raises(ValueError, match="must be a string"):
        chat.send(["hi"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        chat.send("hi", max_new_tokens=-1)
    with pytest.raises(ValueError, match="lone surrogate"):
        chat.send("a\udc80b")
    assert chat.messages == []


def test_cli_chat(gen, default_gguf_path, monkeypatch, capsys):
    """`dovetail chat` with piped turns: a line ending in a backslash goes on, /reset and /help
    are commands, a turn too long for the context is an error for that turn only, --json gives
    one object per turn; greedy replies equal the session's."""
    from dovetail_ext.cli import main
    turns = "Name a fruit.\nAnd a\\\nvegetable?\n/help\n\n" + "word " * 400 + "\n/reset\nName a fruit.\n"
    base = ["chat", "--model", str(default_gguf_path), "--context", "256", "--threads", "2",
            "--max-new-tokens", "12"]
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(base + ["--json"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 4]  # (turn 3 was refused)
    assert "does not fit the context" in out.err and "conversation cleared" in out.err and "/reset" in out.err
    chat = ChatSession(gen)
    want = [chat.send("Name a fruit.", max_new_tokens=12).text, chat.send("And a\nvegetable?", max_new_tokens=12).text]
    assert [r["text"] for r in rows] == want + want[:1]
    assert rows[1]["cached_prompt_tokens"] > 0 and rows[1]["dropped_exchanges"] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\n/exit\nNot read.\n"))
    assert main(base) == 0
    out = capsys.readouterr()
    assert out.out == want[0] + "\n" and out.err.count("new tok in") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit."))  # (no newline at the end)
    assert main(base + ["--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == want[0] + "\n" and out.err == ""


def test_cli_chat_at_a_terminal(default_gguf_path):
    """`dovetail chat` on a terminal (a pseudo-terminal here): a banner, a "> " prompt with
    line editing, the reply streamed, then /exit."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_ext.cli", "chat", "--model", str(default_gguf_path),
                             "--threads", "1", "--max-new-tokens", "8", "--quiet"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, since: int = 0, timeout: float = 60.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen[since:]:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)

    try:
        read_until(b"> ")
        assert b"dovetail chat:" in seen and b"/reset" in seen
        start = len(seen)
        os.write(master, b"Name a fruit.\n")
        read_until(b"> ", start + len(b"Name a fruit."))
        reply = seen[start:].decode(errors="replace")
        assert "Name a fruit." in reply and len(reply.replace("Name a fruit.", "").strip(" >\r\n")) > 0
        os.write(master, b"/exit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
