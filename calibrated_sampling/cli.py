"""`calibrated-sampling` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import __version__, cli_lookahead, cli_theory
from . import cli_common as common
from .files import write_atomic


def _load(args):
    from .data import load_documents, make_windows
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    docs = load_documents(args.data)
    windows = make_windows(docs, tokenizer, args.num_prompts, args.prompt_tokens, args.max_new_tokens,
                           split=None if args.split == "all" else args.split)
    return model, tokenizer, windows


def cmd_measure(args) -> int:
    from .equal_entropy import measured_equal_entropy
    from .measure import measure
    from .report import format_equal_entropy, format_table, plot_curves, write_results
    from .samplers import check_specs, resolve_samplers, split_specs

    specs = split_specs(args.samplers)
    check_specs(specs)  # bad specs, missing head folders, a sampler named twice: before the model loads
    common.check_counts(args, ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size"))
    common.check_out(args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    state = common.distributed()  # several processes: each runs a share of the batches on its own device
    if state is not None:
        args.device = str(state.device)
    with common.main_first(state):
        model, tokenizer, windows = _load(args)
    # Every spec built (heads loaded, schedules checked against T) before anything is measured or written.
    samplers = resolve_samplers(specs, model, args.max_new_tokens)
    kwargs = dict(batch_size=args.batch_size, seed=args.seed, stop_at_eos=not args.ignore_eos)
    if state is None:
        results = _measure_with_journal(model, tokenizer, windows, samplers, Path(args.out), **kwargs)
    else:
        results = measure(model, tokenizer, windows, samplers, **kwargs)
        if not state.is_main:
            return 0  # every process holds the full results; process 0 writes them
    settings = {k: getattr(args, k) for k in ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size",
                                             "seed", "split", "dtype", "ignore_eos")}
    settings.update(machine=common.machine(), seconds=round(time.perf_counter() - started, 1), version=__version__)
    path = write_results(args.out, args.model, args.data, settings, results, tokenizer)
    plot = plot_curves(results, path.parent / "curves.png",
                       title=f"{args.model} on {args.data}: {args.num_prompts} prompts, seed {args.seed}")
    print(format_table(results))
    equal = measured_equal_entropy(results)
    if equal is not None:  # temperature brackets EntCE = 0: every method read against it there
        print("\n".join(format_equal_entropy({"equal_entropy": equal})))
        write_atomic(path.parent / "equal_entropy.json", json.dumps(equal, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path} and {plot}")
    return 0


def _measure_with_journal(model, tokenizer, windows, samplers: list, out: Path, **kwargs) -> dict:
    """measure() one sampler at a time, each finished one kept in ``OUT/measurements.jsonl``
    (:mod:`.journal`): an interrupted run measures again only what it had not finished, and of the
    sampler it was measuring, only the batches not kept in ``OUT/batches.cache/`` (:mod:`.batch_store`)."""
    from .compare import run_fingerprint
    from .journal import JOURNAL_NAME, Journal
    from .measure import measure

    journal = Journal(out / JOURNAL_NAME, run_fingerprint(model, tokenizer, windows, kwargs["seed"], command="measure",
                                                          batch_size=kwargs["batch_size"],
                                                          stop_at_eos=kwargs["stop_at_eos"]))
    results = {}
    for sampler in samplers:
        result = journal.get(sampler.key)
        if result is None:
            result = measure(model, tokenizer, windows, [sampler], store_for=lambda s: journal.batches(s.key),
                             **kwargs)[sampler.spec]
            journal.add(sampler.key, result)
        else:
            print(f"{sampler.spec}: from {journal.path}", file=sys.stderr)
        results[sampler.spec] = result
    return results


def cmd_compare(args) -> int:
    from .compare import PRESETS, run_comparison
    from .data import load_documents, make_windows
    from .journal import JOURNAL_NAME
    from .models import load_model
    from .report import write_comparison
    from .samplers import check_specs

    preset = PRESETS["full" if args.full else "quick"]
    overrides = {k: getattr(args, k) for k in ("num_prompts", "max_new_tokens", "batch_size")
                 if getattr(args, k) is not None}  # 0 is an override too, and refused by Preset
    if overrides:
        from dataclasses import replace

        preset = replace(preset, **overrides)
    heads = [h.strip() for h in (args.heads or "").split(",") if h.strip()]
    check_specs([f"calibrated:{head}" for head in heads])  # a mistyped folder fails now, not after the grid
    schedules = [f.strip() for f in (args.schedules or "").split(",") if f.strip()]
    check_specs([f"schedule:{file}" for file in schedules])  # a missing or malformed file too (its model: later)
    common.check_counts(args, ("prompt_tokens",))
    common.check_out(args)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    docs = load_documents(args.data)
    windows = make_windows(docs, tokenizer, preset.num_prompts, args.prompt_tokens, preset.max_new_tokens,
                           split="eval")
    fit_windows = None if args.no_lookahead else make_windows(
        docs, tokenizer, preset.fit_prompts, args.prompt_tokens, preset.max_new_tokens, split="fit")
    journal = Path(args.out) / JOURNAL_NAME  # an interrupted comparison resumes from its finished measurements
    payload = run_comparison(model, tokenizer, windows, fit_windows, preset, heads=heads, seed=args.seed,
                             journal=journal, schedules=schedules)
    settings = {"preset": "full" if args.full else "quick", "num_prompts": preset.num_prompts,
                "prompt_tokens": args.prompt_tokens, "max_new_tokens": preset.max_new_tokens,
                "batch_size": preset.batch_size, "seed": args.seed, "split": "eval", "dtype": args.dtype,
                "heads": heads, "schedules": schedules, "machine": common.machine(), "version": __version__,
                "seconds": round(time.perf_counter() - started, 1)}
    title = f"{args.model} on {args.data}: {preset.num_prompts} prompts, {preset.max_new_tokens} tokens, seed {args.seed}"
    paths = write_comparison(args.out, payload, args.model, args.data, settings, tokenizer, title=title)
    print(paths["report"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"total {settings['seconds']:.0f} s")
    return 0


# --- theory, corpus-exponent, scaling ------------------------------------------------------------


def cmd_label(args) -> int:
    from .labels import make_labels
    from .samplers import check_specs, parse_sampler

    check_specs([args.sampler])  # a bad spec or a missing head folder fails before the model loads
    common.check_counts(args, ("num_prompts", "prompt_tokens", "max_new_tokens", "batch_size"))
    common.check_seed(args)
    common.check_out(args)
    model, tokenizer, windows = _load(args)
    sampler = parse_sampler(args.sampler, model)
    if args.kind != "returns" and sampler.hooks_model:
        # rollouts start mid-continuation and teacher forcing never samples: a hooked sampler's step count breaks
        raise ValueError(f"`--sampler` {args.sampler!r} hooks into the model; it can make `returns` labels only, "
                         f"not {args.kind!r}")
    with sampler.attach(model):
        manifest = make_labels(model, tokenizer, windows, args.kind, args.out, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, seed=args.seed, candidates=args.candidates,
                               rollouts=args.rollouts, positions=args.positions, horizon=args.horizon,
                               logits_processor=sampler.processors if sampler.spec != "base" else None,
                               stop_at_eos=not args.ignore_eos, hidden_dtype=args.hidden_dtype,
                               data_spec=f"{args.data} split={args.split} prompts={args.num_prompts}")
    counts = manifest["counts"]
    print(f"{args.out}: {counts['rows']} rows, {counts['contexts']} contexts, {len(manifest['shards'])} shards "
          f"({'complete' if manifest['complete'] else 'incomplete'})")
    return 0


def cmd_train_head(args) -> int:
    from .heads import FutureEntropyHead, HeadConfig
    from .label_rows import load_training_rows
    from .models import load_model
    from .train import evaluate_head, fit_baseline, predict, train_head

    if args.fixed_horizon is not None and args.fixed_horizon < 1:
        raise ValueError(f"`--fixed-horizon` must be a positive integer, but is {args.fixed_horizon}")
    common.check_training_args(args)
    common.check_out(args)
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    folders = [f.strip() for f in args.labels.split(",") if f.strip()]
    value_fn = None
    if args.td_value is not None:  # an earlier head's predictions as the value after n steps
        previous = FutureEntropyHead.from_pretrained(args.td_value, model, tokenizer)
        value_fn = lambda hidden, token, horizon: predict(previous, {  # noqa: E731
            "hidden": hidden, "token": token, "horizon": horizon, "target": horizon})
    train, val, label_settings = load_training_rows(
        folders, model=model, val_fraction=args.val_fraction, train_fraction=args.train_fraction,
        td_n=args.td_n, td_lambda=args.td_lambda, value_fn=value_fn)
    if args.fixed_horizon is not None:  # a head read at one horizon must have learnt that one only
        found = sorted(set(train["horizon"].tolist()))
        if found != [args.fixed_horizon]:
            shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
            raise ValueError(f"`--fixed-horizon` is {args.fixed_horizon}, but the training rows of {args.labels} "
                             f"have horizons {shown}: label at that horizon only (e.g. `label --kind rollout "
                             f"--horizon {args.fixed_horizon}`)")
    config = HeadConfig.for_model(model, tokenizer, family=args.family, rank=args.rank, mlp_hidden=args.mlp_hidden,
                                  mlp_layers=args.mlp_layers, max_horizon=args.max_horizon,
                                  fixed_horizon=args.fixed_horizon,
                                  label_settings={"folders": label_settings, "td_n": args.td_n,
                                                  "td_lambda": args.td_lambda})
    out = model.get_output_embeddings()
    torch.manual_seed(args.seed)  # the MLP's initial weights: the same head from the same rows, in any process
    head = FutureEntropyHead(config, out.weight.detach() if args.family == "tied" else None)
    result = train_head(head, train, val_rows={k: torch.cat([v[k] for v in val.values()]) for k in train},
                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, out_dir=args.out,
                        resume=not args.restart, seed=args.seed)
    baseline = fit_baseline(train)
    report = {"machine": common.machine(), "seconds": result.seconds, "train_rows": len(train["target"]),
              "head_parameters": result.head.num_parameters(), "lm_parameters": config.lm_parameters,
              "label_settings": label_settings, "validation": {}}
    print(f"{'labels':<28} {'rows':>7} {'R2':>7} {'R2 base':>8} {'R2 within':>10} {'base within':>11}")
    groups = {Path(folder).name: rows for folder, rows in val.items()}
    for kind in {s["kind"] for s in label_settings}:  # several folders of one kind: also judged together
        names = [s["folder"] for s in label_settings if s["kind"] == kind]
        if len(names) > 1:
            groups[f"{kind} (all)"] = {k: torch.cat([groups[n][k] for n in names]) for k in groups[names[0]]}
    for name, rows in groups.items():
        scores = evaluate_head(result.head, rows, baseline=baseline)
        report["validation"][name] = scores
        print(f"{name:<28} {scores['rows']:>7} {scores['r2']:>7.3f} {scores['baseline_r2']:>8.3f} "
              f"{scores['r2_within']:>10.3f} {scores['baseline_r2_within']:>11.3f}")
    Path(args.out, "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"head: {result.head_dir} ({report['head_parameters']:,} parameters, "
          f"{report['head_parameters'] / config.lm_parameters:.1%} of the LM); metrics: {args.out}/metrics.json; "
          f"loss curve: {args.out}/loss.png")
    return 0


def cmd_fit(args) -> int:
    """``--objective entropy`` (default): an entropy-matched schedule file; ``log-loss``: the per-bin
    log-loss fit of a head's weights, into its config.json (or a copy) or into a schedule file."""
    _check_fit_args(args)
    if args.objective == "entropy":
        return _fit_entropy(args)
    return _fit_log_loss(args)


