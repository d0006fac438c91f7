"""Label folders -> training and validation rows for :func:`train.train_head`.

Several folders (rollout and returns, say) train one head. Their rows are split by *window* (the
prompt a row came from), never by row: the candidates of one context, and the steps of one sample,
share almost everything, so a row split would leak the answer into validation. Returns rows can swap
their Monte Carlo target for a bootstrapped one (n-step / TD(lambda), see
:func:`labels.bootstrapped_targets`), with the value after n steps taken from the baseline or from an
earlier head: the remedy docs/design.md (*Labels*) gives for full-horizon returns whose spread is tens of nats.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .label_store import check_labels_match, load_labels, read_manifest
from .labels import bootstrapped_targets
from .train import EVAL_KEYS, baseline_predict, fit_baseline

FOLDER_STRIDE = 10**12  # context ids of folder i are offset by i * FOLDER_STRIDE, so folders never share one


def window_share(window: torch.Tensor, val_fraction: float, salt: str = "validation") -> torch.Tensor:
    """A fixed pseudo-random choice per window index. Folders labelled from the same data and split list
    the same prompts in the same order (make_windows is deterministic), so window i is the same prompt
    in every folder and validates in all of them or in none: no prompt leaks across folders. (Analyses
    that must judge on train-head's held-out prompts call it with the same fraction.)"""
    keep = [int.from_bytes(hashlib.sha256(f"{salt}/{w}".encode()).digest()[:4], "big") / 2**32 < val_fraction
            for w in window.tolist()]
    return torch.tensor(keep, dtype=torch.bool)


def load_training_rows(
    folders: Sequence[str | os.PathLike],
    *,
    model=None,
    val_fraction: float = 0.2,
    train_fraction: float = 1.0,
    td_n: int | None = None,
    td_lambda: float = 1.0,
    value_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
    """Training rows (all folders together) and validation rows (per folder), split by window.

    Args:
        folders: label folders written by :func:`labels.make_labels`.
        model: when given, every folder must have been labelled with this LM; rebuilds missing
            hidden-state caches (without it, every folder needs its cache).
        val_fraction: share of each folder's windows held out for validation.
        train_fraction: use only this share of the training windows (learning curves over label count).
        td_n, td_lambda: bootstrapped targets for returns / teacher-forced rows (None: Monte Carlo returns).
        value_fn: ``(hidden, token, horizon) -> prediction`` after n steps; default: the context-entropy
            baseline fitted on the training rows' Monte Carlo targets.

    Returns:
        (train rows, {folder: validation rows}, [manifest settings per folder]). Validation rows keep
        their Monte Carlo targets: a bootstrapped target is a training device, not the quantity judged.
    """
    if not folders:
        raise ValueError("`folders` is empty: give at least one label folder")
    for name, value in (("val_fraction", val_fraction), ("train_fraction", train_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1], but is {value!r}")
    if train_fraction == 0.0:
        raise ValueError("`train_fraction` must be above 0, but is 0.0")
    train_parts, val, settings = [], {}, []
    for index, folder in enumerate(folders):
        manifest = read_manifest(folder)
        if model is not None:
            check_labels_match(manifest, model)
        labels = load_labels(folder, model=model)  # model: rebuilds a missing hidden-state cache
        if not labels:
            raise ValueError(f"label folder {folder} has no rows yet")
        steps = manifest["settings"]["max_new_tokens"]
        window = labels["context_id"] // steps
        held_out = window_share(window, val_fraction)
        if train_fraction < 1.0:  # keep the training windows whose hash falls below the fraction
            train_windows = ~held_out & window_share(window, train_fraction, salt="train-share")
        else:
            train_windows = ~held_out
        target = labels["target"]
        if td_n is not None and "samples.entropy" in labels:
            # The value after n steps: the baseline (fitted on the training rows) unless a head is given.
            train_only = {k: labels[k][train_windows] for k in ("horizon", "target", "context_entropy")}
            baseline = fit_baseline(train_only)
            entropy_of = _context_entropy_lookup(labels)
            value = value_fn or (lambda hidden, token, horizon, fit=baseline, lookup=entropy_of: baseline_predict(
                fit, {"horizon": horizon, "context_entropy": lookup(hidden)}))
            target = bootstrapped_targets(labels, value, n=td_n, lam=td_lambda)
        rows = {key: labels[key] for key in EVAL_KEYS}
        rows["context_id"] = rows["context_id"] + index * FOLDER_STRIDE
        train_parts.append({**{k: v[train_windows] for k, v in rows.items()}, "target": target[train_windows]})
        val[str(folder)] = {k: v[held_out] for k, v in rows.items()}
        settings.append({"folder": Path(folder).name, **manifest["settings"], "rows": int(train_windows.sum()),
                         "val_rows": int(held_out.sum())})
    train = {key: torch.cat([part[key] for part in train_parts]) for key in EVAL_KEYS}
    return train, val, settings


def _context_entropy_lookup(labels: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (M, H) -> context_entropy (M,) for rows of ``labels``, matched by their exact hidden state.

    bootstrapped_targets hands the value function hidden states only; the baseline needs the context's
    entropy, which the row stores. A checksum of each hidden state finds the row again.
    """
    weights = torch.randn(labels["hidden"].shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = labels["hidden"].double() @ weights
    order = keys.argsort()
    sorted_keys, entropy = keys[order], labels["context_entropy"][order]

    def lookup(hidden: torch.Tensor) -> torch.Tensor:
        query = hidden.double() @ weights
        where = torch.searchsorted(sorted_keys, query).clamp(max=len(sorted_keys) - 1)
        return entropy[where]

    return lookup
