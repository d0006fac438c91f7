"""The output of runs: results.json and samples.jsonl, the printed table, the per-step curve plot, and a
comparison's report.md and frontier plots (:func:`write_comparison`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the machines that run this have no screen
import matplotlib.pyplot as plt  # noqa: E402

from .equal_entropy import KNOBS, at_zero, bin_calibration, family  # noqa: E402
from .files import write_atomic  # noqa: E402
from .metrics import BIN_STEPS  # noqa: E402

RESULT_KEYS = ("log_loss", "log_loss_smoothed", "truncated_fraction", "human_entropy", "gen_entropy", "entce",
               "entce_uses_smoothed", "entce_stderr", "eos_fraction", "distinct_2", "seq_rep_4", "per_step",
               "per_prompt", "seconds")
EXTRA_KEYS = ("key", "self_bleu", "mauve", "roles", "truncating")  # a comparison's results.json keeps these too


def _kept(samplers: dict[str, dict], keys: tuple[str, ...]) -> dict[str, dict]:
    return {spec: {k: r[k] for k in keys if k in r} for spec, r in samplers.items()}


def _write_run(out: Path, body: dict, samplers: dict[str, dict], tokenizer=None) -> Path:
    """``out/results.json`` (``body``) and, given a tokenizer, ``out/samples.jsonl`` with the decoded
    generations of ``samplers``; returns the path of results.json."""
    out.mkdir(parents=True, exist_ok=True)
    # Infinite log loss (truncating samplers) is written as JSON's Infinity, which json.load reads back.
    path = write_atomic(out / "results.json", json.dumps(body, indent=2, sort_keys=True))
    if tokenizer is not None:
        with open(out / "samples.jsonl", "w") as handle:
            for spec, result in samplers.items():
                for i, ids in enumerate(result.get("samples", [])):
                    handle.write(json.dumps({"sampler": spec, "prompt": i, "text": tokenizer.decode(ids)}) + "\n")
    return path


def write_results(out_dir: str | Path, model: str, data: str, settings: dict, samplers: dict[str, dict],
                  tokenizer=None) -> Path:
    """Write ``results.json`` (and ``samples.jsonl`` with decoded generations when a tokenizer is given)."""
    body = {"model": model, "data": data, "settings": settings, "samplers": _kept(samplers, RESULT_KEYS)}
    return _write_run(Path(out_dir), body, samplers, tokenizer)


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}")
    return json.loads(path.read_text())


def _fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_table(samplers: dict[str, dict], markdown: bool = False) -> str:
    """One row per sampler. A truncating sampler's EntCE uses the smoothed log loss (marked *)."""
    header = ["sampler", "log loss", "smoothed", "truncated", "gen entropy", "EntCE", "± se", "distinct-2", "seq-rep-4"]
    rows = []
    for spec, r in samplers.items():
        mark = "*" if r.get("entce_uses_smoothed") else ""
        rows.append([spec, _fmt(r["log_loss"]), _fmt(r["log_loss_smoothed"]), f"{100 * r['truncated_fraction']:.1f}%",
                     _fmt(r["gen_entropy"]), _fmt(r["entce"], 3) + mark, _fmt(r.get("entce_stderr")),
                     _fmt(r["distinct_2"]), _fmt(r["seq_rep_4"])])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header, *rows]]
    if any(r.get("entce_uses_smoothed") for r in samplers.values()):
        lines.append("* truncating sampler: log loss is infinite; EntCE uses the smoothed log loss "
                     "-log((1 - 1e-4) q + 1e-4 p)")
    return "\n".join(lines)


def _binned(values: list[float], counts: list[int], width: int) -> tuple[list[float], list[float]]:
    """Count-weighted means over bins of ``width`` steps, at bin centres (1-based steps)."""
    xs, ys = [], []
    for start in range(0, len(values), width):
        pairs = [(v, c) for v, c in zip(values[start:start + width], counts[start:start + width])
                 if c and math.isfinite(v)]
        if pairs:
            xs.append(start + (min(width, len(values) - start) + 1) / 2)
            ys.append(sum(v * c for v, c in pairs) / sum(c for _, c in pairs))
    return xs, ys


