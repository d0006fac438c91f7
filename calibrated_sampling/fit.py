"""Fitting the calibration weights: per-bin convex minimisation of human log loss (docs/design.md, *The fit*).

The calibrated distribution at generation step t (0-based), remaining horizon k = T - 1 - t, bin
j = t // bin_size:

    q_t(v | x)  ∝  exp( a_j log p(v | x)  -  b_j F_k(x, v) )

Forms: ``tied``, (a_j, b_j) = (1 + alpha_j, alpha_j), one weight per bin (the paper's form);
``untied``, (a_j, b_j) free per bin (b = 0 is temperature 1 / a); ``global``, one tied alpha for all
steps, kept as an ablation. All start from (a, b) = (1, 0), the base model.

Convexity. For one human token y, -log q(y) = logsumexp_v(a lp_v - b F_v) - (a lp_y - b F_y): a
log-sum-exp of a linear function of (a, b) minus a linear function. With features u = (lp, -F) the
gradient is E_q[u] - u(y) and the Hessian Cov_q(u), positive semi-definite. Newton's method with a
step search along the Newton direction (several step sizes tried in one pass over the data) and
tiny damping finds the minimum in a handful of passes; only decreases are accepted, so the fitted
loss on the fit data is never above the base's (1, 0), which is always feasible.

Memory. Log p and F are (N, V): 30,000 human tokens of a 49,152-token vocabulary are 11 GiB of
float64 each, too much to hold. The fit therefore streams over chunks of rows and recomputes both
from the cached hidden states at every Newton pass; one pass over the data serves all bins.

Bin size and backward order. The default bin is 32 steps: with T = 256 that is 8 bins, fine enough
for a piecewise-constant schedule to follow a drift that rises smoothly with the step (the base
model's per-step entropy curve, ``per_step`` in a ``measure`` run's results.json, shows how it rises),
and coarse enough that a fit set of 100-200 prompts puts thousands of human tokens in each bin, so the
one or two weights of a bin are pinned down well (their standard error falls as 1 / sqrt of the bin's
tokens) and the held-out cost of fitting them (about weights / (2 tokens) nats) is negligible.
Smaller bins need more prompts; short generations want smaller bins (T = 64: 8 steps). The paper's
proof fits the last step first (F = 0 there, so it is a pure temperature), computes F under that
adjusted step, fits the step before, and so on back to step 0: each step's F must describe the
model as adjusted at every later step, and then the per-step optimality conditions
telescope into total human log loss = total entropy of generations. With F from a head, the bins
decouple: given the head's F, bin j's loss depends on (a_j, b_j) alone, so all bins are fitted at
once and their order is immaterial. The backward dependence lives in F itself, which the head
predicts for the model it was labelled with; the chain is realised by rounds -- fit, relabel with
the calibrated model, retrain the head, refit -- whose fixed point meets every step's condition with
F under the adjusted model. :func:`exact_markov_calibration` runs both schemes exactly on a Markov
chain, where F can be computed by dynamic programming. What it shows (tests/test_fit.py asserts the
bounds): the backward sweep is calibrated to rounding; one round with F of the base is not, with
per-step and global weights alike; a global alpha iterated over rounds to its fixed point is
calibrated too (its tied gradient is the sum of the per-step conditions divided by 1 + alpha, and that
sum telescopes), but at a higher log loss than per-step weights.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibrator import FORMS, check_calibration
from .data import Window, batch_windows, cut_windows, left_padded_positions
from .models import pad_token_id

DEFAULT_BIN_SIZE = 32  # steps per bin; see the module docstring
MIN_BIN_TOKENS = 1000  # fewer human tokens than this in a bin draws a warning
STEP_SIZES = (1.0, 0.5, 0.25)  # fractions of the Newton step tried in one pass
MAX_STEP = 1.0  # largest change of any weight in one Newton step (a trust region for flat losses)
SUM_KEYS = ("weight", "loss", "entropy", "grad_a", "grad_b", "h_aa", "h_ab", "h_bb")

# A chunk of rows: log p (n, V), F (n, V), human token (n,), bin (n,), row weight (n,) or None (= 1).
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _row_stats(logp: torch.Tensor, future: torch.Tensor, target: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, keys: tuple[str, ...] = SUM_KEYS) -> dict[str, torch.Tensor]:
    """Per-row loss, entropy, gradient and Hessian of q ∝ exp(a logp - b future): (n, V) inputs, (n,) weights.

    Only ``keys`` are computed: the loss alone needs one logsumexp over the vocabulary, the moments a
    dozen vocabulary-sized operations more (the entropy fit's multiplier search asks for the loss only)."""
    logits = a[:, None] * logp - b[:, None] * future  # (n, V)
    lse = torch.logsumexp(logits, -1)  # (n,)
    lp_y = logp.gather(-1, target[:, None])[:, 0]
    f_y = future.gather(-1, target[:, None])[:, 0]
    out = {"loss": lse - (a * lp_y - b * f_y)}  # -log q(y)
    if not set(keys) - {"loss", "weight"}:
        return out
    q = torch.exp(logits - lse[:, None])
    e_lp, e_f = (q * logp).sum(-1), (q * future).sum(-1)  # E_q log p, E_q F
    d_lp, d_f = logp - e_lp[:, None], future - e_f[:, None]  # centred first: no cancellation in the covariances
    out.update(entropy=lse - (a * e_lp - b * e_f), grad_a=e_lp - lp_y, grad_b=f_y - e_f)  # H(q), d loss
    if "h_aa" in keys or "h_ab" in keys:
        q_dlp = q * d_lp
        out.update(h_aa=(q_dlp * d_lp).sum(-1), h_ab=-(q_dlp * d_f).sum(-1))  # Var_q(log p), Cov_q(log p, -F)
    if "h_bb" in keys:
        out["h_bb"] = (q * d_f * d_f).sum(-1)  # Var_q(F)
    return out


@torch.no_grad()
def _bin_sums(chunks: Callable[[], Iterable[Chunk]], ab: torch.Tensor, dtype: torch.dtype, num_groups: int | None = None,
              keys: tuple[str, ...] = SUM_KEYS) -> dict[str, torch.Tensor]:
    """One pass over the data: weighted sums of the row stats ``keys`` for each of K candidate weights.

    ab: (num_bins, K, 2) candidate (a, b) per bin -> {key: (num_groups, K)} float64 sums on the CPU. The
    chunks' group column is the bin, or with ``num_groups`` any finer grouping whose bin is
    ``group % num_bins`` (the entropy-matched fit sums per prompt and bin: group = prompt * num_bins + bin).
    """
    num_bins, count, _ = ab.shape
    num_groups = num_bins if num_groups is None else num_groups
    totals = None  # (K, keys, num_groups) on the data's device: one transfer at the end, not one per chunk
    for logp, future, target, groups, weight in chunks():
        device = logp.device
        # Per-row shifts change neither q nor the loss; these make a row of constant F exactly 0 (so an
        # unidentified b gets an exactly zero gradient instead of rounding noise) and keep the values small.
        logp = logp.to(dtype) - logp.to(dtype).amax(-1, keepdim=True)
        if future is None:  # F = 0: a temperature-only fit
            future = torch.zeros((), dtype=dtype, device=device).expand_as(logp)
        else:
            future = future.to(dtype) - future.to(dtype).amin(-1, keepdim=True)
        target, groups = target.to(device).long(), groups.to(device).long()
        weight = torch.ones(len(target), dtype=dtype, device=device) if weight is None else weight.to(device, dtype)
        if totals is None:
            totals = torch.zeros(count, len(keys), num_groups, dtype=dtype, device=device)
        row_ab = ab.to(device, dtype)[groups % num_bins]  # (n, K, 2): the candidates of each row's bin
        for c in range(count):
            stats = _row_stats(logp, future, target, row_ab[:, c, 0], row_ab[:, c, 1], keys)
            stats["weight"] = torch.ones_like(weight)
            totals[c].index_add_(1, groups, torch.stack([stats[key] for key in keys]) * weight)
    if totals is None:
        totals = torch.zeros(count, len(keys), num_groups)
    totals = totals.double().cpu()
    return {key: totals[:, i].T.contiguous() for i, key in enumerate(keys)}


@dataclass(frozen=True)
class _Parametrisation:
    """The weights of every bin as (a, b) = offset + J theta[group of the bin]: bins of one group share theta."""

    jac: torch.Tensor  # J (2, P)
    offset: torch.Tensor  # (2,)
    theta0: torch.Tensor  # (P,): the base model, (a, b) = (1, 0)
    group_of_bin: torch.Tensor  # (num_bins,)
    groups: int  # G

    @classmethod
    def of(cls, form: str, num_bins: int) -> _Parametrisation:
        one = {"dtype": torch.float64}
        if form == "untied":  # theta = (a, b)
            jac, offset, theta0 = torch.eye(2, **one), torch.zeros(2, **one), torch.tensor([1.0, 0.0], **one)
        else:  # tied and global: theta = alpha, (a, b) = (1 + alpha, alpha)
            jac, offset, theta0 = torch.ones(2, 1, **one), torch.tensor([1.0, 0.0], **one), torch.zeros(1, **one)
        if form == "global":
            return cls(jac, offset, theta0, torch.zeros(num_bins, dtype=torch.long), 1)
        return cls(jac, offset, theta0, torch.arange(num_bins), num_bins)

    def weights(self, theta: torch.Tensor) -> torch.Tensor:
        """(G, K, P) parameters -> (num_bins, K, 2) weights (a, b)."""
        return (self.offset + theta @ self.jac.T)[self.group_of_bin]


@dataclass
class _Evaluation:
    """The human log loss of every group of bins at K candidate parameters, with its derivatives."""

    theta: torch.Tensor  # (G, K, P) the candidates
    sums: dict[str, torch.Tensor]  # per-bin weighted sums of the row stats (SUM_KEYS), (num_bins, K) each
    loss: torch.Tensor  # (G, K) mean loss of the group's rows
    grad: torch.Tensor  # (G, K, P)
    hess: torch.Tensor  # (G, K, P, P)

    def best(self, group_of_bin: torch.Tensor) -> _Evaluation:
        """The evaluation at each group's lowest-loss candidate (K = 1)."""
        pick = self.loss.argmin(1)  # (G,)
        groups, bins = torch.arange(len(pick)), torch.arange(len(group_of_bin))
        return _Evaluation(self.theta[groups, pick][:, None],
                           {key: value[bins, pick[group_of_bin]][:, None] for key, value in self.sums.items()},
                           self.loss[groups, pick][:, None], self.grad[groups, pick][:, None],
                           self.hess[groups, pick][:, None])


def _evaluate(chunks: Callable[[], Iterable[Chunk]], param: _Parametrisation, theta: torch.Tensor,
              dtype: torch.dtype) -> _Evaluation:
    """One pass over the data at candidates theta (G, K, P): per-bin sums, and per group the mean loss
    with its gradient and Hessian in theta (the chain rule through J)."""
    sums = _bin_sums(chunks, param.weights(theta), dtype)
    group_sums = {key: torch.zeros(param.groups, theta.shape[1], dtype=torch.float64)
                  .index_add_(0, param.group_of_bin, value) for key, value in sums.items()}
    weight = group_sums["weight"].clamp(min=1e-300)
    grad = torch.stack([group_sums["grad_a"], group_sums["grad_b"]], -1) / weight[..., None]  # (G, K, 2)
    hess = torch.stack([torch.stack([group_sums["h_aa"], group_sums["h_ab"]], -1),
                        torch.stack([group_sums["h_ab"], group_sums["h_bb"]], -1)], -2) / weight[..., None, None]
    return _Evaluation(theta, sums, group_sums["loss"] / weight, grad @ param.jac, param.jac.T @ hess @ param.jac)


def _newton_direction(grad: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """-H^-1 g per group, (G, P) from (G, P) and (G, P, P)."""
    # Tiny damping: F constant over v (or 0 at the last step) leaves b unidentified; it then stays put.
    damping = 1e-9 * hess.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    eye = torch.eye(hess.shape[-1], dtype=torch.float64)
    return -torch.linalg.solve(hess + damping[:, None, None] * eye, grad[..., None])[..., 0]


def _keep_decreases(point: _Evaluation, trial: _Evaluation, converged: torch.Tensor,
                    group_of_bin: torch.Tensor) -> tuple[_Evaluation, torch.Tensor]:
    """Every unconverged group whose best trial candidate lowers its loss moves there; the others stay.
    Returns the new point (K = 1) and which groups moved (G,)."""
    best = trial.best(group_of_bin)
    moved = (best.loss[:, 0] < point.loss[:, 0]) & ~converged

    def choose(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, *[1] * (new.dim() - 1)), new, old)

    return _Evaluation(choose(moved, best.theta, point.theta),
                       {key: choose(moved[group_of_bin], value, point.sums[key]) for key, value in best.sums.items()},
                       choose(moved, best.loss, point.loss), choose(moved, best.grad, point.grad),
                       choose(moved, best.hess, point.hess)), moved


def _means(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weight = sums["weight"]
    return {"tokens": weight, **{key: sums[key] / weight.clamp(min=1e-300) for key in ("loss", "entropy")}}


def fit_bins(chunks: Callable[[], Iterable[Chunk]], num_bins: int, form: str = "tied", *, max_iter: int = 50,
             tol: float = 1e-12, dtype: torch.dtype = torch.float64, progress: bool = False) -> dict:
    """Minimise the mean human log loss of q ∝ exp(a log p - b F) in every bin, by Newton's method.

    Args:
        chunks: a zero-argument callable returning a fresh iterable of chunks ``(logp (n, V), F (n, V),
            target (n,), bin (n,), weight (n,) or None)`` each time (one pass per Newton iteration);
            :func:`tensor_chunks` makes one from tensors in memory. Log p must be finite.
        num_bins: bins are 0 .. num_bins - 1; a bin without rows keeps the base weights (1, 0).
        form: ``tied`` (one alpha per bin), ``untied`` ((a, b) per bin) or ``global`` (one alpha).
        tol: stop when every bin's Newton decrement g' H^-1 g / 2 (the predicted remaining gain, nats)
            is below it.
        dtype: of the per-row computations (float64: the gradient must be exact to reach EntCE ~ 0).

    Returns a dict of (num_bins,) float64 tensors ``a``, ``b``, ``tokens`` (row weight per bin),
    ``loss_base``, ``loss``, ``entropy_base``, ``entropy`` (mean H(q) at the human prefixes), and
    ``iterations``, ``converged``. The objective (each bin's mean loss; the total for ``global``) is
    never above the base's.
    """
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {', '.join(FORMS)}, but is {form!r}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive integer, but is {num_bins!r}")
    param = _Parametrisation.of(form, num_bins)
    bar = tqdm(total=max_iter + 1, unit="pass", desc="fit", disable=not progress)

    # 1. The base model, (a, b) = (1, 0): the starting point, and the loss the fit never exceeds.
    point = _evaluate(chunks, param, param.theta0.expand(param.groups, 1, -1).clone(), dtype)
    if not all(torch.isfinite(v).all() for v in point.sums.values()):
        raise ValueError("the fit data give a non-finite loss: log p and F must be finite at every token")
    bar.update()
    base = point
    group_weight = torch.zeros(param.groups, dtype=torch.float64).index_add_(0, param.group_of_bin,
                                                                              base.sums["weight"][:, 0])
    converged = group_weight == 0  # empty bins keep the base weights
    scale = torch.ones(param.groups, dtype=torch.float64)  # shrinks the step sizes after a failed step
    steps = torch.tensor(STEP_SIZES, dtype=torch.float64)

    # 2. Newton steps: several step sizes along the Newton direction in one pass; a group moves only
    # where its loss decreases.
    iterations = 0
    for iterations in range(1, max_iter + 1):
        grad, hess = point.grad[:, 0], point.hess[:, 0]
        direction = _newton_direction(grad, hess)  # (G, P)
        converged |= -(grad * direction).sum(-1) / 2 <= tol  # the Newton decrement: the gain left
        if converged.all():
            iterations -= 1
            break
        direction = direction * (MAX_STEP / direction.abs().amax(-1).clamp(min=1e-300)).clamp(max=1.0)[:, None]
        size = torch.where(converged[:, None], 0.0, scale[:, None] * steps)  # (G, K)
        trial = _evaluate(chunks, param, point.theta + size[..., None] * direction[:, None], dtype)  # (G, K, P)
        bar.update()
        point, moved = _keep_decreases(point, trial, converged, param.group_of_bin)
        scale = torch.where(moved, 1.0, scale / 8)
        converged |= ~moved & (scale < 1e-6)  # no decrease left above rounding
        loss = point.loss[:, 0]
        bar.set_postfix_str(f"loss {float((loss * group_weight).sum() / group_weight.sum()):.5f}")
    bar.close()

    # 3. The fitted weights per bin, and the loss and entropy before and after.
    if (point.loss > base.loss).any():  # cannot happen: only decreases are accepted
        raise RuntimeError("the fitted loss is above the base's; this is a bug")
    ab = param.weights(point.theta)[:, 0]  # (num_bins, 2)
    fitted = _means({key: value[:, 0] for key, value in point.sums.items()})
    start = _means({key: value[:, 0] for key, value in base.sums.items()})
    return {"a": ab[:, 0], "b": ab[:, 1], "tokens": start["tokens"], "loss_base": start["loss"],
            "loss": fitted["loss"], "entropy_base": start["entropy"], "entropy": fitted["entropy"],
            "iterations": iterations, "converged": bool(converged.all())}


def evaluate_bins(chunks: Callable[[], Iterable[Chunk]], a: torch.Tensor, b: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> dict:
    """Per-bin ``tokens``, ``loss`` / ``entropy`` of the calibrated q and ``loss_base`` / ``entropy_base``
    of the base, for given (num_bins,) weights (held-out evaluation)."""
    ab = torch.stack([torch.stack([torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)],
                                  -1), torch.tensor([1.0, 0.0], dtype=torch.float64).expand(len(a), 2)], 1)
    sums = _bin_sums(chunks, ab, dtype)
    fitted, base = _means({k: v[:, 0] for k, v in sums.items()}), _means({k: v[:, 1] for k, v in sums.items()})
    return {"tokens": base["tokens"], "loss_base": base["loss"], "loss": fitted["loss"],
            "entropy_base": base["entropy"], "entropy": fitted["entropy"]}


def tensor_chunks(logp: torch.Tensor, future: torch.Tensor, target: torch.Tensor, bins: torch.Tensor,
                  weight: torch.Tensor | None = None, chunk_rows: int = 4096) -> Callable[[], Iterable[Chunk]]:
    """The ``chunks`` argument of :func:`fit_bins` for (N, V) tensors held in memory."""
    def chunks():
        for i in range(0, len(target), chunk_rows):
            yield (logp[i:i + chunk_rows], future[i:i + chunk_rows], target[i:i + chunk_rows],
                   bins[i:i + chunk_rows], None if weight is None else weight[i:i + chunk_rows])
    return chunks


# ----------------------------------------------------------------------------------------------------
# The language-model fit: cached hidden states of the human continuations


def _check_settings(max_new_tokens: int, bin_size: int, form: str) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("bin_size", bin_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    if form not in FORMS:
        raise ValueError(f"`form` must be one of {', '.join(FORMS)}, but is {form!r}")


def _fit_windows(windows: Sequence[Window], steps: int, name: str) -> list[Window]:
    """The windows cut to ``steps`` human tokens (:func:`.data.cut_windows`); none at all is an error too."""
    if not windows:
        raise ValueError(f"`{name}` is empty: nothing to fit on")
    return cut_windows(windows, steps, name)


@torch.no_grad()
def human_states(model, windows: Sequence[Window], max_new_tokens: int, pad_token_id: int, batch_size: int = 8,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """One teacher-forced pass: for every human continuation token, the final hidden state that predicts
    it. Returns ``hidden`` (N, H) on the model's device, ``target`` (N,) and ``step`` (N,), window-major."""
    windows = _fit_windows(windows, max_new_tokens, "windows")
    parts: dict[str, list[torch.Tensor]] = {"hidden": [], "target": [], "step": []}
    for i in tqdm(range(0, len(windows), batch_size), desc="hidden states", unit="batch", disable=not progress):
        ids, mask = batch_windows(windows[i:i + batch_size], pad_token_id, with_continuation=True)
        ids, mask = ids.to(model.device), mask.to(model.device)
        states = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                                     use_cache=False).last_hidden_state  # (B, L, H)
        start = ids.shape[1] - max_new_tokens  # index of the first continuation token
        parts["hidden"].append(states[:, start - 1:-1].reshape(-1, states.shape[-1]))  # state before each token
        parts["target"].append(ids[:, start:].reshape(-1))
        parts["step"].append(torch.arange(max_new_tokens, device=ids.device).repeat(len(ids)))
    return {key: torch.cat(value) for key, value in parts.items()}


def _state_chunks(model, head, states: dict[str, torch.Tensor], max_new_tokens: int, bin_size: int,
                  chunk_rows: int) -> Callable[[], Iterable[Chunk]]:
    """Chunks for :func:`fit_bins` that recompute log p and F from the cached states at every pass."""
    output = model.get_output_embeddings()

    @torch.no_grad()
    def chunks():
        for i in range(0, len(states["target"]), chunk_rows):
            hidden, step = states["hidden"][i:i + chunk_rows], states["step"][i:i + chunk_rows]
            logp = torch.log_softmax(output(hidden).float(), -1)  # (n, V)
            future = head(hidden, head.horizon_for(max_new_tokens - 1 - step)).float()  # (n, V): F_k, k = T - 1 - t
            yield logp, future, states["target"][i:i + chunk_rows], step // bin_size, None
    return chunks


def _summary(stats: dict, tokens: torch.Tensor) -> dict:
    total = tokens.sum().clamp(min=1e-300)
    return {"tokens": int(round(float(tokens.sum())))} | {
        key: float((stats[key] * tokens).sum() / total) for key in ("loss_base", "loss", "entropy_base", "entropy")}


def fit_weights(model, tokenizer, head, windows: Sequence[Window], *, max_new_tokens: int,
                bin_size: int = DEFAULT_BIN_SIZE, form: str = "tied", batch_size: int = 8, progress: bool = True,
                heldout_windows: Sequence[Window] | None = None, chunk_rows: int | None = None,
                max_iter: int = 50) -> dict:
    """Fit the calibration weights of ``head`` on the human continuations of ``windows``.

    One teacher-forced pass caches the hidden state before each of the first ``max_new_tokens`` human
    tokens; then :func:`fit_bins` runs Newton's method, recomputing log p and F from the cache in chunks
    of ``chunk_rows`` rows at every pass. Step t uses bin t // ``bin_size`` and horizon T - 1 - t.

    Returns the calibration dict stored in the head's ``config.calibration`` (see :func:`save_calibration`):
    ``form``, ``max_new_tokens``, ``bin_size``, ``a`` and ``b`` (one per bin), and ``report`` with the
    per-bin and overall log loss and entropy at the human prefixes of the base and the calibrated model,
    on the fit windows and, given ``heldout_windows``, on those.
    """
    from .heads import check_compatible

    _check_settings(max_new_tokens, bin_size, form)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, but is {batch_size!r}")
    windows = _fit_windows(windows, max_new_tokens, "windows")
    if heldout_windows is not None:
        heldout_windows = _fit_windows(heldout_windows, max_new_tokens, "heldout_windows")
    check_compatible(head.config, model, tokenizer, check_base_model=False)
    if max_new_tokens - 1 > head.config.max_horizon:
        warnings.warn(f"the head's max_horizon is {head.config.max_horizon}, below the largest horizon "
                      f"max_new_tokens - 1 = {max_new_tokens - 1}: its F is extrapolated", stacklevel=2)
    settings = head.config.label_settings
    folders = settings.get("folders") if isinstance(settings.get("folders"), list) else []
    trained_for = {s.get("max_new_tokens") for s in [settings, *folders] if isinstance(s, dict)} - {None}
    if trained_for and trained_for != {max_new_tokens}:
        warnings.warn(f"the head was trained on labels for max_new_tokens = {sorted(trained_for)}, the fit uses "
                      f"{max_new_tokens}", stacklevel=2)
    num_bins = math.ceil(max_new_tokens / bin_size)
    rows = chunk_rows or max(1, (1 << 22) // head.config.vocab_size)
    pad_id = pad_token_id(tokenizer)
    head.eval()
    states = human_states(model, windows, max_new_tokens, pad_id, batch_size, progress)
    fit = fit_bins(_state_chunks(model, head, states, max_new_tokens, bin_size, rows), num_bins, form,
                   max_iter=max_iter, progress=progress)
    sparse = [j for j in range(num_bins) if fit["tokens"][j] < MIN_BIN_TOKENS]
    if sparse:
        warnings.warn(f"{len(sparse)} of {num_bins} bins have fewer than {MIN_BIN_TOKENS} human tokens (bin "
                      f"{sparse[0]}: {int(fit['tokens'][sparse[0]])}): use more prompts or a larger bin_size",
                      stacklevel=2)
    heldout = None
    if heldout_windows is not None:
        held_states = human_states(model, heldout_windows, max_new_tokens, pad_id, batch_size, progress)
        heldout = evaluate_bins(_state_chunks(model, head, held_states, max_new_tokens, bin_size, rows),
                                fit["a"], fit["b"])
    bins = []
    for j in range(num_bins):
        row = {"bin": j, "first_step": j * bin_size, "last_step": min((j + 1) * bin_size, max_new_tokens) - 1,
               "tokens": int(fit["tokens"][j])}
        row |= {key: float(fit[key][j]) for key in ("loss_base", "loss", "entropy_base", "entropy")}
        if heldout is not None:
            row |= {"heldout_tokens": int(heldout["tokens"][j])}
            row |= {f"heldout_{key}": float(heldout[key][j]) for key in ("loss_base", "loss", "entropy_base",
                                                                          "entropy")}
        bins.append(row)
    report = {"bins": bins, "fit": _summary(fit, fit["tokens"]), "num_windows": len(windows),
              "heldout": None if heldout is None else _summary(heldout, heldout["tokens"]),
              "num_heldout_windows": 0 if heldout_windows is None else len(heldout_windows),
              "iterations": fit["iterations"], "converged": fit["converged"]}
    return {"form": form, "max_new_tokens": max_new_tokens, "bin_size": bin_size,
            "a": [float(x) for x in fit["a"]], "b": [float(x) for x in fit["b"]], "report": report}


def save_calibration(head_dir: str | os.PathLike, calibration: dict) -> Path:
    """Write ``calibration`` into the head folder's ``config.json`` (rewritten atomically, keeping the
    digest of the weights it belongs to; a folder whose weights do not match is refused); returns its path."""
    from .heads import check_weights_digest, load_config, recorded_weights_digest, write_config

    check_calibration(calibration)
    config = load_config(head_dir)  # clear errors for a missing or corrupt folder
    check_weights_digest(head_dir)  # the calibration was fitted with the weights the config records
    config.calibration = json.loads(json.dumps(calibration))  # plain JSON types only
    return write_config(head_dir, config, recorded_weights_digest(head_dir))


# ----------------------------------------------------------------------------------------------------
# Reference: exact calibration of a Markov chain, where F is computable by dynamic programming


def _row_entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp(min=1e-300).log()).sum(-1)


def markov_measures(human: torch.Tensor, transitions: torch.Tensor, initial: torch.Tensor) -> dict:
    """Exact per-step human log loss and generation entropy of a Markov-chain "language model".

    The context is the previous token (a state); ``human`` (n, n) is the true transition matrix P*,
    ``transitions`` (T, n, n) the model's q_t (full support), ``initial`` (n,) the distribution of the
    prompt's last token. Returns ``log_loss`` and ``gen_entropy`` (T,) and their mean difference ``entce``.
    """
    human_dist, own_dist = initial.double(), initial.double()
    log_loss, gen_entropy = [], []
    for q in transitions.double():
        log_loss.append((human_dist[:, None] * human * -q.log()).sum())
        gen_entropy.append((own_dist * _row_entropy(q)).sum())
        human_dist, own_dist = human_dist @ human.double(), own_dist @ q
    log_loss, gen_entropy = torch.stack(log_loss), torch.stack(gen_entropy)
    return {"log_loss": log_loss, "gen_entropy": gen_entropy, "entce": float(gen_entropy.mean() - log_loss.mean())}


def _future(transitions: torch.Tensor) -> torch.Tensor:
    """F_t(v) = the entropy-to-go from state v at step t + 1 under ``transitions`` (T, n, n) -> (T, n)."""
    steps, n, _ = transitions.shape
    to_go = torch.zeros(steps + 1, n, dtype=torch.float64)  # to_go[t](s): sum of entropies of steps t .. T - 1
    for t in reversed(range(steps)):
        to_go[t] = _row_entropy(transitions[t]) + transitions[t] @ to_go[t + 1]
    return to_go[1:]


def exact_markov_calibration(human: torch.Tensor, model: torch.Tensor, initial: torch.Tensor, max_new_tokens: int,
                             *, form: str = "tied", rounds: int = 0, frequencies: torch.Tensor | None = None) -> dict:
    """Reference implementation of the method where everything is exact: a Markov chain of n tokens.

    The human process has transitions ``human`` (n, n), the model ``model`` (n, n) (both full support),
    the prompt's last token is drawn from ``initial`` (n,). The fit data are every (state, token) pair of
    every step, weighted by its exact human probability, and F_t(s, v) is the exact entropy-to-go of the
    calibrated chain from state v at step t + 1, by dynamic programming. Each fit is :func:`fit_bins`.

    - ``rounds=0``: the paper's backward sweep (per-step forms only): fit step T - 1 (F = 0), compute F
      under the adjusted step T - 1, fit step T - 2, ... back to step 0. One sweep, no iteration.
    - ``rounds=r``: the head pipeline with exact labels: F under the current model (the base first),
      fit every step (or one global alpha) at once, recompute F under the result; r times.

    ``frequencies`` (T, n, n): fit on sampled human data instead, given as the fraction of human sequences
    with (state, token) = (s, v) at step t; the default is the exact probability of each pair.

    Returns ``a``, ``b`` (T,), ``transitions`` (T, n, n) of the calibrated chain and its ``future`` (T, n).
    """
    _check_settings(max_new_tokens, 1, form)
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"`rounds` must be a non-negative integer, but is {rounds!r}")
    if rounds == 0 and form == "global":
        raise ValueError("the backward sweep (`rounds`=0) fits one weight per step; use rounds >= 1 for 'global'")
    human, logp, initial = human.double(), model.double().log(), initial.double()
    n, steps = len(initial), max_new_tokens
    state = torch.arange(n).repeat_interleave(n)  # rows: every (state, token) pair
    token = torch.arange(n).repeat(n)
    human_dist = [initial]
    for _ in range(steps - 1):
        human_dist.append(human_dist[-1] @ human)
    row_weight = torch.stack([d[state] * human[state, token] for d in human_dist])  # (T, n * n)
    if frequencies is not None:
        if tuple(frequencies.shape) != (max_new_tokens, n, n):
            raise ValueError(f"`frequencies` must have shape (max_new_tokens, n, n) = {(max_new_tokens, n, n)}, "
                             f"but has {tuple(frequencies.shape)}")
        row_weight = frequencies.double().reshape(max_new_tokens, n * n)

    def calibrate(a: torch.Tensor, b: torch.Tensor, future: torch.Tensor) -> torch.Tensor:  # (T,), (T,), (T, n)
        return torch.softmax(a[:, None, None] * logp - b[:, None, None] * future[:, None, :], -1)  # (T, n, n)

    def fit(step_rows: list[int], future: torch.Tensor, fit_form: str) -> dict:
        rows = torch.tensor(step_rows).repeat_interleave(n * n)  # the step of every row
        chunks = tensor_chunks(logp[state].repeat(len(step_rows), 1), future[rows], token.repeat(len(step_rows)),
                               torch.arange(len(step_rows)).repeat_interleave(n * n), row_weight[step_rows].reshape(-1))
        return fit_bins(chunks, len(step_rows), fit_form, tol=1e-20)

    a, b = torch.ones(steps, dtype=torch.float64), torch.zeros(steps, dtype=torch.float64)
    if rounds == 0:
        future = torch.zeros(steps, n, dtype=torch.float64)
        to_go = torch.zeros(n, dtype=torch.float64)  # entropy-to-go from step t + 1 under the adjusted chain
        for t in reversed(range(steps)):
            future[t] = to_go
            result = fit([t], future, form)
            a[t], b[t] = result["a"][0], result["b"][0]
            q = calibrate(a[t:t + 1], b[t:t + 1], future[t:t + 1])[0]
            to_go = _row_entropy(q) + q @ to_go
    else:
        future = _future(torch.softmax(logp, -1).expand(steps, n, n))
        for _ in range(rounds):
            result = fit(list(range(steps)), future, form)
            a, b = result["a"], result["b"]
            future = _future(calibrate(a, b, future))
    transitions = calibrate(a, b, future)
    return {"a": a, "b": b, "transitions": transitions, "future": _future(transitions)}


def format_calibration(calibration: dict) -> str:
    """The per-bin table of a fitted calibration: steps, tokens, weights, base and calibrated log loss."""
    report = calibration["report"]
    held = report.get("heldout") is not None
    head = f"{'bin':>4} {'steps':>9} {'tokens':>7} {'a':>8} {'b':>8} {'base LL':>8} {'cal LL':>8}"
    lines = [head + (f" {'held base':>9} {'held cal':>9}" if held else "")]
    for row, a, b in zip(report["bins"], calibration["a"], calibration["b"]):
        line = (f"{row['bin']:>4} {row['first_step']:>4}-{row['last_step']:<4} {row['tokens']:>7} {a:>8.4f} {b:>8.4f} "
                f"{row['loss_base']:>8.4f} {row['loss']:>8.4f}")
        lines.append(line + (f" {row['heldout_loss_base']:>9.4f} {row['heldout_loss']:>9.4f}" if held else ""))
    fit = report["fit"]
    total = f"{'all':>4} {'':>9} {fit['tokens']:>7} {'':>8} {'':>8} {fit['loss_base']:>8.4f} {fit['loss']:>8.4f}"
    if held:
        total += f" {report['heldout']['loss_base']:>9.4f} {report['heldout']['loss']:>9.4f}"
    lines.append(total)
    lines.append(f"form {calibration['form']}, {report['num_windows']} fit windows"
                 + (f", {report['num_heldout_windows']} held-out windows" if held else "")
                 + f", {report['iterations']} Newton steps" + ("" if report["converged"] else " (not converged)"))
    return "\n".join(lines)
