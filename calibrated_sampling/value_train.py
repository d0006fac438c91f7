"""Training a state-value head (value.py) on ``returns`` label rows, with TD(lambda) targets if asked.

Rows come from :func:`label_rows.load_training_rows` unchanged: the split by window, and the
bootstrapped targets (``td_n``, ``td_lambda``) with the value after n steps from the context-entropy
baseline or from an earlier value head (``td_value``). A returns row as stored is a sample of V at its own
hidden state (value.py, *Targets*), so no row is shifted. The loop is :func:`train.train_head`: a state
value has the head's row interface with the token ignored, and gets its weighted squared error (each
squared error divided by max(horizon, 1)), AdamW, warm-up and cosine decay, checkpoints and resume.
Training layer: it reads label folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .heads import recorded_weights_digest
from .label_rows import load_training_rows
from .label_store import read_manifest
from .train import TrainResult, evaluate_head, fit_baseline, train_head
from .value import FORMAT, StateValueHead, ValueConfig

VALUE_KINDS = ("returns",)  # label kinds whose rows sample V (value.py: rollout and teacher-forced do not)
METRICS_NAME = "metrics.json"


def check_value_folders(folders: Sequence[str | os.PathLike]) -> None:
    """Refuse label folders whose rows are not samples of the state value (all but ``returns``)."""
    for folder in folders:
        kind = read_manifest(folder)["settings"]["kind"]
        if kind not in VALUE_KINDS:
            raise ValueError(f"label folder {folder} holds {kind!r} rows; a state value trains on "
                             f"{' / '.join(VALUE_KINDS)} rows only (a {kind} row's target is not a sample of "
                             "V at its state: see calibrated_sampling/value.py)")


def value_predictor(value: StateValueHead):
    """``value`` as label_rows' ``value_fn``: (hidden (M, H), token (M,), horizon (M,)) -> V (M,) on the CPU."""
    device = next(value.parameters()).device

    @torch.no_grad()
    def predict(hidden: torch.Tensor, token: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
        return value.eval()(hidden.to(device), horizon.to(device)).float().cpu()

    return predict


def load_value_rows(folders: Sequence[str | os.PathLike], *, model=None, val_fraction: float = 0.2,
                    train_fraction: float = 1.0, td_n: int | None = None, td_lambda: float = 1.0,
                    value: StateValueHead | None = None):
    """(train rows, {folder: validation rows}, settings) of returns folders, as :func:`load_training_rows`
    gives them; ``td_n`` / ``td_lambda`` bootstrap the training targets from ``value`` (default: the
    context-entropy baseline). Validation rows keep their Monte Carlo targets."""
    check_value_folders(folders)
    return load_training_rows(folders, model=model, val_fraction=val_fraction, train_fraction=train_fraction,
                              td_n=td_n, td_lambda=td_lambda,
                              value_fn=None if value is None else value_predictor(value))


def train_value_head(
    folders: Sequence[str | os.PathLike],
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    td_n: int | None = None,
    td_lambda: float = 1.0,
    td_value: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    train_fraction: float = 1.0,
    mlp_hidden: int = 256,
    mlp_layers: int = 2,
    max_horizon: int | None = None,
    seed: int = 0,
    **train_kwargs,
) -> tuple[TrainResult, dict]:
    """Train a state-value head for ``model`` on returns label folders into ``out_dir``.

    Args:
        folders: returns label folders made with ``model``.
        td_n, td_lambda, td_value: bootstrapped targets (``td_value``: a value folder whose predictions
            bootstrap; default: the context-entropy baseline).
        max_horizon: the horizon normaliser (default: the folders' largest T).
        train_kwargs: :func:`train.train_head`'s (epochs, batch_size, lr, resume, progress, ...).

    Returns:
        (the training result; ``out_dir/head`` is the value folder, and a report of the held-out scores per
        folder, also written to ``out_dir/metrics.json``).
    """
    folders = [str(f) for f in folders]
    previous = None if td_value is None else StateValueHead.from_pretrained(td_value, model, tokenizer)
    train, val, settings = load_value_rows(folders, model=model, val_fraction=val_fraction,
                                           train_fraction=train_fraction, td_n=td_n, td_lambda=td_lambda,
                                           value=previous)
    label_settings = {"folders": settings, "td_n": td_n, "td_lambda": td_lambda,
                      "td_value": None if td_value is None else recorded_weights_digest(td_value, FORMAT),
                      "target": "returns rows as stored: V_k at the row's own hidden state"}
    horizon = max_horizon or max(s["max_new_tokens"] for s in settings)
    config = ValueConfig.for_model(model, tokenizer, mlp_hidden=mlp_hidden, mlp_layers=mlp_layers,
                                   max_horizon=horizon, label_settings=label_settings)
    torch.manual_seed(seed)  # the MLP's initial weights
    value = StateValueHead(config).to(model.get_output_embeddings().weight.device)
    val_rows = {key: torch.cat([rows[key] for rows in val.values()]) for key in train}
    result = train_head(value, train, val_rows=val_rows if len(val_rows["target"]) else None, out_dir=out_dir,
                        seed=seed, **train_kwargs)
    baseline = fit_baseline(train)
    report = {"train_rows": len(train["target"]), "value_parameters": value.num_parameters(),
              "lm_parameters": config.lm_parameters, "seconds": result.seconds, "label_settings": label_settings,
              "validation": {Path(folder).name: evaluate_head(result.head, rows, baseline=baseline)
                             for folder, rows in val.items() if len(rows["target"])}}
    Path(out_dir, METRICS_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return result, report
