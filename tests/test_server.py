"""`dovetail serve`: the OpenAI-compatible server, driven by the official `openai` client.

The server runs in a background thread on a free loopback port, serving the default model
(loaded once for the module). Expected texts come from the same Generator called directly
before the server starts, so every comparison is against `dovetail_ext.load().generate()`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette", reason="the server needs the [serve] extra (starlette)")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the [serve] extra (uvicorn)")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client")
httpx = pytest.importorskip("httpx", reason="raw requests use httpx")

import dovetail_ext  # noqa: E402
from dovetail_ext.server import create_app  # noqa: E402

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
SAY_HI = "Say hi"
COUNT = "1, 2, 3, 4,"
QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "What is 2 + 2?",
             "Name a large animal."]
N = 12  # new tokens per request: short, the 2 cores are shared


@pytest.fixture(scope="module")
def gen(default_gguf_path):
    return dovetail_ext.load(default_gguf_path, context=512, threads=2, draft=None)


@pytest.fixture(scope="module")
def refs(gen):
    """Direct generations, made before the server owns the generator."""
    return SimpleNamespace(
        chat=gen.generate(CHAT, max_new_tokens=N),
        hi=gen.generate(SAY_HI, max_new_tokens=N).text,
        count_stop=gen.generate(COUNT, max_new_tokens=N, raw=True, stop=["7"]),
        sampled=gen.generate(CHAT, max_new_tokens=N, temperature=0.8, top_p=0.9, seed=7).text,
        sampled_next=[gen.generate(CHAT, max_new_tokens=N, temperature=0.8, top_p=0.9, seed=seed).text
                      for seed in (8, 9)],
        sampled_min_p=gen.generate(CHAT, max_new_tokens=N, temperature=1.2, seed=5, min_p=0.2).text,
        questions=[gen.generate(q, max_new_tokens=N).text for q in QUESTIONS],
        count_prompt_tokens=len(gen.encode_prompt(COUNT, raw=True)),
        chat_lp=gen.generate(CHAT, max_new_tokens=N, logprobs=3),
        count_lp=gen.generate(COUNT, max_new_tokens=N, raw=True, stop=["7"], logprobs=2),
        count_scored=gen.prompt_logprobs(COUNT, raw=True, top=2),
        adjusted=gen.generate(CHAT, max_new_tokens=N, presence_penalty=0.5, frequency_penalty=1.0,
                              logit_bias={11: -100.0, 260: 3.0}),
        **_structured_refs(gen),
        embeddings=gen.embed(["The cat sat on the mat.", "Revenue grew."]),
        embedding_tokens=sum(len(gen.tokenizer.encode(t)) for t in ["The cat sat on the mat.", "Revenue grew."]),
    )


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_ASK = [{"role": "user", "content": "Describe Ann, 31, as JSON."}]
TOOL_ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _structured_refs(gen) -> dict:
    """Direct generations under JSON grammars (when llguidance is installed)."""
    try:
        from dovetail_ext.grammar import Grammar
        Grammar.json()
    except ImportError:
        return {"json_object": None, "json_schema": None, "tool_call": None}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "strict": True,
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    return {"tools": tools,
            "tool_call": gen.generate(TOOL_ASK, max_new_tokens=60, tools=tools, tool_choice="required"),
            "json_object": gen.generate(JSON_ASK, max_new_tokens=60, grammar=Grammar.json()),
            "json_schema": gen.generate(JSON_ASK, max_new_tokens=60, grammar=Grammar.json(PERSON)),
            "json_schema_text": gen.generate("Ann is 31. As JSON:", raw=True, max_new_tokens=60,
                                             grammar=Grammar.json(PERSON))}


@pytest.fixture(scope="module")
def server(gen, refs):
    app = create_app(gen)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, app=app, engine=app.state.engine, model=app.state.model_id, gen=gen)
    srv.should_exit = True
    thread.join(20)
    sock.close()
    assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def finish_reason(result) -> str:
    return "length" if result.stats.stop_reason in ("length", "context") else "stop"


def wait_idle(server, timeout=20.0) -> float:
    """Seconds until the engine has nothing running or queued."""
    t0 = time.monotonic()
    while server.engine.busy or server.engine.queued:
        assert time.monotonic() - t0 < timeout, "the engine did not become idle"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == server.model and h["busy"] is False


def test_chat_matches_direct_generation(server, client, refs):
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.model == server.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == refs.chat.text
    assert r.choices[0].finish_reason == finish_reason(refs.chat)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (refs.chat.stats.prompt_tokens,
                                                                   refs.chat.stats.new_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    timing = r.model_extra["dovetail"]
    # (no draft: prompt lookup alone, the generator's default)
    assert timing["mode"] == "lookup" and timing["tokens_per_s"] > 0 and timing["acceptance_length"] >= 1.0
    assert 0 <= timing["corpus_steps"] <= timing["lookup_steps"] <= timing["target_calls"]
    # max_completion_tokens is the newer name for the same bound
    r2 = client.chat.completions.create(model=server.model, messages=CHAT, max_completion_tokens=4, temperature=0)
    assert r2.usage.completion_tokens == 4 and r2.choices[0].finish_reason == "length"
    assert refs.chat.text.startswith(r2.choices[0].message.content)


def test_chat_stream_matches_direct_generation(server, client, refs):
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == refs.chat.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # streamed in pieces
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [finish_reason(refs.chat)]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == refs.chat.stats.new_tokens


def test_completions_with_stop(server, client, refs):
    ref = refs.count_stop
    assert ref.stats.stop_reason == "stop"  # the case exercises a stop string
    r = client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0, stop="7")
    assert r.object == "text_completion"
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model=server.model, prompt=[COUNT], max_tokens=N, temperature=0,
                                            stop=["7", "never"], stream=True))
    assert "".join(c.choices[0].text for c in pieces) == ref.text
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_logprobs_match_direct_generation(server, client, refs):
    """Chat (logprobs + top_logprobs, whole and streamed) and completions (logprobs = k, with a
    stop string: every generated token is listed, those of the stop string too): the
    Generator's log-probabilities, in OpenAI's two shapes."""
    tok = server.gen.tokenizer
    ref = refs.chat_lp
    want = [(tok.decode([e.token]), e.logprob, [(tok.decode([i]), lp) for i, lp in e.top]) for e in ref.logprobs]
    assert len(want) == len(ref.tokens) == N and all(len(w[2]) == 3 for w in want)

    def content(entries):
        return [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs]) for c in entries]

    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0,
                                       logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == ref.text and content(r.choices[0].logprobs.content) == want
    first = r.choices[0].logprobs.content[0]
    assert first.bytes == list(first.token.encode("utf-8"))
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert content(streamed) == want
    plain = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == ref.text
    bare = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=3, temperature=0,
                                          logprobs=True)
    assert [(c.token, c.logprob, c.top_logprobs) for c in bare.choices[0].logprobs.content] == \
        [(t, lp, []) for t, lp, _ in want[:3]]

    ref = refs.count_lp
    assert ref.stats.stop_reason == "stop" and len(ref.logprobs) == len(ref.tokens)
    r = client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0, stop="7",
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ref.text
    assert lp.tokens == [tok.decode([e.token]) for e in ref.logprobs]
    assert lp.token_logprobs == [e.logprob for e in ref.logprobs]
    assert lp.top_logprobs == [{tok.decode([i]): v for i, v in e.top} for e in ref.logprobs]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens).startswith(ref.text) and "7" in "".join(lp.tokens)[len(ref.text):]
    pieces = list(client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0,
                                            stop="7", logprobs=2, stream=True))
    got = [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert got == lp.token_logprobs and "".join(c.choices[0].text for c in pieces) == ref.text


def test_streamed_logprobs_go_with_their_text(server, client):
    """With a long stop string the server holds text back; each chunk carries the
    log-probabilities of the tokens whose text it completes, no more."""
    chunks = list(client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0,
                                                 logprobs=True, stop=["zzzzzzzzzz"], stream=True))
    text = tokens = ""
    for c in chunks:
        if not c.choices:
            continue
        text += c.choices[0].delta.content or ""
        for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else []):
            tokens += e.token
        assert text.startswith(tokens), (text, tokens)
    assert tokens == text and len(text) > 10


def test_logprobs_of_tokens_inside_a_character(server, client):
    """Emoji split over byte tokens: their token strings are their bytes (bytes:\\x..), each
    distinct, and the tokens' bytes join to the prompt."""
    prompt = "Party: 🎉🎉 and 😀"
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    lp = r.choices[0].logprobs
    raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                   for t in lp.tokens)
    assert raw.decode("utf-8") == prompt and any(t.startswith("bytes:\\x") for t in lp.tokens)
    assert all(len(top) == 5 for top in lp.top_logprobs[1:])  # (distinct keys, none merged)


