"""MAUVE (Pillutla et al. 2021) between generations and human text, with features from the LM itself.

Features (:func:`text_features`): the mean over a text's tokens of the LM's final hidden state (the
input of the output embedding), so nothing is downloaded. The score (:func:`compute_mauve`) is the
maintained ``mauve-text`` package's, given those features: both sets L2-normalised, projected by PCA
onto the components that explain 90% of the variance, quantised together by k-means (faiss) into
about n / 10 clusters; P and Q are the two cluster histograms. The divergence frontier is
(exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) for the mixtures R_l = l P + (1 - l) Q, and MAUVE is the
area under it (c = 5): 1 for identical distributions, near 0 for disjoint ones.

``mauve-text`` (GPLv3, with faiss-cpu and scikit-learn) is the optional extra ``mauve``:
``pip install 'calibrated-sampling[mauve]'``; without it :func:`compute_mauve` raises
ModuleNotFoundError saying so, and :func:`mauve_available` tells callers beforehand.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

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


def compute_mauve(p_features: torch.Tensor, q_features: torch.Tensor, num_clusters: int | None = None,
                  scale: float = SCALE, seed: int = 0, explained_variance: float = 0.9) -> dict:
    """MAUVE between two feature sets (rows are texts), computed by the ``mauve-text`` package.

    Returns {"mauve", "mauve_star", "num_clusters", "frontier"}: the MAUVE score (1 for identical sets,
    near 0 for disjoint ones), its variant on Krichevsky-Trofimov smoothed histograms (Pillutla et al.,
    JMLR 2023), the number of k-means clusters and the divergence frontier's points.
    ``num_clusters`` defaults to a tenth of the smaller set (at least 2), as MAUVE's default, and is at
    most the number of texts. Needs the ``mauve`` extra (``pip install 'calibrated-sampling[mauve]'``).

    >>> p = torch.randn(200, 16)
    >>> round(compute_mauve(p, p.clone())["mauve"], 6)
    1.0
    """
    mauve_text = _import_mauve_text()
    p_features, q_features = (torch.as_tensor(x).detach().double().cpu() for x in (p_features, q_features))
    for name, feats in (("p_features", p_features), ("q_features", q_features)):
        if feats.dim() != 2 or len(feats) < 1:
            raise ValueError(f"`{name}` must be a non-empty (N, D) tensor, but has shape {tuple(feats.shape)}")
        if not feats.isfinite().all():
            raise ValueError(f"`{name}` must be finite, but has {int((~feats.isfinite()).any(-1).sum())} rows "
                             "with NaN or infinite entries")
    if p_features.shape[1] != q_features.shape[1]:
        raise ValueError(f"`p_features` and `q_features` must have the same width, but have shapes "
                         f"{tuple(p_features.shape)} and {tuple(q_features.shape)}")
    if num_clusters is not None and (isinstance(num_clusters, bool) or not isinstance(num_clusters, int)
                                     or num_clusters < 1):
        raise ValueError(f"`num_clusters` must be a positive integer or None, but is {num_clusters!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be a finite positive number, but is {scale!r}")
    if not 0 < explained_variance < 1:
        raise ValueError(f"`explained_variance` must lie in (0, 1), but is {explained_variance!r}")
    clusters = num_clusters or max(2, round(min(len(p_features), len(q_features)) / 10))
    clusters = min(clusters, len(p_features) + len(q_features))  # k-means needs at least one text per cluster
    with _faiss_size_warning_dropped():
        out = mauve_text.compute_mauve(
            p_features=p_features.numpy(), q_features=q_features.numpy(), num_buckets=clusters,
            kmeans_explained_var=explained_variance, mauve_scaling_factor=scale, seed=seed, verbose=False)
    return {"mauve": float(out.mauve), "mauve_star": float(out.mauve_star), "num_clusters": int(out.num_buckets),
            "frontier": out.divergence_curve[1:-1].tolist()}


def mauve_available() -> bool:
    """Whether the ``mauve`` extra (the ``mauve-text`` package and its faiss and scikit-learn) is installed."""
    try:
        _import_mauve_text()
    except ImportError:
        return False
    return True


def _import_mauve_text():
    """The ``mauve`` module of the ``mauve-text`` package, or an ImportError that says how to install it."""
    try:
        import mauve  # the mauve-text package (absolute import: not this module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"MAUVE needs the optional `mauve-text` package ({error}); install it with "
            "pip install 'calibrated-sampling[mauve]'") from error
    return mauve


@contextlib.contextmanager
def _faiss_size_warning_dropped() -> Iterator[None]:
    """Drop faiss's "WARNING clustering N points to K centroids" from stderr and pass the rest on.

    MAUVE puts about 10 texts in a cluster by design and faiss asks for 39, so its C++ code prints that
    line on every call; it goes to file descriptor 2 directly, hence the redirection.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable file descriptor 2: leave stderr alone
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            rest = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("WARNING clustering ")]
            if rest:
                sys.stderr.write("".join(rest))
