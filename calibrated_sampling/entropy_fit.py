"""The entropy-matched fit: calibration is the constraint, human log loss the objective (docs/design.md).

The sampled distribution at generation step t (0-based), bin j = t // bin_size, horizon k = T - 1 - t:

    q_t(v | x)  ∝  exp( a_j log p(v | x)  -  b_j F_k(x, v) )

with F = 0 (a per-step temperature schedule), a head's F, or the exact one-step lookahead's
(lookahead_schedule.py: H(p(. | x, v)) over the top C, their p-weighted mean elsewhere).

The log-loss fit (fit.py) chooses (a_j, b_j) by human log loss alone; it declines an F that is not
nearly exact, and what remains is a per-bin temperature that log loss sets near 1, so EntCE stays.
Here every bin must be calibrated, and F earns its weight only by lowering the log-loss price:

- **constraint**: a_j is set so that the mean entropy of q along its own generations in bin j equals
  q's teacher-forced human log loss in bin j (per-bin EntCE 0: a flat curve);
- **objective**: b_j is fitted to human log loss given a_j (convex in b), then a global multiplier
  m of those b_j is searched along the constraint (each m re-matched by its own a_j), keeping the m
  with the lowest fit-side log loss. m = 0 is the per-step temperature schedule, so F is used only
  where it removes entropy more cheaply than temperature does.

Rounds. Generation entropy depends on the whole schedule (earlier bins move the states that later
bins see; F's bins reach forward), so the constraint is met by rounds: sample the fit prompts under
the current schedule, measure per bin the generation entropy (with its standard error over prompts)
and the teacher-forced log loss, then update every bin at once:

    a_j  <-  a_j - gap_j / (d gap_j / d a_j),        gap_j = H_gen,j - LL_j

The slope is closed form from the very logits that were sampled: for log q = s - log Z with
s = a l - b F (l = log p), dH/da = -Cov_q(l, s) and dH/db = Cov_q(F, s), recorded at every step,
and d LL/da = E_q l - l(y), d LL/db = F(y) - E_q F on the human side. What the slope leaves out
(how a_j moves the states that later steps visit, and F's dependence on later bins) is the
approximation that the next round's measurement corrects. On SmolLM2 the true slope is steeper
(a cooler bin makes the text that later bins read more repetitive), so a pure Newton step overshoots
and the rounds oscillate; from the second round on, a bin whose gap moved more than the closed form
predicts takes the measured secant slope of its last two rounds instead; in the first round, the
start schedule's own secant does, where one is given (``start_slope``). The multiplier search is likewise
linearised: for a candidate m the re-matched a_j(m) is predicted from d gap/db, and the log loss at
(a_j(m), m b_j) is computed exactly on the cached human side. The fit stops when every bin's gap
is within its standard error; the schedule returned is the one whose gaps were measured (never an
unmeasured update). After ``max_rounds`` without that it says it did not converge, and
:func:`calibrated_sampling.schedule.save_schedule` refuses to write it.

entropy_markov.py runs the same update with exact expectations on a Markov chain (the proof).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from .batch_store import BatchStore, kept_or_run
from .calibrator import FutureEntropyCalibrator, schedule_weights
from .data import Window, batch_windows, cut_windows, windows_digest
from .files import write_atomic
from .fit import _bin_sums, human_states
from .heads import FutureEntropyHead, weights_file_digest
from .lookahead_fit import candidate_rows
from .lookahead_schedule import ScheduledLookaheadProcessor, lookahead_future
from .measure import generate_with_entropy
from .models import model_fingerprint, pad_token_id, tokenizer_fingerprint, weights_digest

DEFAULT_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # coarse grid of m; refined around the best
REFINE_POINTS = 8  # second-pass points between the best coarse m's neighbours
MAX_A_STEP = 0.5  # largest change of any a_j in one round: a trust region for a poorly known slope
MIN_A = 0.05  # a_j stays positive (a <= 0 would reverse or flatten p completely)
HUMAN_KEYS = ("weight", "loss", "entropy", "grad_a", "grad_b", "h_bb")
LOSS_KEYS = ("weight", "loss")  # what the multiplier search reads: a third of the cost of all of HUMAN_KEYS

# Rows of the human side: log p (n, V), F (n, V) or None (F = 0), human token (n,), group (n,), weight or None.
# group = prompt * num_bins + bin, so one pass gives per-prompt sums (standard errors) and per-bin sums.
HumanChunk = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, "torch.Tensor | None"]


# ----------------------------------------------------------------------------------------------------
# The human (teacher-forced) side


def human_sums(chunks: Callable[[], Iterable[HumanChunk]], ab: torch.Tensor, num_prompts: int,
               keys: tuple[str, ...] = HUMAN_KEYS) -> dict:
    """Weighted sums of the human-side row stats for K candidate weights per bin.

    ab: (num_bins, K, 2) candidate (a, b) of every bin -> {key: (num_prompts, num_bins, K)} float64 on the CPU,
    keys ``weight``, ``loss`` (-log q(y)), ``entropy`` (H(q) at the human prefix), ``grad_a``, ``grad_b``
    (derivatives of the loss) and ``h_bb`` (its second derivative in b); ``keys`` chooses which.
    """
    num_bins, count, _ = ab.shape
    sums = _bin_sums(chunks, ab, torch.float64, num_groups=num_prompts * num_bins, keys=keys)
    if float(sums["weight"].sum()) == 0:
        raise ValueError("the human side has no rows: nothing to fit on")
    return {key: value.reshape(num_prompts, num_bins, count) for key, value in sums.items()}


def bin_means(sums: dict) -> dict:
    """Per-bin means (num_bins, K) of :func:`human_sums`' per-prompt sums; ``tokens`` is the bin's weight."""
    weight = sums["weight"].sum(0)
    means = {key: value.sum(0) / weight.clamp(min=1e-300) for key, value in sums.items() if key != "weight"}
    return {"tokens": weight, **means}


def fit_b(human: Callable[[torch.Tensor], dict], a: torch.Tensor, b: torch.Tensor, *, max_iter: int = 30,
          tol: float = 1e-12) -> torch.Tensor:
    """The b_j minimising bin j's mean human log loss with a_j held fixed: 1-D Newton per bin, one
    candidate per pass (a pass over the human side is the fit's cost), the step of a bin halved after a
    step that did not lower its loss (the loss is convex in b, so full steps nearly always do).

    ``human(ab (num_bins, K, 2), keys=HUMAN_KEYS)`` returns :func:`bin_means`. A bin where F does not vary over the
    vocabulary (the last step, k = 0) has no curvature and keeps its b.
    """
    b = b.clone().double()
    now = human(torch.stack([a, b], -1)[:, None])
    grad, curv, loss = now["grad_b"][:, 0], now["h_bb"][:, 0], now["loss"][:, 0]
    size = torch.ones_like(b)
    for _ in range(max_iter):
        step = torch.where(curv > 1e-12, -grad / curv.clamp(min=1e-12), torch.zeros_like(grad))
        if (-(grad * step) / 2).max() <= tol or size.max() < 1e-6:  # Newton decrement: the gain left
            break
        trial_b = b + size * step
        out = human(torch.stack([a, trial_b], -1)[:, None])
        better = out["loss"][:, 0] < loss
        b = torch.where(better, trial_b, b)
        grad = torch.where(better, out["grad_b"][:, 0], grad)
        curv = torch.where(better, out["h_bb"][:, 0], curv)
        loss = torch.where(better, out["loss"][:, 0], loss)
        size = torch.where(better, torch.ones_like(size), size / 2)
    return b


# ----------------------------------------------------------------------------------------------------
# One round's update, shared by the language-model fit and the exact Markov reference


def _slope_a(slope: torch.Tensor, gen_slope: torch.Tensor) -> torch.Tensor:
    """d gap / d a, kept negative: where the measured total is not (noise, a flat bin), the generation
    side alone (-Var_q(log p) for F = 0, never positive) gives the direction."""
    fallback = torch.minimum(gen_slope, torch.full_like(gen_slope, -1e-3))
    return torch.where(slope < -1e-8, slope, fallback)


def steeper_slope(closed: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
    """Per bin, the measured d gap / d a_j where it is known (finite) and steeper than the closed form's."""
    if measured is None:
        return closed
    return torch.where(torch.isfinite(measured), torch.minimum(closed, measured), closed)


def match_update(a: torch.Tensor, b: torch.Tensor, gen: dict, human: Callable[[torch.Tensor], dict], *,
                 use_future: bool, multipliers: Sequence[float] | float = DEFAULT_MULTIPLIERS,
                 b_damping: float = 1.0, measured_slope: torch.Tensor | None = None) -> dict:
    """One round's update of the schedule from its measured per-bin quantities.

    Args:
        a, b: (num_bins,) the schedule that was measured.
        gen: generation side, per bin (num_bins,): ``entropy``, ``dh_da``, ``dh_db``; optionally ``jac_a``,
            ``jac_b`` (num_bins, num_bins), the total derivatives of every bin's gap in every a and b (then
            used instead of each bin's own slope).
        human: ``(ab (num_bins, K, 2), keys=HUMAN_KEYS) -> bin_means`` of the teacher-forced rows (F held at
            its current value).
        use_future: False for F = 0 (b stays 0: a per-step temperature schedule).
        multipliers: the grid of m searched (refined around its best), or one number m to keep fixed.
        b_damping: the fraction of the way from b to the chosen m b_fit taken this round (1: all of it).
            Where F itself depends on the schedule (exact F, recomputed under the adjusted chain), b and F
            feed back on each other and a full step can oscillate; a head's F is fixed, so it needs none.
        measured_slope: (num_bins,) d gap / d a_j measured across the last two rounds (a secant), or None.
            Where it is steeper than the closed-form slope, it is used: the closed form holds the visited
            states fixed, but a lower a_j also makes the text that later steps see more repetitive, so
            the true slope is steeper and a pure Newton step overshoots and oscillates (seen on SmolLM2).

    Returns ``a``, ``b`` (the next schedule), ``multiplier``, ``b_fit`` (the log-loss b given the new a)
    and ``predicted_loss`` (fit-side log loss the linearised search expects).
    """
    now = human(torch.stack([a, b], -1)[:, None])
    gap = gen["entropy"] - now["loss"][:, 0]
    slope_a = steeper_slope(_slope_a(gen["dh_da"] - now["grad_a"][:, 0], gen["dh_da"]), measured_slope)
    slope_b = gen["dh_db"] - now["grad_b"][:, 0]
    if gen.get("jac_a") is not None:
        # Total derivatives of every bin's gap (the exact reference has them): a full Newton step.
        def rematch(delta_b: torch.Tensor) -> torch.Tensor:  # (num_bins, K) change of b -> change of a
            return -torch.linalg.solve(gen["jac_a"], gen["jac_b"] @ delta_b)
        step = -torch.linalg.solve(gen["jac_a"], gap[:, None])[:, 0]
        step = step * (MAX_A_STEP / step.abs().max().clamp(min=1e-300)).clamp(max=1.0)
    else:
        # Each bin's own slope: what a bin does to the states of later bins is left to the next round.
        def rematch(delta_b: torch.Tensor) -> torch.Tensor:
            return -slope_b[:, None] * delta_b / slope_a[:, None]
        step = (-gap / slope_a).clamp(-MAX_A_STEP, MAX_A_STEP)
    a_new = (a + step).clamp(min=MIN_A)
    tokens = now["tokens"][:, 0]
    if not use_future:
        loss = human(torch.stack([a_new, b], -1)[:, None], keys=LOSS_KEYS)["loss"][:, 0]
        return {"a": a_new, "b": b.clone(), "multiplier": 0.0, "b_fit": b.clone(),
                "predicted_loss": float((loss * tokens).sum() / tokens.sum())}
    b_fit = fit_b(human, a_new, b)

    def along(ms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a (num_bins, K), b (num_bins, K), total loss (K,)) for multipliers ms (K,), a re-matched to first order."""
        cand_b = b[:, None] + b_damping * (b_fit[:, None] * ms[None] - b[:, None])
        cand_a = (a_new[:, None] + rematch(cand_b - b[:, None])).clamp(min=MIN_A)
        loss = human(torch.stack([cand_a, cand_b], -1), keys=LOSS_KEYS)["loss"]  # (num_bins, K)
        return cand_a, cand_b, (loss * tokens[:, None]).sum(0) / tokens.sum()

    if isinstance(multipliers, (int, float)):
        grid = torch.tensor([float(multipliers)], dtype=torch.float64)
    else:
        coarse = torch.tensor(sorted(multipliers), dtype=torch.float64)
        _, _, loss = along(coarse)
        best = int(loss.argmin())
        low, high = coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)]
        grid = torch.cat([coarse[best:best + 1], torch.linspace(float(low), float(high), REFINE_POINTS + 2,
                                                                 dtype=torch.float64)])
    cand_a, cand_b, loss = along(grid)
    best = int(loss.argmin())
    return {"a": cand_a[:, best], "b": cand_b[:, best], "multiplier": float(grid[best]), "b_fit": b_fit,
            "predicted_loss": float(loss[best])}


def within_error(gap: torch.Tensor, stderr: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Per bin: is |gap| within its standard error (or within ``tol``)? A NaN error (one prompt) is not."""
    return (gap.abs() <= torch.nan_to_num(stderr, nan=-1.0)) | (gap.abs() <= tol)


# ----------------------------------------------------------------------------------------------------
# The language-model side: generation under the schedule, recording H(q) and its slopes


def _recorded_step(logp: torch.Tensor, future: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q's logits s = a l - b F (float32 (B, V)) and (B, 3) float32 H(q), dH/da = -Cov_q(l, s),
    dH/db = Cov_q(F, s), from float64 log p and F (the covariances of a 49k vocabulary)."""
    logits = a * logp - b * future
    log_q = torch.log_softmax(logits, -1)
    q = log_q.exp()
    centred = logits - (q * logits).sum(-1, keepdim=True)  # s - E_q s
    entropy = -(q * log_q).sum(-1)
    dh_da = -(q * (logp - (q * logp).sum(-1, keepdim=True)) * centred).sum(-1)
    dh_db = (q * (future - (q * future).sum(-1, keepdim=True)) * centred).sum(-1)
    return logits.float(), torch.stack([entropy, dh_da, dh_db], -1).float().cpu()


class _RecordingCalibrator(FutureEntropyCalibrator):
    """Samples q exactly as :class:`FutureEntropyCalibrator` (never fused: the exact path sees log p and F
    separately) and records, at every step, H(q) and its slopes (:func:`_recorded_step`)."""

    def __init__(self, head, calibration: dict):
        super().__init__(head, calibration, fused=False)
        self.records: list[torch.Tensor] = []  # one (B, 3) tensor per step

    @torch.no_grad()
    def _exact(self, scores: torch.Tensor, hidden: torch.Tensor, step: int) -> torch.Tensor:
        a, b, k = self._weights(step)
        logp = torch.log_softmax(scores.double(), -1)
        if self.head is None:
            future = torch.zeros_like(logp)
        else:
            future = self.head(hidden, torch.tensor(k)).double().to(logp.device)  # (B, V)
        logits, stats = _recorded_step(logp, future, a, b)
        self.records.append(stats)
        return logits


class _RecordingLookahead(ScheduledLookaheadProcessor):
    """Samples the lookahead schedule's q and records what :class:`_RecordingCalibrator` records; F is
    needed at every step, also where b = 0 (its slope dH/db)."""

    def __init__(self, model, calibration: dict, top: int):
        super().__init__(model, calibration, top)
        self.records: list[torch.Tensor] = []

    @torch.no_grad()
    def scheduled_logits(self, input_ids: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        a, b = schedule_weights(self.calibration, step)
        logp = torch.log_softmax(scores.double(), -1)
        logits, stats = _recorded_step(logp, self.future(input_ids, logp.float()).double(), a, b)
        self.records.append(stats)
        return logits


def schedule_calibration(a: Sequence[float], b: Sequence[float], max_new_tokens: int, bin_size: int) -> dict:
    """The calibrator's schedule dict (calibrator.check_calibration) of per-bin weights."""
    return {"form": "untied", "max_new_tokens": max_new_tokens, "bin_size": bin_size,
            "a": [float(x) for x in a], "b": [float(x) for x in b]}


@torch.no_grad()
def generation_sums(model, head, windows: Sequence[Window], a: torch.Tensor, b: torch.Tensor, *, max_new_tokens: int,
                    bin_size: int, pad_id: int, batch_size: int, seed: int, progress: bool = False,
                    lookahead_top: int | None = None, store: BatchStore | None = None) -> torch.Tensor:
    """Sample every window's prompt under the schedule: per prompt and bin, the running-step sums of
    (count, H(q), dH/da, dH/db), shape (prompts, num_bins, 4). Each batch has its own fixed seed, the
    same in every round (common random numbers: the rounds' differences are the schedule's, not noise).
    F: the head's (None: F = 0), or with ``lookahead_top`` C the one-step lookahead's (lookahead_schedule.py).
    ``store``: this schedule's batches done before an interruption (exactly what a rerun would give: the
    seeds are per batch); each new batch is added to it."""
    num_bins = math.ceil(max_new_tokens / bin_size)
    calibration = schedule_calibration(a, b, max_new_tokens, bin_size)
    recorder = (_RecordingCalibrator(head, calibration) if lookahead_top is None
                else _RecordingLookahead(model, calibration, lookahead_top))
    sums = torch.zeros(len(windows), num_bins, 4, dtype=torch.float64)
    with recorder.attached(model):
        for index, start in enumerate(tqdm(range(0, len(windows), batch_size), desc="generate", unit="batch",
                                           disable=not progress)):
            batch = list(windows[start:start + batch_size])
            done = kept_or_run(store, index, _batch_sums, model, recorder, batch, num_bins, bin_size, pad_id,
                               max_new_tokens, seed * 100_003 + index)
            sums[start:start + len(batch)] = done["sums"]
    return sums


def _batch_sums(model, recorder, batch: list[Window], num_bins: int, bin_size: int, pad_id: int,
                max_new_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One batch of :func:`generation_sums`: ``sums``, (len(batch), num_bins, 4)."""
    ids, mask = batch_windows(batch, pad_id, with_continuation=False)
    recorder.records.clear()
    record = generate_with_entropy(model, ids.to(model.device), mask.to(model.device),
                                   LogitsProcessorList([recorder]), max_new_tokens, seed=seed)
    steps = len(recorder.records)
    stats = torch.stack(recorder.records, 1).double()  # (B, steps, 3)
    running = record.running[:, :steps].double()[..., None]  # (B, steps, 1)
    bins = torch.arange(steps) // bin_size
    sums = torch.zeros(len(batch), num_bins, 4, dtype=torch.float64)
    return {"sums": sums.index_add_(1, bins, torch.cat([running, stats * running], -1).cpu())}


def _human_chunks(model, head, windows: Sequence[Window], *, max_new_tokens: int, bin_size: int, pad_id: int,
                  batch_size: int, progress: bool, cache_elements: int | None = None,
                  lookahead: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[], Iterable[HumanChunk]]:
    """The human side of ``windows``: one teacher-forced pass caches the hidden states; log p (and F) are
    kept in memory when they fit in ``cache_elements`` floats (default: half of the free memory), else
    recomputed in chunks at every pass (an output-embedding product, and the head's, over every human
    token at each of a round's 20-odd passes: the fit's largest cost on a CPU). A head fit of 48 prompts
    x 512 tokens holds 9.6 GB this way; the generation beside it needs little (a 135M model's cache).
    ``lookahead``: the rows' candidates and next-step entropies (lookahead_fit.candidate_rows), whose F
    replaces the head's."""
    if cache_elements is None:
        cache_elements = _free_bytes() // 2 // 4  # float32
    states = human_states(model, windows, max_new_tokens, pad_id, batch_size, progress)
    num_bins = math.ceil(max_new_tokens / bin_size)
    rows = len(states["target"])
    step = states["step"]
    group = (torch.arange(rows, device=step.device) // max_new_tokens) * num_bins + step // bin_size
    output = model.get_output_embeddings()
    vocab = output.out_features
    chunk_rows = max(1, (1 << 22) // vocab)

    def compute(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = states["hidden"][i:j]
        logp = torch.log_softmax(output(hidden).float(), -1)  # (n, V)
        if lookahead is not None:
            return logp, lookahead_future(logp, lookahead[0][i:j].to(logp.device), lookahead[1][i:j].to(logp.device))
        future = None if head is None else head(hidden, head.horizon_for(max_new_tokens - 1 - step[i:j])).float()
        return logp, future

    with torch.no_grad():
        cached = [compute(i, i + chunk_rows) for i in range(0, rows, chunk_rows)] \
            if rows * vocab * (1 if head is None and lookahead is None else 2) <= cache_elements else None

    @torch.no_grad()
    def chunks():
        for n, i in enumerate(range(0, rows, chunk_rows)):
            logp, future = cached[n] if cached is not None else compute(i, i + chunk_rows)
            yield logp, future, states["target"][i:i + chunk_rows], group[i:i + chunk_rows], None
    return chunks


def _free_bytes() -> int:
    """Memory available now (Linux and macOS); 2 GiB where the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def _future_record(future) -> tuple[str, object]:
    """(kind, what the fit needs): 'none' -> None; a head folder -> its path; ('lookahead', C) -> C."""
    if isinstance(future, str) and future == "none":
        return "none", None
    if isinstance(future, tuple) and len(future) == 2 and future[0] == "lookahead":
        top = future[1]
        if isinstance(top, bool) or not isinstance(top, int) or top < 2:
            raise ValueError(f"`future` {future!r}: the lookahead's C must be an integer of at least 2 (with one "
                             f"candidate F is constant), but is {top!r}")
        return "lookahead", top
    if isinstance(future, (str, bytes)) or hasattr(future, "__fspath__"):
        return "head", future
    raise ValueError(f"`future` must be 'none', a head folder or ('lookahead', C), but is {future!r}")


def fit_entropy_matched(model, tokenizer, windows: Sequence[Window], *, max_new_tokens: int, bin_size: int = 32,
                        future="none", batch_size: int = 8, seed: int = 0, max_rounds: int = 8,
                        multipliers: Sequence[float] | float = DEFAULT_MULTIPLIERS, progress: bool = True,
                        checkpoint: str | os.PathLike | None = None, f_weight: float | None = None,
                        start_a: Sequence[float] | None = None, start_slope: Sequence[float] | None = None) -> dict:
    """Fit a schedule whose every bin is calibrated on ``windows`` (the fit split), at the lowest log loss.

    Args:
        windows: prompts with at least ``max_new_tokens`` human continuation tokens each.
        max_new_tokens: T, the generation length the schedule is for; bins of ``bin_size`` steps.
        future: ``"none"`` (F = 0: a per-step temperature schedule), a head folder (F from its head) or
            ``("lookahead", C)`` (the exact one-step lookahead over the top C: lookahead_schedule.py; C + 1
            tokens per row and step, in the generations and in one teacher-forced pass).
        seed: of the generations (the same every round).
        max_rounds: rounds of sampling before the fit gives up (then ``report["converged"]`` is False).
        multipliers: the grid of the global multiplier m of the log-loss b (module docstring), or one m.
        checkpoint: a JSON file written after every round (the schedule to measure next and the history);
            a fit started again with the same model, windows and settings resumes from it. Beside it, the
            round in progress and the lookahead's pass are kept batch by batch (:func:`store_paths`), so an
            interruption costs one batch at most.
        f_weight: F's weight b held fixed, the same in every bin, with only the a_j matched (None: b_j
            fitted per bin and scaled by the multiplier search). A per-bin b reaches forward into later
            bins' states, and 24-32 fit prompts pin it down too loosely held out (docs/results.md, *The lookahead's
            entropy-matched schedule*); one weight fitted to log loss elsewhere (``lookahead-fit``) does not.
        start_a: the a_j of the first round (default all 1), e.g. a per-step temperature schedule's: each
            round samples every fit prompt, and a start near the answer saves rounds.
        start_slope: per bin, d gap / d a_j measured where ``start_a`` came from (:func:`secant_slope` of
            the start schedule's history; NaN where unknown), used by round 1's step where it is steeper than
            the closed form, as a fit's own secant is from round 2 on. The closed form misses how a bin's
            a_j moves the states later text reads, so round 1's step alone overshoots (docs/design.md,
            *Rounds, measured*).

    Returns ``{"objective": "entropy", "form": "untied", "max_new_tokens", "bin_size", "a", "b", "future":
    {"kind": ...}, "report": {...}}``; the report holds ``converged``, ``unreachable`` (None, or why more
    rounds cannot help: a bin needs more entropy than the smallest a gives), ``rounds``, ``seconds``,
    ``generated_tokens``, ``multiplier``, per-bin ``bins`` (generation entropy, log loss, gap and its
    standard error over prompts) and ``history`` (every round's schedule and gaps).
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("bin_size", bin_size), ("batch_size", batch_size),
                        ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    if not windows:
        raise ValueError("`windows` is empty: nothing to fit on")
    windows = cut_windows(windows, max_new_tokens, "windows")
    kind, what = _future_record(future)
    num_bins, prompts = math.ceil(max_new_tokens / bin_size), len(windows)
    a, b = _first_weights(kind, num_bins, f_weight, start_a)
    seed_slope = _start_slope(num_bins, start_slope)
    head, record, top = None, {"kind": "none"}, None
    if kind == "head":
        head = FutureEntropyHead.from_pretrained(what, model, tokenizer).eval()
        record = {"kind": "head", "path": str(what), "sha256": weights_file_digest(what)}
    elif kind == "lookahead":
        top, record = what, {"kind": "lookahead", "top": what}
    started = time.perf_counter()
    pad_id = pad_token_id(tokenizer)
    settings = {"max_new_tokens": max_new_tokens, "bin_size": bin_size, "pad_id": pad_id, "batch_size": batch_size}
    identity = {"model": {**model_fingerprint(model), "weights": weights_digest(model)},
                "tokenizer": tokenizer_fingerprint(tokenizer), "windows": windows_digest(windows), "future": record,
                "seed": seed, "multipliers": multipliers if isinstance(multipliers, (int, float)) else list(multipliers),
                **settings, **({} if f_weight is None else {"f_weight": f_weight}),
                **({} if start_a is None else {"start_a": a.tolist()})}
    history, multiplier, converged, generated = [], 0.0, False, 0
    resumed = _read_checkpoint(checkpoint, identity)  # another fit's checkpoint: refused before the long passes
    if resumed is not None:
        a, b = torch.tensor(resumed["a"], dtype=torch.float64), torch.tensor(resumed["b"], dtype=torch.float64)
        history, multiplier, generated = resumed["history"], resumed["multiplier"], resumed["generated_tokens"]
        started -= resumed["seconds"]
    stores = None if checkpoint is None else store_paths(checkpoint)
    # The lookahead's F is the base model's next-step entropy: one teacher-forced pass for the whole fit, kept
    # batch by batch beside the checkpoint (as long as a round: an interruption should not cost it again).
    lookahead_store = None  # another fit's pass is refused, as its checkpoint is: it may be resumed yet
    if stores is not None and top is not None:
        lookahead_store = BatchStore(stores["lookahead"], identity, other="refuse")
    if resumed is None and lookahead_store is not None:  # once a round is checkpointed, its seconds hold the pass
        started -= lookahead_store.seconds  # the kept batches' time, read before this run adds to them
    lookahead = None if top is None else candidate_rows(model, tokenizer, windows, top, batch_size, progress,
                                                        store=lookahead_store)
    chunks = _human_chunks(model, head, windows, progress=progress, lookahead=lookahead, **settings)

    def human(ab: torch.Tensor, keys: tuple[str, ...] = HUMAN_KEYS) -> dict:
        return bin_means(human_sums(chunks, ab, prompts, keys))

    # The base model's fit-side log loss (a = 1, b = 0), whatever the first round starts from.
    base = human(torch.stack([torch.ones(num_bins), torch.zeros(num_bins)], -1).double()[:, None], keys=LOSS_KEYS)
    base_loss = float((base["loss"][:, 0] * base["tokens"][:, 0]).sum() / base["tokens"][:, 0].sum())
    first = len(history) + 1
    last = max(max_rounds, first)  # a resumed fit measures the schedule it had reached at least once
    unreachable = None
    for round_ in range(first, last + 1):
        # This round's finished batches are kept too: a round of the lookahead's schedule is an hour on a CPU.
        round_store = None if stores is None else BatchStore(
            stores["round"], {"fit": identity, "a": a.tolist(), "b": b.tolist()})
        if round_store is not None:
            started -= round_store.seconds  # its kept batches' time, lost with the interrupted run
        gen = generation_sums(model, head, windows, a, b, seed=seed, progress=progress, lookahead_top=top,
                              store=round_store, **settings)
        generated += int(gen[..., 0].sum())  # steps of rows still running (EOS ends a row early)
        tf = human_sums(chunks, torch.stack([a, b], -1)[:, None], prompts)  # per prompt: standard errors
        bins = _bin_report(gen, tf, a, b, bin_size, max_new_tokens)
        gap, stderr = torch.tensor(bins["gap"]), torch.tensor(bins["gap_stderr"])
        history.append({"round": round_, "a": a.tolist(), "b": b.tolist(), "multiplier": multiplier,
                        "gap": bins["gap"], "gap_stderr": bins["gap_stderr"], **bins["summary"]})
        if progress:
            tqdm.write(f"round {round_}: max |gap| {float(gap.abs().max()):.4f}, max |gap| / s.e. "
                       f"{float((gap.abs() / stderr).max()):.2f}, log loss {bins['summary']['log_loss']:.4f}")
        if within_error(gap, stderr).all():
            converged = True
            break
        count = gen[..., 0].sum(0).clamp(min=1)
        gen_means = {"entropy": gen[..., 1].sum(0) / count, "dh_da": gen[..., 2].sum(0) / count,
                     "dh_db": gen[..., 3].sum(0) / count}
        # A fixed F weight leaves only the a_j to match: the per-step temperature update, b carried along.
        update = match_update(a, b, gen_means, human, use_future=kind != "none" and f_weight is None,
                              multipliers=multipliers,
                              measured_slope=_measured_slope(history, seed_slope))
        # A bin that needs more entropy at the floor of a and would stay there, b unchanged, cannot be matched by
        # more rounds: F at its weight removes more entropy than a can give back (seen with a fixed F weight).
        # Stop and say so. (Where b moves, the next round may still get there.)
        floor = (~within_error(gap, stderr) & (gap < 0) & (a <= MIN_A) & (update["a"] <= MIN_A)
                 & (update["b"] == b))
        if floor.any():
            stuck = ", ".join(f"bin {j} ({gap[j]:+.3f} ± {stderr[j]:.3f})" for j in floor.nonzero()[:, 0].tolist())
            unreachable = (f"{stuck} needs more entropy than the smallest a, {MIN_A}, gives"
                           + (f": F's weight {f_weight:g} removes more than the temperature part can restore"
                              if f_weight is not None else ""))
            break
        if checkpoint is not None:  # the next schedule to measure: a rerun with more rounds starts there
            write_atomic(checkpoint, json.dumps({"identity": identity, "a": update["a"].tolist(),
                                                 "b": update["b"].tolist(), "multiplier": update["multiplier"],
                                                 "history": history, "generated_tokens": generated,
                                                 "seconds": time.perf_counter() - started}) + "\n")
            round_store.remove()  # the checkpoint holds the round now
        if round_ == last:
            break  # the result stays the schedule that was measured, never an unmeasured update
        a, b, multiplier = update["a"], update["b"], update["multiplier"]
    report = {"converged": converged, "unreachable": unreachable, "rounds": len(history),
              "seconds": time.perf_counter() - started,
              "generated_tokens": generated, "f_weight": f_weight,
              "multiplier": multiplier, "num_windows": len(windows), "seed": seed,
              "start_slope": None if seed_slope is None else [x if math.isfinite(x) else None
                                                              for x in seed_slope.tolist()],
              "log_loss_base": base_loss, **bins["summary"],
              "bins": bins["rows"], "history": history}
    return {"objective": "entropy", **schedule_calibration(a, b, max_new_tokens, bin_size), "future": record,
            "report": report}


def store_paths(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """The batch stores a fit keeps beside its ``checkpoint`` (``X.rounds.json``): the lookahead pass
    (``X.rounds.lookahead.safetensors``) and the round in progress (``X.rounds.round.safetensors``)."""
    path = Path(checkpoint)
    return {"lookahead": path.with_suffix(".lookahead.safetensors"), "round": path.with_suffix(".round.safetensors")}


def _first_weights(kind: str, num_bins: int, f_weight, start_a) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the first round, from ``start_a`` (default 1) and ``f_weight`` (default 0), checked."""
    if f_weight is not None:
        if kind == "none":
            raise ValueError(f"`f_weight` {f_weight!r} weights F, but the fit has none: give a head or the lookahead")
        if isinstance(f_weight, bool) or not isinstance(f_weight, (int, float)) or not 0 <= f_weight < math.inf:
            raise ValueError(f"`f_weight` must be a finite number of at least 0, but is {f_weight!r}")
    a = torch.ones(num_bins, dtype=torch.float64)
    if start_a is not None:
        a = _per_bin("start_a", start_a, num_bins, lambda x: MIN_A <= x < math.inf, f"each at least {MIN_A}")
    return a, torch.full((num_bins,), float(f_weight or 0.0), dtype=torch.float64)


def _per_bin(name: str, value, num_bins: int, accept: Callable[[float], bool], requirement: str) -> torch.Tensor:
    """``value`` as one float64 per bin, each real number passing ``accept``; else an error naming it."""
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else None
    if values is None or len(values) != num_bins or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and accept(x) for x in values):
        raise ValueError(f"`{name}` must be {num_bins} numbers (one per bin), {requirement}, but is {value!r}")
    return torch.tensor([float(x) for x in values], dtype=torch.float64)


def _start_slope(num_bins: int, start_slope) -> torch.Tensor | None:
    """``start_slope`` checked: each negative (a bin's entropy falls as its a_j rises) or NaN (unknown)."""
    return None if start_slope is None else _per_bin(
        "start_slope", start_slope, num_bins, lambda x: math.isnan(x) or -math.inf < x < 0, "each negative or NaN")


def _measured_slope(history: list[dict], start_slope: torch.Tensor | None) -> torch.Tensor | None:
    """The slope a round's step may steepen to: the fit's own secant, or before it has one (round 1), the
    start's. (Not part of the checkpoint's identity: it shapes round 1's step only, whose result the
    checkpoint keeps.)"""
    own = secant_slope(history)
    return start_slope if own is None else own


def secant_slope(history: list[dict]) -> torch.Tensor | None:
    """Per bin, (gap change) / (a change) across the last two measured rounds; NaN where a did not move
    or the gap moved the wrong way (noise), None before the second round."""
    if len(history) < 2:
        return None
    last, before = history[-1], history[-2]
    a1, a0 = torch.tensor(last["a"], dtype=torch.float64), torch.tensor(before["a"], dtype=torch.float64)
    g1, g0 = torch.tensor(last["gap"], dtype=torch.float64), torch.tensor(before["gap"], dtype=torch.float64)
    moved = (a1 - a0).abs() > 1e-4
    slope = (g1 - g0) / torch.where(moved, a1 - a0, torch.ones_like(a1))
    return torch.where(moved & (slope < 0), slope, torch.full_like(slope, math.nan))


def _read_checkpoint(path, identity: dict) -> dict | None:
    """The state of an interrupted fit with the same ``identity``, or None (no file yet). A checkpoint
    of another fit is refused rather than overwritten: it may be someone's hours of sampling."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint {path} is damaged ({error}); delete it to start the fit afresh") from None
    if not isinstance(state, dict) or state.get("identity") != json.loads(json.dumps(identity)):
        raise ValueError(f"checkpoint {path} belongs to another fit (other model, windows, F or settings); "
                         "delete it or choose another `--out`")
    return state


def _bin_report(gen: torch.Tensor, tf: dict, a: torch.Tensor, b: torch.Tensor, bin_size: int,
                max_new_tokens: int) -> dict:
    """Per-bin generation entropy, log loss, gap and its standard error over prompts (the gap of one
    prompt is its own bins' mean entropy minus mean log loss), as lists and report rows."""
    count = gen[..., 0]  # (P, bins)
    gen_entropy = gen[..., 1].sum(0) / count.sum(0).clamp(min=1)
    weight, loss_sum = tf["weight"][..., 0], tf["loss"][..., 0]  # (P, bins)
    log_loss = loss_sum.sum(0) / weight.sum(0).clamp(min=1e-300)
    gap = gen_entropy - log_loss
    per_prompt = gen[..., 1] / count.clamp(min=1) - loss_sum / weight.clamp(min=1e-300)
    seen = (count > 0).double()
    n = seen.sum(0)
    mean = (per_prompt * seen).sum(0) / n.clamp(min=1)
    var = (((per_prompt - mean) ** 2) * seen).sum(0) / (n - 1).clamp(min=1)
    stderr = torch.where(n > 1, (var / n.clamp(min=1)).sqrt(), torch.full_like(var, math.nan))
    rows = [{"bin": j, "first_step": j * bin_size, "last_step": min((j + 1) * bin_size, max_new_tokens) - 1,
             "a": float(a[j]), "b": float(b[j]), "gen_entropy": float(gen_entropy[j]), "log_loss": float(log_loss[j]),
             "gap": float(gap[j]), "gap_stderr": float(stderr[j]), "gen_steps": int(count[:, j].sum()),
             "human_tokens": int(weight[:, j].sum())} for j in range(len(gap))]
    total_gen = float(gen[..., 1].sum() / count.sum().clamp(min=1))
    total_loss = float(loss_sum.sum() / weight.sum())
    summary = {"gen_entropy": total_gen, "log_loss": total_loss, "entce": total_gen - total_loss,
               "max_abs_gap": float(gap.abs().max())}
    return {"rows": rows, "gap": gap.tolist(), "gap_stderr": stderr.tolist(), "summary": summary}
