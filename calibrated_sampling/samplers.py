"""Sampler specs -> the logits processors that turn the model's p into the sampled q.

A spec is ``base`` or ``name=value`` terms joined by ``+`` (applied left to right, as in
``generate()``): ``temperature=0.9``, ``top_p=0.95``, ``top_k=50``, ``min_p=0.1``,
``typical_p=0.9``, ``eta=0.0009``, ``epsilon=0.0003``, ``temperature=0.9+top_p=0.95``.
All of them are transformers' own warpers; nothing is re-implemented here. Other kinds are
``kind:ARG`` specs from ``SAMPLER_KINDS``: ``calibrated:HEAD_DIR[:scale=S]`` samples from a fitted
future-entropy calibration (calibrator.py); ``lookahead:alpha=X[:top=C]`` is the one-step
lookahead baseline of Braverman et al. 2020 (lookahead.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# name -> (parser of the value, warper factory, truncates?)
WARPERS: dict[str, tuple[Callable[[str], float], Callable[[float], LogitsProcessor], bool]] = {
    "temperature": (float, TemperatureLogitsWarper, False),
    "top_p": (float, TopPLogitsWarper, True),
    "top_k": (int, TopKLogitsWarper, True),
    "min_p": (float, MinPLogitsWarper, True),
    "typical_p": (float, TypicalLogitsWarper, True),
    "eta": (float, EtaLogitsWarper, True),
    "epsilon": (float, EpsilonLogitsWarper, True),
}
# Extra sampler kinds (``kind:ARG``) register a builder here: spec, model -> Sampler.
SAMPLER_KINDS: dict[str, Callable[[str, PreTrainedModel | None], Sampler]] = {}


def _calibrated_sampler(spec: str, model: PreTrainedModel | None) -> Sampler:
    """``calibrated:HEAD_DIR[:scale=S]``: a FutureEntropyCalibrator (imported here: calibrator imports this module)."""
    from .calibrator import calibrated_sampler

    return calibrated_sampler(spec, model)


SAMPLER_KINDS["calibrated"] = _calibrated_sampler


def _lookahead_sampler(spec: str, model: PreTrainedModel | None) -> Sampler:
    """``lookahead:alpha=X[:top=C]``: Braverman et al.'s one-step lookahead (lookahead.py imports this module)."""
    from .lookahead import lookahead_sampler

    return lookahead_sampler(spec, model)


SAMPLER_KINDS["lookahead"] = _lookahead_sampler


@dataclass
class Sampler:
    """What ``measure`` needs to know about one way of sampling.

    ``processors`` turn base logits into q's logits; ``truncating`` says whether q can give a
    token probability zero (then human log loss may be infinite). ``attach`` is a context manager
    for samplers that hook into the model (the calibrator reads hidden states); plain warpers need none.
    """

    spec: str
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    truncating: bool = False

    @contextlib.contextmanager
    def attach(self, model: PreTrainedModel) -> Iterator[Sampler]:
        yield self

    def teacher_forced_logits(self, input_ids: torch.Tensor, base_logits: torch.Tensor,
                              hidden: torch.Tensor, step: int) -> torch.Tensor:
        """q's logits at generation step ``step`` (0-based) of a teacher-forced pass.

        input_ids: (B, L) the context so far; base_logits: (B, V) the model's logits after it;
        hidden: (B, H) the input of the output embedding there (used by samplers that read it).
        """
        return self.processors(input_ids, base_logits)


def parse_sampler(spec: str, model: PreTrainedModel | None = None) -> Sampler:
    """Build a :class:`Sampler` from a spec string (see the module docstring)."""
    spec = spec.strip()
    if spec == "base":
        return Sampler(spec)
    kind = spec.split(":", 1)[0]
    if ":" in spec and kind in SAMPLER_KINDS:
        return SAMPLER_KINDS[kind](spec, model)
    processors, truncating = LogitsProcessorList(), False
    for term in spec.split("+"):
        name, sep, raw = term.partition("=")
        name = name.strip()
        if not sep or name not in WARPERS:
            known = ", ".join(["base", *(f"{n}=X" for n in WARPERS), *(f"{k}:..." for k in SAMPLER_KINDS)])
            raise ValueError(f"unknown sampler spec {spec!r} (term {term!r}); known: {known}, joined with '+'")
        parse, factory, truncates = WARPERS[name]
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"sampler spec {spec!r}: `{name}` needs a {parse.__name__}, but is {raw!r}") from None
        try:
            processors.append(factory(value))
        except ValueError as error:
            raise ValueError(f"sampler spec {spec!r}: {error}") from None
        truncating = truncating or truncates
    return Sampler(spec, processors, truncating)


def split_specs(specs: str) -> list[str]:
    """Split a comma-separated list of sampler specs (``base,temperature=0.9,top_p=0.95``)."""
    parts = [s.strip() for s in specs.split(",") if s.strip()]
    if not parts:
        raise ValueError(f"`samplers` must name at least one sampler, but is {specs!r}")
    return parts
