"""`calibrated-sampling theory`, `corpus-exponent` and `scaling`: the paper's simplified setting, a corpus's
power-law exponent, and EntCE over model sizes with its fit C * N^beta."""

from __future__ import annotations

import gc
import math
import re
import sys
import time
from pathlib import Path

import torch

from . import __version__
from . import cli_common as common


def cmd_theory(args) -> int:
    from .theory import format_theory_table, theory_table

    exponents = common.numbers(args.exponents, "--exponents")
    ms = None if args.ms is None else common.numbers(args.ms, "--ms")
    if ms is not None:
        if any(m != int(m) for m in ms):  # int() would quietly make 1.5 a 1
            raise ValueError(f"`--ms` must hold whole numbers of tokens, but is {args.ms!r}")
        ms = [int(m) for m in ms]
    common.check_seed(args)
    common.check_out(args)
    rows = theory_table(exponents, ms, vocab_size=args.vocab_size, trials=args.trials, seed=args.seed)
    print(format_theory_table(rows))
    if args.out:
        settings = {"exponents": exponents, "ms": rows[0]["ms"], "vocab_size": args.vocab_size,
                    "trials": args.trials, "seed": args.seed, "version": __version__}
        path = common.write_json(Path(args.out) / "theory.json", {"settings": settings, "rows": rows})
        print(f"\nwrote {path}")
    return 0


def cmd_corpus_exponent(args) -> int:
    from .data import load_documents, split_of
    from .theory import corpus_exponent, words

    docs = load_documents(args.data)
    if args.split != "all":
        docs = [d for d in docs if split_of(d.key) == args.split]
        if not docs:
            raise ValueError(f"`--data` {args.data!r} has no documents on the {args.split!r} side of the split: "
                             "give more documents, or `--split all`")
    texts = [d.text for d in docs]
    if len({word for text in texts for word in words(text)}) < 2:  # named by the flag, not the function's argument
        raise ValueError(f"`--data` {args.data!r} must contain at least two distinct words to fit a slope")
    r = corpus_exponent(texts, top=args.top)
    beta = round(r["beta"], 3) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0, so it prints +0.000
    print(f"{args.data} ({len(docs)} documents, split {args.split}): a = {r['a']:.3f}, "
          f"beta = 1/a - 1 = {beta:+.3f} (fit over the top {r['top']:,} words, r2 = {r['r2']:.3f}); "
          f"{r['n_words']:,} words, {r['n_types']:,} types")
    return 0


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the token embeddings) of a model; tied weights count once."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None and getattr(m, "weight", None) is not None}
    return total, total - sum(embeddings.values())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_")[-60:] or "model"


def cmd_scaling(args) -> int:
    from .data import load_documents, make_windows
    from .measure import measure
    from .models import check_model_name, load_model
    from .report import write_results
    from .theory import fit_entce_scaling, plot_scaling

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        raise ValueError(f"`--models` must name at least two models to fit a scaling exponent, but is {args.models!r}")
    params = None if args.params is None else common.numbers(args.params, "--params")
    if params is not None and len(params) != len(models):
        raise ValueError(f"`--params` must give one size per model in `--models`, but --params has {len(params)} "
                         f"({args.params!r}) and --models has {len(models)} ({args.models!r})")
    if params is not None and not all(size > 0 for size in params):  # a log-log fit, found after every run
        raise ValueError(f"`--params` must hold positive sizes, but is {args.params!r}")
    for name in models:  # a missing folder or file fails now, not after the models before it are measured
        check_model_name(name)
    common.check_counts(args, ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size"))
    common.check_out(args)
    state = common.distributed()
    if state is not None and args.device_map:
        raise ValueError(f"`--device-map` {args.device_map!r} spreads one model over the GPUs; with "
                         f"{state.world} processes each process holds a whole model: drop one of them")
    device = str(state.device) if state is not None else args.device
    main = state is None or state.is_main
    out = Path(args.out)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    docs = load_documents(args.data)
    settings = {k: getattr(args, k) for k in ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size", "seed",
                                             "split", "dtype", "device_map", "ignore_eos")}
    settings.update(machine=common.machine(), version=__version__, processes=1 if state is None else state.world)
    rows = []
    for k, name in enumerate(models):
        with common.main_first(state):
            model, tokenizer = load_model(name, dtype=args.dtype, device=device, device_map=args.device_map)
        # Each model tokenizes the same documents itself: the models may have different tokenizers.
        windows = make_windows(docs, tokenizer, args.num_prompts, args.prompt_tokens, args.max_new_tokens,
                               split=None if args.split == "all" else args.split)
        total, non_embedding = count_parameters(model)
        if main:
            print(f"[{k + 1}/{len(models)}] {name}: {total:,} parameters", file=sys.stderr)
        result = measure(model, tokenizer, windows, ["base"], batch_size=args.batch_size, seed=args.seed,
                         progress=main, stop_at_eos=not args.ignore_eos)["base"]
        rows.append({"name": name, "params": params[k] if params is not None else total, "params_counted": total,
                     "non_embedding_params": non_embedding, "entce": result["entce"],
                     "entce_stderr": result["entce_stderr"], "log_loss": result["log_loss"],
                     "gen_entropy": result["gen_entropy"], "human_entropy": result["human_entropy"],
                     "num_prompts": len(windows), "seconds": result["seconds"]})
        if main:
            write_results(out / "models" / f"{k:02d}-{_slug(name)}", name, args.data, settings, {"base": result},
                          tokenizer)
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not main:
        return 0

    sizes, values = [r["params"] for r in rows], [r["entce"] for r in rows]
    plot = None
    try:
        fit = fit_entce_scaling(sizes, values, seed=args.seed)
        plot = plot_scaling(sizes, fit["entce_fitted"], fit, str(out / "scaling.png"))
    except ValueError as error:  # e.g. EntCE of both signs: the measurements stand, the power law does not
        fit = {"beta": math.nan, "C": math.nan, "ci95": (math.nan, math.nan), "note": f"no fit: {error}"}
    settings["seconds"] = round(time.perf_counter() - started, 1)
    path = common.write_json(out / "scaling.json", {"data": args.data, "settings": settings, "models": rows,
                                               "fit": {k: fit[k] for k in ("beta", "C", "ci95", "note", "fitted")
                                                       if k in fit}})
    print(format_scaling(rows, fit))
    print(f"\nwrote {path}" + (f" and {plot}" if plot else ""))
    return 0


