"""The state-value head V_k(h): the summed entropy of the k steps after the one sampled at a state.

For a context y with final hidden state h(y) (the input of the output embedding at y, what heads.py
reads) and the sampler q the labels were made with,

    V_k(h(y))  =  E_{W ~ q(. | y)} F_k(y, W)  =  E[ sum_{s=1..k} H(q(. | y, W_1 .. W_s)) ]

the expected summed entropy of the k steps *after* the token sampled at y. The entropy at y itself is
not part of it (the LM gives it exactly). So V_0 = 0, and V obeys the Bellman relation
V_k(h(y)) = E_W [ H(q(. | y W)) + V_{k-1}(h(y W)) ], which is what the lookahead uses after a candidate v:

    F_k(x, v)  =  H(q(. | x, v))  +  V_{k-1}(h(x, v))          (lookahead_value.py)

the first term exact from the lookahead's pass over v, only the rest predicted.

Targets (value_train.py). A ``returns`` label row at step t holds h(x_t), the state *before* the sampled
token v_t, its horizon k and target sum_{t < s <= t + k} H_s along the same sample. Given x_t its
expectation over v_t ~ q is V_k(h(x_t)): a returns row is, as stored, an unbiased sample of the state
value at its own hidden state, with the token dropped and nothing shifted. (Shifting to the state
after v_t, h(x_t v_t) = the hidden state of row t + 1, gives V_{k-1}(h_{t+1}) = target_t - H_{t+1}: the
same information, one row fewer per sequence.) TD(lambda) bootstraps with V itself,
G(j) = H_{t+1} + ... + H_{t+j} + V_{k-j}(h(x_{t+j})) (labels.bootstrapped_targets, the head's formula
with the token marginalised). Rollout rows are one forced candidate's F and teacher-forced rows the
future of human text: neither samples V, and value_train refuses them.

Form (as heads.py: an entropy rate times the horizon, so V_0 = 0 exactly and V grows like a sum):

    V_k(h) = k * r(h, k),   r = linear(MLP([LayerNorm(h), k / max_horizon, log1p(k / max_horizon)]))

The head answers the interface :func:`train.train_head` trains (``forward(hidden, horizon, token)``,
``predict_rows``, ``set_rate``, ``save_pretrained``; the token is ignored), so the same loop, checkpoints
and resume train it. A folder holds ``config.json`` (format ``calibrated-sampling-value``, the weights'
sha256, the :class:`ValueConfig`) and ``head.safetensors``, written and checked by heads.py's helpers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .files import write_atomic
from .heads import (
    WEIGHTS_NAME,
    check_budget,
    check_fields,
    horizon_features,
    horizon_mlp,
    read_folder,
    write_config,
)
from .models import model_fingerprint, tokenizer_fingerprint

FORMAT = "calibrated-sampling-value"


@dataclass
class ValueConfig:
    """The shape of a state-value head and what it records about the LM (and labels) it belongs to."""

    hidden_size: int = field(metadata={"help": "H: the LM's hidden size (input of the output embedding)"})
    vocab_size: int = field(metadata={"help": "V: rows of the LM's output embedding (identity check only)"})
    base_model: str = ""  # the LM's name (model.config.name_or_path); checked on load
    tokenizer_fingerprint: str = ""  # models.tokenizer_fingerprint of the LM's tokenizer; checked on load
    mlp_hidden: int = 256  # width of the MLP's hidden layers
    mlp_layers: int = 2  # number of hidden layers of the MLP
    max_horizon: int = 256  # normaliser of the horizon input (the labels' T): the MLP sees k / max_horizon
    lm_parameters: int | None = None  # the LM's parameter count; when set, the head must fit the budget
    label_settings: dict = field(default_factory=dict)  # the label folders and target settings it was trained on

    def __post_init__(self):
        check_fields(self, ["hidden_size", "vocab_size", "mlp_hidden", "mlp_layers", "max_horizon"])

    @classmethod
    def for_model(cls, model, tokenizer=None, **kwargs) -> ValueConfig:
        """A config for ``model``: name, sizes, tokenizer fingerprint and parameter budget from the LM;
        ``kwargs`` set the other fields."""
        identity = model_fingerprint(model)
        if tokenizer is not None:
            identity["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        identity["lm_parameters"] = sum(p.numel() for p in model.parameters())
        return cls(**{**identity, **kwargs})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> ValueConfig:
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown value config fields: {', '.join(unknown)}")
        return cls(**record)


class StateValueHead(nn.Module):
    """Predicts V_k(h), the summed entropy of the k steps after the one sampled at hidden state h.

    Args:
        config (`ValueConfig`): shape and provenance of the head.

    >>> value = StateValueHead(ValueConfig(hidden_size=8, vocab_size=10, mlp_hidden=16))
    >>> value(torch.randn(3, 8), torch.tensor([0, 4, 9])).shape
    torch.Size([3])
    """

    def __init__(self, config: ValueConfig):
        super().__init__()
        self.config = config
        self.norm, self.mlp, width = horizon_mlp(config.hidden_size, config.mlp_hidden, config.mlp_layers)
        self.out = nn.Linear(width, 1)  # -> the entropy rate r(h, k)
        with torch.no_grad():  # start at a constant rate (set_rate): training then learns the context effects
            self.out.weight.zero_()
            self.out.bias.zero_()
        check_budget(self, config.lm_parameters, "`mlp_hidden` or `mlp_layers`")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_rate(self, rate: float) -> None:
        """Set the constant part of the predicted entropy rate, nats per step."""
        with torch.no_grad():
            self.out.bias.fill_(rate)

    def forward(self, hidden: torch.Tensor, horizon: torch.Tensor | int,
                token: torch.Tensor | None = None) -> torch.Tensor:
        """V in nats: hidden (..., H), horizon (...) or a scalar -> (...) float. ``token`` is ignored (a state
        value does not depend on the next token; it is there so that train.train_head can call it)."""
        features, k = horizon_features(self.norm, hidden.to(self.out.weight.dtype), horizon, self.config.max_horizon)
        return k * self.out(self.mlp(features)).squeeze(-1)  # (...): rate times horizon, V_0 = 0

    def predict_rows(self, hidden: torch.Tensor, token: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
        """The label rows' interface (train.predict): (N, H), (N,), (N,) -> (N,); the token is ignored."""
        return self(hidden, horizon)

    # ------------------------------------------------------------------------------------------------
    # Save / load

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``head.safetensors`` and a sorted, indented ``config.json`` recording its sha256."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = save_safetensors({k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()},
                                metadata={"format": FORMAT})
        write_atomic(directory / WEIGHTS_NAME, data)
        write_config(directory, self.config, hashlib.sha256(data).hexdigest(), file_format=FORMAT)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None, tokenizer=None,
                        check_base_model: bool = True) -> StateValueHead:
        """Load a value folder; with ``model`` / ``tokenizer``, refuse one made for another LM (name, sizes,
        tokenizer fingerprint: heads.check_compatible) and move it to the model's device. Weights other than
        those the config records are refused (heads.check_weights_digest)."""
        config, state = read_folder(directory, model, tokenizer, check_base_model, ValueConfig, FORMAT)
        value = cls(config)
        try:
            value.load_state_dict(state, strict=True)
        except RuntimeError as error:  # tensors of another shape or name
            raise ValueError(f"{Path(directory, WEIGHTS_NAME)} does not hold this value head's weights: "
                             f"{error}") from None
        if model is not None:
            value.to(model.get_output_embeddings().weight.device)
        return value.eval()
