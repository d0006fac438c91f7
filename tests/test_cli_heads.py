"""`label` and `train-head` end to end on a tiny saved model, and the window split of label_rows."""

import json

import pytest
import torch
from conftest import VOCAB, make_tokenizer, word_text
from test_cli_theory import sized_model

from calibrated_sampling.cli import main
from calibrated_sampling.heads import FutureEntropyHead
from calibrated_sampling.label_rows import FOLDER_STRIDE, load_training_rows
from calibrated_sampling.label_store import load_labels
from calibrated_sampling.labels import bootstrapped_targets
from calibrated_sampling.models import load_model
from calibrated_sampling.train import baseline_predict, fit_baseline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A saved tiny model, a text file, and returns + rollout label folders made by the CLI."""
    root = tmp_path_factory.mktemp("heads-cli")
    for name, hidden in (("model", 64), ("other", 24)):  # 64: room for a head within 5% of the LM
        sized_model(hidden).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    rng = torch.Generator().manual_seed(0)
    (root / "text.txt").write_text("\n\n".join(word_text(rng, 40) for _ in range(12)))
    common = ["--model", str(root / "model"), "--data", str(root / "text.txt"), "--split", "all",
              "--num-prompts", "10", "--prompt-tokens", "8", "--max-new-tokens", "8", "--batch-size", "4"]
    assert main(["label", *common, "--kind", "returns", "--out", str(root / "returns")]) == 0
    assert main(["label", *common, "--kind", "rollout", "--candidates", "3", "--rollouts", "2", "--positions", "2",
                 "--horizon", "4", "--out", str(root / "rollout")]) == 0
    return root


def test_label_writes_complete_folders_and_refuses_hooked_samplers_for_rollout(labelled, capsys):
    for kind in ("returns", "rollout"):
        manifest = json.loads((labelled / kind / "manifest.json").read_text())
        assert manifest["complete"] and manifest["settings"]["kind"] == kind and manifest["counts"]["rows"] > 0
    assert main(["label", "--model", str(labelled / "model"), "--data", str(labelled / "text.txt"), "--split", "all",
                 "--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8", "--kind", "rollout",
                 "--sampler", "nucleus=0.9", "--out", str(labelled / "bad")]) == 2
    assert "unknown sampler spec 'nucleus=0.9'" in capsys.readouterr().err


def test_rows_are_split_by_window_and_never_shared(labelled):
    folders = [labelled / "returns", labelled / "rollout"]
    train, val, settings = load_training_rows(folders, val_fraction=0.3)
    for index, folder in enumerate(folders):
        steps = settings[index]["max_new_tokens"]
        held = set((val[str(folder)]["context_id"] // steps).tolist())
        mine = train["context_id"][(train["context_id"] // FOLDER_STRIDE) == index] - index * FOLDER_STRIDE
        trained = set((mine // steps).tolist())
        assert held and trained and not held & trained  # whole windows go one way
        assert settings[index]["rows"] + settings[index]["val_rows"] == len(load_labels(folder)["target"])
    fewer, _, _ = load_training_rows(folders, val_fraction=0.3, train_fraction=0.8)
    assert 0 < len(fewer["target"]) < len(train["target"])
    with pytest.raises(ValueError, match="`val_fraction` must be in \\[0, 1\\], but is 1.5"):
        load_training_rows(folders, val_fraction=1.5)


def test_bootstrapped_training_targets_use_the_baseline_value(labelled):
    folder = labelled / "returns"
    train, _, _ = load_training_rows([folder], val_fraction=0.0, td_n=2)
    labels = load_labels(folder)
    baseline = fit_baseline(labels)
    by_hidden = {tuple(h.tolist()): e for h, e in zip(labels["hidden"], labels["context_entropy"])}

    def value(hidden, token, horizon):  # brute force: find each row's context entropy by its hidden state
        entropy = torch.stack([by_hidden[tuple(h.tolist())] for h in hidden])
        return baseline_predict(baseline, {"horizon": horizon, "context_entropy": entropy})

    expected = bootstrapped_targets(labels, value, n=2)
    assert torch.allclose(train["target"], expected, atol=1e-4)
    assert not torch.allclose(train["target"], labels["target"])


def test_train_head_writes_a_loadable_head_and_metrics(labelled, capsys):
    out = labelled / "trained"
    code = main(["train-head", "--model", str(labelled / "model"), "--labels",
                 f"{labelled / 'returns'},{labelled / 'rollout'}", "--mlp-hidden", "16", "--epochs", "2",
                 "--batch-size", "16", "--val-fraction", "0.3", "--td-n", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "R2 within" in printed and "rollout" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]) == {"returns", "rollout"}
    assert metrics["validation"]["rollout"]["contexts_within"] > 0
    assert (out / "loss.png").stat().st_size > 0
    model, tokenizer = load_model(str(labelled / "model"))
    head = FutureEntropyHead.from_pretrained(out / "head", model, tokenizer)
    assert head.config.label_settings["td_n"] == 4 and head.config.vocab_size == VOCAB
    other, other_tokenizer = load_model(str(labelled / "other"))
    with pytest.raises(ValueError, match="trained for another model"):
        FutureEntropyHead.from_pretrained(out / "head", other, other_tokenizer)


def test_a_fixed_horizon_head_trains_on_that_horizon_only(labelled, capsys):
    out, common = labelled / "fixed", ["--mlp-hidden", "16", "--epochs", "1", "--batch-size", "16"]
    assert main(["train-head", "--model", str(labelled / "model"), "--labels", str(labelled / "rollout"),
                 "--fixed-horizon", "4", *common, "--out", str(out)]) == 0
    model, tokenizer = load_model(str(labelled / "model"))
    head = FutureEntropyHead.from_pretrained(out / "head", model, tokenizer)
    assert head.config.fixed_horizon == 4 and head.horizon_for(7) == 4
    assert head.horizon_for(torch.tensor([0, 9])).tolist() == [4, 4]
    capsys.readouterr()
    assert main(["train-head", "--model", str(labelled / "model"), "--labels", str(labelled / "returns"),
                 "--fixed-horizon", "4", *common, "--out", str(labelled / "mixed")]) == 2
    assert "`--fixed-horizon` is 4, but the training rows" in capsys.readouterr().err
    assert main(["train-head", "--model", str(labelled / "model"), "--labels", str(labelled / "rollout"),
                 "--fixed-horizon", "0", "--out", str(labelled / "zero")]) == 2
    assert "`--fixed-horizon` must be a positive integer, but is 0" in capsys.readouterr().err


def test_train_head_is_the_same_head_whatever_ran_before(labelled):
    """--seed decides the initial weights too, not the process's random state before the run."""
    digests = []
    for index, noise in enumerate((0, 7)):
        torch.manual_seed(noise)
        torch.rand(noise)  # whatever else the process drew first
        out = labelled / f"seeded-{index}"
        assert main(["train-head", "--model", str(labelled / "model"), "--labels", str(labelled / "rollout"),
                     "--mlp-hidden", "16", "--epochs", "1", "--batch-size", "16", "--out", str(out)]) == 0
        digests.append((out / "head" / "head.safetensors").read_bytes())
    assert digests[0] == digests[1]


