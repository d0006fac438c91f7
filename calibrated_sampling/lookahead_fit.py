"""Fitting the one-step lookahead's alpha to human log loss, a 1-D convex problem.

The lookahead (:mod:`.lookahead`) samples from q_alpha(v | x) ∝ p(v | x) exp(-alpha H(p(. | x, v))) over
the top-C candidates of p. One teacher-forced pass over human text at alpha = 0 records, per token, log p
of the candidates and their next-step entropies; the human log loss of q_alpha, its derivative and its
curvature in alpha are then exact functions of those cached terms, and a safeguarded Newton search
finds the alpha that minimises it. Training layer: it drives a measurement pass (``teacher_forced``).

Any F over the top C fits the same way: ``source`` swaps the next-step entropy for another F source
(lookahead_value.py: the state value after each candidate, the exact two-step F; lookahead_value_fit.py: a
head's F on the context's hidden state).

Standard error (:func:`alpha_stderr`): the sandwich (Huber-White) estimate clustered by window,
s.e.^2 = G / (G - 1) * sum_w g_w^2 / (sum_i c_i)^2, with g_w the summed per-token derivatives of the log
loss over window w at the fitted alpha and c_i the per-token curvature Var_q(F). Tokens of one window share
their text, so their derivatives are correlated and a per-token s.e. would be too small; and q_alpha is not
the law of human text, so the model-based 1 / sqrt(sum_i c_i) (reported beside it) need not hold either.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, PreTrainedModel

from .batch_store import BatchStore, kept_or_run
from .data import Window
from .lookahead import DEFAULT_TOP, LookaheadEntropy, LookaheadProcessor, LookaheadSampler
from .measure import teacher_forced
from .models import pad_token_id


class _Recorder(LookaheadSampler):
    """alpha = 0 (q = p) while recording, per teacher-forced step, log p (unless ``keep_logp`` is False:
    then None) and the candidates with their H (or the F of ``source``)."""

    def __init__(self, model: PreTrainedModel, top: int, source: LookaheadEntropy | None = None,
                 keep_logp: bool = True):
        processor = LookaheadProcessor(model, 0.0, top)
        if source is not None:  # another F over the top C: recorded and fitted exactly as the entropy is
            processor.lookahead = source
        super().__init__("lookahead:alpha=0", LogitsProcessorList([processor]))
        self.keep_logp = keep_logp
        self.window_steps = 0  # T of the windows in the pass (a head source's horizon T - 1 - t)
        self.steps: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    def teacher_forced_logits(self, input_ids, base_logits, hidden, step):
        processor: LookaheadProcessor = self.processors[0]
        logp = torch.log_softmax(base_logits.float(), dim=-1)
        if getattr(processor.lookahead, "reads_hidden", False):  # a head's F: from h(x), no lookahead pass
            candidates, next_entropy = processor.lookahead.from_hidden(hidden, logp, step, self.window_steps)
        else:
            candidates, next_entropy = processor.lookahead(input_ids, logp, processor.mask)
        self.steps.append((logp if self.keep_logp else None, candidates, next_entropy))
        return logp


def candidate_rows(model: PreTrainedModel, tokenizer, windows: list[Window], top: int,
                   batch_size: int = 8, progress: bool = False,
                   store: BatchStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-C candidates of p (rows, C) and their next-step entropies (rows, C) at every continuation
    token of ``windows``, rows window-major (window w's step t is row w * T + t). ``store``: the batches
    done by an interrupted pass are taken from it, and every new one is added to it."""
    pad_id = pad_token_id(tokenizer)
    recorder = _Recorder(model, top, keep_logp=False)
    candidates, entropies = [], []
    with recorder.attach(model):
        # C + 1 tokens per row: minutes on a CPU at a fit's size, so it shows its progress
        for index, start in enumerate(tqdm(range(0, len(windows), batch_size), desc="lookahead pass", unit="batch",
                                           disable=not progress)):
            def run(start=start) -> dict[str, torch.Tensor]:
                recorder.steps.clear()
                teacher_forced(model, recorder, windows[start:start + batch_size], pad_id)
                return {"candidates": torch.stack([c for _, c, _ in recorder.steps], 1).flatten(0, 1).cpu(),  # (B*T, C)
                        "entropies": torch.stack([h for _, _, h in recorder.steps], 1).flatten(0, 1).float().cpu()}
            done = kept_or_run(store, index, run)
            candidates.append(done["candidates"])
            entropies.append(done["entropies"])
    return torch.cat(candidates), torch.cat(entropies)


