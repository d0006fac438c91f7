import math

import pytest
import torch

from calibrated_sampling.metrics import (
    distinct_n,
    entropy,
    masked_mean_per_step,
    self_bleu,
    seq_rep_n,
    smoothed_log_loss,
    token_log_loss,
)


def test_uniform_logits_have_entropy_log_v():
    for vocab in (5, 20, 49152):
        torch.testing.assert_close(entropy(torch.zeros(3, vocab)), torch.full((3,), math.log(vocab)))


def test_entropy_of_hand_computed_distribution_and_masked_tokens():
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0])
    logits = probs.log()  # the zero-probability token becomes -inf: it must carry no mass and no NaN
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    torch.testing.assert_close(entropy(logits), torch.tensor(expected))
    # Logits are shift invariant.
    torch.testing.assert_close(entropy(logits + 7.0), torch.tensor(expected))


def test_token_log_loss_and_smoothing():
    q = torch.tensor([[0.0, -math.inf, math.log(3.0)]])  # q = (1/4, 0, 3/4)
    p = torch.zeros(1, 3)  # p uniform
    torch.testing.assert_close(token_log_loss(q, torch.tensor([0])), torch.tensor([math.log(4.0)]))
    assert torch.isinf(token_log_loss(q, torch.tensor([1]))).all()
    smoothed = smoothed_log_loss(q, p, torch.tensor([1]), weight=1e-4)
    torch.testing.assert_close(smoothed, torch.tensor([-math.log(1e-4 / 3)]))
    smoothed = smoothed_log_loss(q, p, torch.tensor([2]), weight=1e-4)
    torch.testing.assert_close(smoothed, torch.tensor([-math.log((1 - 1e-4) * 0.75 + 1e-4 / 3)]))


def test_masked_mean_per_step_counts_running_rows_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    means, counts = masked_mean_per_step(values, mask)
    assert counts == [2, 1, 0]
    assert means[:2] == [2.0, 2.0] and math.isnan(means[2])


def test_diversity_metrics_by_hand():
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # bigrams 12, 21, 12
    assert distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2)
    assert math.isnan(distinct_n([[1]], 2))
    assert seq_rep_n([[1, 2, 3, 4, 1, 2, 3, 4]], 4) == pytest.approx(1 - 4 / 5)
    assert seq_rep_n([[1, 2, 3, 4, 5]], 4) == 0.0
    assert self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    different = self_bleu([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    assert different < 0.01
    partial = self_bleu([[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9]])
    assert different < partial < 1.0
