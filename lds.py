r"""The linear datamodeling score (LDS; TRAK, Park et al. 2023): do the attribution scores predict
what training on a set of rows does to a query row's loss?

    uv run lds.py draw --manifest runs/lds/manifest.json --split train_base --pool-size 2000 \
        --subsets 50 --alpha 0.5 --seed 42 --output-dir runs/lds/subsets
    # ... one adapter per subset_<m> (finetune.py), its per-row loss on the query split
    # (eval_loss.py), the scores as matrices (score.py --write-score-matrix) ...
    uv run lds.py compute --subsets runs/lds/subsets \
        --evals 'runs/lds/seed_{m}/eval_query.per_example.jsonl' \
        --scores-from seed=runs/lds/scores_seed_p32 --output-dir runs/lds/lds

draw: a seeded pool of --pool-size rows of --split (all of it by default) and M = --subsets
random subsets S_1..S_M of it, each holding a fraction --alpha, balanced: every pool row is in
exactly round(alpha * M) subsets and every subset has the same size (+-1) (subsets.lds_subsets).
Written as a continuation manifest (<output-dir>/manifest.json: splits pool, subset_0 ..
subset_<M-1>, and the parent's eval and attr_query), so finetune.py trains on --train-split
subset_<m> and score.py scores --train-split pool unchanged; subsets.json holds the membership.

compute: with tau(q, i) the individual score of train row i for query row q (score.py
--write-score-matrix), s_i = mean_q tau(q, i) (train_scores.jsonl) and loss_q(S_m) query row q's
mean NLL per supervised token under the adapter trained on S_m (eval_loss.py's per-example file):
  per-query LDS(q) = Spearman over m of ( sum_{i in S_m} tau(q, i) , -loss_q(S_m) )
  LDS              = mean over the query rows with a score, 95% bootstrap CI over query rows
  aggregate LDS    = Spearman over m of ( sum_{i in S_m} s_i , -mean_q loss_q(S_m) ),
                     bootstrap CI over subsets
An unscored train row (NaN: no supervised token) adds nothing to a sum; a query row without a
usable gradient has no per-query LDS (counted, left out of the mean). A per-query rank statistic
ignores any positive factor per query, so sum- or mean-loss NLL and the seed score's per-query
normalisation do not change it. Baselines in the same table: random (tau ~ N(0, 1), drawn per
query with --seed: about 0), length (tau(q, i) = supervised tokens of row i, the same for every
query) and reward (reward_model_score; a row without one gets the pool mean).
--pair A:B adds A's per-query LDS minus B's, paired by query row, with its CI over query rows.
Writes <output-dir>/lds.json (every number, the per-query values, the inputs, provenance),
lds.md (the table) and lds.png (every query row's LDS per predictor). scipy.stats.spearmanr and
scipy.stats.bootstrap do the statistics.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

from pipeline import (PipelineError, check_output_dir, load_manifest, load_split, provenance,
                      read_json, read_jsonl, run_main, seed_type, split_fingerprint,
                      staged_output, write_json_atomic, write_selection_manifest)

SCRIPT = "lds.py"
BASELINES = {
    "random": "tau(q, i) ~ N(0, 1), independent per query (--seed): LDS about 0",
    "length": "tau(q, i) = supervised tokens of train row i (every query alike)",
    "reward": "tau(q, i) = reward_model_score of train row i (missing: the pool mean)",
}
DEFINITION = ("per-query LDS(q) = Spearman over subsets m of (sum_{i in S_m} tau(q, i), "
              "-loss_q(S_m)); LDS = its mean over query rows; aggregate LDS = Spearman over m of "
              "(sum_{i in S_m} s_i, -mean_q loss_q(S_m)), s_i = mean_q tau(q, i)")
# bergson's public LDS board (SmolLM2, 8k documents: another model and data set), for the table
BOARD_LDS = {"TrackStar": 0.133, "EK-FAC": 0.361, "MAGIC": 0.974}
BOARD = ("bergson's board (SmolLM2, 8k docs; other model/data): "
         + ", ".join(f"{name} {value}" for name, value in BOARD_LDS.items()) + " (per-query LDS)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("draw", help="the pool and its M balanced random subsets, as a "
                                         "continuation manifest")
    d.add_argument("--manifest", required=True, help="main manifest holding --split")
    d.add_argument("--split", default="train_base", help="split the pool is drawn from")
    d.add_argument("--pool-size", type=int, default=None,
                   help="rows of --split in the pool, drawn with --seed (default: all of it)")
    d.add_argument("--subsets", type=int, default=50, help="M, the number of subsets")
    d.add_argument("--alpha", type=float, default=0.5,
                   help="fraction of the pool in each subset (every row is in round(alpha*M))")
    d.add_argument("--seed", type=seed_type, default=42, help="seed of the pool and the subsets")
    d.add_argument("--output-dir", required=True,
                   help="manifest.json, subsets.json and data/ (pool, subset_<m>) go here")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")

    c = commands.add_parser("compute", help="per-query and aggregate LDS of score matrices "
                                            "and baselines")
    c.add_argument("--subsets", required=True, help="an lds.py draw --output-dir")
    c.add_argument("--evals", required=True, metavar="PATTERN",
                   help="eval_loss.py per-example file of subset m's adapter on the query split, "
                        "with {m} for the subset index (e.g. runs/lds/seed_{m}/"
                        "eval_query.per_example.jsonl)")
    c.add_argument("--loss-field", default="finetuned_loss",
                   help="the per-example field holding a row's mean NLL per supervised token")
    c.add_argument("--scores-from", action="append", default=[], metavar="NAME=DIR",
                   help="a score.py --write-score-matrix folder (score_matrix.npy + .json, "
                        "train_scores.jsonl) scored on the draw's pool; repeatable; NAME labels "
                        "its row (default: the folder's name)")
    c.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated baselines ({', '.join(BASELINES)}; '' for none)")
    c.add_argument("--pair", action="append", default=[], metavar="A:B",
                   help="also report predictor A's LDS minus B's, paired by query row (both "
                        "are read on the same query rows), with a bootstrap CI over query rows; "
                        "repeatable")
    c.add_argument("--confidence", type=float, default=0.95, help="bootstrap interval level")
    c.add_argument("--bootstrap-resamples", type=int, default=2000,
                   help="bootstrap resamples (queries for the LDS, subsets for the aggregate)")
    c.add_argument("--seed", type=seed_type, default=0,
                   help="seed of the bootstrap and of the random baseline")
    c.add_argument("--output-dir", required=True, help="lds.json and lds.md go here")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# draw


def draw(args) -> None:
    import numpy as np

    from subsets import lds_subsets, random_rows

    output_dir = check_output_dir(args.output_dir, args.overwrite, SCRIPT, inputs=[args.manifest])
    manifest = load_manifest(args.manifest)
    source = load_split(manifest, args.split)
    pool_size = len(source) if args.pool_size is None else args.pool_size
    if not 2 <= pool_size <= len(source):
        raise PipelineError(f"--pool-size {pool_size}: split '{args.split}' of {args.manifest} "
                            f"has {len(source)} rows (need 2 .. {len(source)})")
    positions = (list(range(len(source))) if pool_size == len(source)
                 else random_rows(len(source), pool_size, args.seed))
    pool = source.select(positions)
    member = lds_subsets(pool_size, args.subsets, args.alpha, args.seed)
    subsets = [np.flatnonzero(row).tolist() for row in member]
    per_row = int(member[:, 0].sum())
    info = {"source_split": args.split, "pool_size": pool_size, "subsets": args.subsets,
            "alpha": args.alpha, "alpha_effective": per_row / args.subsets,
            "subsets_per_row": per_row, "subset_rows": sorted({len(s) for s in subsets}),
            "seed": args.seed, "method": "lds_subsets (subsets.py): balanced, curveball-mixed",
            "pool_fingerprint": split_fingerprint(pool)}
    with staged_output(output_dir, SCRIPT) as staged:
        write_selection_manifest(manifest, staged / "manifest.json",
                                 {"pool": pool, **{f"subset_{m}": pool.select(rows)
                                                   for m, rows in enumerate(subsets)}},
                                 {"method": "lds", **info})
        write_json_atomic(staged / "subsets.json", {
            **info, "pool_row_ids": list(pool["row_id"]),
            "pool_positions_in_source": positions, "members": subsets,
            "provenance": provenance(seed=args.seed, manifest=args.manifest)})
    print(f"drew {args.subsets} subsets of {'/'.join(map(str, info['subset_rows']))} rows from "
          f"a pool of {pool_size} "
          f"(every row in {per_row}); wrote {output_dir}")


# ---------------------------------------------------------------------------------------------
# the statistics (lds_table is what the tests call)


def spearman(x, y) -> float:
    """scipy's Spearman correlation; NaN when either side is constant (it says nothing)."""
    import numpy as np
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def predictions(member, tau):
    """sum_{i in S_m} tau(q, i) for every subset m and query q: [M, Q]; NaN entries of tau count
    as 0, a query row that is NaN everywhere stays NaN."""
    import numpy as np

    tau = np.atleast_2d(np.asarray(tau, dtype=np.float64))
    pred = member.astype(np.float64) @ np.nan_to_num(tau, nan=0.0).T
    pred[:, ~np.isfinite(tau).any(axis=1)] = np.nan
    return pred


