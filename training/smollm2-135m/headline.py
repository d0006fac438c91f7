"""The headline table: every sampler at equal entropy (EntCE = 0), on every text and model measured.

    python training/smollm2-135m/headline.py --out results/headline/headline.md --plot results/headline/headline.png
    python training/smollm2-135m/headline.py --only README --out results/headline/readme.md \
        --plot results/headline/readme.png

The first writes every setting (docs/results.md's table), the second the README's first screen: the settings
of README_SETTINGS, or any comma-separated short names of SETTINGS.

Each setting is one committed `measure` run whose samplers include two temperatures (and optionally two
min-p values) on either side of EntCE = 0, beside entropy-matched schedules; `measure` wrote its table *At
equal entropy* to equal_entropy.json there (temperature and min-p interpolated to EntCE = 0, every row's
log loss paired with temperature's over the same prompts and seed). The commands that wrote them are in
docs/results.md (*Entropy-matched schedules ...*) and in training/smollm2-135m/entropy_schedules.sh. A setting
whose folder is missing is left out, so that the table only ever shows what was measured. The s / token
column is one side-by-side benchmark run (COST_COMMAND below), read by each row's cost kind.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from calibrated_sampling.calibrator import parse_calibrated
from calibrated_sampling.equal_entropy import TEMPERED, measured_matches
from calibrated_sampling.files import write_atomic
from calibrated_sampling.lookahead import parse_lookahead
from calibrated_sampling.lookahead_value import parse_lookahead2, parse_lookahead_value

# (short name, model and text, folder under --results): the order of the tables
SETTINGS = (
    ("pydoc 256", "SmolLM2-135M on pydoc", "schedules-pydoc-256"),
    ("Austen 512", "SmolLM2-135M on Jane Austen", "schedules-austen-512-128"),
    ("Austen 512, 32 prompts", "SmolLM2-135M on Jane Austen", "lookahead-austen-512"),
    ("pydoc 128", "SmolLM2-135M on pydoc", "schedules-pydoc-128"),
    ("stdlib code 256", "SmolLM2-135M on the standard library's Python code", "lookahead-stdlib-code-256"),
    ("Gemma pydoc 128", "Gemma-3-270M on pydoc", "schedules-gemma3-270m-pydoc-128"),
)
# the README's first table: the three settings, and Austen's 32-prompt run, where the lookahead is read
README_SETTINGS = ("pydoc 256", "Austen 512", "Austen 512, 32 prompts", "Gemma pydoc 128")
# a schedule's F kind (its file's "future") -> the row's name, formatted with the file's "future" entry
SCHEDULE_NAMES = {"none": "per-step temperature schedule", "head": "the head's schedule (F: shipped head)",
                  "lookahead": "the lookahead's schedule (F: exact one-step, top {top})"}
# the rows' order: matched knobs, a method with its own temperature, then schedules by F kind
RANK = ("temperature", "min_p", TEMPERED, *SCHEDULE_NAMES)
HEADER = ("setting", "method at EntCE = 0", "EntCE ± s.e.", "Δ log loss vs temperature ± paired s.e.", "distinct-2",
          "seq-rep-4", "max bin \\|EntCE\\| (64 steps)", "s / token, batch 16 (speed vs plain)")
# The cost column: one side-by-side run of benchmarks/future_cost.py over one sampler of each kind (COST_COMMAND),
# so that every row's time is from one machine; the runs' own seconds mix the machines of several sessions.
BENCHMARK = Path("future-cost/headline.json")
COST_COMMAND = ("python benchmarks/future_cost.py --batch-sizes 16 --max-new-tokens 16 --repeats 2 --samplers "
                "temperature=0.9,min_p=0.0006,schedule:schedules/smollm2-135m-pydoc-256-temperature.json,"
                "schedule:schedules/smollm2-135m-pydoc-256-head.json,"
                "calibrated:heads/smollm2-135m-distilled:alpha=0.1005:temperature=0.9,"
                "lookahead:alpha=0.1005:top=16:temperature=0.92,"
                "schedule:schedules/smollm2-135m-pydoc-256-lookahead-alpha.json,"
                "schedule:schedules/smollm2-135m-pydoc-128-lookahead.json,"
                "lookahead2:alpha=0.1069:top=8:top2=8:temperature=0.92,"
                "lookahead-value:heads/smollm2-135m-value:alpha=0.02116:top=16:horizon=16:temperature=0.92 "
                "--out results/future-cost/headline.json")


def matched_setting(knob: str, matches: dict) -> str:
    """The two measured settings of a knob that bracket EntCE = 0 and the setting interpolated between them,
    as `measure` read them (:func:`measured_matches`)."""
    entry = matches[knob]
    (lo, hi), x = entry["bracket"], entry["value_at_zero"]
    name = knob.replace("_", "-")
    if knob.startswith("lookahead2:"):  # lookahead2:alpha=A:top=C:top2=C2 + temperature
        options = parse_lookahead2(knob.removesuffix(TEMPERED))
        name = (f"lookahead (F: exact two-step, alpha {options['alpha']:.4g}, top {options['top']} x "
                f"{options['top2']}) + temperature")
    elif knob.startswith("lookahead-value:"):  # lookahead-value:DIR:alpha=A:top=C[:horizon=K] + temperature
        folder, options = parse_lookahead_value(knob.removesuffix(TEMPERED))
        name = (f"lookahead (F: one step + state value {Path(folder).name}, alpha {options['alpha']:.4g}, "
                f"top {options['top']}) + temperature")
    elif knob.startswith("calibrated:"):  # calibrated:DIR:...:alpha=A + temperature (a head's F at a fixed weight)
        folder, options = parse_calibrated(knob.removesuffix(TEMPERED))
        name = f"head's F at a fixed weight ({Path(folder).name}, alpha {options['alpha']:.4g}) + temperature"
    elif knob.endswith(TEMPERED):  # lookahead:alpha=A:top=C + temperature
        options = parse_lookahead(knob.removesuffix(TEMPERED))
        name = f"lookahead (F: exact one-step, alpha {options['alpha']:.4g}, top {options['top']}) + temperature"
    return f"{name} {lo['value']:.4g} / {hi['value']:.4g}, interpolated (≈ {x:.3g})"


def row_name(spec: str, row: dict, matches: dict) -> tuple[int, str]:
    """(rank in the table, readable name): the matched knob's bracket, or the schedule's F read from its file."""
    if row["kind"] == "matched":
        kind = TEMPERED if spec.endswith(TEMPERED) else spec  # every tempered method ranks as one kind
        return RANK.index(kind) if kind in RANK else len(RANK), matched_setting(spec, matches)
    path = Path(spec.removeprefix("schedule:"))
    try:
        record = json.loads(path.read_text())
        future = record["future"]
    except (OSError, KeyError, ValueError):
        return len(RANK), path.name  # the file moved: its name is all there is
    if future["kind"] not in SCHEDULE_NAMES:
        return len(RANK), path.name
    name = SCHEDULE_NAMES[future["kind"]].format(**future)
    weight = record.get("report", {}).get("f_weight")  # fit --f-weight: one b in every bin, only a_j matched
    if weight is not None:
        name = f"{name.removesuffix(')')}, its weight fixed at {weight:g})"
    if record.get("bin_size", 0) >= record.get("max_new_tokens", math.inf):  # --bin-size T: one a for all steps
        name = f"{name}, one bin"
    return RANK.index(future["kind"]), name


def cost_kind(spec: str) -> str:
    """What a sampler's time per token depends on: its family, and for the lookaheads their candidates
    (a temperature or weight costs nothing; one schedule costs what another with the same F does)."""
    spec = spec.removesuffix(TEMPERED)
    if spec.startswith("schedule:"):
        try:
            future = json.loads(Path(spec.removeprefix("schedule:")).read_text())["future"]
        except (OSError, KeyError, ValueError):
            return spec  # the file moved: no kind to match
        return f"schedule, F {future['kind']}" + (f", top {future['top']}" if "top" in future else "")
    family = re.split(r"[:=]", spec, maxsplit=1)[0]
    tops = re.findall(r":(top2?=\d+)", spec)
    return ", ".join([family, *tops]) if family.startswith("lookahead") else family


def costs(root: Path) -> tuple[dict[str, dict], str]:
    """({cost kind: the benchmark's batch-16 row}, what it ran on: "MODEL (dtype, device, ...), N new tokens
    after P-token prompts") from ``root / BENCHMARK``, or ({}, "")."""
    path = root / BENCHMARK
    if not path.is_file():
        return {}, ""
    bench = json.loads(path.read_text())
    setting = (f"{bench['machine']}, {bench['max_new_tokens']} new tokens after {bench['prompt_tokens']}-token prompts"
               if "max_new_tokens" in bench else bench["machine"])
    return {cost_kind(row["spec"]): row for row in bench["rows"] if row["batch_size"] == 16}, setting


def cost_cell(row: dict | None) -> str:
    return "—" if row is None else f"{1 / row['sampler_tokens_per_s']:.4f} ({row['ratio']:.2f})"


def cells(row: dict, reference: str) -> list[str]:
    entce = "0" if row["entce_stderr"] is None else f"{row['entce']:+.3f} ± {row['entce_stderr']:.3f}"
    # a truncating sampler gives some human tokens probability 0: its log loss is read smoothed
    dagger = "†" if row["paired_smoothed"] else ""
    delta = ("0 (the reference)" if row["kind"] == "matched" and row["spec"] == reference
             else f"{row['paired_difference']:+.4f}{dagger} ± {row['paired_stderr']:.4f}")
    return [entce, delta, f"{row['distinct_2']:.3f}", f"{row['seq_rep_4']:.3f}", f"{row['max_abs_bin_entce']:.2f}"]


def chosen_settings(only: str | None) -> tuple[tuple[str, str, str], ...]:
    """SETTINGS, or those named by ``only``: "README" (README_SETTINGS) or comma-separated short names."""
    if only is None:
        return SETTINGS
    names = README_SETTINGS if only == "README" else tuple(name.strip() for name in only.split(","))
    known = [short for short, _, _ in SETTINGS]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"`--only` {only!r} names no setting {unknown}; the settings are README or any of {known}")
    return tuple(setting for setting in SETTINGS if setting[0] in names)


def measured_settings(root: Path, settings: tuple[tuple[str, str, str], ...]) -> list[dict]:
    """Every setting of ``settings`` measured under ``root``: its short name, title, equal_entropy.json path,
    reference spec, the run's settings and model, and its rows as (spec, readable name, row) in table order."""
    found = []
    for short, title, folder in settings:
        path = root / folder / "equal_entropy.json"
        if not path.exists():
            continue
        matched = json.loads(path.read_text())
        measured = json.loads((root / folder / "results.json").read_text())
        matches = measured_matches(measured["samplers"])
        named = sorted(((spec, row_name(spec, row, matches)) for spec, row in matched["rows"].items()),
                       key=lambda item: item[1])
        found.append({"short": short, "title": title, "path": path, "reference": matched["reference"],
                      "settings": measured["settings"], "model": measured["model"],
                      "rows": [(spec, name, matched["rows"][spec]) for spec, (_, name) in named]})
    return found


def table(root: Path, settings: tuple[tuple[str, str, str], ...] = SETTINGS) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    sources, machines = [], set()
    timed, timed_on = costs(root)
    for setting in measured_settings(root, settings):
        same_model = setting["model"] == timed_on.split(" ")[0]  # the benchmark timed one model
        for spec, name, row in setting["rows"]:
            cost = cost_cell(timed.get(cost_kind(spec)) if same_model else None)
            lines.append("| " + " | ".join([setting["short"], name, *cells(row, setting["reference"]), cost]) + " |")
        size = setting["settings"]  # the run's own record of its size, not the setting's name
        machines.add(size["machine"])
        sources.append(f"{setting['short']}: {setting['title']}, {size['num_prompts']} held-out prompts x "
                       f"{size['max_new_tokens']} tokens, seed {size['seed']} (`{setting['path']}`)")
    if not sources:
        return "nothing measured yet (training/smollm2-135m/entropy_schedules.sh writes the settings)"
    plain = next(iter(timed.values()), None)
    cost = ("s / token, batch 16: not timed yet (`" + COST_COMMAND + "`)" if plain is None else
            f"s / token, batch 16: seconds per generated token over a batch of 16, one sampler of each kind timed side "
            f"by side in one run, each right after plain sampling ({plain['plain_tokens_per_s']:.1f} tokens/s there), "
            f"on {timed_on} (`{BENCHMARK}`); in brackets the speed as a share of plain sampling's; — where no sampler "
            f"of the kind was timed (another model)")
    notes = [f"settings: {'; '.join(sources)}; on {' / '.join(sorted(machines))}.", cost,
             "† min-p gives some human tokens probability 0: its log loss is read smoothed (q mixed with 1e-4 of"
             " the model's own distribution), and its difference to temperature with it."]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def plot(root: Path, settings: tuple[tuple[str, str, str], ...], path: Path, clip: float = 0.025) -> int:
    """Every non-reference row's log-loss difference to temperature at EntCE = 0, ±2 paired s.e., one block
    per setting: what the table says, at a glance. Differences past ``clip`` nats (min-p's truncation) sit at
    the edge with their value written. Returns the number of rows drawn."""
    import matplotlib
    matplotlib.use("Agg")  # files only: the machines that run this have no screen
    import matplotlib.pyplot as plt

    colours = {"lookahead": "tab:blue", "head": "tab:orange", "none": "tab:green", "min_p": "tab:grey"}
    blocks: list[tuple[str, list[tuple[str, dict, str]]]] = []  # (setting, [(label, row, colour)])
    for setting in measured_settings(root, settings):
        drawn = []
        for spec, name, row in setting["rows"]:
            if row["spec"] == setting["reference"]:
                continue  # temperature: the line at 0
            kind = cost_kind(spec)  # what F the row uses: its cost kind names it ("schedule, F head", ...)
            family = ("lookahead" if "lookahead" in kind else "head" if "calibrated" in kind or "F head" in kind
                      else "min_p" if kind == "min_p" else "none")
            label = re.sub(r" [\d.e-]+ / [\d.e-]+, interpolated \(≈ [\d.e-]+\)$", "", name)  # the knob's bracket
            drawn.append((label + (" †" if row["paired_smoothed"] else ""), row, colours[family]))
        blocks.append((setting["short"], drawn))
    count = sum(len(drawn) for _, drawn in blocks)
    if not count:
        return 0
    fig, ax = plt.subplots(figsize=(11, 0.28 * count + 0.35 * len(blocks) + 1.2))
    y, ticks, labels = 0.0, [], []
    for setting, drawn in blocks:
        ax.text(-clip, y - 0.4, setting, fontsize=9, fontweight="bold", va="center", ha="left")
        y -= 1.0
        for label, row, colour in drawn:
            x, err = row["paired_difference"], 2 * row["paired_stderr"]
            schedule = row["entce_stderr"] is not None  # its own EntCE, measured, not interpolated to 0
            if x > clip:
                ax.plot(clip, y, ">", color=colour)
                ax.text(clip * 0.97, y + 0.25, f"{x:+.3f}", fontsize=7, ha="right", va="bottom", color=colour)
            else:
                ax.errorbar(x, y, xerr=err, fmt="s" if schedule else "o", color=colour, capsize=2, markersize=4)
            ticks.append(y)
            labels.append(label)
            y -= 1.0
        y -= 0.3
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-clip, clip)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_xlabel("Δ log loss vs temperature at EntCE = 0 (nats), ±2 paired s.e.: left of 0 beats temperature")
    ax.set_title("at equal entropy (squares: entropy-matched schedules, their own held-out EntCE)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    meaning = {"lookahead": "F: runs the LM on each candidate", "head": "F: a head on the hidden state",
               "none": "no F: temperatures only", "min_p": "truncation"}
    ax.legend(handles=[matplotlib.lines.Line2D([], [], color=colours[family], marker="o", linestyle="", label=text)
                       for family, text in meaning.items()], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default=None, help="also write the tables (markdown) here")
    parser.add_argument("--plot", default=None, help="also draw every row's log-loss difference here (PNG)")
    parser.add_argument("--only", default=None,
                        help="README (the README's settings) or comma-separated short names of settings; default: all")
    args = parser.parse_args()
    try:
        settings = chosen_settings(args.only)
    except ValueError as error:
        parser.error(str(error))
    text = table(Path(args.results), settings)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, text + "\n")
    if args.plot:
        plot(Path(args.results), settings, Path(args.plot))


if __name__ == "__main__":
    main()
