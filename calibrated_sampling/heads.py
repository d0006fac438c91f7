"""The future-entropy head: predicts F_k(x, v), the summed entropies of the k steps after token v.

The head reads the LM's final hidden state h (the input of the output embedding) and the remaining
horizon k, and predicts for every vocabulary token v (DESIGN.md section 2):

    f(h, k)_v = k * ( s(h, k) + scale * T_v . z(h, k) + c_v )          scale = 1 / sqrt(d)

an entropy *rate* times the horizon. s is a per-context rate (constant over v, so it only matters
for training), z a d-vector and c a per-token bias, all from a small MLP of (h, k). The form gives
F_0 = 0 exactly (nothing is left to generate, nothing to correct), grows linearly in k as a sum of
per-step entropies does, and the MLP still sees k, so the rate can depend on it (the drift curve).
The table T decides the family:

- ``tied``: T = U, the LM's frozen output embedding (V x H, d = H). U is a buffer attached from the
  model, never a parameter and never saved. Since log p = U h + beta - logsumexp, the calibrated
  logits fold into the hidden state (per row; constants over v drop out of the softmax):

      a log p - b f  =  U (a h - b k scale z)  +  beta  +  [ (a - 1) beta - b k c ]  +  const

  so :meth:`FutureEntropyHead.fused_logits` costs one LM output product plus the V-vector in brackets
  (``calibrated_bias``; beta is the LM's output bias, absent in most models). Models that transform
  the logits further (Gemma 2's soft-capping) need the exact path, :meth:`calibrated_logits`.
- ``lowrank``: its own r x V table (d = r), at the cost of a second r x V product at sampling time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .models import model_fingerprint, tokenizer_fingerprint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "head.safetensors"
CARD_NAME = "card.md"
FORMAT = "calibrated-sampling-head"
FORMAT_VERSION = 1
FAMILIES = ("tied", "lowrank")
MAX_PARAM_FRACTION = 0.05  # a head may hold at most this fraction of its LM's parameter count


@dataclass
class HeadConfig:
    """Everything that decides a head's shape, and what it records about the LM it belongs to."""

    hidden_size: int = field(metadata={"help": "H: the LM's hidden size (input of the output embedding)"})
    vocab_size: int = field(metadata={"help": "V: rows of the LM's output embedding"})
    family: str = "tied"  # "tied" (scores with the LM's own output embedding) or "lowrank" (own r x V table)
    base_model: str = ""  # the LM's name (model.config.name_or_path); checked on load
    tokenizer_fingerprint: str = ""  # models.tokenizer_fingerprint of the LM's tokenizer; checked on load
    mlp_hidden: int = 1024  # width of the MLP's hidden layers
    mlp_layers: int = 2  # number of hidden layers of the MLP
    rank: int | None = None  # lowrank: d = r, columns of the own table (default 64); None for tied
    max_horizon: int = 256  # normaliser of the horizon input: the MLP sees k / max_horizon
    lm_parameters: int | None = None  # the LM's parameter count; when set, the head must fit the budget
    label_settings: dict = field(default_factory=dict)  # how its training labels were made (labels.LabelSettings)
    calibration: dict | None = None  # fitted weights (a_t, b_t per step), written by the fitting code

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {', '.join(FAMILIES)}, but is {self.family!r}")
        if self.family == "lowrank" and self.rank is None:
            self.rank = 64
        if self.family == "tied" and self.rank is not None:
            raise ValueError(f"`rank` is only used by the lowrank family (None for tied), but is {self.rank!r}")
        names = ["hidden_size", "vocab_size", "mlp_hidden", "mlp_layers", "max_horizon"]
        names += ["rank"] if self.family == "lowrank" else []
        names += ["lm_parameters"] if self.lm_parameters is not None else []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
        for name in ("base_model", "tokenizer_fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` must be a string, but is {getattr(self, name)!r}")
        if not isinstance(self.label_settings, dict):
            raise ValueError(f"`label_settings` must be a dict, but is {self.label_settings!r}")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(f"`calibration` must be a dict or None, but is {self.calibration!r}")

    @classmethod
    def for_model(cls, model, tokenizer, **kwargs) -> HeadConfig:
        """A config for ``model``: base_model, sizes, tokenizer fingerprint and lm_parameters (the size
        budget) filled in from the model; ``kwargs`` set the other fields (or override these)."""
        found = {**model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                 "lm_parameters": sum(p.numel() for p in model.parameters())}
        return cls(**{**found, **kwargs})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown head config fields: {', '.join(unknown)}")
        return cls(**record)


