import json

import pytest
import torch
from conftest import EOS_ID
from test_labels import run, windows_of

from calibrated_sampling import judge as J
from calibrated_sampling.cli import main

JUDGE = "training/smollm2-135m/labels/judge-pydoc-h16"


def test_exact_one_step_lookahead_is_the_horizon_one_judge_exactly(tiny, tmp_path, one_thread):
    """At horizon 1 a rollout's target is H(q(. | x, v)), no sampling involved: the exact one-step
    lookahead, run on the judge's own candidates from the folder's token ids, must reproduce it."""
    model, tok = tiny
    run(model, tok, windows_of([5, 7, 6], 8), "rollout", tmp_path / "j", max_new_tokens=8, horizon=1, rollouts=2,
        candidates=3, positions=3)
    judge = J.load_judge(tmp_path / "j", model)
    rows = judge["rows"]
    values = J.source_values("lookahead:fit", judge, model, progress=False)
    running = rows["token"] != EOS_ID  # after EOS the generation is over: the label's entropy there is 0
    assert running.sum() > 10
    assert torch.allclose(values[running], rows["target"][running].double(), atol=1e-4)
    ceiling = J.reliability(rows)
    assert ceiling["reliability"] == pytest.approx(1.0) and ceiling["ceiling"] == pytest.approx(1.0)
    log_p = J.candidate_log_probs(model, rows["hidden"], rows["token"])
    scored = J.score(rows["target"].double(), rows, log_p, ceiling["ceiling"])  # a perfect F
    assert scored["corr_within"] == pytest.approx(1.0) and scored["r2_within"] == pytest.approx(1.0)
    assert scored["gap_share"] == pytest.approx(1.0) and scored["share_of_ceiling"] == pytest.approx(1.0)


def test_head_source_reads_the_stored_hidden_state_at_the_judges_horizon(tiny, tmp_path, one_thread):
    from test_calibrator import make_head

    model, tok = tiny
    head = make_head(model, tok)
    head.save_pretrained(tmp_path / "h")
    run(model, tok, windows_of([5, 6], 8), "rollout", tmp_path / "j", max_new_tokens=8, horizon=3, rollouts=4)
    judge = J.load_judge(tmp_path / "j", model)
    rows = judge["rows"]
    for spec, k in ((f"head:{tmp_path / 'h'}:alpha=fit", 3), (f"head:{tmp_path / 'h'}:alpha=fit:horizon=2", 2)):
        values = J.source_values(spec, judge, model, progress=False)
        with torch.no_grad():
            expected = head(rows["hidden"], torch.full(rows["token"].shape, k)).gather(-1, rows["token"][:, None])[:, 0]
        assert torch.allclose(values, expected.double(), atol=1e-5)
    scores = J.judge_sources(tmp_path / "j", [f"head:{tmp_path / 'h'}:alpha=fit", "lookahead2:alpha=fit:top2=5"],
                             model, progress=False)
    assert scores["horizon"] == 3 and scores["candidates"] == 4 and scores["rollouts"] == 4
    assert scores["contexts"] == 2 * 2 and 0 <= scores["ceiling"] <= 1
    for s in scores["sources"].values():
        assert -1 <= s["corr_within"] <= 1 and s["contexts"] == 4


def test_reliability_steps_a_split_half_up_to_all_rollouts():
    torch.manual_seed(0)
    contexts, candidates, m = 400, 5, 8
    truth = torch.randn(contexts * candidates, 1)
    rows = {"context_id": torch.arange(contexts).repeat_interleave(candidates),
            "rollout_returns": truth + torch.randn(contexts * candidates, m) * 2.0}
    got = J.reliability(rows)
    # noise variance 4 per rollout: a half of 4 has variance 1 around truth (variance 1, 4/5 of it within
    # contexts after demeaning, the noise likewise): r = 1 / 2, stepped up 2r / (1 + r) = 2 / 3
    assert got["split_half_corr"] == pytest.approx(0.5, abs=0.06)
    assert got["reliability"] == pytest.approx(2 / 3, abs=0.05)
    assert got["ceiling"] == pytest.approx((2 / 3) ** 0.5, abs=0.04)


def test_judge_refuses_folders_it_cannot_score(tiny, tmp_path, one_thread):
    model, tok = tiny
    run(model, tok, windows_of([5], 8), "returns", tmp_path / "returns", max_new_tokens=8)
    with pytest.raises(ValueError, match="must hold rollout labels.*'returns'"):
        J.load_judge(tmp_path / "returns", model)
    run(model, tok, windows_of([5], 8), "rollout", tmp_path / "one", max_new_tokens=8, rollouts=1)
    with pytest.raises(ValueError, match="1 rollout per candidate"):
        J.load_judge(tmp_path / "one", model)
    run(model, tok, windows_of([5, 6, 7, 8], 8), "rollout", tmp_path / "part", max_new_tokens=8, batch_size=2)
    manifest_path = tmp_path / "part" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is incomplete \\(1 of 2 shards\\)"):
        J.load_judge(tmp_path / "part", model)


@pytest.mark.slow
def test_committed_judge_reproduces_the_committed_head_scores(tmp_path, capsys):
    """The judge folder in the repo and `calibrated-sampling judge` give the scores results/judge/judge.json
    reports for the shipped head (its hidden-state cache is rebuilt from the ids in a fresh clone)."""
    committed = json.loads(open("results/judge/judge.json").read())
    expected = next(j for j in committed["judges"] if j["folder"] == JUDGE)
    spec = "head:heads/smollm2-135m:alpha=fit"
    out = tmp_path / "judge.json"
    assert main(["judge", "--labels", JUDGE, "--source", spec, "--out", str(out)]) == 0
    got = json.loads(out.read_text())["judges"][0]
    assert "ceiling" in capsys.readouterr().out
    assert got["reliability"] == pytest.approx(expected["reliability"], abs=1e-6)
    for key in ("corr_within", "r2_within", "gap_share"):
        assert got["sources"][spec][key] == pytest.approx(expected["sources"][spec][key], abs=1e-4)
