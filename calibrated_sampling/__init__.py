"""Entropy-calibrated sampling for language models: measure how a model's generation entropy drifts
from its log loss on human text, and correct it with a future-entropy head."""

__version__ = "0.1.0"

from .data import Document, Window, load_documents, make_windows
from .measure import generate_with_entropy, measure
from .metrics import distinct_n, entce, entropy, self_bleu, seq_rep_n, token_log_loss
from .models import load_model, tokenizer_fingerprint
from .samplers import Sampler, parse_sampler

__all__ = [
    "Document",
    "Sampler",
    "Window",
    "__version__",
    "distinct_n",
    "entce",
    "entropy",
    "generate_with_entropy",
    "load_documents",
    "load_model",
    "make_windows",
    "measure",
    "parse_sampler",
    "self_bleu",
    "seq_rep_n",
    "token_log_loss",
    "tokenizer_fingerprint",
]
