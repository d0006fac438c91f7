"""Entropy-calibrated sampling for language models: measure how a model's generation entropy drifts
from its log loss on human text, and correct it with a future-entropy head.

The package is one flat import package in five layers, lowest first. A module imports from its own
layer or lower ones only, and no modules import each other in a circle, not even inside functions
(tests/test_layers.py reads this map and checks both; a new module gets a place in it):

    foundations   files, batch_store, data, models, metrics
    sampling      samplers, heads, calibrator, lookahead, value, lookahead_value, lookahead_schedule, schedule
    measurement   measure, mauve, journal, equal_entropy
    training      label_store, labels, label_rows, train, fit, lookahead_fit, entropy_fit, entropy_markov, value_train, lookahead_value_fit, judge
    output        compare, report, theory, cli_common, cli_theory, cli_lookahead, cli

- foundations: atomic file writes, and per-batch stores that let long passes resume; human text as documents and prompt / continuation windows (and
  their padded batches); loading models offline and naming them (fingerprints, EOS and pad ids);
  entropy, log loss and diversity metrics.
- sampling: what turns the model's p into the sampled q inside ``generate()``: sampler specs and
  their keys, the future-entropy head, the calibrator and its fitted schedule, the lookahead baseline,
  the state-value head, the lookaheads beyond one step (state value after each candidate, two-step)
  and the schedule whose F is the one-step lookahead.
- measurement: one pass that measures human log loss and generation entropy per sampler; MAUVE; the
  journal that keeps finished measurements; every method read at equal entropy from measurements.
- training: future-entropy labels and their folders, head and state-value training, the fits of the
  calibration weights and of the lookaheads' alpha (they drive measurement passes, so they sit above them).
- output: the sampler comparison, the files and plots of a run (results.json, report.md), the
  paper's simplified setting and scaling fits (pure maths that imports nothing of the package, shown
  through the command line), and the command line. docs/design.md (*Layers of the package*) says what
  each module holds; the public names below are the package's API.
"""

__version__ = "0.1.0"

# Importing calibrator, lookahead, lookahead_value and schedule registers their sampler kinds (calibrated:,
# lookahead:, lookahead-value:, lookahead2:, schedule:) in samplers.py.
from .calibrator import FutureEntropyCalibrator, constant_calibration, schedule_weights
from .compare import find_root, run_comparison
from .data import Document, Window, load_documents, make_windows
from .entropy_fit import fit_entropy_matched
from .fit import exact_markov_calibration, fit_weights, save_calibration
from .heads import FutureEntropyHead, HeadConfig, check_compatible
from .label_store import CorruptShardError, MissingHiddenError, load_labels
from .labels import bootstrapped_targets, make_labels
from .lookahead import LookaheadProcessor
from .lookahead_fit import fit_lookahead_alpha
from .lookahead_value import FutureLookaheadProcessor, TwoStepLookahead, ValueLookahead
from .lookahead_value_fit import fit_spec_alpha
from .mauve import compute_mauve
from .measure import generate_with_entropy, measure
from .metrics import distinct_n, entce, entropy, self_bleu, seq_rep_n, token_log_loss
from .models import load_model, tokenizer_fingerprint
from .samplers import Sampler, parse_sampler
from .schedule import Schedule, load_schedule, save_schedule
from .train import evaluate_head, train_head
from .value import StateValueHead, ValueConfig
from .value_train import train_value_head

__all__ = [
    "CorruptShardError",
    "Document",
    "FutureEntropyCalibrator",
    "FutureEntropyHead",
    "FutureLookaheadProcessor",
    "HeadConfig",
    "LookaheadProcessor",
    "MissingHiddenError",
    "Sampler",
    "StateValueHead",
    "TwoStepLookahead",
    "ValueConfig",
    "ValueLookahead",
    "Schedule",
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
    "fit_entropy_matched",
    "fit_lookahead_alpha",
    "fit_spec_alpha",
    "fit_weights",
    "generate_with_entropy",
    "load_documents",
    "load_labels",
    "load_model",
    "load_schedule",
    "make_labels",
    "make_windows",
    "measure",
    "parse_sampler",
    "run_comparison",
    "save_calibration",
    "save_schedule",
    "schedule_weights",
    "self_bleu",
    "seq_rep_n",
    "token_log_loss",
    "tokenizer_fingerprint",
    "train_head",
    "train_value_head",
]
