"""The benchmark scripts run end to end on a tiny saved model (their figures are measured on the real one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, word_text
from test_cli_theory import sized_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    sized_model(32).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    rng = torch.Generator().manual_seed(0)
    texts = root / "texts"
    texts.mkdir()
    for i in range(12):  # several documents, so that both sides of the split have some
        (texts / f"doc{i}.txt").write_text(word_text(rng, 60))
    return root


def test_future_cost_prints_and_writes_every_ratio(saved, tmp_path):
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "future_cost.py"), "--model", str(saved / "model"),
                           "--data", str(saved / "texts"), "--samplers", "lookahead:alpha=0.1:top=2,"
                           "lookahead2:alpha=0.1:top=2:top2=2", "--batch-sizes", "1,2", "--prompt-tokens", "8",
                           "--max-new-tokens", "3", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["key"].split(":")[0], r["batch_size"]) for r in rows] == [
        ("lookahead", 1), ("lookahead2", 1), ("lookahead", 2), ("lookahead2", 2)]
    assert all(r["ratio"] > 0 and len(r["pairs"]) == 1 for r in rows)
    assert "lookahead2:alpha=0.1:top=2:top2=2" in done.stdout
