"""The comparison: every sampler on the same prompts and seed, matched-entropy settings, MAUVE (its
report.md and plots are written by :func:`.report.write_comparison`).

``run_comparison`` measures ``base``, grids of temperature, top-p, top-k, min-p, typical, eta and epsilon,
the one-step lookahead (alpha fitted on the fit split) and calibrated heads with a sweep of their
scale, and schedule files (``fit --out FILE``). For temperature, top-p, min-p, each head's scale and the
lookahead's own temperature (``lookahead:alpha=A:top=C:temperature=T``, alpha as fitted) it then searches a bracket of EntCE = 0 (EntCE is monotone in each knob: a bracketing secant search, one
``measure`` call per step) until both its ends are within their standard errors of 0, and reads log
loss, diversity and the per-prompt values linearly in EntCE between them, so that every method, the
schedules included, is compared with temperature at equal EntCE (equal_entropy.py).

All warper samplers see the same prompts, so the teacher-forced decoder pass (the largest cost of a
short measurement) is computed once per batch and reused (:func:`reuse_decoder_pass`): the numbers
are identical to separate runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .data import Window, windows_digest
from .equal_entropy import (
    KNOBS,
    TEMPERED,
    equal_entropy,
    finite_number,
    finite_or_zero,
    matched_entry,
    nearest_bracket,
)
from .journal import Journal, fingerprint
from .lookahead import lookahead_key, parse_lookahead
from .lookahead_fit import fit_lookahead_alpha
from .mauve import compute_mauve, mauve_available, text_features
from .measure import measure
from .metrics import self_bleu
from .models import model_fingerprint, pad_token_id, tokenizer_fingerprint, weights_digest
from .samplers import Sampler, parse_sampler, resolve_samplers
from .schedule import load_schedule


@dataclass(frozen=True)
class Preset:
    """Sizes and grids of one comparison (``--quick``: minutes on a laptop CPU; ``--full``: docs/results.md's)."""

    num_prompts: int  # eval-split prompts, every sampler on the same ones
    max_new_tokens: int  # generated (and human) tokens per prompt
    fit_prompts: int  # fit-split prompts for the lookahead's alpha
    search_iterations: int  # measure() calls per knob in the matched-entropy search, after the bracket
    lookahead_top: int  # candidates C of the lookahead (one forward pass of B * C tokens per step)
    batch_size: int
    temperature: tuple[float, ...] = (0.9,)
    top_p: tuple[float, ...] = (0.95,)
    top_k: tuple[int, ...] = (50,)
    min_p: tuple[float, ...] = (0.05,)
    # typical_p: none by default. On a 49k vocabulary it keeps the same tokens as top-p with the same value
    # (the same tokens at 242 of 256 positions, EntCE -0.011 both at 0.95): a second name for one sampler.
    typical_p: tuple[float, ...] = ()
    eta: tuple[float, ...] = (0.0009,)
    epsilon: tuple[float, ...] = (0.0003,)
    scale: tuple[float, ...] = (0.5, 2.0)  # sweep of each calibrated head's scale (1 = as fitted)
    tolerance: float = 0.02  # |EntCE| in nats at which the search stops

    def __post_init__(self):
        # Checked here, so that a bad override fails before the model loads and the journal is written.
        for name, least in (("num_prompts", 1), ("max_new_tokens", 1), ("batch_size", 1), ("lookahead_top", 1),
                            ("fit_prompts", 0), ("search_iterations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer of at least {least}, but is {value!r}")
        for name in (*GRID_KNOBS, "scale"):
            values = getattr(self, name)
            if not all(finite_number(v) for v in values):
                raise ValueError(f"`{name}` must hold finite numbers, but is {values!r}")
        if not finite_number(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"`tolerance` must be a finite number of at least 0, but is {self.tolerance!r}")


# The preset's fields that a measurement's numbers depend on (the prompts' count and length are in the windows).
JOURNAL_PRESET_FIELDS = ("num_prompts", "max_new_tokens", "fit_prompts", "lookahead_top", "batch_size")
GRID_KNOBS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "eta", "epsilon")  # in table order


PRESETS = {
    # quick: `make demo` within 10 minutes on 2 shared CPU cores, installation included (the calibrated
    # head's scale is still searched for EntCE = 0, which measures it at scales 0 and 4 at least).
    "quick": Preset(num_prompts=16, max_new_tokens=48, fit_prompts=8, search_iterations=3, lookahead_top=2,
                    batch_size=16, scale=()),
    "full": Preset(num_prompts=64, max_new_tokens=256, fit_prompts=32, search_iterations=5, lookahead_top=16,
                   batch_size=16, temperature=(0.7, 0.8, 0.9, 0.95, 1.05), top_p=(0.8, 0.9, 0.95, 0.98),
                   top_k=(20, 50, 100), min_p=(0.02, 0.05, 0.1), eta=(0.0003, 0.0009),
                   epsilon=(0.0003, 0.0009), scale=(0.0, 0.5, 1.5, 2.0), tolerance=0.01),
}
SCALE_RANGE = (0.0, 4.0)


def grid_specs(preset: Preset) -> list[str]:
    """``base`` and the warper grid of a preset, in table order."""
    specs = ["base"]
    for name in GRID_KNOBS:
        specs += [f"{name}={value:g}" for value in getattr(preset, name)]
    return specs


@contextlib.contextmanager
def reuse_decoder_pass(model: PreTrainedModel, memo: dict) -> Iterator[None]:
    """While active, ``model.get_decoder()`` answers a call it has seen before (same ids, mask, positions)
    from ``memo`` (a deep copy: measure crops and extends the returned KV cache). Only for samplers
    that do not hook the decoder: the decoder does not run again."""
    decoder = model.get_decoder()
    keys = {"input_ids", "attention_mask", "position_ids", "use_cache"}

    def cached(*args, **kwargs):
        if args or set(kwargs) != keys:
            return decoder(*args, **kwargs)
        key = tuple((k, tuple(v.shape), v.cpu().numpy().tobytes()) if isinstance(v, torch.Tensor) else (k, v)
                    for k, v in sorted(kwargs.items()))
        if key not in memo:
            memo[key] = decoder(**kwargs)
        return copy.deepcopy(memo[key])

    model.get_decoder = lambda: cached  # an instance attribute shadows the method until deleted
    try:
        yield
    finally:
        del model.get_decoder


def find_root(f: Callable[[float], float], lo: float, hi: float, f_lo: float, f_hi: float, iterations: int,
              tol: float = 0.0, digits: int = 4, log: bool = False,
              stderr: Callable[[float], float] | None = None) -> dict:
    """A root of a monotone ``f`` inside a bracket (f_lo, f_hi of opposite signs): Illinois regula falsi,
    ``iterations`` evaluations at most, each point rounded to ``digits`` decimals (readable specs).
    ``log``: interpolate in log x (x > 0) and round to ``digits`` significant digits instead.

    It stops when both ends of the bracket are within noise of zero: |f(x)| <= max(stderr(x), tol) at each
    (``stderr``: the standard error of the measurement at an evaluated x; None = 0, so ``tol`` alone), or
    when an end is exactly zero. Narrowing a bracket whose ends are both within their standard errors
    only chases noise; interpolating between them (:func:`.equal_entropy.interpolate_at_zero`) is as good as it gets.

    Returns {"x", "fx" (the bracket end nearest zero), "bracket": [[x, f(x)], [x, f(x)]] (the final bracket,
    low x first, with the values as measured: Illinois' halved values steer the secant only), "history":
    [[x, f(x)], ...], "converged" (the stopping rule holds)}.
    """
    if not f_lo * f_hi <= 0:
        raise ValueError(f"`lo`, `hi` must bracket a root, but f({lo}) = {f_lo} and f({hi}) = {f_hi}")
    if log and not (lo > 0 and hi > 0):
        raise ValueError(f"`log` search needs a positive bracket, but it is [{lo}, {hi}]")
    to_u, from_u = (math.log, math.exp) if log else (float, float)

    def rounded(x: float) -> float:
        return float(f"{x:.{digits}g}") if log else round(x, digits)

    def within(x: float, fx: float) -> bool:
        return abs(fx) <= max(finite_or_zero(stderr(x) if stderr is not None else None), tol)

    history = [[lo, f_lo], [hi, f_hi]]
    ends = [[lo, f_lo], [hi, f_hi]]  # the bracket as measured
    fa, fb, side = f_lo, f_hi, 0  # the values the secant uses (Illinois halves the stale one)

    def done() -> bool:
        return all(within(x, fx) for x, fx in ends) or any(fx == 0 for _, fx in ends)

    for _ in range(iterations):
        if done():
            break
        (a, _), (b, _) = ends
        x = rounded(from_u((to_u(a) * fb - to_u(b) * fa) / (fb - fa)))
        if x in (a, b) or not min(a, b) < x < max(a, b):
            x = rounded(from_u((to_u(a) + to_u(b)) / 2))
            if x in (a, b):
                break  # the bracket is narrower than the rounding
        fx = f(x)
        history.append([x, fx])
        if fx * fb > 0:  # the root lies between a and x
            ends[1], fb = [x, fx], fx
            if side == -1:
                fa /= 2  # Illinois: halve the stale end so the secant does not creep
            side = -1
        else:
            ends[0], fa = [x, fx], fx
            if side == 1:
                fb /= 2
            side = 1
    ends.sort(key=lambda point: point[0])
    x, fx = min(ends, key=lambda point: abs(point[1]))
    return {"x": x, "fx": fx, "bracket": [list(end) for end in ends], "history": history, "converged": done()}


@dataclass
class Comparison:
    """Runs samplers on fixed prompts and keeps every result by spec (each spec is measured once)."""

    model: PreTrainedModel
    tokenizer: object
    windows: list[Window]
    seed: int = 0
    batch_size: int = 8
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    results: dict[str, dict] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)
    journal: Journal | None = None  # finished measurements on disk: a rerun resumes from them
    specs_by_key: dict[str, str] = field(default_factory=dict)  # sampler key -> the spec it was measured as

    def run(self, spec: str, role: str) -> dict:
        if spec not in self.results:
            sampler = parse_sampler(spec, self.model)
            if sampler.key in self.specs_by_key:  # another spelling of a measured sampler: one measurement, named
                first = self.specs_by_key[sampler.key]
                self.log(f"{spec} is {first} (key {sampler.key}): not measured again")
                self.results[spec] = self.results[first]
            else:
                self._measure(sampler)
        if role not in self.results[spec]["roles"]:
            self.results[spec]["roles"].append(role)
        return self.results[spec]

    def _measure(self, sampler: Sampler) -> None:
        """Measure ``sampler`` (or read it from the journal, by its key) into ``results``."""
        result = self.journal.get(sampler.key) if self.journal else None
        resumed = result is not None
        if not resumed:
            # Samplers that do not hook the model read nothing but the logits: the decoder pass may be reused.
            reuse = contextlib.nullcontext() if sampler.hooks_model else reuse_decoder_pass(self.model, self.memo)
            with reuse:
                kept = (lambda s: self.journal.batches(s.key)) if self.journal else None  # resumes mid-sampler
                result = measure(self.model, self.tokenizer, self.windows, [sampler], batch_size=self.batch_size,
                                 seed=self.seed, progress=False, store_for=kept)[sampler.spec]
            result["self_bleu"] = self_bleu(result["samples"])
            if self.journal:
                self.journal.add(sampler.key, result)
        result["roles"], result["key"] = [], sampler.key
        self.results[sampler.spec] = result
        self.specs_by_key[sampler.key] = sampler.spec
        loss = (f"log loss {result['log_loss']:.3f}" if math.isfinite(result["log_loss"]) else
                f"log loss inf ({100 * result['truncated_fraction']:.1f}% truncated), smoothed "
                f"{result['log_loss_smoothed']:.3f}")
        self.log(f"[{len(self.results):2d}] {sampler.spec}: EntCE {result['entce']:+.3f}, {loss}, "
                 f"{result['seconds']:.1f} s" + (" (from the journal)" if resumed else ""))

    def matched(self, name: str, spec_of: Callable[[float], str], points: dict[float, str],
                search_range: tuple[float, float], iterations: int, tol: float, log: bool = False) -> dict:
        """The knob's reading at EntCE = 0, starting from already measured ``points`` {value: spec}: a bracket
        searched until both its ends are within their standard errors of 0 (``tol``: a floor under
        them), and the values interpolated between its ends (:func:`matched_entry`)."""
        calls = 0

        def entce_at(value: float) -> float:
            nonlocal calls
            spec = points.get(value) or spec_of(value)
            calls += spec not in self.results
            points[value] = spec
            return self.run(spec, "search")["entce"]

        def stderr_at(value: float) -> float:
            return self.results[points[value]].get("entce_stderr", math.nan)

        known = sorted((v, entce_at(v)) for v in list(points))
        for end in search_range:  # no sign change among the grid points: try the ends of the range
            if nearest_bracket(known) is not None:
                break
            if end not in points:
                known = sorted([*known, (end, entce_at(end))])
        bracket = nearest_bracket(known)
        if bracket is not None:
            (lo, f_lo), (hi, f_hi) = bracket
            found = find_root(entce_at, lo, hi, f_lo, f_hi, iterations, tol, log=log, stderr=stderr_at)
        else:
            x, fx = min(known, key=lambda point: abs(point[1]))
            found = {"x": x, "fx": fx, "bracket": None, "history": [list(p) for p in known],
                     "converged": abs(fx) <= max(tol, finite_or_zero(stderr_at(x)))}
        self.run(points[found["x"]], f"matched {name}")
        entry = matched_entry(found, points, self.results, log)
        return {"knob": name, **entry, "measure_calls": calls}


