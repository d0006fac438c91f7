"""The future-entropy head: predicts F_k(x, v), the summed entropies of the k steps after token v.

The head reads the LM's final hidden state h (the input of the output embedding) and the remaining
horizon k, and predicts for every vocabulary token v (docs/design.md, *The heads*):

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

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .files import read_json, write_atomic
from .models import model_fingerprint, tokenizer_fingerprint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "head.safetensors"
CARD_NAME = "card.md"
FORMAT = "calibrated-sampling-head"
FORMAT_VERSION = 1
DIGEST_KEY = "weights_sha256"  # config.json's record of the sha256 of head.safetensors (hex)
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
    fixed_horizon: int | None = None  # read at this k at every step (a head trained at one horizon, e.g. 1)
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
        check_fields(self, names + (["fixed_horizon"] if self.fixed_horizon is not None else []))
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


def check_fields(config, positive: list[str]) -> None:
    """Refuse a config (:class:`HeadConfig`, value.ValueConfig) whose ``positive`` fields are not positive
    integers (``lm_parameters`` too, when set), whose provenance fields are not strings or whose
    ``label_settings`` is not a dict; the error names the field and echoes its value."""
    for name in [*positive, *(["lm_parameters"] if config.lm_parameters is not None else [])]:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but is {value!r}")
    for name in ("base_model", "tokenizer_fingerprint"):
        if not isinstance(getattr(config, name), str):
            raise ValueError(f"`{name}` must be a string, but is {getattr(config, name)!r}")
    if not isinstance(config.label_settings, dict):
        raise ValueError(f"`label_settings` must be a dict, but is {config.label_settings!r}")


def horizon_mlp(hidden_size: int, mlp_hidden: int, mlp_layers: int) -> tuple[nn.LayerNorm, nn.Sequential, int]:
    """The trunk every head shares (this one, value.py's): a LayerNorm of h and an MLP of (normalised h,
    two horizon features); returns (norm, mlp, width of the MLP's output)."""
    layers: list[nn.Module] = []
    width = hidden_size + 2  # normalised h, plus two horizon features
    for _ in range(mlp_layers):
        layers += [nn.Linear(width, mlp_hidden), nn.GELU()]
        width = mlp_hidden
    return nn.LayerNorm(hidden_size), nn.Sequential(*layers), width


def horizon_features(norm: nn.LayerNorm, hidden: torch.Tensor, horizon: torch.Tensor | int,
                     max_horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's input (..., H + 2) = (norm(h), k / max_horizon, log1p of it), and k (...) in h's dtype, for
    hidden (..., H) and a horizon (...) or scalar."""
    k = torch.as_tensor(horizon, device=hidden.device).to(hidden.dtype).expand(hidden.shape[:-1])  # (...)
    u = k / max_horizon
    return torch.cat([norm(hidden), u.unsqueeze(-1), torch.log1p(u).unsqueeze(-1)], dim=-1), k


def check_budget(head: nn.Module, lm_parameters: int | None, knobs: str) -> None:
    """Refuse a head (of any kind) with more than MAX_PARAM_FRACTION of its LM's parameters, naming the
    config fields (``knobs``) that shrink it; no budget when ``lm_parameters`` is None."""
    count = sum(p.numel() for p in head.parameters())
    if lm_parameters is not None and count > MAX_PARAM_FRACTION * lm_parameters:
        raise ValueError(f"the {type(head).__name__} has {count:,} parameters, more than {MAX_PARAM_FRACTION:.0%} "
                         f"of the LM's `lm_parameters` = {lm_parameters:,}; lower {knobs}")


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
        self.norm, self.mlp, width = horizon_mlp(H, config.mlp_hidden, config.mlp_layers)
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
        check_budget(self, config.lm_parameters, "`mlp_hidden`, `mlp_layers` or `rank`")

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
        features, k = horizon_features(self.norm, hidden.to(self.out.weight.dtype), horizon, self.config.max_horizon)
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

    def horizon_for(self, steps_left: torch.Tensor | int) -> torch.Tensor | int:
        """The horizon k to read the head at when ``steps_left`` steps follow this one (T - 1 - t): that, or
        the head's ``fixed_horizon`` (a head trained at one horizon only, such as the distilled one-step head,
        predicts F_1 and is read at k = 1 at every step)."""
        fixed = self.config.fixed_horizon
        if fixed is None:
            return steps_left
        return torch.full_like(steps_left, fixed) if isinstance(steps_left, torch.Tensor) else fixed

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
        """Write ``head.safetensors`` (trained weights only) and a sorted, indented ``config.json`` that
        records the weight file's sha256 (``weights_sha256``), so that loading refuses other weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        data = save_safetensors(state, metadata={"format": FORMAT})
        write_atomic(directory / WEIGHTS_NAME, data)
        write_config(directory, self.config, hashlib.sha256(data).hexdigest())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None, tokenizer=None,
                        check_base_model: bool = True) -> FutureEntropyHead:
        """Load a head folder; with ``model`` / ``tokenizer``, refuse a head made for another LM
        (see :func:`check_compatible`) and attach the model's output embedding (tied family)."""
        config, state = read_folder(directory, model, tokenizer, check_base_model)
        head = cls(config)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{Path(directory, WEIGHTS_NAME)} does not match its {CONFIG_NAME}: {error}") from None
        if model is not None:
            out = model.get_output_embeddings()
            if config.family == "tied":
                head.attach_output_embedding(out.weight, getattr(out, "bias", None))
            head.to(out.weight.device)
        return head


