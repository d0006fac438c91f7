"""The log-loss fit of alpha for any lookahead F (one-step, lookahead-value, two-step), from its spec.

The fit itself is :mod:`.lookahead_fit`'s: one teacher-forced pass records, per human token, log p of the
top C candidates and their F from the spec's F source; alpha minimises the human log loss by Newton's
method, with a sandwich standard error clustered by window (``stderr``; ``lookahead_fit.alpha_stderr``).
A head's F joins the same fit: ``head:HEAD_DIR:alpha=fit[:top=C][:horizon=K]`` reads a future-entropy head
(heads.py) on the context's own hidden state for the same top C candidates (:class:`HeadCandidates`), so the
shipped head, a distilled head and the lookaheads are weighed by one fit on equal terms (issue 15's league).

Here: specs with ``alpha=fit`` become F sources and, once fitted, the spec with the fitted alpha
(:func:`fit_spec_alpha`), and the same terms give one alpha per bin of steps (:func:`fit_alpha_bins`), the
per-step weights that ``FutureLookaheadProcessor`` takes. Training layer: it drives measurement passes.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .calibrator import head_files_digest, require_head_files
from .data import Window
from .heads import FutureEntropyHead
from .lookahead import DEFAULT_TOP, LookaheadEntropy, parse_lookahead
from .lookahead_fit import fit_alpha, lookahead_loss_terms
from .lookahead_value import (
    TwoStepLookahead,
    ValueLookahead,
    parse_lookahead2,
    parse_lookahead_value,
    parse_options,
)
from .samplers import format_number, parse_sampler
from .value import StateValueHead

HEAD_OPTIONS = {"alpha": None, "top": DEFAULT_TOP, "horizon": None, "sha256": None}


class HeadCandidates(LookaheadEntropy):
    """The top-C candidates of p and a head's F for each, f_k(h(x), v), from the hidden state of the
    teacher-forced pass (no lookahead pass: ``reads_hidden``). k is ``horizon`` at every step, or, when
    None, the steps left after this one (T - 1 - t), as the calibrator reads its head."""

    reads_hidden = True

    def __init__(self, model: PreTrainedModel, head: FutureEntropyHead, top: int, horizon: int | None = None):
        super().__init__(model, top)
        self.head, self.horizon = head, horizon

    def __call__(self, input_ids, logits, mask=None):
        raise TypeError("HeadCandidates reads the hidden state of a teacher-forced pass: call from_hidden")

    @torch.no_grad()
    def from_hidden(self, hidden: torch.Tensor, logp: torch.Tensor, step: int, steps: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, H) and log p (B, V) at step ``step`` of ``steps`` -> candidates (B, C), F (B, C) float32."""
        candidates = logp.topk(min(self.top, logp.shape[-1]), dim=-1).indices
        k = self.horizon if self.horizon is not None else self.head.horizon_for(steps - 1 - step)
        horizon = torch.full(hidden.shape[:1], k, device=hidden.device)
        return candidates, self.head(hidden, horizon).float().gather(-1, candidates)


def head_source(spec: str, model: PreTrainedModel) -> HeadCandidates:
    """The F source of a ``head:HEAD_DIR:alpha=X|fit[:top=C][:horizon=K][:sha256=D]`` spec; the head is
    refused for another LM, and for other files than a pinned ``sha256``."""
    folder, options = parse_options(spec, HEAD_OPTIONS)
    if not folder:
        raise ValueError(f"spec {spec!r} names no head folder: use head:HEAD_DIR:alpha=fit")
    if options["sha256"] not in (None, head_files_digest(folder)):
        raise ValueError(f"spec {spec!r} pins head files sha256 {options['sha256']}, but {folder} now holds "
                         f"{head_files_digest(folder)}")
    head = FutureEntropyHead.from_pretrained(folder, model).eval()
    return HeadCandidates(model, head, options["top"], options["horizon"])


