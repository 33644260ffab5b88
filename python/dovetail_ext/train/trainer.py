"""Training a Dovetail draft on cached target features (PyTorch, CPU or CUDA).

Sample layout, for one conversation of N tokens x_0..x_{N-1} with target features
f_0..f_{N-1} and assistant mask m: the draft reads (f_j + noise, x_{j+1}) at position j and
predicts f_{j+1}, whose head logits give the target's guess for x_{j+2}. Position j is
trained when x_{j+2} is an assistant token (m[j+2] = 1).

Loss per trained position (the Dovetail / EAGLE recipe)::

    1.0 * SmoothL1(f^_{j+1}, f_{j+1}) + 0.1 * CE(softmax(Hs f_{j+1}), log_softmax(Hs f^_{j+1}))

with Hs the target's LM head restricted to the draft vocabulary (``vocab_map``). With
``rollout > 1`` the draft is also run on its own predicted features for more steps (the
EAGLE-3 training-time test) and each step adds its loss.

Rollout with exact attention: at step s, row p is the draft's s-th step of a chain that
started at position j = p - s + 1; it attends to the real pairs 0..j (step 1's keys) and
to its own chain's keys of steps 2..s. The same routine simulates acceptance at
validation: a chain is accepted while every drafted token equals the target's greedy
token (argmax of the full head on the stored feature) and the data continues with it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..draft_model import DovetailDraft, DraftConfig
from .features import FeatureCache

__all__ = ["TrainConfig", "Trainer", "choose_vocab_map", "rollout", "evaluate", "target_head"]


@dataclass
class TrainConfig:
    """Trainer settings (all but ``threads`` and ``progress`` go into checkpoints and the card).

    Attributes:
        layers: draft decoder layers. draft_vocab_size: 0 = full vocabulary.
        epochs: passes over the training split. batch_tokens: padded tokens per step.
        lr, betas, weight_decay: AdamW. warmup_steps: linear warmup, then cosine to
            ``min_lr_ratio * lr``. clip_value: gradient value clipping (0: none).
        noise: input features get U(-noise/2, noise/2) added (training only).
        feature_weight, ce_weight: loss weights. rollout: training steps per chain (1 =
            teacher forcing only). rollout_weight: weight of step s > 1 is rollout_weight^(s-1).
        max_len: tokens per sequence at most. prompt_context: keep at most this many
            tokens before a conversation's first assistant token (0: all); the draft
            attends to them but is not trained on them, so long prompts mostly cost time.
        seed: init, data order and noise. amp: bf16 autocast for the matmuls (parameters
            and optimizer state stay float32; on CPUs with bf16 dot products about 5x faster).
        time_budget_s: when > 0, training stops after this many seconds of steps and the
            learning-rate schedule follows elapsed time instead of steps (for a run that
            must end on time on a shared machine; not bit-reproducible, unlike step-based).
        val_depth: chain depth of the simulated acceptance. val_every: steps between
            validations (0: at each epoch end). ckpt_every_s: seconds between checkpoints.
        init: a draft directory to start from (fine-tuning): its weights and its draft
            vocabulary instead of a random draft and a vocabulary chosen from the data;
            it must be a draft of the same target, layer count and vocabulary size.
    """

    layers: int = 1
    draft_vocab_size: int = 8192
    epochs: float = 1.0
    batch_tokens: int = 4096
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    clip_value: float = 0.5
    noise: float = 0.2
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    rollout: int = 1
    rollout_weight: float = 0.8
    max_len: int = 1024
    prompt_context: int = 0
    seed: int = 0
    amp: bool = True
    time_budget_s: float = 0.0
    val_depth: int = 7
    val_every: int = 0
    ckpt_every_s: float = 300.0
    init_std: float = 0.02
    init: str = ""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.layers < 1 or self.batch_tokens < 2 or self.rollout < 1 or self.val_depth < 1:
            raise ValueError("layers, rollout and val_depth must be >= 1 and batch_tokens >= 2")
        if not 0 < self.epochs < float("inf") or not 0 < self.lr < float("inf"):
            raise ValueError(f"epochs and lr must be finite positive numbers, got {self.epochs!r}, {self.lr!r}")
        if not 0 <= self.noise < float("inf"):
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise!r}")
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: the full vocabulary), got {self.draft_vocab_size}")


def target_head(source: Any) -> tuple[Tensor, Tensor]:
    """(embedding [V, D], LM head [V, D]) of a target as float32 tensors (the head is the
    embedding when tied)."""
    from ..quant import dequantize

    emb = torch.from_numpy(np.ascontiguousarray(dequantize(source.weights["token_embd"]), dtype=np.float32))
    if "output" in source.weights:
        head = torch.from_numpy(np.ascontiguousarray(dequantize(source.weights["output"]), dtype=np.float32))
    else:
        head = emb
    return emb, head


def choose_vocab_map(tokens: np.ndarray, mask: np.ndarray, size: int, vocab_size: int,
                     eos_ids: tuple[int, ...]) -> np.ndarray:
    """The draft vocabulary: the EOS ids plus the ``size - len(eos)`` most frequent
    assistant tokens (ties and unseen fill-ins by lowest id), ascending int64 [size]."""
    counts = np.bincount(tokens[mask.astype(bool)].astype(np.int64), minlength=vocab_size).astype(np.float64)
    counts += np.bincount(tokens.astype(np.int64), minlength=vocab_size) * 1e-9  # then any token seen
    counts[list(eos_ids)] = np.inf
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:size]).astype(np.int64)


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several loaded splits (see :meth:`FeatureCache.load`) as one."""
    if len(parts) == 1:
        return parts[0]
    offsets, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offsets.append(p["offsets"][1:].astype(np.int64) + base)
        base += int(p["offsets"][-1])
    return {"tokens": np.concatenate([p["tokens"] for p in parts]),
            "mask": np.concatenate([p["mask"] for p in parts]),
            "offsets": np.concatenate(offsets),
            "features": np.concatenate([p["features"] for p in parts])}