def test_token_id_prompts_and_echo(server, client, refs):
    """Completions take token ids as the prompt; echo returns the prompt before the
    completion, and with logprobs scores it (the first token null; a scoring request may ask
    for no new token, as evaluation harnesses do), whole and streamed."""
    ids, scored = refs.count_scored
    ref = refs.count_lp
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=N, temperature=0, stop="7")
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=server.model, prompt=[ids], max_tokens=0, temperature=0, echo=True,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == server.gen.tokenizer.decode(ids) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == [e.logprob for e in scored[1:]]
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    r = client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0, echo=True,
                                  logprobs=2, stop="7")
    lp = r.choices[0].logprobs
    assert r.choices[0].text == COUNT + ref.text
    assert lp.token_logprobs == [None] + [e.logprob for e in scored[1:]] + [e.logprob for e in ref.logprobs]
    assert lp.text_offset == sorted(lp.text_offset) and r.usage.completion_tokens == len(ref.tokens)
    pieces = list(client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0,
                                            echo=True, stop="7", stream=True))
    assert "".join(c.choices[0].text for c in pieces) == COUNT + ref.text
    plain = client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0, stop="7")
    assert plain.choices[0].text == ref.text  # (echo off again)
    full = (ids * 600)[:server.gen.target.context]  # scoring alone may fill the whole context
    r = client.completions.create(model=server.model, prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(full)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt=full, max_tokens=1, echo=True)


