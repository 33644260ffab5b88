"""Tool calling: tools in the prompt, calls read back from replies (also as they stream),
and replies constrained to calls by tool_choice."""

from __future__ import annotations

import json

import pytest

from dovetail_ext.tools import (OPEN, Tool, ToolCallFilter, parse_tool_choice, parse_tools, render_chat,
                                split_tool_calls)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tools_and_tool_choice_are_checked():
    tools = parse_tools([WEATHER, ADD["function"]])  # OpenAI's shape, or the bare function
    assert [t.name for t in tools] == ["get_weather", "add"] and tools[0].parameters["required"] == ["city"]
    assert tools[0].spec() == WEATHER
    for bad, msg in [([], "non-empty list"), ({"a": 1}, "non-empty list"), ([5], r"tools\[0\] must be an object"),
                     ([{"type": "code", "function": {}}], r"tools\[0\] must be"),
                     ([{"type": "function", "function": {"name": "a b"}}], "name must be"),
                     ([{"name": "f\n"}], "name must be"), ([{"name": "x" * 65}], "name must be"),
                     ([WEATHER, WEATHER], "two tools are named"),
                     ([{"name": "f", "parameters": [1]}], "parameters must be a JSON Schema"),
                     ([{"name": "f", "description": 3}], "description must be a string")]:
        with pytest.raises(ValueError, match=msg):
            parse_tools(bad)
    assert parse_tool_choice(None, tools) == "auto"
    assert [parse_tool_choice(c, tools) for c in ("auto", "none", "required")] == ["auto", "none", "required"]
    assert parse_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == "add"
    with pytest.raises(ValueError, match="not among the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "sub"}}, tools)
    with pytest.raises(ValueError, match="tool_choice must be"):
        parse_tool_choice("always", tools)


def test_calls_are_read_from_replies():
    tools = parse_tools([WEATHER, ADD])
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
    content, calls = split_tool_calls(text, tools)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("add", {"a": 1, "b": 2})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert split_tool_calls("no calls here", tools) == ("no calls here", [])
    for bad in ['<tool_call>{"name": "get_weather", "arguments": {</tool_call>',        # not JSON
                '<tool_call>{"name": "sub", "arguments": {}}</tool_call>',              # not a tool
                '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',             # arguments not an object
                '<tool_call>["add"]</tool_call>']:
        assert split_tool_calls(bad, tools) == (bad, [])
    # a last block cut short by the token budget: the calls before it stand
    cut = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "ad'
    content, calls = split_tool_calls(cut, tools)
    assert content is None and [c.name for c in calls] == ["add"]
    # a reply that is only the call's JSON (the Llama 3.x way), or a list of them
    content, calls = split_tool_calls(' {"name": "add", "parameters": {"a": 1, "b": 2}}\n', tools)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    two = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert [c.name for c in split_tool_calls(two, tools)[1]] == ["add", "get_weather"]
    for plain in ('{"name": "sub", "parameters": {}}', '{"answer": 42}', '[1, 2]', '{"name": "add"'):
        assert split_tool_calls(plain, tools) == (plain, [])
    assert split_tool_calls('{"name": "add", "arguments": {}}', None)[1] == []  # (bare: only known tools)


@pytest.mark.parametrize("text", [
    'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    "A plain answer with a < sign and <tool but no call.",
    '<tool_call>{"broken": </tool_call> and more',
    "ends with a possible start <tool_c",
    '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    '{"a": "JSON content, not a call"} <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'])
def test_streamed_content_stops_where_a_call_begins(text):
    tools = parse_tools([ADD])
    for step in (1, 3, 7):
        f = ToolCallFilter(tools)
        shown = "".join(f.feed(text[i:i + step]) for i in range(0, len(text), step))
        rest, calls = f.finish()
        if calls:
            assert shown + rest == (text[:text.index(OPEN)] if OPEN in text else "") and calls[0].name == "add"
        else:
            assert shown + rest == text
        # nothing that may begin a call is shown before it is known not to
        assert OPEN not in shown


class _TemplateWithTools:
    """A tokenizer whose template takes tools: records what it was given."""

    chat_template = "{% for t in tools %}...{% endfor %}"

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        self.seen = (messages, kwargs)
        return "rendered"


def test_tools_go_through_a_template_that_takes_them():
    tok = _TemplateWithTools()
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    assert render_chat(tok, history, parse_tools([WEATHER])) == "rendered"
    messages, kwargs = tok.seen
    assert kwargs["tools"] == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[2] == history[2]


def test_tools_are_described_for_a_template_without_them(default_source):
    tok = default_source.tokenizer
    assert "tools" not in (tok.chat_template or "")
    history = [{"role": "system", "content": "Be brief."}] + ASK + [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "3 C"}]
    text = render_chat(tok, history, parse_tools([WEATHER, ADD]))
    system = text[:text.index("<|im_start|>user")]
    assert system.count("Be brief.") == 1 and json.dumps(WEATHER) in system and json.dumps(ADD) in system
    assert 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    # both results in one user turn, then the assistant's turn
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n3 C\n</tool_response>" \
           "<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.endswith("<|im_start|>assistant\n")


# -- generation (the default model; constrained calls need llguidance) -----------------------

@pytest.fixture(scope="module")
def gen(default_gguf_path):
    import dovetail_ext
    return dovetail_ext.load(default_gguf_path, context=1024, threads=2)


def _valid_weather(call) -> bool:
    args = json.loads(call.arguments)
    return call.name == "get_weather" and isinstance(args.get("city"), str) and \
        set(args) <= {"city", "unit"} and args.get("unit", "celsius") in ("celsius", "fahrenheit")


def test_required_and_named_tool_choice_give_calls(gen):
    pytest.importorskip("llguidance", reason="constrained calls need the [grammar] extra (llguidance)")
    tools = [WEATHER, ADD]
    r = gen.generate(ASK, tools=tools, tool_choice="required", max_new_tokens=120)
    assert r.stats.stop_reason == "grammar" and r.text == "" and len(r.tool_calls) == 1
    assert r.tool_calls[0].name in ("get_weather", "add")
    plain = gen.generate(ASK, tools=tools, tool_choice="required", max_new_tokens=120, speculative=False)
    assert plain.tokens == r.tokens  # lossless under the call grammar
    named = gen.generate(ASK, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                         max_new_tokens=120)
    assert len(named.tool_calls) == 1 and _valid_weather(named.tool_calls[0])
    several = gen.generate(ASK, tools=tools, tool_choice="required", parallel_tool_calls=True, max_new_tokens=200)
    assert several.tool_calls and all(c.name in ("get_weather", "add") for c in several.tool_calls)
    streamed = "".join(gen.stream(ASK, tools=tools, tool_choice="required", max_new_tokens=120))
    assert streamed == "" and [(c.name, c.arguments) for c in gen.last_tool_calls] == \
        [(c.name, c.arguments) for c in r.tool_calls]


def test_auto_and_none(gen):
    auto = gen.generate(ASK, tools=[WEATHER], max_new_tokens=40)
    assert auto.tokens and (auto.tool_calls or auto.text)
    assert auto.text == (split_tool_calls(gen.tokenizer.decode(auto.tokens), parse_tools([WEATHER]))[0] or "")
    none = gen.generate(ASK, tools=[WEATHER], tool_choice="none", max_new_tokens=20)
    assert none.tokens == gen.generate(ASK, max_new_tokens=20).tokens and none.tool_calls == []


def test_auto_replies_are_free_until_a_call_opens(gen):
    """tool_choice "auto": any text, or text then calls that follow the tools' schemas. The
    grammar binds from the opening tag on; before it the reply decodes unmasked."""
    pytest.importorskip("llguidance", reason="constrained calls need the [grammar] extra (llguidance)")
    from dovetail_ext.grammar import Constraint
    from dovetail_ext.tools import tool_grammar
    tools = parse_tools([WEATHER, ADD])
    eos = sorted(gen.eos_ids)
    tok = gen.tokenizer

    def walk(grammar, text):
        c = Constraint(grammar, tok, gen.config.vocab_size, eos)
        for t in tok.encode(text, add_bos=False):
            assert c.allowed()[t], (text, tok.decode([t]))
            c.consume(t)
        return c

    single, several = tool_grammar(tools, "auto"), tool_grammar(tools, "auto", parallel=True)
    assert single.free_until == several.free_until == OPEN
    c = walk(single, "Paris is sunny today.\nNo <tool> is needed: see {\"a\": 1}.")
    assert c.allowed()[eos[0]] and c.allowed().sum() > 0.99 * tok.vocab_size  # free text, which may end
    c = walk(single, "Let me check.\n" + OPEN)
    opening = {tok.decode([int(t)]) for t in c.allowed().nonzero()[0]}
    assert opening and all(s.startswith("\n") for s in opening) and not c.allowed()[eos[0]]
    call = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for t in tok.encode(call, add_bos=False):
        assert c.allowed()[t]
        c.consume(t)
    assert c.stopped  # one call: the reply ends
    c = walk(several, "Two calls:\n" + OPEN + call + "\n" + OPEN + '\n{"name": "add", "arguments": {"a": 1, "b": 2}}')
    bad = Constraint(single, tok, gen.config.vocab_size, eos)
    for t in tok.encode(OPEN + '\n{"name": "', add_bos=False):
        bad.consume(t)
    assert not bad.allowed()[tok.encode("lookup", add_bos=False)[0]]  # only the tools' names
    r = gen.generate(ASK, tools=[WEATHER], max_new_tokens=40)
    assert r.tokens == gen.generate(ASK, tools=[WEATHER], max_new_tokens=40, speculative=False).tokens


def test_auto_without_llguidance_reads_calls_from_free_replies(monkeypatch):
    import dovetail_ext.grammar as grammar_module
    from dovetail_ext.tools import tool_grammar

    def missing():
        raise ImportError("llguidance is not installed")
    monkeypatch.setattr(grammar_module, "_llg", missing)
    assert tool_grammar(parse_tools([WEATHER]), "auto") is None
    with pytest.raises(ImportError):
        tool_grammar(parse_tools([WEATHER]), "required")


def test_the_calls_generate_returned_go_back_into_the_history(gen, default_source):
    tools = parse_tools([WEATHER])
    call = split_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
                            tools)[1][0]
    as_objects = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call.id, "content": "3 C"}]
    as_dicts = ASK + [{"role": "assistant", "content": "", "tool_calls": [call.spec()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "3 C"}]
    for tok in (default_source.tokenizer, _TemplateWithTools()):
        assert render_chat(tok, as_objects, tools) == render_chat(tok, as_dicts, tools)
    t = _TemplateWithTools()
    render_chat(t, as_objects, tools)
    assert t.seen[0][1]["content"] == "" and t.seen[0][1]["tool_calls"][0]["id"] == call.id
    with pytest.raises(ValueError, match="a tool call in a message must be"):
        render_chat(default_source.tokenizer, ASK + [{"role": "assistant", "content": "", "tool_calls": [5]}], tools)
    assert gen.generate(as_objects, tools=tools, max_new_tokens=4).tokens


def test_a_conversation_with_tool_results_goes_on(gen):
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = gen.generate(history, tools=[WEATHER], max_new_tokens=30)
    assert r.stats.prompt_tokens > len(gen.encode_prompt(ASK)) and r.tokens
    # without tools offered, the history still renders (the calls and results as text)
    assert gen.generate(history, max_new_tokens=8).tokens


def test_bad_tool_arguments(gen):
    with pytest.raises(ValueError, match="tool_choice needs tools"):
        gen.generate(ASK, tool_choice="required")
    with pytest.raises(ValueError, match="logprobs are not given with tools"):
        gen.generate(ASK, tools=[WEATHER], logprobs=1)
    with pytest.raises(ValueError, match="name must be"):
        gen.generate(ASK, tools=[{"name": "two words"}])
    with pytest.raises(ValueError, match="parallel_tool_calls"):
        gen.generate(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls="yes")
    pytest.importorskip("llguidance", reason="constrained calls need the [grammar] extra (llguidance)")
    from dovetail_ext.grammar import Grammar
    with pytest.raises(ValueError, match="takes no grammar"):
        gen.generate(ASK, tools=[WEATHER], tool_choice="required", grammar=Grammar.json())


def test_tool_objects_are_taken_as_they_are():
    t = Tool("f", "does f", {"type": "object", "properties": {}})
    assert parse_tools([t]) == [t]


def test_strict_tools_close_their_objects(gen):
    from dovetail_ext.grammar import closed_schema as _closed
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "c": {"type": "object", "additionalProperties": True}},
              "$defs": {"d": {"properties": {"e": {"type": "integer"}}}}}
    closed = _closed(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True  # (said otherwise: kept)
    assert closed["$defs"]["d"]["additionalProperties"] is False and "additionalProperties" not in schema
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    strict["function"]["parameters"] = {k: v for k, v in WEATHER["function"]["parameters"].items()
                                        if k != "additionalProperties"}
    assert parse_tools([strict])[0].strict and parse_tools([strict])[0].spec() == strict
    with pytest.raises(ValueError, match="strict must be a boolean"):
        parse_tools([{"name": "f", "strict": "yes"}])
    pytest.importorskip("llguidance", reason="constrained calls need the [grammar] extra (llguidance)")
    r = gen.generate(ASK, tools=[strict], tool_choice="required", max_new_tokens=80)
    assert len(r.tool_calls) == 1 and _valid_weather(r.tool_calls[0])


TEMPLATE_WITH_TOOLS = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_jinja_template_with_tools_renders_calls_as_objects(default_source):
    from dovetail_ext.formats.tokenizer import Tokenizer
    base = default_source.tokenizer
    tok = Tokenizer(base._backend, eos_ids=sorted(base.eos_ids), chat_template=TEMPLATE_WITH_TOOLS)
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]
    text = render_chat(tok, history, parse_tools([WEATHER]))
    assert text.startswith("<|im_start|>system\nTools:" + json.dumps(WEATHER) + "<|im_end|>")  # (trim_blocks)
    # the arguments OpenAI sends as JSON text reach the template as an object (not a string twice encoded)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n21 C<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_the_stream_filter_on_any_text():
    """Whatever the text and however it is cut into pieces: what is shown never holds the
    start of a call; without calls, shown + rest is the text; with calls, what is shown is
    the text before the first block (hypothesis)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tools = parse_tools([ADD])
    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    alphabet = st.sampled_from(["a", " ", "\n", "<", ">", "/", "tool", "_call", "<tool_call>", "</tool_call>", "{",
                                "}", '"', call])

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.lists(alphabet, max_size=12), st.lists(st.integers(1, 9), min_size=1, max_size=30))
    def check(parts, cuts):
        text = "".join(parts)
        f, shown, at, k = ToolCallFilter(tools), "", 0, 0
        while at < len(text):
            step = cuts[k % len(cuts)]
            shown += f.feed(text[at:at + step])
            at, k = at + step, k + 1
        rest, calls = f.finish()
        assert OPEN not in shown
        want_content, want_calls = split_tool_calls(text, tools)
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in want_calls]
        if calls:  # the content before the first block; none before a bare JSON call
            assert shown + rest == (text[:text.index(OPEN)] if OPEN in text else "")
        else:
            assert shown + rest == text and want_content == text
    check()


def test_a_chat_session_with_tools(gen):
    """ChatSession(tools=...): a reply's calls join the history, send_tool_results answers
    them and the conversation goes on; each turn's prompt is what generate() would render
    for the session's messages, and is read only from where the last one ended."""
    pytest.importorskip("llguidance", reason="constrained calls need the [grammar] extra (llguidance)")
    from dovetail_ext.chat import ChatSession
    chat = ChatSession(gen, system="You are a weather bot.", tools=[WEATHER])
    r = chat.send("What is the weather in Oslo?", tool_choice="required", max_new_tokens=80)
    assert len(r.tool_calls) == 1 and _valid_weather(r.tool_calls[0])
    last = chat.messages[-1]
    assert last["role"] == "assistant" and last["tool_calls"] == [r.tool_calls[0].spec()]
    with pytest.raises(ValueError, match="answer each call of the last reply once"):
        chat.send_tool_results({"call_nope": "3 C"})
    with pytest.raises(ValueError, match=r"results must be \{call id: text\}"):
        chat.send_tool_results([(r.tool_calls[0].id, 3)])
    before = chat.messages
    follow = chat.send_tool_results({r.tool_calls[0].id: '{"temperature": 3, "sky": "snow"}'}, max_new_tokens=24)
    msgs = chat.messages
    assert msgs[:len(before)] == before and msgs[len(before)]["role"] == "tool"
    assert msgs[-1] == {"role": "assistant", "content": follow.text, **(
        {"tool_calls": [c.spec() for c in follow.tool_calls]} if follow.tool_calls else {})}
    # the prompt was the session's messages with the tools, most of it cached
    assert follow.stats.prompt_tokens == len(gen.encode_prompt(msgs[:-1], tools=parse_tools([WEATHER])))
    assert follow.stats.cached_prompt_tokens > follow.stats.prompt_tokens // 2
    if not follow.tool_calls:
        with pytest.raises(ValueError, match="called no tools"):
            chat.send_tool_results({"x": "y"})
    pieces = "".join(chat.stream("Thanks! And in Paris?", tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}},
                                 max_new_tokens=80))
    assert pieces == "" and chat.messages[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
