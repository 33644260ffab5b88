"""Command line: write a model's weights for C programs (the container in :mod:`dovetail_ext.capi`).

    python -m dovetail_ext.export_c_weights model.dtw                 # the default model
    python -m dovetail_ext.export_c_weights model.dtw --model my.gguf
    python -m dovetail_ext.export_c_weights model.dtw --draft-out draft.dtw   # and its shipped draft
    python -m dovetail_ext.export_c_weights model.dtw --draft-out draft.dtw --corpus-out corpus.dtw
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
                    help="GGUF file or Hugging Face directory (LLaMA / Qwen2 / Qwen3 / Gemma 2, 3 / Phi-3 / SmolLM3; "
                         "default: the default model)")
    ap.add_argument("--draft-out", metavar="FILE", default=None,
                    help="also write the draft for this model into FILE (for dt_draft_create)")
    ap.add_argument("--draft", metavar="DIR", default="auto",
                    help="the draft checkpoint for --draft-out (default: the draft shipped for the model)")
    ap.add_argument("--corpus-out", metavar="FILE", default=None,
                    help="also write the corpus for corpus lookup into FILE (for dt_speculator_set_corpus)")
    ap.add_argument("--corpus", metavar="PATH", default="auto",
                    help="the corpus file for --corpus-out (default: the corpus shipped for the model)")
    args = ap.parse_args(argv)
    from pathlib import Path

    from .capi import corpus_container, draft_container, target_container, write_container
    from .formats import load_model_source
    try:
        out = Path(args.out)
        if args.draft != "auto" and not args.draft_out:
            raise ValueError("--draft names the draft for --draft-out; give --draft-out FILE too")
        if args.corpus != "auto" and not args.corpus_out:
            raise ValueError("--corpus names the corpus for --corpus-out; give --corpus-out FILE too")
        outs = [out.resolve()]
        for flag, value in (("--draft-out", args.draft_out), ("--corpus-out", args.corpus_out)):
            if value and Path(value).resolve() in outs:
                raise ValueError(f"{flag} {value} is another output file too")
            if value:
                outs.append(Path(value).resolve())
        if args.model is not None and out.exists() and Path(args.model).exists() and out.samefile(args.model):
            raise ValueError(f"{out} is the model itself: writing the container there would destroy it")
        # Everything is read and checked before anything is written.
        source = load_model_source(args.model)
        parts = [(out, target_container(source))]
        if args.draft_out:
            parts.append((Path(args.draft_out), draft_container(source, args.draft)))
        if args.corpus_out:
            parts.append((Path(args.corpus_out), corpus_container(source, args.corpus)))
        paths = [write_container(path, *contents) for path, contents in parts]
    except (ValueError, OSError) as e:  # (FormatError, DraftMismatchError, missing or unwritable files)
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print("\n".join(str(p) for p in paths))
    except OSError as e:
        print(f"error: written, but the paths could not be printed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