def check_source(spec: str, name: str = "spec") -> None:
    """Check an F source spec as far as it goes without the model (its kind, options, and the files of its
    head or value folder), so that a command refuses it before loading the model; ``name``: the argument."""
    kind = spec.partition(":")[0].strip()
    if kind == "lookahead":
        options = parse_lookahead(spec)
    elif kind in ("head", "lookahead-value"):
        folder, options = parse_options(spec, HEAD_OPTIONS) if kind == "head" else parse_lookahead_value(spec)
        if not folder:
            raise ValueError(f"`{name}` {spec!r} names no folder: use {kind}:DIR:alpha=fit")
        require_head_files(folder)  # a missing folder, config.json or weights file (not hashed: they load later)
    elif kind == "lookahead2":
        options = parse_lookahead2(spec)
    else:
        raise ValueError(f"`{name}` must be a lookahead:, lookahead-value:, lookahead2: or head: spec, but is {spec!r}")
    if options.get("temperature", 1) != 1:  # F is made from p itself: a temperature of q would be lost
        raise ValueError(f"`{name}` {spec!r} sets a temperature, which an F source does not take: drop it")


def spec_source(spec: str, model: PreTrainedModel) -> LookaheadEntropy:
    """The F source of a ``lookahead:``, ``lookahead-value:``, ``lookahead2:`` or ``head:`` spec (its alpha
    is ignored)."""
    check_source(spec)
    kind = spec.partition(":")[0].strip()
    if kind == "head":
        return head_source(spec, model)
    if kind == "lookahead":
        return LookaheadEntropy(model, parse_lookahead(spec)["top"])
    if kind == "lookahead-value":
        folder, options = parse_lookahead_value(spec)
        return ValueLookahead(model, StateValueHead.from_pretrained(folder, model), options["top"], options["horizon"])
    options = parse_lookahead2(spec)
    return TwoStepLookahead(model, options["top"], options["top2"])


def with_alpha(spec: str, alpha: float) -> str:
    """``spec`` with its alpha term (``alpha=fit`` or ``alpha=X``) set to ``alpha``; ``lookahead:fit`` too."""
    terms = spec.strip().split(":")
    found = [i for i, term in enumerate(terms) if i > 0 and (term.strip().startswith("alpha=") or term.strip() == "fit")]
    if len(found) != 1:
        raise ValueError(f"`spec` must hold one alpha term (alpha=fit or alpha=X), but is {spec!r}")
    terms[found[0]] = f"alpha={format_number(alpha)}"
    return ":".join(terms)


def fit_spec_alpha(spec: str, model: PreTrainedModel, tokenizer, windows: list[Window],
                   batch_size: int = 8) -> dict:
    """Fit the alpha of a lookahead spec on ``windows`` (use the fit split).

    Returns lookahead_fit's result ({"alpha", "stderr", "stderr_model", "clusters", "log_loss",
    "log_loss_alpha0", "tokens", "in_top_fraction", ...}) plus ``top`` and ``spec``, the key of the fitted
    sampler. (Per-bin weights: :func:`fit_alpha_bins` on ``lookahead_loss_terms(..., source=spec_source(...))``.)
    """
    source = spec_source(spec, model)
    result = fit_alpha(lookahead_loss_terms(model, tokenizer, windows, source.top, batch_size, source))
    result["top"] = source.top
    fitted = with_alpha(spec, result["alpha"])  # a head: spec is no sampler (the calibrator samples a head's F)
    result["spec"] = fitted if isinstance(source, HeadCandidates) else parse_sampler(fitted, model).key
    return result


def fit_alpha_bins(terms: dict, bin_size: int) -> list[dict]:
    """One alpha per bin of ``bin_size`` steps (bin j: steps j * S .. j * S + S - 1), each a separate
    1-D fit on its tokens (F is fixed, so the bins decouple), with its own standard error."""
    if isinstance(bin_size, bool) or not isinstance(bin_size, int) or bin_size < 1:
        raise ValueError(f"`bin_size` must be a positive integer, but is {bin_size!r}")
    if "step" not in terms:
        raise ValueError("the terms hold no `step` (make them with lookahead_fit.lookahead_loss_terms)")
    bins = terms["step"] // bin_size
    fits = []
    for j in range(int(bins.max()) + 1 if len(bins) else 0):
        inside = bins == j
        fits.append({"bin": j, **fit_alpha({key: value[inside] for key, value in terms.items()})})
    return fits


def per_step_alphas(fits: list[dict], bin_size: int, steps: int) -> list[float]:
    """The per-step weights of :func:`fit_alpha_bins`' fits for a generation of ``steps`` steps (step t
    takes bin t // bin_size); a generation longer than the fitted bins is refused."""
    if steps > len(fits) * bin_size:
        raise ValueError(f"`steps` = {steps} is more than the {len(fits)} fitted bins of {bin_size} cover")
    return [fits[t // bin_size]["alpha"] for t in range(steps)]
