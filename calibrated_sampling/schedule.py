"""A schedule file: the fitted per-bin weights of q_t ∝ exp(a_j log p - b_j F_k), on their own.

A schedule is a small JSON file (a few kB) that names what it needs instead of copying it: the F it
uses (none; a head folder with the sha256 of its weight file; or the one-step lookahead with its C),
and the base model it was fitted for (models.model_fingerprint, the tokenizer fingerprint and the
weights digest). Loading it checks all of that, so a schedule is never applied to another model,
another tokenizer, a retrained head or another generation length by accident::

    {"format": "calibrated-sampling-schedule", "format_version": 1,
     "max_new_tokens": T, "bin_size": S, "a": [...], "b": [...],          # ceil(T / S) bins
     "future": {"kind": "none"} | {"kind": "head", "path": DIR, "sha256": HEX} | {"kind": "lookahead", "top": C},
     "model": {"base_model", "hidden_size", "vocab_size", "tokenizer_fingerprint", "weights"},
     "objective": "entropy" | "log-loss", "report": {...}}

A relative head ``path`` is relative to the schedule file's folder. As a sampler spec:
``schedule:FILE[:past=error|base][:sha256=D]`` (:func:`schedule_sampler`; registered on import).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LogitsProcessorList

from .calibrator import CalibratedSampler, FutureEntropyCalibrator, check_calibration, head_identity
from .files import read_json, write_atomic
from .heads import FutureEntropyHead, weights_file_digest
from .lookahead_schedule import (
    ScheduledLookaheadProcessor,
    ScheduledLookaheadSampler,
    scheduled_lookahead_sampler,
)
from .models import model_fingerprint, tokenizer_fingerprint, weights_digest
from .samplers import ModelRequired, register_sampler_kind, spec_options

FORMAT = "calibrated-sampling-schedule"
FORMAT_VERSION = 1
FUTURE_KINDS = ("none", "head", "lookahead")
MODEL_KEYS = ("base_model", "hidden_size", "vocab_size", "tokenizer_fingerprint", "weights")


@dataclass(frozen=True)
class Schedule:
    """A validated schedule file (module docstring); ``path`` is where it was read from (or None)."""

    max_new_tokens: int  # T: the generation length the weights were fitted for
    bin_size: int  # steps per bin; step t uses bin t // bin_size
    a: tuple[float, ...]  # weight of log p per bin
    b: tuple[float, ...]  # weight of F per bin (all 0 for kind "none")
    future: dict  # {"kind": "none"} | {"kind": "head", "path", "sha256"} | {"kind": "lookahead", "top"}
    model: dict  # the base model's identity (MODEL_KEYS)
    objective: str = "entropy"  # what the weights were fitted to
    report: dict = field(default_factory=dict)  # the fit's report (rounds, cost, per-bin gaps)
    path: Path | None = None

    def __post_init__(self):
        check_calibration(self.calibration())  # T, bin size and the number of a and b
        kind = self.future.get("kind") if isinstance(self.future, dict) else None
        if kind not in FUTURE_KINDS:
            raise ValueError(f"schedule `future` must be a dict with a `kind` in {', '.join(FUTURE_KINDS)}, "
                             f"but is {self.future!r}")
        if kind == "none" and any(x != 0 for x in self.b):
            raise ValueError(f"a schedule without F (kind 'none') must have every b = 0, but b is {list(self.b)!r}")
        if kind == "head":
            digest = self.future.get("sha256")
            if not isinstance(self.future.get("path"), str) or not (isinstance(digest, str) and len(digest) == 64):
                raise ValueError(f"schedule `future` of kind 'head' needs `path` (a folder) and `sha256` (64 hex "
                                 f"digits), but is {self.future!r}")
        if kind == "lookahead":
            top = self.future.get("top")
            if isinstance(top, bool) or not isinstance(top, int) or top < 1:
                raise ValueError(f"schedule `future` of kind 'lookahead' needs `top`, a positive integer, but is "
                                 f"{self.future!r}")
        if not isinstance(self.model, dict) or sorted(self.model) != sorted(MODEL_KEYS):
            raise ValueError(f"schedule `model` must have exactly the keys {', '.join(MODEL_KEYS)}, but is "
                             f"{self.model!r}")

    def calibration(self) -> dict:
        """The calibrator's schedule dict (calibrator.check_calibration)."""
        return {"form": "untied", "max_new_tokens": self.max_new_tokens, "bin_size": self.bin_size,
                "a": list(self.a), "b": list(self.b)}

    def head_dir(self) -> Path:
        """The head folder of a kind 'head' schedule, a relative path taken from the schedule's folder."""
        if self.future["kind"] != "head":
            raise ValueError(f"the schedule's F is {self.future['kind']!r}, not a head")
        folder = Path(self.future["path"])
        return folder if folder.is_absolute() or self.path is None else self.path.parent / folder

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "max_new_tokens": self.max_new_tokens,
                "bin_size": self.bin_size, "a": list(self.a), "b": list(self.b), "future": self.future,
                "model": self.model, "objective": self.objective, "report": self.report}

    @classmethod
    def from_dict(cls, record: dict, path: Path | None = None) -> Schedule:
        where = f"{path}: " if path is not None else ""
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{where}not a calibrated-sampling schedule (no \"format\": \"{FORMAT}\")")
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}schedule format version {record.get('format_version')!r}; this library "
                             f"reads version {FORMAT_VERSION}")
        missing = [k for k in ("max_new_tokens", "bin_size", "a", "b", "future", "model") if k not in record]
        if missing:
            raise ValueError(f"{where}the schedule lacks {', '.join(repr(k) for k in missing)}")
        try:
            return cls(record["max_new_tokens"], record["bin_size"], tuple(record["a"]), tuple(record["b"]),
                       record["future"], record["model"], record.get("objective", "entropy"),
                       record.get("report", {}), path)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}not a valid schedule: {error}") from None