def per_query_lds(member, losses, tau):
    """Spearman over subsets of (predicted sum, -loss) per query: [Q] (NaN: no score)."""
    import numpy as np

    pred = predictions(member, tau)
    return np.array([spearman(pred[:, q], -losses[:, q]) if np.isfinite(pred[:, q]).all()
                     else math.nan for q in range(losses.shape[1])])


def bootstrap_ci(data, statistic, *, paired: bool, confidence: float, resamples: int,
                 seed: int, vectorized: bool = False) -> list:
    import numpy as np
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate resample is reported as a NaN bound
        result = bootstrap(data, statistic, paired=paired, vectorized=vectorized,
                           confidence_level=confidence, n_resamples=resamples,
                           method="percentile", rng=np.random.default_rng(seed))
    bounds = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    # None when resamples were degenerate (a constant side: few subsets or query rows)
    return bounds if all(map(math.isfinite, bounds)) else None


def lds_summary(member, losses, tau, aggregate_scores, *, confidence: float, resamples: int,
                seed: int) -> dict:
    """Per-query LDS, its mean and CI over query rows, and the aggregate LDS with its CI over
    subsets, for one predictor: tau [Q, n] (or [n], every query alike), aggregate_scores [n]."""
    import numpy as np

    tau = np.asarray(tau, dtype=np.float64)
    if tau.ndim == 1:
        tau = np.broadcast_to(tau, (losses.shape[1], tau.size))
    values = per_query_lds(member, losses, tau)
    finite = values[np.isfinite(values)]
    out = {"lds": float(finite.mean()) if finite.size else None,
           "lds_ci": (bootstrap_ci((finite,), np.mean, paired=False, confidence=confidence,
                                   resamples=resamples, seed=seed, vectorized=True)
                      if finite.size >= 2 and np.ptp(finite) > 0 else None),
           "n_queries": int(finite.size), "n_queries_without_lds": int(values.size - finite.size),
           "per_query": [None if not math.isfinite(v) else float(v) for v in values]}
    agg_pred = predictions(member, aggregate_scores)[:, 0]
    agg_target = -losses.mean(axis=1)
    out["aggregate_lds"] = (spearman(agg_pred, agg_target) if np.isfinite(agg_pred).all()
                            else math.nan)
    out["aggregate_lds_ci"] = (bootstrap_ci((agg_pred, agg_target), spearman, paired=True,
                                            confidence=confidence, resamples=resamples,
                                            seed=seed)
                               if math.isfinite(out["aggregate_lds"]) else None)
    if out["aggregate_lds_ci"] is None and math.isfinite(out["aggregate_lds"]):
        out["aggregate_lds_ci_note"] = "degenerate resamples (too few subsets): no interval"
    if not math.isfinite(out["aggregate_lds"]):
        out["aggregate_lds"] = None
    return out