def journal_key(sampler: Sampler) -> str:
    """A measurement's key in a journal: the sampler's key (samplers.py), which spells out every option and,
    for a calibrated head, a digest of its files, so a refitted head is measured again while the rest of
    the journal stands."""
    return sampler.key


def run_fingerprint(model: PreTrainedModel, tokenizer, windows: list[Window], seed: int, **settings) -> str:
    """What every number of a run depends on, hashed (``settings``: the rest, JSON-able): the journal of
    another run is refused. Head files are not part of it: each sampler's key carries their digest."""
    return fingerprint({"model": {**model_fingerprint(model), "weights": weights_digest(model)},
                        "device": model.device.type, "tokenizer": tokenizer_fingerprint(tokenizer),
                        "windows": windows_digest(windows), "seed": seed, **settings})


def comparison_fingerprint(model: PreTrainedModel, tokenizer, windows: list[Window], fit_windows: list[Window] | None,
                           preset: Preset, seed: int) -> str:
    """The fingerprint of a comparison's journal (:func:`run_fingerprint`): what a measurement's numbers depend
    on, not which settings are measured (a grid changed between runs measures the new points and keeps the
    others)."""
    return run_fingerprint(model, tokenizer, windows, seed, fit_windows=windows_digest(fit_windows or []),
                           preset={k: getattr(preset, k) for k in JOURNAL_PRESET_FIELDS})


