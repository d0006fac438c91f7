"""Generated tokens per second with the FutureEntropyCalibrator against plain sampling: same model,
same prompts, same batch, side by side in one run.

    python benchmarks/calibrator_overhead.py [--head DIR] [--batch-sizes 1,16 --max-new-tokens 64]

Without ``--head`` the calibrator uses a randomly initialised tied head (the default size) with a
synthetic schedule: the cost does not depend on the trained values. Goal: ratio at least 0.95.
Both sides sample exactly max-new-tokens tokens (EOS ignored), after one short warm-up each.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from transformers import LogitsProcessorList

from calibrated_sampling.calibrator import FutureEntropyCalibrator
from calibrated_sampling.data import batch_windows, load_documents, make_windows
from calibrated_sampling.heads import FutureEntropyHead, HeadConfig
from calibrated_sampling.models import load_model


def random_calibrator(model, tokenizer, steps: int, fused: bool | None) -> FutureEntropyCalibrator:
    """A default-size tied head with random weights and a 16-step-bin schedule of small, non-zero weights."""
    bins = math.ceil(steps / 16)
    calibration = {"form": "untied", "max_new_tokens": steps, "bin_size": 16, "a": [1.02] * bins, "b": [0.01] * bins}
    head = FutureEntropyHead(HeadConfig.for_model(model, tokenizer, calibration=calibration))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.02)
    return FutureEntropyCalibrator(head, fused=fused)


def timed_generate(model, ids, mask, steps: int, processors: LogitsProcessorList | None = None) -> float:
    """Seconds for one sampled generation of exactly ``steps`` tokens."""
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                       max_new_tokens=steps, min_new_tokens=steps, logits_processor=processors)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--head", default=None, help="a trained head folder with a fitted calibration")
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fused", default="auto", choices=["auto", "true", "false"],
                        help="the calibrator's path (auto: fused for tied heads)")
    args = parser.parse_args()
    fused = {"auto": None, "true": True, "false": False}[args.fused]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.head:
        calibrator = FutureEntropyCalibrator.from_pretrained(args.head, model, tokenizer, fused=fused)
        if args.max_new_tokens > calibrator.max_new_tokens:
            raise SystemExit(f"--max-new-tokens {args.max_new_tokens} is longer than the head's schedule "
                             f"({calibrator.max_new_tokens})")
    else:
        calibrator = random_calibrator(model, tokenizer, args.max_new_tokens, fused)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    windows = make_windows(load_documents(args.data), tokenizer, max(sizes), args.prompt_tokens, args.max_new_tokens)
    threads = torch.get_num_threads()
    print(f"{args.model} ({args.dtype}, {model.device}, {platform.machine()}, {threads} torch threads), "
          f"head: {args.head or 'random tied'} ({calibrator.head.num_parameters():,} parameters), "
          f"{args.prompt_tokens}-token prompts, {args.max_new_tokens} new tokens")
    print(f"{'batch':>5} {'plain tok/s':>12} {'calibrated tok/s':>17} {'ratio':>6}  path")
    for size in sizes:
        ids, mask = batch_windows(windows[:size], tokenizer.pad_token_id, with_continuation=False)
        ids, mask = ids.to(model.device), mask.to(model.device)
        listed = LogitsProcessorList([calibrator])
        timed_generate(model, ids, mask, 4, None)  # warm-up
        plain = timed_generate(model, ids, mask, args.max_new_tokens, None)
        with calibrator.attached(model):
            timed_generate(model, ids, mask, 4, listed)
            calibrated = timed_generate(model, ids, mask, args.max_new_tokens, listed)
            path = "fused" if calibrator._fuse_now else "exact"
        tokens = size * args.max_new_tokens
        print(f"{size:>5} {tokens / plain:>12.1f} {tokens / calibrated:>17.1f} {plain / calibrated:>6.3f}  {path}")


if __name__ == "__main__":
    main()
