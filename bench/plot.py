"""Draw the README's benchmark figure from bench/results/latest.json.

    python bench/plot.py [results.json] [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    here = Path(__file__).parent / "results"
    src = Path(argv[1]) if len(argv) > 1 else here / "latest.json"
    out = Path(argv[2]) if len(argv) > 2 else here / "summary.png"
    data = json.loads(src.read_text())
    g = data["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    ax = axes[0]
    bars, labels = [], []
    colors = []
    if "decode" in g:
        d = next(iter(g["decode"].values()))
        bars += [d["torch_fp32_tok_s"]]
        labels += ["PyTorch\nfp32"]
        colors += ["#999999"]
    llama = next((v for k, v in g.get("vs_llama_cpp", {}).items() if k.startswith("tg") and "1t" not in k), None)
    if llama:
        bars.append(llama["llama_cpp_tok_s"])
        labels.append("llama.cpp")
        colors.append("#777777")
    if "decode" in g:
        bars.append(d["native_tok_s"])
        labels.append("dovetail")
        colors.append("#2a7ab0")
    spec = g.get("speculative", {})
    if "speculative" in spec:
        bars.append(spec["speculative"]["tokens_per_s"])
        # its own workload (HumanEval prompts): the ratio to plain decoding in that run
        ratio = f"\n{spec['speculative']['tokens_per_s'] / spec['plain']['tokens_per_s']:.2f}x its plain" \
            if "plain" in spec else ""
        labels.append("dovetail\nspeculative" + ratio)
        colors.append("#e08a2c")
    ax.bar(labels, bars, color=colors)
    for i, v in enumerate(bars):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Greedy decode, default model")

    ax = axes[1]
    extra = next(iter(g.get("verify_cost_extra", {}).values()), {}).get("model", "another GGUF")
    curves = [("verify_cost", "Q4_1 (as shipped)", "#2a7ab0"), ("verify_cost_bf16", "bf16 copy", "#e08a2c"),
              ("verify_cost_extra", extra, "#4a9a4a")]
    for group, name, color in curves:
        if group not in g:
            continue
        items = sorted(((int(k.split("=")[1]), v["ms"]) for k, v in g[group].items()))
        base = items[0][1]
        ax.plot([t for t, _ in items], [ms / base for _, ms in items], "o-", color=color,
                label=f"{name}, T = 1: {base:.1f} ms")
    if "verify_cost" in g:
        ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens verified in one target call (T)")
        ax.set_ylabel("time relative to T = 1")
        ax.set_title("Verify cost curve")
        ax.grid(alpha=0.3)

    ax = axes[2]
    if "linear" in g:
        rows = [(k, v) for k, v in g["linear"].items() if k.endswith("T=1")]
        ax.barh([k.replace(" T=1", "") for k, _ in rows], [v["GBps"] for _, v in rows], color="#2a7ab0")
        ax.axvline(33, color="#888", ls="--", lw=1, label="DRAM read, 2 threads (typical)")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
        ax.set_xlabel("weight GB/s at T = 1\n(repeated calls: L3 holds up to 32 MB)")
        ax.set_title("Quantized linear, decode")
    fig.suptitle(f"{data.get('cpu', '')}, {data.get('threads')} threads, {data.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