def model_identity(model, tokenizer) -> dict:
    """What a schedule records about its base model (MODEL_KEYS)."""
    return {**model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "weights": weights_digest(model)}


def save_schedule(path: str | os.PathLike, fit: dict, model, tokenizer) -> Path:
    """Write the schedule of ``fit`` (entropy_fit.fit_entropy_matched's result) to ``path``, atomically.

    A fit that did not converge is refused (nothing is written): its bins are not calibrated. A head
    path is stored relative to the schedule's folder where it can be, so the pair can move together.
    """
    report = fit.get("report", {})
    if not report.get("converged", False):
        gaps = [round(row["gap"], 4) for row in report.get("bins", [])]
        raise ValueError(f"the fit did not converge in {report.get('rounds')} rounds (per-bin gaps {gaps}); "
                         f"no schedule written to {path}: use more rounds or more prompts")
    path = Path(path)
    future = dict(fit["future"])
    if future["kind"] == "head":
        head = Path(future["path"]).resolve()
        try:
            future["path"] = os.path.relpath(head, path.resolve().parent)
        except ValueError:  # another drive (Windows): keep it absolute
            future["path"] = str(head)
    schedule = Schedule(fit["max_new_tokens"], fit["bin_size"], tuple(fit["a"]), tuple(fit["b"]), future,
                        model_identity(model, tokenizer), fit.get("objective", "entropy"), report)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(schedule.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")


def load_schedule(path: str | os.PathLike, model=None, tokenizer=None, max_new_tokens: int | None = None) -> Schedule:
    """Read and validate a schedule file; with ``model`` / ``tokenizer`` / ``max_new_tokens``, refuse one
    fitted for another model, tokenizer, head file or generation length (:func:`check_schedule`)."""
    path = Path(path)
    schedule = Schedule.from_dict(read_json(path, "schedule file"), path)
    check_schedule(schedule, model, tokenizer, max_new_tokens)
    return schedule


def check_schedule(schedule: Schedule, model=None, tokenizer=None, max_new_tokens: int | None = None) -> None:
    """Raise ValueError naming every way ``schedule`` does not fit the given model, tokenizer, length."""
    where = f"schedule {schedule.path}" if schedule.path is not None else "the schedule"
    found: dict[str, object] = {}
    if model is not None:
        found.update(model_fingerprint(model), weights=weights_digest(model))
    if tokenizer is not None:
        found["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    differences = [f"`{k}`: schedule {schedule.model.get(k)!r}, found {v!r}" for k, v in found.items()
                   if schedule.model.get(k) != v]
    if differences:
        raise ValueError(f"{where} was fitted for another model: " + "; ".join(differences))
    if max_new_tokens is not None and max_new_tokens != schedule.max_new_tokens:
        raise ValueError(f"{where} was fitted for max_new_tokens = {schedule.max_new_tokens}, but "
                         f"`max_new_tokens` is {max_new_tokens}: its weights (and F's horizons) are those of a "
                         f"{schedule.max_new_tokens}-token generation; fit one for {max_new_tokens}")
    if schedule.future["kind"] == "head":
        folder = schedule.head_dir()
        digest = weights_file_digest(folder)
        if digest != schedule.future["sha256"]:
            raise ValueError(f"{where} was fitted with another head: {folder}'s weights have sha256 "
                             f"{digest[:16]}..., the schedule's {schedule.future['sha256'][:16]}...")


def schedule_calibrator(schedule: Schedule, model, **kwargs) -> FutureEntropyCalibrator | ScheduledLookaheadProcessor:
    """The processor that samples ``schedule`` on ``model`` (checked against it): a
    :class:`FutureEntropyCalibrator` (``kwargs``: ``past_schedule``, ``fused``), or for a lookahead schedule a
    :class:`.lookahead_schedule.ScheduledLookaheadProcessor` (``kwargs``: ``past_schedule``). Either is used
    as ``with processor.attached(model): model.generate(..., logits_processor=[processor])``."""
    check_schedule(schedule, model)
    kind = schedule.future["kind"]
    if kind == "lookahead":
        unknown = sorted(set(kwargs) - {"past_schedule"})
        if unknown:
            raise ValueError(f"schedule {schedule.path}: a lookahead schedule takes only `past_schedule`, not "
                             f"{', '.join(unknown)}")
        return ScheduledLookaheadProcessor(model, schedule.calibration(), schedule.future["top"], **kwargs)
    head = FutureEntropyHead.from_pretrained(schedule.head_dir(), model) if kind == "head" else None
    return FutureEntropyCalibrator(head, schedule.calibration(), **kwargs)


SPEC_OPTIONS = {"past": "error", "sha256": None}  # defaults, in key order


def parse_schedule_spec(spec: str) -> tuple[str, dict]:
    """(schedule file, options with their defaults) of ``schedule:FILE[:past=error|base][:sha256=D]``;
    options are read from the end, so a file name may hold ``:``."""
    file, raw = spec_options(spec, SPEC_OPTIONS)
    if raw.get("past", "error") not in ("error", "base"):
        raise ValueError(f"sampler spec {spec!r}: `past` must be error or base, but is {raw['past']!r}")
    if "sha256" in raw and not (len(raw["sha256"]) == 16 and all(c in "0123456789abcdef" for c in raw["sha256"])):
        raise ValueError(f"sampler spec {spec!r}: `sha256` needs 16 hex digits, but is {raw['sha256']!r}")
    options = {**SPEC_OPTIONS, **raw}
    if not file:
        raise ValueError(f"sampler spec {spec!r} names no schedule file: use schedule:FILE[:past=base]")
    return file, options


def schedule_sampler(spec: str, model) -> CalibratedSampler | ScheduledLookaheadSampler:
    """Build the sampler of a ``schedule:FILE[:past=error|base][:sha256=D]`` spec (``sha256``: refuse a file
    that changed since the key was made). Its key spells out every option and the file's digest.

    The tokenizer is not passed to spec builders, so only the model's identity is checked here; call
    :func:`load_schedule` with the tokenizer (and the generation length) where they are known.
    """
    file, options = parse_schedule_spec(spec)
    schedule = load_schedule(file)  # a missing or malformed file is an error before any model is loaded
    digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16]
    if options["sha256"] not in (None, digest):
        raise ValueError(f"sampler spec {spec!r} pins schedule sha256 {options['sha256']}, but {file} now holds "
                         f"{digest}: the schedule was refitted or replaced since that key was made")
    if model is None:
        raise ModelRequired(spec)
    key = f"schedule:{head_identity(file)}:past={options['past']}:sha256={digest}"
    if schedule.future["kind"] == "lookahead":  # no hooks on the model: the lookahead's own sampler
        check_schedule(schedule, model)
        return scheduled_lookahead_sampler(spec, model, schedule.calibration(), schedule.future["top"],
                                           options["past"], key)
    calibrator = schedule_calibrator(schedule, model, past_schedule=options["past"])
    calibrator.key = key  # a bare processor list still names its q (samplers.processors_key)
    return CalibratedSampler(spec, LogitsProcessorList([calibrator]), truncating=False, key=key,
                             fitted_length=schedule.max_new_tokens, calibrator=calibrator)


register_sampler_kind("schedule", schedule_sampler)


def describe_schedule(schedule: Schedule) -> str:
    """A short table: per bin, steps, a, b and the fit's gap with its standard error."""
    rows = {row["bin"]: row for row in schedule.report.get("bins", [])}
    lines = [f"{'bin':>4} {'steps':>9} {'a':>8} {'b':>9} {'gap':>8} {'s.e.':>7}"]
    for j, (a, b) in enumerate(zip(schedule.a, schedule.b)):
        row = rows.get(j, {})
        first, last = j * schedule.bin_size, min((j + 1) * schedule.bin_size, schedule.max_new_tokens) - 1
        gap, se = row.get("gap"), row.get("gap_stderr")  # a log-loss fit's report has no gaps
        gap_text = f"{gap:>+8.4f} {se:>7.4f}" if gap is not None else f"{'-':>8} {'-':>7}"
        lines.append(f"{j:>4} {first:>4}-{last:<4} {a:>8.4f} {b:>9.5f} {gap_text}")
    lines.append(f"F: {schedule.future['kind']}, T = {schedule.max_new_tokens}, objective {schedule.objective}")
    return "\n".join(lines)
