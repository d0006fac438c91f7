"""Every method read at equal entropy: the knobs' settings that bracket EntCE = 0, the values interpolated
there, and each method's log loss paired against temperature's over the same prompts.

A knob (temperature, top-p, min-p, or the temperature of a method that takes one of its own:
:data:`TEMPERED`) measured at two settings whose EntCE brackets 0 is read at EntCE = 0 by interpolating
linearly in EntCE between them (:func:`interpolate_at_zero`), prompt by prompt, so that the paired
difference to temperature (:func:`paired_difference`) keeps its per-prompt pairing. A schedule is read as
measured: it is calibrated on its fit text, and its own EntCE is shown. :func:`equal_entropy` assembles
the table; :func:`measured_matches` and :func:`measured_equal_entropy` read it from any plain ``measure``
run, and compare.py from the measurements its searches made. Nothing here measures: these are the
readings of measurements (docs/design.md, "The comparison at equal entropy").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from .calibrator import calibrated_family_key, calibrated_options
from .lookahead import lookahead_key, parse_lookahead
from .lookahead_value import parse_lookahead2, two_step_key, value_family_key, value_options
from .metrics import per_bin_entce
from .samplers import WARPERS


def finite_number(value) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Knobs searched for EntCE = 0: (value at which the sampler is `base` or None, range tried when the grid has
# no bracket, search on a log scale). min_p truncates human tokens already at small values (their share is
# `truncated_fraction` in results.json), and each one costs at least -log(1e-4) ~ 9 nats of smoothed log loss,
# so its EntCE falls steeply near 0: it is searched on a log scale.
KNOBS = {"temperature": (1.0, (0.5, 1.5), False), "top_p": (1.0, (0.2, 1.0), False),
         "min_p": (None, (1e-5, 0.5), True)}
# The family suffix of a method with a temperature of its own (``lookahead:alpha=A:top=C:temperature=T``): in a
# ``measure`` run its temperature is a knob read at EntCE = 0 like temperature's, T = 1 being the method itself.
TEMPERED = " + temperature"
# The kinds of method that take a temperature of their own: kind -> (parse a spec's options, their canonical key).
# A calibrated head takes one in its fixed-weight form only (``calibrated:HEAD_DIR:alpha=A:temperature=T``).
TEMPERABLE = {"lookahead": (parse_lookahead, lookahead_key), "lookahead2": (parse_lookahead2, two_step_key),
              "lookahead-value": (value_options, value_family_key),
              "calibrated": (calibrated_options, calibrated_family_key)}
INTERPOLATED = ("log_loss", "log_loss_smoothed", "truncated_fraction", "gen_entropy", "distinct_2", "self_bleu",
                "seq_rep_4")  # read at EntCE = 0 between the two measurements that bracket it


def _lerp(a, b, weight: float):
    """(1 - weight) a + weight b, where an end of weight 0 does not count (so inf * 0 is no NaN); None if
    either is None (a key an old measurement lacks)."""
    if a is None or b is None:
        return None
    return sum(c * v for c, v in ((1 - weight, a), (weight, b)) if c)


def zero_weight(entce_lo: float, entce_hi: float) -> float:
    """The weight w of the second of two measurements with EntCE of opposite signs at which the line
    through them crosses EntCE = 0: (1 - w) entce_lo + w entce_hi = 0 (0.5 when both are 0)."""
    if not entce_lo * entce_hi <= 0:
        raise ValueError(f"`entce_lo`, `entce_hi` must have opposite signs, but are {entce_lo} and {entce_hi}")
    return 0.5 if entce_lo == entce_hi else entce_lo / (entce_lo - entce_hi)


def interpolate_at_zero(lo: dict, hi: dict) -> dict:
    """The values of two measurements (summaries) whose EntCE brackets 0, read linearly in EntCE at EntCE = 0:
    :data:`INTERPOLATED` and, where both have them, the per-prompt lists (prompt by prompt, the same
    weight); returns them with "entce" 0, "weight" (of ``hi``) and "per_prompt" (None where a measurement
    from an older journal lacks it)."""
    weight = zero_weight(lo["entce"], hi["entce"])
    out = {k: _lerp(lo.get(k), hi.get(k), weight) for k in INTERPOLATED}
    out["truncating"] = any(r.get("truncating") for r, w in ((lo, 1 - weight), (hi, weight)) if w)
    a, b = lo.get("per_prompt"), hi.get("per_prompt")
    out["per_prompt"] = None if a is None or b is None else {
        k: [_lerp(x, y, weight) for x, y in zip(a[k], b[k])] for k in a}
    return {**out, "entce": 0.0, "weight": weight}


def nearest_bracket(known: list[tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Of measured (setting, EntCE) points sorted by setting, the adjacent pair whose EntCE brackets 0 with the
    smallest |EntCE| at its ends, or None when no adjacent pair changes sign."""
    pairs = [(a, b) for a, b in zip(known, known[1:]) if a[1] * b[1] <= 0]
    return min(pairs, key=lambda pair: abs(pair[0][1]) + abs(pair[1][1])) if pairs else None


