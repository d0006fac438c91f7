import sys

import pytest
import torch

from calibrated_sampling.mauve import compute_mauve, mauve_available


def test_identical_feature_sets_give_one_and_disjoint_sets_near_zero():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(200, 32, generator=gen)
    same = compute_mauve(p, p.clone(), seed=0)
    assert same["mauve"] == pytest.approx(1.0, abs=1e-6) and same["mauve_star"] == pytest.approx(1.0, abs=1e-6)
    assert same["num_clusters"] == 20 and len(same["frontier"]) == 25
    disjoint = compute_mauve(p, torch.randn(200, 32, generator=gen) * 0.3 + 3.0, seed=0)["mauve"]
    assert disjoint < 0.05
    half = torch.cat([torch.randn(100, 32, generator=gen), torch.randn(100, 32, generator=gen) + 2.0])
    assert disjoint < compute_mauve(p, half, seed=0)["mauve"] < 0.9


def test_clusters_never_exceed_the_number_of_texts_and_the_seed_is_used():
    gen = torch.Generator().manual_seed(1)
    p, q = torch.randn(3, 8, generator=gen), torch.randn(2, 8, generator=gen) + 1.0
    assert compute_mauve(p, q, num_clusters=50)["num_clusters"] == 5
    a, b = torch.randn(60, 8, generator=gen), torch.randn(60, 8, generator=gen)
    assert compute_mauve(a, b, seed=4) == compute_mauve(a, b, seed=4)


@pytest.mark.parametrize("p, q, kwargs, named", [
    (torch.zeros(0, 4), torch.ones(3, 4), {}, "p_features"),
    (torch.ones(3, 4), torch.ones(3), {}, "q_features"),
    (torch.ones(3, 4), torch.full((3, 4), float("nan")), {}, "q_features"),
    (torch.ones(3, 4), torch.ones(3, 5), {}, "same width"),
    (torch.ones(3, 4), torch.ones(3, 4), {"num_clusters": 0}, "num_clusters"),
    (torch.ones(3, 4), torch.ones(3, 4), {"scale": float("inf")}, "scale"),
    (torch.ones(3, 4), torch.ones(3, 4), {"explained_variance": 1.0}, "explained_variance"),
])
def test_bad_arguments_are_named(p, q, kwargs, named):
    with pytest.raises(ValueError, match=named):
        compute_mauve(p, q, **kwargs)


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mauve", None)  # makes `import mauve` fail as if it were not installed
    assert not mauve_available()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'calibrated-sampling\[mauve\]'"):
        compute_mauve(torch.ones(3, 4), torch.ones(3, 4))
