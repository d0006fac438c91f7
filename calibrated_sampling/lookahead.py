"""The one-step lookahead baseline of Braverman et al. 2020 ("Calibration, Entropy Rates, and Memory in
Language Models", arXiv 1906.05664): q(v | x) ∝ p(v | x) exp(-alpha H(p(. | x, v))).

Exact over the top-C candidates of p: one extra forward pass of B * C tokens per step gives the
next-step entropy after each candidate. Tokens outside the top C keep their probability under p;
the candidates share the mass p gives them, re-weighted by exp(-alpha H). With C = V this is the
formula exactly.

The candidates attend to the context through a KV cache that this module keeps itself (one new
token per step), and to themselves only, through a 4D attention mask, so the C candidates of a
row cost one batched forward pass and no copy of the cache.

The same pass also yields the hidden state after each candidate, h(x, v) (``candidate_pass``), and can
leave the candidates in the cache for a pass further ahead: lookahead_value.py builds on both.

Spec: ``lookahead:alpha=X[:top=C][:temperature=T]``; ``temperature`` divides log q by T afterwards (one
knob that moves the lookahead to EntCE = 0, as temperature moves p there, so the two can be compared at
equal entropy); ``lookahead:fit[:top=C]`` is resolved by
:func:`.lookahead_fit.fit_lookahead_alpha` (``compare`` does it on the fit split), since a fit needs
data; fitting lives in the training layer, above the measurement pass it drives.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .data import left_padded_positions
from .metrics import entropy
from .samplers import ModelRequired, Sampler, format_number, parse_number, register_sampler_kind

DEFAULT_TOP = 16


class LookaheadEntropy:
    """For a batch of contexts: the top-C candidates of p and the entropy H(p(. | x, v)) after each.

    Keeps a KV cache of the last contexts it saw; a context that extends them by one token costs a
    one-token forward pass, a prefix of them costs nothing, anything else a full pass.
    """

    def __init__(self, model: PreTrainedModel, top: int):
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"`top` must be a positive integer, but is {top!r}")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and top > vocab:  # else torch.topk fails mid-generation: "selected index k out of range"
            raise ValueError(f"`top` {top} is more candidates than the model's vocabulary has ({vocab})")
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
        self._forward(input_ids=input_ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                      logits_to_keep=1)
        self.ids = input_ids

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L), logits (B, V) of q's input after them, 2D mask (B, L) (default: no padding)
        -> candidates (B, C) (the top C of ``logits``) and H(p(. | x, v)) for each, (B, C) float32."""
        candidates, after, _ = self.candidate_pass(input_ids, logits, mask)
        return candidates, entropy(after).to(logits.device)

    @torch.no_grad()
    def candidate_pass(self, input_ids: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None,
                       keep: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pass behind :meth:`__call__`: candidates (B, C) on ``logits``' device, and on the model's
        device the LM's logits after each candidate (B, C, V) and the input of its output embedding there,
        h(x, v) (B, C, H). ``keep``: leave the candidates in the cache (after the context) for a pass that
        looks further ahead; the caller crops them (``self.cache.crop(-C)``)."""
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
        hidden: list[torch.Tensor] = []  # the model's outputs carry no final hidden state: hook the output embedding
        handle = self.model.get_output_embeddings().register_forward_hook(lambda m, args, out: hidden.append(args[0]))
        try:
            out = self._forward(input_ids=candidates, attention_mask=mask4, position_ids=position)
        finally:
            handle.remove()
        if not keep:
            self.cache.crop(-top)  # drop the candidates again: the cache holds the context only
        return candidates.to(logits.device), out.logits, hidden[-1]


def lookahead_logits(logp: torch.Tensor, candidates: torch.Tensor, next_entropy: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """log q from log p (B, V): the candidates' mass under p, shared in proportion to p(v) exp(-alpha H)."""
    logp_c = logp.gather(-1, candidates)  # (B, C)
    adjusted = logp_c - alpha * next_entropy
    adjusted = adjusted - adjusted.logsumexp(-1, keepdim=True) + logp_c.logsumexp(-1, keepdim=True)
    return logp.scatter(-1, candidates, adjusted)


class LookaheadProcessor(LogitsProcessor):
    """q(v) ∝ p(v) exp(-alpha H(p(. | x, v))) over the top ``top`` tokens of p, the rest keeping p; then, with
    ``temperature`` T, q^(1/T) renormalised.

    Args:
        model (`PreTrainedModel`): the LM whose next-step entropies are looked up.
        alpha (`float`): weight of the next-step entropy (0 gives p; > 0 prefers tokens after which
            the model is more certain).
        top (`int`, *optional*, defaults to 16): number of candidates C (one forward pass of B * C tokens per step).
        temperature (`float`, *optional*, defaults to 1): applied to the lookahead's q (the candidates are
            still the top C of p, and their entropies those of p).

    >>> processor = LookaheadProcessor(model, alpha=0.1, top=8)  # doctest: +SKIP
    >>> model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList([processor]))  # doctest: +SKIP
    """

    def __init__(self, model: PreTrainedModel, alpha: float, top: int = DEFAULT_TOP, temperature: float = 1.0):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"`alpha` must be a finite number, but is {alpha!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"`temperature` must be a finite number above 0, but is {temperature!r}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.lookahead = LookaheadEntropy(model, top)
        self.mask: torch.Tensor | None = None  # the latest 2D padding mask seen by the model (set by the sampler)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        size = self.lookahead.model.get_output_embeddings().weight.shape[0]
        if scores.shape[-1] != size:  # candidates of another vocabulary would index the wrong tokens
            raise ValueError(f"`scores` has {scores.shape[-1]} columns, but the lookahead's model has a vocabulary "
                             f"of {size} tokens: the scores come from another model or vocabulary")
        logp = torch.log_softmax(scores.float(), dim=-1)
        candidates, next_entropy = self.lookahead(input_ids, logp, self.mask)
        log_q = lookahead_logits(logp, candidates, next_entropy, self.alpha)
        return log_q if self.temperature == 1 else log_q / self.temperature


class LookaheadSampler(Sampler):
    """A :class:`Sampler` whose ``attach`` watches the decoder's 2D attention mask (left padding)."""

    hooks_model: ClassVar[bool] = True

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
    """``lookahead:alpha=X[:top=C][:temperature=T]`` or ``lookahead:fit[:top=C]`` -> {"alpha": float | "fit",
    "top": int, "temperature": float}."""
    options = {"alpha": None, "top": DEFAULT_TOP, "temperature": 1.0}
    usage = "use lookahead:alpha=X[:top=C][:temperature=T] or lookahead:fit[:top=C]"
    for term in spec.split(":")[1:]:
        name, sep, raw = term.partition("=")
        if (name == "fit" and not sep) or (name == "alpha" and raw.strip() == "fit"):  # as the other F specs spell it
            options["alpha"] = "fit"
        elif name in options and sep:
            options[name] = parse_number(spec, name, raw, int if name == "top" else float)
        else:
            raise ValueError(f"sampler spec {spec!r}: unknown term {term!r}; {usage}")
    if options["alpha"] is None:
        raise ValueError(f"sampler spec {spec!r} sets no alpha: {usage}")
    if options["top"] < 1:
        raise ValueError(f"sampler spec {spec!r}: `top` must be a positive integer, but is {options['top']!r}")
    if options["temperature"] <= 0:
        raise ValueError(f"sampler spec {spec!r}: `temperature` must be above 0, but is {options['temperature']!r}")
    if options["alpha"] == "fit" and options["temperature"] != 1:
        raise ValueError(f"sampler spec {spec!r}: alpha=fit fits alpha to human log loss with q itself, so it takes "
                         "no temperature: fit alpha first, then set lookahead:alpha=X:temperature=T")
    return options


def lookahead_key(options: dict) -> str:
    """The canonical key of parsed lookahead options. The temperature is spelled out only where it is not 1, so
    that the keys of measurements journaled before the option existed still name them."""
    key = f"lookahead:alpha={format_number(options['alpha'])}:top={options['top']}"
    return key if options["temperature"] == 1 else f"{key}:temperature={format_number(options['temperature'])}"


def lookahead_sampler(spec: str, model: PreTrainedModel | None) -> LookaheadSampler:
    """Build the sampler of a ``lookahead:alpha=X[:top=C][:temperature=T]`` spec; its key spells out alpha and
    top, and the temperature where it is not 1 (``lookahead:alpha=0.1:top=16``, ``...:top=16:temperature=0.92``)."""
    options = parse_lookahead(spec)
    if options["alpha"] == "fit":
        raise ValueError(f"sampler spec {spec!r}: alpha=fit needs data; `calibrated-sampling compare` fits it "
                         "(or call calibrated_sampling.fit_lookahead_alpha and use lookahead:alpha=X)")
    if model is None:
        raise ModelRequired(spec)
    processor = LookaheadProcessor(model, options["alpha"], options["top"], options["temperature"])
    processor.key = lookahead_key(options)
    return LookaheadSampler(spec, LogitsProcessorList([processor]), truncating=False, key=processor.key)


register_sampler_kind("lookahead", lookahead_sampler)
