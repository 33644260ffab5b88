"""Command line: write a model's weights for C programs (the container in :mod:`dovetail_ext.capi`).

    python -m dovetail_ext.export_c_weights model.dtw                 # the default model
    python -m dovetail_ext.export_c_weights model.dtw --model my.gguf
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dovetail_ext.export_c_weights",
                                 description="Write a model's weights and config into the container that "
                                             "C programs using dovetail.h read (examples/c/greedy.c).")
    ap.add_argument("out", help="output file")
    ap.add_argument("--model", metavar="PATH", default=None,
                    help="GGUF file or Hugging Face LLaMA directory (default: the default model)")
    args = ap.parse_args(argv)
    from .capi import export_c_weights
    from .errors import FormatError
    try:
        path = export_c_weights(args.out, args.model)
    except (FileNotFoundError, FormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