def test_penalties_and_logit_bias_match_direct_generation(server, client, refs):
    ref = refs.adjusted
    assert ref.tokens != refs.chat.tokens  # (the adjustments bite)
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0,
                                       presence_penalty=0.5, frequency_penalty=1.0, logit_bias={"11": -100, "260": 3})
    assert r.choices[0].message.content == ref.text and r.model_extra["dovetail"]["mode"] == ref.stats.mode


def _scrape(h) -> dict[str, float]:
    resp = h.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in resp.text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP dovetail_", "# TYPE dovetail_")), line
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_embeddings(server, client, refs):
    import numpy as np
    r = client.embeddings.create(model=server.model, input=["The cat sat on the mat.", "Revenue grew."])
    got = np.array([d.embedding for d in r.data], dtype=np.float32)  # (the client asks for base64)
    np.testing.assert_array_equal(got, refs.embeddings)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == refs.embedding_tokens
    with httpx.Client(base_url=server.url, timeout=60) as h:
        resp = h.post("/v1/embeddings", json={"input": "The cat sat on the mat.", "encoding_format": "float",
                                              "dimensions": refs.embeddings.shape[1]})
        assert resp.status_code == 200
        body = resp.json()
        assert body["object"] == "list" and body["model"] == server.model
        np.testing.assert_array_equal(np.array(body["data"][0]["embedding"], dtype=np.float32), refs.embeddings[0])
        for bad, param, code in [({"input": []}, "input", None), ({"input": [""]}, "input", None),
                                 ({}, "input", None), ({"input": "x", "encoding_format": "int8"}, "encoding_format",
                                                       None),
                                 ({"input": "x", "dimensions": 64}, "dimensions", None),
                                 ({"input": [[1, 10 ** 9]]}, "input", None),
                                 ({"input": "x " * 3000}, "input", None),
                                 ({"input": "x", "model": "other"}, "model", "model_not_found")]:
            resp = h.post("/v1/embeddings", json=bad)
            check_error_body(resp, 404 if code else 400, param, code)