def head_sweeps(model: PreTrainedModel, heads: list[str], preset: Preset) -> list[tuple[str, dict[float, str]]]:
    """(head, {scale: spec}) of each head: as fitted (scale 1) and the preset's sweep. Each head is loaded
    against the model here, so that a mistyped folder fails before the hours of the grid; a head named
    twice is refused."""
    resolve_samplers([f"calibrated:{head}" for head in heads], model)
    sweeps = []
    for head in heads:
        sweep = {1.0: f"calibrated:{head}"}
        for scale in preset.scale:
            sweep.setdefault(float(scale), f"calibrated:{head}:scale={scale:g}")
        sweeps.append((head, sweep))
    return sweeps


def schedule_specs(model: PreTrainedModel, tokenizer, schedules: list[str], preset: Preset) -> list[str]:
    """The ``schedule:FILE`` spec of each schedule file, every file checked first against the model, the
    tokenizer and the preset's generation length (a schedule fitted for another model, head or T is
    refused before anything is measured), and each sampler built once (its head loads; a file named twice
    is refused)."""
    for file in schedules:
        load_schedule(file, model, tokenizer, max_new_tokens=preset.max_new_tokens)
    specs = [f"schedule:{file}" for file in schedules]
    resolve_samplers(specs, model, preset.max_new_tokens)
    return specs


