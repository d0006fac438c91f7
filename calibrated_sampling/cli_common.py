"""What the `calibrated-sampling` subcommands share: the model and data flags, the machine's name,
number parsing, a data-parallel launch's process group, and the checks of counts."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_atomic

SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}  # 135M, 1.7B, 1e6


def machine() -> str:
    return f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, gemma3-270m), local HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")


def add_data_args(p: argparse.ArgumentParser, prompts: int, new_tokens: int) -> None:
    p.add_argument("--data", default="pydoc",
                   help="pydoc, stdlib-code, a file / folder / glob of text, or wikitext-103 | writingprompts | "
                        "codecontests (needs `datasets` and a network)")
    p.add_argument("--split", default="eval", choices=["fit", "eval", "all"], help="side of the document-hash split")
    p.add_argument("--num-prompts", type=int, default=prompts)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=new_tokens, help="generated (and human) tokens per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel launch."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed() -> Processes | None:
    """Join the process group when launched on several processes (``torchrun --nproc_per_node N`` or
    ``accelerate launch --multi_gpu --num_processes N``, which set WORLD_SIZE, RANK, LOCAL_RANK and
    MASTER_ADDR / PORT), with this process's own GPU (cuda:LOCAL_RANK, nccl) or the CPU (gloo).
    None for a plain run, which never touches torch.distributed."""
    if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
        return None
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0) % torch.cuda.device_count())
        torch.cuda.set_device(device)  # all_gather_object over nccl uses the current device
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _JOINED.append(dist)
    return Processes(dist.get_rank(), dist.get_world_size(), device)


_JOINED: list = []  # torch.distributed, once `distributed` has created the process group (and only then)


def leave_process_group() -> None:
    """Destroy the process group that `distributed` created, before the interpreter exits: left to the
    exit, gloo's threads can abort a process whose work is done ("terminate called without an active
    exception", exit -6). A group created by the caller is the caller's to destroy."""
    while _JOINED:
        dist = _JOINED.pop()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def main_first(state: Processes | None):
    """Process 0 loads first (it may convert a GGUF into the cache), the others after it."""
    import torch.distributed as dist

    if state is not None and not state.is_main:
        dist.barrier()
    try:
        yield
    finally:  # also on an error, so that the others go on (and meet it themselves) rather than hang
        if state is not None and state.is_main:
            dist.barrier()


def check_counts(args, names: tuple[str, ...]) -> None:
    """Refuse a count below 1 before any model work or journal write: a refused run must leave nothing
    behind that its corrected rerun into the same ``--out`` would stumble on."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be at least 1, but is {value!r}")


def check_seed(args) -> None:
    """For commands whose seeding refuses a negative seed (numpy's generators, the label settings): named
    now rather than by numpy's "expected non-negative integer", or after the model loads."""
    if args.seed < 0:
        raise ValueError(f"`--seed` must be 0 or more, but is {args.seed}")


def check_out(args, kind: str = "folder") -> None:
    """Refuse an ``--out`` that cannot be written before any model work: a folder that is a file, a file
    that is a folder, or either inside a file. Found at the end, it would cost the run's results."""
    if not getattr(args, "out", None):
        return
    path = Path(args.out)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"`--out` must be a folder, but {args.out!r} is a file")
    if kind == "file" and path.is_dir():
        raise ValueError(f"`--out` must name a file, but {args.out!r} is a folder")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"`--out` {args.out!r} lies inside {str(parent)!r}, which is a file, not a folder")


def check_training_args(args) -> None:
    """train-head and train-value: every number checked before the model loads and the label rows are
    read (a NaN or infinite learning rate would otherwise train to NaN weights without a word)."""
    check_counts(args, ("epochs", "batch_size", "mlp_hidden", "mlp_layers", "max_horizon", "rank", "td_n"))
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"`--lr` must be a positive finite number, but is {args.lr!r}")
    for name in ("val_fraction", "td_lambda", "train_fraction"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value <= 1:  # NaN too
            raise ValueError(f"`--{name.replace('_', '-')}` must be in [0, 1], but is {value!r}")
    if getattr(args, "train_fraction", None) == 0:
        raise ValueError("`--train-fraction` must be above 0 (it is the share trained on), but is 0.0")


def number(text: str, flag: str) -> float:
    """``0.918``, ``1e6``, ``135M``, ``1.7B``: a float with an optional K / M / B / T suffix."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+?)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        return float(match.group(1)) * SUFFIXES[match.group(2).lower()]
    except (AttributeError, ValueError):
        raise ValueError(f"`{flag}` needs numbers such as 0.9, 1e6 or 135M, but has {text!r}") from None


def numbers(text: str, flag: str) -> list[float]:
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"`{flag}` must hold at least one comma-separated number, but is {text!r}")
    return [number(part, flag) for part in parts]


def count(text: str) -> int:
    """argparse type for counts that may be written 1e6 or 1M."""
    value = number(text, "count")
    if value != int(value):
        raise argparse.ArgumentTypeError(f"needs a whole number, but is {text!r}")
    return int(value)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(payload, indent=2, sort_keys=True))  # NaN / Infinity as JSON5-style literals


def add_training_args(p: argparse.ArgumentParser, bootstrap_folder: str) -> None:
    """The flags train-head and train-value share: learning rate, held-out share, TD(lambda) targets, seed
    (``bootstrap_folder``: what kind of folder --td-value names)."""
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each folder's windows held out")
    p.add_argument("--td-n", type=int, default=None, help="bootstrapped targets for returns rows: n steps")
    p.add_argument("--td-lambda", type=float, default=1.0, help="TD(lambda) mixing of the n-step targets")
    p.add_argument("--td-value", default=None,
                   help=f"{bootstrap_folder} folder whose predictions bootstrap (default: baseline)")
    p.add_argument("--seed", type=int, default=0)
