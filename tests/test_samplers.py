import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from calibrated_sampling.samplers import parse_sampler, split_specs


def test_specs_build_transformers_warpers_in_order():
    sampler = parse_sampler("temperature=0.5+top_p=0.9")
    assert [type(p) for p in sampler.processors] == [TemperatureLogitsWarper, TopPLogitsWarper]
    assert sampler.truncating
    assert not parse_sampler("temperature=0.7").truncating
    assert len(parse_sampler("base").processors) == 0


def test_hand_computed_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    q = parse_sampler("temperature=0.5").processors(None, logits)
    torch.testing.assert_close(q, logits / 0.5)
    q = parse_sampler("top_p=0.8").processors(None, logits)
    assert torch.isinf(q[0, 2:]).all() and torch.isfinite(q[0, :2]).all()
    # The processor list gives the same as calling the warper directly.
    torch.testing.assert_close(LogitsProcessorList([TopPLogitsWarper(0.8)])(None, logits), q)


@pytest.mark.parametrize("spec", ["top_k=5", "min_p=0.1", "typical_p=0.9", "eta=0.001", "epsilon=0.001"])
def test_every_truncating_spec_parses(spec):
    sampler = parse_sampler(spec)
    assert sampler.truncating and len(sampler.processors) == 1


@pytest.mark.parametrize("spec, message", [
    ("greedy", "unknown sampler spec 'greedy'"),
    ("top_p=abc", "`top_p` needs a float, but is 'abc'"),
    ("top_p=1.5", "top_p"),
    ("temperature=0.9+foo=1", "term 'foo=1'"),
])
def test_bad_specs_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_sampler(spec)


def test_split_specs():
    assert split_specs("base, top_p=0.9,") == ["base", "top_p=0.9"]
    with pytest.raises(ValueError, match="at least one"):
        split_specs(" , ")
