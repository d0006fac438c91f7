"""Judge any future-entropy F within contexts, against rollout labels made on held-out text.

A judge is a rollout label folder (labels.py) made on the eval side of the split: at each context x, the
human token and q's top candidates, each with m continuations of K steps driven by common random numbers.
Its target is the mean of the m summed entropies, an unbiased but noisy F_K(x, v). Two numbers say how
noisy: the split-half reliability (the within-context correlation of the means of two disjoint halves of
the rollouts, stepped up to m rollouts by Spearman-Brown, 2r / (1 + r)), and from it the **ceiling**, the
within-context correlation a perfect F (the true expectation) would reach against the noisy target,
sqrt(reliability). An F is scored on the judge's own rows:

- ``corr_within`` (and its share of the ceiling): the correlation of F and the target after both are
  demeaned within each context; it is what moves q within a context, free of F's scale;
- ``r2_within``: the same as a prediction (1 - SSE / SST after demeaning), meaningful only for an F that
  claims the judge's horizon (a head read at K, a state value of K - 1 steps);
- ``gap_share``: the human gap F predicts as a share of the measured one. The gap, F at the human token
  minus F's p-weighted mean over the context's candidates (p renormalised over them), is what the
  log-loss derivative of F's weight reads (docs/design.md, *Why the fit declines F*).

F is any ``lookahead-fit --source`` spec (its alpha is ignored): a head (read on the row's stored hidden
state at the judge's horizon, or at its fixed horizon) or a lookahead (run on the context rebuilt from the
folder's token ids, at exactly the judge's candidates).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .label_store import WINDOWS, load_labels, load_shard, read_manifest
from .lookahead_value import ValueLookahead, parse_lookahead_value
from .lookahead_value_fit import HeadCandidates, spec_source
from .train import regression_metrics

JUDGE_KEYS = ("hidden", "token", "horizon", "target", "context_id", "human", "step", "rollout_returns")


def load_judge(folder: str | os.PathLike, model: PreTrainedModel) -> dict:
    """The rows of a rollout label folder with the token ids of every context, refused unless the folder
    is complete rollout labels with at least two rollouts per candidate (a split half needs two)."""
    manifest = read_manifest(folder)
    settings = manifest["settings"]
    if settings["kind"] != "rollout":
        raise ValueError(f"`folder` must hold rollout labels, but {folder} holds {settings['kind']!r} labels")
    if settings["rollouts"] < 2:
        raise ValueError(f"`folder` {folder} has {settings['rollouts']} rollout per candidate: a judge needs at "
                         "least 2 for its split-half reliability")
    if not manifest["complete"]:
        raise ValueError(f"`folder` {folder} is incomplete ({len(manifest['shards'])} of {manifest['batches']} "
                         "shards): finish it with `calibrated-sampling label` first")
    labels = load_labels(folder, model=model, progress=False)
    rows = {key: labels[key] for key in JUDGE_KEYS}
    # windows.ids of every shard (its entry names its windows [first, end)): the prompt and the T human
    # tokens each context is cut from
    windows = {}
    for entry in manifest["shards"]:
        shard = load_shard(Path(folder) / entry["file"], entry["sha256"])
        for window, ids in zip(range(*entry["windows"]), shard[WINDOWS + "ids"]):
            windows[window] = ids[ids >= 0].tolist()
    return {"rows": rows, "windows": windows, "steps": settings["max_new_tokens"], "settings": settings,
            "folder": str(folder)}


def reliability(rows: dict) -> dict:
    """Split-half reliability of the judge's targets within contexts, and the ceiling sqrt(reliability)."""
    returns = rows["rollout_returns"].double()
    half = returns.shape[1] // 2
    first, second = returns[:, :half].mean(1), returns[:, half:2 * half].mean(1)
    r = regression_metrics(first, second, rows["context_id"])["corr_within"]
    stepped = 2 * r / (1 + r) if r > -1 else float("nan")
    return {"split_half_corr": r, "reliability": stepped, "ceiling": math.sqrt(stepped) if stepped > 0 else 0.0,
            "rollouts": returns.shape[1]}


def candidate_log_probs(model: PreTrainedModel, hidden: torch.Tensor, token: torch.Tensor,
                        chunk: int = 1024) -> torch.Tensor:
    """log p(token | context) from the context's final hidden state, in chunks (a full row is V floats)."""
    weight = model.get_output_embeddings().weight
    out = []
    for start in range(0, len(hidden), chunk):
        logits = hidden[start:start + chunk].to(weight.device, weight.dtype) @ weight.T
        out.append((logits.gather(1, token[start:start + chunk, None].to(weight.device))[:, 0]
                    - logits.logsumexp(-1)).cpu())
    return torch.cat(out).double()


