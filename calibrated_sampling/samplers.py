"""Sampler specs -> the logits processors that turn the model's p into the sampled q, and the one
identity of each sampler, its key.

Specs. A spec is ``base`` or ``name=value`` terms joined by ``+`` (applied left to right, as in
``generate()``): ``temperature=0.9``, ``top_p=0.95``, ``top_k=50``, ``min_p=0.1``,
``typical_p=0.9``, ``eta=0.0009``, ``epsilon=0.0003``, ``temperature=0.9+top_p=0.95``.
All of them are transformers' own warpers; nothing is re-implemented here. Values must be finite.
Other kinds are ``kind:ARG`` specs of a registered kind: ``calibrated:HEAD_DIR[:scale=S]`` samples
from a fitted future-entropy calibration, ``calibrated:HEAD_DIR:alpha=X[:temperature=T]`` from a one-horizon
head's F at a fixed weight (calibrator.py); ``lookahead:alpha=X[:top=C]`` is the
one-step lookahead baseline of Braverman et al. 2020 (lookahead.py); ``lookahead-value:VALUE_DIR:alpha=X``
and ``lookahead2:alpha=X`` look further ahead (lookahead_value.py).

Keys. ``parse_sampler(spec, model).key`` names exactly what is sampled, and journals, label
manifests (``q``) and report families all derive from it: the terms of the spec without blanks,
numbers in their shortest exact form (``0.90`` -> ``0.9``, ``2.0`` -> ``2``), every option of a kind
spelled out with its default, and for a calibrated head a digest of its files::

    temperature=0.9                  temperature=0.9+top_p=0.95          base
    lookahead:alpha=0.1:top=16       calibrated:heads/x:scale=1:fused=auto:past=error:sha256=4f933044e7a60ce3

A key is a spec itself: ``parse_sampler(key, model).key == key``. A spec already in this form is
its own key, so journals written before keys existed still resume for such warper specs.

Registering a kind. A module adds ``kind:ARG`` specs by registering a builder when it is imported
(``calibrated_sampling/__init__.py`` imports every such module, so the kinds are always there)::

    from .samplers import ModelRequired, Sampler, format_number, parse_number, register_sampler_kind

    def schedule_sampler(spec: str, model: PreTrainedModel | None) -> Sampler:
        path, scale = ...  # parse the spec; check its files exist (parse_number refuses NaN / inf)
        if model is None:  # checked as far as it goes without a model
            raise ModelRequired(spec)
        key = f"schedule:{path}:scale={format_number(scale)}"  # canonical: every option, no defaults left out
        return Sampler(spec, LogitsProcessorList([processor]), key=key)

    register_sampler_kind("schedule", schedule_sampler)

The builder gets the whole spec and the model, or None when a command checks its specs before
loading the model (:func:`check_specs`): it checks all it can and raises :class:`ModelRequired`.
A sampler that hooks into the model (reads hidden states, runs extra passes) is a subclass with
``hooks_model = True`` and an ``attach`` context manager; the comparison reuses the decoder pass
only for samplers that do not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

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

# name -> (type of the value, warper factory, truncates?)
WARPERS: dict[str, tuple[type, Callable[[float], LogitsProcessor], bool]] = {
    "temperature": (float, TemperatureLogitsWarper, False),
    "top_p": (float, TopPLogitsWarper, True),
    "top_k": (int, TopKLogitsWarper, True),
    "min_p": (float, MinPLogitsWarper, True),
    "typical_p": (float, TypicalLogitsWarper, True),
    "eta": (float, EtaLogitsWarper, True),
    "epsilon": (float, EpsilonLogitsWarper, True),
}
Builder = Callable[[str, "PreTrainedModel | None"], "Sampler"]
# kind -> builder of its ``kind:ARG`` specs; fill it through register_sampler_kind.
SAMPLER_KINDS: dict[str, Builder] = {}


class ModelRequired(ValueError):
    """Raised by a kind's builder called without a model once the spec is checked as far as it can be."""

    def __init__(self, spec: str):
        super().__init__(f"sampler spec {spec!r} needs the model (parse_sampler(spec, model))")


