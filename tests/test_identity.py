"""One identity per sampler (its key), kinds that register themselves, capabilities instead of exact types,
and no import circle inside the package (issue 14)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer
from test_compare import random_windows
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from calibrated_sampling import compare as compare_module
from calibrated_sampling.compare import PRESETS, Comparison, grid_specs, journal_key
from calibrated_sampling.equal_entropy import family
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.samplers import (
    SAMPLER_KINDS,
    Sampler,
    parse_sampler,
    processors_key,
    register_sampler_kind,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, model):
    """A saved tied head with a constant (identity) schedule for the tiny model."""
    from calibrated_sampling.calibrator import constant_calibration

    config = HeadConfig.for_model(model, make_tokenizer(), family="tied", mlp_hidden=8, lm_parameters=None,
                                  calibration=constant_calibration(1.0, 0.0, 8))
    folder = tmp_path_factory.mktemp("heads") / "tiny"
    FutureEntropyHead(config, model.get_output_embeddings().weight).save_pretrained(folder)
    return folder


def grid(head_dir) -> list[str]:
    """Every spec the comparison presets measure: the warper grids, lookaheads of both presets' top, the heads'
    scale sweeps."""
    specs = {spec for preset in PRESETS.values() for spec in grid_specs(preset)}
    specs |= {f"lookahead:alpha=0.1:top={preset.lookahead_top}" for preset in PRESETS.values()}
    specs |= {f"calibrated:{head_dir}"} | {f"calibrated:{head_dir}:scale={s:g}"
                                            for preset in PRESETS.values() for s in preset.scale}
    return sorted(specs)


def test_every_distinct_spec_of_the_grids_has_a_distinct_journal_key(model, head_dir):
    specs = grid(head_dir)
    keys = {spec: journal_key(parse_sampler(spec, model)) for spec in specs}
    assert len(set(keys.values())) == len(specs), keys
    # The bug this replaces: the lookahead's key left out its number of candidates.
    assert keys["lookahead:alpha=0.1:top=2"] != keys["lookahead:alpha=0.1:top=16"]


def test_a_key_survives_a_round_trip_and_spells_out_every_option(model, head_dir):
    for spec in grid(head_dir):
        key = parse_sampler(spec, model).key
        assert parse_sampler(key, model).key == key
    assert parse_sampler("lookahead:alpha=0.10", model).key == "lookahead:alpha=0.1:top=16"
    key = parse_sampler(f"calibrated:{head_dir}/:scale=2.0", model).key
    assert key.startswith(f"calibrated:{head_dir}:scale=2:fused=auto:past=error:sha256=")
    assert parse_sampler(f"calibrated:{head_dir}:scale=2:fused=auto:past=error", model).key == key


@pytest.mark.parametrize("spec, key", [
    ("temperature=0.90", "temperature=0.9"), (" top_k = 050 ", "top_k=50"), ("min_p=1e-5", "min_p=1e-05"),
    ("temperature=1.0+top_p=.95", "temperature=1+top_p=0.95"), ("base", "base"),
])
def test_spellings_of_one_sampler_share_its_key(spec, key):
    assert parse_sampler(spec).key == key


def test_committed_journals_still_resume_for_canonical_warper_specs():
    keys = [json.loads(line).get("key") for path in sorted(ROOT.glob("results/*/measurements.jsonl"))
            for line in path.read_text().splitlines()[1:]]
    warpers = [k for k in keys if k and ":" not in k and "(" not in k and " " not in k]
    assert len(warpers) > 20
    for key in warpers:
        assert parse_sampler(key).key == key


def test_a_calibrated_key_pins_the_head_files(model, head_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(head_dir, copy)
    key = parse_sampler(f"calibrated:{copy}", model).key
    config = json.loads((copy / "config.json").read_text())
    config["calibration"]["a"] = [0.5]
    (copy / "config.json").write_text(json.dumps(config))
    assert parse_sampler(f"calibrated:{copy}", model).key != key  # refitted: another sampler
    with pytest.raises(ValueError, match="refitted or replaced"):
        parse_sampler(key, model)


def test_label_manifests_and_families_derive_from_the_key(model, head_dir):
    for spec in ("temperature=0.9+top_p=0.95", "lookahead:alpha=0.1:top=2", f"calibrated:{head_dir}:scale=0.5"):
        sampler = parse_sampler(spec, model)
        assert processors_key(sampler.processors) == sampler.key  # what make_labels records as q
    assert processors_key(None) == "base"
    assert processors_key(LogitsProcessorList([TemperatureLogitsWarper(0.5)])) == "TemperatureLogitsWarper(temperature=0.5)"
    scaled = parse_sampler(f"calibrated:{head_dir}:scale=0.5", model).key
    assert family(scaled) == ("calibrated tiny", 0.5)
    assert family(parse_sampler(f"calibrated:{head_dir}", model).key) == ("calibrated tiny", 1.0)
    assert family("lookahead:alpha=0.1:top=2") == ("lookahead", 0.1)
    assert family("temperature=0.9") == ("temperature", 0.9) and family("base") == ("base", None)
    assert family("temperature=0.9+top_p=0.95") == ("temperature=0.9+top_p=0.95", None)


# --- kinds register themselves; a declared capability, not the exact type -------------------------------

class Probe(Sampler):
    """A sampler of a kind registered by a test: plain warpers under another class."""


class HookedProbe(Sampler):
    hooks_model = True


def probe_kind(spec, model):
    temperature = float(spec.split(":", 1)[1])
    cls = HookedProbe if spec.startswith("hooked") else Probe
    return cls(spec, LogitsProcessorList([TemperatureLogitsWarper(temperature)]), key=f"{spec.split(':')[0]}:{temperature:g}")


def test_registered_kinds_build_samplers_and_their_capability_decides_the_decoder_reuse(model, monkeypatch):
    monkeypatch.setitem(SAMPLER_KINDS, "probe", probe_kind)
    monkeypatch.setitem(SAMPLER_KINDS, "hooked", probe_kind)
    assert parse_sampler("probe:0.8").key == "probe:0.8"
    reused = []
    original = compare_module.reuse_decoder_pass
    monkeypatch.setattr(compare_module, "reuse_decoder_pass", lambda *a: reused.append(1) or original(*a))
    runner = Comparison(model, make_tokenizer(), random_windows(2, [4], 3), batch_size=2, log=lambda line: None)
    runner.run("probe:0.8", "grid")
    assert reused == [1]  # a subclass that does not hook the model still shares the decoder pass
    runner.run("hooked:0.8", "grid")
    assert reused == [1]
    # Another spelling of a measured sampler is not measured again, and says so.
    runner.run("probe:0.80", "grid")
    assert runner.results["probe:0.80"] is runner.results["probe:0.8"]


def test_register_sampler_kind_checks_its_arguments(monkeypatch):
    monkeypatch.setitem(SAMPLER_KINDS, "probe", probe_kind)
    register_sampler_kind("probe", probe_kind)  # the same builder again (a module reloaded): fine
    with pytest.raises(ValueError, match="already registered"):
        register_sampler_kind("probe", lambda spec, model: None)
    with pytest.raises(ValueError, match="`name`"):
        register_sampler_kind("top_p", probe_kind)
    with pytest.raises(ValueError, match="`builder`"):
        register_sampler_kind("other", "not callable")
    assert {"calibrated", "lookahead"} <= set(SAMPLER_KINDS)  # registered by importing the package


def _package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at the top or inside functions)."""
    package = ROOT / "calibrated_sampling"
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("calibrated_sampling."):
                imported.add(node.module.split(".")[1])
        graph[path.stem] = imported
    return {name: {m for m in deps if m in graph and m not in (name, "__init__")}
            for name, deps in graph.items() if name != "__init__"}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph[name]):
            found = visit(dep)
            if found:
                return found
        path.pop()
        done.add(name)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_import_circle_inside_the_package():
    graph = _package_imports()
    assert "calibrator" not in graph["samplers"] and "lookahead" not in graph["samplers"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works
