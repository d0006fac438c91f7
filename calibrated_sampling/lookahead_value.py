"""Lookahead futures beyond one step: the state value after each candidate, and the exact two-step F.

Both are F sources for the lookahead's q (lookahead.py): over the top C candidates of p,

    q(v | x)  ∝  p(v | x) exp(-alpha_t F(x, v)),

the candidates sharing the mass p gives them and every other token keeping its p (``lookahead_logits``).
Their alpha is fitted to human log loss by :func:`.lookahead_fit.fit_lookahead_alpha` with ``source=``
(one convex dimension, with a standard error; :mod:`.lookahead_value_fit` resolves specs).

- **lookahead-value**: F_K(x, v) = H(p(. | x, v)) + V_{K-1}(h(x, v)), V the state-value head (value.py).
  The lookahead's one batched pass over the C candidates gives both the next-step logits and h(x, v),
  the input of the output embedding after v, so the value costs a small MLP on C hidden states per row.
  K is fixed for every step (``horizon``, default the value's ``max_horizon``); K = 1 is the one-step
  lookahead (V_0 = 0).
- **lookahead2**: F2(x, v) = H(p(. | x, v)) + E_{w ~ p(. | x, v)} H(p(. | x, v, w)), the expectation over the
  top C2 continuations w of each candidate with their p renormalised to sum to one: the remainder mass is
  given the top C2's mean next entropy, so F2 is exact when the top C2 hold all of p(. | x, v) (C2 = V),
  and otherwise leans towards the likely continuations (``covered`` keeps the mass they hold, (B, C)).
  The C x C2 second tokens go through the same KV cache, after the C candidates, in passes of at most
  ``chunk_tokens`` tokens; each sees the context, its own candidate and itself through a 4D mask.

Per-step weights: ``alpha`` may be a sequence, alpha_t for generation step t (0-based), the step counted
as the number of one-token extensions since the last context that was not one (a new prompt or batch
restarts at 0); a step past the end is an error.

Specs: ``lookahead-value:VALUE_DIR:alpha=X[:top=C][:horizon=K][:sha256=D][:temperature=T]`` (key: every
option, and D the digest of the value folder's files) and ``lookahead2:alpha=X[:top=C][:top2=C2][:temperature=T]``
(T divides the log q, as the one-step lookahead's does: the knob that reads it at EntCE = 0; spelled in a
key only where it is not 1); ``alpha=fit`` needs data
(:func:`.lookahead_value_fit.fit_spec_alpha`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from .calibrator import head_files_digest, head_identity
from .heads import CONFIG_NAME, WEIGHTS_NAME
from .lookahead import DEFAULT_TOP, LookaheadEntropy, LookaheadProcessor, LookaheadSampler
from .metrics import entropy, entropy_of_log_probs
from .samplers import ModelRequired, format_number, parse_number, register_sampler_kind, spec_options
from .value import StateValueHead

DEFAULT_TOP2 = 8  # lookahead2: C = C2 = 8 is 64 extra tokens per row and step
DEFAULT_CHUNK_TOKENS = 1024  # lookahead2: second tokens per batched pass (B * candidates * C2), bounds memory


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    return value


class ValueLookahead(LookaheadEntropy):
    """For a batch of contexts: the top-C candidates and F_K(x, v) = H(p(. | x, v)) + V_{K-1}(h(x, v)).

    Args:
        model (`PreTrainedModel`): the LM.
        value (`StateValueHead`): V, made for ``model`` (load it with ``StateValueHead.from_pretrained(dir, model)``).
        top (`int`): candidates C.
        horizon (`int`): K, the steps after v that F sums (1 <= K <= value's max_horizon + 1).
    """

    def __init__(self, model: PreTrainedModel, value: StateValueHead, top: int = DEFAULT_TOP,
                 horizon: int | None = None):
        super().__init__(model, top)
        horizon = value.config.max_horizon if horizon is None else horizon
        if _positive_int("horizon", horizon) > value.config.max_horizon + 1:  # beyond the labels' horizons
            raise ValueError(f"`horizon` must be at most the value head's max_horizon + 1 = "
                             f"{value.config.max_horizon + 1}, but is {horizon}")
        self.value, self.horizon = value, horizon

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L), logits (B, V), 2D mask (B, L) -> candidates (B, C) and F_K for each (B, C)."""
        candidates, after, hidden = self.candidate_pass(input_ids, logits, mask)  # (B, C), (B, C, V), (B, C, H)
        later = self.value(hidden, self.horizon - 1).float()  # (B, C)
        return candidates, (entropy(after) + later).to(logits.device)


class TwoStepLookahead(LookaheadEntropy):
    """For a batch of contexts: the top-C candidates and F2(x, v) (module docstring) over the top C2 of each.

    Args:
        model (`PreTrainedModel`): the LM.
        top (`int`): candidates C.
        top2 (`int`): continuations C2 of each candidate.
        chunk_tokens (`int`): second tokens per batched pass (memory: logits of chunk_tokens x V).
    """

    def __init__(self, model: PreTrainedModel, top: int = DEFAULT_TOP2, top2: int = DEFAULT_TOP2,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__(model, top)
        self.top2, self.chunk_tokens = _positive_int("top2", top2), _positive_int("chunk_tokens", chunk_tokens)
        self.covered: torch.Tensor | None = None  # (B, C) p-mass of the top C2 after each candidate, last call

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L), logits (B, V), 2D mask (B, L) -> candidates (B, C) and F2 for each (B, C)."""
        batch, length = input_ids.shape
        candidates, after, _ = self.candidate_pass(input_ids, logits, mask, keep=True)  # cache: context + C
        device = after.device
        try:
            logp = torch.log_softmax(after.float(), dim=-1)  # (B, C, V) log p(. | x, v)
            top2 = min(self.top2, logp.shape[-1])
            logp_w, second = logp.topk(top2, dim=-1)  # (B, C, C2)
            self.covered = logp_w.exp().sum(-1)  # (B, C)
            real = (torch.ones(batch, length, device=device) if mask is None else mask[:, :length].to(device)).bool()
            later = self._second_entropies(second, real)  # (B, C, C2)
            expected = (torch.softmax(logp_w, dim=-1) * later).sum(-1)  # (B, C): renormalised over the top C2
        finally:  # the cache holds the context only again, also after an error inside a second pass
            self.cache.crop(length - self.cache.get_seq_length())
        return candidates, (entropy_of_log_probs(logp) + expected).to(logits.device)

    def _second_entropies(self, second: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """H(p(. | x, v_j, w)) for the tokens ``second`` (B, C, C2) after candidate j, with the cache holding
        the context (real positions ``real``, (B, L)) and then the C candidates."""
        batch, top, top2 = second.shape
        length, device = real.shape[1], second.device
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        position = real.sum(-1, keepdim=True) + 1  # (B, 1): one past the candidates' position
        out = torch.empty(batch, top, top2)
        per_pass = max(1, self.chunk_tokens // (batch * top2))  # candidates whose continuations share a pass
        for first in range(0, top, per_pass):
            last = min(top, first + per_pass)
            n = (last - first) * top2
            parent = torch.arange(first, last, device=device).repeat_interleave(top2)  # (n,) candidate of each token
            # Second token i sees the context's real tokens, its own candidate (not the others) and itself.
            sees = torch.cat([real[:, None, :].expand(batch, n, length),
                              (parent[:, None] == torch.arange(top, device=device))[None].expand(batch, n, top),
                              torch.eye(n, dtype=torch.bool, device=device)[None].expand(batch, n, n)], dim=-1)
            additive = torch.where(sees, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]  # (B, 1, n, L + C + n)
            result = self._forward(input_ids=second[:, first:last].reshape(batch, n), attention_mask=additive,
                                   position_ids=position.expand(batch, n))
            self.cache.crop(-n)
            out[:, first:last] = entropy(result.logits).view(batch, last - first, top2).cpu()
        return out.to(device)


class FutureLookaheadProcessor(LookaheadProcessor):
    """q(v) ∝ p(v) exp(-alpha_t F(x, v)) over the top C of p, F from ``source``; the rest keep p.

    Args:
        source (`LookaheadEntropy`): the F source (:class:`ValueLookahead`, :class:`TwoStepLookahead`, or the
            plain next-step entropy).
        alpha (`float` or sequence of `float`): one weight, or alpha_t per generation step (module docstring).
        temperature (`float`, *optional*, defaults to 1): divides the log q (:class:`.LookaheadProcessor`).

    >>> processor = FutureLookaheadProcessor(TwoStepLookahead(model, top=4, top2=4), alpha=0.1)  # doctest: +SKIP
    >>> model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList([processor]))  # doctest: +SKIP
    """

    def __init__(self, source: LookaheadEntropy, alpha: float | Sequence[float], temperature: float = 1.0):
        if not isinstance(source, LookaheadEntropy):
            raise ValueError(f"`source` must be a LookaheadEntropy (an F over the top C), but is {source!r}")
        self.alphas = None if isinstance(alpha, (int, float)) else tuple(alpha)
        if self.alphas is not None and (not self.alphas or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in self.alphas)):
            raise ValueError(f"`alpha` must be a finite number or a non-empty sequence of them, but is {alpha!r}")
        super().__init__(source.model, alpha if self.alphas is None else self.alphas[0], source.top, temperature)
        self.lookahead = source
        self.step, self._last = 0, None  # generation step of the latest call, and its input_ids

    def _track(self, input_ids: torch.Tensor) -> int:
        last = self._last
        extends = (last is not None and input_ids.shape[0] == last.shape[0] and input_ids.shape[1] == last.shape[1] + 1
                   and torch.equal(input_ids[:, :-1], last))
        self.step = self.step + 1 if extends else 0
        self._last = input_ids
        return self.step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.alphas is not None:
            step = self._track(input_ids)
            if step >= len(self.alphas):
                raise ValueError(f"generation step {step} is past the {len(self.alphas)} per-step weights in `alpha`")
            self.alpha = float(self.alphas[step])
        return super().__call__(input_ids, scores)


# ----------------------------------------------------------------------------------------------------
# Specs: lookahead-value:VALUE_DIR:alpha=X[:top=C][:horizon=K][:sha256=D][:temperature=T],
# lookahead2:alpha=X[:top=C][:top2=C2][:temperature=T]

VALUE_OPTIONS = {"alpha": None, "top": DEFAULT_TOP, "horizon": None, "sha256": None, "temperature": 1.0}
TWO_STEP_OPTIONS = {"alpha": None, "top": DEFAULT_TOP2, "top2": DEFAULT_TOP2, "temperature": 1.0}
TWO_STEP_USAGE = "use lookahead2:alpha=X[:top=C][:top2=C2][:temperature=T]"


def parse_options(spec: str, defaults: dict) -> tuple[str, dict]:
    """(what is left of the spec after its kind, options) with the options read from the end, so a folder
    name may hold ``:``; ``alpha=fit`` is kept as "fit"."""
    rest, raw = spec_options(spec, defaults)
    options = dict(defaults)
    for name, text in raw.items():
        if name == "sha256":
            if not re.fullmatch(r"[0-9a-f]{16}", text):
                raise ValueError(f"sampler spec {spec!r}: `sha256` needs 16 hex digits, but is {text!r}")
            options[name] = text
        elif name == "alpha" and text == "fit":
            options[name] = "fit"
        else:
            options[name] = parse_number(spec, name, text, float if name in ("alpha", "temperature") else int)
            if name == "temperature" and options[name] <= 0:
                raise ValueError(f"sampler spec {spec!r}: `temperature` must be above 0, but is {text!r}")
            if name not in ("alpha", "temperature") and options[name] < 1:
                raise ValueError(f"sampler spec {spec!r}: `{name}` must be a positive integer, but is {text!r}")
    return rest, options


def _require_alpha(spec: str, options: dict) -> dict:
    if options["alpha"] is None:
        raise ValueError(f"sampler spec {spec!r} sets no alpha (alpha=X, or alpha=fit with data)")
    return options


def _refuse_fit(spec: str, options: dict) -> None:
    if options["alpha"] == "fit":
        raise ValueError(f"sampler spec {spec!r}: alpha=fit needs data; fit it with "
                         "calibrated_sampling.lookahead_value_fit.fit_spec_alpha and use alpha=X")


def parse_lookahead_value(spec: str) -> tuple[str, dict]:
    """(value folder, options) of a ``lookahead-value:VALUE_DIR:alpha=X[:top=C][:horizon=K][:sha256=D][:temperature=T]``
    spec."""
    folder, options = parse_options(spec, VALUE_OPTIONS)
    if not folder:
        raise ValueError(f"sampler spec {spec!r} names no value folder: use lookahead-value:VALUE_DIR:alpha=X")
    _refuse_tempered_fit(spec, options)
    return folder, _require_alpha(spec, options)


def value_options(spec: str) -> dict:
    """The options of a lookahead-value spec or key with its folder as ``folder``: the form
    :data:`.equal_entropy.TEMPERABLE` reads families from."""
    folder, options = parse_lookahead_value(spec)
    return {**options, "folder": folder}


def value_family_key(options: dict) -> str:
    """A lookahead-value method as :func:`value_options` reads it, its temperature spelled only where it is not 1;
    the value files' digest is left out, so a spec and its key (which pins the digest) name one method."""
    key = f"lookahead-value:{head_identity(options['folder'])}:alpha={format_number(options['alpha'])}:top={options['top']}"
    if options["horizon"] is not None:
        key += f":horizon={options['horizon']}"
    return key if options["temperature"] == 1 else f"{key}:temperature={format_number(options['temperature'])}"