def lookahead_loss_terms(model: PreTrainedModel, tokenizer, windows: list[Window], top: int = DEFAULT_TOP,
                         batch_size: int = 8, source: LookaheadEntropy | None = None) -> dict[str, torch.Tensor]:
    """Everything the human log loss of q_alpha depends on, for every continuation token of ``windows``:
    log p of the C candidates (N, C), their next-step entropies (N, C) (or the F of ``source``, a
    :class:`LookaheadEntropy` whose call gives (candidates, F); its own ``top`` then counts), the human
    token's index among them (N,) (-1 when outside the top C), log p of the human token (N,), and the
    window and step of each token (N,) (the clusters of the standard error; bins of steps)."""
    pad_id = pad_token_id(tokenizer)
    parts: dict[str, list[torch.Tensor]] = {"logp": [], "entropy": [], "index": [], "logp_human": [],
                                            "window": [], "step": []}
    recorder = _Recorder(model, top, source)
    with recorder.attach(model):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            recorder.steps.clear()
            recorder.window_steps = len(batch[0].continuation_ids)
            teacher_forced(model, recorder, batch, pad_id)
            for t, (logp, candidates, next_entropy) in enumerate(recorder.steps):
                human = torch.tensor([w.continuation_ids[t] for w in batch], device=logp.device)
                hit = candidates == human[:, None]  # (B, C)
                parts["logp"].append(logp.gather(-1, candidates).cpu())
                parts["entropy"].append(next_entropy.cpu())
                parts["index"].append(torch.where(hit.any(-1), hit.float().argmax(-1), -1).cpu())
                parts["logp_human"].append(logp.gather(-1, human[:, None]).squeeze(-1).cpu())
                parts["window"].append(torch.arange(start, start + len(batch)))
                parts["step"].append(torch.full((len(batch),), t))
    integer = ("index", "window", "step")
    return {k: torch.cat(v) if k in integer else torch.cat(v).double() for k, v in parts.items()}


def lookahead_log_loss(terms: dict[str, torch.Tensor], alpha: float) -> tuple[float, float, float]:
    """(mean human log loss of q_alpha, its first and second derivative in alpha), from the cached terms."""
    return tuple(part.mean().item() for part in token_log_loss_terms(terms, alpha))