def _check_fit_args(args) -> None:
    """Every flag checked before the model loads: a fit that fails after minutes of sampling on a typo
    wastes the minutes."""
    common.check_counts(args, ("num_prompts", "max_new_tokens", "bin_size", "batch_size", "max_rounds", "max_iter"))
    if args.heldout_prompts < 0:
        raise ValueError(f"`--heldout-prompts` must be 0 or more, but is {args.heldout_prompts}")
    if args.head is not None and not Path(args.head).is_dir():
        raise FileNotFoundError(f"`--head` {args.head!r} is not a folder")
    if args.lookahead_top is not None:
        if args.objective != "entropy" or args.head is not None:
            raise ValueError(f"`--lookahead-top` {args.lookahead_top} is the F of an entropy-matched schedule: it "
                             "goes with --objective entropy and without --head")
        if args.lookahead_top < 2:
            raise ValueError(f"`--lookahead-top` must be at least 2 (with one candidate F is constant), but is "
                             f"{args.lookahead_top}")
    if args.objective != "entropy" and (args.f_weight is not None or args.start is not None):
        raise ValueError(f"`--f-weight` {args.f_weight} and `--start` {args.start} belong to --objective entropy")
    if args.f_weight is not None:
        if args.head is None and args.lookahead_top is None:
            raise ValueError(f"`--f-weight` {args.f_weight} weights F: give --head or --lookahead-top")
        if not 0 <= args.f_weight < math.inf:
            raise ValueError(f"`--f-weight` must be a finite number of at least 0, but is {args.f_weight}")
    if args.start is not None and not Path(args.start).is_file():
        raise FileNotFoundError(f"`--start` {args.start!r} is not a schedule file")
    if args.objective == "entropy":
        if not args.out or not args.out.endswith(".json"):
            raise ValueError(f"`--objective entropy` writes a schedule file: `--out` must name a .json file, but is "
                             f"{args.out!r}")
        if args.heldout_prompts:
            raise ValueError("`--heldout-prompts` belongs to `--objective log-loss`; judge an entropy-matched "
                             "schedule held out with `measure --samplers schedule:FILE`")
    elif args.head is None:
        raise ValueError("`--objective log-loss` fits a head's weights: `--head` is required")
    # A schedule file, or (log-loss) a folder for the head's copy: the fit's minutes are not lost on a typo.
    common.check_out(args, "file" if args.objective == "entropy" or (args.out or "").endswith(".json") else "folder")
    if args.head is not None:
        from .heads import read_folder

        read_folder(args.head)  # a missing or corrupt config.json or head.safetensors: before the model loads


