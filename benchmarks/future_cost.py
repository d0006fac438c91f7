"""What each future-entropy F costs per generated token, against plain sampling: same model, prompts and
batch, every sampler timed right after its own plain run (pairs), side by side in one run.

    python benchmarks/future_cost.py [--batch-sizes 1,16 --max-new-tokens 16 --repeats 2 --device cuda]
                                     [--out results/future-cost/cpu.json]

The samplers (``--samplers``, any specs): the shipped head's calibrator (fused: one extra H-sized
fold and a V-vector per step), the exact one-step lookahead over the top 4 and 16 candidates (one
extra batched pass of B x C tokens per step), the lookahead with a state value (the same pass and a
small MLP), and the exact two-step F (C x C2 more tokens). The ratio is plain time over sampler time
(1 = free); the issue's goal for the head's zero-overhead path is at least 0.95. Both sides sample
exactly max-new-tokens tokens (EOS ignored), after a short warm-up each. ``--out`` also writes the rows
as JSON (the cost column of training/smollm2-135m/league.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from calibrator_overhead import timed_generate  # the same timing (benchmarks/ is on the path when run)

from calibrated_sampling.data import batch_windows, load_documents, make_windows
from calibrated_sampling.models import load_model
from calibrated_sampling.samplers import parse_sampler, split_specs

DEFAULT_SAMPLERS = ("calibrated:heads/smollm2-135m,lookahead:alpha=0.1:top=4,lookahead:alpha=0.1:top=16,"
                    "lookahead-value:heads/smollm2-135m-value:alpha=0.02:top=16:horizon=16,"
                    "lookahead2:alpha=0.1:top=8:top2=8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated sampler specs")
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="(plain, sampler) pairs per sampler and batch size")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    specs = split_specs(args.samplers)
    samplers = [parse_sampler(spec, model) for spec in specs]  # every spec checked before anything is timed
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    windows = make_windows(load_documents(args.data), tokenizer, max(sizes), args.prompt_tokens, args.max_new_tokens)
    device = torch.cuda.get_device_name(0) if model.device.type == "cuda" else "CPU"
    machine = f"{args.model} ({args.dtype}, {device}, {platform.machine()}, {torch.get_num_threads()} torch threads)"
    print(f"{machine}, {args.prompt_tokens}-token prompts, {args.max_new_tokens} new tokens, {args.repeats} pairs each")
    rows = []
    width = max(len(s.key) for s in samplers)
    print(f"{'sampler':<{width}} {'batch':>5} {'plain tok/s':>12} {'sampler tok/s':>14} {'ratio':>6}  pairs")
    for size in sizes:
        ids, mask = batch_windows(windows[:size], tokenizer.pad_token_id, with_continuation=False)
        ids, mask = ids.to(model.device), mask.to(model.device)
        timed_generate(model, ids, mask, 4)  # warm-up: first-call allocations are nobody's cost
        for sampler in samplers:
            plains, theirs = [], []
            with sampler.attach(model):
                timed_generate(model, ids, mask, 4, sampler.processors)
            for _ in range(args.repeats):
                torch.manual_seed(0)
                plains.append(timed_generate(model, ids, mask, args.max_new_tokens))
                with sampler.attach(model):
                    torch.manual_seed(0)
                    theirs.append(timed_generate(model, ids, mask, args.max_new_tokens, sampler.processors))
            ratios = [p / t for p, t in zip(plains, theirs)]
            tokens = size * args.max_new_tokens
            rows.append({"spec": sampler.spec, "key": sampler.key, "batch_size": size, "ratio": statistics.median(ratios),
                         "pairs": ratios, "plain_tokens_per_s": tokens / statistics.median(plains),
                         "sampler_tokens_per_s": tokens / statistics.median(theirs)})
            print(f"{sampler.key:<{width}} {size:>5} {tokens / statistics.median(plains):>12.1f} "
                  f"{tokens / statistics.median(theirs):>14.1f} {statistics.median(ratios):>6.3f}  "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("data", "prompt_tokens", "max_new_tokens", "repeats")}
        Path(args.out).write_text(json.dumps({"machine": machine, **settings, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