@dataclass
class Sampler:
    """What ``measure`` needs to know about one way of sampling.

    ``processors`` turn base logits into q's logits; ``truncating`` says whether q can give a
    token probability zero (then human log loss may be infinite); ``key`` is the canonical identity
    (module docstring; default: the spec). ``hooks_model`` says whether ``attach`` hooks into the
    model (the calibrator reads hidden states); plain warpers need no hooks. ``rowwise``: q of a row is a
    function of that row's base logits alone (no context, no step), so a teacher-forced pass may apply the
    processors to many steps in one call.
    """

    spec: str
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    truncating: bool = False
    key: str = ""
    rowwise: bool = False  # q of a row depends on that row's base logits alone (warpers): measure batches steps
    fitted_length: int | None = None  # a schedule's T: it is measured on generations of exactly this length
    hooks_model: ClassVar[bool] = False

    def __post_init__(self):
        if not self.key:
            self.key = self.spec

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


def register_sampler_kind(name: str, builder: Builder) -> None:
    """Make ``name:ARG`` specs build samplers with ``builder(spec, model)`` (module docstring)."""
    # Hyphens are allowed (lookahead-value): a name only has to stay clear of the spec syntax (: + = ,).
    if not isinstance(name, str) or not name.replace("-", "_").isidentifier() or name in WARPERS or name == "base":
        raise ValueError(f"`name` must be an identifier (hyphens allowed) other than base and the warpers' names, "
                         f"but is {name!r}")
    if not callable(builder):
        raise ValueError(f"`builder` must be callable, but is {builder!r}")
    known = SAMPLER_KINDS.get(name)
    if known is not None and _qualified(known) != _qualified(builder):  # a reload registers the same again
        raise ValueError(f"sampler kind {name!r} is already registered by {_qualified(known)}")
    SAMPLER_KINDS[name] = builder


def _qualified(function: Callable) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


# ----------------------------------------------------------------------------------------------------
# Numbers in specs and keys


