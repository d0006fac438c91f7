"""Throughput of `returns` labelling against plain `generate()` sampling of the same tokens, one run each.

    python benchmarks/label_throughput.py [--num-prompts 8 --max-new-tokens 128 --batch-size 8]

Both sides sample exactly max-new-tokens tokens per prompt from the base model with the same batch
(EOS ignored). Labelling also records H(q) at every step, captures the hidden states, builds the rows
and writes the shards with their manifest. Goal: labelling tokens/s >= 0.9 x generate tokens/s.

The two sides alternate for --rounds rounds and each side's fastest round is compared: on a shared
machine a neighbour's burst can slow one round severalfold, and the minimum is the robust estimate
of what the code costs (every round is printed too).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from calibrated_sampling.data import batch_windows, load_documents, make_windows
from calibrated_sampling.labels import make_labels
from calibrated_sampling.models import load_model


def plain_generate(model, tokenizer, windows, batch_size: int, steps: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        ids, mask = batch_windows(windows[i:i + batch_size], tokenizer.pad_token_id, with_continuation=False)
        with torch.no_grad():
            model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                           top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps, min_new_tokens=steps)
    return time.perf_counter() - started


def label(model, tokenizer, windows, batch_size: int, steps: int, seed: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        manifest = make_labels(model, tokenizer, windows, "returns", f"{folder}/labels", max_new_tokens=steps,
                               batch_size=batch_size, seed=seed, stop_at_eos=False, progress=False)
        return time.perf_counter() - started, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's fastest is compared")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    windows = make_windows(load_documents(args.data), tokenizer, args.num_prompts, args.prompt_tokens,
                           args.max_new_tokens, split="fit")
    # Warm-up of both paths: first-call allocations are not either method's cost.
    plain_generate(model, tokenizer, windows[:1], 1, 4)
    label(model, tokenizer, windows[:1], 1, 4, args.seed)

    plain_times, label_times = [], []
    for _ in range(args.rounds):
        torch.manual_seed(args.seed)
        plain_times.append(plain_generate(model, tokenizer, windows, args.batch_size, args.max_new_tokens))
        seconds, manifest = label(model, tokenizer, windows, args.batch_size, args.max_new_tokens, args.seed)
        label_times.append(seconds)
    plain, labelled = min(plain_times), min(label_times)

    tokens = len(windows) * args.max_new_tokens
    rows = manifest["counts"]["rows"]
    print(f"machine: {platform.machine()} {platform.processor() or platform.system()}, python "
          f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    print(f"settings: model={args.model} data={args.data} prompts={len(windows)} prompt_tokens={args.prompt_tokens} "
          f"new_tokens={args.max_new_tokens} batch={args.batch_size} seed={args.seed} rounds={args.rounds} "
          "(EOS ignored, hidden float32)")
    print(f"rounds (s): generate {', '.join(f'{t:.2f}' for t in plain_times)}; "
          f"labels {', '.join(f'{t:.2f}' for t in label_times)}; fastest of each below")
    print(f"plain generate():  {plain:7.2f} s  {tokens / plain:7.1f} tok/s")
    print(f"returns labels:    {labelled:7.2f} s  {tokens / labelled:7.1f} tok/s  {rows / labelled:7.1f} rows/s "
          f"({rows} rows, hidden {model.get_output_embeddings().in_features} floats each)")
    print(f"ratio labels / generate (tokens per second): {plain / labelled:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
