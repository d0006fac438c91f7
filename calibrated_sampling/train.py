"""Train a future-entropy head on cached label rows (the LM stays frozen), and evaluate it.

Rows are a dict of tensors (or an iterable of such dicts, or a label folder written by ``labels``):

    hidden           (N, H)  float32 / bfloat16   the LM's final hidden state at the context x
    token            (N,)    int64                the token v after x
    horizon          (N,)    int64                steps summed into the target
    target           (N,)    float32              summed future entropies, nats
    context_id       (N,)    int64                rows of one context share it (evaluation only)
    context_entropy  (N,)    float32              H(p(. | x)) (the baseline's input; evaluation only)

Objective. Targets are sums of ``horizon`` noisy per-step entropies (tens of nats, spread growing with
the horizon), so the default loss divides each squared error by max(horizon, 1): the inverse-variance
weight when the per-step noise is roughly independent, and the same as a squared error on the entropy
rate target / horizon weighted by the horizon. ``weighting="none"`` is the plain squared error of sums.
The head predicts a rate times the horizon (see heads.py); before the first step its constant rate is
set to the weighted least-squares rate sum(target) / sum(horizon), so training starts at the baseline
level and spends its steps on the context and token effects.

Determinism. The row order of epoch e is a permutation seeded by (seed, e), the learning rate is a pure
function of the step, and a checkpoint holds the head, the optimizer, the RNG and the history: a run
that is interrupted and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .files import atomic_path
from .heads import FutureEntropyHead

TRAIN_KEYS = ("hidden", "token", "horizon", "target")
EVAL_KEYS = TRAIN_KEYS + ("context_id", "context_entropy")
WEIGHTINGS = ("horizon", "none")
CHECKPOINT_DIR = "checkpoints"
HEAD_DIR = "head"
HISTORY_NAME = "history.json"
PLOT_NAME = "loss.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainResult:
    head: FutureEntropyHead  # the trained head (unwrapped, on the accelerator's device)
    steps: int  # optimizer steps taken in all (including those before a resume)
    history: list[dict]  # {"step", "epoch", "loss", "lr"} every log_every steps; {"step", "val_*"} per epoch
    resumed_from: int | None  # the checkpoint step the run resumed from, None for a fresh run
    metrics: dict | None  # evaluate_head on val_rows (baseline fitted on the training rows)
    head_dir: Path  # out_dir/head: the saved head folder
    seconds: float = 0.0  # wall time of the optimisation loop, summed over the runs a resume joined


# ----------------------------------------------------------------------------------------------------
# Rows


def collate_rows(rows, keys: Iterable[str] = TRAIN_KEYS) -> dict[str, torch.Tensor]:
    """A dict of tensors, an iterable of such dicts (concatenated), or a label folder path -> one dict."""
    if isinstance(rows, (str, os.PathLike)):
        from .label_store import load_labels  # only needed for folder input

        rows = load_labels(rows)
    if not isinstance(rows, dict):
        parts = list(rows)
        if not parts:
            raise ValueError("`rows` is empty")
        rows = {key: torch.cat([part[key] for part in parts]) for key in parts[0] if all(key in p for p in parts)}
    missing = [key for key in keys if key not in rows]
    if missing:
        raise ValueError(f"label rows lack {', '.join(missing)} (they have {', '.join(sorted(rows))})")
    n = len(rows["target"])
    for key in keys:
        if len(rows[key]) != n:
            raise ValueError(f"label rows disagree on their count: `{key}` has {len(rows[key])}, `target` has {n}")
    return rows


def _check_rows(rows: dict[str, torch.Tensor], head: FutureEntropyHead) -> None:
    config = head.config
    if rows["hidden"].ndim != 2 or rows["hidden"].shape[1] != config.hidden_size:
        raise ValueError(f"`hidden` must have shape (N, {config.hidden_size}), but has {tuple(rows['hidden'].shape)}")
    if len(rows["token"]) and (rows["token"].min() < 0 or rows["token"].max() >= config.vocab_size):
        raise ValueError(f"`token` must lie in [0, {config.vocab_size}), but spans "
                         f"[{rows['token'].min().item()}, {rows['token'].max().item()}]")
    if len(rows["horizon"]) and rows["horizon"].min() < 0:
        raise ValueError(f"`horizon` must be non-negative, but its minimum is {rows['horizon'].min().item()}")


def _rows_digest(rows: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in ("token", "horizon", "target"):
        digest.update(rows[key].contiguous().numpy().tobytes())
    digest.update(rows["hidden"][:, :8].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The row permutation of one epoch: a function of (seed, epoch) only."""
    key = int.from_bytes(hashlib.sha256(f"train/{seed}/{epoch}".encode()).digest()[:7], "big")
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))