def human_gaps(group: torch.Tensor, human_rows: torch.Tensor, values: torch.Tensor,
               log_p: torch.Tensor) -> torch.Tensor:
    """Per context (``group``: each row's context index): the value at the human token minus the p-weighted
    mean over the context's candidates, p renormalised over them."""
    n = int(group.max()) + 1
    weight = torch.exp(log_p - torch.zeros(n, dtype=log_p.dtype).scatter_reduce(0, group, log_p, "amax")[group])
    total = torch.zeros(n, dtype=weight.dtype).index_add_(0, group, weight)
    mean = torch.zeros(n, dtype=weight.dtype).index_add_(0, group, weight * values) / total
    human = torch.full((n,), math.nan, dtype=weight.dtype)
    human[group[human_rows]] = values[human_rows]
    return (human - mean)[~human.isnan()]


@torch.no_grad()
def source_values(spec: str, judge: dict, model: PreTrainedModel, progress: bool = True) -> torch.Tensor:
    """F (N,) float64 at every row of the judge, from a ``lookahead-fit --source`` spec."""
    rows = judge["rows"]
    source = spec_source(spec, model)
    if isinstance(source, HeadCandidates):  # the head on the stored hidden state: no LM pass
        head = source.head
        horizon = rows["horizon"] if source.horizon is None else torch.full_like(rows["horizon"], source.horizon)
        device = next(head.parameters()).device
        return head.predict_rows(rows["hidden"].to(device), rows["token"].to(device),
                                 head.horizon_for(horizon).to(device)).double().cpu()
    if isinstance(source, ValueLookahead) and parse_lookahead_value(spec)[1]["horizon"] is None:
        source.horizon = min(int(rows["horizon"][0]), source.value.config.max_horizon + 1)  # the judge's K
    values = torch.empty(len(rows["token"]), dtype=torch.float64)
    contexts, starts = torch.unique_consecutive(rows["context_id"], return_counts=True)
    first = 0
    vocab = model.get_output_embeddings().out_features
    for context, count in tqdm(list(zip(contexts.tolist(), starts.tolist())), desc=f"judge {spec}", unit="context",
                               disable=not progress):
        window, step = divmod(context, judge["steps"])
        ids = judge["windows"][window]
        prefix = torch.tensor([ids[:len(ids) - judge["steps"] + step]], device=model.device)  # (1, L)
        candidates = rows["token"][first:first + count]
        human = rows["human"][first:first + count].bool()
        if not torch.equal(candidates[human], torch.tensor([ids[len(ids) - judge["steps"] + step]])):
            raise ValueError(f"judge {judge['folder']}: the human token of context {context} is not the one its "
                             "token ids hold at that step: the folder's ids and rows disagree")
        # Logits that make the judge's candidates q's top C, in row order: the lookahead runs on exactly them.
        logits = torch.full((1, vocab), -1e9)
        logits[0, candidates] = -torch.arange(count, dtype=logits.dtype)
        source.top = count
        chosen, f = source(prefix, logits)
        if not torch.equal(chosen[0].cpu(), candidates):
            raise RuntimeError(f"judge {spec}: the lookahead ran on other candidates than the judge's at context "
                               f"{context}")
        values[first:first + count] = f[0].double().cpu()
        first += count
    return values


def score(values: torch.Tensor, rows: dict, log_p: torch.Tensor, ceiling: float) -> dict:
    """corr_within (and its share of ``ceiling``), r2_within, and the human gap F predicts against the
    measured one, on the judge's rows."""
    metrics = regression_metrics(values, rows["target"], rows["context_id"])
    _, group = torch.unique(rows["context_id"], return_inverse=True)
    human = rows["human"].bool()
    measured = human_gaps(group, human, rows["target"].double(), log_p)
    predicted = human_gaps(group, human, values.double(), log_p)
    return {"corr_within": metrics["corr_within"], "share_of_ceiling": metrics["corr_within"] / ceiling,
            "r2_within": metrics["r2_within"], "gap_measured": measured.mean().item(),
            "gap_measured_stderr": (measured.std() / math.sqrt(len(measured))).item(),
            "gap_predicted": predicted.mean().item(), "gap_share": (predicted.mean() / measured.mean()).item(),
            "contexts": metrics["contexts_within"]}


def judge_sources(folder: str | os.PathLike, specs: list[str], model: PreTrainedModel,
                  progress: bool = True) -> dict:
    """The judge's reliability and ceiling, and every spec's scores on it (see the module docstring)."""
    judge = load_judge(folder, model)
    rows = judge["rows"]
    ceiling = reliability(rows)
    log_p = candidate_log_probs(model, rows["hidden"], rows["token"])
    scores = {spec: score(source_values(spec, judge, model, progress), rows, log_p, ceiling["ceiling"])
              for spec in specs}
    settings = judge["settings"]
    return {"folder": str(folder), "data": settings["data_spec"], "horizon": int(rows["horizon"].max()),
            "candidates": settings["candidates"] + 1, "contexts": len(torch.unique(rows["context_id"])),
            **ceiling, "sources": scores}
