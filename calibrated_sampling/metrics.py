"""Calibration and diversity metrics: pure functions of tensors and token lists (nats throughout)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

SMOOTHING = 1e-4  # weight of the base distribution in the smoothed log loss of truncating samplers


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last axis; ``-inf`` entries carry no mass.

    Computed in float32 at least, since bf16 logits lose the small probabilities that make up the tail.
    """
    return entropy_of_log_probs(torch.log_softmax(logits.float(), dim=-1))


def entropy_of_log_probs(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy from normalised log-probabilities (..., V); entries of probability 0 add 0."""
    # -inf -> the most negative float, so that 0 * it is 0, not nan; vecdot reduces without a product tensor
    return -torch.linalg.vecdot(logp.exp(), logp.clamp(min=torch.finfo(logp.dtype).min))


def token_log_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position: (..., V), (...) -> (...). ``inf`` where the target is masked."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked  # no (..., V) log-softmax tensor: one reduction pass


def smoothed_log_loss(q_logits: torch.Tensor, p_logits: torch.Tensor, targets: torch.Tensor,
                      weight: float = SMOOTHING) -> torch.Tensor:
    """-log((1 - w) q(y) + w p(y)): a finite log loss for samplers that give human tokens probability 0."""
    return smooth_log_loss(token_log_loss(q_logits, targets), token_log_loss(p_logits, targets), weight)


def smooth_log_loss(q_loss: torch.Tensor, p_loss: torch.Tensor, weight: float = SMOOTHING) -> torch.Tensor:
    """:func:`smoothed_log_loss` from the two log losses -log q(y) and -log p(y)."""
    return -torch.logaddexp(-q_loss + math.log1p(-weight), -p_loss + math.log(weight))


def entce(gen_entropy: float, log_loss: float) -> float:
    """Entropy calibration error: mean generation entropy minus mean human log loss (positive = the
    model is less certain on its own text than on human text)."""
    return gen_entropy - log_loss


def masked_mean_per_step(values: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per-step mean over rows where ``mask`` holds: (N, T), (N, T) -> ([T] means, [T] counts).
    A step with no rows has mean NaN."""
    mask = mask.bool()
    counts = mask.sum(0)
    sums = torch.where(mask, values.double(), torch.zeros((), dtype=torch.float64)).sum(0)
    means = sums / counts.clamp(min=1)
    means[counts == 0] = float("nan")
    return means.tolist(), counts.tolist()


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Unique n-grams over all n-grams, pooled across sequences (Li et al. 2016). NaN if none."""
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def seq_rep_n(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of 1 - unique n-grams / n-grams (Welleck et al. 2020): 0 = no repetition."""
    scores = []
    for seq in sequences:
        grams = ngrams(seq, n)
        if grams:
            scores.append(1.0 - len(set(grams)) / len(grams))
    return sum(scores) / len(scores) if scores else float("nan")


def self_bleu(sequences: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Mean BLEU-``max_n`` of each sequence against all the others as references (Zhu et al. 2018).

    Higher = the generations resemble each other more (less diverse). Uses clipped n-gram precision,
    the brevity penalty against the closest reference length, and +1 smoothing of the higher orders.
    """
    if len(sequences) < 2:
        return float("nan")
    counts = [[Counter(ngrams(seq, n)) for n in range(1, max_n + 1)] for seq in sequences]
    scores = []
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        log_precision = 0.0
        for n in range(1, max_n + 1):
            ref_max: Counter = Counter()
            for j in range(len(sequences)):
                if j != i:
                    ref_max |= counts[j][n - 1]
            hyp = counts[i][n - 1]
            total = sum(hyp.values())
            clipped = sum(min(c, ref_max[g]) for g, c in hyp.items())
            smooth = 0 if n == 1 else 1
            if total + smooth == 0 or clipped + smooth == 0:
                log_precision = -math.inf
                break
            log_precision += math.log((clipped + smooth) / (total + smooth)) / max_n
        ref_len = min((len(s) for j, s in enumerate(sequences) if j != i), key=lambda r: (abs(r - len(seq)), r))
        brevity = min(0.0, 1.0 - ref_len / len(seq))
        scores.append(math.exp(log_precision + brevity))
    return sum(scores) / len(scores) if scores else float("nan")


BIN_STEPS = 64  # steps per bin of the per-step calibration in a comparison's report


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean of ``values`` weighted by ``weights``, over entries with weight > 0 that are not NaN (a step
    no sequence reached); NaN if none. Infinite values stay: a truncating sampler's log loss is inf."""
    pairs = [(v, w) for v, w in zip(values, weights) if w > 0 and not math.isnan(v)]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else math.nan


def per_bin_entce(per_step: dict, smoothed: bool = False, width: int = BIN_STEPS) -> dict:
    """Per-step calibration from a summary's ``per_step`` curves (measure's results.json).

    Per bin of ``width`` steps (the whole length when shorter): the generation entropy averaged over the
    sequences still running (weighted by ``count``), the human log loss (``log_loss_smoothed`` with
    ``smoothed``, as EntCE does for truncating samplers) and their difference, the bin's EntCE. The drift:
    the change of each from the first to the last ``min(width, T // 2)`` steps (two windows that do not
    overlap, so that a short generation still shows its drift).

    Returns {"steps", "width", "starts" (first step of each bin, 0-based), "gen_entropy", "log_loss", "entce" (per bin),
    "max_abs_entce" (NaN-free maximum; NaN if every bin is empty), "gen_change", "log_loss_change", "edge"}.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive integer, but is {width!r}")
    gen, counts = per_step["gen_entropy"], per_step["count"]
    loss = per_step["log_loss_smoothed" if smoothed else "log_loss"]
    loss_counts = per_step.get("log_loss_count") or [1] * len(loss)
    steps = len(gen)
    if steps == 0 or len(loss) != steps:
        raise ValueError(f"`per_step` needs curves of one positive length, but has {steps} generation and "
                         f"{len(loss)} log-loss steps")

    def means(first: int, last: int) -> tuple[float, float]:
        return (_weighted_mean(gen[first:last], counts[first:last]),
                _weighted_mean(loss[first:last], loss_counts[first:last]))

    width = min(width, steps)
    starts = list(range(0, steps, width))
    binned = [means(start, start + width) for start in starts]
    bins = [h - ll for h, ll in binned]
    finite = [abs(e) for e in bins if not math.isnan(e)]
    edge = max(1, min(width, steps // 2))
    (h0, l0), (h1, l1) = means(0, edge), means(steps - edge, steps)
    return {"steps": steps, "width": width, "starts": starts, "gen_entropy": [h for h, _ in binned],
            "log_loss": [ll for _, ll in binned], "entce": bins, "max_abs_entce": max(finite) if finite else math.nan,
            "gen_change": h1 - h0, "log_loss_change": l1 - l0, "edge": edge}
