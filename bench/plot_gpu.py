"""Draw the GPU suite's modes (tokens/s against CPU plain decoding) from gpu_suite.py JSON files.

    python bench/plot_gpu.py OUT.png RUN.json [RUN.json ...]

Each file is one process (its own CPU plain baseline); its modes are drawn as bars of the
ratio to that baseline, one panel per file, offload modes labelled with their GPU layers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"cpu-plain": "CPU\nplain", "cpu-spec": "CPU\ndraft", "cpu-spec-python": "CPU draft\nPython",
          "gpu-spec": "GPU\ndraft", "gpu-spec-eager": "GPU draft\nno graphs",
          "gpu-spec-python": "GPU draft\nPython", "gpu-spec-overlap": "GPU draft\noverlap",
          "offload-plain": "offload\nplain", "offload-spec": "offload +\nGPU draft"}
PAPER = 2.77  # the method's headline ratio over CPU plain decoding (a line on the figure)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, runs = Path(argv[1]), [json.loads(Path(p).read_text()) for p in argv[2:]]
    fig, axes = plt.subplots(1, len(runs), figsize=(7.5 * len(runs), 3.8), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs):
        modes = run["modes"]
        ratios = [m["ratio_vs_cpu_plain"] for m in modes]
        colors = ["#999999" if m["mode"] == "cpu-plain" else "#4c72b0" if m["mode"].startswith("cpu")
                  else "#dd8452" if m["mode"].startswith("gpu") else "#55a868" for m in modes]
        ax.bar(range(len(modes)), ratios, color=colors)
        for i, r in enumerate(ratios):
            ax.text(i, r + 0.03, f"{r:.2f}x", ha="center", fontsize=8)
        ax.axhline(1.0, color="#555555", lw=0.8)
        ax.axhline(PAPER, color="#c44e52", lw=0.8, ls="--")
        ax.text(-0.5, PAPER + 0.03, f"paper's {PAPER}x", ha="left", fontsize=7, color="#c44e52")  # (over the short bars)
        ax.set_xticks(range(len(modes)), [LABELS.get(m["mode"], m["mode"]) +
                                          (f"\n({m['gpu_layers']} layers)" if "gpu_layers" in m else "")
                                          for m in modes], fontsize=7)
        plain = next(m for m in modes if m["mode"] == "cpu-plain")["tokens_per_s"]
        n = run["gpu_layers"]
        offload = ", ".join(map(str, n)) if isinstance(n, list) else n
        ax.set_title(f"{run['device']}, {run['threads']} CPU threads, offload: {offload} layers on the GPU\n"
                     f"(CPU plain {plain:.0f} tok/s; {run['date']})", fontsize=9)
    axes[0][0].set_ylabel("tokens/s vs CPU plain decoding")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
