"""The entropy-matched fit on a Markov chain, where every expectation is exact (the proof of the method).

The "language model" is a Markov chain over n tokens: the context is the previous token, the human
process has transitions P* (n, n), the base model p (n, n), and the prompt's last token is drawn from
an initial distribution. The schedule is that of the language model (entropy_fit.py):

    q_t(v | s)  ∝  exp( a_j log p(v | s)  -  b_j F_t(v) ),        j = t // bin_size

with F_t(v) either 0 or the exact entropy-to-go from token v at step t + 1 under the *adjusted*
chain (the paper's F, by dynamic programming backwards from the last step). Where the language-model
fit samples, this module takes exact expectations: the generation entropy of step t is the entropy of
q_t averaged over the chain's own state distribution at t, and the log loss of step t is the
cross-entropy of q_t against P* averaged over the human state distribution at t. The rounds and the
update are the language model's own (:func:`entropy_fit.match_update`), so this checks that code, not
a copy of it; only the measurement is exact, and the stopping rule is a tolerance instead of a
standard error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .entropy_fit import DEFAULT_MULTIPLIERS, HUMAN_KEYS, bin_means, human_sums, match_update
from .fit import _row_entropy, markov_measures, tensor_chunks

FUTURES = ("none", "exact")
NEWTON = ("full", "diagonal")


def _transitions(logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, future: torch.Tensor,
                 bin_of_step: torch.Tensor) -> torch.Tensor:
    """q_t (T, n, n) of the schedule (a, b per bin) with F_t (T, n)."""
    a_t, b_t = a[bin_of_step], b[bin_of_step]
    return torch.softmax(a_t[:, None, None] * logp - b_t[:, None, None] * future[:, None, :], -1)


def _adjusted_future(logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bin_of_step: torch.Tensor) -> torch.Tensor:
    """F_t (T, n): the entropy-to-go after step t under the chain the schedule itself defines.

    Backwards: step T - 1 has F = 0, so q_{T-1} is known; F_{T-2} is the entropy-to-go under it; and so on.
    """
    steps, n = len(bin_of_step), logp.shape[0]
    future = torch.zeros(steps, n, dtype=torch.float64)
    to_go = torch.zeros(n, dtype=torch.float64)
    for t in reversed(range(steps)):
        future[t] = to_go
        j = bin_of_step[t]
        q = torch.softmax(a[j] * logp - b[j] * to_go[None, :], -1)
        to_go = _row_entropy(q) + q @ to_go
    return future


def _generation(own: torch.Tensor, logp: torch.Tensor, q: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor,
                future: torch.Tensor) -> torch.Tensor:
    """Per step (T, 3): E_own [H(q_t), dH/da, dH/db], own (T, n) the chain's own state distribution."""
    logits = a_t[:, None, None] * logp - b_t[:, None, None] * future[:, None, :]  # (T, n, n)
    centred = logits - (q * logits).sum(-1, keepdim=True)
    d_lp = logp - (q * logp).sum(-1, keepdim=True)
    d_f = future[:, None, :] - (q * future[:, None, :]).sum(-1, keepdim=True)
    per_state = torch.stack([_row_entropy(q), -(q * d_lp * centred).sum(-1), (q * d_f * centred).sum(-1)], -1)
    return (own[..., None] * per_state).sum(1)