def parse_lookahead2(spec: str) -> dict:
    """The options of a ``lookahead2:alpha=X[:top=C][:top2=C2][:temperature=T]`` spec."""
    rest, options = parse_options(spec, TWO_STEP_OPTIONS)
    if rest:
        term = rest.split(":")[-1]  # options are read from the end: the last one that is none
        raise ValueError(f"sampler spec {spec!r}: unknown term {term!r}; {TWO_STEP_USAGE}")
    _refuse_tempered_fit(spec, options)
    return _require_alpha(spec, options)


def _refuse_tempered_fit(spec: str, options: dict) -> None:
    if options["alpha"] == "fit" and options["temperature"] != 1:
        raise ValueError(f"sampler spec {spec!r}: alpha=fit fits alpha to human log loss with q itself, so it takes "
                         "no temperature: fit alpha first, then set alpha=X:temperature=T")


def two_step_key(options: dict) -> str:
    """The canonical key of parsed lookahead2 options; the temperature spelled out only where it is not 1 (the
    keys journaled before the option existed still name their measurements)."""
    key = f"lookahead2:alpha={format_number(options['alpha'])}:top={options['top']}:top2={options['top2']}"
    return key if options["temperature"] == 1 else f"{key}:temperature={format_number(options['temperature'])}"


