"""Where an offloaded target's call spends its time, kernel by kernel (needs a GPU and torch
with CUDA, whose profiler records every kernel of the process through CUPTI).

    python bench/device_profile.py [--gpu-layers N] [--batch 1,2,4,8] [--calls 50] [--out DIR]

The default model with its first N layers on the GPU (default: all but one) is fed a prompt
of --context tokens; then, for each batch size T, --calls calls of T new tokens (causal, the
cache rolled back after each) are timed whole and split into the device prefix
(its own timer, ``device_stats["call_ms"]``: embedding, the offloaded layers, the copies) and the
CPU's rest (its layers, final norm, LM head), and the device kernels are listed with their
count per call and mean time (with --device emulated, the host backend: call times only).
Writes device_profile.json / .md to --out; bench/run_gpu_suite.sh runs it (step "profile").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-layers", type=int, default=0, help="layers on the GPU (default: all but one)")
    ap.add_argument("--batch", default="1,2,4,8", help="new tokens per call, e.g. 1,4,8")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--context", type=int, default=256, help="cached tokens before the timed calls")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",") if b]
    if not batches or min(batches) < 1 or args.calls < 1 or args.context < 1:
        ap.error("--batch, --calls and --context take positive integers")
    from dovetail_ext.formats import load_model_source
    from dovetail_ext.target import TargetEngine

    profiled = args.device != "emulated"  # (the host backend has no kernels: call times only)
    if profiled:
        import torch
        from torch.profiler import ProfilerActivity, profile
        if not torch.cuda.is_available():
            print("device_profile: torch sees no CUDA device (--device emulated times the host backend)",
                  file=sys.stderr)
            return 2
        torch.cuda.init()
    source = load_model_source(None)
    n_off = args.gpu_layers or source.config.num_layers - 1
    target = TargetEngine(source, context=args.context + max(batches) + 8, gpu_layers=n_off, device=args.device,
                          **({"threads": args.threads} if args.threads else {}))
    rng = np.random.default_rng(0)
    V = source.config.vocab_size
    prompt = rng.integers(0, V, args.context)
    for i in range(0, args.context, target.max_batch):  # the prompt in batches the engine takes
        target.forward(prompt[i:i + target.max_batch])
        target.commit()
    n0 = target.n_past
    rows = []
    lines = [f"# Offloaded target, {n_off} of {source.config.num_layers} layers on {args.device}, "
             f"{target.threads} CPU threads, {n0} cached tokens, {args.calls} calls per batch", "",
             "| T | call ms | device prefix ms | CPU rest ms | device kernels per call | kernel ms per call (sum) | "
             "SM clock MHz |", "|---|---|---|---|---|---|---|"]
    kernel_tables = {}
    for T in batches:
        toks = rng.integers(0, V, T)
        for _ in range(5):  # warm: graphs recorded, caches touched
            target.forward(toks)
            target.truncate(n0)
        whole, dev, rest = [], [], []
        with profile(activities=[ProfilerActivity.CUDA]) if profiled else contextlib.nullcontext() as prof:
            for _ in range(args.calls):  # the device prefix's share from its own call timer
                before = target.device_stats["call_ms"]
                t0 = time.perf_counter()
                target.forward(toks)
                call_ms = 1e3 * (time.perf_counter() - t0)
                prefix_ms = target.device_stats["call_ms"] - before
                whole.append(call_ms), dev.append(prefix_ms), rest.append(call_ms - prefix_ms)
                target.truncate(n0)
        per = defaultdict(lambda: [0, 0.0])
        for ev in prof.events() if profiled else []:
            if ev.device_type.name == "CUDA":
                k = per[ev.name[:80]]
                k[0] += 1
                k[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        table = sorted(((n, c / args.calls, us / max(c, 1), us / args.calls) for n, (c, us) in per.items()),
                       key=lambda r: -r[3])
        kernel_tables[T] = table
        try:  # the SM clock just after the calls (MHz; NVML through torch), where it can be read
            clock = torch.cuda.clock_rate() if profiled else None
        except Exception:  # noqa: BLE001 (no NVML)
            clock = None
        row = {"T": T, "call_ms": float(np.median(whole)), "prefix_ms": float(np.median(dev)),
               "cpu_rest_ms": float(np.median(rest)), "sm_clock_mhz": clock,
               "kernels_per_call": sum(r[1] for r in table), "kernel_ms_per_call": sum(r[3] for r in table) / 1e3,
               "kernels": [{"name": n, "per_call": c, "mean_us": m, "us_per_call": t} for n, c, m, t in table]}
        rows.append(row)
        kern = f"{row['kernels_per_call']:.0f} | {row['kernel_ms_per_call']:.3f}" if profiled else "- | -"
        kern += f" | {clock if clock is not None else '-'}"
        lines.append(f"| {T} | {row['call_ms']:.3f} | {row['prefix_ms']:.3f} | {row['cpu_rest_ms']:.3f} | {kern} |")
    for T, table in kernel_tables.items() if profiled else ():
        lines += ["", f"Kernels at T = {T}:", "", "| kernel | per call | mean us | us per call |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {c:.1f} | {m:.2f} | {t:.1f} |" for n, c, m, t in table]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_profile.json").write_text(json.dumps({"gpu_layers": n_off, "rows": rows}, indent=2))
        (out / "device_profile.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
