"""One measurement pass: human log loss of q (teacher forced) and the entropy of q along its own samples.

The generation entropy is read from the very logits that are sampled: a recording processor sits
last in ``generate()``'s processor list, so no second scoring pass is needed and the recorded
distribution is exactly q (after temperature, truncation, calibration, ...).

Data parallel: when ``torch.distributed`` is initialised (``accelerate launch``, ``torchrun``), batch i
runs on process i % world_size and the raw per-batch tensors are gathered to every process and put
back in batch order. Each batch is seeded by its index, so the result equals a one-process run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .batch_store import BatchStore, kept_or_run
from .data import Window, batch_windows, left_padded_positions
from .metrics import (
    distinct_n,
    entce,
    entropy,
    entropy_of_log_probs,
    masked_mean_per_step,
    seq_rep_n,
    smooth_log_loss,
    token_log_loss,
)
from .models import eos_token_ids, pad_token_id
from .samplers import Sampler, resolve_samplers

CHUNK_LOGITS = 2**23  # logits (B x steps x V floats) computed at once by the teacher-forced pass: 32 MB
# (small enough that the passes over a chunk stay in cache: 2**26 made the pass 25% slower on a CPU)


class EntropyRecorder(LogitsProcessor):
    """Records H(q) of every row at every step, and which rows are still running; returns scores unchanged."""

    def __init__(self, prompt_length: int, eos_token_ids: list[int]):
        self.prompt_length = prompt_length
        self.eos = torch.tensor(eos_token_ids or [-1])
        self.entropies: list[torch.Tensor] = []
        self.running: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        finished = torch.isin(generated, self.eos.to(generated.device)).any(-1)
        self.running.append((~finished).cpu())
        self.entropies.append(entropy(scores).cpu())
        return scores


@dataclass
class GenerationRecord:
    sequences: torch.Tensor  # (B, T) generated ids (pad after EOS, and past an early stop of all rows)
    entropy: torch.Tensor  # (B, T) H(q) at each step, float32
    running: torch.Tensor  # (B, T) bool: the row had not emitted EOS before this step
    hidden: torch.Tensor | None  # (B, T, H) input of the output embedding that produced step t


def generate_with_entropy(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_processor: LogitsProcessorList | None = None,
    max_new_tokens: int = 256,
    capture_hidden: bool = False,
    seed: int | None = None,
    stop_at_eos: bool = True,
    cache=None,
) -> GenerationRecord:
    """Sample ``max_new_tokens`` from q = ``logits_processor`` applied to the model, recording H(q).

    prompt_ids, attention_mask: (B, P), left padded. The generation config is replaced by a plain
    sampling one, so q is exactly the given processors (no default top-k or temperature sneaks in).
    ``cache``: a KV cache of the first P - 1 prompt positions (from :func:`teacher_forced`), which
    saves the prompt's second forward pass.
    """
    if seed is not None:
        torch.manual_seed(seed)
    recorder = EntropyRecorder(prompt_ids.shape[1], eos_token_ids(model))
    hidden: list[torch.Tensor] = []
    handle = None
    if capture_hidden:
        # LogitsProcessor.__call__ sees no hidden states; the output embedding's input is the way.
        handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: hidden.append(args[0][:, -1, :].detach()))
    config = GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, min_new_tokens=0 if stop_at_eos else max_new_tokens,
        top_k=0, top_p=1.0, temperature=1.0, num_beams=1,
        pad_token_id=model.generation_config.pad_token_id, eos_token_id=model.generation_config.eos_token_id,
    )
    try:
        with torch.no_grad():
            extra = {} if cache is None else {"cache": cache}
            out = model.generate(input_ids=prompt_ids, attention_mask=attention_mask, generation_config=config, **extra,
                                 logits_processor=LogitsProcessorList([*(logits_processor or []), recorder]))
    finally:
        if handle is not None:
            handle.remove()
    steps = len(recorder.entropies)
    batch = prompt_ids.shape[0]
    sequences = torch.full((batch, max_new_tokens), config.pad_token_id if config.pad_token_id is not None else 0)
    sequences[:, :steps] = out[:, prompt_ids.shape[1]:].cpu()
    ent = torch.zeros(batch, max_new_tokens)
    running = torch.zeros(batch, max_new_tokens, dtype=torch.bool)
    if steps:
        ent[:, :steps] = torch.stack(recorder.entropies, 1)
        running[:, :steps] = torch.stack(recorder.running, 1)
    states = torch.stack(hidden[:steps], 1) if capture_hidden and steps else None
    return GenerationRecord(sequences, ent, running, states)


def _prompt_cache(cache, prompt_length: int):
    """Cut a KV cache of prompt + continuation back to the first ``prompt_length - 1`` positions, so that
    generate() runs only the last prompt token; None where the cache type cannot be cut (sliding windows)."""
    try:
        cache.crop(-(cache.get_seq_length() - (prompt_length - 1)))
    except (AttributeError, RuntimeError, ValueError):
        return None
    return cache


def teacher_forced(model: PreTrainedModel, sampler: Sampler, windows: list[Window], pad_id: int,
                   keep_prompt_cache: bool = False) -> dict:
    """Per-token -log q(human token), smoothed log loss, truncation and H(q) along the human text.

    With ``keep_prompt_cache``, ``out["cache"]`` holds the KV cache of the prompts for generation.
    """
    steps = len(windows[0].continuation_ids)
    if any(len(w.continuation_ids) != steps for w in windows):
        raise ValueError("all windows in a batch need continuations of the same length")
    ids, mask = batch_windows(windows, pad_id, with_continuation=True)
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        decoded = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                                      use_cache=keep_prompt_cache)
        hidden = decoded.last_hidden_state  # (B, L, H): the input of the output embedding
        start = ids.shape[1] - steps  # index of the first continuation token
        head = model.get_output_embeddings()
        out = {k: torch.zeros(len(windows), steps) for k in ("log_loss", "smoothed", "entropy")}
        out["truncated"] = torch.zeros(len(windows), steps, dtype=torch.bool)
        # The output embedding over several steps at once: one (B * chunk, H) x (H, V) product reads the
        # V x H matrix once per chunk instead of once per step (on a CPU that read is the step's cost).
        chunk = max(1, CHUNK_LOGITS // (len(windows) * head.out_features))
        for first in range(0, steps, chunk):
            last = min(first + chunk, steps)
            base_chunk = head(hidden[:, start + first - 1:start + last - 1]).float()  # (B, n, V)
            targets = ids[:, start + first:start + last].to(base_chunk.device)  # (B, n); the head may sit elsewhere
            if sampler.rowwise:  # q depends on each row's logits alone: all n steps in one call
                batch, n, vocab = base_chunk.shape
                rows = base_chunk.reshape(batch * n, vocab)
                q = sampler.processors(ids.new_zeros(batch * n, 1), rows).float().reshape(batch, n, vocab)
            else:
                q = torch.stack([sampler.teacher_forced_logits(ids[:, :start + t], base_chunk[:, t - first],
                                                               hidden[:, start + t - 1], t).float()
                                 for t in range(first, last)], 1)  # (B, n, V)
            log_q = torch.log_softmax(q, dim=-1)  # once: log loss and entropy both read it
            loss = -log_q.gather(-1, targets[..., None]).squeeze(-1)  # (B, n)
            out["log_loss"][:, first:last] = loss.cpu()
            out["truncated"][:, first:last] = torch.isinf(loss).cpu()
            # q = p for a sampler without processors: its smoothed loss is its loss (one pass saved)
            base_loss = loss if not sampler.processors else token_log_loss(base_chunk, targets)
            out["smoothed"][:, first:last] = smooth_log_loss(loss, base_loss).cpu()
            out["entropy"][:, first:last] = entropy_of_log_probs(log_q).cpu()
            del base_chunk, q, log_q
    if keep_prompt_cache:
        out["cache"] = _prompt_cache(getattr(decoded, "cache", None) or decoded.past_key_values, start)
    return out


def _rounded(values: torch.Tensor) -> list[float]:
    """6 significant digits (inf stays inf): per-prompt lists keep results.json and the journal small."""
    return [float(f"{v:.6g}") for v in values.tolist()]


def _summarise(spec: str, sampler: Sampler, forced: dict, gen: dict, eos_ids: list[int]) -> dict:
    """The summary of one sampler from its teacher-forced (``forced``) and generated (``gen``) tensors."""
    log_loss, running, gen_ent = forced["log_loss"], gen["running"], gen["entropy"]
    mean_loss = log_loss.double().mean().item()
    mean_smoothed = forced["smoothed"].double().mean().item()
    mean_gen = (gen_ent.double() * running).sum().item() / max(running.sum().item(), 1)
    finite = math.isfinite(mean_loss)
    # Truncating samplers have infinite log loss; their EntCE uses the (labelled) smoothed value.
    reference = mean_loss if finite else mean_smoothed
    # Per prompt (rows in window order): paired differences between samplers on the same prompts and seed.
    prompt_gen = (gen_ent.double() * running).sum(1) / running.sum(1).clamp(min=1)
    prompt_loss, prompt_smoothed = log_loss.double().mean(1), forced["smoothed"].double().mean(1)
    per_prompt = prompt_gen - (prompt_loss if finite else prompt_smoothed)
    texts = []
    for row, run in zip(gen["sequences"].tolist(), running.tolist()):
        texts.append([tok for tok, r in zip(row, run) if r and tok not in eos_ids])
    ll_curve, ll_count = masked_mean_per_step(log_loss, torch.ones_like(running))
    sm_curve, _ = masked_mean_per_step(forced["smoothed"], torch.ones_like(running))
    ent_curve, ent_count = masked_mean_per_step(gen_ent, running)
    return {
        "log_loss": mean_loss,
        "log_loss_smoothed": mean_smoothed,
        "truncated_fraction": forced["truncated"].float().mean().item(),
        "truncating": sampler.truncating,
        "human_entropy": forced["entropy"].double().mean().item(),
        "gen_entropy": mean_gen,
        "entce": entce(mean_gen, reference),
        "entce_uses_smoothed": not finite,
        "entce_stderr": (per_prompt.std().item() / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan"),
        "eos_fraction": 1.0 - running[:, -1].float().mean().item(),
        "distinct_2": distinct_n(texts, 2),
        "seq_rep_4": seq_rep_n(texts, 4),
        "per_step": {"log_loss": ll_curve, "log_loss_smoothed": sm_curve, "gen_entropy": ent_curve,
                     "count": ent_count, "log_loss_count": ll_count},
        "per_prompt": {"log_loss": _rounded(prompt_loss), "log_loss_smoothed": _rounded(prompt_smoothed),
                       "gen_entropy": _rounded(prompt_gen), "entce": _rounded(per_prompt)},
        "samples": texts,
    }


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_batches(parts: list[tuple[int, dict, dict]], world: int) -> list[tuple[int, dict, dict]]:
    """Every process's (batch index, teacher-forced part, generated part) triples, on every process, in batch order.

    The parts are CPU tensors; ``all_gather_object`` pickles them (gloo on CPU, nccl on GPU).
    """
    if world == 1:
        return parts
    gathered: list[list | None] = [None] * world
    dist.all_gather_object(gathered, parts)
    return sorted((part for rank_parts in gathered for part in rank_parts), key=lambda part: part[0])


def measure(
    model: PreTrainedModel,
    tokenizer,
    windows: list[Window],
    samplers: list[str | Sampler],
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    stop_at_eos: bool = True,
    store_for: Callable[[Sampler], BatchStore | None] | None = None,
) -> dict[str, dict]:
    """Measure every sampler on the same prompts: log loss of q on the human continuations and
    entropy of q along its own samples (``len(continuation)`` new tokens per prompt).

    Under an initialised ``torch.distributed`` group every process must call this with the same
    windows and settings; each runs its share of the batches and all of them return the full result,
    equal to a one-process run (the progress bar shows process 0's share).

    ``store_for(sampler)``: where that sampler's finished batches are kept (a :class:`BatchStore` of its
    own) or None; batches found there are not run again (each batch's seed is its index, so they are
    what a rerun would give), and their time counts in ``seconds``. A 128-prompt x 512-token measurement
    of the lookahead is hours on a CPU: an interruption then costs one batch.

    Returns ``{spec: summary}`` with the keys of ``results.json`` (see the README), plus
    ``samples`` (the generated token ids, cut at EOS) and ``seconds`` (the batches' time).
    """
    if not windows:
        raise ValueError("`windows` is empty: nothing to measure")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, but is {batch_size!r}")
    steps = len(windows[0].continuation_ids)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model)
    built = resolve_samplers(samplers, model, steps)  # every spec built and checked before anything runs
    results = {}
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    rank, world = _rank_and_world()
    mine = [index for index in range(len(batches)) if index % world == rank]  # this process's batches
    bar = tqdm(total=len(built) * sum(len(batches[i]) for i in mine) * steps, unit="tok",
               disable=not progress or rank != 0, desc="measure")
    for sampler in built:
        parts, seconds = [], 0.0
        store = None if store_for is None else store_for(sampler)
        with sampler.attach(model):
            for index in mine:
                batch = batches[index]
                bar.set_postfix_str(sampler.spec)
                kept = kept_or_run(store, index, _measure_batch, model, sampler, batch, pad_id, steps,
                                   seed * 100_003 + index, stop_at_eos)
                seconds += float(kept["seconds"])
                parts.append((index, {k[7:]: v for k, v in kept.items() if k.startswith("forced.")},
                              {k[4:]: v for k, v in kept.items() if k.startswith("gen.")}))
                bar.update(len(batch) * steps)
        parts = _gather_batches(parts, world)
        forced = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        gen = {k: torch.cat([p[2][k] for p in parts]) for k in parts[0][2]}
        results[sampler.spec] = _summarise(sampler.spec, sampler, forced, gen, eos_ids)
        results[sampler.spec]["seconds"] = seconds  # this process's batches, stored ones at the time they took
    bar.close()
    return results


def _measure_batch(model, sampler: Sampler, batch: list[Window], pad_id: int, steps: int, seed: int,
                   stop_at_eos: bool) -> dict[str, torch.Tensor]:
    """One batch of :func:`measure`: its teacher-forced tensors (``forced.*``) and its generation's (``gen.*``),
    on the CPU."""
    forced = teacher_forced(model, sampler, batch, pad_id, keep_prompt_cache=True)
    ids, mask = batch_windows(batch, pad_id, with_continuation=False)
    # One seed per batch: a sampler's samples do not depend on which samplers ran before
    # (nor on which process ran the batch).
    record = generate_with_entropy(model, ids.to(model.device), mask.to(model.device), sampler.processors,
                                   steps, seed=seed, stop_at_eos=stop_at_eos, cache=forced["cache"])
    return {**{f"forced.{k}": v for k, v in forced.items() if k != "cache"},
            "gen.sequences": record.sequences, "gen.entropy": record.entropy, "gen.running": record.running}
