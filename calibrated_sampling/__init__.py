"""Entropy-calibrated sampling for language models: measure how a model's generation entropy drifts
from its log loss on human text, and correct it with a future-entropy head."""

__version__ = "0.1.0"

from .calibrator import FutureEntropyCalibrator, constant_calibration, schedule_weights
from .compare import find_root, run_comparison
from .data import Document, Window, load_documents, make_windows
from .fit import exact_markov_calibration, fit_weights, save_calibration
from .heads import FutureEntropyHead, HeadConfig, check_compatible
from .label_store import CorruptShardError, MissingHiddenError, load_labels
from .labels import bootstrapped_targets, make_labels
from .lookahead import LookaheadProcessor, fit_lookahead_alpha
from .mauve import compute_mauve
from .measure import generate_with_entropy, measure
from .metrics import distinct_n, entce, entropy, self_bleu, seq_rep_n, token_log_loss
from .models import load_model, tokenizer_fingerprint
from .samplers import Sampler, parse_sampler
from .train import evaluate_head, train_head

__all__ = [
    "CorruptShardError",
    "MissingHiddenError",
    "Document",
    "FutureEntropyCalibrator",
    "FutureEntropyHead",
    "HeadConfig",
    "LookaheadProcessor",
    "Sampler",
    "Window",
    "__version__",
    "bootstrapped_targets",
    "check_compatible",
    "compute_mauve",
    "constant_calibration",
    "distinct_n",
    "entce",
    "entropy",
    "evaluate_head",
    "exact_markov_calibration",
    "find_root",
    "fit_lookahead_alpha",
    "fit_weights",
    "generate_with_entropy",
    "load_documents",
    "load_labels",
    "load_model",
    "make_labels",
    "make_windows",
    "measure",
    "parse_sampler",
    "run_comparison",
    "save_calibration",
    "schedule_weights",
    "self_bleu",
    "seq_rep_n",
    "token_log_loss",
    "tokenizer_fingerprint",
    "train_head",
]
