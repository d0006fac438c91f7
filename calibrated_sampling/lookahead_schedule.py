"""A schedule whose F is the exact one-step lookahead: q_t ∝ exp(a_j log p - b_j F(x, .)), per-step (a, b).

The lookahead (lookahead.py) knows F(x, v) = H(p(. | x, v)) for the top C candidates of p only. For a
schedule, F must be a function over the whole vocabulary, so the tokens outside the top C are given the
candidates' p-weighted mean F:

    F(x, v) = H(p(. | x, v))                          v in the top C of p
    F(x, v) = sum_c p(c) H(p(. | x, c)) / sum_c p(c)  otherwise

b then moves mass among the candidates (towards those after which the model is more certain) and leaves
the rest of the vocabulary to the temperature part a. With this F, q is an exponential family in (a, b)
like the head's, so the entropy-matched fit (entropy_fit.py) treats the two alike: the convex fit of b,
the closed-form slopes. Unlike the lookahead sampler's alpha (which keeps the candidates' total mass
under p), b here also changes that total a little; at b = 0 both are plain temperature.

F is the base model's next-step entropy, so it does not depend on the schedule: the teacher-forced
side needs one lookahead pass per fit, not one per round. The step of a generation is counted as
:class:`.lookahead_value.FutureLookaheadProcessor` counts it (one-token extensions since the last
context that was not one); teacher-forced passes pass it explicitly.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from .calibrator import PAST_SCHEDULE, check_calibration, schedule_weights
from .lookahead import LookaheadEntropy, LookaheadSampler
from .lookahead_value import FutureLookaheadProcessor


def lookahead_future(logp: torch.Tensor, candidates: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """F over the vocabulary (B, V) from log p (B, V) and the top C candidates (B, C) with their F (B, C):
    the candidates keep theirs, every other token gets their p-weighted mean (module docstring)."""
    weights = torch.softmax(logp.gather(-1, candidates).to(future.dtype), -1)  # p renormalised over the top C
    mean = (weights * future).sum(-1, keepdim=True)  # (B, 1)
    full = mean.to(logp.dtype).expand_as(logp).clone()
    return full.scatter_(-1, candidates, future.to(logp.dtype))


class ScheduledLookaheadProcessor(FutureLookaheadProcessor):
    """q_t ∝ exp(a_t log p - b_t F(x, .)) with the lookahead's F (module docstring) and a fitted schedule.

    Args:
        model (`PreTrainedModel`): the LM whose next-step entropies F are.
        calibration (`dict`): the per-bin schedule (calibrator.check_calibration's format).
        top (`int`): candidates C.
        past_schedule (`str`, *optional*, defaults to ``"error"``): at steps t >= T, ``"error"`` raises
            ValueError, ``"base"`` returns the scores unchanged.
    """

    def __init__(self, model: PreTrainedModel, calibration: dict, top: int, past_schedule: str = "error"):
        self.calibration = check_calibration(calibration)
        if past_schedule not in PAST_SCHEDULE:
            raise ValueError(f"`past_schedule` must be one of {', '.join(PAST_SCHEDULE)}, but is {past_schedule!r}")
        self.past_schedule = past_schedule
        super().__init__(LookaheadEntropy(model, top), 0.0)
        self.max_new_tokens = calibration["max_new_tokens"]

    def scheduled_logits(self, input_ids: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        """q's logits at generation step ``step`` (float32 (B, V)), or the scores past the schedule with
        ``past_schedule='base'``."""
        if step >= self.max_new_tokens:
            if self.past_schedule == "base":
                return scores
            raise ValueError(f"generation step {step} is past the fitted schedule of max_new_tokens = "
                             f"{self.max_new_tokens} steps: generate at most {self.max_new_tokens} new tokens, "
                             f"or use past=base")
        a, b = schedule_weights(self.calibration, step)
        logp = torch.log_softmax(scores.float(), dim=-1)
        if b == 0:
            return a * logp
        return a * logp - b * self.future(input_ids, logp)

    def future(self, input_ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """F (B, V) after the contexts ``input_ids`` whose next-token log p is ``logp``."""
        candidates, next_entropy = self.lookahead(input_ids, logp, self.mask)
        return lookahead_future(logp, candidates, next_entropy)

    def attached(self, model: PreTrainedModel):
        """``with processor.attached(model): model.generate(...)``: watch the padding mask that the
        candidates must see (as the lookahead sampler does), as the calibrator's ``attached`` does."""
        if model is not self.lookahead.model:
            raise ValueError("the lookahead schedule was built for another model instance: attach it to that one")
        return LookaheadSampler("", LogitsProcessorList([self])).attach(model)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_scores(scores)
        return self.scheduled_logits(input_ids, scores, self._track(input_ids))

    def _check_scores(self, scores: torch.Tensor) -> None:
        size = self.lookahead.model.get_output_embeddings().weight.shape[0]
        if scores.shape[-1] != size:  # candidates of another vocabulary would index the wrong tokens
            raise ValueError(f"`scores` has {scores.shape[-1]} columns, but the lookahead's model has a vocabulary "
                             f"of {size} tokens: the scores come from another model or vocabulary")


class ScheduledLookaheadSampler(LookaheadSampler):
    """The sampler of a lookahead schedule: the teacher-forced pass gives each call its step."""

    def teacher_forced_logits(self, input_ids, base_logits, hidden, step):
        processor: ScheduledLookaheadProcessor = self.processors[0]
        processor._check_scores(base_logits)
        return processor.scheduled_logits(input_ids, base_logits, step)


def scheduled_lookahead_sampler(spec: str, model: PreTrainedModel, calibration: dict, top: int,
                                past_schedule: str, key: str) -> ScheduledLookaheadSampler:
    """A sampler of ``calibration`` with the lookahead's F over the top ``top`` (schedule.py builds it)."""
    processor = ScheduledLookaheadProcessor(model, calibration, top, past_schedule)
    processor.key = key  # a bare processor list still names its q (samplers.processors_key)
    return ScheduledLookaheadSampler(spec, LogitsProcessorList([processor]), truncating=False, key=key,
                                     fitted_length=calibration["max_new_tokens"])
