"""MAUVE (Pillutla et al. 2021) between generations and human text, in torch, with features from the LM itself.

Features: the mean over a text's tokens of the LM's final hidden state (the input of the output
embedding), so nothing is downloaded. Both sets are L2-normalised, projected by PCA onto the
components that explain 90% of the variance, quantised together by k-means into about n / 10
clusters; P and Q are the two cluster histograms. The divergence frontier is
(exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) for the mixtures R_l = l P + (1 - l) Q, and MAUVE is the
area under it (c = 5): 1 for identical distributions, near 0 for disjoint ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

SCALE = 5.0  # c in exp(-c KL)


@torch.no_grad()
def text_features(model: PreTrainedModel, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                  pad_id: int = 0) -> torch.Tensor:
    """Mean-pooled final hidden states of token sequences under ``model``: (N, H) float64 on the CPU.

    Empty sequences give NaN rows (drop them with ``features[~features.isnan().any(-1)]``).
    """
    decoder = model.get_decoder()
    out = torch.full((len(sequences), model.config.get_text_config().hidden_size), math.nan, dtype=torch.float64)
    rows = [i for i, seq in enumerate(sequences) if len(seq)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for k, i in enumerate(chunk):  # right padding: positions start at 0 for every row
            ids[k, :len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask[k, :len(sequences[i])] = 1
        hidden = decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         use_cache=False).last_hidden_state.double().cpu()  # (b, L, H)
        weights = mask.double()[..., None]
        out[chunk] = (hidden * weights).sum(1) / weights.sum(1)
    return out


def _pca(x: torch.Tensor, explained: float) -> torch.Tensor:
    """Project the rows of ``x`` (N, D) onto the leading principal components explaining ``explained``."""
    centred = x - x.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    if variance.sum() <= 0:
        return centred[:, :1] * 0
    keep = int((variance.cumsum(0) / variance.sum() < explained).sum().item()) + 1
    return centred @ vh[:keep].T


def kmeans(x: torch.Tensor, clusters: int, seed: int = 0, restarts: int = 5, iterations: int = 300) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``restarts`` by inertia: cluster index per row (N,)."""
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        while len(centres) < clusters:  # k-means++: next centre drawn with probability ∝ squared distance
            d2 = torch.cdist(x, centres).min(1).values ** 2
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator) if d2.sum() > 0 else \
                torch.randint(len(x), (1,), generator=generator)
            centres = torch.cat([centres, x[pick]])
        labels = None
        for _ in range(iterations):
            new = torch.cdist(x, centres).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for k in range(clusters):
                members = x[labels == k]
                if len(members):
                    centres[k] = members.mean(0)
        inertia = ((x - centres[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def divergence_frontier(p: torch.Tensor, q: torch.Tensor, scale: float = SCALE,
                        num_mixtures: int = 25) -> torch.Tensor:
    """Points (exp(-c KL(Q || R)), exp(-c KL(P || R))) for R = l P + (1 - l) Q, l from 1 to 0: (num_mixtures, 2)."""
    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    mix = torch.linspace(1 - 1e-6, 1e-6, num_mixtures, dtype=torch.float64)[:, None]
    r = mix * p + (1 - mix) * q  # (M, K)
    return torch.stack([torch.exp(-scale * kl(q, r)), torch.exp(-scale * kl(p, r))], dim=-1)


def compute_mauve(p_features: torch.Tensor, q_features: torch.Tensor, num_clusters: int | None = None,
          scale: float = SCALE, seed: int = 0, explained_variance: float = 0.9) -> dict:
    """MAUVE between two feature sets (rows are texts). Returns {"mauve", "num_clusters", "frontier"}.

    ``num_clusters`` defaults to a tenth of the smaller set (at least 2), as MAUVE's default.
    """
    p_features, q_features = p_features.double(), q_features.double()
    for name, feats in (("p_features", p_features), ("q_features", q_features)):
        if feats.dim() != 2 or len(feats) < 1:
            raise ValueError(f"`{name}` must be a non-empty (N, D) tensor, but has shape {tuple(feats.shape)}")
    clusters = num_clusters or max(2, round(min(len(p_features), len(q_features)) / 10))
    if clusters < 1:
        raise ValueError(f"`num_clusters` must be at least 1, but is {num_clusters!r}")
    both = torch.cat([p_features, q_features])
    both = both / both.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    clusters = min(clusters, len(both))
    labels = kmeans(_pca(both, explained_variance), clusters, seed=seed)
    p = torch.bincount(labels[:len(p_features)], minlength=clusters).double() / len(p_features)
    q = torch.bincount(labels[len(p_features):], minlength=clusters).double() / len(q_features)
    frontier = divergence_frontier(p, q, scale)
    # Close the curve at (0, 1) and (1, 0); the points run left to right as l goes from 1 to 0.
    points = torch.cat([torch.tensor([[0.0, 1.0]], dtype=torch.float64), frontier,
                        torch.tensor([[1.0, 0.0]], dtype=torch.float64)])
    area = torch.trapezoid(points[:, 1], points[:, 0]).item()
    return {"mauve": area, "num_clusters": clusters, "frontier": frontier.tolist()}
