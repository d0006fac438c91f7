import json

import pytest
import torch
from conftest import EOS_ID, VOCAB, make_model, make_tokenizer
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from calibrated_sampling import label_store as S
from calibrated_sampling import labels as L
from calibrated_sampling.data import Window
from calibrated_sampling.metrics import entropy
from calibrated_sampling.models import prepare_tokenizer


class EosBoost(LogitsProcessor):
    """Makes EOS likelier, so that short tests see sequences and rollouts end."""

    def __init__(self, bonus: float):
        self.bonus = bonus

    def __call__(self, input_ids, scores):
        return scores + torch.nn.functional.one_hot(torch.tensor(EOS_ID), scores.shape[-1]) * self.bonus


def q_processors(bonus=2.5):
    return LogitsProcessorList([EosBoost(bonus), TemperatureLogitsWarper(0.8)])


@pytest.fixture
def tiny():
    model, tok = make_model(), make_tokenizer()
    prepare_tokenizer(tok, model)
    return model, tok


def windows_of(prompt_lengths, steps, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(prompt_lengths):
        ids = torch.randint(3, VOCAB, (p + steps,), generator=rng).tolist()
        out.append(Window(tuple(ids[:p]), tuple(ids[p:]), f"doc{i}", "test"))
    return out


def full_pass(model, ids, processors):
    """Brute force: one forward over the whole sequence, no cache, no padding -> (states, q scores) per position."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        states = model.get_decoder()(input_ids=ids_t).last_hidden_state[0]  # (n, H)
        logits = model.get_output_embeddings()(states).float()  # (n, V)
    scores = torch.stack([processors(ids_t[:, :i + 1], logits[i:i + 1])[0] for i in range(len(ids))])
    return states, scores


def last_scores(model, ids, processors):
    """Brute force: q after ``ids`` from a full forward without cache."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids_t).logits[:, -1].float()
    return processors(ids_t, logits)[0]


def run(model, tok, windows, kind, path, **kw):
    settings = dict(max_new_tokens=10, batch_size=3, seed=0, candidates=3, rollouts=2, positions=2, progress=False)
    settings.update(kw)
    return L.make_labels(model, tok, windows, kind, path, **settings)


def test_returns_equal_a_brute_force_recomputation(tiny, tmp_path):
    model, tok = tiny
    windows, steps = windows_of([4, 9, 6, 7], 10), 10
    manifest = run(model, tok, windows, "returns", tmp_path / "r", logits_processor=q_processors())
    rows = S.load_labels(tmp_path / "r")
    assert manifest["counts"]["rows"] == len(rows["token"]) and len(manifest["shards"]) == 2
    lengths = rows["samples.length"]
    assert (lengths < steps).any() and (lengths == steps).any()  # some samples end at EOS, some run through
    assert rows["hidden"].dtype == torch.float32
    for s, window in enumerate(windows):
        mine = rows["sample_id"] == s
        n = int(lengths[s])
        assert rows["step"][mine].tolist() == list(range(n))  # one row per running step, in order
        tokens = rows["token"][mine].tolist()
        assert (tokens[-1] == EOS_ID) == (n < steps) and EOS_ID not in tokens[:-1]
        prompt = list(window.prompt_ids)
        states, scores = full_pass(model, prompt + tokens, q_processors())
        ent = entropy(scores[len(prompt) - 1:len(prompt) - 1 + n])  # H at steps 0..n-1
        torch.testing.assert_close(rows["samples.entropy"][s, :n], ent, atol=1e-4, rtol=0)
        assert (rows["samples.entropy"][s, n:] == 0).all()
        later = torch.tensor([ent[t + 1:].sum() for t in range(n)])
        torch.testing.assert_close(rows["target"][mine], later, atol=1e-3, rtol=0)
        torch.testing.assert_close(rows["context_entropy"][mine], ent, atol=1e-4, rtol=0)
        assert rows["horizon"][mine].tolist() == [steps - 1 - t for t in range(n)]
        torch.testing.assert_close(rows["hidden"][mine], states[len(prompt) - 1:len(prompt) - 1 + n], atol=1e-4, rtol=0)
    assert torch.equal(rows["context_id"], rows["sample_id"] * steps + rows["step"])  # one context per row


def test_returns_horizon_caps_the_sum(tiny, tmp_path):
    model, tok = tiny
    full = L.returns_labels(model, windows_of([5, 5], 10), max_new_tokens=10, seed=3, pad_token_id=0,
                            stop_at_eos=False)
    capped = L.returns_labels(model, windows_of([5, 5], 10), max_new_tokens=10, seed=3, pad_token_id=0,
                              stop_at_eos=False, horizon=3)
    assert torch.equal(full["token"], capped["token"])
    ent = full["samples.entropy"]
    for i in range(len(full["token"])):
        s, t = int(full["sample_id"][i]), int(full["step"][i])
        assert int(capped["horizon"][i]) == min(3, 9 - t)
        assert capped["target"][i].item() == pytest.approx(ent[s, t + 1:t + 4].sum().item(), abs=1e-4)


def test_rollout_equals_replay_of_the_same_noise_without_cache_sharing(tiny, tmp_path):
    model, tok = tiny
    windows, steps, m = windows_of([5, 8, 3], 8, seed=1), 8, 2
    processors = q_processors(bonus=2.0)
    run(model, tok, windows, "rollout", tmp_path / "r", max_new_tokens=steps, batch_size=2, rollouts=m,
        logits_processor=processors)
    rows = S.load_labels(tmp_path / "r")
    c1 = 4  # the human token and the top 3 others
    assert len(rows["token"]) == len(windows) * 2 * c1
    assert "samples.id" not in rows
    ended = 0
    i = 0
    for batch_index, batch in enumerate([windows[:2], windows[2:]]):
        batch_seed = L.derive_seed(0, batch_index)
        js = L.rollout_steps(L.derive_seed(batch_seed, "positions"), steps, 2)
        for b, window in enumerate(batch):
            for j in js:
                context = list(window.prompt_ids) + list(window.continuation_ids[:j])
                states, scores = full_pass(model, context, processors)
                q = scores[-1]
                human = window.continuation_ids[j]
                others = q.clone()
                others[human] = float("-inf")
                candidates = [human] + others.topk(3).indices.tolist()
                row = slice(i, i + c1)
                assert rows["token"][row].tolist() == candidates
                assert rows["human"][row].tolist() == [True, False, False, False]
                assert rows["step"][row].tolist() == [j] * c1 and rows["horizon"][row].tolist() == [steps - 1 - j] * c1
                assert rows["context_id"][row].tolist() == [(2 * batch_index + b) * steps + j] * c1
                torch.testing.assert_close(rows["context_entropy"][row], entropy(q).expand(c1), atol=1e-4, rtol=0)
                torch.testing.assert_close(rows["hidden"][row], states[-1].expand(c1, -1), atol=1e-4, rtol=0)
                for c, candidate in enumerate(candidates):
                    for r in range(m):
                        # Replay: the prefix's own generator, one (m, V) draw per step, row r; full forwards.
                        generator = torch.Generator().manual_seed(L.derive_seed(batch_seed, "rollout", b, j))
                        seq, total, running = context + [candidate], 0.0, candidate != EOS_ID
                        for k in range(1, steps - j):
                            if not running:
                                break
                            sc = last_scores(model, seq, processors)
                            total += entropy(sc).item()
                            if k == steps - 1 - j:
                                break
                            noise = L.gumbel_noise(generator, (m, VOCAB), torch.device("cpu"))[r]
                            token = int((sc + noise).argmax())
                            running = token != EOS_ID
                            ended += not running
                            seq.append(token)
                        assert rows["rollout_returns"][i + c, r].item() == pytest.approx(total, abs=1e-3)
                    assert rows["target"][i + c].item() == pytest.approx(rows["rollout_returns"][i + c].mean().item(), abs=1e-5)
                i += c1
    assert ended > 0  # some rollouts stopped at EOS


def test_common_random_numbers_share_the_noise_across_candidates(tiny):
    """Two copies of one candidate get identical rollouts draw for draw (the same noise), while the
    rollouts of one candidate differ from each other (independent noise across rollouts)."""
    model, _ = tiny
    context = torch.tensor([[5, 17, 42, 8, 61]])
    ones = torch.ones_like(context)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.get_decoder()(input_ids=context, attention_mask=ones, position_ids=torch.arange(5)[None], cache=cache,
                            use_cache=True)
        sums = L._rollout_returns(model, cache, context, ones, torch.tensor([[7, 7, 9]]), rollouts=4, horizon=6,
                                  seeds=[123], logits_processor=None, eos=L._eos_tensor(model), stop_at_eos=False)
    assert sums.shape == (1, 3, 4)
    assert torch.equal(sums[0, 0], sums[0, 1])
    assert len(set(sums[0, 0].tolist())) == 4 and not torch.equal(sums[0, 0], sums[0, 2])


def test_teacher_forced_equals_a_full_forward(tiny, tmp_path):
    model, tok = tiny
    windows, steps = windows_of([4, 7], 6), 6
    run(model, tok, windows, "teacher-forced", tmp_path / "t", max_new_tokens=steps, horizon=3,
        logits_processor=q_processors())
    rows = S.load_labels(tmp_path / "t")
    assert len(rows["token"]) == 2 * steps
    for s, window in enumerate(windows):
        ids = list(window.prompt_ids) + list(window.continuation_ids)
        states, scores = full_pass(model, ids, q_processors())
        p = len(window.prompt_ids)
        ent = entropy(scores[p - 1:-1])
        mine = rows["sample_id"] == s
        assert rows["token"][mine].tolist() == list(window.continuation_ids)
        torch.testing.assert_close(rows["samples.entropy"][s], ent, atol=1e-4, rtol=0)
        torch.testing.assert_close(rows["target"][mine], torch.stack([ent[t + 1:t + 4].sum() for t in range(steps)]),
                                   atol=1e-4, rtol=0)
        assert rows["horizon"][mine].tolist() == [min(3, steps - 1 - t) for t in range(steps)]
        torch.testing.assert_close(rows["hidden"][mine], states[p - 1:-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["returns", "rollout"])
def test_resume_after_interruption_gives_identical_shards(tiny, tmp_path, monkeypatch, kind):
    model, tok = tiny
    windows = windows_of([4, 6, 5, 7, 3], 8)
    kw = dict(max_new_tokens=8, batch_size=2, logits_processor=q_processors())
    whole = run(model, tok, windows, kind, tmp_path / "whole", **kw)
    assert len(whole["shards"]) == 3 and whole["complete"]

    calls = []
    label_batch, write_manifest = L._label_batch, L.write_manifest

    def crash_in_batch(*args, **kwargs):  # killed while labelling the second batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return label_batch(*args, **kwargs)

    monkeypatch.setattr(L, "_label_batch", crash_in_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, windows, kind, tmp_path / "cut", **kw)
    partial = S.read_manifest(tmp_path / "cut")
    assert len(partial["shards"]) == 1 and not partial["complete"]

    def crash_after_shard(directory, manifest):  # killed between the shard's rename and the manifest update
        if len(manifest["shards"]) == 2:
            raise KeyboardInterrupt
        write_manifest(directory, manifest)

    monkeypatch.setattr(L, "_label_batch", label_batch)
    monkeypatch.setattr(L, "write_manifest", crash_after_shard)
    with pytest.raises(KeyboardInterrupt):
        run(model, tok, windows, kind, tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / "shard-00001.safetensors").exists()
    assert len(S.read_manifest(tmp_path / "cut")["shards"]) == 1

    monkeypatch.setattr(L, "write_manifest", write_manifest)
    resumed = run(model, tok, windows, kind, tmp_path / "cut", **kw)
    assert resumed == whole
    for entry in whole["shards"]:
        assert (tmp_path / "cut" / entry["file"]).read_bytes() == (tmp_path / "whole" / entry["file"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    # A finished folder is left as it is.
    assert run(model, tok, windows, kind, tmp_path / "cut", **kw) == whole


def test_corrupt_or_missing_shard_is_an_error_naming_the_file(tiny, tmp_path):
    model, tok = tiny
    windows = windows_of([4, 6, 5], 8)
    run(model, tok, windows, "returns", tmp_path / "r", max_new_tokens=8, batch_size=2)
    path = tmp_path / "r" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit in the tensor data: still parses, wrong numbers
    path.write_bytes(bytes(data))
    with pytest.raises(S.CorruptShardError, match="shard-00001.safetensors"):
        S.load_labels(tmp_path / "r")
    with pytest.raises(S.CorruptShardError, match="shard-00001"):
        list(S.iter_shards(tmp_path / "r"))
    with pytest.raises(S.CorruptShardError, match="shard-00001"):  # nor is a damaged folder resumed
        run(model, tok, windows, "returns", tmp_path / "r", max_new_tokens=8, batch_size=2)
    path.unlink()
    with pytest.raises(S.CorruptShardError, match="shard-00001.safetensors is missing"):
        S.load_labels(tmp_path / "r")


@pytest.mark.parametrize("kind", ["returns", "rollout", "teacher-forced"])
def test_hidden_states_are_a_cache_rebuilt_from_the_token_ids(tiny, tmp_path, kind):
    model, tok = tiny
    windows = windows_of([4, 9, 6], 8)
    run(model, tok, windows, kind, tmp_path / "l", max_new_tokens=8, batch_size=2, logits_processor=q_processors())
    folder = tmp_path / "l"
    for shard in S.iter_shards(folder):  # the committed part: ids and targets, no hidden states
        assert "hidden" not in shard and shard["windows.ids"].dtype == torch.long
    labelled = S.load_labels(folder)  # the cache written while labelling
    caches = sorted(folder.glob("hidden-*.safetensors"))
    assert len(caches) == 2
    for cache in caches:
        cache.unlink()
    with pytest.raises(S.MissingHiddenError, match="hidden-00000.safetensors is missing.*pass `model=`"):
        S.load_labels(folder)
    rebuilt = S.load_labels(folder, model=model)
    assert rebuilt.keys() == labelled.keys()
    torch.testing.assert_close(rebuilt["hidden"], labelled["hidden"], atol=1e-4, rtol=0)
    assert torch.equal(rebuilt["target"], labelled["target"])
    # A damaged cache is rebuilt, not read; and no model, no rebuild.
    data = bytearray(caches[1].read_bytes())
    data[-3] ^= 0x01
    caches[1].write_bytes(bytes(data))
    with pytest.raises(S.MissingHiddenError, match="hidden-00001.safetensors is corrupt"):
        S.load_labels(folder)
    torch.testing.assert_close(S.load_labels(folder, model=model)["hidden"], labelled["hidden"], atol=1e-4, rtol=0)
    assert torch.equal(S.load_labels(folder)["hidden"], rebuilt["hidden"])  # rewritten
    assert "hidden" not in S.load_labels(folder, hidden=False)
    caches[0].unlink()
    with pytest.raises(ValueError, match="another model"):  # states of another LM would be garbage
        S.load_labels(folder, model=make_model(seed=1))


def test_resume_with_other_settings_or_model_is_an_error(tiny, tmp_path):
    model, tok = tiny
    windows = windows_of([4, 6, 5], 8)
    kw = dict(max_new_tokens=8, batch_size=2)
    run(model, tok, windows, "returns", tmp_path / "r", **kw)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        run(model, tok, windows, "returns", tmp_path / "r", **{**kw, "seed": 1})
    with pytest.raises(ValueError, match="kind"):
        run(model, tok, windows, "teacher-forced", tmp_path / "r", **kw)
    with pytest.raises(ValueError, match="model"):
        run(make_model(seed=1), tok, windows, "returns", tmp_path / "r", **kw)
    with pytest.raises(ValueError, match="windows"):
        run(model, tok, windows_of([4, 6, 5], 8, seed=9), "returns", tmp_path / "r", **kw)
    with pytest.raises(ValueError, match="q: 'base'"):
        run(model, tok, windows, "returns", tmp_path / "r", logits_processor=q_processors(), **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not empty"):
        run(model, tok, windows, "returns", tmp_path / "other", **kw)


def test_settings_are_checked_and_recorded(tiny, tmp_path):
    model, tok = tiny
    windows = windows_of([4, 6], 8)
    with pytest.raises(ValueError, match="`kind`"):
        run(model, tok, windows, "sarsa", tmp_path / "a")
    with pytest.raises(ValueError, match="`positions`"):
        run(model, tok, windows, "rollout", tmp_path / "b", max_new_tokens=8, positions=8)
    with pytest.raises(ValueError, match=r"windows\[0\] has only 8"):
        run(model, tok, windows, "rollout", tmp_path / "c", max_new_tokens=9)
    manifest = run(model, tok, windows, "rollout", tmp_path / "d", max_new_tokens=8, hidden_dtype="bfloat16",
                   logits_processor=q_processors(), data_spec="random words")
    on_disk = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert on_disk == manifest
    settings = manifest["settings"]
    assert settings["kind"] == "rollout" and settings["candidates"] == 3 and settings["data_spec"] == "random words"
    assert settings["model"]["vocab_size"] == VOCAB and "EosBoost(bonus=2.5)" in settings["q"]
    assert S.load_labels(tmp_path / "d")["hidden"].dtype == torch.bfloat16
    returns = run(model, tok, windows, "returns", tmp_path / "e", max_new_tokens=8)["settings"]
    assert returns["candidates"] is None and returns["rollouts"] is None  # irrelevant to returns: not recorded


def brute_force_td(rows, predict, n, lam):
    """The definition, row by row: G(k) = k rewards + bootstrap at k (k < L), mixed with lambda weights."""
    index = {(int(s), int(t)): i for i, (s, t) in enumerate(zip(rows["sample_id"], rows["step"]))}

    def k_step_return(s, t, h, run_, k):
        value = rows["samples.entropy"][s, t + 1:t + 1 + min(k, run_)].double().sum().item()
        if k < run_:
            j = index[(s, t + k)]
            value += predict(rows["hidden"][j:j + 1], rows["token"][j:j + 1], torch.tensor([h - k])).item()
        return value

    out = []
    for i in range(len(rows["token"])):
        s, t, h = int(rows["sample_id"][i]), int(rows["step"][i]), int(rows["horizon"][i])
        run_ = max(0, min(h, int(rows["samples.length"][s]) - 1 - t))
        depth = run_ if n is None else min(n, run_)
        if depth == 0:
            out.append(0.0)
            continue
        mixed = (1 - lam) * sum(lam ** (k - 1) * k_step_return(s, t, h, run_, k) for k in range(1, depth))
        out.append(mixed + lam ** (depth - 1) * k_step_return(s, t, h, run_, depth))
    return torch.tensor(out)


def test_bootstrapped_targets_equal_a_brute_force_loop(tiny):
    model, _ = tiny
    rows = L.returns_labels(model, windows_of([4, 6, 5, 7], 12), max_new_tokens=12, seed=1, pad_token_id=0,
                            logits_processor=q_processors(), horizon=7)
    assert (rows["samples.length"] < 12).any()
    calls = []

    def predict(hidden, token, horizon):
        calls.append(len(token))
        return hidden.sum(-1) * 0.1 + token * 0.01 + horizon.double() * 0.5

    for n, lam in [(None, 1.0), (1, 0.0), (3, 1.0), (None, 0.7), (4, 0.5), (None, 0.0), (2, 0.3)]:
        mine = L.bootstrapped_targets(rows, predict, n=n, lam=lam, chunk_size=7)
        torch.testing.assert_close(mine, brute_force_td(rows, predict, n, lam).float(), atol=1e-4, rtol=0)
    assert calls and max(calls) <= 7
    # Monte Carlo: the stored target. One-step TD: next entropy + the prediction one step later.
    torch.testing.assert_close(L.bootstrapped_targets(rows, predict), rows["target"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="`lam`"):
        L.bootstrapped_targets(rows, predict, lam=1.5)


def test_td_lambda_satisfies_its_recursion(tiny):
    """Without a cap the lambda-return obeys G_t = H_{t+1} + (1 - lam) V_{t+1} + lam G_{t+1} (an independent check)."""
    model, _ = tiny
    rows = L.returns_labels(model, windows_of([4, 6], 10), max_new_tokens=10, seed=1, pad_token_id=0,
                            stop_at_eos=False)
    predict = lambda h, tok, hz: torch.sin(h.sum(-1)) + hz.double() * 0.3  # noqa: E731
    lam = 0.6
    g = L.bootstrapped_targets(rows, predict, lam=lam).double()
    values = predict(rows["hidden"], rows["token"], rows["horizon"]).double()
    for i in range(len(g) - 1):
        if rows["sample_id"][i] == rows["sample_id"][i + 1] and rows["horizon"][i + 1] > 0:
            s, t = int(rows["sample_id"][i]), int(rows["step"][i])
            expect = rows["samples.entropy"][s, t + 1].double() + (1 - lam) * values[i + 1] + lam * g[i + 1]
            assert g[i].item() == pytest.approx(expect.item(), abs=1e-4)


@pytest.mark.slow
def test_labels_on_the_default_model(smollm, tmp_path):
    from calibrated_sampling.data import load_documents, make_windows

    model, tok = smollm
    windows = make_windows(load_documents("pydoc"), tok, 2, prompt_tokens=16, continuation_tokens=8, split="fit")
    for kind in L.KINDS:
        manifest = L.make_labels(model, tok, windows, kind, tmp_path / kind, max_new_tokens=8, batch_size=2,
                                 candidates=2, rollouts=2, positions=2, progress=False, data_spec="pydoc")
        rows = S.load_labels(tmp_path / kind)
        assert manifest["counts"]["rows"] == len(rows["target"]) > 0
        assert rows["hidden"].shape[1] == 576 and torch.isfinite(rows["target"]).all()
        assert (rows["target"] >= 0).all() and (rows["horizon"] <= 7).all()
        assert manifest["settings"]["tokenizer"] and manifest["settings"]["model"]["vocab_size"] == 49152
