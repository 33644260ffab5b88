"""Tool (function) calling in chat: the tools a model may call go into its prompt, and the
calls come back out of its reply.

A call is written as the Hermes / Qwen2.5 family of models writes it::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a reply that is nothing but such an object (or a list of them), as the Llama 3.x models
write calls (with ``"parameters"`` for the arguments), is read as calls too.

A model whose chat template takes ``tools`` (Qwen2.5, Qwen3, SmolLM3, Llama 3.1 ...) gets
them through its template; for any other template the tools are described in the system
message in the format above, assistant turns that called tools are written back in it and
tool results are returned in ``<tool_response>`` blocks of a user turn.

``tool_choice``: ``"auto"`` lets the model answer or call; ``"required"`` and a named tool
constrain the reply to calls (a :class:`~dovetail_ext.grammar.Grammar` whose JSON follows
each tool's ``parameters`` schema, its objects closed to unlisted properties for a tool
marked ``strict``, as OpenAI's strict mode), so even a small model returns well-formed
calls; ``"none"`` leaves the tools out.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from .grammar import JSON_WHITESPACE, Grammar, closed_schema

__all__ = ["Tool", "ToolCall", "parse_tools", "parse_tool_choice", "tool_grammar", "split_tool_calls",
           "render_chat", "ToolCallFilter"]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.S)


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON Schema of arguments."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False  # constrained calls: objects take only the properties they list

    def spec(self) -> dict[str, Any]:
        """OpenAI's shape, as chat templates take it."""
        f = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {**f, "strict": True} if self.strict else f}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text, as OpenAI returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def spec(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI's ``tools`` (``[{"type": "function", "function": {"name", "description",
    "parameters"}}]``, or the bare function objects) as :class:`Tool`; a ValueError names
    the first entry that is not one."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out: list[Tool] = []
    for k, t in enumerate(tools):
        where = f"tools[{k}]"
        if isinstance(t, Tool):
            out.append(t)
            continue
        if not isinstance(t, dict):
            raise ValueError(f"{where} must be an object")
        if "function" in t or "type" in t:
            if t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise ValueError(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
            t = t["function"]
        name = t.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        desc = t.get("description", "")
        if not isinstance(desc, str):
            raise ValueError(f"{where}.function.description must be a string")
        params = t.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON Schema object")
        if any(o.name == name for o in out):
            raise ValueError(f"{where}: two tools are named {name!r}")
        strict = t.get("strict", False)
        if not isinstance(strict, bool):
            raise ValueError(f"{where}.function.strict must be a boolean")
        out.append(Tool(name, desc, params, strict))
    return out


def parse_tool_choice(choice: Any, tools: Sequence[Tool]) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name":
    ...}}`` -> "auto" / "none" / "required" / the tool's name."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return name
    raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                     f"{{'name': ...}}}}, got {json.dumps(choice)[:80]}")


def _call_schema(tool: Tool) -> dict[str, Any]:
    params = closed_schema(tool.parameters) if tool.strict else tool.parameters
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": tool.name}, "arguments": params}}


