"""The comparison: every sampler on the same prompts and seed, matched-entropy settings, MAUVE, plots.

``run_comparison`` measures ``base``, grids of temperature, top-p, top-k, min-p, typical, eta and epsilon,
the one-step lookahead (alpha fitted on the fit split) and calibrated heads with a sweep of their
scale. For temperature, top-p, min-p and each head's scale it then searches the setting whose EntCE
is zero (EntCE is monotone in each knob: a bracketing secant search, one ``measure`` call per step),
so that log loss and diversity can be compared at equal EntCE.

All warper samplers see the same prompts, so the teacher-forced decoder pass (the largest cost of a
short measurement) is computed once per batch and reused (:func:`reuse_decoder_pass`): the numbers
are identical to separate runs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .data import Window, windows_digest
from .journal import Journal, fingerprint
from .label_store import weights_digest
from .labels import describe_processors
from .lookahead import fit_lookahead_alpha
from .mauve import compute_mauve, text_features
from .measure import measure
from .metrics import self_bleu
from .models import model_fingerprint, tokenizer_fingerprint
from .samplers import SAMPLER_KINDS, Sampler, parse_sampler


@dataclass(frozen=True)
class Preset:
    """Sizes and grids of one comparison (``--quick``: minutes on a laptop CPU; ``--full``: the README's)."""

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
    typical_p: tuple[float, ...] = (0.95,)
    eta: tuple[float, ...] = (0.0009,)
    epsilon: tuple[float, ...] = (0.0003,)
    scale: tuple[float, ...] = (0.5, 2.0)  # sweep of each calibrated head's scale (1 = as fitted)
    tolerance: float = 0.02  # |EntCE| in nats at which the search stops


PRESETS = {
    # quick: `make demo` within 10 minutes on 2 shared CPU cores, installation included (the calibrated
    # head's scale is still searched for EntCE = 0, which measures it at scales 0 and 4 at least).
    "quick": Preset(num_prompts=16, max_new_tokens=48, fit_prompts=8, search_iterations=3, lookahead_top=2,
                    batch_size=16, scale=()),
    "full": Preset(num_prompts=64, max_new_tokens=256, fit_prompts=32, search_iterations=5, lookahead_top=16,
                   batch_size=16, temperature=(0.7, 0.8, 0.9, 0.95, 1.05), top_p=(0.8, 0.9, 0.95, 0.98),
                   top_k=(20, 50, 100), min_p=(0.02, 0.05, 0.1), typical_p=(0.9, 0.95), eta=(0.0003, 0.0009),
                   epsilon=(0.0003, 0.0009), scale=(0.0, 0.5, 1.5, 2.0), tolerance=0.01),
}
# Knobs searched for EntCE = 0: (value at which the sampler is `base` or None, range tried when the grid has
# no bracket, search on a log scale). min_p truncates a few % of human tokens already at 1e-3, and each one
# costs ~9 nats of smoothed log loss, so its EntCE falls steeply near 0: it is searched on a log scale.
KNOBS = {"temperature": (1.0, (0.5, 1.5), False), "top_p": (1.0, (0.2, 1.0), False),
         "min_p": (None, (1e-5, 0.5), True)}
SCALE_RANGE = (0.0, 4.0)


def grid_specs(preset: Preset) -> list[str]:
    """``base`` and the warper grid of a preset, in table order."""
    specs = ["base"]
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p", "eta", "epsilon"):
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
              tol: float = 0.0, digits: int = 4, log: bool = False) -> dict:
    """A root of a monotone ``f`` inside a bracket (f_lo, f_hi of opposite signs): Illinois regula falsi,
    ``iterations`` evaluations at most, each point rounded to ``digits`` decimals (readable specs).
    ``log``: interpolate in log x (x > 0) and round to ``digits`` significant digits instead.

    Returns {"x", "fx" (the evaluated point nearest zero), "history": [[x, f(x)], ...], "converged"}.
    """
    if not f_lo * f_hi <= 0:
        raise ValueError(f"`lo`, `hi` must bracket a root, but f({lo}) = {f_lo} and f({hi}) = {f_hi}")
    if log and not (lo > 0 and hi > 0):
        raise ValueError(f"`log` search needs a positive bracket, but it is [{lo}, {hi}]")
    to_u, from_u = (math.log, math.exp) if log else (float, float)

    def rounded(x: float) -> float:
        return float(f"{x:.{digits}g}") if log else round(x, digits)

    history = [[lo, f_lo], [hi, f_hi]]
    a, fa, b, fb, side = lo, f_lo, hi, f_hi, 0
    for _ in range(iterations):
        if min(abs(fa), abs(fb)) <= tol:
            break
        x = rounded(from_u((to_u(a) * fb - to_u(b) * fa) / (fb - fa)))
        if x in (a, b) or not min(a, b) < x < max(a, b):
            x = rounded(from_u((to_u(a) + to_u(b)) / 2))
            if x in (a, b):
                break  # the bracket is narrower than the rounding
        fx = f(x)
        history.append([x, fx])
        if fx * fb > 0:  # the root lies between a and x
            b, fb = x, fx
            if side == -1:
                fa /= 2  # Illinois: halve the stale end so the secant does not creep
            side = -1
        else:
            a, fa = x, fx
            if side == 1:
                fb /= 2
            side = 1
    x, fx = min(history, key=lambda point: abs(point[1]))
    return {"x": x, "fx": fx, "history": history, "converged": abs(fx) <= tol}


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

    def run(self, spec: str, role: str) -> dict:
        if spec not in self.results:
            sampler = parse_sampler(spec, self.model)
            key = journal_key(sampler)
            result = self.journal.get(key) if self.journal else None
            resumed = result is not None
            if not resumed:
                # Plain warpers read nothing but the logits, so the decoder pass may be reused.
                reuse = reuse_decoder_pass(self.model, self.memo) if type(sampler) is Sampler else contextlib.nullcontext()
                with reuse:
                    result = measure(self.model, self.tokenizer, self.windows, [sampler], batch_size=self.batch_size,
                                     seed=self.seed, progress=False)[spec]
                result["self_bleu"] = self_bleu(result["samples"])
                if self.journal:
                    self.journal.add(key, result)
            result["roles"] = []
            self.results[spec] = result
            loss = (f"log loss {result['log_loss']:.3f}" if math.isfinite(result["log_loss"]) else
                    f"log loss inf ({100 * result['truncated_fraction']:.1f}% truncated), smoothed "
                    f"{result['log_loss_smoothed']:.3f}")
            self.log(f"[{len(self.results):2d}] {spec}: EntCE {result['entce']:+.3f}, {loss}, "
                     f"{result['seconds']:.1f} s" + (" (from the journal)" if resumed else ""))
        if role not in self.results[spec]["roles"]:
            self.results[spec]["roles"].append(role)
        return self.results[spec]

    def matched(self, name: str, spec_of: Callable[[float], str], points: dict[float, str],
                search_range: tuple[float, float], iterations: int, tol: float, log: bool = False) -> dict:
        """The knob value with EntCE = 0, starting from already measured ``points`` {value: spec}."""
        calls = 0

        def entce_at(value: float) -> float:
            nonlocal calls
            spec = points.get(value) or spec_of(value)
            calls += spec not in self.results
            points[value] = spec
            return self.run(spec, "search")["entce"]

        known = sorted((v, entce_at(v)) for v in list(points))
        for end in search_range:  # no sign change among the grid points: try the ends of the range
            if any(a[1] * b[1] <= 0 for a, b in zip(known, known[1:])):
                break
            if end not in points:
                known = sorted([*known, (end, entce_at(end))])
        pairs = [(a, b) for a, b in zip(known, known[1:]) if a[1] * b[1] <= 0]
        if pairs:
            (lo, f_lo), (hi, f_hi) = min(pairs, key=lambda pair: abs(pair[0][1]) + abs(pair[1][1]))
            found = find_root(entce_at, lo, hi, f_lo, f_hi, iterations, tol, log=log)
            found["bracketed"] = True
        else:
            x, fx = min(known, key=lambda point: abs(point[1]))
            found = {"x": x, "fx": fx, "history": [list(p) for p in known], "converged": abs(fx) <= tol,
                     "bracketed": False}
        spec = points[found["x"]]
        result = self.run(spec, f"matched {name}")
        keys = ("entce", "log_loss", "log_loss_smoothed", "truncated_fraction", "truncating", "gen_entropy",
                "distinct_2", "self_bleu", "seq_rep_4")
        return {"knob": name, "value": found["x"], "spec": spec, **{k: result.get(k) for k in keys},
                "converged": found["converged"], "bracketed": found["bracketed"], "history": found["history"],
                "measure_calls": calls}