def test_train_head_refuses_labels_of_another_model(labelled, capsys):
    code = main(["train-head", "--model", str(labelled / "other"), "--labels", str(labelled / "returns"),
                 "--out", str(labelled / "wrong")])
    assert code == 2
    assert "labels were made with another model" in capsys.readouterr().err


def test_train_value_and_lookahead_fit_end_to_end(labelled, capsys):
    """`train-value` writes a value folder that `lookahead-fit --source lookahead-value:DIR` fits an alpha for,
    with its standard error and the held-out log loss; the one-step default fits too."""
    out = labelled / "value"
    assert main(["train-value", "--model", str(labelled / "model"), "--labels", str(labelled / "returns"),
                 "--mlp-hidden", "16", "--epochs", "2", "--batch-size", "16", "--val-fraction", "0.3",
                 "--out", str(out)]) == 0
    assert "lookahead-value:" in capsys.readouterr().out
    assert (out / "head" / "config.json").is_file() and json.loads((out / "metrics.json").read_text())["train_rows"] > 0
    texts = labelled / "texts"  # many files: documents on both sides of the fit / eval split
    texts.mkdir(exist_ok=True)
    rng = torch.Generator().manual_seed(1)
    for i in range(16):
        (texts / f"doc{i}.txt").write_text(word_text(rng, 30))
    common = ["--model", str(labelled / "model"), "--data", str(texts), "--fit-prompts", "4",
              "--eval-prompts", "3", "--prompt-tokens", "8", "--max-new-tokens", "6", "--batch-size", "4"]
    for source, top in ((None, 3), (f"lookahead-value:{out / 'head'}:alpha=fit:top=4:horizon=4", 4)):
        result_file = labelled / f"alpha-{top}.json"
        argv = ["lookahead-fit", *common, "--top", "3", "--out", str(result_file)]
        assert main(argv if source is None else [*argv, "--source", source]) == 0
        assert "alpha" in capsys.readouterr().out
        result = json.loads(result_file.read_text())
        assert result["top"] == top and result["source"] == (source or "one-step")
        assert result["fit"]["tokens"] == 4 * 6 and result["eval"]["tokens"] == 3 * 6
        assert result["alpha_stderr"] > 0 and torch.isfinite(torch.tensor(result["alpha"]))


def test_train_value_and_lookahead_fit_refuse_bad_input(labelled, capsys):
    assert main(["train-value", "--model", str(labelled / "other"), "--labels", str(labelled / "returns"),
                 "--out", str(labelled / "wrong-value")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["lookahead-fit", "--model", str(labelled / "model"), "--data", str(labelled / "text.txt"),
                 "--fit-prompts", "0"]) == 2
    assert "`--fit-prompts` must be a positive integer, but is 0" in capsys.readouterr().err
    assert main(["lookahead-fit", "--model", str(labelled / "model"), "--data", str(labelled / "text.txt"),
                 "--source", "lookahead-value:/no/such/folder:alpha=fit"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