def run_comparison(model: PreTrainedModel, tokenizer, windows: list[Window], fit_windows: list[Window] | None,
                   preset: Preset, heads: list[str] = (), seed: int = 0, log: Callable[[str], None] | None = None,
                   journal: str | Path | None = None, schedules: list[str] = ()) -> dict:
    """Run the whole comparison; returns {"samplers", "matched", "equal_entropy", "lookahead", "mauve", "notes"}.

    ``schedules``: schedule files (``fit --out FILE``), each measured as a ``schedule:FILE`` sampler (role
    "schedule") and read against temperature at EntCE = 0 in "equal_entropy" (:func:`equal_entropy`).

    ``fit_windows`` (fit split) fit the lookahead's alpha; None skips the lookahead. ``journal``: a
    ``measurements.jsonl`` path (:mod:`.journal`); finished measurements are kept there as they complete
    and an interrupted comparison rerun with the same arguments picks them up instead of measuring again.
    Every spec and head folder is checked before anything is measured or written.
    """
    resolve_samplers(grid_specs(preset))
    sweeps = head_sweeps(model, heads, preset)
    schedule_list = schedule_specs(model, tokenizer, schedules, preset)
    runner = Comparison(model, tokenizer, windows, seed=seed, batch_size=preset.batch_size)
    if journal is not None:
        runner.journal = Journal(journal, comparison_fingerprint(model, tokenizer, windows, fit_windows, preset, seed))
    if log is not None:
        runner.log = log
    notes: list[str] = []
    if not mauve_available():  # said before hours of measuring, not after
        notes.append("MAUVE skipped: the optional `mauve-text` package is missing (pip install "
                     "'calibrated-sampling[mauve]')")
        runner.log(notes[-1])
    for spec in grid_specs(preset):
        runner.run(spec, "grid")

    lookahead = None
    if fit_windows:
        lookahead = runner.journal.get("lookahead fit") if runner.journal else None
        if lookahead is None:
            started = time.perf_counter()
            lookahead = fit_lookahead_alpha(model, tokenizer, fit_windows, preset.lookahead_top, preset.batch_size)
            lookahead["seconds"] = time.perf_counter() - started
            if runner.journal:
                runner.journal.add("lookahead fit", lookahead)
        runner.log(f"lookahead fit on {len(fit_windows)} fit-split prompts: alpha {lookahead['alpha']:+.4f}, "
                   f"log loss {lookahead['log_loss_alpha0']:.4f} -> {lookahead['log_loss']:.4f}")
        lookahead["spec"] = f"lookahead:alpha={lookahead['alpha']:.4g}:top={preset.lookahead_top}"
        runner.run(lookahead["spec"], "lookahead")

    for _, sweep in sweeps:
        for spec in sweep.values():
            runner.run(spec, "calibrated")
    for spec in schedule_list:
        runner.run(spec, "schedule")

    matched = {}
    for name, (identity, search_range, log) in KNOBS.items():
        points = {float(v): f"{name}={v:g}" for v in getattr(preset, name)}
        if identity is not None:
            points[identity] = "base"
        matched[name] = runner.matched(name, lambda v, name=name: f"{name}={v:g}", points, search_range,
                                       preset.search_iterations, preset.tolerance, log)
    for head, sweep in sweeps:
        name = f"calibrated {Path(head).name} scale"
        matched[name] = runner.matched(name, lambda v, head=head: f"calibrated:{head}:scale={v:g}", dict(sweep),
                                       SCALE_RANGE, preset.search_iterations, preset.tolerance)
    if lookahead is not None:  # the lookahead with a temperature of its own, read at EntCE = 0 as temperature is
        name, points = tempered_lookahead_start(lookahead["spec"], matched["temperature"])
        matched[name] = runner.matched(name, lambda v: f"{lookahead['spec']}:temperature={v:g}", points,
                                       KNOBS["temperature"][1], preset.search_iterations, preset.tolerance)

    mauve_info = None
    if mauve_available():
        mauve_info = add_mauve(runner.results, model, tokenizer, windows, preset.batch_size, seed)
    for entry in matched.values():
        entry["mauve"] = runner.results[entry["spec"]].get("mauve")
    equal = equal_entropy(runner.results, matched)
    if equal["reference"] is None:
        notes.append("no EntCE = 0 bracket for temperature: the equal-entropy table has no log-loss differences")
    return {"samplers": runner.results, "matched": matched, "equal_entropy": equal, "lookahead": lookahead,
            "mauve": mauve_info, "notes": notes, "preset": asdict(preset)}