def lds_table(member, losses, predictors: dict, *, confidence: float = 0.95,
              resamples: int = 2000, seed: int = 0) -> dict:
    """{name: lds_summary} for predictors {name: (tau [Q, n] or [n], aggregate scores [n])}.
    member: bool [M, n] (subset m holds pool row i); losses: [M, Q] (query q's loss under the
    model trained on subset m)."""
    import numpy as np

    member = np.asarray(member, dtype=bool)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape[0] != member.shape[0] or not np.isfinite(losses).all():
        raise PipelineError(f"losses: expected {member.shape[0]} subsets x queries of finite "
                            f"values, got shape {losses.shape}")
    return {name: lds_summary(member, losses, tau, agg, confidence=confidence,
                              resamples=resamples, seed=seed)
            for name, (tau, agg) in predictors.items()}


def paired_differences(results: dict, pairs: list, *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict:
    """{"A-B": predictor A's per-query LDS minus B's}: the mean over the query rows where both
    have one, with a bootstrap CI over those rows. Two predictors are read on the same query
    rows, so the per-row difference, not the two separate intervals, says whether one beats the
    other."""
    import numpy as np

    out = {}
    for a, b in pairs:
        pa = np.array([math.nan if v is None else v for v in results[a]["per_query"]])
        pb = np.array([math.nan if v is None else v for v in results[b]["per_query"]])
        diff = (pa - pb)[np.isfinite(pa) & np.isfinite(pb)]
        out[f"{a}-{b}"] = {
            "a": a, "b": b, "n_queries": int(diff.size),
            "difference": float(diff.mean()) if diff.size else None,
            "difference_ci": (bootstrap_ci((diff,), np.mean, paired=False, confidence=confidence,
                                           resamples=resamples, seed=seed, vectorized=True)
                              if diff.size >= 2 and np.ptp(diff) > 0 else None),
            "a_wins": int((diff > 0).sum())}
    return out


def parse_pairs(items: list, names) -> list:
    """--pair A:B, each naming a predictor of the table."""
    pairs = []
    for item in items:
        a, sep, b = item.partition(":")
        if not sep or not a or not b:
            raise PipelineError(f"--pair {item}: expected A:B, two predictor names")
        for name in (a, b):
            if name not in names:
                raise PipelineError(f"--pair {item}: no predictor {name} (the table has "
                                    f"{', '.join(names)})")
        pairs.append((a, b))
    return pairs


# ---------------------------------------------------------------------------------------------
# compute: inputs


def split_named(item: str) -> tuple[str, str]:
    """--scores-from NAME=DIR (or DIR: NAME = the folder's name)."""
    name, sep, path = item.partition("=")
    if not sep:
        return Path(item).name, item
    if not name or not path:
        raise PipelineError(f"--scores-from {item}: expected NAME=DIR")
    return name, path


def read_draw(folder: Path):
    import numpy as np

    info = read_json(folder / "subsets.json", "--subsets")
    manifest = load_manifest(folder / "manifest.json")
    n = len(info["pool_row_ids"])
    member = np.zeros((len(info["members"]), n), dtype=bool)
    for m, rows in enumerate(info["members"]):
        member[m, rows] = True
    return info, manifest, member


def read_losses(pattern: str, n_subsets: int, field: str):
    """[M, Q] losses and the query row ids (the first file's order; every file must hold the
    same rows)."""
    import numpy as np

    if "{m}" not in pattern:
        raise PipelineError(f"--evals {pattern} has no {{m}} (the subset index)")
    files = [Path(pattern.replace("{m}", str(m))) for m in range(n_subsets)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise PipelineError(f"--evals: {len(missing)} of the {n_subsets} subsets have no eval "
                            f"file, e.g. {missing[0]} (train and evaluate every subset first)")
    ids, losses = None, []
    for path in files:
        rows = read_jsonl(path, "--evals file")
        by_id = {}
        for line, row in enumerate(rows, 1):
            value = row.get(field) if isinstance(row, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise PipelineError(f"--evals {path} row {line} has no finite {field} "
                                    f"(--loss-field)")
            by_id[row["row_id"]] = float(value)
        if ids is None:
            ids = [r["row_id"] for r in rows]
        elif set(by_id) != set(ids) or len(by_id) != len(ids):
            raise PipelineError(f"--evals {path} holds other rows than {files[0]} (evaluate "
                                f"every subset on the same query split)")
        losses.append([by_id[r] for r in ids])
    return np.asarray(losses), ids


def read_scores(item: str, pool_ids: list, query_ids: list, pool, manifest: dict):
    """(name, tau [Q, n] in query_ids x pool order, s [n], supervised tokens [n]) from a
    score.py --write-score-matrix folder, after checking it scored the draw's pool and these
    query rows."""
    import numpy as np

    name, path = split_named(item)
    folder = Path(path)
    where = f"--scores-from {item}:"
    ids = read_json(folder / "score_matrix.json", f"{where} ids")
    matrix_path = folder / "score_matrix.npy"
    if not matrix_path.is_file():
        raise PipelineError(f"{where} {matrix_path} does not exist (score.py "
                            f"--write-score-matrix writes it)")
    matrix = np.load(matrix_path)
    if matrix.shape != (len(ids["query_ids"]), len(ids["train_ids"])):
        raise PipelineError(f"{where} score_matrix.npy is {matrix.shape}, score_matrix.json "
                            f"names {len(ids['query_ids'])} x {len(ids['train_ids'])} rows")
    if set(ids["train_ids"]) != set(pool_ids) or len(ids["train_ids"]) != len(pool_ids):
        raise PipelineError(f"{where} its train rows are not the draw's pool (score "
                            f"--train-split pool of the draw's manifest)")
    if ids.get("train_fingerprint") != split_fingerprint(pool):
        raise PipelineError(f"{where} it scored other content than the draw's pool "
                            f"(train_fingerprint differs)")
    query_split = ids.get("query_split")
    if query_split in manifest["splits"] and ids.get("query_fingerprint") != split_fingerprint(
            load_split(manifest, query_split)):
        raise PipelineError(f"{where} it scored other content than split '{query_split}' "
                            f"(query_fingerprint differs)")
    if set(ids["query_ids"]) != set(query_ids):
        raise PipelineError(f"{where} its query rows ({query_split}, {len(ids['query_ids'])}) "
                            f"are not the rows of the --evals files ({len(query_ids)})")
    q_pos = {r: i for i, r in enumerate(ids["query_ids"])}
    t_pos = {r: i for i, r in enumerate(ids["train_ids"])}
    cols = [t_pos[r] for r in pool_ids]
    tau = matrix[[q_pos[r] for r in query_ids]][:, cols].astype(np.float64)
    rows = read_jsonl(folder / "train_scores.jsonl", f"{where} scores")
    if [r["row_id"] for r in rows] != ids["train_ids"]:
        raise PipelineError(f"{where} train_scores.jsonl and score_matrix.json list other rows")
    scores = np.array([np.nan if r["score"] is None else r["score"] for r in rows])[cols]
    tokens = np.array([r["num_supervised_tokens"] for r in rows], dtype=np.float64)[cols]
    variant = {k: ids.get(k) for k in ("score_normalization", "loss_reduction",
                                       "preconditioning_mode", "projection_dim", "damping_rule",
                                       "damping", "individual_score")}
    return name, tau, scores, tokens, {"folder": str(folder.resolve()), **variant}


def baseline_predictors(names: list, n_queries: int, pool, tokens, seed: int) -> dict:
    import numpy as np

    out = {}
    for name in names:
        if name == "random":
            tau = np.random.default_rng(seed).standard_normal((n_queries, len(pool)))
            out[name] = (tau, tau.mean(axis=0))
        elif name == "length":
            if tokens is None:
                raise PipelineError("--baselines length needs the supervised tokens of a "
                                    "--scores-from folder's train_scores.jsonl")
            out[name] = (tokens, tokens)
        elif name == "reward":
            if "reward_model_score" not in pool.column_names:
                raise PipelineError("--baselines reward: the pool has no reward_model_score")
            reward = np.array([np.nan if v is None else v for v in pool["reward_model_score"]],
                              dtype=np.float64)
            if not np.isfinite(reward).any():
                raise PipelineError("--baselines reward: no pool row has a reward_model_score")
            reward = np.where(np.isfinite(reward), reward, np.nanmean(reward))
            out[name] = (reward, reward)
        else:
            raise PipelineError(f"--baselines: unknown baseline '{name}' (known: "
                                f"{', '.join(BASELINES)})")
    return out


# ---------------------------------------------------------------------------------------------
# compute: outputs


def fmt(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def markdown(results: dict, sources: dict, info: dict, args, pairs: dict) -> str:
    level = f"{args.confidence:.0%}"
    sizes = "-".join(map(str, sorted({min(info["subset_rows"]), max(info["subset_rows"])})))
    lines = [f"# Linear datamodeling score ({info['subsets']} subsets of "
             f"{sizes} rows of a {info['pool_size']}-row pool, alpha "
             f"{info['alpha_effective']:g})", "",
             f"LDS = mean over query rows of the Spearman correlation, over the subsets, between "
             f"the summed scores of a subset's rows and minus the query row's loss after "
             f"training on it ({level} bootstrap CI over query rows); aggregate = the same for "
             f"the mean-query score and the mean query loss ({level} CI over subsets).", "",
             "| predictor | kind | LDS [CI] | query rows | aggregate LDS [CI] | setting |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        source = sources[name]
        kind = "baseline" if source.get("baseline") else "score"
        setting = source.get("baseline") or ", ".join(
            f"{k} {source[k]}" for k in ("score_normalization", "loss_reduction",
                                         "projection_dim") if source.get(k) is not None)
        lines.append(f"| {name} | {kind} | {fmt(r['lds'], r['lds_ci'])} | {r['n_queries']} | "
                     f"{fmt(r['aggregate_lds'], r['aggregate_lds_ci'])} | {setting} |")
    if pairs:
        lines += ["", f"Paired by query row: A's per-query LDS minus B's ({level} bootstrap CI "
                      "over query rows; A wins: query rows where A's is higher).", "",
                  "| A - B | difference [CI] | A wins | query rows |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['a']} - {p['b']} | {fmt(p['difference'], p['difference_ci'])} | "
                  f"{p['a_wins']} | {p['n_queries']} |" for p in pairs.values()]
    losses = info["subset_mean_loss"]
    lines += ["", f"Mean query loss per subset: {losses['mean']:.4f} (sd over subsets "
                  f"{losses['sd']:.4f}, min {losses['min']:.4f}, max {losses['max']:.4f}).",
              "", f"For reference, {BOARD}.", ""]
    return "\n".join(lines)


def plot(path: Path, results: dict, sources: dict) -> None:
    """Every query row's LDS per predictor (dots), their mean and CI (bar), and bergson's board
    values as reference lines (another model and data set)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.42 * len(names)))
    jitter = np.random.default_rng(0)
    for y, name in enumerate(names):
        r = results[name]
        values = np.array([v for v in r["per_query"] if v is not None])
        color = "tab:grey" if sources[name].get("baseline") else "tab:blue"
        ax.scatter(values, y + jitter.uniform(-0.18, 0.18, values.size), s=6, alpha=0.35,
                   color=color, linewidths=0)
        if r["lds"] is not None:
            low, high = r["lds_ci"] or (r["lds"], r["lds"])
            ax.errorbar(r["lds"], y, xerr=[[r["lds"] - low], [high - r["lds"]]], fmt="s",
                        color="black", capsize=3, ms=4)
    for label, value in BOARD_LDS.items():
        ax.axvline(value, color="tab:red", lw=0.8, ls=":")
        ax.text(value, -0.9, label, color="tab:red", fontsize=7, ha="center")
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -1.2)
    ax.set_xlabel("per-query LDS (Spearman over subsets); square: mean, bar: CI over query rows")
    ax.set_title("LDS per query row (red: bergson's board, another model and data set)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute(args) -> None:
    import numpy as np

    folder = Path(args.subsets)
    inputs = [args.subsets, *[split_named(item)[1] for item in args.scores_from]]
    output_dir = check_output_dir(args.output_dir, args.overwrite, SCRIPT, inputs=inputs)
    if not 0 < args.confidence < 1 or args.bootstrap_resamples < 1:
        raise PipelineError("--confidence must be in (0, 1) and --bootstrap-resamples >= 1")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not args.scores_from and not baselines:
        raise PipelineError("nothing to score: give --scores-from and/or --baselines")
    info, manifest, member = read_draw(folder)
    pool = load_split(manifest, "pool")
    if list(pool["row_id"]) != info["pool_row_ids"]:
        raise PipelineError(f"--subsets {folder}: subsets.json and the pool split disagree")
    losses, query_ids = read_losses(args.evals, member.shape[0], args.loss_field)

    predictors, sources, tokens = {}, {}, None
    for item in args.scores_from:
        name, tau, scores, row_tokens, source = read_scores(item, info["pool_row_ids"],
                                                            query_ids, pool, manifest)
        if name in predictors:
            raise PipelineError(f"--scores-from names {name} twice")
        predictors[name], sources[name] = (tau, scores), source
        tokens = row_tokens if tokens is None else tokens
    for name, predictor in baseline_predictors(baselines, len(query_ids), pool, tokens,
                                               args.seed).items():
        if name in predictors:
            raise PipelineError(f"--scores-from {name} has a baseline's name")
        predictors[name], sources[name] = predictor, {"baseline": BASELINES[name]}
    pairs = parse_pairs(args.pair, list(predictors))
    results = lds_table(member, losses, predictors, confidence=args.confidence,
                        resamples=args.bootstrap_resamples, seed=args.seed)
    differences = paired_differences(results, pairs, confidence=args.confidence,
                                     resamples=args.bootstrap_resamples, seed=args.seed)

    subset_mean = losses.mean(axis=1)
    info = {**{k: info[k] for k in ("pool_size", "subsets", "alpha", "alpha_effective",
                                    "subset_rows", "seed")},
            "subset_mean_loss": {"mean": float(subset_mean.mean()),
                                 "sd": float(subset_mean.std(ddof=1)),
                                 "min": float(subset_mean.min()),
                                 "max": float(subset_mean.max())}}
    report = {"definition": DEFINITION,
              "subsets_dir": str(folder.resolve()), "evals": args.evals,
              "loss_field": args.loss_field, "n_queries": len(query_ids),
              "query_ids": query_ids, "confidence": args.confidence,
              "bootstrap": {"method": "percentile", "resamples": args.bootstrap_resamples,
                            "seed": args.seed}, "draw": info, "board_reference": BOARD,
              "predictors": {name: {**sources[name], **results[name]} for name in results},
              "pairs": differences,
              "provenance": provenance(seed=args.seed, manifest=str(folder / "manifest.json"))}
    with staged_output(output_dir, SCRIPT) as staged:
        write_json_atomic(staged / "lds.json", report)
        (staged / "lds.md").write_text(markdown(results, sources, info, args, differences))
        plot(staged / "lds.png", results, sources)
    print("; ".join(f"{name} LDS {fmt(r['lds'], None)}" for name, r in results.items())
          + f"; wrote {output_dir}")


def main(argv=None) -> None:
    args = parse_args(argv)
    draw(args) if args.command == "draw" else compute(args)


if __name__ == "__main__":
    run_main(main)
