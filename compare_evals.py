"""Paired comparison of two finetuned adapters on the same eval rows, from eval_loss.py's
per-example files: is condition A (e.g. attribution top-k) better than B (matched random)?

    uv run compare_evals.py --a runs/smoltalk_v1/eval_top_k.per_example.jsonl \
        --b runs/smoltalk_v1/eval_matched_random_k.per_example.jsonl --output-json cmp.json

Two deltas, A minus B (negative = A has lower loss), each with a paired bootstrap 95% CI that
resamples eval rows with replacement:
  token_weighted   sum(NLL_A - NLL_B) / sum(supervised tokens): the change in eval_loss.py's loss
  per_example      mean over rows of (loss_A - loss_B), each row's loss a per-token mean: every
                   row counts once, however long its completion
They can disagree when A helps long completions and hurts short ones. Also per-category deltas
and the fraction of rows where A is better.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import PipelineError, provenance, read_jsonl, run_main, write_json_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="per_example.jsonl of condition A (eval_loss.py)")
    p.add_argument("--b", required=True, help="per_example.jsonl of condition B")
    p.add_argument("--column", default="finetuned", choices=["finetuned", "base"],
                   help="which model's losses in each file to compare (default: finetuned)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--output-json", default=None, help="also write the result here")
    return p.parse_args(argv)


def read_per_example(path: str, column: str) -> dict:
    rows = read_jsonl(path, "per-example file")
    for line_number, row in enumerate(rows, 1):
        if f"{column}_nll_sum" not in row:
            raise PipelineError(f"{path} line {line_number} has no {column}_nll_sum")
    return {row["row_id"]: row for row in rows}


def paired_deltas(a: dict, b: dict, column: str, resamples: int, seed: int) -> dict:
    import numpy as np

    if set(a) != set(b):
        raise PipelineError(f"the two files cover different eval rows ({len(set(a) ^ set(b))} "
                            f"differ): compare runs on the same eval split")
    ids = sorted(a)
    tokens = np.array([a[i]["supervised_tokens"] for i in ids], dtype=float)
    if not np.array_equal(tokens, [b[i]["supervised_tokens"] for i in ids]):
        raise PipelineError("supervised token counts differ between the files: different "
                            "tokenization or --max-length")
    nll_diff = np.array([a[i][f"{column}_nll_sum"] - b[i][f"{column}_nll_sum"] for i in ids])
    keep = tokens > 0
    loss_diff = nll_diff[keep] / tokens[keep]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(resamples, len(ids)))
    token_weighted = nll_diff[draw].sum(1) / tokens[draw].sum(1)
    draw_kept = rng.integers(0, len(loss_diff), size=(resamples, len(loss_diff)))
    per_example = loss_diff[draw_kept].mean(1)

    def summary(point, samples):
        low, high = np.percentile(samples, [2.5, 97.5])
        return {"delta": float(point), "ci95": [float(low), float(high)],
                "ci_excludes_zero": bool(low > 0 or high < 0)}

    categories = {}
    for category in sorted({a[i].get("category") for i in ids} - {None}):
        mask = np.array([a[i].get("category") == category for i in ids])
        categories[category] = {"rows": int(mask.sum()),
                                "token_weighted_delta": float(nll_diff[mask].sum()
                                                              / tokens[mask].sum())}
    return {"rows": len(ids), "supervised_tokens": int(tokens.sum()),
            "token_weighted": summary(nll_diff.sum() / tokens.sum(), token_weighted),
            "per_example": summary(loss_diff.mean(), per_example),
            "fraction_rows_a_better": float((loss_diff < 0).mean()),
            "per_category": categories}


def main(argv=None) -> None:
    args = parse_args(argv)
    a = read_per_example(args.a, args.column)
    b = read_per_example(args.b, args.column)
    result = paired_deltas(a, b, args.column, args.bootstrap, args.seed)
    result.update({"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve()),
                   "column": args.column, "bootstrap": args.bootstrap,
                   "provenance": provenance(seed=args.seed)})
    if args.output_json:
        write_json_atomic(args.output_json, result)
    for name in ("token_weighted", "per_example"):
        r = result[name]
        print(f"{name:>15}: A - B = {r['delta']:+.5f}  95% CI [{r['ci95'][0]:+.5f}, "
              f"{r['ci95'][1]:+.5f}]")
    print(f"A better on {result['fraction_rows_a_better']:.1%} of {result['rows']} rows")


if __name__ == "__main__":
    run_main(main)