def format_scaling(rows: list[dict], fit: dict) -> str:
    """The per-model table of ``scaling`` and the fitted exponent."""
    width = max(5, *(len(r["name"]) for r in rows))
    lines = [f"{'model':<{width}} {'params':>10} {'non-emb':>10} {'log loss':>9} {'gen ent':>8} {'EntCE':>8} {'± se':>6}"]
    for r in rows:
        lines.append(f"{r['name']:<{width}} {r['params']:>10.4g} {r['non_embedding_params']:>10.4g} "
                     f"{r['log_loss']:>9.3f} {r['gen_entropy']:>8.3f} {r['entce']:>+8.3f} {r['entce_stderr']:>6.3f}")
    lo, hi = fit["ci95"]
    interval = f", 95% CI [{lo:+.3f}, {hi:+.3f}]" if not math.isnan(lo) else ""
    if not math.isnan(fit["beta"]):
        lines.append(f"\n{fit.get('fitted', 'EntCE')} = {fit['C']:.4g} * N^beta: beta = {fit['beta']:+.3f}{interval}")
    if fit.get("note"):
        lines.append(f"note: {fit['note']}")
    return "\n".join(lines)


def add_theory_parser(sub) -> None:
    from .theory import DEFAULT_VOCAB, PAPER_EXPONENTS

    p = sub.add_parser("theory", help="simplified setting: simulated derailing-rate slopes vs the predicted 1/a - 1")
    p.add_argument("--exponents", default=",".join(map(str, PAPER_EXPONENTS)),
                   help="comma-separated power-law exponents a (default: the paper's WikiText, WritingPrompts, "
                        "CodeContests fits)")
    p.add_argument("--vocab-size", type=common.count, default=DEFAULT_VOCAB, help="V (1e6, 1M, ... accepted)")
    p.add_argument("--ms", default=None, help="comma-separated training-set sizes (default: 8 from 1000 to V/3)")
    p.add_argument("--trials", type=int, default=32, help="independent training streams per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for theory.json (default: print only)")
    p.set_defaults(func=cmd_theory)


def add_corpus_exponent_parser(sub) -> None:
    p = sub.add_parser("corpus-exponent", help="power-law exponent a of a corpus's word frequencies, and 1/a - 1")
    p.add_argument("--data", default="pydoc", help="any `measure --data` spec: pydoc, stdlib-code, a file / folder / "
                                                   "glob, wikitext-103, ...")
    p.add_argument("--split", default="all", choices=["fit", "eval", "all"], help="side of the document-hash split")
    p.add_argument("--top", type=int, default=5000, help="fit over this many of the most frequent words")
    p.set_defaults(func=cmd_corpus_exponent)


def add_scaling_parser(sub) -> None:
    p = sub.add_parser("scaling", help="EntCE of the base sampler for several model sizes, and its fit C * N^beta")
    p.add_argument("--models", required=True, help="comma-separated models (aliases, directories, .gguf, hub ids)")
    p.add_argument("--params", default=None,
                   help="comma-separated sizes N, one per model (135M, 1.7B, 1e9; default: each model's parameter count)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--device-map", default=None, help="`auto` spreads a large model over the GPUs (one process)")
    common.add_data_args(p, prompts=16, new_tokens=256)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--out", default="runs/scaling", help="output folder")
    p.set_defaults(func=cmd_scaling)
