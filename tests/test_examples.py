"""The scripts in examples/ run as a user would run them (real default model: slow)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_measure_calibration_example_prints_both_samplers():
    lines = run_example("measure_calibration.py").strip().splitlines()
    assert [line.split()[0] for line in lines] == ["base", "temperature=0.9"]
    assert all("EntCE" in line for line in lines)


@pytest.mark.slow
def test_generate_calibrated_example_writes_a_continuation():
    text = run_example("generate_calibrated.py")
    assert text.startswith("It is a truth universally acknowledged that")
    assert len(text.split()) > 40  # the prompt is 7 words; the shipped schedule generates up to 256 tokens


@pytest.mark.slow
def test_generate_with_schedule_example_writes_a_continuation():
    text = run_example("generate_with_schedule.py")
    assert text.startswith("The with statement is used to")
    assert len(text.split()) > 40
