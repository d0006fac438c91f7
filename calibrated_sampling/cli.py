"""`calibrated-sampling` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__


def _machine() -> str:
    return f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m, gemma3-270m), local HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")


def _add_data_args(p: argparse.ArgumentParser, prompts: int, new_tokens: int) -> None:
    p.add_argument("--data", default="pydoc",
                   help="pydoc, stdlib-code, a file / folder / glob of text, or wikitext-103 | writingprompts | "
                        "codecontests (needs `datasets` and a network)")
    p.add_argument("--split", default="eval", choices=["fit", "eval", "all"], help="side of the document-hash split")
    p.add_argument("--num-prompts", type=int, default=prompts)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=new_tokens, help="generated (and human) tokens per prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def _load(args):
    from .data import load_documents, make_windows
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    docs = load_documents(args.data)
    windows = make_windows(docs, tokenizer, args.num_prompts, args.prompt_tokens, args.max_new_tokens,
                           split=None if args.split == "all" else args.split)
    return model, tokenizer, windows


def cmd_measure(args) -> int:
    from .measure import measure
    from .report import format_table, plot_curves, write_results
    from .samplers import parse_sampler, split_specs

    specs = split_specs(args.samplers)
    for spec in specs:  # fail on a bad spec before the model loads
        if ":" not in spec:
            parse_sampler(spec)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer, windows = _load(args)
    results = measure(model, tokenizer, windows, specs, batch_size=args.batch_size, seed=args.seed,
                      stop_at_eos=not args.ignore_eos)
    settings = {k: getattr(args, k) for k in ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size",
                                             "seed", "split", "dtype", "ignore_eos")}
    settings.update(machine=_machine(), seconds=round(time.perf_counter() - started, 1), version=__version__)
    path = write_results(args.out, args.model, args.data, settings, results, tokenizer)
    plot = plot_curves(results, path.parent / "curves.png",
                       title=f"{args.model} on {args.data}: {args.num_prompts} prompts, seed {args.seed}")
    print(format_table(results))
    print(f"\nwrote {path} and {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibrated-sampling", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("measure", help="log loss on human text vs entropy of generations, per sampler")
    _add_model_args(p)
    _add_data_args(p, prompts=16, new_tokens=256)
    p.add_argument("--samplers", default="base,temperature=0.9,top_p=0.95",
                   help="comma-separated specs: base, temperature=X, top_p=X, top_k=N, min_p=X, typical_p=X, "
                        "eta=X, epsilon=X; join terms with '+' to compose")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--out", default="runs/measure", help="output folder")
    p.set_defaults(func=cmd_measure)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"calibrated-sampling {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