def tool_grammar(tools: Sequence[Tool], choice: str, parallel: bool = False):
    """The Grammar of a reply to ``tools`` under ``choice``:

    - "required": calls of any of ``tools``; a tool's name: calls of that one;
    - "auto": free text without a call block, or text, then calls (a lazy grammar: the text
      is free until ``<tool_call>``, and from there on the calls follow the tools' schemas).
      None where llguidance is not installed: the reply is then free and its calls are read
      as they come;
    - "none": None (free text).

    One call, or with ``parallel`` one or more, one per line."""
    if choice == "none":
        return None
    if choice == "auto":
        try:
            from .grammar import _llg
            _llg()
        except ImportError:
            return None
    chosen = [t for t in tools if choice in ("required", "auto") or t.name == choice]
    schema = {"anyOf": [_call_schema(t) for t in chosen], "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    body = f"call: {json.dumps(chr(10))} %json {json.dumps(schema)} {json.dumps(chr(10) + CLOSE)}\n"
    calls = f'call ({json.dumps(chr(10) + OPEN)} call)*' if parallel else "call"
    if choice != "auto":
        return Grammar.lark(f"start: {json.dumps(OPEN)} {calls}\n{body}")
    # The text before a call: the shortest text ending in the opening tag (a lazy lexeme);
    # a reply without a call: any text in which the tag does not occur.
    grammar = Grammar.lark(f"start: TEXT | lead {calls}\nlead[lazy]: /(.|\\n)*{OPEN}/\n{body}"
                           f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{OPEN}(.|\\n)*/\n")
    grammar.free_until = OPEN  # (up to the tag the text is free: decoding runs unconstrained until it is out)
    return grammar


def split_tool_calls(text: str, tools: Sequence[Tool] | None = None) -> tuple[str | None, list[ToolCall]]:
    """A reply's content before its first tool call (None when empty) and its calls. A block
    whose JSON is not ``{"name": ..., "arguments": {...}}`` naming one of ``tools`` (any
    name without ``tools``) makes the whole reply plain content."""
    start = text.find(OPEN)
    names = None if tools is None else {t.name for t in tools}
    if start < 0:
        bare = _bare_calls(text, names)
        return (None, bare) if bare else (text, [])
    calls = []
    for m in _BLOCK.finditer(text, start):
        call = _read_call(m.group(1), names)
        if call is None:
            if calls and not m.group(0).endswith(CLOSE):
                break  # a last block cut short (the token budget): the calls before it stand
            return text, []
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def _bare_calls(text: str, names: set[str] | None) -> list[ToolCall]:
    """A whole reply that is a call's JSON object, or a list of them, without the blocks (as
    the Llama 3.x models write calls); only for known tool names."""
    body = text.strip()
    if names is None or not body.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(body)
    except ValueError:
        return []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(o, names) for o in objs]
    return calls if calls and all(c is not None for c in calls) else []


def _read_call(block: str, names: set[str] | None) -> ToolCall | None:
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    return _call_of(obj, names)


def _call_of(obj: Any, names: set[str] | None) -> ToolCall | None:
    """A call from a parsed ``{"name": ..., "arguments" or "parameters": {...}}`` naming one
    of ``names`` (any name when None), or None."""
    if not isinstance(obj, dict):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    name = obj.get("name")
    if not isinstance(name, str) or not isinstance(args, dict) or (names is not None and name not in names):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _template_takes_tools(tokenizer: Any) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def _call_fields(call: Any) -> dict:
    """The ``{"name", "arguments"}`` of a call in a message: OpenAI's shape, the bare
    function, or a :class:`ToolCall` (what ``generate`` returned)."""
    if isinstance(call, ToolCall):
        return {"name": call.name, "arguments": call.arguments}
    if not isinstance(call, dict):
        raise ValueError(f"a tool call in a message must be an object or a ToolCall, got {type(call).__name__}")
    return call.get("function", call)


def _arguments(call: Any) -> Any:
    """A call's arguments as the templates take them: a dict (OpenAI sends JSON text)."""
    args = _call_fields(call).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _describe(tools: Sequence[Tool]) -> str:
    lines = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools)
    return ("You can call functions to help answer. Their signatures, one JSON object per line:\n"
            f"<tools>\n{lines}\n</tools>\n"
            f"To call a function, reply with one block per call:\n{OPEN}\n"
            '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
            f"{CLOSE}\nThe results come back in <tool_response> blocks.")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Sequence[Tool] | None = None) -> str:
    """The prompt text of a conversation that may hold tools, assistant tool calls and tool
    results, with the generation prompt. See the module doc for templates without tools."""
    if _template_takes_tools(tokenizer):
        msgs = []
        for m in messages:
            m = dict(m, content=m.get("content") or "")
            if m.get("tool_calls"):
                m["tool_calls"] = [{"type": "function", "id": c.id if isinstance(c, ToolCall) else c.get("id"),
                                    "function": {"name": _call_fields(c).get("name"),
                                                 "arguments": _arguments(c)}} for c in m["tool_calls"]]
            msgs.append(m)
        specs = [t.spec() for t in tools] if tools else None
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tools=specs)
    msgs = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{OPEN}\n" + json.dumps({"name": _call_fields(c).get("name"),
                                                 "arguments": _arguments(c)}, ensure_ascii=False) + f"\n{CLOSE}"
                      for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if msgs and role == "user" and msgs[-1]["role"] == "user" and m["role"] == "tool" and \
                msgs[-1]["content"].startswith("<tool_response>"):
            msgs[-1]["content"] += "\n" + content  # (the results of one turn's calls: one user turn)
            continue
        msgs.append({"role": role, "content": content})
    if tools:
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + _describe(tools)}
        else:
            msgs.insert(0, {"role": "system", "content": _describe(tools)})
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


class ToolCallFilter:
    """Streamed reply text -> the content to show: text stops being passed on where a tool
    call begins (text that may be the start of one is held back until it is known);
    :meth:`finish` then gives the remaining content and the calls."""

    def __init__(self, tools: Sequence[Tool] | None = None) -> None:
        self.tools = tools
        self.text = ""
        self._sent = 0
        self._calling = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self._calling:
            return ""
        if self._sent == 0 and self.tools and self.text.lstrip()[:1] in ("", "{", "["):
            return ""  # (a reply that may be a bare JSON call is held until it ends)
        at = self.text.find(OPEN, self._sent)
        if at >= 0:
            self._calling = True
            out, self._sent = self.text[self._sent:at], at
            return out
        hold = 0  # the longest end of the text that begins OPEN
        for k in range(min(len(OPEN) - 1, len(self.text) - self._sent), 0, -1):
            if self.text.endswith(OPEN[:k]):
                hold = k
                break
        out = self.text[self._sent:len(self.text) - hold]
        self._sent += len(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet passed on, the calls). When the blocks do not parse as calls,
        all the rest is content."""
        _, calls = split_tool_calls(self.text, self.tools)
        start = self.text.find(OPEN)
        # with calls: the content before the first block (none before a bare JSON call)
        rest = self.text[self._sent:] if not calls else self.text[self._sent:start] if start >= self._sent else ""
        self._sent = len(self.text)
        return rest, calls