class _Data:
    """One split in memory: sequences as row ranges of the cache arrays."""

    def __init__(self, arrays: dict[str, np.ndarray], max_len: int, prompt_context: int = 0) -> None:
        self.tokens = arrays["tokens"]
        self.mask = arrays["mask"]
        self.features = arrays["features"]
        off = arrays["offsets"].astype(np.int64)
        self.starts = off[:-1].copy()
        if prompt_context > 0:
            for c in range(len(self.starts)):
                first = np.flatnonzero(self.mask[off[c]:off[c + 1]])
                if len(first):
                    self.starts[c] += max(0, int(first[0]) - prompt_context)
        self.lens = np.minimum(off[1:] - self.starts, max_len)
        keep = self.lens >= 3
        self.starts, self.lens = self.starts[keep], self.lens[keep]

    def __len__(self) -> int:
        return len(self.starts)

    def batches(self, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
        """Sequence indices per batch for one epoch (shuffled, length-grouped, deterministic)."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self))
        out: list[np.ndarray] = []
        for c in range(0, len(order), 64):  # sort within windows: little padding, still random
            win = order[c:c + 64]
            win = win[np.argsort(-self.lens[win], kind="stable")]
            cur: list[int] = []
            for i in win:
                n_max = max([self.lens[j] for j in cur] + [self.lens[i]])
                if cur and n_max * (len(cur) + 1) > batch_tokens:
                    out.append(np.array(cur))
                    cur = []
                cur.append(int(i))
            if cur:
                out.append(np.array(cur))
        return [out[k] for k in rng.permutation(len(out))]

    def collate(self, idx: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """(features float32 [B, N, D], tokens long [B, N], mask bool [B, N]), zero-padded."""
        n = int(self.lens[idx].max())
        D = self.features.shape[1]
        f = np.zeros((len(idx), n, D), np.uint16)
        x = np.zeros((len(idx), n), np.int64)
        m = np.zeros((len(idx), n), bool)
        for b, i in enumerate(idx):
            s, L = self.starts[i], self.lens[i]
            f[b, :L] = self.features[s:s + L]
            x[b, :L] = self.tokens[s:s + L]
            m[b, :L] = self.mask[s:s + L].astype(bool)
        feats = torch.from_numpy(f.view(np.int16)).view(torch.bfloat16).float()
        return feats, torch.from_numpy(x), torch.from_numpy(m)


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)


def _shift(t: Tensor, k: int) -> Tensor:
    """Rows moved k later along dim 1 (row p holds row p - k; the first k rows zero)."""
    if k == 0:
        return t
    return torch.cat([torch.zeros_like(t[:, :k]), t[:, :-k]], dim=1)


def rollout(draft: DovetailDraft, features: Tensor, tokens: Tensor, embed: Tensor, steps: int) -> list[Tensor]:
    """Teacher-forced step 1, then ``steps - 1`` steps on the draft's own features.

    Args:
        features: [B, N, D] the input features f_0..f_{N-1} (noise already added).
        tokens: long [B, N] the input tokens x_1..x_N (the data's; along an accepted chain
            they equal the drafted tokens).
        embed: [V, D] the target's token embedding.
    Returns:
        ``steps`` tensors [B, N, D]: entry s-1, row p is the s-th prediction of the chain
        started at p - s + 1, a prediction of f_{p+1} (rows p < s - 1 are meaningless).
    """
    c = draft.config
    groups = c.num_heads // c.num_kv_heads
    scale = 1.0 / math.sqrt(c.head_dim)
    B, N, _ = features.shape
    positions = torch.arange(N, device=features.device)
    emb = F.embedding(tokens, embed).to(draft.dtype)
    keys: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(c.num_layers)]
    outs: list[Tensor] = []
    causal = torch.ones(N, N, dtype=torch.bool, device=features.device).tril()
    for s in range(1, steps + 1):
        def attend(i: int, q: Tensor, k: Tensor, v: Tensor, s: int = s) -> Tensor:
            keys[i].append((k, v))
            if s == 1:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True)
                return out.transpose(1, 2)
            k1, v1 = keys[i][0]
            qh = q.transpose(1, 2)                                             # [B, H, N, Dh]
            main = qh @ _expand_kv(k1, groups).transpose(1, 2).transpose(-1, -2) * scale  # [B, H, N, N]
            main = main.masked_fill(~causal.tril(-(s - 1)), float("-inf"))  # keys 0..j only
            extra_k = [_shift(_expand_kv(kt, groups), s - t) for t, (kt, _) in enumerate(keys[i][1:], 2)]
            extra_v = [_shift(_expand_kv(vt, groups), s - t) for t, (_, vt) in enumerate(keys[i][1:], 2)]
            extra = torch.stack([(q * kt).sum(-1) for kt in extra_k], dim=-1) * scale  # [B, N, H, s-1]
            # a chain key that would lie before position 0 does not exist
            valid = positions[:, None] - (s - torch.arange(2, s + 1, device=q.device))[None, :] >= 0
            extra = extra.masked_fill(~valid[None, :, None, :], float("-inf"))
            scores = torch.cat([main, extra.permute(0, 2, 1, 3)], dim=-1)      # [B, H, N, N + s - 1]
            w = torch.softmax(scores, dim=-1)
            out = w[..., :N] @ _expand_kv(v1, groups).transpose(1, 2)          # [B, H, N, Dh]
            we = w[..., N:].permute(0, 2, 1, 3)                                 # [B, N, H, s-1]
            out = out.transpose(1, 2) + sum(we[..., t, None] * vt for t, vt in enumerate(extra_v))
            return out

        inp = features.to(draft.dtype) if s == 1 else _shift(outs[-1], 1)
        x = draft.fuse(inp, emb)
        for layer in draft.blk:
            x = layer(x, positions, attend, F.linear)
        outs.append(x)
    return outs


def _lr_at(cfg: TrainConfig, step: int, total: int, elapsed: float = 0.0) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.time_budget_s > 0:
        t = min(1.0, elapsed / cfg.time_budget_s)
    else:
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _step_loss(draft: DovetailDraft, cfg: TrainConfig, feats: Tensor, toks: Tensor, mask: Tensor,
               embed: Tensor, head_d: Tensor, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """Loss of one batch (noise drawn from ``generator``; None: no noise)."""
    inp = feats[:, :-1]
    if generator is not None and cfg.noise > 0:
        inp = inp + (torch.rand(inp.shape, generator=generator) - 0.5).to(inp.device) * cfg.noise
    nxt, tgt = toks[:, 1:], feats[:, 1:]
    trained = torch.zeros_like(mask[:, 1:])
    trained[:, :-1] = mask[:, 2:]
    outs = rollout(draft, inp, nxt, embed, cfg.rollout)
    total = feats.new_zeros(())
    stats: dict[str, float] = {}
    for s, h in enumerate(outs, 1):
        rows = trained.clone()
        rows[:, :s - 1] = False  # chains that would start before position 0
        if not rows.any():
            continue
        hp, tf = h[rows], tgt[rows]
        sl1 = F.smooth_l1_loss(hp.float(), tf, reduction="none").mean(-1).mean()
        with torch.no_grad():
            p = torch.softmax((tf @ head_d.T).float(), dim=-1)
        dl = (hp @ head_d.T).float()
        ce = -(p * torch.log_softmax(dl, dim=-1)).sum(-1).mean()
        w = cfg.rollout_weight ** (s - 1)
        total = total + w * (cfg.feature_weight * sl1 + cfg.ce_weight * ce)
        if s == 1:
            stats = {"sl1": float(sl1.detach()), "ce": float(ce.detach()),
                     "acc": float((dl.argmax(-1) == p.argmax(-1)).float().mean()), "rows": int(rows.sum())}
    return total, stats


@torch.no_grad()
def evaluate(draft: DovetailDraft, data: _Data, embed: Tensor, head: Tensor, depth: int = 7,
             batch_tokens: int = 4096, cache: dict | None = None) -> dict[str, Any]:
    """Validation on held-out conversations.

    Returns:
        ``top1``: teacher-forced agreement of the draft's top token with the target's greedy
        token, on assistant positions; ``top1_depth``: the same at depth d along accepted
        chains; ``tau``: simulated acceptance length of a chain of d drafted tokens, d =
        1..depth (1 + accepted tokens per start); ``coverage``: share of the target's greedy
        assistant tokens inside the draft vocabulary; ``loss``; counts. ``cache`` (a dict
        kept by the caller) keeps the target's greedy tokens between calls on the same data.
    """
    dev = next(draft.parameters()).device
    vm = draft.vocab_map.to(dev) if draft.vocab_map is not None else None
    head_d = draft.draft_head(head.to(dev)).float()
    n_start = 0
    accepted = np.zeros(depth + 1, np.int64)  # histogram of chain lengths 0..depth
    hits = np.zeros(depth, np.int64)
    tries = np.zeros(depth, np.int64)
    covered = total_g = 0
    loss_sum = rows_sum = 0.0
    cfg_eval = TrainConfig(rollout=1, noise=0.0)
    for bi, idx in enumerate(data.batches(batch_tokens, 0, 0)):
        feats, toks, mask = (t.to(dev) for t in data.collate(idx))
        B, N, _ = feats.shape
        loss, st = _step_loss(draft, cfg_eval, feats, toks, mask, embed.to(dev), head_d, None)
        loss_sum += float(loss) * st.get("rows", 0)
        rows_sum += st.get("rows", 0)
        if cache is not None and bi in cache:
            greedy = cache[bi]
        else:
            greedy = torch.full((B, N + 1), -1, dtype=torch.long, device=dev)
            with torch.autocast(dev.type, enabled=False):  # the target's choice, in float32
                greedy[:, 1:] = (feats @ head.to(dev).T).argmax(-1)  # greedy[q]: the target's guess for x_q
            if cache is not None:
                cache[bi] = greedy
        follows = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        follows[:, :N] = toks == greedy[:, :N]
        m = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        m[:, :N] = mask
        in_vocab = torch.isin(greedy[:, :N], vm) if vm is not None else torch.ones_like(mask)
        covered += int((in_vocab & mask)[:, 1:].sum())
        total_g += int(mask[:, 1:].sum())
        outs = rollout(draft, feats[:, :-1], toks[:, 1:], embed.to(dev), depth)
        ok = []
        for s, h in enumerate(outs, 1):  # row p of step s predicts x_{p+2}
            tok = (h.float() @ head_d.T).argmax(-1)
            tok = vm[tok] if vm is not None else tok
            ok.append(tok == greedy[:, 2:N + 1])
        # chain from start j: step s checks row j+s-1, i.e. token x_{j+s+1}
        alive = m[:, 2:N + 1].clone()  # starts whose first predicted token is an assistant token
        n_start += int(alive.sum())
        length = torch.zeros_like(alive, dtype=torch.long)
        J = N - 1
        for s in range(1, depth + 1):
            r = s - 1
            if r >= J:
                alive = torch.zeros_like(alive)
                break
            step_ok = torch.zeros_like(alive)
            step_ok[:, :J - r] = ok[s - 1][:, r:J] & m[:, s + 1:J + 2]
            if s > 1:  # the drafted token of step s-1 must also be what the data continues with
                prev_follow = torch.zeros_like(alive)
                prev_follow[:, :J - r] = follows[:, s:J + 1]
                step_ok &= prev_follow
            tries[s - 1] += int(alive.sum())
            alive = alive & step_ok
            hits[s - 1] += int(alive.sum())
            length += alive.long()
        valid_start = m[:, 2:N + 1]
        accepted += np.bincount(length[valid_start].cpu().numpy(), minlength=depth + 1)[:depth + 1]
    counts = accepted.astype(np.float64)
    tau = [1.0 + float(np.minimum(np.arange(depth + 1), d) @ counts) / max(1.0, counts.sum())
           for d in range(1, depth + 1)]
    return {"top1": float(hits[0] / max(1, tries[0])),
            "top1_depth": [float(h / max(1, t)) for h, t in zip(hits, tries)],
            "tau": tau, "coverage": covered / max(1, total_g), "loss": loss_sum / max(1.0, rows_sum),
            "positions": n_start}


class _DeferSigint:
    """SIGINT handling for :meth:`Trainer.fit`: outside ``critical()`` a SIGINT raises
    KeyboardInterrupt at once (as Python's default handler does); inside, it is held until
    the block ends, so an optimizer step and the counters that record it are never split."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> "_DeferSigint":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            if self.previous is signal.default_int_handler:  # leave custom handlers alone
                signal.signal(signal.SIGINT, self._handle)
                self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending and not self.depth:
            self.pending = False
            raise KeyboardInterrupt


def check_extra_caches(extras: Sequence[FeatureCache], target: Any, hidden_size: int) -> None:
    """Each extra feature cache must hold features of ``target`` (a TargetSignature: the
    file's name left out, as a draft's check leaves it) at ``hidden_size``."""
    from ..draft_model import TargetSignature
    for extra in extras:
        diff = TargetSignature.from_dict(extra.manifest["target"]).differences(target)
        if diff or extra.manifest.get("hidden_size") != hidden_size:
            raise ValueError(f"{extra.directory}: its features come from another target "
                             f"({'; '.join(diff) or 'hidden_size differs'})")
        if not extra.manifest["shards"]:
            raise ValueError(f"{extra.directory}: the cache holds no features yet")


def _init_draft(path: str, source: Any, want: DraftConfig) -> DovetailDraft:
    """The draft at ``path`` as the starting point of training a draft shaped ``want``."""
    from ..draft_model import load_draft

    draft = load_draft(path, target=source)  # DraftMismatchError for another target
    have = draft.config
    for key in ("num_layers", "draft_vocab_size", "hidden_size"):
        if getattr(have, key) != getattr(want, key):
            raise ValueError(f"--init draft {path} has {key} {getattr(have, key)}, this training asks for "
                             f"{getattr(want, key)}")
    return draft.float()


class Trainer:
    """Trains one draft on a feature cache, with checkpoints in ``work_dir``.

    Args:
        source: the target (its embedding and head are the draft's frozen inputs).
        cache: the features (its ``train`` and ``val`` splits).
        cfg: settings. work_dir: checkpoints go to ``work_dir / "checkpoints"``.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        extra_train: more feature caches whose ``train`` splits are added to ``cache``'s
            (their ``val`` splits are not used: validation stays on ``cache``'s). They must
            come from the same target.
    Raises:
        ValueError: no training conversations, or an extra cache of another target.
    """

    def __init__(self, source: Any, cache: FeatureCache, cfg: TrainConfig, work_dir: str | os.PathLike,
                 device: str | None = None, extra_train: Sequence[FeatureCache] = ()) -> None:
        self.cfg = cfg
        self.source = source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from ..draft_model import TargetSignature
        self.target = TargetSignature.from_source(source)
        check_extra_caches(extra_train, self.target, cache.manifest.get("hidden_size"))
        self.train = _Data(_concat([cache.load("train")] + [c.load("train") for c in extra_train]),
                           cfg.max_len, cfg.prompt_context)
        self.val = _Data(cache.load("val"), cfg.max_len)  # full prompts: as at inference
        if len(self.train) == 0:
            raise ValueError(f"{cache.directory}: no training conversations in the feature cache")
        self.embed, self.head = (t.to(self.device) for t in target_head(source))
        eos = tuple(source.config.eos_token_ids)
        dcfg = DraftConfig.for_target(source, num_layers=cfg.layers, draft_vocab_size=cfg.draft_vocab_size)
        torch.manual_seed(cfg.seed)
        if cfg.init:
            self.draft = _init_draft(cfg.init, source, dcfg)
        else:
            self.draft = DovetailDraft.random(dcfg, seed=cfg.seed, std=cfg.init_std)
        if cfg.draft_vocab_size and not cfg.init:
            vm = choose_vocab_map(self.train.tokens, self.train.mask, cfg.draft_vocab_size,
                                  dcfg.vocab_size, eos)
            self.draft.vocab_map = torch.from_numpy(vm)
        self.draft.to(self.device)
        self.head_d = self.draft.draft_head(self.head).contiguous()
        self.opt = torch.optim.AdamW(self.draft.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.work_dir = Path(work_dir)
        self.ckpt = self.work_dir / "checkpoints" / "last.pt"
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.seconds = 0.0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self._greedy: dict[int, Tensor] = {}
        n_batches = len(self.train.batches(cfg.batch_tokens, cfg.seed, 0))
        self.steps_per_epoch = n_batches
        self.total_steps = max(1, int(round(cfg.epochs * n_batches)))

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last.pt`` atomically (model, optimizer, position in the data)."""
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.draft.state_dict(), "opt": self.opt.state_dict(), "epoch": self.epoch,
                 "batch": self.batch_in_epoch, "step": self.step, "seconds": self.seconds,
                 "tokens_seen": self.tokens_seen, "history": self.history, "cfg": asdict(self.cfg),
                 "target": self.target.to_dict()}
        tmp = self.ckpt.with_name("last.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt)
        return self.ckpt

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoints/last.pt`` if there is one (its settings must match)."""
        if not self.ckpt.is_file():
            return False
        from ..draft_model import TargetSignature
        hint = "delete it, or train without --resume"
        try:
            state = torch.load(self.ckpt, map_location=self.device, weights_only=False)
            saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in state["cfg"].items()}
            target = TargetSignature.from_dict(state["target"]) if "target" in state else None
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"{self.ckpt}: not a readable training checkpoint ({type(e).__name__}: {e}); "
                             f"{hint}") from None
        diff = target.differences(self.target) if target is not None else []
        if diff:
            raise ValueError(f"{self.ckpt}: the checkpoint trains a draft for another target ({'; '.join(diff)}); "
                             f"{hint}")
        mine = asdict(self.cfg)
        diff = [k for k in mine if k not in ("epochs", "val_every", "ckpt_every_s", "time_budget_s")
                and saved.get(k) != mine[k]]
        if diff:
            raise ValueError(f"{self.ckpt}: the checkpoint was trained with other settings ({', '.join(diff)}); "
                             f"train without --resume or into another directory")
        self.draft.load_state_dict(state["model"])
        self.head_d = self.draft.draft_head(self.head).contiguous()
        self.opt.load_state_dict(state["opt"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch"], state["step"]
        self.seconds, self.tokens_seen = state["seconds"], state["tokens_seen"]
        self.history = state["history"]
        return True

    # -- training ------------------------------------------------------------------------
    def _amp(self) -> Any:
        import contextlib
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def validate(self) -> dict[str, Any]:
        self.draft.eval()
        with self._amp():
            out = evaluate(self.draft, self.val, self.embed, self.head, self.cfg.val_depth, self.cfg.batch_tokens,
                           self._greedy)
        self.draft.train()
        return out

    def fit(self, progress: bool = False, log: Callable[[str], None] | None = None,
            stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (from wherever a loaded checkpoint left off).

        Args:
            progress: tqdm bar with loss, accuracy and tokens/s (stderr).
            log: receives one line per validation.
            stop_after_steps: stop (after a checkpoint) once this many steps ran in this
                call (for tests and time-boxed runs); the run stays resumable.
        Returns:
            the last validation metrics (empty when validation was not reached).
        Raises:
            KeyboardInterrupt: on SIGINT, after writing a checkpoint of the last finished
                step (an optimizer step under way completes first), so a resumed run loses
                no finished step.
        """
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True)
        self.draft.train()
        with _DeferSigint() as sigint:
            try:
                return self._fit(bar, stop_after_steps, sigint, log)
            except KeyboardInterrupt:
                # the state is between two steps (an update in flight finishes first): keep it
                if bar is not None:
                    bar.close()
                path = self.save_checkpoint()
                if log is not None:
                    log(f"interrupted at step {self.step} (epoch {self.epoch}): checkpoint written to {path}; "
                        f"continue with --resume")
                raise

    def _fit(self, bar: Any, stop_after_steps: int | None, sigint: _DeferSigint,
             log: Callable[[str], None] | None) -> dict[str, Any]:
        cfg = self.cfg
        last_ckpt = time.perf_counter()
        ran = 0
        metrics: dict[str, Any] = {}

        def more() -> bool:
            if cfg.time_budget_s > 0 and self.seconds >= cfg.time_budget_s:
                return False
            return self.step < self.total_steps

        while more():
            batches = self.train.batches(cfg.batch_tokens, cfg.seed, self.epoch)
            while self.batch_in_epoch < len(batches) and more():
                t0 = time.perf_counter()
                feats, toks, mask = (t.to(self.device) for t in self.train.collate(batches[self.batch_in_epoch]))
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
                for g in self.opt.param_groups:
                    g["lr"] = _lr_at(cfg, self.step, self.total_steps, self.seconds)
                with self._amp():
                    loss, st = _step_loss(self.draft, cfg, feats, toks, mask, self.embed, self.head_d, gen)
                if not torch.isfinite(loss):
                    raise ValueError(f"training diverged at step {self.step} (loss {float(loss)}); lower --lr "
                                     f"(now {cfg.lr:g})")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_value > 0:
                    torch.nn.utils.clip_grad_value_(self.draft.parameters(), cfg.clip_value)
                with sigint.critical():  # the update and its bookkeeping: all or nothing
                    self.opt.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    ran += 1
                    n_tok = int(mask.numel())
                    self.tokens_seen += n_tok
                    dt = time.perf_counter() - t0
                    self.seconds += dt
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=self.epoch, loss=f"{float(loss.detach()):.3f}", acc=f"{st.get('acc', 0):.3f}",
                                    tok_s=f"{n_tok / dt:.0f}")
                if cfg.val_every and self.step % cfg.val_every == 0 and len(self.val):
                    metrics = self._record(log)
                if time.perf_counter() - last_ckpt > cfg.ckpt_every_s:
                    self.save_checkpoint()
                    last_ckpt = time.perf_counter()
                if stop_after_steps is not None and ran >= stop_after_steps:
                    self.save_checkpoint()
                    if bar is not None:
                        bar.close()
                    return metrics
            if self.batch_in_epoch >= len(batches):
                with sigint.critical():
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if not cfg.val_every and len(self.val):
                    metrics = self._record(log)
        if bar is not None:
            bar.close()
        if len(self.val) and (not self.history or self.history[-1]["step"] != self.step):
            metrics = self._record(log)
        self.save_checkpoint()
        return metrics or (self.history[-1]["metrics"] if self.history else {})

    def _record(self, log: Callable[[str], None] | None) -> dict[str, Any]:
        m = self.validate()
        self.history.append({"step": self.step, "epoch": self.epoch, "seconds": round(self.seconds, 1),
                             "metrics": m})
        if log is not None:
            log(f"step {self.step} epoch {self.epoch}: val top1 {m['top1']:.3f}, tau(d=1..{len(m['tau'])}) "
                + " ".join(f"{t:.2f}" for t in m["tau"]) + f", coverage {m['coverage']:.3f}, loss {m['loss']:.3f}")
        return m