def tempered_lookahead_start(spec: str, temperature: dict) -> tuple[str, dict[float, str]]:
    """The :data:`TEMPERED` family of the lookahead ``spec`` and the first points of its temperature's search:
    the lookahead itself (T = 1) and the temperature at which temperature alone met EntCE = 0 (``temperature``:
    its matched entry). An F of positive weight removes entropy on top of the temperature's, so that pair
    usually brackets the lookahead's EntCE = 0 and the search starts inside it."""
    points = {1.0: spec}
    start = round(temperature.get("value_at_zero") or temperature["value"], 4)
    if start != 1.0:
        points[start] = f"{spec}:temperature={start:g}"
    return lookahead_key({**parse_lookahead(spec), "temperature": 1.0}) + TEMPERED, points


def add_mauve(results: dict[str, dict], model: PreTrainedModel, tokenizer, windows: list[Window], batch_size: int,
              seed: int) -> dict:
    """MAUVE of every sampler except pure search points against the human continuations (``mauve`` key; NaN
    for search points and empty sets)."""
    pad_id = pad_token_id(tokenizer)
    human = text_features(model, [w.continuation_ids for w in windows], batch_size, pad_id)
    for result in results.values():
        result["mauve"] = math.nan
        if result["roles"] == ["search"]:
            continue
        features = text_features(model, result["samples"], batch_size, pad_id)
        features = features[~features.isnan().any(-1)]
        if len(features):
            result["mauve"] = compute_mauve(features, human, seed=seed)["mauve"]
    return {"features": "mean-pooled final hidden state of the text under the model itself",
            "num_clusters": max(2, round(len(windows) / 10)), "scale": 5.0, "human_texts": len(windows)}


