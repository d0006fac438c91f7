"""The one-step lookahead baseline of Braverman et al. 2020 ("Calibration, Entropy Rates, and Memory in
Language Models", arXiv 1906.05664): q(v | x) ∝ p(v | x) exp(-alpha H(p(. | x, v))).

Exact over the top-C candidates of p: one extra forward pass of B * C tokens per step gives the
next-step entropy after each candidate. Tokens outside the top C keep their probability under p;
the candidates share the mass p gives them, re-weighted by exp(-alpha H). With C = V this is the
formula exactly.

The candidates attend to the context through a KV cache that this module keeps itself (one new
token per step), and to themselves only, through a 4D attention mask, so the C candidates of a
row cost one batched forward pass and no copy of the cache.

Spec: ``lookahead:alpha=X[:top=C]``; ``lookahead:fit[:top=C]`` is resolved by
:func:`fit_lookahead_alpha` (``compare`` does it on the fit split), since a fit needs data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .data import Window
from .metrics import entropy
from .samplers import Sampler

DEFAULT_TOP = 16


class LookaheadEntropy:
    """For a batch of contexts: the top-C candidates of p and the entropy H(p(. | x, v)) after each.

    Keeps a KV cache of the last contexts it saw; a context that extends them by one token costs a
    one-token forward pass, a prefix of them costs nothing, anything else a full pass.
    """

    def __init__(self, model: PreTrainedModel, top: int):
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"`top` must be a positive integer, but is {top!r}")
        self.model, self.top = model, top
        self.reset()

    def reset(self) -> None:
        self.cache: DynamicCache | None = None
        self.ids: torch.Tensor | None = None  # (B, L) the tokens the cache holds

    def _forward(self, **kwargs):
        return self.model(use_cache=True, cache=self.cache, **kwargs)

    def _sync(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Make the cache hold exactly ``input_ids`` (B, L) under the 2D padding ``mask`` (B, L)."""
        held = self.ids
        length = input_ids.shape[1]
        if held is not None and held.shape[0] == input_ids.shape[0]:
            if held.shape[1] >= length and torch.equal(held[:, :length], input_ids):
                if held.shape[1] > length:
                    self.cache.crop(length - held.shape[1])
                self.ids = input_ids
                return
            if held.shape[1] == length - 1 and torch.equal(held, input_ids[:, :-1]):
                position = mask.sum(-1, keepdim=True) - 1  # (B, 1) real tokens before the new one
                self._forward(input_ids=input_ids[:, -1:], attention_mask=mask, position_ids=position.clamp(min=0),
                              logits_to_keep=1)
                self.ids = input_ids
                return
        self.cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens, as generate() does
        self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        self.ids = input_ids

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L), logits (B, V) of q's input after them, 2D mask (B, L) (default: no padding)
        -> candidates (B, C) (the top C of ``logits``) and H(p(. | x, v)) for each, (B, C) float32."""
        batch, length = input_ids.shape
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if mask is None else mask[:, :length].to(device)
        self._sync(input_ids, mask)
        top = min(self.top, logits.shape[-1])
        candidates = logits.topk(top, dim=-1).indices.to(device)  # (B, C)
        # Candidate j sees the real context tokens and itself, not the other candidates.
        visible = torch.cat([mask.bool()[:, None, :].expand(batch, top, length),
                             torch.eye(top, dtype=torch.bool, device=device).expand(batch, top, top)], dim=-1)
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        mask4 = torch.zeros(batch, 1, top, length + top, dtype=dtype, device=device)
        mask4.masked_fill_(~visible[:, None], torch.finfo(dtype).min)  # (B, 1, C, L + C) additive
        position = mask.sum(-1, keepdim=True).expand(batch, top)  # every candidate sits at the next position
        out = self._forward(input_ids=candidates, attention_mask=mask4, position_ids=position)
        self.cache.crop(-top)  # drop the candidates again: the cache holds the context only
        return candidates.to(logits.device), entropy(out.logits).to(logits.device)


def lookahead_logits(logp: torch.Tensor, candidates: torch.Tensor, next_entropy: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """log q from log p (B, V): the candidates' mass under p, shared in proportion to p(v) exp(-alpha H)."""
    logp_c = logp.gather(-1, candidates)  # (B, C)
    adjusted = logp_c - alpha * next_entropy
    adjusted = adjusted - adjusted.logsumexp(-1, keepdim=True) + logp_c.logsumexp(-1, keepdim=True)
    return logp.scatter(-1, candidates, adjusted)