def _fit_windows(args, tokenizer):
    from .data import load_documents, make_windows

    docs = load_documents(args.data)
    windows = make_windows(docs, tokenizer, args.num_prompts, args.prompt_tokens, args.max_new_tokens, split="fit")
    heldout = None
    if args.heldout_prompts:
        heldout = make_windows(docs, tokenizer, args.heldout_prompts, args.prompt_tokens, args.max_new_tokens,
                               split="eval")
    return windows, heldout


def _fit_entropy(args) -> int:
    from .entropy_fit import fit_entropy_matched, secant_slope, store_paths
    from .models import load_model
    from .schedule import describe_schedule, load_schedule, save_schedule

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    windows, _ = _fit_windows(args, tokenizer)
    # Every round is kept beside the output: an interrupted fit, or one given more --max-rounds, resumes.
    rounds = Path(args.out).with_suffix(".rounds.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    future = ("lookahead", args.lookahead_top) if args.lookahead_top else args.head or "none"
    start_a = start_slope = None
    if args.start is not None:  # another schedule's a_j (same model and T) start the rounds
        start = load_schedule(args.start, model, tokenizer, args.max_new_tokens)
        if start.bin_size != args.bin_size:
            raise ValueError(f"`--start` {args.start} has {start.bin_size}-step bins, but `--bin-size` is "
                             f"{args.bin_size}")
        start_a = list(start.a)
        # Its own rounds measured how its bins' gaps move with a_j: round 1's step is sized by that slope.
        secant = secant_slope(start.report.get("history", []))
        start_slope = None if secant is None else secant.tolist()
    fit = fit_entropy_matched(model, tokenizer, windows, max_new_tokens=args.max_new_tokens, bin_size=args.bin_size,
                              future=future, batch_size=args.batch_size, seed=args.seed,
                              max_rounds=args.max_rounds, checkpoint=rounds, f_weight=args.f_weight,
                              start_a=start_a, start_slope=start_slope)
    fit["report"].update(model=args.model, data=args.data, prompt_tokens=args.prompt_tokens, machine=common.machine(),
                         version=__version__)
    report = fit["report"]
    print(f"{report['rounds']} rounds, {report['generated_tokens']} generated tokens, {report['seconds']:.0f} s; "
          f"fit-side log loss {report['log_loss_base']:.4f} -> {report['log_loss']:.4f}, "
          + (f"F's weight fixed at {report['f_weight']:g}" if report.get("f_weight") is not None
             else f"multiplier of F {report['multiplier']:g}"))
    if report.get("unreachable"):
        print(f"calibrated-sampling fit: the fit cannot converge: {report['unreachable']}; nothing written.",
              file=sys.stderr)
        return 1
    if not report["converged"]:
        gaps = ", ".join(f"{row['gap']:+.3f} ± {row['gap_stderr']:.3f}" for row in report["bins"])
        print(f"calibrated-sampling fit: the fit did not converge in {args.max_rounds} rounds (per-bin gaps {gaps}); "
              f"nothing written. The rounds are kept in {rounds}: the same command with more --max-rounds "
              f"resumes from them; more prompts (--num-prompts) narrow the standard errors.", file=sys.stderr)
        return 1
    path = save_schedule(args.out, fit, model, tokenizer)
    for kept in (rounds, *store_paths(rounds).values()):
        kept.unlink(missing_ok=True)  # the schedule's report holds the history
    print(describe_schedule(load_schedule(path)))
    print(f"\nwrote {path}; sample it with the spec schedule:{path}")
    return 0


def _fit_log_loss(args) -> int:
    from .fit import fit_weights, format_calibration, save_calibration
    from .heads import FutureEntropyHead
    from .models import load_model
    from .schedule import save_schedule

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    head = FutureEntropyHead.from_pretrained(args.head, model=model, tokenizer=tokenizer)
    windows, heldout = _fit_windows(args, tokenizer)
    calibration = fit_weights(model, tokenizer, head, windows, max_new_tokens=args.max_new_tokens,
                              bin_size=args.bin_size, form=args.form, batch_size=args.batch_size,
                              heldout_windows=heldout, max_iter=args.max_iter)
    calibration["report"].update(model=args.model, data=args.data, prompt_tokens=args.prompt_tokens,
                                 machine=common.machine(), version=__version__)
    print(format_calibration(calibration))
    if args.out and args.out.endswith(".json"):  # a schedule file beside the head: no copy of its weights
        path = save_schedule(args.out, log_loss_schedule(calibration, args.head), model, tokenizer)
        print(f"\nwrote {path}; sample it with the spec schedule:{path}")
        return 0
    target = args.head
    if args.out:  # a copy of the head with these weights: the original keeps its schedule (another T, say)
        import shutil

        if Path(args.out).resolve() != Path(args.head).resolve():
            shutil.copytree(args.head, args.out, dirs_exist_ok=True)
        target = args.out
    path = save_calibration(target, calibration)
    print(f"\nwrote the weights into {path}")
    return 0


def log_loss_schedule(calibration: dict, head_dir: str) -> dict:
    """A log-loss fit (fit.fit_weights) in the shape ``schedule.save_schedule`` takes."""
    from .heads import weights_file_digest

    return {"objective": "log-loss", "max_new_tokens": calibration["max_new_tokens"],
            "bin_size": calibration["bin_size"], "a": calibration["a"], "b": calibration["b"],
            "future": {"kind": "head", "path": str(head_dir), "sha256": weights_file_digest(head_dir)},
            "report": calibration["report"]}


def cmd_generate(args) -> int:
    from transformers import LogitsProcessorList

    from .calibrator import FutureEntropyCalibrator
    from .models import load_model
    from .samplers import check_specs
    from .schedule import load_schedule, schedule_calibrator

    # The head folder or schedule file and the settings, as a spec, checked before the model loads.
    if args.schedule is not None:
        if args.scale != 1.0:
            raise ValueError(f"`--scale` {args.scale!r} applies to --head only: a schedule's weights are fitted as a "
                             "whole (fit another schedule instead)")
        check_specs([f"schedule:{args.schedule}:past={args.past_schedule}"])
    else:
        check_specs([f"calibrated:{args.head}:scale={args.scale!r}:past={args.past_schedule}"])
    common.check_counts(args, ("max_new_tokens",))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.schedule is not None:
        calibrator = schedule_calibrator(load_schedule(args.schedule, model, tokenizer), model,
                                         past_schedule=args.past_schedule)
    else:
        calibrator = FutureEntropyCalibrator.from_pretrained(args.head, model, tokenizer, scale=args.scale,
                                                             past_schedule=args.past_schedule)
    steps = args.max_new_tokens or calibrator.max_new_tokens
    if steps > calibrator.max_new_tokens and args.past_schedule == "error":
        raise ValueError(f"`--max-new-tokens` {steps} is longer than the fitted schedule "
                         f"({calibrator.max_new_tokens} tokens); add --past-schedule base to sample from the base "
                         f"model after it")
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:  # the model has nothing to condition on (no BOS token is added)
        raise ValueError(f"`--prompt` {args.prompt!r} has no tokens for this tokenizer: give some text")
    torch.manual_seed(args.seed)
    with calibrator.attached(model), torch.no_grad():
        # Plain sampling settings: q is exactly the calibrated distribution (no default top-k / temperature).
        out = model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps,
                             logits_processor=LogitsProcessorList([calibrator]))
    print(args.prompt + tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _add_measure_parser(sub) -> None:
    p = sub.add_parser("measure", help="log loss on human text vs entropy of generations, per sampler")
    common.add_model_args(p)
    common.add_data_args(p, prompts=16, new_tokens=256)
    p.add_argument("--samplers", default="base,temperature=0.9,top_p=0.95",
                   help="comma-separated specs: base, temperature=X, top_p=X, top_k=N, min_p=X, typical_p=X, "
                        "eta=X, epsilon=X; join terms with '+' to compose")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--out", default="runs/measure", help="output folder")
    p.set_defaults(func=cmd_measure)


def _add_label_parser(sub) -> None:
    p = sub.add_parser("label", help="future-entropy labels (returns, rollout, teacher-forced) as safetensors shards")
    common.add_model_args(p)
    common.add_data_args(p, prompts=64, new_tokens=256)
    p.set_defaults(split="fit")  # heads learn from the fit side; the eval side is for judging them
    p.add_argument("--kind", required=True, choices=["returns", "rollout", "teacher-forced"])
    p.add_argument("--sampler", default="base",
                   help="q, the sampler whose future entropy is labelled: base, temperature=X, ..., or "
                        "calibrated:HEAD_DIR for a later round (returns labels)")
    p.add_argument("--candidates", type=int, default=8, help="rollout: top tokens of q besides the human token")
    p.add_argument("--rollouts", type=int, default=4, help="rollout: continuations per candidate (common noise)")
    p.add_argument("--positions", type=int, default=4, help="rollout: prefixes per window")
    p.add_argument("--horizon", type=int, default=None,
                   help="rollout: steps per rollout; returns / teacher-forced: cap on summed steps (default: to the end)")
    p.add_argument("--hidden-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--ignore-eos", action="store_true", help="mask EOS out of q: every sequence runs T steps")
    p.add_argument("--out", required=True, help="label folder (an interrupted run resumes into it)")
    p.set_defaults(func=cmd_label)


def _add_train_head_parser(sub) -> None:
    p = sub.add_parser("train-head", help="train a future-entropy head on label folders (frozen LM)")
    p.add_argument("--model", default="smollm2-135m", help="the LM the labels were made with")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present; `accelerate launch` for several)")
    p.add_argument("--labels", required=True, help="comma-separated label folders (`calibrated-sampling label`)")
    p.add_argument("--family", default="tied", choices=["tied", "lowrank"])
    p.add_argument("--rank", type=int, default=None, help="lowrank: columns of the head's own table (default 64)")
    p.add_argument("--mlp-hidden", type=int, default=1024)
    p.add_argument("--mlp-layers", type=int, default=2)
    p.add_argument("--max-horizon", type=int, default=256, help="normaliser of the horizon input")
    p.add_argument("--fixed-horizon", type=int, default=None,
                   help="a head of one horizon: every label row has it, and the head is read at it at every step "
                        "(1: a head distilled from the one-step lookahead's exact F)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    common.add_training_args(p, "head")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this share of the training windows (learning curves)")
    p.add_argument("--restart", action="store_true", help="discard the checkpoints in --out and start over")
    p.add_argument("--out", required=True, help="gets checkpoints/, head/, history.json, loss.png, metrics.json")
    p.set_defaults(func=cmd_train_head)