def token_log_loss_terms(terms: dict[str, torch.Tensor], alpha: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Per token (N,): -log q_alpha(human token), and its first and second derivative in alpha (F_y - E_q F
    and Var_q F over the candidates; 0 for a human token outside the top C, whose q is p)."""
    inside = terms["index"] >= 0
    logp, ent = terms["logp"][inside], terms["entropy"][inside]
    adjusted = logp - alpha * ent
    weights = torch.softmax(adjusted, dim=-1)  # q_alpha restricted to the candidates
    mean_h = (weights * ent).sum(-1)
    var_h = (weights * (ent - mean_h[:, None]) ** 2).sum(-1)
    index = terms["index"][inside][:, None]
    log_q = adjusted.gather(-1, index).squeeze(-1) - adjusted.logsumexp(-1) + logp.logsumexp(-1)
    loss = -terms["logp_human"].clone()
    loss[inside] = -log_q
    gradient, curvature = torch.zeros_like(loss), torch.zeros_like(loss)
    gradient[inside] = ent.gather(-1, index).squeeze(-1) - mean_h
    curvature[inside] = var_h
    return loss, gradient, curvature


def clustered_meat(values: torch.Tensor, cluster: torch.Tensor) -> tuple[float, int]:
    """G / (G - 1) * sum_w (sum of ``values`` in cluster w)^2 and the number of clusters G (inf for G < 2): the
    variance of a sum of per-token terms whose tokens are correlated within a cluster (a window shares its text)."""
    _, group = torch.unique(cluster, return_inverse=True)
    clusters = int(group.max()) + 1 if len(group) else 0
    if clusters < 2:
        return math.inf, clusters
    sums = torch.zeros(clusters, dtype=values.dtype).index_add_(0, group, values)  # (G,) per cluster
    return clusters / (clusters - 1) * (sums ** 2).sum().item(), clusters


def alpha_stderr(terms: dict[str, torch.Tensor], alpha: float) -> dict:
    """The standard error of a fitted alpha (module docstring): ``stderr`` (sandwich, clustered by the
    terms' ``window``; by token where the terms hold no windows), ``stderr_model`` (1 / sqrt(sum_i c_i))
    and the number of ``clusters``."""
    _, gradient, curvature = token_log_loss_terms(terms, alpha)
    meat, clusters = clustered_meat(gradient, terms.get("window", torch.arange(len(gradient))))
    information = curvature.sum().item()
    if clusters < 2 or information <= 0:  # one window, or F equal over every token's candidates
        return {"stderr": math.inf, "stderr_model": math.inf, "clusters": clusters}
    return {"stderr": math.sqrt(meat) / information, "stderr_model": 1 / math.sqrt(information),
            "clusters": clusters}


def human_gap(terms: dict[str, torch.Tensor]) -> dict:
    """Why a text rewards an F, read at alpha = 0: ``in_top_fraction`` (human tokens among the top C: F reweights
    only those), ``gap`` (the mean over them of F(x, v_human) - E_p F(x, v), p renormalised over the candidates:
    the log loss's derivative in alpha at 0 per covered token; negative where the human token leads to less
    future entropy than the model's average candidate) with its window-clustered ``gap_stderr``, and ``spread``
    (the mean Var_p F over them: the curvature at 0). One Newton step from 0 gives alpha ~ -gap / spread and a
    human log-loss gain ~ in_top_fraction * gap^2 / (2 spread) nats per token."""
    inside = terms["index"] >= 0
    _, gradient, curvature = token_log_loss_terms(terms, 0.0)
    gap, spread = gradient[inside], curvature[inside]
    n = len(gap)
    if n == 0:  # no human token among the candidates: F cannot move the log loss at all
        return {"in_top_fraction": 0.0, "gap": math.nan, "gap_stderr": math.nan, "spread": math.nan}
    mean = gap.mean()
    meat, _ = clustered_meat(gap - mean, terms["window"][inside])
    return {"in_top_fraction": n / len(inside), "gap": mean.item(), "gap_stderr": math.sqrt(meat) / n,
            "spread": spread.mean().item()}


def fit_alpha(terms: dict[str, torch.Tensor], tol: float = 1e-7, max_iterations: int = 60) -> dict:
    """The alpha minimising human log loss: Newton steps on the (increasing) derivative, kept inside a
    bracket that bisection shrinks, so a flat or wild Newton step cannot leave it."""
    lo, hi = -1.0, 1.0
    while lookahead_log_loss(terms, lo)[1] > 0 and lo > -1e3:
        lo *= 2
    while lookahead_log_loss(terms, hi)[1] < 0 and hi < 1e3:
        hi *= 2
    alpha, iterations = 0.0 if lo < 0 < hi else (lo + hi) / 2, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        _, gradient, curvature = lookahead_log_loss(terms, alpha)
        if abs(gradient) < tol:
            break
        if gradient > 0:
            hi = alpha
        else:
            lo = alpha
        step = alpha - gradient / curvature if curvature > 0 else math.nan
        alpha = step if lo < step < hi else (lo + hi) / 2
    return {"alpha": alpha, "log_loss": lookahead_log_loss(terms, alpha)[0],
            "log_loss_alpha0": lookahead_log_loss(terms, 0.0)[0], "iterations": iterations,
            "tokens": len(terms["index"]), "in_top_fraction": (terms["index"] >= 0).float().mean().item(),
            **alpha_stderr(terms, alpha)}


def fit_lookahead_alpha(model: PreTrainedModel, tokenizer, windows: list[Window], top: int = DEFAULT_TOP,
                        batch_size: int = 8, source: LookaheadEntropy | None = None) -> dict:
    """Fit alpha on ``windows`` (use the fit split): returns {"alpha", "stderr", "log_loss", "log_loss_alpha0",
    ...}; ``source``: another F over the top C (see :func:`lookahead_loss_terms`)."""
    result = fit_alpha(lookahead_loss_terms(model, tokenizer, windows, top, batch_size, source))
    result["top"] = top if source is None else source.top
    return result


def fit_and_judge_alpha(model: PreTrainedModel, tokenizer, fit_windows: list[Window], eval_windows: list[Window],
                        top: int = DEFAULT_TOP, source: LookaheadEntropy | None = None, batch_size: int = 8) -> dict:
    """alpha fitted on ``fit_windows`` (with its clustered s.e.), and the human log loss at 0 and at that
    alpha on both sides: does this text reward the F, and does the reward carry to windows the fit never saw?"""
    top = top if source is None else source.top
    terms = {side: lookahead_loss_terms(model, tokenizer, windows, top, batch_size, source)
             for side, windows in (("fit", fit_windows), ("eval", eval_windows))}
    fit = fit_alpha(terms["fit"])
    return {"top": top, "alpha": fit["alpha"], "alpha_stderr": fit.get("stderr"),
            "fit": {"tokens": fit["tokens"], "log_loss_alpha0": fit["log_loss_alpha0"], "log_loss": fit["log_loss"],
                    "in_top_fraction": fit["in_top_fraction"], "human_gap": human_gap(terms["fit"])},
            "eval": {"tokens": len(terms["eval"]["index"]), "log_loss_alpha0": lookahead_log_loss(terms["eval"], 0.0)[0],
                     "log_loss": lookahead_log_loss(terms["eval"], fit["alpha"])[0], "human_gap": human_gap(terms["eval"])}}