def finite_or_zero(value: float | None) -> float:
    """A standard error, or 0 where there is none (one prompt: NaN; None)."""
    return value if finite_number(value) else 0.0


def matched_entry(found: dict, points: dict[float, str], results: dict[str, dict], log: bool = False) -> dict:
    """A matched-entropy entry from :func:`find_root`'s answer: with a bracket, the values interpolated at
    EntCE = 0 between its two measurements, the two specs, their EntCE and standard errors and the weight
    (of the second); ``value`` and ``spec``: the measured end nearest zero (for what needs one set of
    samples: MAUVE, the curves). Without a bracket, the values of the point nearest zero as measured."""
    spec = points[found["x"]]
    nearest = results[spec]
    entry = {"value": found["x"], "spec": spec, "converged": found["converged"], "history": found["history"],
             "bracketed": found["bracket"] is not None, "bracket": None, "weight": None, "value_at_zero": None}
    if found["bracket"] is None:
        keys = ("entce", *INTERPOLATED, "truncating", "per_prompt")
        return {**entry, **{k: nearest.get(k) for k in keys}}
    (x_lo, _), (x_hi, _) = found["bracket"]
    lo, hi = results[points[x_lo]], results[points[x_hi]]
    values = interpolate_at_zero(lo, hi)
    to_u, from_u = (math.log, math.exp) if log else (float, float)
    entry["value_at_zero"] = from_u(_lerp(to_u(x_lo), to_u(x_hi), values["weight"]))
    entry["bracket"] = [{"spec": points[x], "value": x, "entce": r["entce"], "entce_stderr": r.get("entce_stderr")}
                        for x, r in ((x_lo, lo), (x_hi, hi))]
    return {**entry, **values}


def bin_calibration(result: dict) -> dict:
    """:func:`.metrics.per_bin_entce` of a measurement, on the log loss its EntCE uses (smoothed for truncating
    samplers)."""
    return per_bin_entce(result["per_step"], smoothed=bool(result.get("entce_uses_smoothed")))


def seconds_per_token(result: dict) -> float:
    """A measurement's wall time (its teacher-forced pass included) over the tokens it generated."""
    tokens = sum(result["per_step"]["count"])
    return result["seconds"] / tokens if tokens and result.get("seconds") is not None else math.nan


def at_zero(entry: dict, results: dict[str, dict], value: Callable[[dict], object]):
    """``value`` of a matched entry: of its nearest point, or interpolated between its bracket's two ends
    (lists element by element) with the entry's weight."""
    if entry.get("bracket") is None:
        return value(results[entry["spec"]])
    lo, hi = (value(results[end["spec"]]) for end in entry["bracket"])
    if isinstance(lo, list):
        return [_lerp(a, b, entry["weight"]) for a, b in zip(lo, hi)]
    return _lerp(lo, hi, entry["weight"])


def paired_difference(method: dict, reference: dict) -> dict:
    """Log loss of ``method`` minus ``reference`` (summaries or matched entries), and its standard error
    paired over prompts (NaN where either lacks ``per_prompt``: an older journal's measurement). Truncating
    methods (infinite log loss) are compared on the smoothed log loss (``smoothed`` True)."""
    smoothed = not (math.isfinite(method["log_loss"]) and math.isfinite(reference["log_loss"]))
    key = "log_loss_smoothed" if smoothed else "log_loss"
    out = {"difference": method[key] - reference[key], "stderr": math.nan, "smoothed": smoothed, "prompts": 0}
    a, b = method.get("per_prompt"), reference.get("per_prompt")
    if a is None or b is None or len(a[key]) != len(b[key]):
        return out
    d = [x - y for x, y in zip(a[key], b[key])]
    n = len(d)
    out["prompts"] = n
    if n > 1:
        mean = sum(d) / n
        out["stderr"] = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return out


def equal_entropy(results: dict[str, dict], matched: dict[str, dict]) -> dict:
    """Every method at EntCE = 0 read against temperature there: each matched knob (interpolated) and each
    schedule (role "schedule", calibrated on its fit text, as measured). Per row: log loss and its paired
    difference to temperature's interpolated log loss, distinct-2, seq-rep-4, the largest per-bin |EntCE|
    and seconds per generated token. {"reference": temperature's spec or None (no bracket), "rows"}."""
    reference = matched.get("temperature")
    if reference is not None and not reference["bracketed"]:
        reference = None
    methods = [(name, entry, "matched") for name, entry in matched.items()]
    methods += [(spec, {**r, "spec": spec, "bracket": None}, "schedule") for spec, r in results.items()
                if "schedule" in r["roles"]]
    rows = {}
    for name, entry, kind in methods:
        bins = at_zero(entry, results, lambda r: bin_calibration(r)["entce"])
        finite = [abs(e) for e in bins if not math.isnan(e)]
        row = {"kind": kind, "spec": entry["spec"], "entce": entry["entce"], "entce_stderr": entry.get("entce_stderr"),
               **{k: entry.get(k) for k in ("log_loss", "log_loss_smoothed", "truncating", "distinct_2", "seq_rep_4")},
               "per_bin_entce": bins, "max_abs_bin_entce": max(finite) if finite else math.nan,
               "seconds_per_token": at_zero(entry, results, seconds_per_token)}
        paired = paired_difference(entry, reference) if reference is not None else {}
        row.update({f"paired_{k}": paired.get(k, v) for k, v in
                    (("difference", math.nan), ("stderr", math.nan), ("smoothed", False), ("prompts", 0))})
        rows[name] = row
    return {"reference": None if reference is None else reference["spec"], "rows": rows}


