"""FutureEntropyCalibrator: sample from the calibrated q inside ``generate()`` (docs/design.md, *The method*).

At generation step t (0-based) of a generation fitted for T new tokens, with remaining horizon
k = T - 1 - t and the step's weights (a_t, b_t) from the head's fitted schedule:

    q_t(v | x)  ∝  exp( a_t log p(v | x)  -  b_t F_k(x, v) )            F from FutureEntropyHead

``generate()`` gives a logits processor no hidden states, so the calibrator hooks the model: a
forward pre-hook on the model counts the steps, and hooks on ``model.get_output_embeddings()`` read
the hidden state h. Tied heads take the fused path: the pre-hook replaces h by
h' = a h - b k scale z(h, k), so the LM's own output product already gives q's logits up to a
V-vector that the processor adds (no second vocabulary-sized product).

The schedule format (``head.config.calibration``, written by the fitting code)::

    {"form": "tied" | "untied" | "global", "max_new_tokens": T, "bin_size": S,
     "a": [a per bin], "b": [b per bin], ...}      step t uses bin t // S; ceil(T / S) bins
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .heads import CONFIG_NAME, WEIGHTS_NAME, FutureEntropyHead, check_compatible
from .samplers import ModelRequired, Sampler, format_number, parse_number, register_sampler_kind, spec_options

FORMS = ("tied", "untied", "global")
PAST_SCHEDULE = ("error", "base")  # what to do at steps t >= T: raise, or sample from the base model


# ----------------------------------------------------------------------------------------------------
# The schedule


def check_calibration(calibration: dict) -> dict:
    """Raise ValueError naming the first field of a calibration dict that breaks the format; return it."""
    if not isinstance(calibration, dict):
        raise ValueError(f"`calibration` must be a dict, but is {calibration!r}")
    missing = [key for key in ("form", "max_new_tokens", "bin_size", "a", "b") if key not in calibration]
    if missing:
        raise ValueError(f"`calibration` lacks {', '.join(repr(k) for k in missing)} (has {sorted(calibration)})")
    form = calibration["form"]
    if form not in FORMS:
        raise ValueError(f"calibration `form` must be one of {', '.join(FORMS)}, but is {form!r}")
    for name in ("max_new_tokens", "bin_size"):
        value = calibration[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibration `{name}` must be a positive integer, but is {value!r}")
    bins = math.ceil(calibration["max_new_tokens"] / calibration["bin_size"])
    for name in ("a", "b"):
        values = calibration[name]
        if not isinstance(values, (list, tuple)) or len(values) != bins:
            raise ValueError(f"calibration `{name}` must be a list of ceil(max_new_tokens / bin_size) = {bins} "
                             f"numbers, but is {values!r}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values):
            raise ValueError(f"calibration `{name}` must hold finite numbers, but is {values!r}")
    return calibration


def schedule_weights(calibration: dict, step: int) -> tuple[float, float]:
    """(a_t, b_t) of generation step ``step`` (0-based): the weights of bin ``step // bin_size``."""
    check_calibration(calibration)
    horizon = calibration["max_new_tokens"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be a non-negative integer, but is {step!r}")
    if step >= horizon:
        raise ValueError(f"`step` {step} is past the fitted schedule, which covers steps 0..{horizon - 1} "
                         f"(max_new_tokens = {horizon})")
    index = step // calibration["bin_size"]
    return float(calibration["a"][index]), float(calibration["b"][index])


def constant_calibration(a: float, b: float, max_new_tokens: int, form: str = "untied") -> dict:
    """A one-bin schedule: the same (a, b) at every step of a ``max_new_tokens`` generation."""
    return check_calibration({"form": form, "max_new_tokens": max_new_tokens, "bin_size": max_new_tokens,
                              "a": [float(a)], "b": [float(b)]})


# ----------------------------------------------------------------------------------------------------
# The processor


def _context(args: tuple, kwargs: dict) -> tuple[int, int, object]:
    """(rows, context length including this forward's tokens, cache object) of a causal LM forward."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:  # generate() keeps the full-length 2D mask
        return tokens.shape[0], mask.shape[1], cache
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return tokens.shape[0], int(past) + tokens.shape[1], cache


class CalibratorHandle:
    """What :meth:`FutureEntropyCalibrator.attach` returns: ``detach()``, or use it in a ``with``."""

    def __init__(self, calibrator: FutureEntropyCalibrator):
        self.calibrator = calibrator

    def detach(self) -> None:
        self.calibrator.detach()

    def __enter__(self) -> FutureEntropyCalibrator:
        return self.calibrator

    def __exit__(self, *exc_info) -> None:
        self.detach()


class FutureEntropyCalibrator(LogitsProcessor):
    r"""Logits processor that samples from q_t ∝ exp(a_t log p - b_t F_k) (Cao, Valiant & Liang 2025,
    "On the Entropy Calibration of Language Models", arXiv 2511.11966; docs/design.md, *The method*).

    It must be attached to the model that generates (``with calibrator.attached(model): ...``): hooks
    read the hidden state and count the steps. The step of a generation is the context length minus
    the prompt length recorded at its first forward pass; a new ``generate()`` call is detected by a
    new cache, a batch-size change or a context length that does not grow by one (``reset()`` forces it).

    Args:
        head (`FutureEntropyHead` or `None`): predicts F_k(x, v). ``None`` for a schedule whose every b_t
            is 0 (a per-step temperature schedule, which needs the step bookkeeping but no F).
        calibration (`dict`, *optional*): the fitted schedule (module docstring); default
            ``head.config.calibration`` (required when ``head`` is None).
        scale (`float`, *optional*, defaults to 1.0): multiplies every b_t (0 keeps only the a_t part,
            temperature 1 / a_t).
        fused (`bool`, *optional*): fold the calibration into the hidden state (tied heads only).
            Default: fused for tied heads once the first step shows that the scores reaching the
            calibrator are the model's own logits (not after a processor that changes them, not in
            beam search, which passes log-probabilities, nor with soft-capped logits), exact otherwise.
            ``True`` insists, and raises if the scores are not the model's logits.
        past_schedule (`str`, *optional*, defaults to ``"error"``): at steps t >= T (longer than the
            fitted generation): ``"error"`` raises ValueError, ``"base"`` returns the scores unchanged
            (samples from the base model, with whatever processors follow).

    The returned scores are log q up to a constant per row, in the dtype of the scores; entries
    that were -inf stay -inf. With the fused path the model's output logits (``output_logits``)
    are those of h', not of h: while attached, keep the calibrator in the processor list (with
    ``fused=True`` a ``generate()`` call without it is refused at its second step).

    >>> calibrator = FutureEntropyCalibrator.from_pretrained("heads/smollm2-135m", model, tokenizer)  # doctest: +SKIP
    >>> with calibrator.attached(model):  # doctest: +SKIP
    ...     out = model.generate(**inputs, do_sample=True, max_new_tokens=calibrator.max_new_tokens,
    ...                          logits_processor=LogitsProcessorList([calibrator]))
    """

    def __init__(self, head: FutureEntropyHead, calibration: dict | None = None, scale: float = 1.0,
                 fused: bool | None = None, past_schedule: str = "error", check_base_model: bool = True):
        if head is not None and not isinstance(head, FutureEntropyHead):
            raise ValueError(f"`head` must be a FutureEntropyHead or None, but is {type(head).__name__}")
        if head is None:
            # Without a head there is no F: only a schedule that never weights F can be sampled.
            if calibration is None:
                raise ValueError("`head` is None, so `calibration` is required (a schedule whose b are all 0)")
            if any(x != 0 for x in check_calibration(calibration)["b"]):
                raise ValueError(f"`head` is None, so every b of `calibration` must be 0, but b is {calibration['b']!r}")
        elif calibration is None:
            calibration = head.config.calibration
        if calibration is None:
            raise ValueError("the head has no fitted calibration (`config.calibration` is empty): fit one "
                             "(calibrated_sampling.fit) or pass `calibration=constant_calibration(a, b, max_new_tokens)`")
        self.calibration = check_calibration(calibration)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"`scale` must be a finite number, but is {scale!r}")
        if fused not in (None, True, False):
            raise ValueError(f"`fused` must be None, True or False, but is {fused!r}")
        if fused and (head is None or head.config.family != "tied"):
            raise ValueError(f"`fused`=True needs a tied head; this head is "
                             f"{None if head is None else head.config.family!r}")
        if past_schedule not in PAST_SCHEDULE:
            raise ValueError(f"`past_schedule` must be one of {', '.join(PAST_SCHEDULE)}, but is {past_schedule!r}")
        self.head = None if head is None else head.eval()
        self.scale = float(scale)
        self.fused = fused if head is not None and head.config.family == "tied" else False
        self.past_schedule = past_schedule
        self.check_base_model = check_base_model
        self.max_new_tokens: int = calibration["max_new_tokens"]  # T
        self._model: PreTrainedModel | None = None
        self._hooks: list = []
        self.reset()

    @classmethod
    def from_pretrained(cls, head_dir: str | os.PathLike, model: PreTrainedModel, tokenizer=None, scale: float = 1.0,
                        calibration: dict | None = None, a: float | None = None, b: float | None = None,
                        max_new_tokens: int | None = None, check_base_model: bool = True,
                        **kwargs) -> FutureEntropyCalibrator:
        """Load a head folder for ``model`` (refusing a head of another model or tokenizer) with its
        fitted calibration; a head without one needs ``calibration`` or constant ``a``, ``b`` and
        ``max_new_tokens``. ``kwargs`` go to the constructor (``fused``, ``past_schedule``)."""
        head = FutureEntropyHead.from_pretrained(head_dir, model, tokenizer, check_base_model=check_base_model)
        if a is not None or b is not None:
            if a is None or b is None or max_new_tokens is None:
                raise ValueError(f"explicit weights need `a`, `b` and `max_new_tokens`, but got a={a!r}, b={b!r}, "
                                 f"max_new_tokens={max_new_tokens!r}")
            calibration = constant_calibration(a, b, max_new_tokens)
        elif calibration is None and head.config.calibration is None:
            raise ValueError(f"head folder {head_dir} has no fitted calibration (`calibration` in its config.json is "
                             f"empty): fit one first (calibrated_sampling.fit), or pass `a`, `b` and `max_new_tokens`")
        return cls(head, calibration, scale=scale, check_base_model=check_base_model, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # Attaching

    def attach(self, model: PreTrainedModel) -> CalibratorHandle:
        """Hook into ``model`` (refusing one the head was not trained for); returns a handle that
        detaches, also as a context manager."""
        if self._model is not None:
            raise RuntimeError("the calibrator is already attached to a model; call `detach()` first")
        out = model.get_output_embeddings()
        if self.head is not None:  # without a head the schedule's own file identifies the model (schedule.py)
            check_compatible(self.head.config, model, check_base_model=self.check_base_model)
            if self.head.config.family == "tied":  # the head scores with this model's own, frozen table
                self.head.attach_output_embedding(out.weight, getattr(out, "bias", None))
            self.head.to(out.weight.device)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
            out.register_forward_pre_hook(self._before_output),
            out.register_forward_hook(self._after_output),
        ]
        self._model = model
        self.reset()
        return CalibratorHandle(self)

    def attached(self, model: PreTrainedModel) -> CalibratorHandle:
        """``with calibrator.attached(model): model.generate(...)``: attach, detach on leaving."""
        return self.attach(model)

    def detach(self) -> None:
        """Remove every hook; the model computes exactly what it did before. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._model = [], None
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next forward pass starts a new one."""
        self._prompt_length: int | None = None
        self._length: int | None = None  # context length of the latest forward pass
        self._rows: int | None = None
        self._cache_id: int | None = None
        self._armed = False  # inside a forward pass of the attached model
        self._fuse_now = False  # this forward pass computes the fused logits
        self._fused_verified = False  # auto mode: the scores were seen to be the model's own logits
        self._called = False  # the processor ran since the latest forward pass
        self._hidden: torch.Tensor | None = None  # (B, H) input of the output embedding, last position
        self._output: torch.Tensor | None = None  # (B, V) the output embedding's result, last position

    # ------------------------------------------------------------------------------------------------
    # Hooks

    def _before_forward(self, module, args, kwargs):
        rows, length, cache = _context(args, kwargs)
        cache_id = None if cache is None else id(cache)
        new = (self._length is None or rows != self._rows or length != self._length + 1
               or (cache_id is not None and cache_id != self._cache_id))
        if new:  # the prefill of a new generate() call (or a plain forward pass)
            self._prompt_length, self._fused_verified = length, False
        elif self._fuse_now and not self._called:
            # The last pass computed h' but no processor call added the bias: q would be silently wrong.
            raise RuntimeError("the attached calibrator computed fused logits, but generate() did not call it: pass "
                               "logits_processor=LogitsProcessorList([calibrator]) or detach it before plain generation")
        self._rows, self._length, self._cache_id = rows, length, cache_id
        step = length - self._prompt_length
        self._fuse_now = (step < self.max_new_tokens and self.fused is not False
                          and (self.fused is True or self._fused_verified))
        self._hidden = self._output = None
        self._called = False
        self._armed = True

    def _after_forward(self, module, args, output):
        self._armed = False

    def _before_output(self, module, args):
        if not self._armed:  # a direct call of the output layer (e.g. measure's teacher-forced pass)
            return None
        hidden = args[0]
        last = hidden[:, -1] if hidden.ndim == 3 else hidden  # (B, H)
        self._hidden = last
        if not self._fuse_now:
            return None
        a, b, k = self._weights(self._length - self._prompt_length)
        with torch.no_grad():
            folded = self.head.calibrated_hidden(last, torch.tensor(k), a, b).to(hidden.dtype)  # (B, H)
        if hidden.ndim == 3:  # only the last position is sampled from; the others keep their h
            folded = folded.unsqueeze(1) if hidden.shape[1] == 1 else torch.cat([hidden[:, :-1], folded[:, None]], 1)
        return (folded, *args[1:])

    def _after_output(self, module, args, output):
        if self._armed:
            self._output = output[:, -1] if output.ndim == 3 else output

    # ------------------------------------------------------------------------------------------------
    # The processor

    def _weights(self, step: int) -> tuple[float, float, int]:
        """(a, scale * b, horizon k = T - 1 - step or the head's fixed horizon) of a step inside the schedule."""
        a, b = schedule_weights(self.calibration, step)
        steps_left = self.max_new_tokens - 1 - step
        return a, self.scale * b, steps_left if self.head is None else self.head.horizon_for(steps_left)

    def _past_schedule(self, step: int) -> bool:
        """True when ``step`` is past the schedule and the base scores are to be returned; raises by default."""
        if step < self.max_new_tokens:
            return False
        if self.past_schedule == "base":
            return True
        raise ValueError(f"generation step {step} is past the fitted schedule of max_new_tokens = "
                         f"{self.max_new_tokens} steps: generate at most {self.max_new_tokens} new tokens, or pass "
                         f"past_schedule='base' to sample from the base model after step {self.max_new_tokens}")

    def _exact(self, scores: torch.Tensor, hidden: torch.Tensor, step: int) -> torch.Tensor:
        """a log_softmax(scores) - b F_k(h), float32 (B, V)."""
        a, b, k = self._weights(step)
        logp = torch.log_softmax(scores.float(), dim=-1)
        if b == 0:  # temperature-only step: no need for the head
            return a * logp
        with torch.no_grad():
            future = self.head(hidden, torch.tensor(k)).float().to(logp.device)  # (B, V)
        return a * logp - b * future

    def _check_width(self, scores: torch.Tensor, name: str) -> None:
        """A named error for scores of another vocabulary (torch's broadcasting error names nothing)."""
        if self.head is not None:
            size, owner = self.head.config.vocab_size, "the head's vocabulary"
        elif self._model is not None:
            size, owner = self._model.get_output_embeddings().weight.shape[0], "the attached model's vocabulary"
        else:
            return
        if scores.shape[-1] != size:
            raise ValueError(f"`{name}` has {scores.shape[-1]} columns, but {owner} has {size} tokens: the scores "
                             "come from another model or vocabulary")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._model is None:
            raise RuntimeError("the calibrator is not attached to a model: use `with calibrator.attached(model): "
                               "model.generate(..., logits_processor=LogitsProcessorList([calibrator]))`")
        if self._hidden is None or input_ids.shape[0] != self._rows or input_ids.shape[1] != self._length:
            raise RuntimeError(f"`input_ids` of shape {tuple(input_ids.shape)} do not match the attached model's "
                               f"latest forward pass ({self._rows} rows, context length {self._length}): the scores "
                               f"must come from that pass (is the calibrator attached to the model that generates?)")
        self._check_width(scores, "scores")
        step = input_ids.shape[1] - self._prompt_length
        self._called = True
        nan = torch.isnan(scores).any()
        check_output = self._fuse_now or (self.fused is None and step == 0 and self._output is not None)
        same = None
        if check_output:  # are the scores the model's own logits (up to other processors' -inf masks)?
            reference = self._output.to(device=scores.device, dtype=torch.float32)
            same = ((scores.float() == reference) | torch.isneginf(scores)).all()
        flags = torch.stack([nan] + ([same] if same is not None else [])).tolist()  # one device sync
        if flags[0]:
            raise ValueError(f"the scores at generation step {step} contain NaN")
        if self._past_schedule(step):
            return scores
        if self._fuse_now:
            if not flags[1]:
                raise ValueError("the fused calibration needs the model's own logits, but the scores reaching it were "
                                 "changed (by an earlier processor, beam search or logit soft-capping): put the "
                                 "calibrator first or build it with fused=False")
            a, b, k = self._weights(step)
            bias = self.head.calibrated_bias(torch.tensor(k), a, b).to(scores.device)  # (V,)
            calibrated = scores.float() + bias
        else:
            if same is not None:
                self._fused_verified = bool(flags[1])  # auto mode: fuse from the next step on
            calibrated = self._exact(scores, self._hidden, step)
        return torch.where(torch.isneginf(scores), float("-inf"), calibrated).to(scores.dtype)

    def teacher_forced_logits(self, base_logits: torch.Tensor, hidden: torch.Tensor, step: int) -> torch.Tensor:
        """q's logits (B, V), float32, at generation step ``step`` from the base logits and hidden states
        (B, H) of a teacher-forced pass; needs no hooks."""
        self._check_width(base_logits, "base_logits")
        if self._past_schedule(step):
            return base_logits.float()
        return self._exact(base_logits, hidden, step)


# ----------------------------------------------------------------------------------------------------
# The `calibrated:HEAD_DIR[:scale=S][:fused=auto|0|1][:past=error|base][:sha256=D]` sampler kind, and its
# fixed-weight form `calibrated:HEAD_DIR:alpha=A[:temperature=T]` (q ∝ exp((log p - A F) / T) at every step)


@dataclass
class CalibratedSampler(Sampler):
    """A :class:`Sampler` whose processor is a :class:`FutureEntropyCalibrator` (it hooks the model)."""

    calibrator: FutureEntropyCalibrator | None = None
    hooks_model: ClassVar[bool] = True

    def attach(self, model: PreTrainedModel) -> CalibratorHandle:
        return self.calibrator.attached(model)

    def teacher_forced_logits(self, input_ids: torch.Tensor, base_logits: torch.Tensor,
                              hidden: torch.Tensor, step: int) -> torch.Tensor:
        return self.calibrator.teacher_forced_logits(base_logits, hidden, step)


# defaults, in key order; alpha and temperature are spelled out only in the fixed-weight form
SPEC_OPTIONS = {"scale": 1.0, "fused": None, "past": "error", "sha256": None, "alpha": None, "temperature": 1.0}
# The fixed-weight form's schedule length: it has no T of its own, and its head reads one horizon at every step.
UNBOUNDED_STEPS = 2**31 - 1
FUSED = {"auto": None, "1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
FUSED_TEXT = {None: "auto", True: "1", False: "0"}


def require_head_files(head_dir: str | os.PathLike) -> None:
    """Refuse a head (or value) folder without its config or weights file, naming the one missing."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not Path(head_dir, name).is_file():
            raise FileNotFoundError(f"head folder {head_dir} has no {name}")


def head_files_digest(head_dir: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a head folder's config and weights: what a calibrated key pins."""
    require_head_files(head_dir)
    files = b"".join(Path(head_dir, name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME))
    return hashlib.sha256(files).hexdigest()[:16]


def head_identity(head_dir: str | os.PathLike) -> str:
    """The folder as a key names it: relative to the working directory when inside it (so a journal
    resumes in another clone), else absolute; ``/`` separated, no trailing slash."""
    path = Path(head_dir).expanduser().resolve()
    with contextlib.suppress(ValueError):
        return path.relative_to(Path.cwd().resolve()).as_posix()
    return path.as_posix()


def _spec_option(spec: str, name: str, raw: str):
    if name in ("scale", "alpha", "temperature"):
        return parse_number(spec, name, raw)
    if name == "fused":
        if raw.lower() not in FUSED:
            raise ValueError(f"sampler spec {spec!r}: `fused` needs auto / 0 / 1, but is {raw!r}")
        return FUSED[raw.lower()]
    if name == "past":
        if raw not in PAST_SCHEDULE:
            raise ValueError(f"sampler spec {spec!r}: `past` needs {' or '.join(PAST_SCHEDULE)}, but is {raw!r}")
        return raw
    if not re.fullmatch(r"[0-9a-f]{16}", raw):
        raise ValueError(f"sampler spec {spec!r}: `sha256` needs 16 hex digits, but is {raw!r}")
    return raw


def parse_calibrated(spec: str) -> tuple[str, dict]:
    """(head folder, options with their defaults) of a calibrated spec; options are read from the end,
    so a folder name may hold ``:``."""
    head_dir, raw = spec_options(spec, SPEC_OPTIONS)
    options = {**SPEC_OPTIONS, **{name: _spec_option(spec, name, text) for name, text in raw.items()}}
    if not head_dir:
        raise ValueError(f"sampler spec {spec!r} names no head folder: use calibrated:HEAD_DIR[:scale=S]")
    if options["temperature"] <= 0:
        raise ValueError(f"sampler spec {spec!r}: `temperature` must be above 0, but is {options['temperature']!r}")
    if options["alpha"] is None and options["temperature"] != 1:
        raise ValueError(f"sampler spec {spec!r}: `temperature` is for the fixed-weight form; add alpha=A "
                         "(q ∝ exp((log p - A F) / T)), or use the head's fitted calibration without it")
    if options["alpha"] is not None and options["scale"] != 1:
        raise ValueError(f"sampler spec {spec!r}: `scale` multiplies a fitted schedule's b, which alpha=A replaces; "
                         "set one of them")
    return head_dir, options


def calibrated_key(head_dir: str, options: dict) -> str:
    """The canonical key of a calibrated spec's folder (as :func:`head_identity` names it) and options: every
    option but alpha and temperature, which are spelled out only in the fixed-weight form (temperature where
    it is not 1), so that the keys of fitted-calibration samplers stay what they were."""
    parts = ["calibrated", head_dir, f"scale={format_number(options['scale'])}",
             f"fused={FUSED_TEXT[options['fused']]}", f"past={options['past']}"]
    parts += [f"sha256={options['sha256']}"] if options["sha256"] is not None else []
    if options["alpha"] is not None:
        parts.append(f"alpha={format_number(options['alpha'])}")
        parts += [f"temperature={format_number(options['temperature'])}"] if options["temperature"] != 1 else []
    return ":".join(parts)


def _check_head_folder(spec: str, head_dir: str, pinned: str | None) -> str:
    """The folder's files digest, after checking that the files are there (and match ``pinned``)."""
    if not Path(head_dir).is_dir():
        raise FileNotFoundError(f"sampler spec {spec!r}: head folder {head_dir} does not exist")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not Path(head_dir, name).is_file()]
    if missing:
        raise FileNotFoundError(f"sampler spec {spec!r}: head folder {head_dir} has no {' and no '.join(missing)}")
    digest = head_files_digest(head_dir)
    if pinned not in (None, digest):
        raise ValueError(f"sampler spec {spec!r} pins head files sha256 {pinned}, but {head_dir} now holds "
                         f"{digest}: the head was refitted or replaced since that key was made")
    return digest


def calibrated_options(spec: str) -> dict:
    """The options of a calibrated spec or key with its folder as ``folder``: the form
    :data:`.equal_entropy.TEMPERABLE` reads families from."""
    head_dir, options = parse_calibrated(spec)
    return {**options, "folder": head_dir}


def calibrated_family_key(options: dict) -> str:
    """A calibrated method as :func:`calibrated_options` reads it, without the head files' digest, so that a
    spec and its key (which pins the digest) name one method."""
    return calibrated_key(head_identity(options["folder"]), {**options, "sha256": None})


def calibrated_sampler(spec: str, model: PreTrainedModel | None) -> CalibratedSampler:
    """Build the sampler of a ``calibrated:HEAD_DIR[:scale=S][:fused=auto|0|1][:past=error|base][:sha256=D]``
    spec (``sha256``: refuse a folder whose files changed). Its key spells out every option and the digest.

    ``alpha=A[:temperature=T]`` replaces the head's fitted calibration with one weight at every step,
    q ∝ exp((log p - A F) / T): the lookahead's form with the head's F, so that a head distilled from the
    lookahead's F can be read at equal entropy beside it. It needs a head trained at one horizon
    (``train-head --fixed-horizon K``), since no schedule length tells it the steps left."""
    head_dir, options = parse_calibrated(spec)
    options["sha256"] = _check_head_folder(spec, head_dir, options["sha256"])
    if model is None:
        raise ModelRequired(spec)
    weights = {}
    if options["alpha"] is not None:
        weights = {"a": 1 / options["temperature"], "b": options["alpha"] / options["temperature"],
                   "max_new_tokens": UNBOUNDED_STEPS}
    calibrator = FutureEntropyCalibrator.from_pretrained(head_dir, model, scale=options["scale"],
                                                         fused=options["fused"], past_schedule=options["past"], **weights)
    if weights and calibrator.head.config.fixed_horizon is None:
        raise ValueError(f"sampler spec {spec!r}: alpha=A needs a head trained at one horizon (train-head "
                         f"--fixed-horizon K), but {head_dir} reads its horizon from the steps left, which a fixed "
                         "weight does not give: drop alpha to use its fitted calibration, or fit a schedule:FILE")
    key = calibrated_key(head_identity(head_dir), options)
    calibrator.key = key  # a bare processor list still names its q (samplers.processors_key)
    return CalibratedSampler(spec, LogitsProcessorList([calibrator]), truncating=False, key=key, calibrator=calibrator)


register_sampler_kind("calibrated", calibrated_sampler)