def test_metrics(server, client):
    wait_idle(server)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        before = _scrape(h)
        r = client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0, n=2)
        wait_idle(server)  # (the reply can come before the worker has put the job down)
        after = _scrape(h)
    assert after['dovetail_requests_total{outcome="served"}'] == before['dovetail_requests_total{outcome="served"}'] + 1
    assert after["dovetail_prompt_tokens_total"] - before["dovetail_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["dovetail_generation_tokens_total"] - before["dovetail_generation_tokens_total"] == \
        r.usage.completion_tokens
    calls = after["dovetail_target_calls_total"] - before["dovetail_target_calls_total"]
    assert 0 < calls <= r.usage.completion_tokens
    delta = {k: after[f"dovetail_{k}_total"] - before[f"dovetail_{k}_total"]
             for k in ("lookup_steps", "lookup_accepted", "corpus_steps", "corpus_accepted")}
    timing = r.model_extra["dovetail"]  # the same request's own counts
    assert (delta["lookup_steps"], delta["corpus_steps"]) == (timing["lookup_steps"], timing["corpus_steps"])
    assert 0 <= delta["corpus_steps"] <= delta["lookup_steps"] <= calls
    assert 0 <= delta["corpus_accepted"] <= delta["lookup_accepted"]
    assert after["dovetail_decode_seconds_total"] > before["dovetail_decode_seconds_total"]
    for name in ("request_seconds", "queue_seconds", "first_token_seconds"):
        assert after[f"dovetail_{name}_count"] == before.get(f"dovetail_{name}_count", 0) + 1
        buckets = [v for k, v in after.items() if k.startswith(f"dovetail_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[f"dovetail_{name}_count"]  # cumulative; +Inf last
    assert after["dovetail_requests_running"] == 0 and after["dovetail_requests_queued"] == 0


def test_response_format_json(server, client, refs):
    if refs.json_object is None:
        pytest.skip("structured output needs the [grammar] extra (llguidance)")
    r = client.chat.completions.create(model=server.model, messages=JSON_ASK, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content == refs.json_object.text
    assert r.choices[0].finish_reason == finish_reason(refs.json_object)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=server.model, messages=JSON_ASK, max_tokens=60, temperature=0,
                                       response_format=fmt)
    assert r.choices[0].message.content == refs.json_schema.text and r.choices[0].finish_reason == "stop"
    assert refs.json_schema.stats.stop_reason == "grammar" and set(json.loads(refs.json_schema.text)) == {"name", "age"}
    pieces = client.chat.completions.create(model=server.model, messages=JSON_ASK, max_tokens=60, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == refs.json_schema.text
    r = client.completions.create(model=server.model, prompt="Ann is 31. As JSON:", max_tokens=60, temperature=0,
                                  extra_body={"response_format": fmt})
    assert r.choices[0].text == refs.json_schema_text.text
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for fmt in [{"type": "xml"}, "json", {"type": "json_schema"}, {"type": "json_schema", "json_schema": []},
                    {"type": "json_schema", "json_schema": {"name": 5, "schema": PERSON}},
                    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
                    {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
                    {"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON, "strict": "yes"}}]:
            check_error_body(h.post("/v1/chat/completions", json={"messages": CHAT, "response_format": fmt}),
                             400, "response_format")


def test_tool_calls(server, client, refs):
    if refs.tool_call is None:
        pytest.skip("tool_choice 'required' needs the [grammar] extra (llguidance)")
    want = [(c.name, c.arguments) for c in refs.tool_call.tool_calls]
    assert len(want) == 1
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=server.model, messages=TOOL_ASK, max_tokens=60, temperature=0,
                                           tools=refs.tools, tool_choice=choice)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert [(t.function.name, t.function.arguments) for t in c.message.tool_calls] == want
        assert c.message.tool_calls[0].type == "function" and c.message.tool_calls[0].id.startswith("call_")
    chunks = list(client.chat.completions.create(model=server.model, messages=TOOL_ASK, max_tokens=60,
                                                 temperature=0, tools=refs.tools, tool_choice="required",
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in calls] == want and calls[0].index == 0
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # the conversation goes on with the call and its result in the history
    call = r.choices[0].message.tool_calls[0]
    history = TOOL_ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 3}'}]
    r = client.chat.completions.create(model=server.model, messages=history, max_tokens=8, temperature=0,
                                       tools=refs.tools)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice "auto" with a response format: the reply (no call can match JSON's grammar) is JSON
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model=server.model, messages=JSON_ASK, max_tokens=60, temperature=0,
                                       tools=refs.tools, response_format=fmt)
    assert set(json.loads(r.choices[0].message.content)) == {"name", "age"}
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for body, param in [({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
                            ({"tools": refs.tools, "tool_choice": "always"}, "tool_choice"),
                            ({"tools": refs.tools, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                             "tool_choice"),
                            ({"tool_choice": "required"}, "tool_choice"),
                            ({"tools": refs.tools, "logprobs": True}, "logprobs"),
                            ({"tools": refs.tools, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
                            ({"tools": refs.tools, "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
                            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                                "type": "objekt"}}}], "tool_choice": "required"}, "tools")]:
            check_error_body(h.post("/v1/chat/completions", json={"messages": TOOL_ASK, **body}), 400, param)
        bad_history = TOOL_ASK + [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
        check_error_body(h.post("/v1/chat/completions", json={"messages": bad_history}), 400,
                         "messages[1].tool_calls")
        check_error_body(h.post("/v1/completions", json={"prompt": "x", "tools": refs.tools}), 400, "tools",
                         "unsupported_parameter")


def test_response_format_without_llguidance(server, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llguidance", None)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        resp = h.post("/v1/chat/completions", json={"messages": CHAT, "response_format": {"type": "json_object"}})
        check_error_body(resp, 400, "response_format", "unsupported_parameter")
        assert "dovetail-ext[grammar]" in resp.json()["error"]["message"]
        tools = [{"type": "function", "function": {"name": "f"}}]
        resp = h.post("/v1/chat/completions", json={"messages": CHAT, "tools": tools, "tool_choice": "required"})
        check_error_body(resp, 400, "tool_choice", "unsupported_parameter")
        ok = h.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "tools": tools})
        assert ok.status_code == 200  # (tool_choice "auto" needs no grammar)
        ok = h.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                  "response_format": {"type": "text"}})
        assert ok.status_code == 200


def test_n_choices(server, client, refs):
    """n choices come one after another: greedy ones equal; sampled choice i is the direct
    generation with seed + i; usage counts the prompt once and every choice's tokens; streamed,
    each choice's chunks carry its index and end with its own finish reason."""
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0, n=2,
                                       logprobs=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [refs.chat.text] * 2
    assert r.usage.prompt_tokens == refs.chat.stats.prompt_tokens
    assert r.usage.completion_tokens == 2 * refs.chat.stats.new_tokens
    assert [len(c.logprobs.content) for c in r.choices] == [refs.chat.stats.new_tokens] * 2
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0.8,
                                       top_p=0.9, seed=7, n=3)
    assert [c.message.content for c in r.choices] == [refs.sampled] + refs.sampled_next
    assert len({refs.sampled, *refs.sampled_next}) > 1  # (the seeds do differ)
    chunks = list(client.completions.create(model=server.model, prompt=COUNT, max_tokens=N, temperature=0,
                                            stop="7", n=2, stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == refs.count_stop.text
        assert [c.finish_reason for c in mine if c.finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 2 * len(refs.count_stop.tokens)


def test_several_prompts(server, client, refs):
    """A completions request with several prompts (strings or token ids): their choices in
    prompt order, n each; usage counts each prompt once; one prompt too long refuses the whole
    request before any runs."""
    ids = server.gen.tokenizer.encode(COUNT)
    r = client.completions.create(model=server.model, prompt=[COUNT, ids], max_tokens=N, temperature=0, stop="7",
                                  n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [refs.count_stop.text] * 4
    assert r.usage.prompt_tokens == 2 * refs.count_prompt_tokens
    assert r.usage.completion_tokens == 4 * len(refs.count_stop.tokens)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[COUNT, "word " * 600], max_tokens=2)
    assert "prompt[1] has" in e.value.message and e.value.code == "context_length_exceeded"


def test_seeded_sampling_matches_direct_generation(server, client, refs):
    for _ in range(2):
        r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0.8,
                                           top_p=0.9, seed=7)
        assert r.choices[0].message.content == refs.sampled
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=1.2, seed=5,
                                       extra_body={"min_p": 0.2})
    assert r.choices[0].message.content == refs.sampled_min_p


def test_greedy_matches_cli(server, client, capsys):
    from dovetail_ext.cli import main

    assert main(["generate", SAY_HI, "--max-new-tokens", str(N), "--json", "--threads", "2",
                 "--context", "512"]) == 0
    cli_text = json.loads(capsys.readouterr().out)["text"]
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": SAY_HI}],
                                       max_tokens=N, temperature=0)
    assert r.choices[0].message.content == cli_text


def test_concurrent_requests_are_served_one_at_a_time(server, refs):
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(k: int) -> None:
        try:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
                msgs = [{"role": "user", "content": QUESTIONS[k]}]
                if k % 2:
                    s = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=N, temperature=0,
                                                  stream=True)
                    results[k] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
                else:
                    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=N, temperature=0)
                    results[k] = r.choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    wait_idle(server)  # the last job's span is recorded just after its reply
    before = len(server.engine.history)
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    seen_busy = False
    with httpx.Client(base_url=server.url) as h:
        while any(t.is_alive() for t in threads):
            seen_busy |= h.get("/health", timeout=10).json()["busy"]  # the event loop answers meanwhile
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == dict(enumerate(refs.questions))
    assert seen_busy
    spans = sorted(list(server.engine.history)[before:], key=lambda s: s[1])
    assert len(spans) == len(QUESTIONS)
    assert all(a[2] <= b[1] for a, b in zip(spans, spans[1:])), "two generations overlapped"


def test_disconnect_stops_generation_and_frees_the_engine(server, client, refs):
    wait_idle(server)
    counts = dict(server.engine.counts)
    long = 400  # the fixture's 512-token context ends the generation first unless it is cancelled
    stream = client.completions.create(model=server.model, prompt=COUNT, max_tokens=long, temperature=0,
                                       stream=True)
    got = [next(stream).choices[0].text for _ in range(3)]
    assert "".join(got).strip().startswith("5")
    # A second request waits behind it, and its client gives up before its turn.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", timeout=0.5,
                   json={"model": server.model, "messages": CHAT, "max_tokens": N, "temperature": 0})
    at_close = server.gen.target.n_past - refs.count_prompt_tokens
    stream.close()
    wait_idle(server)
    assert server.engine.counts["cancelled"] == counts["cancelled"] + 2
    assert server.engine.counts["served"] == counts["served"]
    generated = server.gen.target.n_past - refs.count_prompt_tokens
    cap = min(long, server.gen.target.context - refs.count_prompt_tokens)
    assert generated < cap, f"the generation ran to its end ({generated} tokens) after the client left"
    assert generated - at_close < cap // 4, f"{generated - at_close} tokens were generated after the client left"
    # The engine is free and its cache consistent: the next request gets the right answer.
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": SAY_HI}],
                                       max_tokens=N, temperature=0)
    assert r.choices[0].message.content == refs.hi