def _add_fit_parser(sub) -> None:
    from .calibrator import FORMS
    from .fit import DEFAULT_BIN_SIZE

    p = sub.add_parser("fit", help="fit a schedule of weights (one per bin of steps): entropy-matched (calibrated "
                                   "per bin at the lowest log loss) or by human log loss alone")
    common.add_model_args(p)
    p.add_argument("--objective", default="entropy", choices=["entropy", "log-loss"],
                   help="entropy: every bin's generation entropy matched to its human log loss, F weighted where "
                        "it lowers the log-loss price (writes a schedule file); log-loss: the paper's fit of human "
                        "log loss alone")
    p.add_argument("--head", default=None,
                   help="head folder whose F the schedule weights (entropy: optional, none = a per-step temperature "
                        "schedule; log-loss: required, and the weights go into its config.json unless --out)")
    p.add_argument("--lookahead-top", type=int, default=None,
                   help="entropy: F from the exact one-step lookahead over the top C candidates instead of a head "
                        "(C + 1 tokens per row and step: slow on a CPU)")
    p.add_argument("--out", default=None,
                   help="FILE.json: write a schedule file (spec schedule:FILE); log-loss only: a folder gets a copy "
                        "of the head with the weights")
    p.add_argument("--data", default="pydoc", help="any `measure --data` spec; fits on its `fit` split")
    p.add_argument("--num-prompts", type=int, default=128, help="fit windows (from the `fit` split)")
    p.add_argument("--heldout-prompts", type=int, default=0,
                   help="log-loss: held-out windows (from the `eval` split) for the fit's report")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256, help="T: the generation length the schedule covers")
    p.add_argument("--bin-size", type=int, default=DEFAULT_BIN_SIZE, help="steps per weight (the last bin may be shorter)")
    p.add_argument("--form", default="tied", choices=FORMS,
                   help="log-loss: tied: one alpha per bin; untied: (a, b) per bin; global: one alpha (ablation)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-iter", type=int, default=50, help="log-loss: Newton passes over the data at most")
    p.add_argument("--max-rounds", type=int, default=8,
                   help="entropy: rounds of sampling the fit prompts before the fit gives up (and writes nothing)")
    p.add_argument("--seed", type=int, default=0, help="entropy: seed of the fit's generations (the same every round)")
    p.add_argument("--f-weight", type=float, default=None,
                   help="entropy: hold F's weight b at this value in every bin and match only the a_j (e.g. the "
                        "alpha of `lookahead-fit`); default: b fitted per bin")
    p.add_argument("--start", default=None,
                   help="entropy: a schedule file (same model, T and bin size) whose a_j start the rounds, "
                        "and whose last two rounds' slope sizes the first step")
    p.set_defaults(func=cmd_fit)