def _calibrated_kind_available() -> bool:
    if "calibrated" not in SAMPLER_KINDS:
        return False
    try:
        importlib.import_module(".calibrator", __package__)
    except ImportError:
        return False
    return True


def journal_key(sampler: Sampler) -> str:
    """A measurement's key in a journal. A hooked sampler's key names what it loaded (a calibrated head's
    spec carries a digest of the head's files), so a refitted head is measured again while the rest of
    the journal stands."""
    return sampler.spec if type(sampler) is Sampler else describe_processors(sampler.processors)


def run_fingerprint(model: PreTrainedModel, tokenizer, windows: list[Window], seed: int, **settings) -> str:
    """What every number of a run depends on, hashed (``settings``: the rest, JSON-able): the journal of
    another run is refused. Head files are not part of it: :func:`journal_key` carries their digest."""
    return fingerprint({"model": {**model_fingerprint(model), "weights": weights_digest(model)},
                        "device": model.device.type, "tokenizer": tokenizer_fingerprint(tokenizer),
                        "windows": windows_digest(windows), "seed": seed, **settings})


def comparison_fingerprint(model: PreTrainedModel, tokenizer, windows: list[Window], fit_windows: list[Window] | None,
                           preset: Preset, seed: int) -> str:
    """The fingerprint of a comparison's journal (:func:`run_fingerprint`)."""
    return run_fingerprint(model, tokenizer, windows, seed, fit_windows=windows_digest(fit_windows or []),
                           preset=asdict(preset))


