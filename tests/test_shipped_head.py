"""The shipped head and its committed labels, on the real default model (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import LogitsProcessorList

from calibrated_sampling.calibrator import FutureEntropyCalibrator
from calibrated_sampling.heads import FutureEntropyHead
from calibrated_sampling.label_store import load_labels, read_manifest

ROOT = Path(__file__).resolve().parents[1]
HEAD = ROOT / "heads" / "smollm2-135m"
LABELS = ROOT / "training" / "smollm2-135m" / "labels"

pytestmark = pytest.mark.slow


def calibrated_greedy(model, calibrator, enc, steps):
    with calibrator.attached(model), torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=steps, return_dict_in_generate=True,
                             output_scores=True, logits_processor=LogitsProcessorList([calibrator]))
    return out.sequences, torch.stack(out.scores, 1).float()


def test_shipped_head_calibrates_the_default_model(smollm):
    model, tokenizer = smollm
    head = FutureEntropyHead.from_pretrained(HEAD, model, tokenizer)
    assert head.num_parameters() <= 0.05 * sum(p.numel() for p in model.parameters())
    enc = tokenizer(["The with statement is used to", "A class"], return_tensors="pt", padding=True)
    assert (enc["attention_mask"][1] == 0).any()  # the second prompt is left padded
    with torch.no_grad():
        before = model(**enc).logits
        base = model.generate(**enc, do_sample=False, max_new_tokens=12, return_dict_in_generate=True,
                              output_scores=True)
    exact_ids, exact = calibrated_greedy(model, FutureEntropyCalibrator.from_pretrained(HEAD, model, tokenizer,
                                                                                        fused=False), enc, 12)
    fused_ids, fused = calibrated_greedy(model, FutureEntropyCalibrator.from_pretrained(HEAD, model, tokenizer,
                                                                                        fused=True), enc, 12)
    assert torch.equal(exact_ids, fused_ids)
    torch.testing.assert_close(fused.log_softmax(-1), exact.log_softmax(-1), atol=1e-3, rtol=0)
    # The fitted weights move the distribution, by a little (a_t near 1, b_t near 0 on this model).
    shift = (exact.log_softmax(-1) - torch.stack(base.scores, 1).float().log_softmax(-1)).abs().amax()
    assert 0 < shift.item() < 5
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before, atol=0, rtol=0)  # hooks gone


def test_shipped_head_is_refused_by_another_model():
    with pytest.raises(ValueError, match="hidden_size|vocab_size|another model"):
        FutureEntropyHead.from_pretrained(HEAD, make_model(), make_tokenizer())


@pytest.mark.parametrize("folder", sorted(p.name for p in LABELS.iterdir() if (p / "manifest.json").is_file()))
def test_committed_labels_are_intact(folder):
    manifest = read_manifest(LABELS / folder)
    rows = load_labels(LABELS / folder, hidden=False, progress=False)  # verifies every shard's checksum
    assert len(rows["target"]) == manifest["counts"]["rows"] > 0
    assert torch.isfinite(rows["target"]).all() and (rows["target"] >= 0).all()
    assert manifest["settings"]["model"]["weights"]  # the rebuild checks the model against this