class LookaheadProcessor(LogitsProcessor):
    """q(v) ∝ p(v) exp(-alpha H(p(. | x, v))) over the top ``top`` tokens of p; the rest keep p.

    Args:
        model (`PreTrainedModel`): the LM whose next-step entropies are looked up.
        alpha (`float`): weight of the next-step entropy (0 gives p; > 0 prefers tokens after which
            the model is more certain).
        top (`int`, *optional*, defaults to 16): number of candidates C (one forward pass of B * C tokens per step).

    >>> processor = LookaheadProcessor(model, alpha=0.1, top=8)  # doctest: +SKIP
    >>> model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList([processor]))  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, alpha: float, top: int = DEFAULT_TOP):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number, but is {alpha!r}")
        self.alpha = float(alpha)
        self.lookahead = LookaheadEntropy(model, top)
        self.mask: torch.Tensor | None = None  # the latest 2D padding mask seen by the model (set by the sampler)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        candidates, next_entropy = self.lookahead(input_ids, logp, self.mask)
        return lookahead_logits(logp, candidates, next_entropy, self.alpha)


class LookaheadSampler(Sampler):
    """A :class:`Sampler` whose ``attach`` watches the decoder's 2D attention mask (left padding)."""

    @contextlib.contextmanager
    def attach(self, model: PreTrainedModel) -> Iterator[LookaheadSampler]:
        processor: LookaheadProcessor = self.processors[0]
        busy = {"own": False}

        def watch(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if not busy["own"] and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                processor.mask = mask

        own_forward = processor.lookahead._forward

        def flagged(**kwargs):  # the lookahead's own passes must not overwrite the watched mask
            busy["own"] = True
            try:
                return own_forward(**kwargs)
            finally:
                busy["own"] = False

        processor.lookahead._forward = flagged
        handle = model.get_decoder().register_forward_pre_hook(watch, with_kwargs=True)
        processor.lookahead.reset()
        try:
            yield self
        finally:
            handle.remove()
            processor.lookahead._forward = own_forward
            processor.lookahead.reset()
            processor.mask = None


def parse_lookahead(spec: str) -> dict:
    """``lookahead:alpha=X[:top=C]`` or ``lookahead:fit[:top=C]`` -> {"alpha": float | "fit", "top": int}."""
    options = {"alpha": None, "top": DEFAULT_TOP}
    for term in spec.split(":")[1:]:
        name, sep, raw = term.partition("=")
        if name == "fit" and not sep:
            options["alpha"] = "fit"
        elif name in ("alpha", "top") and sep:
            try:
                options[name] = float(raw) if name == "alpha" else int(raw)
            except ValueError:
                raise ValueError(f"sampler spec {spec!r}: `{name}` needs a number, but is {raw!r}") from None
        else:
            raise ValueError(f"sampler spec {spec!r}: unknown term {term!r}; use lookahead:alpha=X[:top=C] "
                             "or lookahead:fit[:top=C]")
    if options["alpha"] is None:
        raise ValueError(f"sampler spec {spec!r} sets no alpha: use lookahead:alpha=X[:top=C] or lookahead:fit")
    return options


def lookahead_sampler(spec: str, model: PreTrainedModel | None) -> LookaheadSampler:
    """Build the sampler of a ``lookahead:alpha=X[:top=C]`` spec (registered in ``SAMPLER_KINDS``)."""
    options = parse_lookahead(spec)
    if options["alpha"] == "fit":
        raise ValueError(f"sampler spec {spec!r}: alpha=fit needs data; `calibrated-sampling compare` fits it "
                         "(or call calibrated_sampling.lookahead.fit_lookahead_alpha and use lookahead:alpha=X)")
    if model is None:
        raise ValueError(f"sampler spec {spec!r} needs the model (parse_sampler(spec, model))")
    processor = LookaheadProcessor(model, options["alpha"], options["top"])
    return LookaheadSampler(spec, LogitsProcessorList([processor]), truncating=False)


# --- fitting alpha: minimise human log loss, a 1-D convex problem ----------------------------------

class _Recorder(LookaheadSampler):
    """alpha = 0 (q = p) while recording, per teacher-forced step, log p and H of the candidates."""

    def __init__(self, model: PreTrainedModel, top: int):
        super().__init__("lookahead:alpha=0", LogitsProcessorList([LookaheadProcessor(model, 0.0, top)]))
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def teacher_forced_logits(self, input_ids, base_logits, hidden, step):
        processor: LookaheadProcessor = self.processors[0]
        logp = torch.log_softmax(base_logits.float(), dim=-1)
        candidates, next_entropy = processor.lookahead(input_ids, logp, processor.mask)
        self.steps.append((logp, candidates, next_entropy))
        return logp


def lookahead_loss_terms(model: PreTrainedModel, tokenizer, windows: list[Window], top: int = DEFAULT_TOP,
                         batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Everything the human log loss of q_alpha depends on, for every continuation token of ``windows``:
    log p of the C candidates (N, C), their next-step entropies (N, C), the human token's index among
    them (N,) (-1 when outside the top C) and log p of the human token (N,)."""
    from .measure import teacher_forced

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts: dict[str, list[torch.Tensor]] = {"logp": [], "entropy": [], "index": [], "logp_human": []}
    recorder = _Recorder(model, top)
    with recorder.attach(model):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            recorder.steps.clear()
            teacher_forced(model, recorder, batch, pad_id)
            for t, (logp, candidates, next_entropy) in enumerate(recorder.steps):
                human = torch.tensor([w.continuation_ids[t] for w in batch], device=logp.device)
                hit = candidates == human[:, None]  # (B, C)
                parts["logp"].append(logp.gather(-1, candidates).cpu())
                parts["entropy"].append(next_entropy.cpu())
                parts["index"].append(torch.where(hit.any(-1), hit.float().argmax(-1), -1).cpu())
                parts["logp_human"].append(logp.gather(-1, human[:, None]).squeeze(-1).cpu())
    return {k: torch.cat(v).double() if k != "index" else torch.cat(v) for k, v in parts.items()}


def lookahead_log_loss(terms: dict[str, torch.Tensor], alpha: float) -> tuple[float, float, float]:
    """(mean human log loss of q_alpha, its first and second derivative in alpha), from the cached terms."""
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
    n = len(loss)
    gradient = (ent.gather(-1, index).squeeze(-1) - mean_h).sum().item() / n
    return loss.mean().item(), gradient, var_h.sum().item() / n


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
            "tokens": len(terms["index"]), "in_top_fraction": (terms["index"] >= 0).float().mean().item()}


def fit_lookahead_alpha(model: PreTrainedModel, tokenizer, windows: list[Window], top: int = DEFAULT_TOP,
                        batch_size: int = 8) -> dict:
    """Fit alpha on ``windows`` (use the fit split): returns {"alpha", "log_loss", "log_loss_alpha0", ...}."""
    result = fit_alpha(lookahead_loss_terms(model, tokenizer, windows, top, batch_size))
    result["top"] = top
    return result