def measured_equal_entropy(results: dict[str, dict]) -> dict | None:
    """:func:`equal_entropy` of a plain ``measure`` run: every knob of :data:`KNOBS` with two measured
    settings whose EntCE brackets 0 (``base`` counts as the knob's identity) is read there, interpolated
    between the bracketing pair nearest zero, and every ``schedule:`` spec is a schedule row. None when
    temperature has no bracket (nothing to read the rows against)."""
    roles = {spec: {**r, "roles": ["schedule"] if spec.startswith("schedule:") else []} for spec, r in results.items()}
    matched = measured_matches(roles)
    if "temperature" not in matched:
        return None
    return equal_entropy(roles, matched)


def untempered_spec(tempered: str, results: dict[str, dict]) -> str | None:
    """The spec in ``results`` of a :data:`TEMPERED` family's method at temperature 1, however it was spelled
    (``lookahead:alpha=0.1`` for ``lookahead:alpha=0.1:top=16 + temperature``), or None."""
    for spec in results:
        kind = spec.partition(":")[0].strip()
        if kind in TEMPERABLE:
            parse, key_of = TEMPERABLE[kind]
            options = parse(spec)
            if options["alpha"] not in ("fit", None) and key_of(options) + TEMPERED == tempered:
                return spec
    return None


def measured_matches(results: dict[str, dict]) -> dict[str, dict]:
    """Each knob of :data:`KNOBS`, and the temperature of each method measured with one (:data:`TEMPERED`),
    read at EntCE = 0 in a plain ``measure`` run, as :func:`matched_entry` gives it (the bracket's two measured
    settings, ``value_at_zero`` between them); knobs without a bracket are left out."""
    matched = {}
    tempered = sorted({fam for spec in results for fam, _ in [family(spec)] if fam.endswith(TEMPERED)})
    knobs = {**{name: (identity, "base", log) for name, (identity, _, log) in KNOBS.items()},
             **{fam: (1.0, untempered_spec(fam, results), False) for fam in tempered}}
    for name, (identity, at_identity, log) in knobs.items():
        points = {value: spec for spec in results for fam, value in [family(spec)] if fam == name}
        if identity is not None and at_identity in results:
            points.setdefault(identity, at_identity)
        known = sorted((value, results[spec]["entce"]) for value, spec in points.items())
        bracket = nearest_bracket(known)
        if bracket is None:
            continue
        lo, hi = bracket
        x, fx = min((lo, hi), key=lambda point: abs(point[1]))
        within = all(abs(f) <= finite_or_zero(results[points[v]].get("entce_stderr")) for v, f in (lo, hi))
        found = {"x": x, "fx": fx, "bracket": [list(lo), list(hi)], "history": [list(p) for p in known],
                 "converged": within}
        matched[name] = {"knob": name, **matched_entry(found, points, results, log), "measure_calls": 0}
    return matched


def family(key: str) -> tuple[str, float | None]:
    """(family, knob value) of a sampler's key (a spec works too): ("temperature", 0.9), ("base", None),
    ("lookahead", alpha), ("lookahead:alpha=A:top=C + temperature", T) (lookahead2 and lookahead-value alike),
    ("calibrated NAME", scale), a calibrated head's fixed-weight form as the lookahead's; a composition of
    warpers is its own family, without a value."""
    kind, sep, _ = key.partition(":")
    if sep and kind in TEMPERABLE:
        parse, key_of = TEMPERABLE[kind]
        options = parse(key)
        if kind == "calibrated" and options["alpha"] is None:  # a fitted calibration: its scale is the knob
            return f"calibrated {Path(options['folder']).name}", options["scale"]
        if options["temperature"] != 1:  # a lookahead of fixed alpha and top, its temperature the knob
            return key_of({**options, "temperature": 1.0}) + TEMPERED, options["temperature"]
        if kind == "lookahead":
            return "lookahead", None if options["alpha"] == "fit" else options["alpha"]
        return key, None
    name, _, value = key.partition("=")
    if name not in WARPERS or "+" in key:
        return key, None
    return name, float(value)