def format_number(value: float) -> str:
    """The canonical text of a number in a key: the shortest form that reads back exactly (``0.9``, ``2``,
    ``1e-05``, ``0.1018``)."""
    value = float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def parse_number(spec: str, name: str, raw: str, kind: type = float) -> float | int:
    """``raw`` as a finite ``kind`` (float or int); the error names the spec and the option."""
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ValueError(f"sampler spec {spec!r}: `{name}` needs a {kind.__name__}, but is {raw!r}") from None
    if not math.isfinite(value):  # NaN slips through every range check of the warpers
        raise ValueError(f"sampler spec {spec!r}: `{name}` must be a finite number, but is {raw!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Specs


def _known() -> str:
    return ", ".join(["base", *(f"{n}=X" for n in WARPERS), *(f"{k}:..." for k in SAMPLER_KINDS)])


def _warper_sampler(spec: str) -> Sampler:
    processors, truncating, terms = LogitsProcessorList(), False, []
    for term in spec.split("+"):
        name, sep, raw = term.partition("=")
        name = name.strip()
        if not sep or name not in WARPERS:
            raise ValueError(f"unknown sampler spec {spec!r} (term {term!r}); known: {_known()}, joined with '+'")
        kind, factory, truncates = WARPERS[name]
        value = parse_number(spec, name, raw, kind)
        try:
            processor = factory(value)
        except ValueError as error:
            raise ValueError(f"sampler spec {spec!r}: {error}") from None
        processor.key = f"{name}={format_number(value) if kind is float else value}"  # read by processors_key
        processors.append(processor)
        terms.append(processor.key)
        truncating = truncating or truncates
    return Sampler(spec, processors, truncating, key="+".join(terms), rowwise=True)


def parse_sampler(spec: str, model: PreTrainedModel | None = None) -> Sampler:
    """Build a :class:`Sampler` from a spec string (see the module docstring). Kinds that need the model
    raise :class:`ModelRequired` without one (after checking the rest of the spec)."""
    if not isinstance(spec, str):
        raise ValueError(f"a sampler spec must be a string, but is {spec!r}")
    spec = spec.strip()
    if spec == "base":
        return Sampler(spec, rowwise=True)
    kind, sep, _ = spec.partition(":")
    if not sep:
        return _warper_sampler(spec)
    if kind.strip() not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler spec {spec!r} (kind {kind!r}); known: {_known()}")
    return SAMPLER_KINDS[kind.strip()](spec, model)


def spec_options(spec: str, names: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(argument, {option: raw text}) of a ``kind:ARG[:name=value]...`` spec: options are read from the
    end, so that the argument (a folder or file path) may itself hold ``:``. An option set twice is
    refused; checking the values is the kind's."""
    parts, options = spec.split(":")[1:], {}
    while parts and "=" in parts[-1] and parts[-1].split("=", 1)[0].strip() in names:
        name, raw = (x.strip() for x in parts.pop().split("=", 1))
        if name in options:
            raise ValueError(f"sampler spec {spec!r} sets `{name}` twice")
        options[name] = raw
    return ":".join(parts).strip(), options


def split_specs(specs: str) -> list[str]:
    """Split a comma-separated list of sampler specs (``base,temperature=0.9,top_p=0.95``)."""
    parts = [s.strip() for s in specs.split(",") if s.strip()]
    if not parts:
        raise ValueError(f"`samplers` must name at least one sampler, but is {specs!r}")
    return parts


def _refuse_duplicates(samplers: Sequence[Sampler]) -> None:
    seen: dict[str, str] = {}
    for sampler in samplers:
        if sampler.key in seen:  # two rows of one sampler would fold into one result
            raise ValueError(f"`samplers` names one sampler twice: {seen[sampler.key]!r} and {sampler.spec!r} "
                             f"(both {sampler.key!r})")
        seen[sampler.key] = sampler.spec


def check_specs(specs: Sequence[str]) -> None:
    """Check ``specs`` before a model is loaded: each as far as it goes without the model (files named,
    numbers finite), and no sampler named twice among those whose key needs no model."""
    known = []
    for spec in specs:
        with contextlib.suppress(ModelRequired):
            known.append(parse_sampler(spec))
    _refuse_duplicates(known)


def resolve_samplers(specs: Sequence[str | Sampler], model: PreTrainedModel | None = None,
                     max_new_tokens: int | None = None) -> list[Sampler]:
    """Every spec built (a Sampler is kept as it is), before anything is measured; two specs of one
    sampler (one key) are refused, naming both, and so is a schedule fitted for another generation
    length than ``max_new_tokens`` (its weights and F's horizons are that length's)."""
    samplers = [s if isinstance(s, Sampler) else parse_sampler(s, model) for s in specs]
    _refuse_duplicates(samplers)
    for sampler in samplers:
        if max_new_tokens is not None and sampler.fitted_length not in (None, max_new_tokens):
            raise ValueError(f"sampler {sampler.spec!r} was fitted for {sampler.fitted_length}-token generations, "
                             f"but `max_new_tokens` is {max_new_tokens}: fit a schedule for {max_new_tokens}")
    return samplers


def processors_key(processors: LogitsProcessorList | None) -> str:
    """The key of the q a bare processor list gives: ``base`` for none, else each processor's ``key`` (set
    by :func:`parse_sampler` and the kinds' builders) joined by ``+``. A processor built by hand is named
    by its class and scalar settings (a readable name, not a spec)."""
    if not processors:
        return "base"
    parts = []
    for processor in processors:
        key = getattr(processor, "key", None)
        if isinstance(key, str):
            parts.append(key)
            continue
        scalars = {k: v for k, v in sorted(vars(processor).items()) if isinstance(v, (bool, int, float, str))}
        parts.append(f"{type(processor).__name__}({', '.join(f'{k}={v!r}' for k, v in scalars.items())})")
    return "+".join(parts)
