"""Time of `measure` (teacher-forced log loss + generation entropy, one sampler) against plain
`generate()` sampling of the same number of tokens with the same batch, side by side in one run.

    python benchmarks/measure_overhead.py [--num-prompts 8 --max-new-tokens 128 --batch-size 8 --repeats 3]

Goal: ratio at most 1.15. Both sides sample exactly max-new-tokens tokens (EOS ignored).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from calibrated_sampling.data import batch_windows, load_documents, make_windows
from calibrated_sampling.measure import measure
from calibrated_sampling.models import load_model


def plain_generate(model, tokenizer, windows, batch_size, steps) -> float:
    started = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        ids, mask = batch_windows(windows[i:i + batch_size], tokenizer.pad_token_id, with_continuation=False)
        with torch.no_grad():
            model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                           top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps, min_new_tokens=steps)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (generate, measure) pairs")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    windows = make_windows(load_documents(args.data), tokenizer, args.num_prompts, 128, args.max_new_tokens)
    plain_generate(model, tokenizer, windows[:1], 1, 4)  # warm-up: first-call allocations are not the method's cost

    # Interleaved repeats: a shared machine drifts by 10% and more within minutes, which a single pair would read
    # as overhead; the median of the per-pair ratios is robust to it.
    plains, measured = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        plains.append(plain_generate(model, tokenizer, windows, args.batch_size, args.max_new_tokens))
        started = time.perf_counter()
        measure(model, tokenizer, windows, ["base"], batch_size=args.batch_size, progress=False, stop_at_eos=False)
        measured.append(time.perf_counter() - started)
    ratios = sorted(m / p for m, p in zip(measured, plains))
    plain, measured = statistics.median(plains), statistics.median(measured)

    tokens = len(windows) * args.max_new_tokens
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"settings: model={args.model} data={args.data} prompts={len(windows)} prompt_tokens=128 "
          f"new_tokens={args.max_new_tokens} batch={args.batch_size}")
    print(f"plain generate(), median: {plain:7.2f} s  ({tokens / plain:6.1f} tok/s)")
    print(f"measure(base), median:    {measured:7.2f} s  ({tokens / measured:6.1f} tok/s)  includes the teacher-forced pass")
    print(f"ratio measure / generate, per pair: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio measure / generate, median: {statistics.median(ratios):.3f}  (goal <= 1.15)")


if __name__ == "__main__":
    main()