def markov_entropy_fit(human: torch.Tensor, model: torch.Tensor, initial: torch.Tensor, max_new_tokens: int, *,
                       bin_size: int = 1, future: str = "none",
                       multipliers: Sequence[float] | float = DEFAULT_MULTIPLIERS, newton: str = "diagonal",
                       max_rounds: int = 200, tol: float = 1e-10, b_damping: float = 1.0) -> dict:
    """The entropy-matched fit of the Markov chain ``model`` to the human chain ``human`` (both (n, n), full
    support), prompts ending in a token drawn from ``initial`` (n,).

    Args:
        future: ``"none"`` (F = 0, a per-step temperature schedule) or ``"exact"`` (F the entropy-to-go
            under the adjusted chain, recomputed every round).
        multipliers: the grid of the global multiplier of the log-loss b, or one fixed multiplier.
        newton: ``"diagonal"``: each bin's own closed-form slope, as the language-model fit does;
            ``"full"``: the total derivatives of every gap in every a and b, by finite differences of the
            exact measurement (exact F makes each bin's gap depend on the later bins' weights, and with a
            large weight on F the diagonal step oscillates; see tests/test_entropy_fit.py).
        tol: stop when every bin's |generation entropy - log loss| is at most this.
        b_damping: see :func:`entropy_fit.match_update`.

    Returns ``a``, ``b`` (num_bins,), ``transitions`` (T, n, n), ``future`` (T, n), ``measures``
    (:func:`fit.markov_measures` of the result: per-step log loss and generation entropy), ``log_loss``
    (mean over steps), ``multiplier``, ``rounds``, ``converged``, ``max_abs_gap`` and ``history``.
    """
    if future not in FUTURES:
        raise ValueError(f"`future` must be one of {', '.join(FUTURES)}, but is {future!r}")
    if newton not in NEWTON:
        raise ValueError(f"`newton` must be one of {', '.join(NEWTON)}, but is {newton!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("bin_size", bin_size), ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    human, logp, initial = human.double(), model.double().log(), initial.double()
    n, steps = len(initial), max_new_tokens
    bin_of_step = torch.arange(steps) // bin_size
    num_bins = int(bin_of_step[-1]) + 1
    human_dist = [initial]
    for _ in range(steps - 1):
        human_dist.append(human_dist[-1] @ human)
    state, token = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)  # rows: every (s, v) pair
    # Each step weighs 1 in total, so a bin's mean is the mean over its steps, as for the language model.
    weight = torch.stack([d[state] * human[state, token] for d in human_dist]).reshape(-1)  # (T * n * n,)
    step_of_row = torch.arange(steps).repeat_interleave(n * n)
    steps_per_bin = torch.bincount(bin_of_step, minlength=num_bins).double()

    def measure(a: torch.Tensor, b: torch.Tensor) -> dict:
        """The exact counterpart of one round's sampling and teacher forcing, for the schedule (a, b)."""
        f = _adjusted_future(logp, a, b, bin_of_step) if future == "exact" else torch.zeros(steps, n,
                                                                                                 dtype=torch.float64)
        q = _transitions(logp, a, b, f, bin_of_step)
        own = [initial]
        for t in range(steps - 1):
            own.append(own[-1] @ q[t])
        per_step = _generation(torch.stack(own), logp, q, a[bin_of_step], b[bin_of_step], f)  # (T, 3)
        per_bin = torch.zeros(num_bins, 3, dtype=torch.float64).index_add_(0, bin_of_step, per_step)
        per_bin = per_bin / steps_per_bin[:, None]
        chunks = tensor_chunks(logp[state].repeat(steps, 1), f[step_of_row], token.repeat(steps),
                               bin_of_step[step_of_row], weight)

        def exact_human(ab: torch.Tensor, keys: tuple[str, ...] = HUMAN_KEYS) -> dict:
            return bin_means(human_sums(chunks, ab, 1, keys))

        now = exact_human(torch.stack([a, b], -1)[:, None])
        return {"gen": {"entropy": per_bin[:, 0], "dh_da": per_bin[:, 1], "dh_db": per_bin[:, 2]},
                "human": exact_human, "gap": per_bin[:, 0] - now["loss"][:, 0], "q": q, "future": f,
                "log_loss": float((now["loss"][:, 0] * now["tokens"][:, 0]).sum() / now["tokens"].sum())}

    def jacobian(a: torch.Tensor, b: torch.Tensor, gap: torch.Tensor, which: int, eps: float = 1e-6) -> torch.Tensor:
        """d gap_i / d (a or b)_j by forward differences: (num_bins, num_bins)."""
        columns = []
        for j in range(num_bins):
            moved = [a.clone(), b.clone()]
            moved[which][j] += eps
            columns.append((measure(*moved)["gap"] - gap) / eps)
        return torch.stack(columns, 1)

    a = torch.ones(num_bins, dtype=torch.float64)
    b = torch.zeros(num_bins, dtype=torch.float64)
    multiplier, converged, history = 0.0, False, []
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (reported)
        now = measure(a, b)
        gap = now["gap"]
        history.append({"max_abs_gap": float(gap.abs().max()), "multiplier": multiplier, "log_loss": now["log_loss"]})
        if gap.abs().max() <= tol:
            converged = True
            break
        if rounds == max_rounds:
            break
        gen = dict(now["gen"])
        if newton == "full":
            gen["jac_a"] = jacobian(a, b, gap, 0)
            gen["jac_b"] = jacobian(a, b, gap, 1) if future == "exact" else torch.zeros(num_bins, num_bins,
                                                                                          dtype=torch.float64)
        update = match_update(a, b, gen, now["human"], use_future=future == "exact", multipliers=multipliers,
                              b_damping=b_damping)
        a, b, multiplier = update["a"], update["b"], update["multiplier"]
    measures = markov_measures(human, now["q"], initial)
    return {"a": a, "b": b, "transitions": now["q"], "future": now["future"], "measures": measures,
            "log_loss": float(measures["log_loss"].mean()), "multiplier": multiplier, "rounds": rounds,
            "converged": converged, "max_abs_gap": float(gap.abs().max()), "history": history}


def drift_example(seed: int = 0, half: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(human, model, initial) of a 2 * ``half``-token chain whose model drifts as a language model does.

    The first half of the tokens are "sure" (after one, the next token is nearly determined), the
    second half "unsure" (a flat choice). The human returns from unsure to sure tokens quickly; the
    model leaves sure tokens a little more often and, once unsure, stays unsure much longer. Prompts end
    in a sure token, so along the model's own samples the share of unsure states, and with it the
    entropy, climbs over a dozen steps, while the human log loss, measured on human prefixes, stays
    near its start: the drift of an LM, in a form no temperature undoes (temperature sharpens the
    sure rows as much as the unsure ones).
    """
    g = torch.Generator().manual_seed(seed)
    n = 2 * half
    sure = torch.arange(n) < half

    def chain(leave: float, stay: float) -> torch.Tensor:
        """P(next is unsure | sure) = leave, P(next is unsure | unsure) = stay; within a kind, fixed rows."""
        one = {"dtype": torch.float64}  # rows must sum to 1 exactly: per-step errors add up along the chain
        kind = torch.where(sure[:, None], torch.tensor([1 - leave, leave], **one), torch.tensor([1 - stay, stay], **one))
        to_unsure = (~sure).double()[None, :]
        mass = kind[:, :1] * (1 - to_unsure) + kind[:, 1:] * to_unsure  # (n, n): the kind's share
        return mass * within

    scores = torch.randn(n, n, generator=g, dtype=torch.float64)
    within_sure = torch.softmax(torch.where(sure[None, :], 4 * scores, -torch.inf), -1)  # sharp among sure
    within_unsure = torch.softmax(torch.where(~sure[None, :], 0.3 * scores, -torch.inf), -1)  # flat among unsure
    within = torch.where(sure[None, :], within_sure, within_unsure)
    human = chain(leave=0.03, stay=0.3)
    model = chain(leave=0.08, stay=0.85)
    initial = sure.double() / sure.sum()
    return human, model, initial