def objective(pred: torch.Tensor, target: torch.Tensor, horizon: torch.Tensor,
              weighting: str = "horizon") -> torch.Tensor:
    """Per-row loss: squared error, divided by max(horizon, 1) under ``weighting="horizon"``."""
    loss = (pred - target.to(pred.dtype)) ** 2
    return loss / horizon.clamp(min=1).to(pred.dtype) if weighting == "horizon" else loss


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _save_checkpoint(root: Path, step: int, head: FutureEntropyHead, optimizer, state: dict, keep: int) -> None:
    """Write ``root/step-NNNNNNNN`` through a temporary folder renamed at the end (a crash leaves no
    half-written checkpoint), then delete all but the newest ``keep``."""
    with atomic_path(_step_dir(root, step)) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                  str(tmp / "head.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    for old in sorted(_checkpoints(root))[:-keep]:
        shutil.rmtree(_step_dir(root, old), ignore_errors=True)


def _checkpoints(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]


# ----------------------------------------------------------------------------------------------------
# Training


def _lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over min(100, 5% of the steps), then cosine decay to lr / 10."""
    warmup = min(100, total // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class _RunState:
    """Where a training run stands; a checkpoint's ``state.json`` holds it (with the settings)."""

    step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)  # TrainResult.history so far
    running: list = field(default_factory=lambda: [0.0, 0])  # [summed loss, steps] since the last history entry
    seconds: float = 0.0  # wall time of the runs before this one
    resumed_from: int | None = None  # the checkpoint step loaded, None for a fresh run


def _start_or_resume(root: Path, settings: dict, head: FutureEntropyHead, rows: dict[str, torch.Tensor],
                     init_rate: bool) -> _RunState:
    """Load the newest checkpoint under ``root`` into ``head`` (refusing one made with other settings), or
    start fresh, with the head's constant rate set to the rows' sum(target) / sum(horizon) (``init_rate``)."""
    done = _checkpoints(root)
    if not done:
        if init_rate:
            head.set_rate(rows["target"].double().sum().item() / max(1, rows["horizon"].sum().item()))
        return _RunState()
    folder = _step_dir(root, max(done))
    state = _read_checkpoint(folder, "state.json", lambda path: json.loads(path.read_text()))
    if state["settings"] != settings:
        diff = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise ValueError(f"{folder} was made with other training settings ({', '.join(diff)}); "
                         "use another out_dir, resume=False, or the same settings")
    head.load_state_dict(_read_checkpoint(folder, "head.safetensors", lambda path: load_file(str(path))))
    return _RunState(state["step"], state["history"], state["running"], state.get("seconds", 0.0), max(done))


def _read_checkpoint(folder: Path, name: str, read: Callable[[Path], object]):
    """``read(folder / name)``, with a damaged file named: the checkpoint before it (when one is kept) is
    intact, so deleting this one resumes from there rather than from the start."""
    try:
        return read(folder / name)
    except Exception as error:  # JSON, safetensors and torch.load each raise their own kinds
        raise ValueError(f"checkpoint {folder} is damaged: {name} cannot be read ({type(error).__name__}: "
                         f"{error}); delete that folder to resume from the checkpoint before it (if one is left), or "
                         "start over (resume=False, --restart)") from None


