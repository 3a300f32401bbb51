"""One table over several score.py runs of the same pool (issue 14's comparison of score
variants): how much each score follows length, how well it finds planted corrupted rows, how much
the top-k of the variants agree, and how fast each was made.

    uv run benchmarks/score_variants.py --manifest runs/score_variants/manifest.json \
        --variant none_sum=runs/score_variants/scores_none_sum \
        --variant seed=runs/score_variants/scores_seed ... \
        --k 500 --output-dir runs/score_variants/table

Per variant (a score.py --output-dir): Spearman of the score with supervised tokens, with total
tokens and with reward_model_score (scipy); ROC AUC of the score for telling clean (positive) from
corrupted rows when train_base has dataset.py's `corrupted` column (sklearn); corrupted rows and
supervised tokens in the top-k; the train-scoring stage's tokens/s and wall-clock from its
summary.json (a variant recomputed from kept gradients reports its own, much shorter, stage).
Then the top-k overlap (rows in common) of every pair of variants. Writes table.md and table.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import (PipelineError, check_output_dir, load_manifest, load_split,  # noqa: E402
                      provenance, read_json, read_jsonl, run_main, staged_output,
                      write_json_atomic)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="the manifest whose pool was scored")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=DIR",
                   help="a score.py output folder and the name it gets in the table (repeatable)")
    p.add_argument("--k", type=int, default=500, help="top-k size for overlap and counts")
    p.add_argument("--output-dir", required=True, help="table.md and table.json go here")
    return p.parse_args(argv)


def load_variant(name: str, folder: Path, row_ids: list[str]):
    import numpy as np

    rows = read_jsonl(folder / "train_scores.jsonl", f"variant {name} scores")
    by_id = {r["row_id"]: r for r in rows}
    missing = [r for r in row_ids if r not in by_id]
    if missing:
        raise PipelineError(f"variant {name}: {folder}/train_scores.jsonl lacks {len(missing)} "
                            f"rows of the pool (e.g. {missing[0]})")
    scores = np.array([np.nan if by_id[r]["score"] is None else by_id[r]["score"]
                       for r in row_ids], dtype=np.float64)
    summary = read_json(folder / "summary.json", f"variant {name} summary")
    return scores, summary


def variant_row(name, scores, summary, pool, k):
    import numpy as np
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    finite = np.isfinite(scores)
    supervised = np.asarray(pool["supervised"], dtype=np.float64)
    tokens = np.asarray(pool["tokens"], dtype=np.float64)
    top = np.argsort(-np.where(finite, scores, -np.inf), kind="stable")[:k]
    row = {
        "variant": name,
        "score_normalization": summary.get("score_normalization"),
        "loss_reduction": summary.get("loss_reduction"),
        "score_mode": summary.get("score_mode"),
        "preconditioning_mode": summary.get("preconditioning_mode"),
        "damping_rule": summary.get("damping_rule"),
        "n_finite": int(finite.sum()),
        "spearman_supervised_tokens": float(spearmanr(scores[finite], supervised[finite])[0]),
        "spearman_total_tokens": float(spearmanr(scores[finite], tokens[finite])[0]),
        "top_k_supervised_tokens": int(supervised[top].sum()),
        "pool_supervised_tokens_per_k": float(supervised.mean() * k),
    }
    reward = pool.get("reward")
    if reward is not None:
        keep = finite & np.isfinite(reward)
        row["spearman_reward"] = float(spearmanr(scores[keep], reward[keep])[0])
    corrupted = pool.get("corrupted")
    if corrupted is not None:
        keep = finite
        row["planted_auc_clean_vs_corrupted"] = float(roc_auc_score(~corrupted[keep],
                                                                    scores[keep]))
        row["corrupted_in_top_k"] = int(corrupted[top].sum())
        row["corrupted_expected_by_chance"] = float(corrupted.mean() * k)
    stage = summary.get("stage_seconds", {})
    rate = summary.get("tokens_per_second", {})
    row["train_scoring_seconds"] = stage.get("train_scoring", stage.get("rescoring"))
    row["train_scoring_tokens_per_s"] = rate.get("train_scoring")
    row["gradients_from"] = summary.get("gradients_from")
    return row, set(top.tolist())


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def render(rows, overlap, k) -> str:
    lines = [f"# Score variants on one pool (top-{k})", "",
             "| variant | normalization | loss | mode | damping | Spearman sup. tokens | "
             "Spearman tokens | Spearman reward | planted AUC | corrupted in top-k (chance) | "
             "top-k sup. tokens (pool x k) | train scoring s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chance = (f"{r['corrupted_in_top_k']} ({r['corrupted_expected_by_chance']:.0f})"
                  if "corrupted_in_top_k" in r else "n/a")
        lines.append(
            f"| {r['variant']} | {r['score_normalization']} | {r['loss_reduction']} | "
            f"{r['score_mode']} | {r['damping_rule']} | "
            f"{r['spearman_supervised_tokens']:+.3f} | {r['spearman_total_tokens']:+.3f} | "
            f"{fmt(r.get('spearman_reward'), '+.3f')} | "
            f"{fmt(r.get('planted_auc_clean_vs_corrupted'), '.3f')} | {chance} | "
            f"{r['top_k_supervised_tokens']:,} ({r['pool_supervised_tokens_per_k']:,.0f}) | "
            f"{fmt(r['train_scoring_seconds'], '.1f')} | "
            f"{fmt(r['train_scoring_tokens_per_s'], ',.0f')} |")
    names = [r["variant"] for r in rows]
    lines += ["", f"Top-{k} overlap (rows in common):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(str(overlap[a][b]) for b in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import numpy as np

    args = parse_args(argv)
    variants = []
    for item in args.variant:
        name, sep, folder = item.partition("=")
        if not sep or not name:
            raise PipelineError(f"--variant {item}: expected NAME=DIR")
        variants.append((name, Path(folder)))
    check_output_dir(args.output_dir, True, "score_variants.py",
                     inputs=[args.manifest, *(folder for _, folder in variants)])
    manifest = load_manifest(args.manifest)
    first_summary = read_json(variants[0][1] / "summary.json", "variant summary")
    split = load_split(manifest, first_summary.get("train_split", "train_base"))
    row_ids = split["row_id"]
    first = read_jsonl(variants[0][1] / "train_scores.jsonl", "variant scores")
    by_id = {r["row_id"]: r for r in first}
    pool = {"supervised": [by_id[r]["num_supervised_tokens"] for r in row_ids],
            "tokens": [by_id[r]["num_tokens"] for r in row_ids]}
    if "reward_model_score" in split.column_names:
        pool["reward"] = np.array([np.nan if v is None else v
                                   for v in split["reward_model_score"]], dtype=np.float64)
    if "corrupted" in split.column_names:
        pool["corrupted"] = np.array(split["corrupted"], dtype=bool)
    rows, tops = [], {}
    for name, folder in variants:
        scores, summary = load_variant(name, folder, row_ids)
        row, tops[name] = variant_row(name, scores, summary, pool, args.k)
        rows.append(row)
    overlap = {a: {b: len(tops[a] & tops[b]) for b in tops} for a in tops}
    table = render(rows, overlap, args.k)
    with staged_output(args.output_dir, "score_variants.py") as out:
        write_json_atomic(out / "table.json", {"k": args.k, "variants": rows,
                                               "top_k_overlap": overlap,
                                               "provenance": provenance(manifest=args.manifest)})
        (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    run_main(main)