def _add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="all samplers side by side: grids, lookahead, calibrated heads, "
                                       "matched-EntCE settings, MAUVE, frontier plots")
    common.add_model_args(p)
    p.add_argument("--data", default="pydoc", help="any `measure --data` spec")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small grids, 16 prompts x 48 tokens (the default)")
    size.add_argument("--full", action="store_true", help="fuller grids, 64 prompts x 256 tokens (docs/results.md's)")
    p.add_argument("--heads", default=None, help="comma-separated fitted head folders (calibrated:DIR samplers)")
    p.add_argument("--schedules", default=None,
                   help="comma-separated schedule files (`fit --out FILE`, schedule:FILE samplers), read against "
                        "temperature at EntCE = 0; each is checked against the model and length before anything runs")
    p.add_argument("--num-prompts", type=int, default=None, help="override the preset")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the preset")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--no-lookahead", action="store_true", help="skip the lookahead baseline (its fit and run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare", help="gets results.json, report.md, samples.jsonl, curves.png, "
                                                        "frontier_logloss.png, frontier_diversity.png, "
                                                        "per_bin_entce.png")
    p.set_defaults(func=cmd_compare)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a calibrated distribution: a schedule file or a fitted head")
    common.add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--schedule", help="schedule file (`fit --out FILE.json`)")
    source.add_argument("--head", help="head folder with a fitted calibration (config.json, head.safetensors)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the length the schedule was fitted for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the future-entropy weights b (0: temperature part)")
    p.add_argument("--past-schedule", default="error", choices=["error", "base"],
                   help="steps past the fitted schedule: refuse, or sample from the base model")
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one ``_add_<command>_parser`` per subcommand, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="calibrated-sampling", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_measure_parser(sub)
    _add_label_parser(sub)
    _add_train_head_parser(sub)
    _add_fit_parser(sub)
    _add_compare_parser(sub)
    _add_generate_parser(sub)
    cli_theory.add_theory_parser(sub)
    cli_theory.add_corpus_exponent_parser(sub)
    cli_theory.add_scaling_parser(sub)
    cli_lookahead.add_parsers(sub)  # train-value, lookahead-fit, judge
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as error:  # OSError: also a hub id that cannot be reached
        print(f"calibrated-sampling {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        common.leave_process_group()


if __name__ == "__main__":
    sys.exit(main())