LONG_PROMPT = "word " * 600  # more tokens than the 512-token context

BAD = [
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {"messages": CHAT, "n": 65}, 400, "n", None),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 22}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["a", 5]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[1, 2], [1, 10 ** 9]]}, 400, "prompt", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": "8"}, 400, "max_completion_tokens", None),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, 400, "temperature", None),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p", None),
    ("/v1/chat/completions", {"messages": CHAT, "min_p": 1.5}, 400, "min_p", None),
    ("/v1/chat/completions", {"messages": CHAT, "min_p": "0.1"}, 400, "min_p", None),
    ("/v1/chat/completions", {"messages": CHAT, "seed": "7"}, 400, "seed", None),
    ("/v1/chat/completions", {"messages": CHAT, "stop": 7}, 400, "stop", None),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, 400, "stream", None),
    ("/v1/chat/completions", {"messages": CHAT, "echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 1}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ("/v1/completions", {"prompt": "ab", "logprobs": True}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "ab", "logprobs": -1}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1.5, 2]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[1], []]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "ab", "echo": "yes"}, 400, "echo", None),
    ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("/v1/chat/completions", {"messages": CHAT, "frequency_penalty": "1"}, 400, "frequency_penalty", None),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"99999999": 1}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"5": 200}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": [5]}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": LONG_PROMPT, "stream": True}, 400, "prompt", "context_length_exceeded"),
    # Valid JSON that is not a request the engine can run: 400 naming the field, not a 500.
    ("/v1/completions", b'{"prompt": "a\\udc80b", "max_tokens": 3}', 400, "prompt", None),
    ("/v1/completions", b'{"prompt": "ab", "model": "\\ud800"}', 400, "model", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "stream": true}', 400,
     "messages[0].content", None),
    ("/v1/completions", b'{"prompt": "ab", "stop": ["\\udfff"]}', 400, "stop", None),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, None),
    ("/v1/completions", b'{"prompt": "ab", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, None),
    ("/v1/completions", {"prompt": "ab", "temperature": 1, "top_k": 2 ** 63}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "ab", "temperature": 1e-300, "stream": True}, 400, "temperature", None),
]


