"""Rank-window ablations from one fixed attribution ranking (score.py's train_scores.jsonl):
a manifest whose splits are the top N rows, rows in a rank window, and random rows drawn from
beyond a rank, so one can ask whether the very top rows carry the effect or any high-ranked rows do.

    uv run rank_windows.py --scores-from runs/smoltalk_v1/attribution \
        --output runs/smoltalk_v1/ablations/manifest.json \
        --top 300 --window 301 501 --random-from 200 501

Ranks are 1-based (rank 1 = highest score); a window [A, B) holds ranks A..B-1. Split names say
what they hold: top300_from_mean40 (top 300 of a mean-mode ranking against 40 query rows),
rank301_500, rand200_from_rank501plus. eval and attr_query are carried over from the main manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import (PipelineError, add_alias, check_output_file, load_manifest, load_split,
                      read_json, read_jsonl, run_main, seed_type, write_selection_manifest)
from subsets import random_rows

SCRIPT = "rank_windows.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores-from", default=None,
                   help="score.py --output-dir (train_scores.jsonl and summary.json)")
    add_alias(p, "--scores-dir", "scores_from")
    p.add_argument("--output", required=True, help="path of the manifest to write")
    p.add_argument("--top", type=int, action="append", default=[], metavar="N",
                   help="a split of the N best-ranked rows (repeatable)")
    p.add_argument("--window", type=int, nargs=2, action="append", default=[],
                   metavar=("A", "B"), help="a split of the rows ranked A..B-1 (repeatable)")
    p.add_argument("--random-from", type=int, nargs=2, action="append", default=[],
                   metavar=("M", "C"), help="a split of M random rows ranked C or worse "
                                            "(repeatable)")
    p.add_argument("--seed", type=seed_type, default=42, help="seed of the random splits")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)
    if not args.scores_from:  # not argparse's required=: the old spelling --scores-dir counts too
        p.error("the following arguments are required: --scores-from")
    return args


def read_ranking(scores_from: Path) -> tuple[list[str], dict]:
    """row_ids in rank order (rank 1 first) and score.py's summary."""
    path = scores_from / "train_scores.jsonl"
    ranked = [(row["rank"], row["row_id"]) for row in read_jsonl(path, "score.py output")
              if row.get("rank") is not None]
    ranked.sort()
    if [r for r, _ in ranked] != list(range(1, len(ranked) + 1)):
        raise PipelineError(f"{path}: ranks are not 1..{len(ranked)}")
    return [row_id for _, row_id in ranked], read_json(scores_from / "summary.json", "summary")


def plan_splits(args, n_ranked: int, label: str) -> dict[str, list[int]]:
    """Split name -> 0-based rank positions."""
    splits = {}
    for n in args.top:
        if not 1 <= n <= n_ranked:
            raise PipelineError(f"--top {n}: the ranking has {n_ranked} rows")
        splits[f"top{n}_from_{label}"] = list(range(n))
    for a, b in args.window:
        if not 1 <= a < b <= n_ranked + 1:
            raise PipelineError(f"--window {a} {b}: need 1 <= A < B <= {n_ranked + 1}")
        splits[f"rank{a}_{b - 1}"] = list(range(a - 1, b - 1))
    for i, (m, c) in enumerate(args.random_from):
        if not 1 <= c <= n_ranked or m > n_ranked - c + 1 or m < 1:
            raise PipelineError(f"--random-from {m} {c}: ranks {c}..{n_ranked} hold "
                                f"{max(0, n_ranked - c + 1)} rows")
        drawn = random_rows(n_ranked - c + 1, m, args.seed + i)
        splits[f"rand{m}_from_rank{c}plus"] = [c - 1 + j for j in drawn]
    if not splits:
        raise PipelineError("nothing to write: give --top, --window or --random-from")
    return splits


def main(argv=None) -> None:
    args = parse_args(argv)
    output = check_output_file(args.output, SCRIPT, "--output", inputs=[args.scores_from],
                               overwrite=args.overwrite)
    ranking, summary = read_ranking(Path(args.scores_from))
    manifest = load_manifest(summary["manifest"])
    pool = load_split(manifest, summary["train_split"])
    row_index = {row_id: i for i, row_id in enumerate(pool["row_id"])}
    missing = [r for r in ranking if r not in row_index]
    if missing:
        raise PipelineError(f"{len(missing)} ranked row_ids (e.g. {missing[0]}) are not in split "
                            f"'{summary['train_split']}' of {summary['manifest']}")
    label = f"{summary['score_mode']}{summary.get('n_query', '')}"
    splits = plan_splits(args, len(ranking), label)
    subsets = {name: pool.select(sorted(row_index[ranking[p]] for p in positions))
               for name, positions in splits.items()}
    selection = {"method": "rank_windows", "scores_from": str(Path(args.scores_from).resolve()),
                 "source_split": summary["train_split"], "seed": args.seed,
                 "rank_positions": {name: [p + 1 for p in positions]
                                    for name, positions in splits.items()}}
    write_selection_manifest(manifest, output, subsets, selection)
    print(f"wrote {output}: " + ", ".join(f"{n}={len(s)}" for n, s in subsets.items()))


if __name__ == "__main__":
    run_main(main)
