"""train_head: every head parameter moves and the LM does not, resume is exact, the head learns a token
effect the context-only baseline cannot see; evaluation metrics on hand-made cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer

from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.train import (
    HEAD_DIR,
    HISTORY_NAME,
    PLOT_NAME,
    baseline_predict,
    evaluate_head,
    fit_baseline,
    regression_metrics,
    train_head,
)

H, V = 32, 99


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_head(model, family: str = "tied", **kwargs) -> FutureEntropyHead:
    config = HeadConfig.for_model(model, make_tokenizer(), family=family, mlp_hidden=32, lm_parameters=None,
                                  max_horizon=64, **kwargs)
    return FutureEntropyHead(config, model.get_output_embeddings().weight)


def synthetic_rows(model, contexts: int, candidates: int = 6, seed: int = 0, noise: float = 0.3) -> dict:
    """Rollout-like rows: ``candidates`` tokens per context sharing its hidden state, horizon and context
    entropy. The target rate depends on the context entropy and, through the LM's own embedding, on the
    token: target = k * (2 + 0.3 H_ctx + U[token] . w) + noise * sqrt(k) * eps."""
    U = model.get_output_embeddings().weight.detach()
    w = torch.randn(H, generator=torch.Generator().manual_seed(12345)) / U.norm(dim=1).mean()  # same for all seeds
    g = torch.Generator().manual_seed(seed)
    n = contexts * candidates
    per_context = lambda x: x.repeat_interleave(candidates, 0)  # noqa: E731
    hidden = per_context(torch.randn(contexts, H, generator=g))
    horizon = per_context(torch.randint(1, 64, (contexts,), generator=g))
    context_entropy = per_context(3 * torch.rand(contexts, generator=g))
    token = torch.randint(0, V, (n,), generator=g)
    rate = 2 + 0.3 * context_entropy + U[token] @ w
    target = horizon * rate + noise * horizon.sqrt() * torch.randn(n, generator=g)
    return {"hidden": hidden, "token": token, "horizon": horizon, "target": target.float(),
            "context_id": per_context(torch.arange(contexts) + 1000 * seed), "context_entropy": context_entropy}


def test_within_context_r2_of_constant_and_perfect_predictors():
    target = torch.tensor([1.0, 2.0, 4.0, 10.0, 11.0, 30.0, 7.0])
    context = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # contexts 2 and 3 have one row: left out of r2_within
    constant = torch.tensor([5.0, 5.0, 5.0, -1.0, -1.0, 0.0, 3.0])
    scores = regression_metrics(constant, target, context)
    assert scores["r2_within"] == pytest.approx(0.0, abs=1e-12)
    assert (scores["rows_within"], scores["contexts_within"]) == (5, 2)
    perfect = regression_metrics(target, target, context)
    assert perfect["r2_within"] == pytest.approx(1.0) and perfect["r2"] == pytest.approx(1.0) and perfect["mse"] == 0
    shifted = regression_metrics(target + context.float(), target, context)  # per-context offsets do not count
    assert shifted["r2_within"] == pytest.approx(1.0) and shifted["r2"] < 1
    assert math.isnan(scores["corr_within"]) and perfect["corr_within"] == pytest.approx(1.0)
    stretched = regression_metrics(5 * target, target, context)  # right ranking, 5x the spread
    assert stretched["r2_within"] < 0 and stretched["corr_within"] == pytest.approx(1.0)


def test_baseline_recovers_its_model_and_has_no_within_skill():
    rows = synthetic_rows(make_model(), contexts=200, noise=0.0)
    k, e = rows["horizon"].double(), rows["context_entropy"].double()
    rows["target"] = (k * (2.0 + 0.3 * e) + 1.5).float()
    baseline = fit_baseline(rows)
    assert baseline == pytest.approx({"rate": 2.0, "slope": 0.3, "offset": 1.5}, abs=1e-4)
    scores = regression_metrics(baseline_predict(baseline, rows), rows["target"], rows["context_id"])
    assert scores["r2"] == pytest.approx(1.0)


def test_training_moves_every_head_parameter_and_no_lm_weight(tmp_path):
    model = make_model()
    before_lm = {name: t.clone() for name, t in model.state_dict().items()}
    head = make_head(model)
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    rows = synthetic_rows(model, contexts=40)
    result = train_head(head, rows, epochs=2, batch_size=32, lr=1e-2, out_dir=tmp_path, seed=0, log_every=5,
                        progress=False)
    assert result.steps == 2 * 8
    for name, p in head.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    for name, t in model.state_dict().items():
        assert torch.equal(t, before_lm[name]), f"LM weight {name} changed"
    assert all(p.grad is None for p in model.parameters())
    assert (tmp_path / PLOT_NAME).stat().st_size > 0
    assert json.loads((tmp_path / HISTORY_NAME).read_text()) == result.history
    loaded = FutureEntropyHead.from_pretrained(tmp_path / HEAD_DIR, model=model)
    hidden, horizon = rows["hidden"][:4], rows["horizon"][:4]
    torch.testing.assert_close(loaded(hidden, horizon), head(hidden, horizon))


@pytest.mark.parametrize("family", ["tied", "lowrank"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, family):
    model = make_model()
    rows = synthetic_rows(model, contexts=30)
    val = synthetic_rows(model, contexts=10, seed=1)
    settings = dict(val_rows=val, epochs=3, batch_size=16, lr=5e-3, seed=3, log_every=4, checkpoint_every=5,
                    progress=False)
    rank = {"rank": 4} if family == "lowrank" else {}
    torch.manual_seed(0)
    straight = train_head(make_head(model, family, **rank), rows, out_dir=tmp_path / "a", **settings)

    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_head(make_head(model, family, **rank), rows, out_dir=tmp_path / "b", callback=interrupt, **settings)
    torch.manual_seed(1)  # another initialisation: the checkpoint must override it
    resumed = train_head(make_head(model, family, **rank), rows, out_dir=tmp_path / "b", **settings)
    assert resumed.resumed_from == 5 and resumed.steps == straight.steps == 3 * 12
    for (name, p), q in zip(straight.head.state_dict().items(), resumed.head.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed.history == straight.history
    with pytest.raises(ValueError, match="lr"):
        train_head(make_head(model, family, **rank), rows, out_dir=tmp_path / "b", **{**settings, "lr": 1e-3})


def test_head_learns_the_token_effect_the_baseline_cannot_see(tmp_path):
    model = make_model()
    rows = synthetic_rows(model, contexts=400)
    val = synthetic_rows(model, contexts=100, seed=1)
    torch.manual_seed(0)
    result = train_head(make_head(model), rows, val_rows=val, epochs=6, batch_size=64, lr=3e-3,
                        out_dir=tmp_path, seed=0, log_every=20, progress=False)
    metrics = result.metrics
    assert metrics["r2_within"] > 0.5, metrics
    assert metrics["baseline_r2_within"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["mse"] < metrics["baseline_mse"]
    assert not metrics["baseline_in_sample"]
    assert result.history[-1]["val_r2_within"] == pytest.approx(metrics["r2_within"])
    assert evaluate_head(result.head, val)["baseline_in_sample"]


def test_shards_train_like_one_dict_and_resume_false_starts_over(tmp_path):
    model = make_model()
    rows = synthetic_rows(model, contexts=20)
    shards = [{key: t[:50] for key, t in rows.items()}, {key: t[50:] for key, t in rows.items()}]
    settings = dict(epochs=1, batch_size=16, seed=0, progress=False)
    torch.manual_seed(0)
    whole = train_head(make_head(model), rows, out_dir=tmp_path / "a", **settings)
    torch.manual_seed(0)
    parts = train_head(make_head(model), iter(shards), out_dir=tmp_path / "b", **settings)
    for p, q in zip(whole.head.parameters(), parts.head.parameters()):
        assert torch.equal(p, q)
    assert train_head(make_head(model), rows, out_dir=tmp_path / "a", **settings).resumed_from == whole.steps
    assert train_head(make_head(model), rows, out_dir=tmp_path / "a", resume=False, **settings).resumed_from is None
