"""Regression labels for the future-entropy head: returns, rollout and teacher-forced, in safetensors shards.

A label row pairs a context x and a token v with a target: the summed full-distribution entropies of
q (the base model, or the model plus a ``LogitsProcessorList``) over the ``horizon`` steps after v.
Three kinds (docs/design.md, *Labels*):

- ``returns``: sample T tokens from q after each prompt; every step t of every sample is a row for the
  token q chose, with target sum_{t < s <= t + horizon} H_s along the same sample. Labelling rides on
  generation: the entropies and hidden states are read during ``generate()``, no extra forward pass.
- ``rollout``: at a few steps j of the human continuation, the candidates are the human token plus
  the top-``candidates`` other tokens of q; each gets ``rollouts`` continuations of ``horizon`` steps
  from one shared prefix KV cache, driven by common random numbers (below). Target = mean over the
  rollouts of the summed entropies, the step right after the candidate being the first.
- ``teacher-forced``: q's entropies along the human continuation (one forward pass); a row per step
  for the human token, with target the sum of the later entropies along the human text.

Conventions. Step t is 0-based: t = 0 is the first generated (or human continuation) token. The
horizon of a row is the number of later steps its target covers *if the sequence does not end*:
``min(horizon setting, T - 1 - t)`` for returns / teacher-forced, the rollout length for rollout. It is
a quantity the sampler knows at step t, never a function of the sample's future. When a sample emits
EOS (``stop_at_eos``), the generation is over and the steps after it contribute entropy 0: the target
sums the running steps only and is an unbiased sample of F_horizon(x, v) (the number of running later
steps of a returns row is ``min(horizon, samples.length[sample] - 1 - step)``). With
``stop_at_eos=False`` EOS is masked out of q before the processors, as ``generate(min_new_tokens=T)`` does.

Common random numbers (rollout). Continuations are sampled by Gumbel-max, argmax(scores + G), with
one noise tensor G of shape (rollouts, V) per step drawn from a generator seeded per prefix, and the
same G used for every candidate of that prefix: where two candidates' continuations see the same
distribution they pick the same token, so the differences between candidates' targets carry the
effect of the candidate rather than independent sampling noise. The prefix is prefilled once (all
rollout steps of a window share one incremental prefill), then its cache is copied and expanded with
``Cache.batch_repeat_interleave`` to (candidates + 1) * rollouts rows per prefix.

Storage (:mod:`label_store`). An output folder holds ``shard-00000.safetensors``, ... and
``manifest.json``, plus a rebuildable cache ``hidden-00000.safetensors``, ... of the hidden states. The
windows are cut into fixed batches of ``batch_size``; shard i holds batch i, whose seed is derived from
the global seed and i, so an interrupted run resumes with the missing shards and produces the same
bytes as an uninterrupted one. Files are written to a temporary name and renamed; the manifest
(settings, model and tokenizer fingerprints, counts, the sha256 of every shard) is rewritten after
each shard. Keys of a shard (N rows, S samples, W windows, T = max_new_tokens):

    token            (N,)    int64    the token v after x (sampled, candidate, or human)
    horizon          (N,)    int64    later steps summed into the target (see above)
    target           (N,)    float32  summed later entropies of q, nats
    context_id       (N,)    int64    window * T + step: rows with the same x share it (rollout candidates)
    context_entropy  (N,)    float32  H(q(. | x))
    step             (N,)    int64    generation step t of v (rollout: the human position j)
    sample_id        (N,)    int64    returns / teacher-forced: the sequence the row lies on (= its window)
    samples.id       (S,)    int64    returns / teacher-forced: id of each sequence (sample_id refers to it)
    samples.entropy  (S, T)  float32  H(q) at every step of the sequence (0 after EOS)
    samples.length   (S,)    int64    running steps of the sequence (through the EOS step)
    human            (N,)    bool     rollout: the candidate is the human token
    rollout_returns  (N, m)  float32  rollout: the summed entropies of each of the m rollouts
    windows.ids      (W, L)  int64    prompt + the T continuation tokens the rows lie on (sampled for
                                      returns, human otherwise), left-padded with -1: x of every row

and of its cache: ``hidden`` (N, H), float32 or bfloat16 (``hidden_dtype``), the input of the output
embedding at x. :func:`load_labels` returns the rows with ``hidden``.

"window" is the index of the window in the list given to :func:`make_labels`; one window gives one
sequence, so ids depend on nothing but the batch itself (shards can be made in any order, or by
several processes). Rows are ordered by window, then step (then candidate); ``(sample_id, step)``
finds a row, which is what :func:`bootstrapped_targets` uses to build n-step / TD(lambda) targets
from ``samples.entropy``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel

from .data import Window, batch_windows, cut_windows, left_padded_positions, split_of, windows_digest
from .files import write_atomic
from .label_store import (
    FORMAT,
    FORMAT_VERSION,
    HIDDEN_DTYPES,
    MANIFEST,
    SHARD_NAME,
    WINDOWS,
    load_shard,
    read_manifest,
    window_ids,
    write_hidden,
    write_manifest,
)
from .measure import generate_with_entropy
from .metrics import entropy
from .models import eos_token_ids, model_fingerprint, pad_token_id, tokenizer_fingerprint, weights_digest
from .samplers import processors_key

KINDS = ("returns", "rollout", "teacher-forced")


@dataclass(frozen=True)
class LabelSettings:
    """Everything that decides the content of a label folder (a resumed run must match it)."""

    kind: str  # "returns", "rollout" or "teacher-forced"
    max_new_tokens: int  # T: the generation length the labels refer to (steps 0..T-1)
    batch_size: int  # windows per batch; shard i holds batch i (rollout decodes batch * (C+1) * m rows)
    seed: int  # global seed; batch i uses derive_seed(seed, i)
    horizon: int | None = None  # rollout: steps per rollout (None: T - 1 - j); others: cap on the summed steps
    candidates: int | None = 8  # rollout: top tokens of q besides the human token
    rollouts: int | None = 4  # rollout: continuations per candidate (m)
    positions: int | None = 4  # rollout: prefixes per window, one drawn in each of `positions` strata of [0, T-1)
    stop_at_eos: bool = True  # False: EOS is masked out of q (every sequence runs T steps)
    hidden_dtype: str = "float32"  # storage dtype of `hidden`: float32 or bfloat16

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, but is {self.kind!r}")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, but is {self.seed!r}")
        if self.horizon is not None and (not isinstance(self.horizon, int) or self.horizon < 1):
            raise ValueError(f"`horizon` must be a positive integer or None, but is {self.horizon!r}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"`hidden_dtype` must be one of {sorted(HIDDEN_DTYPES)}, but is {self.hidden_dtype!r}")
        if self.kind != "rollout":  # settings that do not affect the labels are not recorded
            for name in ("candidates", "rollouts", "positions"):
                object.__setattr__(self, name, None)
            if self.kind == "teacher-forced":
                object.__setattr__(self, "stop_at_eos", None)
            return
        for name in ("candidates", "rollouts", "positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer for rollout labels, but is {value!r}")
        if self.max_new_tokens < 2 or self.positions > self.max_new_tokens - 1:
            raise ValueError(f"`positions` must be at most max_new_tokens - 1 = {self.max_new_tokens - 1} "
                             f"(rollout steps j lie in [0, T - 1)), but is {self.positions!r}")


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def derive_seed(*parts) -> int:
    """A stable 56-bit seed from any tuple of ints and strings (same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def gumbel_noise(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise: argmax(scores + noise) is a sample from softmax(scores) (``-inf`` never wins)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def rollout_steps(seed: int, max_new_tokens: int, positions: int) -> list[int]:
    """The steps j of a rollout batch: one uniform draw in each of ``positions`` equal strata of [0, T - 1),
    so that the horizons T - 1 - j of a run cover the whole range. Sorted and distinct."""
    generator = torch.Generator().manual_seed(seed)
    edges = [i * (max_new_tokens - 1) // positions for i in range(positions + 1)]
    return [lo + int(torch.randint(hi - lo, (1,), generator=generator)) for lo, hi in zip(edges, edges[1:])]


def _eos_tensor(model: PreTrainedModel) -> torch.Tensor:
    """The model's EOS ids on its device, for ``torch.isin`` (``[-1]``, which no token matches, when it has none)."""
    return torch.tensor(eos_token_ids(model) or [-1], device=model.device)


def next_scores(model: PreTrainedModel, hidden: torch.Tensor, input_ids: torch.Tensor,
                logits_processor: LogitsProcessorList | None, mask_eos: torch.Tensor | None = None) -> torch.Tensor:
    """q's scores after ``input_ids``, as generate() computes them: (B, 1, H) last states -> (B, V) float32.

    The output embedding is applied to the last state alone, so a processor that reads the hidden state
    through a forward hook on it (the calibrator) sees the state of this very step. ``mask_eos``: EOS ids
    to mask out before the processors (generate's min-new-tokens processor comes before user processors).
    """
    scores = model.get_output_embeddings()(hidden)[:, -1].float().to(input_ids.device)  # (B, V)
    if mask_eos is not None:
        scores = scores.index_fill(-1, mask_eos[mask_eos >= 0], float("-inf"))
    return logits_processor(input_ids, scores) if logits_processor else scores


def _later_sums(ent: torch.Tensor, horizon: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step t of (B, T) entropies: (sum of ent over steps t+1 .. t+h (float64), h) with
    h = min(horizon, T - 1 - t); steps with entropy 0 (after EOS) add nothing."""
    steps = ent.shape[1]
    cumulative = F.pad(ent.double().cumsum(1), (1, 0))  # (B, T + 1): [:, i] = sum of steps < i
    t = torch.arange(steps)
    last = (t + 1 + (steps if horizon is None else horizon)).clamp(max=steps)  # one past the last summed step
    return cumulative[:, last] - cumulative[:, t + 1], (last - t - 1).expand(ent.shape[0], steps)


def _sequence_rows(hidden: torch.Tensor, tokens: torch.Tensor, ent: torch.Tensor, running: torch.Tensor,
                   horizon: int | None) -> dict[str, torch.Tensor]:
    """Rows of returns / teacher-forced labels from (B, T, H) states, (B, T) tokens, entropies and running mask."""
    ent = ent * running  # (B, T): 0 after EOS
    target, steps_left = _later_sums(ent, horizon)
    b, t = running.nonzero(as_tuple=True)  # sample-major, steps ascending
    return {
        "hidden": hidden[b, t].float().cpu(),
        "token": tokens[b, t].long().cpu(),
        "horizon": steps_left[b, t].long(),
        "target": target[b, t].float(),
        "context_id": b * ent.shape[1] + t,
        "context_entropy": ent[b, t].float(),
        "step": t.long(),
        "sample_id": b.long(),
        "samples.id": torch.arange(ent.shape[0]),
        "samples.entropy": ent.float(),
        "samples.length": running.sum(1).long(),
    }


# ----------------------------------------------------------------------------------------------------
# The three kinds (one batch of windows each; ids start at 0, make_labels offsets them)


@torch.no_grad()
def returns_labels(model: PreTrainedModel, windows: Sequence[Window], *, max_new_tokens: int, seed: int,
                   pad_token_id: int, horizon: int | None = None,
                   logits_processor: LogitsProcessorList | None = None, stop_at_eos: bool = True) -> dict:
    """Sample ``max_new_tokens`` tokens from q after each prompt and label every running step.

    One ``generate_with_entropy`` call (left-padded batch, hidden states captured by a hook): rows and
    targets come from what generation recorded, with no further forward pass.
    """
    ids, mask = batch_windows(list(windows), pad_token_id, with_continuation=False)
    record = generate_with_entropy(model, ids.to(model.device), mask.to(model.device), logits_processor,
                                   max_new_tokens, capture_hidden=True, seed=seed, stop_at_eos=stop_at_eos)
    running = record.running.clone()  # (B, T)
    batch, steps = running.shape
    hidden = torch.zeros(batch, steps, model.get_output_embeddings().in_features)
    if record.hidden is not None:  # (B, steps run, H): generation stops early when every row ended
        hidden[:, :record.hidden.shape[1]] = record.hidden.float().cpu()
        running[:, record.hidden.shape[1]:] = False
    return _sequence_rows(hidden, record.sequences, record.entropy, running, horizon)


@torch.no_grad()
def teacher_forced_labels(model: PreTrainedModel, windows: Sequence[Window], *, max_new_tokens: int,
                          pad_token_id: int, horizon: int | None = None,
                          logits_processor: LogitsProcessorList | None = None) -> dict:
    """Entropies of q along the human continuations (one forward pass); a row per human token."""
    windows = cut_windows(windows, max_new_tokens)
    ids, mask = batch_windows(windows, pad_token_id, with_continuation=True)
    ids, mask = ids.to(model.device), mask.to(model.device)
    states = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                                 use_cache=False).last_hidden_state  # (B, L, H)
    start = ids.shape[1] - max_new_tokens  # index of the first continuation token
    ent = torch.stack([entropy(next_scores(model, states[:, start + t - 1:start + t], ids[:, :start + t],
                                           logits_processor)).cpu()
                       for t in range(max_new_tokens)], 1)  # (B, T)
    running = torch.ones_like(ent, dtype=torch.bool)
    return _sequence_rows(states[:, start - 1:-1].cpu(), ids[:, start:].cpu(), ent, running, horizon)


def _candidates(scores: torch.Tensor, human: torch.Tensor, count: int) -> torch.Tensor:
    """(B, V) scores, (B,) human tokens -> (B, count + 1): the human token, then q's top ``count`` others."""
    others = scores.scatter(-1, human[:, None], float("-inf")).topk(count, dim=-1).indices  # (B, count)
    return torch.cat([human[:, None], others], 1)


def _rollout_returns(model: PreTrainedModel, cache, context_ids: torch.Tensor, context_mask: torch.Tensor,
                     candidates: torch.Tensor, rollouts: int, horizon: int, seeds: list[int],
                     logits_processor: LogitsProcessorList | None, eos: torch.Tensor,
                     stop_at_eos: bool) -> torch.Tensor:
    """Summed entropies of ``rollouts`` continuations of ``horizon`` steps after every candidate.

    cache: the KV cache of the B contexts (consumed: expanded in place); context_ids, context_mask: (B, L);
    candidates: (B, C). Rows are ordered (prefix, candidate, rollout). Returns (B, C, m) float64.
    """
    batch, count = candidates.shape
    rows, vocab, device = batch * count * rollouts, model.get_output_embeddings().out_features, model.device
    cache.batch_repeat_interleave(count * rollouts)
    ids = context_ids.repeat_interleave(count * rollouts, 0)  # (rows, L)
    mask = context_mask.repeat_interleave(count * rollouts, 0)
    position = mask.sum(-1, keepdim=True)  # (rows, 1): position id of the candidate
    token = candidates.repeat_interleave(rollouts, 1).reshape(rows)  # (rows,)
    running = ~torch.isin(token, eos) if stop_at_eos else torch.ones(rows, dtype=torch.bool, device=device)
    totals = torch.zeros(rows, dtype=torch.float64, device=device)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    decoder, ones = model.get_decoder(), torch.ones(rows, 1, dtype=mask.dtype, device=device)
    for k in range(1, horizon + 1):
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, ones], 1)
        state = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                        use_cache=True).last_hidden_state  # (rows, 1, H)
        position = position + 1
        scores = next_scores(model, state, ids, logits_processor, None if stop_at_eos else eos)  # (rows, V)
        totals += torch.where(running, entropy(scores).double(), 0.0)
        if k == horizon or not running.any():
            break
        # Common random numbers: one (m, V) Gumbel draw per prefix and step, shared by all its candidates.
        noise = torch.stack([gumbel_noise(g, (rollouts, vocab), device) for g in generators])  # (B, m, V)
        noise = noise[:, None].expand(batch, count, rollouts, vocab).reshape(rows, vocab)
        token = (scores + noise).argmax(-1)
        if stop_at_eos:
            running &= ~torch.isin(token, eos)
    return totals.view(batch, count, rollouts)


@torch.no_grad()
def rollout_labels(model: PreTrainedModel, windows: Sequence[Window], *, max_new_tokens: int, seed: int,
                   pad_token_id: int, candidates: int = 8, rollouts: int = 4, positions: int = 4,
                   horizon: int | None = None, logits_processor: LogitsProcessorList | None = None,
                   stop_at_eos: bool = True) -> dict:
    """Rollout labels at ``positions`` steps j of every window (the same steps for the whole batch).

    Prefix = prompt + the first j human tokens. Candidates: the human token j and the top
    ``candidates`` other tokens of q. Each candidate gets ``rollouts`` continuations of ``horizon``
    steps (None: T - 1 - j), with the Gumbel noise of prefix (window, j) shared by all its candidates.
    """
    windows = cut_windows(windows, max_new_tokens)
    vocab = model.get_output_embeddings().out_features
    if candidates + 1 > vocab:
        raise ValueError(f"`candidates` + 1 must be at most the vocabulary size {vocab}, but is {candidates + 1}")
    ids, mask = batch_windows(windows, pad_token_id, with_continuation=True)
    ids, mask = ids.to(model.device), mask.to(model.device)
    position_ids = left_padded_positions(mask)
    start, eos = ids.shape[1] - max_new_tokens, _eos_tensor(model)
    steps = rollout_steps(derive_seed(seed, "positions"), max_new_tokens, positions)
    cache, done, parts = DynamicCache(config=model.config), 0, []
    for j in steps:  # ascending: the prefill of window tokens up to j extends the previous one
        end = start + j
        state = model.get_decoder()(input_ids=ids[:, done:end], attention_mask=mask[:, :end],
                                    position_ids=position_ids[:, done:end], cache=cache,
                                    use_cache=True).last_hidden_state[:, -1:]  # (B, 1, H)
        done = end
        scores = next_scores(model, state, ids[:, :end], logits_processor, None if stop_at_eos else eos)  # (B, V)
        tokens = _candidates(scores, ids[:, end], candidates)  # (B, C1)
        k = max_new_tokens - 1 - j if horizon is None else horizon
        seeds = [derive_seed(seed, "rollout", b, j) for b in range(len(windows))]
        sums = _rollout_returns(model, copy.deepcopy(cache), ids[:, :end], mask[:, :end], tokens, rollouts, k,
                                seeds, logits_processor, eos, stop_at_eos)  # (B, C1, m)
        c1 = tokens.shape[1]
        parts.append({
            "hidden": state.expand(-1, c1, -1).float().cpu(),
            "token": tokens.cpu(),
            "horizon": torch.full(tokens.shape, k),
            "target": sums.mean(-1).float().cpu(),
            "context_entropy": entropy(scores)[:, None].expand(-1, c1).cpu(),
            "step": torch.full(tokens.shape, j),
            "human": (torch.arange(c1) == 0).expand(len(windows), c1),
            "rollout_returns": sums.float().cpu(),
        })
    # (B, positions, C1, ...) -> rows ordered (window, step, candidate)
    rows = {key: torch.stack([p[key] for p in parts], 1).flatten(0, 2) for key in parts[0]}
    c1 = parts[0]["token"].shape[1]
    context = torch.arange(len(windows))[:, None] * max_new_tokens + torch.tensor(steps)  # (B, positions)
    rows["context_id"] = context.reshape(-1).repeat_interleave(c1)
    return rows


# ----------------------------------------------------------------------------------------------------
# TD targets


def bootstrapped_targets(labels: dict[str, torch.Tensor],
                         predict_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         n: int | None = None, lam: float = 1.0, chunk_size: int = 65536) -> torch.Tensor:
    """n-step / truncated TD(lambda) targets for returns (or teacher-forced) rows.

    For a row at step t of a sequence with horizon h, let L = min(h, running later steps) and
    G(k) = H_{t+1} + ... + H_{t+k} + V(row at step t+k, horizon h-k) for k < L (the bootstrap: the
    head's prediction for the token chosen k steps later), G(k) = the full return for k >= L. Then

        target = (1 - lam) * sum_{k=1}^{n'-1} lam^{k-1} G(k) + lam^{n'-1} G(n'),   n' = min(n, L)

    (``n=None``: no truncation). ``lam=1`` gives the n-step target, ``n=None, lam=1`` the Monte Carlo
    return (the stored target), ``lam=0`` the one-step TD target.

    Args:
        labels: rows with ``hidden``, ``token``, ``horizon``, ``step``, ``sample_id`` and the ``samples.*``
            keys (a shard, or :func:`load_labels`).
        predict_fn: ``(hidden (M, H) float32, token (M,), horizon (M,)) -> (M,)`` predicted future entropy.
            Called in chunks of ``chunk_size``, once per distinct (row, horizon) pair needed.
        n: bootstrap after at most n steps (a positive int), or None.
        lam: lambda in [0, 1].

    Returns:
        (N,) float32 targets.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` must be a positive integer or None, but is {n!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"`lam` must be in [0, 1], but is {lam!r}")
    missing = [k for k in ("hidden", "token", "horizon", "step", "sample_id", "samples.id", "samples.entropy",
                           "samples.length") if k not in labels]
    if missing:
        raise ValueError(f"bootstrapped targets need sequence labels (returns or teacher-forced); missing {missing}")
    order = labels["samples.id"].argsort()
    sample_ids = labels["samples.id"][order]
    where = torch.searchsorted(sample_ids, labels["sample_id"]).clamp(max=len(sample_ids) - 1)
    if not torch.equal(sample_ids[where], labels["sample_id"]):
        raise ValueError("some rows' `sample_id` is not in `samples.id`")
    sample = order[where]  # (N,) index into the samples.* tables
    step, horizon = labels["step"], labels["horizon"]
    ent = labels["samples.entropy"].double()  # (S, T)
    total_steps = ent.shape[1]
    cumulative = F.pad(ent.cumsum(1), (1, 0))  # (S, T + 1)
    row_of = torch.full(ent.shape, -1, dtype=torch.long)  # (S, T): row index at (sample, step)
    row_of[sample, step] = torch.arange(len(step))
    later = (labels["samples.length"][sample] - 1 - step).clamp(min=0)
    run = torch.minimum(horizon, later)  # L: later steps that carry reward
    depth = run if n is None else run.clamp(max=n)  # n'

    def weight(k: int) -> torch.Tensor:  # (N,) weight of G(k)
        tail = torch.where(depth == k, lam ** (depth - 1).clamp(min=0).double(), 0.0)
        return torch.where(k < depth, (1 - lam) * lam ** (k - 1), tail)

    # Pass 1: the (row, horizon) pairs whose value is needed, predicted once each.
    kmax = int(depth.max()) if len(depth) else 0
    queries = []
    for k in range(1, kmax + 1):
        need = (weight(k) > 0) & (k < run)
        rows = need.nonzero().squeeze(-1)
        queries.append(row_of[sample[rows], step[rows] + k] * (total_steps + 1) + horizon[rows] - k)
    keys = torch.unique(torch.cat(queries)) if queries else torch.zeros(0, dtype=torch.long)
    values = torch.zeros(len(keys), dtype=torch.float64)
    for lo in range(0, len(keys), chunk_size):
        part = keys[lo:lo + chunk_size]
        rows, h = part // (total_steps + 1), part % (total_steps + 1)
        with torch.no_grad():
            values[lo:lo + chunk_size] = predict_fn(labels["hidden"][rows].float(), labels["token"][rows], h).double().cpu()
    # Pass 2: mix the k-step returns.
    target = torch.zeros(len(step), dtype=torch.float64)
    for k in range(1, kmax + 1):
        w = weight(k)
        active = (w > 0).nonzero().squeeze(-1)
        s, t, kk = sample[active], step[active], torch.minimum(run[active], torch.tensor(k))
        k_step_return = cumulative[s, t + 1 + kk] - cumulative[s, t + 1]  # G(k) before its bootstrap
        boot = (k < run[active]).nonzero().squeeze(-1)
        key = row_of[s[boot], t[boot] + k] * (total_steps + 1) + horizon[active][boot] - k
        k_step_return[boot] += values[torch.searchsorted(keys, key)]
        target[active] += w[active] * k_step_return
    return target.float()


# ----------------------------------------------------------------------------------------------------
# Storage


def _open_folder(directory: Path, record: dict, batches: int) -> dict:
    """A new manifest, or the resumed one after checking that it was made with the same settings."""
    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory)
        old = {k: v for k, v in manifest["settings"].items() if k != "data_spec"}
        new = {k: v for k, v in record.items() if k != "data_spec"}
        if old != new:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
            raise ValueError(f"{directory} holds labels made with other settings ({diff}); "
                             "use a new output folder, or the same settings to resume")
        for entry in manifest["shards"]:  # never build on a damaged shard
            load_shard(directory / entry["file"], entry["sha256"])
        return manifest
    if directory.exists() and any(p for p in directory.iterdir() if not p.name.endswith(".tmp")):
        raise ValueError(f"output folder {directory} is not empty and holds no {MANIFEST}; use a new folder")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "settings": record, "batches": batches,
                "complete": False, "counts": {"rows": 0, "contexts": 0, "samples": 0}, "shards": []}
    write_manifest(directory, manifest)
    return manifest


def _label_batch(model, windows, settings: LabelSettings, seed: int, logits_processor, pad_token_id) -> dict:
    common = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad_token_id,
              "horizon": settings.horizon, "logits_processor": logits_processor}
    if settings.kind == "returns":
        return returns_labels(model, windows, seed=seed, stop_at_eos=settings.stop_at_eos, **common)
    if settings.kind == "teacher-forced":
        return teacher_forced_labels(model, windows, **common)
    return rollout_labels(model, windows, seed=seed, candidates=settings.candidates, rollouts=settings.rollouts,
                          positions=settings.positions, stop_at_eos=settings.stop_at_eos, **common)


def _warn_eval_windows(windows: Sequence[Window]) -> None:
    hashed = [w for w in windows if len(w.doc_key) == 40 and all(c in "0123456789abcdef" for c in w.doc_key)]
    held_out = sum(split_of(w.doc_key) == "eval" for w in hashed)  # windows built by hand have other keys
    if held_out:
        warnings.warn(f"{held_out} of {len(windows)} windows come from the 'eval' side of the split; labels "
                      "for training a head should use make_windows(..., split='fit')", stacklevel=3)


def _windows_sha256(windows: Sequence[Window], settings: LabelSettings) -> str:
    """The digest of what the labels read of the windows: the prompts and their first T human tokens
    (rollout, teacher-forced; too short a continuation is an error here, before any work), or the
    prompts alone (returns, which sample their own continuations)."""
    if settings.kind == "returns":
        return windows_digest([dataclasses.replace(w, continuation_ids=()) for w in windows])
    return windows_digest(cut_windows(windows, settings.max_new_tokens))


def _run_rows(rows: dict[str, torch.Tensor], batch: Sequence[Window], index: int, settings: LabelSettings,
              pad_id: int) -> dict[str, torch.Tensor]:
    """A batch's rows as stored in its shard: ids counted over the whole run (window * T + step, not
    within the batch), plus the token ids of the sequences they lie on (``windows.ids``)."""
    steps, first_window = settings.max_new_tokens, index * settings.batch_size
    if settings.kind == "returns":  # the sampled continuations, read back from the rows (pad after EOS)
        continuations = torch.full((len(batch), steps), pad_id, dtype=torch.long)
        continuations[rows["sample_id"], rows["step"]] = rows["token"]
    else:
        continuations = torch.tensor([w.continuation_ids[:steps] for w in batch], dtype=torch.long)
    rows[WINDOWS + "ids"] = window_ids([w.prompt_ids for w in batch], continuations)
    rows["context_id"] = rows["context_id"] + first_window * steps
    for key in ("sample_id", "samples.id"):
        if key in rows:
            rows[key] = rows[key] + first_window
    return rows


def _write_shard(directory: Path, manifest: dict, settings: LabelSettings, index: int, rows: dict[str, torch.Tensor],
                 hidden: torch.Tensor) -> None:
    """Write shard ``index`` and its hidden-state cache, then record the shard in the manifest (rewritten)."""
    data = save_safetensors({k: v.contiguous() for k, v in rows.items()},
                            metadata={"labels": f"{settings.kind} batch {index}"})  # one key: multi-key order varies
    name = SHARD_NAME.format(index)
    digest = hashlib.sha256(data).hexdigest()
    write_hidden(directory, index, hidden, digest)  # the cache first: a shard is never without one here
    write_atomic(directory / name, data)
    first_window = index * settings.batch_size
    manifest["shards"].append({
        "file": name, "sha256": digest, "batch": index,
        "windows": [first_window, first_window + len(rows[WINDOWS + "ids"])], "rows": len(rows["token"]),
        "contexts": int(rows["context_id"].unique().numel()), "samples": len(rows.get("samples.id", ())),
    })
    manifest["shards"].sort(key=lambda entry: entry["batch"])
    manifest["counts"] = {key: sum(entry[key] for entry in manifest["shards"]) for key in ("rows", "contexts", "samples")}
    manifest["complete"] = len(manifest["shards"]) == manifest["batches"]
    write_manifest(directory, manifest)


def make_labels(
    model: PreTrainedModel,
    tokenizer,
    windows: Sequence[Window],
    kind: str,
    out_dir: str | os.PathLike,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    candidates: int = 8,
    rollouts: int = 4,
    positions: int = 4,
    horizon: int | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stop_at_eos: bool = True,
    hidden_dtype: str = "float32",
    data_spec: str = "",
    progress: bool = True,
) -> dict:
    """Label ``windows`` into ``out_dir`` (safetensors shards + manifest.json), resuming a partial run.

    Args:
        model, tokenizer: the LM (eval mode) and its tokenizer (for the pad id and the fingerprint).
            Samplers that hook into the model (the calibrator) must be attached by the caller.
        windows: prompts with human continuations, normally ``make_windows(..., split="fit")``.
        kind: ``returns``, ``rollout`` or ``teacher-forced`` (module docstring).
        out_dir: the label folder; an existing one is resumed if its settings match, else an error.
        max_new_tokens: T, the generation length the labels refer to (default: the shortest
            continuation of ``windows``). rollout and teacher-forced read T human tokens per window.
        batch_size: windows per batch and shard. rollout decodes batch_size * (candidates + 1) *
            rollouts rows at once (each with a KV cache of prompt + T tokens): keep it small on a CPU.
        seed: global seed; batch i is seeded from (seed, i), so shards do not depend on each other.
        candidates, rollouts, positions: rollout only (see :class:`LabelSettings`).
        horizon: rollout: steps per rollout (None: the rest of the generation, T - 1 - j); returns and
            teacher-forced: at most this many later steps per target (None: to the end).
        logits_processor: turns the model's logits into q (None: q = the model).
        stop_at_eos: a sequence ends at EOS (later steps count 0); False masks EOS out of q.
        hidden_dtype: ``float32`` or ``bfloat16`` (half the disk) for the stored hidden states.
        data_spec: where the windows came from, recorded in the manifest.
        progress: show a tqdm bar.

    Returns:
        The manifest (also in ``out_dir/manifest.json``).
    """
    windows = list(windows)
    if not windows:
        raise ValueError("`windows` is empty: nothing to label")
    if max_new_tokens is None:
        max_new_tokens = min(len(w.continuation_ids) for w in windows)
    settings = LabelSettings(kind=kind, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             horizon=horizon, candidates=candidates, rollouts=rollouts, positions=positions,
                             stop_at_eos=stop_at_eos, hidden_dtype=hidden_dtype)
    # 1. Check what can be checked before any work: the human text is long enough, the split, the pad id.
    windows_sha256 = _windows_sha256(windows, settings)
    _warn_eval_windows(windows)
    pad_id = pad_token_id(tokenizer)
    # 2. A new folder, or the resumed one after checking that its labels were made the same way.
    record = {
        **dataclasses.asdict(settings),
        "q": processors_key(logits_processor),  # the sampler's key (samplers.py)
        "model": {**model_fingerprint(model), "weights": weights_digest(model)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "windows": len(windows),
        "windows_sha256": windows_sha256,
        "data_spec": data_spec,
    }
    directory = Path(out_dir)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    manifest = _open_folder(directory, record, len(batches))
    # 3. Label every batch that has no shard yet; each shard is written, then recorded in the manifest.
    done = {entry["batch"] for entry in manifest["shards"]}
    bar = tqdm(total=len(windows), initial=sum(len(batches[i]) for i in done), unit="window",
               desc=f"labels ({kind})", disable=not progress)
    for index in (i for i in range(len(batches)) if i not in done):
        rows = _label_batch(model, batches[index], settings, derive_seed(seed, index), logits_processor, pad_id)
        hidden = rows.pop("hidden").to(HIDDEN_DTYPES[hidden_dtype])
        rows = _run_rows(rows, batches[index], index, settings, pad_id)
        _write_shard(directory, manifest, settings, index, rows, hidden)
        bar.update(len(batches[index]))
        bar.set_postfix(rows=manifest["counts"]["rows"])
    bar.close()
    return manifest