def run_comparison(model: PreTrainedModel, tokenizer, windows: list[Window], fit_windows: list[Window] | None,
                   preset: Preset, heads: list[str] = (), seed: int = 0, log: Callable[[str], None] | None = None,
                   journal: str | Path | None = None) -> dict:
    """Run the whole comparison; returns {"samplers", "matched", "lookahead", "mauve", "notes"}.

    ``fit_windows`` (fit split) fit the lookahead's alpha; None skips the lookahead. ``journal``: a
    ``measurements.jsonl`` path (:mod:`.journal`); finished measurements are kept there as they complete
    and an interrupted comparison rerun with the same arguments picks them up instead of measuring again.
    """
    runner = Comparison(model, tokenizer, windows, seed=seed, batch_size=preset.batch_size)
    if journal is not None:
        runner.journal = Journal(journal, comparison_fingerprint(model, tokenizer, windows, fit_windows, preset, seed))
    if log is not None:
        runner.log = log
    notes: list[str] = []
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

    head_knobs = []
    if heads and not _calibrated_kind_available():
        notes.append("calibrated heads skipped: the `calibrated` sampler kind is not registered")
        heads = []
    for head in heads:
        fitted = f"calibrated:{head}"
        try:
            runner.run(fitted, "calibrated")
            sweep = {1.0: fitted}
            for scale in preset.scale:
                sweep[float(scale)] = f"calibrated:{head}:scale={scale:g}"
                runner.run(sweep[float(scale)], "calibrated")
        except (ValueError, FileNotFoundError) as error:
            notes.append(f"head {head!r} skipped: {error}")
            runner.log(notes[-1])
            continue
        head_knobs.append((head, sweep))

    matched = {}
    for name, (identity, search_range, log) in KNOBS.items():
        points = {float(v): f"{name}={v:g}" for v in getattr(preset, name)}
        if identity is not None:
            points[identity] = "base"
        matched[name] = runner.matched(name, lambda v, name=name: f"{name}={v:g}", points, search_range,
                                       preset.search_iterations, preset.tolerance, log)
    for head, sweep in head_knobs:
        name = f"calibrated {Path(head).name} scale"
        matched[name] = runner.matched(name, lambda v, head=head: f"calibrated:{head}:scale={v:g}", dict(sweep),
                                       SCALE_RANGE, preset.search_iterations, preset.tolerance)

    mauve_info = add_mauve(runner.results, model, tokenizer, windows, preset.batch_size, seed)
    for entry in matched.values():
        entry["mauve"] = runner.results[entry["spec"]].get("mauve")
    return {"samplers": runner.results, "matched": matched, "lookahead": lookahead, "mauve": mauve_info,
            "notes": notes, "preset": asdict(preset)}


