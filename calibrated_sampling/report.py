"""results.json, the printed table, and the per-step curve plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the machines that run this have no screen
import matplotlib.pyplot as plt  # noqa: E402

RESULT_KEYS = ("log_loss", "log_loss_smoothed", "truncated_fraction", "human_entropy", "gen_entropy", "entce",
               "entce_uses_smoothed", "entce_stderr", "eos_fraction", "distinct_2", "seq_rep_4", "per_step", "seconds")


def write_results(out_dir: str | Path, model: str, data: str, settings: dict, samplers: dict[str, dict],
                  tokenizer=None) -> Path:
    """Write ``results.json`` (and ``samples.jsonl`` with decoded generations when a tokenizer is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "data": data, "settings": settings,
               "samplers": {spec: {k: r[k] for k in RESULT_KEYS if k in r} for spec, r in samplers.items()}}
    tmp = out / "results.json.tmp"
    # Infinite log loss (truncating samplers) is written as JSON's Infinity, which json.load reads back.
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, out / "results.json")
    if tokenizer is not None:
        with open(out / "samples.jsonl", "w") as handle:
            for spec, result in samplers.items():
                for i, ids in enumerate(result.get("samples", [])):
                    handle.write(json.dumps({"sampler": spec, "prompt": i, "text": tokenizer.decode(ids)}) + "\n")
    return out / "results.json"


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {str(path)!r}")
    return json.loads(path.read_text())


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


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