def read_folder(directory: str | os.PathLike, model=None, tokenizer=None, check_base_model: bool = True,
                config_class=HeadConfig, file_format: str = FORMAT) -> tuple:
    """(config, weight tensors) of a head folder (or another kind stored the same way: ``config_class``,
    ``file_format``), after refusing one made for another LM (:func:`check_compatible`, with ``model`` /
    ``tokenizer``) and weights that are not the file its config records (:func:`check_weights_digest`)."""
    directory = Path(directory)
    config = load_config(directory, config_class, file_format)
    if model is not None or tokenizer is not None:
        check_compatible(config, model, tokenizer, check_base_model=check_base_model)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"head folder {directory} has no {WEIGHTS_NAME}")
    data = weights.read_bytes()
    try:
        state = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error}); the head is corrupt") from None
    check_weights_digest(directory, hashlib.sha256(data).hexdigest(), file_format)
    return config, state


def write_config(directory: str | os.PathLike, config: HeadConfig, weights_sha256: str,
                 file_format: str = FORMAT) -> Path:
    """Write a head folder's ``config.json`` (sorted, indented, atomically): the format, ``config`` and the
    sha256 of the ``head.safetensors`` it belongs to. Returns its path. ``file_format``: another folder kind
    stored the same way (value.py's state-value heads), with a config of its own that has ``to_dict``."""
    if not (isinstance(weights_sha256, str) and len(weights_sha256) == 64
            and all(c in "0123456789abcdef" for c in weights_sha256)):
        raise ValueError(f"`weights_sha256` must be 64 lowercase hex digits, but is {weights_sha256!r}")
    record = {"format": file_format, "format_version": FORMAT_VERSION, DIGEST_KEY: weights_sha256,
              **config.to_dict()}
    return write_atomic(Path(directory) / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
                        + "\n")


def _read_record(directory: Path, file_format: str = FORMAT) -> dict:
    """config.json of a head folder as a dict, with clear errors for a missing folder, file or bad JSON."""
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"head folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"head folder {directory} has no {CONFIG_NAME}")
    record = read_json(path, "head config")
    if not isinstance(record, dict) or record.get("format") != file_format:
        raise ValueError(f"{path} is not a {file_format} config (no \"format\": \"{file_format}\")")
    return record


def recorded_weights_digest(directory: str | os.PathLike, file_format: str = FORMAT) -> str | None:
    """The sha256 of ``head.safetensors`` that the folder's ``config.json`` records (None in folders
    written before the record existed)."""
    return _read_record(Path(directory), file_format).get(DIGEST_KEY)


def weights_file_digest(directory: str | os.PathLike) -> str:
    """The sha256 (hex) of the folder's ``head.safetensors`` as it is on disk."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"head folder {directory} has no {WEIGHTS_NAME}")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def check_weights_digest(directory: str | os.PathLike, found: str | None = None, file_format: str = FORMAT) -> None:
    """Refuse a head folder whose ``head.safetensors`` is not the file its ``config.json`` was written for.

    ``found``: the file's sha256 when the caller has already read it. A folder without the record (written
    before it existed) is refused too, with the command that stamps it.
    """
    directory = Path(directory)
    recorded = recorded_weights_digest(directory, file_format)
    found = found or weights_file_digest(directory)
    if recorded is None:
        raise ValueError(f"head folder {directory}: {CONFIG_NAME} records no `{DIGEST_KEY}` (written before heads "
                         f"recorded the digest of their weights), so nothing shows that {WEIGHTS_NAME} (sha256 "
                         f"{found}) is the file it was written for; if it is, record it with: "
                         f"{_stamp_command(directory)}")
    if recorded != found:
        raise ValueError(f"head folder {directory}: {WEIGHTS_NAME} has sha256 {found}, but {CONFIG_NAME} was written "
                         f"for weights with sha256 {recorded}: the weights (or the config and its fitted "
                         f"calibration) come from another head. Copy head folders whole; if these weights do "
                         f"belong to this config, record them with: {_stamp_command(directory, force=True)}")


def _stamp_command(directory: Path, force: bool = False) -> str:
    call = f"stamp_weights_digest({str(directory)!r}{', force=True' if force else ''})"
    return f'python -c "from calibrated_sampling.heads import stamp_weights_digest; {call}"'


def stamp_weights_digest(directory: str | os.PathLike, force: bool = False) -> str:
    """Record the sha256 of the folder's ``head.safetensors`` in its ``config.json``; returns the digest.

    For folders written before heads recorded it: the config is rewritten as :meth:`save_pretrained`
    writes it (sorted, indented), everything else unchanged. Stamping says "these weights belong to this
    config", so a folder that already records another digest is refused unless ``force=True``.
    """
    directory = Path(directory)
    config = load_config(directory)
    found, recorded = weights_file_digest(directory), recorded_weights_digest(directory)
    if recorded not in (None, found) and not force:
        raise ValueError(f"head folder {directory}: {CONFIG_NAME} records `{DIGEST_KEY}` {recorded}, but "
                         f"{WEIGHTS_NAME} has sha256 {found}; pass force=True only if these weights belong to "
                         f"this config")
    if recorded != found:
        write_config(directory, config, found)
    return found


def load_config(directory: str | os.PathLike, config_class=HeadConfig, file_format: str = FORMAT):
    """The :class:`HeadConfig` of a head folder, with clear errors for missing or corrupt files
    (``config_class`` / ``file_format``: another folder kind stored the same way, as in :func:`write_config`)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    record = _read_record(directory, file_format)
    del record["format"]
    record.pop(DIGEST_KEY, None)  # checked against the weights by check_weights_digest
    version = record.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has head format version {version!r}; this library reads version {FORMAT_VERSION}")
    try:
        return config_class.from_dict(record)
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
    write_atomic(path, text.rstrip() + "\n")
    return path