def plot_curves(samplers: dict[str, dict], path: str | Path, title: str = "", bin_width: int | None = None) -> Path:
    """Per-step generation entropy (solid) and human log loss (dashed) per sampler, binned over steps.

    This is the picture of the field: for a miscalibrated model the solid line climbs with the step
    while the dashed one stays flat.
    """
    steps = max(len(r["per_step"]["gen_entropy"]) for r in samplers.values())
    width = bin_width or max(1, steps // 16)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (spec, r) in enumerate(samplers.items()):
        color = f"C{i % 10}"
        ps = r["per_step"]
        x, y = _binned(ps["gen_entropy"], ps["count"], width)
        ax.plot(x, y, "-o", color=color, ms=3, label=f"{spec}: generation entropy")
        loss = ps["log_loss"] if not r.get("entce_uses_smoothed") else ps["log_loss_smoothed"]
        label = "log loss" if not r.get("entce_uses_smoothed") else "smoothed log loss"
        x, y = _binned(loss, ps.get("log_loss_count", ps["count"]), width)
        ax.plot(x, y, "--", color=color, label=f"{spec}: human {label}")
    ax.set_xlabel(f"generation step (mean over bins of {width} steps)")
    ax.set_ylabel("nats per token")
    ax.set_title(title or "Generation entropy vs human log loss, per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1 if len(samplers) < 4 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# A comparison: report.md and the EntCE frontiers


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
    header = ["knob", "setting", "bracket: EntCE ± se", "EntCE", "log loss", "truncated", "smoothed log loss",
              "distinct-2", "self-BLEU", "MAUVE", "measure calls", "converged"]
    lines += ["", "## Matched entropy: the setting of each knob with EntCE = 0", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in payload.get("matched", {}).items():
        lines.append("| " + " | ".join(_matched_cells(name, m)) + " |")
    lines += ["", "Each knob's search stops when both ends of its bracket are within their own standard error of "
              "EntCE = 0; the values are read linearly in EntCE between the two (EntCE 0 by construction). "
              "Setting: the measured end nearest 0 (MAUVE's samples, the curves).", *format_equal_entropy(payload),
              *format_per_step(payload)]
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


def _matched_cells(name: str, m: dict) -> list[str]:
    """A row of the matched-entropy table (an entry of an older results.json, without a bracket, works too)."""
    bracket = m.get("bracket")
    if bracket:
        state = "within s.e." if m["converged"] else "no (bracket wider than s.e.)"
        ends = " / ".join(f"{end['spec']}: {_fmt(end['entce'], sign=True)} ± {_fmt(end.get('entce_stderr'))}"
                          for end in bracket)
        ends += f" (w {m['weight']:.2f})"
    else:
        state = ("yes" if m["converged"] else "no (closest point)") if m["bracketed"] else "no bracket"
        ends = "-"
    return [name, m["spec"], ends, _fmt(m["entce"], sign=True), *_loss_cells(m), _fmt(m["distinct_2"]),
            _fmt(m["self_bleu"]), _fmt(m.get("mauve")), str(m["measure_calls"]), state]


def format_equal_entropy(payload: dict) -> list[str]:
    """The table "At equal entropy (EntCE = 0)": every matched knob and schedule against temperature there
    (payload["equal_entropy"], equal_entropy.equal_entropy); no lines for a payload without it."""
    equal = payload.get("equal_entropy")
    if not equal or not equal["rows"]:
        return []
    reference = equal["reference"] or "none (temperature has no EntCE = 0 bracket)"
    header = ["method", "EntCE", "log loss", "Δ log loss vs temperature", "± paired se", "distinct-2", "seq-rep-4",
              f"max bin |EntCE| ({BIN_STEPS}-step bins)", "s / token"]
    lines = ["", "## At equal entropy (EntCE = 0)", "", f"Reference: temperature at EntCE = 0 ({reference}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in equal["rows"].items():
        label = f"{name} (matched)" if row["kind"] == "matched" else f"{name} (schedule)"
        entce = _fmt(row["entce"], sign=True) + (f" ± {_fmt(row['entce_stderr'])}" if row["kind"] == "schedule" else "")
        mark = "†" if row["paired_smoothed"] else ""
        loss = (_fmt(row["log_loss_smoothed"]) if mark else _fmt(row["log_loss"])) + mark
        cells = [label, entce, loss, _fmt(row["paired_difference"], 4, sign=True) + mark,
                 _fmt(row["paired_stderr"], 4),
                 _fmt(row["distinct_2"]), _fmt(row["seq_rep_4"]), _fmt(row["max_abs_bin_entce"]),
                 _fmt(row["seconds_per_token"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Matched knobs: interpolated between their bracket's two measurements; schedules: as measured "
                    "(calibrated on the text they were fitted on; their EntCE column says how well elsewhere). "
                    "Δ log loss: paired over the same prompts and seed against temperature's interpolation (each prompt's log loss from the same two temperature measurements "
                    "with the same weight); - where a measurement predates per-prompt values. † smoothed log loss "
                    "(a truncating method's log loss is infinite). s / token: the measurement's wall time over its "
                    "generated tokens (warper samplers share one teacher-forced decoder pass, so theirs is lower)."]


def format_per_step(payload: dict) -> list[str]:
    """The table "Per-step calibration": per sampler shown in the main table, the largest |EntCE| over
    bins of 64 steps and the drift of generation entropy and of human log loss (metrics.per_bin_entce)."""
    header = ["sampler", "bins", "max bin |EntCE|", "gen entropy: first -> last", "human log loss: first -> last"]
    lines, edge = [], None
    for spec, r in payload["samplers"].items():
        if r.get("roles") == ["search"] or not r.get("per_step", {}).get("gen_entropy"):
            continue
        cal = bin_calibration(r)
        edge = cal["edge"]
        lines.append("| " + " | ".join([spec, f"{len(cal['starts'])} x {cal['width']}", _fmt(cal["max_abs_entce"]),
                                        _fmt(cal["gen_change"], sign=True), _fmt(cal["log_loss_change"], sign=True)])
                     + " |")
    if not lines:
        return []
    return ["", "## Per-step calibration", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines,
            "", f"Bin EntCE: the bin's generation entropy (over sequences still running) minus its human log loss "
                f"(smoothed for truncating samplers), bins of {BIN_STEPS} steps or the whole length when shorter. "
                f"first -> last: the change from the mean over the first {edge} steps to the mean over the last "
                f"{edge}; a calibrated sampler's entropy follows the log loss. Figure: per_bin_entce.png."]


def plot_per_bin(payload: dict, path: str | Path) -> Path:
    """per_bin_entce.png: EntCE per step bin, one line per family's main setting (base, each matched knob at
    EntCE = 0, interpolated bin by bin between its bracket, the lookahead, heads as fitted, schedules)."""
    samplers = payload["samplers"]
    lines = {"base": bin_calibration(samplers["base"])} if "base" in samplers else {}
    for name, m in payload.get("matched", {}).items():
        cal = bin_calibration(samplers[m["spec"]])
        cal["entce"] = at_zero(m, samplers, lambda r: bin_calibration(r)["entce"])
        lines[f"{name} at EntCE 0" if m.get("bracket") else f"{name} ({m['spec']})"] = cal
    for spec, r in samplers.items():
        roles = r.get("roles", [])
        if "lookahead" in roles or "schedule" in roles or ("calibrated" in roles and ":scale=" not in spec):
            kind, _, file = spec.partition(":")  # a schedule by its file name: paths make the legend unreadable
            lines[f"schedule {Path(file).name}" if kind == "schedule" else spec] = bin_calibration(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, cal) in enumerate(lines.items()):
        centres = [start + (min(cal["width"], cal["steps"] - start) + 1) / 2 for start in cal["starts"]]  # 1-based
        ax.plot(centres, cal["entce"], "-o", ms=4, color=f"C{i % 10}", label=label)
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xlim(0, max((cal["steps"] for cal in lines.values()), default=1) + 1)
    ax.set_xlabel(f"generation step (bins of up to {BIN_STEPS} steps, at their centres)")
    ax.set_ylabel("bin EntCE = generation entropy - human log loss (nats)")
    ax.set_title("Per-step calibration: EntCE per step bin (0 = calibrated at every step)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_frontiers(payload: dict, out_dir: Path) -> list[Path]:
    """frontier_logloss.png (EntCE vs log loss, smoothed for truncating samplers) and frontier_diversity.png
    (EntCE vs distinct-2 and vs self-BLEU). Each family is a line through its settings."""
    families: dict[str, list[tuple[float, dict, str]]] = {}
    for spec, r in payload["samplers"].items():
        name, value = family(r.get("key", spec))
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
    out = Path(out_dir)
    body = {"model": model, "data": data, "settings": settings,
            "samplers": _kept(payload["samplers"], (*RESULT_KEYS, *EXTRA_KEYS)),
            **{k: payload.get(k) for k in ("matched", "equal_entropy", "lookahead", "mauve", "notes", "preset")}}
    _write_run(out, body, payload["samplers"], tokenizer)
    (out / "report.md").write_text(f"# {title or 'Sampler comparison'}\n\n" + format_comparison(body) + "\n")
    # The curve plot keeps to a few lines: base, the matched settings, the lookahead and the heads as fitted.
    shown = ["base", *(m["spec"] for m in body["matched"].values())]
    shown += [s for s, r in payload["samplers"].items()
              if "lookahead" in r["roles"] or ("calibrated" in r["roles"] and ":scale=" not in s)]
    curves = {s: payload["samplers"][s] for s in dict.fromkeys(shown)}
    paths = {"results": out / "results.json", "report": out / "report.md",
             "curves": plot_curves(curves, out / "curves.png", title=title)}
    paths.update(zip(("frontier_logloss", "frontier_diversity"), plot_frontiers(body, out)))
    paths["per_bin_entce"] = plot_per_bin(body, out / "per_bin_entce.png")
    return paths
