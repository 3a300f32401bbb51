"""Paired comparison of two finetuned adapters on the same eval rows, from eval_loss.py's
per-example files: is condition A (e.g. attribution top-k) better than B (matched random)? The one
place the pipeline computes this statistic; report.py reads the JSON it writes.

    uv run compare_evals.py --a runs/smoltalk_v1/seed_42/eval_top_k.per_example.jsonl \
        --b runs/smoltalk_v1/seed_42/eval_matched_random_k.per_example.jsonl \
        --output-json runs/smoltalk_v1/seed_42/compare_top_vs_random.json

Two deltas, A minus B (negative = A has lower loss), each with a paired bootstrap 95% CI that
resamples eval rows with replacement:
  token_weighted   sum(NLL_A - NLL_B) / sum(supervised tokens): the change in eval_loss.py's loss
  per_example      mean over rows of (loss_A - loss_B), each row's loss a per-token mean: every
                   row counts once, however long its completion (rows whose completion was cut
                   away entirely, 0 supervised tokens, count in neither)
They can disagree when A helps long completions and hurts short ones. Also per-category deltas
and the fraction of rows where A is better.

Pooled over seeds: --a and --b each take several files, or a glob pattern (quoted; expanded here,
since the runner passes it as it is), e.g.

    uv run compare_evals.py --a 'runs/smoltalk_v1/seed_*/eval_top_k.per_example.jsonl' \
        --b 'runs/smoltalk_v1/seed_*/eval_matched_random_k.per_example.jsonl' \
        --output-json runs/smoltalk_v1/compare_top_vs_random.json

Files are paired by the name of their folder (the seed folder), the paired rows of all seeds are
concatenated (row ids prefixed by that name) and the bootstrap resamples rows from the pool: it
treats rows as independent, so it does not capture seed-to-seed (training) variance.

Bad input (a missing or non-finite field, a duplicated row_id, an empty file, no supervised token,
files over different rows) stops with one `error:` line naming the file and line; exit 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

from pipeline import PipelineError, provenance, run_main, seed_type, write_json_atomic


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", required=True, metavar="FILE",
                   help="per_example.jsonl of condition A (eval_loss.py); several files or a glob "
                        "pool seeds (paired with --b's by folder name)")
    p.add_argument("--b", nargs="+", required=True, metavar="FILE",
                   help="per_example.jsonl of condition B, as --a")
    p.add_argument("--column", default="finetuned", choices=["finetuned", "base"],
                   help="which model's losses in each file to compare (default: finetuned)")
    p.add_argument("--bootstrap", type=int, default=10000,
                   help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=seed_type, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--output-json", default=None, help="also write the result here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# reading


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_per_example(path: str | Path, column: str) -> dict:
    """{row_id: row} of one per-example file, every row checked: row_id unique, supervised_tokens
    an integer >= 0, <column>_nll_sum a finite number. Blank lines are skipped (pipeline.read_jsonl
    refuses them, and a file edited by hand often ends with one)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"per-example file {path} does not exist")
    field = f"{column}_nll_sum"
    rows, first_line = {}, {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(f"{where} is not JSON: {err.msg}")
            if not isinstance(row, dict):
                raise PipelineError(f"{where} is not a JSON object")
            for name in ("row_id", "supervised_tokens", field):
                if name not in row:
                    raise PipelineError(f"{where} has no {name}")
            tokens, nll = row["supervised_tokens"], row[field]
            if not isinstance(row["row_id"], (str, int)) or isinstance(row["row_id"], bool):
                raise PipelineError(f"{where}: row_id must be a string, got {row['row_id']!r}")
            if not (is_number(tokens) and tokens >= 0 and tokens == int(tokens)):
                raise PipelineError(f"{where}: supervised_tokens must be an integer >= 0, got "
                                    f"{tokens!r}")
            if not (is_number(nll) and math.isfinite(nll)):
                raise PipelineError(f"{where}: {field} must be a finite number, got {nll!r}")
            if row["row_id"] in rows:
                raise PipelineError(f"{where}: row_id {row['row_id']!r} appears twice (first on "
                                    f"line {first_line[row['row_id']]})")
            rows[row["row_id"]], first_line[row["row_id"]] = row, line_number
    if not rows:
        raise PipelineError(f"per-example file {path} has no rows")
    return rows


def expand(patterns: list[str], flag: str) -> list[Path]:
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise PipelineError(f"{flag} {pattern} matches no file")
            paths += map(Path, matches)
        else:
            paths.append(Path(pattern))
    return paths


def pair_files(a_patterns: list[str], b_patterns: list[str]) -> list[tuple[str, Path, Path]]:
    """(label, A file, B file) per pair: one pair as given, or several paired by folder name."""
    a_files, b_files = expand(a_patterns, "--a"), expand(b_patterns, "--b")
    if len(a_files) == 1 and len(b_files) == 1:
        return [("", a_files[0], b_files[0])]
    by_folder = []
    for flag, files in (("--a", a_files), ("--b", b_files)):
        folders = {}
        for path in files:
            if path.parent.name in folders:
                raise PipelineError(f"{flag}: {folders[path.parent.name]} and {path} are in folders "
                                    f"of the same name ({path.parent.name}): files are paired by "
                                    "folder name")
            folders[path.parent.name] = path
        by_folder.append(folders)
    a_by, b_by = by_folder
    unmatched = sorted(set(a_by) ^ set(b_by))
    if unmatched:
        name = unmatched[0]
        side, other = ("--a", "--b") if name in a_by else ("--b", "--a")
        raise PipelineError(f"{side} has {(a_by if side == '--a' else b_by)[name]} but {other} "
                            f"has no file in a folder named {name}")
    return [(name, a_by[name], b_by[name]) for name in sorted(a_by)]


def read_pairs(pairs, column: str) -> tuple[dict, dict]:
    """The rows of every pair; with several pairs, row ids prefixed by the pair's label."""
    a, b = {}, {}
    for label, path_a, path_b in pairs:
        rows_a, rows_b = read_per_example(path_a, column), read_per_example(path_b, column)
        if set(rows_a) != set(rows_b):
            raise PipelineError(f"{path_a} and {path_b} cover different eval rows "
                                f"({len(set(rows_a) ^ set(rows_b))} differ): compare runs on the "
                                "same eval split")
        prefix = f"{label}/" if label else ""
        a.update({f"{prefix}{k}": v for k, v in rows_a.items()})
        b.update({f"{prefix}{k}": v for k, v in rows_b.items()})
    return a, b


# ---------------------------------------------------------------------------------------------
# the statistic


def paired_deltas(a: dict, b: dict, column: str, resamples: int, seed: int) -> dict:
    import numpy as np

    if set(a) != set(b):
        raise PipelineError(f"the two files cover different eval rows ({len(set(a) ^ set(b))} "
                            f"differ): compare runs on the same eval split")
    if resamples < 1:
        raise PipelineError(f"--bootstrap must be at least 1, got {resamples}")
    ids = sorted(a)
    tokens = np.array([a[i]["supervised_tokens"] for i in ids], dtype=float)
    if not np.array_equal(tokens, [b[i]["supervised_tokens"] for i in ids]):
        raise PipelineError("supervised token counts differ between the files: different "
                            "tokenization or --max-length")
    if tokens.sum() == 0:
        raise PipelineError(f"none of the {len(ids)} eval rows has a supervised token: nothing to "
                            "compare (prompts longer than --max-length?)")
    nll_diff = np.array([a[i][f"{column}_nll_sum"] - b[i][f"{column}_nll_sum"] for i in ids])
    keep = tokens > 0
    loss_diff = nll_diff[keep] / tokens[keep]
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(resamples, len(ids)))
    # a resample of only token-less rows has no token-weighted delta (0/0): left out of the CI
    with np.errstate(invalid="ignore"):
        token_weighted = nll_diff[draw].sum(1) / tokens[draw].sum(1)
    token_weighted = token_weighted[np.isfinite(token_weighted)]
    if len(token_weighted) == 0:
        raise PipelineError(f"every one of the {resamples} bootstrap resamples drew only rows "
                            "without supervised tokens: raise --bootstrap")
    draw_kept = rng.integers(0, len(loss_diff), size=(resamples, len(loss_diff)))
    per_example = loss_diff[draw_kept].mean(1)

    def summary(point, samples):
        low, high = np.percentile(samples, [2.5, 97.5])
        return {"delta": float(point), "ci95": [float(low), float(high)],
                "ci_excludes_zero": bool(low > 0 or high < 0)}

    categories = {}
    for category in sorted({a[i].get("category") for i in ids} - {None}):
        mask = np.array([a[i].get("category") == category for i in ids])
        if tokens[mask].sum() > 0:
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
    pairs = pair_files(args.a, args.b)
    a, b = read_pairs(pairs, args.column)
    result = paired_deltas(a, b, args.column, args.bootstrap, args.seed)
    result.update({"column": args.column, "bootstrap": args.bootstrap,
                   "provenance": provenance(seed=args.seed)})
    if len(pairs) == 1:
        result.update({"a": str(pairs[0][1].resolve()), "b": str(pairs[0][2].resolve())})
    else:
        result["pooled_from"] = [{"label": label, "a": str(path_a.resolve()),
                                  "b": str(path_b.resolve())} for label, path_a, path_b in pairs]
    if args.output_json:
        write_json_atomic(args.output_json, result)
    for name in ("token_weighted", "per_example"):
        r = result[name]
        print(f"{name:>15}: A - B = {r['delta']:+.5f}  95% CI [{r['ci95'][0]:+.5f}, "
              f"{r['ci95'][1]:+.5f}]")
    pooled = f" pooled over {len(pairs)} seed folders" if len(pairs) > 1 else ""
    print(f"A better on {result['fraction_rows_a_better']:.1%} of {result['rows']} rows{pooled}")


if __name__ == "__main__":
    run_main(main)