def _broadcast(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a (...) tensor of weights as (..., 1), in the dtype / device of ``like``."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(like.shape[:-1]).unsqueeze(-1)


class FutureEntropyHead(nn.Module):
    """Predicts the future entropy F_k(x, v) of every token v from the LM's hidden state and horizon.

    Args:
        config (`HeadConfig`): shape and provenance of the head.
        output_embedding (`torch.Tensor`, *optional*): tied family: the LM's output embedding weight
            (V x H); it can also be attached later with :meth:`attach_output_embedding`.
        output_bias (`torch.Tensor`, *optional*): the LM's output bias (V), if it has one.

    >>> head = FutureEntropyHead(HeadConfig(hidden_size=8, vocab_size=10, mlp_hidden=16), torch.randn(10, 8))
    >>> head(torch.randn(3, 8), torch.tensor([0, 4, 9])).shape
    torch.Size([3, 10])
    """

    def __init__(self, config: HeadConfig, output_embedding: torch.Tensor | None = None,
                 output_bias: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        self.dim = H if config.family == "tied" else config.rank  # d: length of z
        self.scale = 1.0 / math.sqrt(self.dim)
        layers: list[nn.Module] = []
        width = H + 2  # normalised h, plus two horizon features
        for _ in range(config.mlp_layers):
            layers += [nn.Linear(width, config.mlp_hidden), nn.GELU()]
            width = config.mlp_hidden
        self.norm = nn.LayerNorm(H)
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, self.dim + 1)  # -> (z, s)
        self.token_bias = nn.Parameter(torch.zeros(V))  # c
        with torch.no_grad():  # start token-independent: the head begins as a per-context rate
            self.out.weight[: self.dim].zero_()
            self.out.bias.zero_()
        if config.family == "lowrank":
            self.table = nn.Parameter(torch.randn(V, config.rank))  # (V, r)
        self.register_buffer("output_embedding", None, persistent=False)
        self.register_buffer("output_bias", None, persistent=False)
        if output_embedding is not None:
            self.attach_output_embedding(output_embedding, output_bias)
        if config.lm_parameters is not None and self.num_parameters() > MAX_PARAM_FRACTION * config.lm_parameters:
            raise ValueError(f"the head has {self.num_parameters():,} parameters, more than {MAX_PARAM_FRACTION:.0%} "
                             f"of the LM's `lm_parameters` = {config.lm_parameters:,}; lower `mlp_hidden`, "
                             f"`mlp_layers` or `rank`")

    def num_parameters(self) -> int:
        """Trained parameters (the tied family's output embedding belongs to the LM and is not counted)."""
        return sum(p.numel() for p in self.parameters())

    def set_rate(self, rate: float) -> None:
        """Set the constant part of the predicted entropy rate (the bias of s), nats per step."""
        with torch.no_grad():
            self.out.bias[self.dim] = rate

    def attach_output_embedding(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Tied family: use the LM's output embedding (V x H), frozen: stored detached, never saved."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"the output embedding has shape {tuple(weight.shape)}, the head expects "
                             f"(vocab_size, hidden_size) = {expected}")
        if bias is not None and tuple(bias.shape) != expected[:1]:
            raise ValueError(f"the output bias has shape {tuple(bias.shape)}, the head expects ({expected[0]},)")
        self.output_embedding = weight.detach()
        self.output_bias = None if bias is None else bias.detach()

    def _table(self) -> torch.Tensor:
        if self.config.family == "lowrank":
            return self.table
        if self.output_embedding is None:
            raise RuntimeError("a tied head needs the LM's output embedding: load it with "
                               "`FutureEntropyHead.from_pretrained(path, model=...)` or call `attach_output_embedding`")
        return self.output_embedding

    def _trunk(self, hidden: torch.Tensor, horizon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., H), (...) -> z (..., d), s (...), k (...) as float."""
        h = hidden.to(self.out.weight.dtype)
        k = torch.as_tensor(horizon, device=h.device).to(h.dtype).expand(h.shape[:-1])
        u = k / self.config.max_horizon
        features = torch.cat([self.norm(h), u.unsqueeze(-1), torch.log1p(u).unsqueeze(-1)], dim=-1)  # (..., H + 2)
        out = self.out(self.mlp(features))  # (..., d + 1)
        return out[..., : self.dim], out[..., self.dim], k

    def forward(self, hidden: torch.Tensor, horizon: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted future entropy, nats: (..., H), (...) -> (..., V); with ``token`` (...), only that
        token's prediction (...) (what :meth:`predict_rows` computes; DDP needs it to go through forward)."""
        z, s, k = self._trunk(hidden, horizon)
        table = self._table().to(z.dtype)
        if token is not None:
            token_term = (table[token] * z).sum(-1) * self.scale + self.token_bias[token]  # (...)
            return k * (s + token_term)
        token_term = F.linear(z, table) * self.scale + self.token_bias  # (..., V)
        return k.unsqueeze(-1) * (s.unsqueeze(-1) + token_term)

    def predict_rows(self, hidden: torch.Tensor, token: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
        """One token per row: (N, H), (N,), (N,) -> (N,), without computing the other V - 1 outputs."""
        return self(hidden, horizon, token=token)

    # ------------------------------------------------------------------------------------------------
    # Calibrated logits: q ∝ exp(a log p - b f)

    def calibrated_logits(self, hidden: torch.Tensor, horizon: torch.Tensor, lm_logits: torch.Tensor,
                          a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
        """Exact path, any family: a * log_softmax(lm_logits) - b * f(h, k), (..., V). ``a`` and ``b`` are
        scalars or per-row (...) tensors."""
        logp = torch.log_softmax(lm_logits.float(), dim=-1)
        return _broadcast(a, logp) * logp - _broadcast(b, logp) * self(hidden, horizon).float()

    def calibrated_hidden(self, hidden: torch.Tensor, horizon: torch.Tensor, a: float | torch.Tensor,
                          b: float | torch.Tensor) -> torch.Tensor:
        """Tied family: h' = a h - b k scale z(h, k), (..., H); U h' + calibrated_bias gives the calibrated
        logits up to a per-row constant."""
        if self.config.family != "tied":
            raise ValueError(f"only the tied family folds into the hidden state; this head is {self.config.family!r}")
        z, _, k = self._trunk(hidden, horizon)
        h = hidden.to(z.dtype)
        return _broadcast(a, h) * h - _broadcast(b, h) * k.unsqueeze(-1) * self.scale * z

    def calibrated_bias(self, horizon: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
        """Tied family: the V-vector (a - 1) beta - b k c to add to U h' + beta, (..., V) for horizon (...)."""
        c = self.token_bias
        k, a, b = torch.broadcast_tensors(*(torch.as_tensor(x, device=c.device).to(c.dtype) for x in (horizon, a, b)))
        bias = -(b * k).unsqueeze(-1) * c  # (..., V)
        if self.output_bias is not None:
            bias = bias + (a - 1).unsqueeze(-1) * self.output_bias.to(c.dtype)
        return bias

    def fused_logits(self, hidden: torch.Tensor, horizon: torch.Tensor, a: float | torch.Tensor,
                     b: float | torch.Tensor) -> torch.Tensor:
        """Tied family, fused path: one LM output product of h' plus a bias vector, (..., V). Equal to
        :meth:`calibrated_logits` up to a constant per row."""
        h = self.calibrated_hidden(hidden, horizon, a, b)
        bias = None if self.output_bias is None else self.output_bias.to(h.dtype)
        k = torch.as_tensor(horizon, device=h.device).expand(h.shape[:-1])
        return F.linear(h, self._table().to(h.dtype), bias) + self.calibrated_bias(k, a, b)

    # ------------------------------------------------------------------------------------------------
    # Save / load

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``head.safetensors`` (trained weights only) and a sorted, indented ``config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, directory / WEIGHTS_NAME)
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        _write_text(directory / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None, tokenizer=None,
                        check_base_model: bool = True) -> FutureEntropyHead:
        """Load a head folder; with ``model`` / ``tokenizer``, refuse a head made for another LM
        (see :func:`check_compatible`) and attach the model's output embedding (tied family)."""
        directory = Path(directory)
        config = load_config(directory)
        if model is not None or tokenizer is not None:
            check_compatible(config, model, tokenizer, check_base_model=check_base_model)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"head folder {directory} has no {WEIGHTS_NAME}")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{weights} is not a readable safetensors file ({error}); the head is corrupt") from None
        head = cls(config)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{weights} does not match its {CONFIG_NAME}: {error}") from None
        if model is not None:
            out = model.get_output_embeddings()
            if config.family == "tied":
                head.attach_output_embedding(out.weight, getattr(out, "bias", None))
            head.to(out.weight.device)
        return head


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_config(directory: str | os.PathLike) -> HeadConfig:
    """The :class:`HeadConfig` of a head folder, with clear errors for missing or corrupt files."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"head folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"head folder {directory} has no {CONFIG_NAME}")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a calibrated-sampling head config (no \"format\": \"{FORMAT}\")")
    version = record.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has head format version {version!r}; this library reads version {FORMAT_VERSION}")
    try:
        return HeadConfig.from_dict(record)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid head config: {error}") from None


def check_compatible(config: HeadConfig, model=None, tokenizer=None, check_base_model: bool = True) -> None:
    """Raise ValueError naming every field where the head's config and the model / tokenizer differ:
    hidden size, vocabulary size, base model name (unless ``check_base_model=False``) and tokenizer
    fingerprint. Empty recorded fields (a head built without provenance) are not checked."""
    found: dict[str, object] = {}
    if model is not None:
        found.update(model_fingerprint(model))
        if not check_base_model or not config.base_model:
            found.pop("base_model")
    if tokenizer is not None and config.tokenizer_fingerprint:
        found["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    differences = [f"`{name}`: head {getattr(config, name)!r}, {'tokenizer' if name.startswith('tok') else 'model'} "
                   f"{value!r}" for name, value in found.items() if getattr(config, name) != value]
    if differences:
        renamed = any(d.startswith("`base_model`") for d in differences)
        hint = " (pass check_base_model=False if the model is a renamed copy)" if renamed else ""
        raise ValueError("the head was trained for another model: " + "; ".join(differences) + hint)


def write_card(directory: str | os.PathLike, text: str) -> Path:
    """Write the head folder's short human-readable description, ``card.md``."""
    path = Path(directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, text.rstrip() + "\n")
    return path