def _optimizer(head: FutureEntropyHead, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases, norms and the per-token bias)."""
    decay = [p for p in head.parameters() if p.ndim >= 2]
    other = [p for p in head.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr)


def _train_step(model, optimizer, accelerator: Accelerator, rows: dict[str, torch.Tensor], batch: torch.Tensor,
                lr: float, weighting: str) -> torch.Tensor:
    """One optimizer step on the rows ``batch`` (indices) at learning rate ``lr``; returns the batch's mean loss."""
    world = accelerator.num_processes
    mine = batch[accelerator.process_index::world]  # each process takes a slice; DDP averages the gradients
    for group in optimizer.param_groups:
        group["lr"] = lr
    hidden, token, horizon, target = (rows[key][mine].to(accelerator.device) for key in TRAIN_KEYS)
    pred = model(hidden, horizon, token=token)  # (n,)
    losses = objective(pred, target, horizon, weighting)  # (n,)
    loss = losses.sum() * world / len(batch)  # the mean over the whole batch once DDP averages
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def train_head(
    head: FutureEntropyHead,
    rows,
    *,
    val_rows=None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    out_dir: str | os.PathLike,
    resume: bool = True,
    seed: int = 0,
    log_every: int = 50,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    weighting: str = "horizon",
    init_rate: bool = True,
    accelerator: Accelerator | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit ``head`` to label rows by (weighted) squared error with AdamW, checkpointing into ``out_dir``.

    Args:
        head: the head to train, in place (a tied head must have its output embedding attached).
        rows / val_rows: label rows (see the module docstring); val_rows are evaluated every epoch.
        epochs, batch_size, lr, weight_decay, seed: the optimisation; weight decay skips biases and norms.
        out_dir: gets ``checkpoints/``, the final head folder ``head/``, ``history.json`` and ``loss.png``.
        resume: continue from the newest checkpoint in out_dir (its settings must match these);
            False deletes out_dir's old checkpoints and starts over.
        log_every / checkpoint_every / keep_checkpoints: history and checkpoint cadence, in steps.
        weighting: ``"horizon"`` (divide squared errors by the horizon) or ``"none"``.
        init_rate: on a fresh run, set the head's constant rate to sum(target) / sum(horizon)
            (turn off when continuing from an already trained head).
        accelerator: an ``accelerate.Accelerator`` (default: a new one; ``accelerate launch`` for GPUs).
        callback: called as ``callback(step, loss)`` after every step (and after its checkpoint).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {', '.join(WEIGHTINGS)}, but is {weighting!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every),
                        ("checkpoint_every", checkpoint_every), ("keep_checkpoints", keep_checkpoints)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):  # inf or NaN: NaN weights, silently
        raise ValueError(f"`lr` must be a positive finite number, but is {lr!r}")
    if isinstance(rows, (str, os.PathLike)) and not head.config.label_settings:
        from .label_store import read_manifest  # a label folder records how its labels were made

        head.config.label_settings = read_manifest(rows)["settings"]
    rows = collate_rows(rows)
    _check_rows(rows, head)
    val_rows = None if val_rows is None else collate_rows(val_rows, EVAL_KEYS)
    n = len(rows["target"])
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    settings = {"rows": n, "rows_digest": _rows_digest(rows), "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "weight_decay": weight_decay, "seed": seed, "weighting": weighting,
                "head": head.config.to_dict()}
    accelerator = accelerator or Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINT_DIR

    # 1. Start fresh, or load the newest checkpoint (after checking it was made with these settings).
    if not resume and accelerator.is_main_process:
        shutil.rmtree(root, ignore_errors=True)  # stale checkpoints would shadow this run's on a later resume
    accelerator.wait_for_everyone()
    run = _start_or_resume(root, settings, head, rows, init_rate)

    # 2. The optimizer, prepared by accelerate (with the checkpoint's state on a resume).
    model, optimizer = accelerator.prepare(head, _optimizer(head, lr, weight_decay))
    if run.resumed_from is not None:
        saved = _read_checkpoint(_step_dir(root, run.resumed_from), "optimizer.pt",
                                 lambda path: torch.load(path, weights_only=True))
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
    baseline = fit_baseline(rows) if val_rows is not None and "context_entropy" in rows else None

    # 3. The loop: one step on a batch; then log, evaluate after each epoch, checkpoint.
    bar = tqdm(total=total, initial=run.step, desc="train head",
               disable=not (progress and accelerator.is_local_main_process))
    model.train()
    order_epoch, order = -1, None
    started = time.perf_counter() - run.seconds  # a resumed run continues the clock of the runs before it
    while run.step < total:
        epoch, index = divmod(run.step, steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(n, seed, epoch)
        batch = order[index * batch_size:(index + 1) * batch_size]
        loss = _train_step(model, optimizer, accelerator, rows, batch, _lr_at(run.step, total, lr), weighting)
        run.step += 1
        run.running = [run.running[0] + accelerator.reduce(loss.detach(), "mean").item(), run.running[1] + 1]
        bar.update(1)
        if run.step % log_every == 0 or run.step == total:
            run.history.append({"step": run.step, "epoch": epoch, "loss": run.running[0] / run.running[1],
                                "lr": _lr_at(run.step - 1, total, lr)})
            bar.set_postfix(loss=f"{run.history[-1]['loss']:.4g}")
            run.running = [0.0, 0]
        if val_rows is not None and (run.step % steps_per_epoch == 0):
            scores = evaluate_head(accelerator.unwrap_model(model), val_rows, baseline=baseline, weighting=weighting)
            run.history.append({"step": run.step, "epoch": epoch,
                                **{f"val_{k}": scores[k] for k in ("loss", "mse", "r2", "r2_within")}})
            model.train()
        if (run.step % checkpoint_every == 0 or run.step == total) and accelerator.is_main_process:
            state = {"step": run.step, "history": run.history, "running": run.running, "settings": settings,
                     "seconds": time.perf_counter() - started}
            _save_checkpoint(root, run.step, accelerator.unwrap_model(model), optimizer, state, keep_checkpoints)
        accelerator.wait_for_everyone()
        if callback is not None:
            callback(run.step, loss.item())
    bar.close()
    seconds = time.perf_counter() - started

    # 4. Save the head, its history and a picture of it.
    head = accelerator.unwrap_model(model)
    metrics = evaluate_head(head, val_rows, baseline=baseline, weighting=weighting) if val_rows is not None else None
    if accelerator.is_main_process:
        head.save_pretrained(out_dir / HEAD_DIR)
        (out_dir / HISTORY_NAME).write_text(json.dumps(run.history, indent=2))
        plot_loss_curve(run.history, out_dir / PLOT_NAME)
    return TrainResult(head=head, steps=run.step, history=run.history, resumed_from=run.resumed_from,
                       metrics=metrics, head_dir=out_dir / HEAD_DIR, seconds=seconds)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def regression_metrics(pred: torch.Tensor, target: torch.Tensor, context_id: torch.Tensor) -> dict:
    """mse, R^2 and within-context R^2 of predictions.

    Within-context R^2 uses the contexts with at least two rows: predictions and targets are demeaned
    within each context, R^2_within = 1 - sum((y - ybar_g) - (yhat - yhat_g))^2 / sum((y - ybar_g)^2).
    It measures how well the rows of one context are told apart, which is all that moves q; any
    predictor that is constant within a context scores 0. NaN when no context has two rows.
    ``corr_within``, the correlation of the demeaned predictions and targets, is the same skill free of
    scale: a head whose candidate differences are right in direction but 5x too large has a negative
    R^2_within and a positive correlation, and the fitted weights b_t (one per step bin, so one per
    horizon range) rescale it.
    """
    pred, target = pred.double().flatten(), target.double().flatten()
    mse = ((pred - target) ** 2).mean().item()
    spread = ((target - target.mean()) ** 2).sum().item()
    _, group, counts = torch.unique(context_id.flatten(), return_inverse=True, return_counts=True)
    shared = counts[group] >= 2  # rows whose context has another row

    def demean(x: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, group, x)
        return x - sums[group] / counts[group]

    y, yhat = demean(target)[shared], demean(pred)[shared]
    within = (y ** 2).sum().item()
    norms = (y.norm() * yhat.norm()).item()
    return {"mse": mse, "r2": 1 - ((pred - target) ** 2).sum().item() / spread if spread > 0 else float("nan"),
            "r2_within": 1 - ((y - yhat) ** 2).sum().item() / within if within > 0 else float("nan"),
            "corr_within": (y * yhat).sum().item() / norms if norms > 0 else float("nan"),
            "rows": len(target), "rows_within": int(shared.sum()), "contexts_within": int((counts >= 2).sum())}


def fit_baseline(rows) -> dict:
    """Least squares target ~ horizon * (rate + slope * context_entropy) + offset on the given rows:
    the future entropy predicted from the context's entropy and the horizon alone (no token)."""
    rows = collate_rows(rows, ("horizon", "target", "context_entropy"))
    k, e = rows["horizon"].double(), rows["context_entropy"].double()
    design = torch.stack([k, k * e, torch.ones_like(k)], dim=1)  # (N, 3)
    w = torch.linalg.lstsq(design, rows["target"].double().unsqueeze(1)).solution.squeeze(1)
    return {"rate": w[0].item(), "slope": w[1].item(), "offset": w[2].item()}


def baseline_predict(baseline: dict, rows) -> torch.Tensor:
    """The baseline's prediction (N,) float32 for rows with ``horizon`` and ``context_entropy``."""
    k, e = rows["horizon"].double(), rows["context_entropy"].double()
    return (k * (baseline["rate"] + baseline["slope"] * e) + baseline["offset"]).float()


@torch.no_grad()
def predict(head: FutureEntropyHead, rows, batch_size: int = 8192) -> torch.Tensor:
    """The head's prediction (N,) for every row, computed in batches on the head's device."""
    head.eval()
    device = next(head.parameters()).device
    out = [head.predict_rows(rows["hidden"][i:i + batch_size].to(device), rows["token"][i:i + batch_size].to(device),
                             rows["horizon"][i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(rows["target"]), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_head(head: FutureEntropyHead, rows, baseline: dict | None = None, weighting: str = "horizon") -> dict:
    """mse, r2, r2_within and the training ``loss`` of the head on ``rows``, and the same for the baseline
    as ``baseline_*``. Pass the baseline fitted on the training rows; without one it is fitted on
    ``rows`` themselves (in sample, so flattering the baseline) and ``baseline_in_sample`` is True."""
    rows = collate_rows(rows, EVAL_KEYS)
    in_sample = baseline is None
    baseline = fit_baseline(rows) if in_sample else baseline
    result = {"baseline_in_sample": in_sample, "baseline": baseline}
    for prefix, pred in (("", predict(head, rows)), ("baseline_", baseline_predict(baseline, rows))):
        scores = regression_metrics(pred, rows["target"], rows["context_id"])
        scores["loss"] = objective(pred.double(), rows["target"], rows["horizon"], weighting).mean().item()
        result.update({prefix + k: v for k, v in scores.items()})
    return result


def plot_loss_curve(history: list[dict], path: str | os.PathLike) -> Path:
    """Training and validation loss against step (log scale), and validation within-context R^2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    loss_ax, r2_ax = fig.subplots(1, 2)
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_loss" in h]
    loss_ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train")
    if val:
        loss_ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
        r2_ax.plot([h["step"] for h in val], [h["val_r2_within"] for h in val], "o-", color="C1")
    if train and min(h["loss"] for h in train) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="step", ylabel="loss", title="training objective")
    loss_ax.legend()
    r2_ax.axhline(0, color="grey", lw=0.8)
    r2_ax.set(xlabel="step", ylabel="R² within context", title="validation: ranking of candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