def check_error_body(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert (err["param"], err["code"]) == (param, code)


def test_bad_requests_get_openai_errors(server, client):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for path, body, status, param, code in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            check_error_body(h.post(path, content=content, headers={"content-type": "application/json"}),
                             status, param, code)
        check_error_body(h.get("/v1/nothing"), 404)
        check_error_body(h.get("/v1/chat/completions"), 405)
        check_error_body(h.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=CHAT, n=65)
    assert e.value.status_code == 400 and "'n' must be in [1, 64]" in e.value.message
    assert client.models.list().data[0].id == server.model  # still serving


def test_oversized_bodies_and_prompts_are_refused_before_the_engine(server, client, refs, monkeypatch):
    """A body over MAX_BODY_BYTES gets 413 while it is read; a prompt whose text is larger
    than the context could hold at the longest token's bytes is refused without being
    tokenized (the engine never sees it)."""
    from dovetail_ext import server as srv

    monkeypatch.setattr(srv, "MAX_BODY_BYTES", 1 << 20)
    with httpx.Client(base_url=server.url, timeout=60) as h:
        big = json.dumps({"prompt": "x" * (2 << 20), "max_tokens": 1}).encode()
        check_error_body(h.post("/v1/completions", content=big), 413, None, "request_too_large")
        limit = srv.prompt_byte_limit(server.gen)
        assert 512 * 4 < limit < 1 << 20
        served = dict(server.engine.counts)
        check_error_body(h.post("/v1/completions", json={"prompt": "ab " * (limit // 3 + 1), "max_tokens": 1}),
                         400, "prompt", "context_length_exceeded")
        check_error_body(h.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "é" * (limit // 2 + 1)}]}),
                         400, "messages", "context_length_exceeded")
        assert server.engine.counts == served  # refused before the queue
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == refs.chat.text


def test_default_max_tokens_stops_where_the_context_does(server):
    """Without max_tokens a request runs to the end of the context, and stops at the same
    token as one whose max_tokens reaches past it."""
    prompt = "hi " * 600
    ids = server.gen.encode_prompt(prompt, raw=True)
    prompt = server.gen.tokenizer.decode(ids[:509])  # 3 tokens short of the 512-token context
    n_prompt = len(server.gen.encode_prompt(prompt, raw=True))
    assert n_prompt < 512
    usage = []
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for extra in ({}, {"max_tokens": 100}):
            r = h.post("/v1/completions", json={"prompt": prompt, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            usage.append(r.json()["usage"])
    assert usage[0] == usage[1] and usage[0]["prompt_tokens"] == n_prompt


def test_internal_error_gives_500_and_the_server_keeps_serving(server, client, refs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(server.gen, "stream", broken)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": server.model, "messages": CHAT, "max_tokens": N})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "the engine broke" in err["message"]
    with pytest.raises(openai.APIError, match="the engine broke"):  # mid-stream: an error event
        list(client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, stream=True))
    monkeypatch.undo()
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == refs.chat.text


def test_speculative_by_default_when_a_draft_is_loaded(server, client, refs, monkeypatch):
    """An untrained draft changes the timing, never the greedy text; --no-spec turns it off."""
    pytest.importorskip("torch", reason="the random test draft is built with the PyTorch draft model")
    from dovetail_ext.draft import Draft
    from dovetail_ext.draft_model import DovetailDraft, DraftConfig

    module = DovetailDraft.random(DraftConfig.for_target(server.gen.source, num_layers=1), seed=0, std=0.05)
    monkeypatch.setattr(server.gen, "draft", Draft.from_module(module, server.gen.target))
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    timing = r.model_extra["dovetail"]
    assert r.choices[0].message.content == refs.chat.text
    assert timing["mode"] == "speculative" and timing["target_calls"] > 0 and timing["acceptance_length"] >= 1.0
    monkeypatch.setattr(server.engine, "speculative", False)  # what `dovetail serve --no-spec` sets
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == refs.chat.text and r.model_extra["dovetail"]["mode"] == "plain"


def test_api_key(default_gguf_path):
    """With an API key, every /v1 request needs 'Authorization: Bearer <key>' (401 otherwise,
    with OpenAI's error shape, before the body is read); /health stays open."""
    from starlette.testclient import TestClient
    gen = dovetail_ext.load(default_gguf_path, context=128, threads=1, draft=None)
    with pytest.raises(ValueError, match="api_key must be a non-empty string"):
        create_app(gen, api_key=" ")
    with TestClient(create_app(gen, api_key="s3cret")) as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            check_error_body(h.get("/v1/models", headers=headers), 401, None, "invalid_api_key")
            check_error_body(h.post("/v1/completions", content=b"not json", headers=headers), 401, None,
                             "invalid_api_key")
        ok = {"Authorization": "Bearer s3cret"}
        assert h.get("/v1/models", headers=ok).status_code == 200
        r = h.post("/v1/completions", json={"prompt": COUNT, "max_tokens": 3, "temperature": 0}, headers=ok)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == gen.generate(COUNT, max_new_tokens=3,
                                                                                          raw=True).text
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
    c = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=TestClient(
        create_app(gen, api_key="s3cret")), max_retries=0)
    assert c.models.list().data[0].object == "model"


def test_echo_offsets_skip_an_added_bos(gen):
    """For a model whose tokenizer puts BOS before a prompt, the echoed text has no BOS: its
    text offsets start at the prompt's first character."""
    from types import SimpleNamespace as NS

    from dovetail_ext.api import TokenLogprob
    from dovetail_ext.server import _Reply
    tok = gen.tokenizer
    ids = tok.encode("Hello world", add_bos=False)
    bos = NS(add_bos=True, bos_id=1, stream_decoder=tok.stream_decoder, decode=tok.decode, token_bytes=tok.token_bytes)
    entries = [TokenLogprob(1, None)] + [TokenLogprob(t, -1.0) for t in ids]
    lp = _Reply("completion", "m", bos).logprobs(entries)
    assert lp["text_offset"][:2] == [0, 0] and lp["text_offset"][-1] == len(tok.decode(ids[:-1]))
    plain = NS(add_bos=False, bos_id=1, stream_decoder=tok.stream_decoder, decode=tok.decode,
               token_bytes=tok.token_bytes)
    assert _Reply("completion", "m", plain).logprobs(entries)["text_offset"][1] == len(tok.decode([1]))