def add_mauve(results: dict[str, dict], model: PreTrainedModel, tokenizer, windows: list[Window], batch_size: int,
              seed: int) -> dict:
    """MAUVE of every sampler except pure search points against the human continuations (``mauve`` key; NaN
    for search points and empty sets)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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


# --- report: results.json, report.md, plots ------------------------------------------------------

EXTRA_KEYS = ("self_bleu", "mauve", "roles", "truncating")


def family(spec: str) -> tuple[str, float | None]:
    """(family, knob value) of a spec: ("temperature", 0.9), ("base", None), ("lookahead", alpha), ..."""
    if spec == "base":
        return "base", None
    if spec.startswith("calibrated:"):
        parts = spec.split(":")
        scale = next((float(p.split("=", 1)[1]) for p in parts[2:] if p.startswith("scale=")), 1.0)
        return f"calibrated {Path(parts[1]).name}", scale
    if spec.startswith("lookahead:"):
        return "lookahead", next((float(p.split("=", 1)[1]) for p in spec.split(":") if p.startswith("alpha=")), None)
    name, _, value = spec.partition("=")
    try:
        return name, float(value)
    except ValueError:
        return spec, None


def _fmt(value, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _loss_cells(r: dict) -> list[str]:
    """log loss (inf for truncating samplers), truncated fraction, smoothed log loss (labelled with †)."""
    smoothed = _fmt(r["log_loss_smoothed"]) + ("†" if r.get("truncating") else "")
    return [_fmt(r["log_loss"]), f"{100 * r['truncated_fraction']:.1f}%", smoothed]


def format_comparison(payload: dict) -> str:
    """report.md: the sampler table, the matched-EntCE table and notes (markdown, readable as plain text)."""
    header = ["sampler", "log loss", "truncated", "smoothed log loss", "gen entropy", "EntCE", "± se", "distinct-2",
              "self-BLEU", "seq-rep-4", "MAUVE"]
    lines = ["## Samplers (same prompts and seed)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec, r in payload["samplers"].items():
        if r.get("roles") == ["search"]:
            continue
        cells = [spec, *_loss_cells(r), _fmt(r["gen_entropy"]), _fmt(r["entce"], sign=True) + (
            "*" if r.get("entce_uses_smoothed") else ""), _fmt(r.get("entce_stderr")), _fmt(r["distinct_2"]),
            _fmt(r.get("self_bleu")), _fmt(r["seq_rep_4"]), _fmt(r.get("mauve"))]
        lines.append("| " + " | ".join(cells) + " |")
    header = ["knob", "setting", "EntCE", "log loss", "truncated", "smoothed log loss", "distinct-2", "self-BLEU",
              "MAUVE", "measure calls", "converged"]
    lines += ["", "## Matched entropy: the setting of each knob with EntCE = 0", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in payload.get("matched", {}).items():
        state = "yes" if m["converged"] else ("no (closest point)" if m["bracketed"] else "no bracket")
        cells = [name, m["spec"], _fmt(m["entce"], sign=True), *_loss_cells(m), _fmt(m["distinct_2"]),
                 _fmt(m["self_bleu"]), _fmt(m.get("mauve")), str(m["measure_calls"]), state]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "† smoothed log loss -log((1 - 1e-4) q + 1e-4 p): truncating samplers give human tokens "
              "probability 0, so their true log loss is infinite; * EntCE uses the smoothed log loss.",
              "Self-BLEU: higher = generations more alike. MAUVE: k-means histograms of the model's own "
              "mean-pooled hidden states, generations vs human continuations (1 = indistinguishable)."]
    lookahead = payload.get("lookahead")
    if lookahead:
        lines.append(f"Lookahead alpha {lookahead['alpha']:+.4f} fitted on {lookahead['tokens']} fit-split tokens "
                     f"(top {lookahead['top']}): human log loss {lookahead['log_loss_alpha0']:.4f} -> "
                     f"{lookahead['log_loss']:.4f}.")
    lines += [f"Note: {note}" for note in payload.get("notes", [])]
    return "\n".join(lines)


def plot_frontiers(payload: dict, out_dir: Path) -> list[Path]:
    """frontier_logloss.png (EntCE vs log loss, smoothed for truncating samplers) and frontier_diversity.png
    (EntCE vs distinct-2 and vs self-BLEU). Each family is a line through its settings."""
    from .report import plt

    families: dict[str, list[tuple[float, dict, str]]] = {}
    for spec, r in payload["samplers"].items():
        name, value = family(spec)
        families.setdefault(name, []).append((value if value is not None else 0.0, r, spec))
    for name, (identity, _, _) in KNOBS.items():  # base is the end of the temperature and top-p lines
        if identity is not None and name in families and "base" in payload["samplers"]:
            families[name].append((identity, payload["samplers"]["base"], "base"))
    matched = {m["spec"] for m in payload.get("matched", {}).values()}
    paths = []
    # The truncating samplers' smoothed log losses spread far to the right of the others, so the log-loss
    # figure has a second panel with only the untruncated families, on their own (narrow) log-loss range.
    panels = [("frontier_logloss.png", [("log loss (smoothed for truncating samplers: hollow, dotted)", None, False),
                                        ("log loss, untruncated samplers only", None, True)]),
              ("frontier_diversity.png", [("distinct-2 (higher = more diverse)", "distinct_2", False),
                                          ("self-BLEU (lower = more diverse)", "self_bleu", False)])]
    for filename, axes_spec in panels:
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(7 * len(axes_spec), 5), squeeze=False)
        for ax, (label, key, untruncated_only) in zip(axes[0], axes_spec):
            for i, (name, points) in enumerate(sorted(families.items())):
                points.sort(key=lambda p: p[0])
                truncating = any(r.get("truncating") for _, r, _ in points)
                if truncating and untruncated_only:
                    continue
                xs = [(r["log_loss_smoothed"] if r.get("truncating") else r["log_loss"]) if key is None else r.get(key)
                      for _, r, _ in points]
                ys = [r["entce"] for _, r, _ in points]
                style = dict(color=f"C{i % 10}", marker="*" if name == "base" else "o", ms=14 if name == "base" else 5,
                             zorder=5 if name == "base" else 2)
                legend = name + (" (smoothed)" if truncating and key is None else "")
                ax.plot(xs, ys, ":" if truncating else "-", label=legend,
                        markerfacecolor="none" if truncating and key is None else style["color"], **style)
                for x, y, (_, _, spec) in zip(xs, ys, points):
                    if spec in matched:
                        ax.plot([x], [y], "D", ms=9, markerfacecolor="none", markeredgecolor="black")
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("EntCE = generation entropy - log loss (nats)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("EntCE frontier (black diamonds: matched EntCE = 0 settings)")
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=120)
        plt.close(fig)
        paths.append(out_dir / filename)
    return paths


def write_comparison(out_dir: str | Path, payload: dict, model: str, data: str, settings: dict,
                     tokenizer=None, title: str = "") -> dict[str, Path]:
    """results.json (measure's shape plus "matched", "lookahead", "mauve", "notes"), samples.jsonl,
    report.md, curves.png and the two frontier plots. Returns the paths by name."""
    import json
    import os

    from .report import RESULT_KEYS, plot_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samplers = {spec: {k: r[k] for k in (*RESULT_KEYS, *EXTRA_KEYS) if k in r}
                for spec, r in payload["samplers"].items()}
    body = {"model": model, "data": data, "settings": settings, "samplers": samplers,
            **{k: payload.get(k) for k in ("matched", "lookahead", "mauve", "notes", "preset")}}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))  # inf / NaN as JSON5-style literals
    os.replace(tmp, out / "results.json")
    if tokenizer is not None:
        with open(out / "samples.jsonl", "w") as handle:
            for spec, result in payload["samplers"].items():
                for i, ids in enumerate(result.get("samples", [])):
                    handle.write(json.dumps({"sampler": spec, "prompt": i, "text": tokenizer.decode(ids)}) + "\n")
    (out / "report.md").write_text(f"# {title or 'Sampler comparison'}\n\n" + format_comparison(body) + "\n")
    # The curve plot keeps to a few lines: base, the matched settings, the lookahead and the heads as fitted.
    shown = ["base", *(m["spec"] for m in body["matched"].values())]
    shown += [s for s, r in payload["samplers"].items()
              if "lookahead" in r["roles"] or ("calibrated" in r["roles"] and ":scale=" not in s)]
    curves = {s: payload["samplers"][s] for s in dict.fromkeys(shown)}
    paths = {"results": out / "results.json", "report": out / "report.md",
             "curves": plot_curves(curves, out / "curves.png", title=title)}
    paths.update(zip(("frontier_logloss", "frontier_diversity"), plot_frontiers(body, out)))
    return paths
