"""Command line: write a model's weights for C programs (the container in :mod:`dovetail_ext.capi`).

    python -m dovetail_ext.export_c_weights model.dtw                 # the default model
    python -m dovetail_ext.export_c_weights model.dtw --model my.gguf
    python -m dovetail_ext.export_c_weights model.dtw --draft-out draft.dtw   # and its shipped draft
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
                    help="GGUF file or Hugging Face directory (LLaMA / Qwen2 / Qwen3 / Gemma 3; "
                         "default: the default model)")
    ap.add_argument("--draft-out", metavar="FILE", default=None,
                    help="also write the draft for this model into FILE (for dt_draft_create)")
    ap.add_argument("--draft", metavar="DIR", default="auto",
                    help="the draft checkpoint for --draft-out (default: the draft shipped for the model)")
    args = ap.parse_args(argv)
    from .capi import export_c_draft, export_c_weights
    from .errors import DraftMismatchError, FormatError
    try:
        paths = [export_c_weights(args.out, args.model)]
        if args.draft_out:
            paths.append(export_c_draft(args.draft_out, args.model, args.draft))
    except (FileNotFoundError, FormatError, DraftMismatchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