def value_sampler(spec: str, model: PreTrainedModel | None) -> LookaheadSampler:
    """The sampler of a lookahead-value spec; its key spells out alpha, top, horizon and the folder digest."""
    folder, options = parse_lookahead_value(spec)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not Path(folder, name).is_file()]
    if missing:
        raise FileNotFoundError(f"sampler spec {spec!r}: value folder {folder} has no {' and no '.join(missing)}")
    digest = head_files_digest(folder)
    if options["sha256"] not in (None, digest):
        raise ValueError(f"sampler spec {spec!r} pins value files sha256 {options['sha256']}, but {folder} now "
                         f"holds {digest}: the value head was retrained or replaced since that key was made")
    _refuse_fit(spec, options)
    if model is None:
        raise ModelRequired(spec)
    source = ValueLookahead(model, StateValueHead.from_pretrained(folder, model), options["top"], options["horizon"])
    key = ":".join(["lookahead-value", head_identity(folder), f"alpha={format_number(options['alpha'])}",
                    f"top={options['top']}", f"horizon={source.horizon}", f"sha256={digest}"])
    if options["temperature"] != 1:  # keys journaled before the option existed still name their measurements
        key += f":temperature={format_number(options['temperature'])}"
    return _sampler(spec, source, options["alpha"], key, options["temperature"])


def two_step_sampler(spec: str, model: PreTrainedModel | None) -> LookaheadSampler:
    """The sampler of a lookahead2 spec; its key spells out alpha, top and top2 (and T where it is not 1)."""
    options = parse_lookahead2(spec)
    _refuse_fit(spec, options)
    if model is None:
        raise ModelRequired(spec)
    source = TwoStepLookahead(model, options["top"], options["top2"])
    return _sampler(spec, source, options["alpha"], two_step_key(options), options["temperature"])


def _sampler(spec: str, source: LookaheadEntropy, alpha: float, key: str, temperature: float = 1.0) -> LookaheadSampler:
    processor = FutureLookaheadProcessor(source, alpha, temperature)
    processor.key = key  # a bare processor list still names its q (samplers.processors_key)
    return LookaheadSampler(spec, LogitsProcessorList([processor]), truncating=False, key=key)


register_sampler_kind("lookahead-value", value_sampler)
register_sampler_kind("lookahead2", two_step_sampler)
