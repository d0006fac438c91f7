"""Does human log loss reward an exact one-step future entropy on this text? The lookahead's alpha, fitted.

    python training/smollm2-135m/lookahead_fit.py --data ../shared/data/austen --out results/lookahead-fit/austen.json

The exact one-step F(x, v) = H(p(. | x, v)) needs no head: q_alpha(v) is p(v) exp(-alpha F) renormalised
over the top C candidates (their mass under p kept). alpha is fitted to human log loss on fit-side
windows (a convex 1-D problem) and judged on eval-side windows. alpha > 0 with a lower held-out log loss
means the text rewards favouring tokens that leave the next step less uncertain (the paper's mechanism);
the calibrator's b_t can only be as useful as its head's F is close to this one.

``--source SPEC`` fits the alpha of another lookahead F instead, e.g. the state-value one
(``lookahead-value:VALUE_DIR:alpha=fit:top=16:horizon=16``, F = H(p(. | x, v)) + V_15(h(x, v))) or the
exact two-step one (``lookahead2:alpha=fit:top=8:top2=8``), with the alpha's standard error clustered by
window.
"""

import argparse
import json
import time
from pathlib import Path

from calibrated_sampling.data import load_documents, make_windows
from calibrated_sampling.lookahead import DEFAULT_TOP
from calibrated_sampling.lookahead_fit import fit_alpha, lookahead_log_loss, lookahead_loss_terms
from calibrated_sampling.lookahead_value_fit import spec_source
from calibrated_sampling.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="pydoc")
    parser.add_argument("--fit-prompts", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256, help="human continuation tokens per window")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP)
    parser.add_argument("--source", default=None, help="a lookahead spec with alpha=fit (module docstring)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    docs = load_documents(args.data)
    source = None if args.source is None else spec_source(args.source, model)
    top = args.top if source is None else source.top
    terms = {split: lookahead_loss_terms(model, tokenizer, make_windows(docs, tokenizer, n, 128, args.tokens,
                                                                        split=split), top=top, source=source)
             for split, n in (("fit", args.fit_prompts), ("eval", args.eval_prompts))}
    fit = fit_alpha(terms["fit"])
    result = {"data": args.data, "source": args.source or "one-step", "top": top, "tokens_per_window": args.tokens,
              "alpha": fit["alpha"], "alpha_stderr": fit.get("stderr"),
              "fit": {"tokens": fit["tokens"], "log_loss_alpha0": fit["log_loss_alpha0"], "log_loss": fit["log_loss"],
                      "in_top_fraction": fit["in_top_fraction"]},
              "eval": {"tokens": len(terms["eval"]["index"]),
                       "log_loss_alpha0": lookahead_log_loss(terms["eval"], 0.0)[0],
                       "log_loss": lookahead_log_loss(terms["eval"], fit["alpha"])[0]},
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"{args.data}, {result['source']}: alpha {result['alpha']:+.4f} ± {result['alpha_stderr']:.4f} "
          f"(top {top}); human log loss, fit side "
          f"{result['fit']['log_loss_alpha0']:.4f} -> {result['fit']['log_loss']:.4f} ({fit['tokens']} tokens), "
          f"eval side {result['eval']['log_loss_alpha0']:.4f} -> {result['eval']['log_loss']:.4f} "
          f"({result['eval']['tokens']} tokens); {result['seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
