"""`calibrated-sampling train-value`, `lookahead-fit` and `judge`: the state-value head, the lookaheads' alpha,
and any F scored within contexts against held-out rollout labels.

All are thin: the work is in value_train.py (the head), lookahead_fit.py (the alpha and its clustered
standard error) and judge.py; cli.py registers them beside the other subcommands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import cli_common as common
from .files import write_atomic


def cmd_train_value(args) -> int:
    from .models import load_model
    from .value_train import train_value_head

    common.check_training_args(args)
    common.check_out(args)
    folders = [part for part in args.labels.split(",") if part]
    if not folders:
        raise ValueError(f"`--labels` names no label folder: {args.labels!r}")
    model, tokenizer = load_model(args.model, device=args.device)
    result, report = train_value_head(folders, model, tokenizer, args.out, td_n=args.td_n, td_lambda=args.td_lambda,
                                      td_value=args.td_value, val_fraction=args.val_fraction,
                                      mlp_hidden=args.mlp_hidden, mlp_layers=args.mlp_layers, seed=args.seed,
                                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    for name, scores in report["validation"].items():
        shown = ", ".join(f"{key} {value:.4f}" for key, value in scores.items() if isinstance(value, float))
        print(f"{name}: {shown}")
    print(f"{report['train_rows']} training rows, {report['value_parameters']} parameters, "
          f"{report['seconds']:.0f} s; value folder {Path(args.out, 'head')} (use it as lookahead-value:DIR)")
    return 0


def cmd_lookahead_fit(args) -> int:
    from .data import load_documents, make_windows
    from .lookahead_fit import fit_and_judge_alpha
    from .lookahead_value_fit import check_source, spec_source
    from .models import load_model

    for flag, value in (("--fit-prompts", args.fit_prompts), ("--eval-prompts", args.eval_prompts),
                        ("--max-new-tokens", args.max_new_tokens), ("--top", args.top), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be a positive integer, but is {value}")
    common.check_out(args, "file")  # found only when the fit is done, it would cost the fit
    if args.source is not None:
        check_source(args.source, "--source")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    source = None if args.source is None else spec_source(args.source, model)
    docs = load_documents(args.data)
    windows = {side: make_windows(docs, tokenizer, count, args.prompt_tokens, args.max_new_tokens, split=side)
               for side, count in (("fit", args.fit_prompts), ("eval", args.eval_prompts))}
    judged = fit_and_judge_alpha(model, tokenizer, windows["fit"], windows["eval"], top=args.top, source=source,
                                 batch_size=args.batch_size)
    result = {"data": args.data, "model": args.model, "source": args.source or "one-step",
              "tokens_per_window": args.max_new_tokens, **judged, "seconds": round(time.perf_counter() - started, 1)}
    fit, held = result["fit"], result["eval"]
    print(f"{args.data}, {result['source']}: alpha {result['alpha']:+.4f} ± {result['alpha_stderr']:.4f} "
          f"(top {result['top']}); human log loss, fit side {fit['log_loss_alpha0']:.4f} -> {fit['log_loss']:.4f} "
          f"({fit['tokens']} tokens), eval side {held['log_loss_alpha0']:.4f} -> {held['log_loss']:.4f} "
          f"({held['tokens']} tokens); {result['seconds']:.0f} s")
    for side in ("fit", "eval"):  # why the text rewards F or not (lookahead_fit.human_gap)
        gap = result[side]["human_gap"]
        print(f"  {side} side at alpha 0: human token among the top {result['top']} at {gap['in_top_fraction']:.0%} of "
              f"steps; there F(human) - E_p F = {gap['gap']:+.4f} ± {gap['gap_stderr']:.4f}, Var_p F {gap['spread']:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_judge(args) -> int:
    from .judge import judge_sources
    from .lookahead_value_fit import check_source
    from .models import load_model

    folders = [part for part in args.labels.split(",") if part]
    if not folders:
        raise ValueError(f"`--labels` names no label folder: {args.labels!r}")
    if not args.source:
        raise ValueError("`--source` is missing: give at least one F spec to judge")
    common.check_out(args, "file")
    for spec in args.source:
        check_source(spec, "--source")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    report = []
    for folder in folders:
        judged = judge_sources(folder, args.source, model)
        report.append(judged)
        print(f"{folder} ({judged['data']}, horizon {judged['horizon']}, {judged['contexts']} contexts x "
              f"{judged['candidates']} candidates x {judged['rollouts']} rollouts): split-half reliability "
              f"{judged['reliability']:.3f}, ceiling {judged['ceiling']:.3f}, human gap "
              f"{next(iter(judged['sources'].values()))['gap_measured']:+.3f}")
        print(f"  {'F':60s} {'corr within':>11s} {'of ceiling':>10s} {'R2 within':>9s} {'gap share':>9s}")
        for spec, s in judged["sources"].items():
            print(f"  {spec:60s} {s['corr_within']:+11.3f} {s['share_of_ceiling']:10.2f} {s['r2_within']:+9.3f} "
                  f"{s['gap_share']:+9.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps({"model": args.model, "judges": report}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_train_value_parser(sub) -> None:
    p = sub.add_parser("train-value", help="train a state-value head V_k(h) on returns label folders "
                                           "(for the lookahead-value F)")
    p.add_argument("--model", default="smollm2-135m", help="the LM the labels were made with")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--labels", required=True, help="comma-separated returns label folders (`label --kind returns`)")
    p.add_argument("--mlp-hidden", type=int, default=256)
    p.add_argument("--mlp-layers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    common.add_training_args(p, "value")
    p.add_argument("--out", required=True, help="gets checkpoints/ (an interrupted run resumes), head/, metrics.json")
    p.set_defaults(func=cmd_train_value)


def add_lookahead_fit_parser(sub) -> None:
    from .lookahead import DEFAULT_TOP

    p = sub.add_parser("lookahead-fit", help="fit a lookahead F's weight alpha to human log loss (with its "
                                             "standard error) and judge it on held-out windows")
    common.add_model_args(p)
    p.add_argument("--data", default="pydoc", help="any `measure --data` spec; fits on its `fit` split")
    p.add_argument("--source", default=None,
                   help="the F: default the exact one-step lookahead; or a spec with alpha=fit, e.g. "
                        "lookahead-value:VALUE_DIR:alpha=fit:top=16:horizon=16, lookahead2:alpha=fit:top=8:top2=8, or a "
                        "head's F on the same top C: head:HEAD_DIR:alpha=fit:top=16[:horizon=K] (K fixed; default "
                        "the steps left)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help="one-step: candidates C (a --source has its own)")
    p.add_argument("--fit-prompts", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256, help="human continuation tokens per window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.set_defaults(func=cmd_lookahead_fit)


def add_judge_parser(sub) -> None:
    p = sub.add_parser("judge", help="score F specs within contexts against held-out rollout labels (the judge: "
                                     "split-half reliability, ceiling, correlation, R^2, human gap)")
    common.add_model_args(p)
    p.add_argument("--labels", required=True, help="comma-separated rollout label folders made on the eval side "
                                                   "(training/smollm2-135m/judge_labels.sh)")
    p.add_argument("--source", action="append", default=[],
                   help="an F spec as lookahead-fit takes (alpha ignored), repeatable: head:HEAD_DIR:alpha=fit, "
                        "lookahead:fit, lookahead2:alpha=fit:top2=8, lookahead-value:VALUE_DIR:alpha=fit (its "
                        "horizon defaults to the judge's)")
    p.add_argument("--out", default=None, help="also write the scores as JSON here")
    p.set_defaults(func=cmd_judge)


def add_parsers(sub) -> None:
    """Register the subcommands."""
    add_train_value_parser(sub)
    add_lookahead_fit_parser(sub)
    add_judge_parser(sub)

