"""The SAE-only predictor: can a ridge regression on per-example SAE features predict the
attribution rank? And the selection it would make.

  train_bidir_classifier.py --manifest runs/smoltalk_v1/manifest.json \
      --scores-from runs/smoltalk_v1/scores --sae-dir runs/smoltalk_v1/sae_features \
      --output-root runs/smoltalk_v1/sae_predictor [--write-selection 500]

Inputs: <score run>/train_scores.jsonl (score.py: row_id, score, rank; rows with a non-finite
score are excluded and counted) and the NPZ of sae_analysis.py (row_id, feature_activation_mean,
the sample statistics named in stat_names, the pooling in `positions`). Their row ids must be the
same set. summary.json records the features' pooling (completion or all), so two predictors of
the same scores on the two poolings can be told apart (report.py's SAE predictor table).

Model: scikit-learn RidgeCV on [sample statistics, SAE feature means], every column standardized
on the training rows. Feature means go through sign(x)*log1p(|x|) first (--no-log1p turns it off):
they are heavy-tailed, a few very active features would otherwise own the fit, and zeros stay zero;
token counts are log1p'd for the same reason. Columns that are zero on every row (dead features)
are dropped. Target (--target-type): rank = the attribution rank as a percentile (1 = top row,
0 = bottom), robust to the heavy tails of raw attribution scores; score = the raw score. Either way
a higher prediction means "more useful", and predicted rank 1 is the highest prediction.

Alpha is chosen from a log grid by cross-validation inside the training rows only: RidgeCV's
efficient leave-one-out when every training group is one row (or --split-mode random), else
GroupKFold over group_id (--inner-folds), so the alpha is never tuned on group-mates.

Evaluation, all on rows the model never trained on (with --split-mode grouped no group_id is on
both sides):
  heldout        one split of --test-fraction: Spearman/Pearson with the target, precision of the
                 predicted top-k against the attribution top-k within the fold (k scaled to the
                 fold: round(top_k * fold rows / rows), reported), AUC of top-k membership, alpha;
                 the same for two clearly labelled baselines: ridge on reward_model_score alone and
                 ridge on the sample statistics alone; and the Spearman after partialling out
                 reward_model_score.
  out_of_fold    K-fold CV (--cv-folds; GroupKFold when grouped) gives every scored row a
                 prediction from a model that never saw its group (row_scores.jsonl:
                 predicted_score, predicted_rank, fold); also the overlap of the predicted
                 top-k with the attribution top-k over the whole split, and the Spearman of the
                 prediction with the rows' supervised tokens (length_diagnostics, as score.py's).
                 This prediction is the verdict's `sae` arm (score.py --arms ...,sae
                 --arm-scores sae=<output-root>/row_scores.jsonl takes its top-k).
  refit          one model on all scored rows (row_scores.jsonl: refit_score, refit_rank): the
                 prediction for rows without a score; in-sample for the scored rows, so not for
                 judging the predictor.

Every fit sees only its own rows' targets: with --target-type rank the percentile is recomputed
among the rows a model is fitted on, so a row's out-of-fold prediction does not move when its own
score (or its rank among the others) changes; the folds depend on group_id and --seed only.

metadata_validation.json + .png: Spearman of attribution rank and predicted rank with
reward_model_score, mean rank by difficulty, quality and category: does the SAE see something the
reward score does not?

--write-selection K writes <output-root>/selection/manifest.json, a continuation manifest with
splits top_k (the K rows with the highest out-of-fold prediction: honest predictions, not the
refit's memory of rows it trained on) and matched_random_k (K random scored rows, disjoint from
top_k unless --allow-overlap), carrying eval and attr_query, for
  finetune.py train --manifest <output-root>/selection/manifest.json --train-split top_k
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from pipeline import (PipelineError, add_alias, check_output_dir, load_manifest, load_split,
                      provenance, read_json, read_jsonl, run_main, seed_type, staged_output,
                      write_json_atomic, write_jsonl_atomic, write_selection_manifest)
from subsets import RANDOM_MATCHES, choose_subsets, rank_rows

SCRIPT = "train_bidir_classifier.py"

ORDERED_LEVELS = {
    "difficulty": ["very easy", "easy", "medium", "hard", "very hard"],
    "quality": ["very poor", "poor", "average", "good", "excellent"],
}
METADATA_COLUMNS = ("difficulty", "quality", "category")
COUNT_STATS = ("n_tokens", "n_tokens_pooled")
BAR_LABELS = {
    "sae_predictor": "SAE predictor\n(features + sample stats)",
    "baseline_sample_stats_only": "baseline: ridge on\nsample stats only",
    "baseline_reward_model_score_only": "baseline: ridge on\nreward_model_score",
    "sae_predictor_partial_reward_model_score": "SAE predictor, reward\nscore partialled out",
}
DEFAULT_ALPHAS = "1e-1,1,1e1,1e2,3e2,1e3,3e3,1e4,3e4,1e5,1e6,1e7"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main manifest: row metadata and the parent of --write-selection "
                        "(default: %(default)s)")
    p.add_argument("--split", default="score_pool",
                   help="split the scores and features describe (default: score_pool)")
    p.add_argument("--scores-from", default="runs/smoltalk_v1/scores",
                   help="score.py output folder with train_scores.jsonl (default: %(default)s)")
    add_alias(p, "--score-run-path", "scores_from")
    p.add_argument("--sae-dir", default="runs/smoltalk_v1/sae_features",
                   help="sae_analysis.py output folder; its one .npz is used "
                        "(default: %(default)s)")
    p.add_argument("--npz", default=None, help="the feature NPZ explicitly (overrides --sae-dir)")
    p.add_argument("--target-type", choices=["rank", "score"], default="rank",
                   help="rank = attribution rank percentile, score = raw score (default: rank)")
    p.add_argument("--top-k", type=int, default=500,
                   help="size of the attribution top-k the precision and AUC refer to, over the "
                        "whole split; scaled to each evaluation fold (default: 500)")
    p.add_argument("--split-mode", choices=["grouped", "random"], default="grouped",
                   help="grouped keeps every group_id on one side of every split (default)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="held-out fraction (of groups when grouped) (default: 0.2)")
    p.add_argument("--cv-folds", type=int, default=5,
                   help="folds of the out-of-fold predictions (default: 5)")
    p.add_argument("--inner-folds", type=int, default=3,
                   help="GroupKFold folds choosing alpha when groups have several rows "
                        "(default: 3)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS,
                   help="comma-separated ridge penalty grid (default: %(default)s)")
    p.add_argument("--no-log1p", action="store_true",
                   help="use the raw feature means instead of sign(x)*log1p(|x|)")
    p.add_argument("--seed", type=seed_type, default=42, help="splits and selection (default: 42)")
    p.add_argument("--output-root", default="runs/smoltalk_v1/sae_predictor",
                   help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-root")
    p.add_argument("--write-selection", type=int, default=None, metavar="K",
                   help="also write a continuation manifest with top_k and matched_random_k of "
                        "K rows (default: off)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let matched_random_k draw rows that are also in top_k")
    p.add_argument("--random-match", choices=RANDOM_MATCHES, default="rows",
                   help="what matched_random_k matches (as in score.py): rows = K rows, tokens = "
                        "the top_k's supervised tokens, stratified = its count per length "
                        "quintile (default: rows)")
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be between 0 and 1")
    if args.top_k < 1 or args.cv_folds < 2 or args.inner_folds < 2:
        p.error("--top-k must be >= 1, --cv-folds and --inner-folds >= 2")
    if args.write_selection is not None and args.write_selection < 1:
        p.error("--write-selection must be at least 1")
    try:
        args.alpha_grid = sorted(float(a) for a in args.alphas.split(",") if a.strip())
    except ValueError:
        p.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if not args.alpha_grid or min(args.alpha_grid) <= 0:
        p.error("--alphas must hold positive numbers")
    return args


# ---------------------------------------------------------------------------------------------
# inputs


def load_scores(score_run: Path):
    """row ids, scores (NaN where missing or non-finite), ranks (NaN where null) and supervised
    tokens of train_scores.jsonl, plus score.py's summary.json when there is one."""
    import numpy as np

    path = score_run / "train_scores.jsonl"
    if not path.is_file():
        raise PipelineError(f"score file {path} does not exist (run score.py first)")
    row_ids, scores, ranks, supervised = [], [], [], []
    for line_number, row in enumerate(read_jsonl(path, "score file"), start=1):
        try:
            row_ids.append(str(row["row_id"]))
            score, rank = row.get("score"), row.get("rank")
            scores.append(float(score) if score is not None else math.nan)
            ranks.append(float(rank) if rank is not None else math.nan)
            supervised.append(int(row.get("num_supervised_tokens") or 0))
        except (KeyError, TypeError, ValueError) as err:
            raise PipelineError(f"{path}: row {line_number} is not a score row "
                                f"({type(err).__name__}: {err})")
    if not row_ids:
        raise PipelineError(f"score file {path} is empty")
    if len(set(row_ids)) != len(row_ids):
        raise PipelineError(f"score file {path} lists a row_id more than once")
    summary_path = score_run / "summary.json"
    summary = read_json(summary_path, "score summary") if summary_path.is_file() else None
    return (path, row_ids, np.array(scores), np.array(ranks), np.array(supervised), summary)


def find_npz(args) -> Path:
    if args.npz:
        path = Path(args.npz)
        if not path.is_file():
            raise PipelineError(f"feature file {path} does not exist")
        return path
    sae_dir = Path(args.sae_dir)
    if not sae_dir.is_dir():
        raise PipelineError(f"--sae-dir {sae_dir} does not exist (run sae_analysis.py first)")
    found = sorted(sae_dir.glob("*.npz"))
    if len(found) != 1:
        raise PipelineError(f"--sae-dir {sae_dir} holds {len(found)} .npz files; pass --npz "
                            "to pick one")
    return found[0]


def load_features(path: Path):
    """row ids, feature means [n, d_sae], the sample statistics {name: [n]} of an NPZ and its
    pooling (sae_analysis.py --positions; None in an NPZ written before it was recorded)."""
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
        arrays = {name: data[name] for name in data.files}
    except Exception as err:  # not a zip, truncated, pickled object arrays ...
        raise PipelineError(f"feature file {path} cannot be read as an NPZ: {err}")
    if "feature_activation_mean" not in arrays:
        raise PipelineError(f"feature file {path} has no 'feature_activation_mean' array (written "
                            "by an older version?): regenerate it with sae_analysis.py")
    if "row_id" not in arrays:
        raise PipelineError(f"feature file {path} has no 'row_id' array: regenerate it with "
                            "sae_analysis.py")
    means = arrays["feature_activation_mean"]
    row_ids = [str(r) for r in arrays["row_id"]]
    if means.ndim != 2 or means.shape[0] != len(row_ids):
        raise PipelineError(f"feature file {path}: feature_activation_mean has shape "
                            f"{means.shape}, expected ({len(row_ids)}, d_sae)")
    stat_names = [str(s) for s in arrays.get("stat_names", [])]
    stats = {}
    for name in stat_names:
        if name not in arrays or arrays[name].shape != (len(row_ids),):
            raise PipelineError(f"feature file {path}: statistic '{name}' is listed in "
                                "stat_names but missing or of the wrong shape")
        stats[name] = arrays[name].astype(np.float64)
    if len(set(row_ids)) != len(row_ids):
        raise PipelineError(f"feature file {path} lists a row_id more than once")
    pooling = str(arrays["positions"]) if "positions" in arrays else None
    return row_ids, means, stats, pooling


def check_same_rows(score_ids, score_path, feature_ids, feature_path) -> None:
    only_scores = sorted(set(score_ids) - set(feature_ids))
    only_features = sorted(set(feature_ids) - set(score_ids))
    if only_scores or only_features:
        example = lambda ids: f" (e.g. {ids[0]!r})" if ids else ""  # noqa: E731
        raise PipelineError(
            f"row ids differ between the scores {score_path} ({len(score_ids)} rows) and the "
            f"features {feature_path} ({len(feature_ids)} rows): {len(only_scores)} only in the "
            f"scores{example(only_scores)}, {len(only_features)} only in the features"
            f"{example(only_features)}; were both made from the same split?")


def rank_percentile(ranks):
    """1 for the best (rank 1) of the given rows down to 0 for the worst."""
    import numpy as np
    from scipy.stats import rankdata

    if len(ranks) == 1:
        return np.ones(1)
    return 1 - (rankdata(ranks, method="average") - 1) / (len(ranks) - 1)


def design_matrix(means, stats, use_log1p: bool):
    """[stats | features] and the names of its columns; all-zero feature columns dropped."""
    import numpy as np

    live = np.flatnonzero(np.any(means != 0, axis=0))
    features = means[:, live].astype(np.float32)
    if use_log1p:
        features = np.sign(features) * np.log1p(np.abs(features))
    columns = [np.log1p(np.maximum(v, 0)) if name in COUNT_STATS else v
               for name, v in stats.items()]
    stat_block = (np.stack(columns, axis=1).astype(np.float32) if columns
                  else np.zeros((len(means), 0), np.float32))
    return np.hstack([stat_block, features]), list(stats), live


# ---------------------------------------------------------------------------------------------
# model and metrics


def fit_ridge(X, y, groups, args):
    """StandardScaler + RidgeCV; alpha cross-validated inside these rows only (see the docstring).
    Returns the fitted pipeline and how alpha was chosen."""
    import numpy as np
    from scipy.linalg import LinAlgWarning
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(groups))
    if args.split_mode == "random" or n_groups == len(groups):
        cv, how = None, "leave-one-out (efficient, RidgeCV)"
    else:
        folds = min(args.inner_folds, n_groups)
        if folds < 2:
            raise PipelineError("the training rows hold a single group: alpha cannot be "
                                "cross-validated")
        cv = list(GroupKFold(n_splits=folds).split(X, y, groups))
        how = f"GroupKFold({folds}) on group_id"
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=args.alpha_grid, cv=cv))
    with warnings.catch_warnings():
        # the smallest alphas of the grid give near-singular kernels when features outnumber
        # rows; scipy warns on each, and cross-validation rejects those alphas anyway
        warnings.simplefilter("ignore", LinAlgWarning)
        model.fit(X, y)
    alpha = float(model[-1].alpha_)
    return model, {"alpha": alpha, "alpha_selection": how,
                   "alpha_on_grid_edge": alpha in (args.alpha_grid[0], args.alpha_grid[-1])}


def partial_spearman(pred, truth, control):
    """Spearman of pred and truth after regressing the control's ranks out of both ranks."""
    import numpy as np
    from scipy.stats import pearsonr, rankdata

    keep = np.isfinite(control)
    if keep.sum() < 4 or np.ptp(control[keep]) == 0:
        return None
    ranks = [rankdata(v[keep]) for v in (pred, truth, control)]
    design = np.column_stack([np.ones(keep.sum()), ranks[2]])
    residuals = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    if min(np.std(r) for r in residuals) == 0:
        return None
    return float(pearsonr(*residuals)[0])


def evaluate(pred, target, goodness, k_total: int, n_total: int, reward=None) -> dict:
    """Held-out metrics of predictions on one set of rows. goodness = attribution rank percentile
    over all scored rows (1 = top), which defines the attribution top-k."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    n = len(pred)
    k = max(1, min(n - 1, round(k_total * n / n_total))) if n > 1 else 1
    true_top = np.zeros(n, dtype=bool)
    true_top[np.argsort(-goodness, kind="stable")[:k]] = True
    pred_top = np.argsort(-pred, kind="stable")[:k]
    constant = np.ptp(pred) == 0
    result = {
        "n_rows": n,
        "spearman": None if constant else float(spearmanr(pred, target)[0]),
        "pearson": None if constant else float(pearsonr(pred, target)[0]),
        "k": k,
        "top_k_precision": float(true_top[pred_top].mean()),
        "top_k_overlap": int(true_top[pred_top].sum()),
        "top_k_precision_random_expectation": k / n,
        "top_k_auc": (float(roc_auc_score(true_top, pred))
                      if 0 < true_top.sum() < n else None),
    }
    if reward is not None:
        result["spearman_partial_reward_model_score"] = partial_spearman(pred, target, reward)
    return result


def predictions_rank(pred):
    """Rank 1 = highest prediction (ties broken by row order)."""
    import numpy as np

    order = np.argsort(-pred, kind="stable")
    ranks = np.empty(len(pred), dtype=np.int64)
    ranks[order] = np.arange(1, len(pred) + 1)
    return ranks


# ---------------------------------------------------------------------------------------------
# metadata validation


def metadata_validation(meta, attribution_rank, predicted_rank, reward, baselines) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    def with_reward(ranks):
        keep = np.isfinite(reward)
        if keep.sum() < 3 or np.ptp(reward[keep]) == 0:
            return None
        return float(spearmanr(ranks[keep], reward[keep])[0])

    by_column = {}
    for column in METADATA_COLUMNS:
        values = np.array([str(v) for v in meta[column]])
        known = ORDERED_LEVELS.get(column, [])
        levels = [v for v in known if v in set(values)] + sorted(set(values) - set(known))
        by_column[column] = {
            level: {"n": int((values == level).sum()),
                    "attribution_mean_rank": float(attribution_rank[values == level].mean()),
                    "predicted_mean_rank": float(predicted_rank[values == level].mean())}
            for level in levels}
    return {
        "rank_convention": "rank 1 = most useful; ranks run over the scored rows, predicted rank "
                           "from the out-of-fold predictions",
        "n_rows": len(attribution_rank),
        "n_rows_with_reward_model_score": int(np.isfinite(reward).sum()),
        "spearman_with_reward_model_score": {
            "attribution_rank": with_reward(attribution_rank),
            "predicted_rank": with_reward(predicted_rank),
            "note": "negative = rows with a high reward_model_score sit near the top",
        },
        "mean_rank_by": by_column,
        "does_the_sae_see_more_than_the_reward_score": baselines,
    }


def plot_validation(path: Path, validation: dict, attribution_rank, predicted_rank, reward):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    n = validation["n_rows"]
    unrelated = (n + 1) / 2
    for ax, column in zip(axes[0], METADATA_COLUMNS):
        levels = validation["mean_rank_by"][column]
        x = np.arange(len(levels))
        # bars start at the mean rank a level would have if rank ignored it, so a bar pointing up
        # means that level sits nearer the top than chance
        for offset, key, label in ((-0.2, "attribution_mean_rank", "attribution rank"),
                                   (0.2, "predicted_mean_rank",
                                    "SAE-predicted rank (out-of-fold)")):
            values = np.array([v[key] for v in levels.values()])
            ax.bar(x + offset, values - unrelated, 0.4, bottom=unrelated,
                   label=label if column == METADATA_COLUMNS[0] else None)
        ax.axhline(unrelated, color="grey", lw=1, ls="--")
        ax.set_xticks(x, [f"{k}\n(n={v['n']})" for k, v in levels.items()], fontsize=8,
                      rotation=30 if len(levels) > 5 else 0)
        ax.set_ylabel("mean rank (1 = most useful; dashed = chance)")
        ax.set_title(f"mean rank by {column}")
        ax.invert_yaxis()
    fig.legend(loc="upper right", fontsize=9, ncol=2)

    ax = axes[1][0]
    ax.scatter(attribution_rank, predicted_rank, s=4, alpha=0.4)
    ax.plot([1, n], [1, n], color="grey", lw=1, ls="--")
    ax.set_xlabel("attribution rank")
    ax.set_ylabel("SAE-predicted rank (out-of-fold)")
    ax.set_title("predicted vs attribution rank")

    ax = axes[1][1]
    keep = np.isfinite(reward)
    ax.scatter(reward[keep], attribution_rank[keep], s=4, alpha=0.4, label="attribution rank")
    ax.scatter(reward[keep], predicted_rank[keep], s=4, alpha=0.4, label="SAE-predicted rank")
    ax.set_xlabel("reward_model_score")
    ax.set_ylabel("rank (1 = most useful)")
    ax.invert_yaxis()
    rho = validation["spearman_with_reward_model_score"]
    ax.set_title(f"vs reward_model_score (Spearman: attribution {fmt(rho['attribution_rank'])}, "
                 f"predicted {fmt(rho['predicted_rank'])})", fontsize=9)
    ax.legend(fontsize=8, markerscale=3)

    ax = axes[1][2]
    bars = validation["does_the_sae_see_more_than_the_reward_score"]["spearman_with_attribution"]
    labels = [BAR_LABELS.get(k, k) for k in bars]
    values = [bars[k] if bars[k] is not None else 0.0 for k in bars]
    ax.barh(np.arange(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    for i, (key, v) in enumerate(zip(bars, values)):
        ax.text(v, i, f" {fmt(bars[key])}", va="center", ha="left" if v >= 0 else "right",
                fontsize=8)
    ax.set_xlim(min(-0.2, min(values) - 0.25), max(0.2, max(values) + 0.25))
    ax.set_xlabel("Spearman with the attribution target (held-out rows)")
    ax.set_title("does the SAE see more than the reward score?")
    ax.invert_yaxis()
    fig.suptitle("SAE-only predictor of attribution rank: metadata validation", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(value):
    return "n/a" if value is None else f"{value:+.3f}"


# ---------------------------------------------------------------------------------------------


def load_inputs(args, manifest):
    """Scores and features of the same rows, in the feature file's row order, with the split's
    metadata: everything the fits need, as one namespace."""
    import numpy as np

    (score_path, score_ids, scores, ranks, supervised,
     score_summary) = load_scores(Path(args.scores_from))
    npz_path = find_npz(args)
    feature_ids, means, stats, pooling = load_features(npz_path)
    check_same_rows(score_ids, score_path, feature_ids, npz_path)
    split = load_split(manifest, args.split)
    split_index = {row_id: i for i, row_id in enumerate(split["row_id"])}
    missing = [r for r in feature_ids if r not in split_index]
    if missing:
        raise PipelineError(f"{len(missing)} row ids of {npz_path} (e.g. {missing[0]!r}) are not "
                            f"in split '{args.split}' of {args.manifest}")
    position = {row_id: i for i, row_id in enumerate(score_ids)}
    order = np.array([position[r] for r in feature_ids])
    scores, ranks, supervised = scores[order], ranks[order], supervised[order]
    meta_rows = split.select([split_index[r] for r in feature_ids])
    groups_all = np.array([str(g) for g in meta_rows["group_id"]]
                          if "group_id" in meta_rows.column_names else feature_ids)
    reward_all = np.array([np.nan if v is None else float(v)
                           for v in (meta_rows["reward_model_score"]
                                     if "reward_model_score" in meta_rows.column_names
                                     else [None] * len(feature_ids))])
    included = np.isfinite(scores)
    if (included & ~np.isfinite(ranks)).any():
        raise PipelineError(f"{score_path}: some rows have a finite score but no rank")
    n_incl = int(included.sum())
    if n_incl < 10:
        raise PipelineError(f"only {n_incl} rows of {score_path} have a finite score; the "
                            "predictor needs at least 10")
    X_all, stat_names, live = design_matrix(means, stats, not args.no_log1p)
    reward = reward_all[included]
    goodness = rank_percentile(ranks[included])
    return SimpleNamespace(
        score_path=score_path, score_summary=score_summary, npz_path=npz_path, pooling=pooling,
        feature_ids=feature_ids, n_features=int(means.shape[1]), scores=scores, ranks=ranks,
        supervised=supervised, split=split, split_index=split_index, meta_rows=meta_rows,
        groups_all=groups_all, included=included, n_incl=n_incl, X_all=X_all,
        stat_names=stat_names, live=live, X=X_all[included], groups=groups_all[included],
        reward=reward, goodness=goodness, included_ranks=ranks[included],
        target=goodness if args.target_type == "rank" else scores[included],
        attribution_rank=np.argsort(np.argsort(-goodness, kind="stable"), kind="stable") + 1,
        top_k=min(args.top_k, n_incl - 1),
        reward_X=np.where(np.isfinite(reward), reward, np.nanmean(reward) if np.isfinite(
            reward).any() else 0.0)[:, None])


def fit_target(args, d, rows):
    """The target of a fit on these rows (indices into the scored rows), from their own
    scores only: the rank percentile among these rows (not among all rows, which would leak the
    left-out rows' positions into it), or the raw score."""
    if args.target_type == "rank":
        return rank_percentile(d.included_ranks[rows])
    return d.target[rows]


def fit_heldout(args, d):
    """One held-out split: the SAE predictor and the two baselines, fitted on the same rows."""
    import numpy as np
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit

    grouped = args.split_mode == "grouped"
    splitter = (GroupShuffleSplit if grouped else ShuffleSplit)(
        n_splits=1, test_size=args.test_fraction, random_state=args.seed)
    train_idx, test_idx = next(splitter.split(d.X, d.target, d.groups))
    heldout = {"n_train": len(train_idx), "n_test": len(test_idx),
               "n_train_groups": len(np.unique(d.groups[train_idx])),
               "n_test_groups": len(np.unique(d.groups[test_idx])),
               "groups_in_both": len(set(d.groups[train_idx]) & set(d.groups[test_idx]))}
    spearman_bars = {}
    candidates = [("sae_predictor", d.X),
                  ("baseline_sample_stats_only", d.X[:, :len(d.stat_names)]),
                  ("baseline_reward_model_score_only", d.reward_X)]
    for name, features in tqdm(candidates, desc="held-out fits", unit="model"):
        if features.shape[1] == 0:
            heldout[name] = None
            continue
        model, how = fit_ridge(features[train_idx], fit_target(args, d, train_idx),
                               d.groups[train_idx], args)
        pred = model.predict(features[test_idx])
        heldout[name] = {**how, **evaluate(pred, d.target[test_idx], d.goodness[test_idx],
                                           d.top_k, d.n_incl, d.reward[test_idx])}
        spearman_bars[name] = heldout[name]["spearman"]
    spearman_bars["sae_predictor_partial_reward_model_score"] = heldout["sae_predictor"][
        "spearman_partial_reward_model_score"]
    return heldout, spearman_bars, test_idx


def fit_out_of_fold(args, d):
    """Every scored row predicted by a model that never saw its group."""
    import numpy as np
    from sklearn.model_selection import GroupKFold, KFold

    folder = (GroupKFold(n_splits=args.cv_folds, shuffle=True, random_state=args.seed)
              if args.split_mode == "grouped"
              else KFold(n_splits=args.cv_folds, shuffle=True, random_state=args.seed))
    oof = np.full(d.n_incl, np.nan)
    fold_of = np.full(d.n_incl, -1)
    fold_alphas = []
    for fold, (fit_rows, pred_rows) in enumerate(tqdm(list(folder.split(d.X, d.target,
                                                                        d.groups)),
                                                      desc="out-of-fold", unit="fold")):
        model, how = fit_ridge(d.X[fit_rows], fit_target(args, d, fit_rows), d.groups[fit_rows],
                               args)
        oof[pred_rows] = model.predict(d.X[pred_rows])
        fold_of[pred_rows] = fold
        fold_alphas.append(how["alpha"])
    metrics = evaluate(oof, d.target, d.goodness, d.top_k, d.n_incl, d.reward)
    metrics["alphas"] = fold_alphas
    return oof, fold_of, metrics


def length_diagnostics(d, oof) -> dict:
    """How much of the out-of-fold prediction is row length (score.py's length_diagnostics for
    the attribution score; report.py's verdict table shows it for the sae arm)."""
    import numpy as np
    from scipy.stats import spearmanr

    tokens = d.supervised[d.included]
    constant = len(oof) < 3 or min(np.ptp(oof), np.ptp(tokens)) == 0
    return {"spearman_supervised_tokens": None if constant
            else float(spearmanr(oof, tokens).statistic),
            "score": "out-of-fold predicted_score"}


def row_score_records(d, oof, fold_of, test_idx, refit_all) -> list[dict]:
    import numpy as np

    incl_pos = np.full(len(d.feature_ids), -1)
    incl_pos[d.included] = np.arange(d.n_incl)
    test_set = set(test_idx.tolist())
    oof_rank, refit_rank = predictions_rank(oof), predictions_rank(refit_all)
    records = []
    for i, row_id in enumerate(d.feature_ids):
        j = int(incl_pos[i])
        records.append({
            "row_id": row_id,
            "group_id": str(d.groups_all[i]),
            "true_score": float(d.scores[i]) if d.included[i] else None,
            "true_rank": int(d.ranks[i]) if d.included[i] else None,
            "excluded": not d.included[i],
            "predicted_score": float(oof[j]) if j >= 0 else None,
            "predicted_rank": int(oof_rank[j]) if j >= 0 else None,
            "fold": int(fold_of[j]) if j >= 0 else None,
            "heldout_test": j in test_set,
            "refit_score": float(refit_all[i]),
            "refit_rank": int(refit_rank[i]),
        })
    return records


def write_selection(args, manifest, d, oof, staged: Path, output_root: Path) -> dict:
    """top_k = the K rows with the highest out-of-fold prediction; matched_random_k drawn by
    subsets.choose_subsets among the scored rows, as score.py draws its control."""
    import numpy as np

    k = args.write_selection
    if k > d.n_incl:
        raise PipelineError(f"--write-selection {k} exceeds the {d.n_incl} scored rows")
    top_pos, random_pos = choose_subsets(rank_rows(oof), k, args.seed, args.allow_overlap,
                                         random_match=args.random_match,
                                         supervised_tokens=d.supervised[d.included])
    incl_rows = np.flatnonzero(d.included)
    to_split = lambda pos: sorted(d.split_index[d.feature_ids[incl_rows[p]]] for p in pos)  # noqa
    attribution_top = set(np.argsort(-d.goodness, kind="stable")[:k].tolist())
    selection = {
        "method": "sae_predictor",
        "k": k,
        "seed": args.seed,
        "random_match": args.random_match,
        "matched_random_rows": len(random_pos),
        "overlap_policy": "allow_overlap" if args.allow_overlap else "disjoint",
        "prediction": "out_of_fold",
        "source_split": args.split,
        "pool": "rows with a finite attribution score",
        "pool_size": d.n_incl,
        "excluded_unscored_rows": int((~d.included).sum()),
        "target_type": args.target_type,
        "score_run": str(Path(args.scores_from).resolve()),
        "features": str(d.npz_path.resolve()),
        "predictor": str(output_root.resolve()),
        "top_k_overlap_with_attribution_top_k": len(attribution_top & set(top_pos)),
        "random_overlap_with_top_k": len(set(random_pos) & set(top_pos)),
    }
    write_selection_manifest(manifest, staged / "selection" / "manifest.json",
                             {"top_k": d.split.select(to_split(top_pos)),
                              "matched_random_k": d.split.select(to_split(random_pos))},
                             selection)
    return selection


def main(argv=None):
    import numpy as np

    args = parse_args(argv)
    started = time.perf_counter()
    manifest = load_manifest(args.manifest)
    output_root = check_output_dir(args.output_root, args.overwrite, SCRIPT,
                                   inputs=[args.manifest, args.scores_from, args.sae_dir,
                                           args.npz], flag="--output-root")
    d = load_inputs(args, manifest)
    grouped = args.split_mode == "grouped"
    n_groups = len(np.unique(d.groups))
    if grouped and n_groups < max(args.cv_folds, 2):
        raise PipelineError(f"{n_groups} groups among the scored rows: too few for "
                            f"--cv-folds {args.cv_folds} with --split-mode grouped")

    heldout, spearman_bars, test_idx = fit_heldout(args, d)
    oof, fold_of, oof_metrics = fit_out_of_fold(args, d)
    # refit on every scored row: predictions for rows without a score, in-sample for the rest
    refit_model, refit_how = fit_ridge(d.X, d.target, d.groups, args)
    refit_all = refit_model.predict(d.X_all)
    validation = metadata_validation(
        {c: (np.array(d.meta_rows[c])[d.included] if c in d.meta_rows.column_names
             else np.array(["n/a"] * d.n_incl)) for c in METADATA_COLUMNS},
        d.attribution_rank, predictions_rank(oof), d.reward,
        {"spearman_with_attribution": spearman_bars,
         "note": ("held-out fold; sae_predictor = ridge on SAE features + sample statistics; "
                  "baseline_sample_stats_only = ridge on the sample statistics alone; "
                  "baseline_reward_model_score_only = ridge on reward_model_score alone; "
                  "sae_predictor_partial_reward_model_score = Spearman of the SAE prediction "
                  "and the target after partialling reward_model_score out of both")})

    with staged_output(output_root, SCRIPT) as staged:
        plot_validation(staged / "metadata_validation.png", validation, d.attribution_rank,
                        predictions_rank(oof), d.reward)
        validation["provenance"] = provenance(seed=args.seed, manifest=args.manifest)
        write_json_atomic(staged / "metadata_validation.json", validation)
        write_jsonl_atomic(staged / "row_scores.jsonl",
                           row_score_records(d, oof, fold_of, test_idx, refit_all))
        selection_info = (write_selection(args, manifest, d, oof, staged, output_root)
                          if args.write_selection is not None else None)
        summary = {
            "manifest": manifest["_path"],
            "split": args.split,
            "score_run": str(Path(args.scores_from).resolve()),
            "score_file": str(d.score_path.resolve()),
            "score_summary": ({k: d.score_summary.get(k) for k in ("train_split", "query_split",
                                                                    "manifest")}
                              if d.score_summary else None),
            "features": str(d.npz_path.resolve()),
            # the content the scores were made on (score.py --arm-scores checks it)
            "train_fingerprint": (d.score_summary or {}).get("train_fingerprint"),
            "pooling": d.pooling,
            "target_type": args.target_type,
            "target_note": ("rank: attribution rank percentile among scored rows, 1 = rank 1"
                            if args.target_type == "rank" else "score: raw attribution score"),
            "n_rows": len(d.feature_ids),
            "n_scored": d.n_incl,
            "n_excluded_non_finite_score": int((~d.included).sum()),
            "n_groups": n_groups,
            "n_features_total": d.n_features,
            "n_features_used": int(len(d.live)),
            "n_dead_features_dropped": int(d.n_features - len(d.live)),
            "sample_stats": d.stat_names,
            "feature_transform": "none" if args.no_log1p else "sign(x)*log1p(|x|)",
            "count_stats_log1p": [s for s in d.stat_names if s in COUNT_STATS],
            "split_mode": args.split_mode,
            "test_fraction": args.test_fraction,
            "top_k": d.top_k,
            "alpha_grid": args.alpha_grid,
            "heldout": heldout,
            "out_of_fold": {"cv_folds": args.cv_folds, "scheme": (
                "GroupKFold on group_id" if grouped else "KFold"),
                "target": ("rank percentile among each fold's fitted rows"
                           if args.target_type == "rank" else "raw score"), **oof_metrics},
            "length_diagnostics": length_diagnostics(d, oof),
            "refit": {**refit_how, "n_rows": d.n_incl,
                      "note": "in-sample for scored rows; use predicted_* (out-of-fold) to judge"},
            "selection": selection_info,
            "outputs": ["summary.json", "row_scores.jsonl", "metadata_validation.json",
                        "metadata_validation.png"] + (["selection/manifest.json"]
                                                      if selection_info else []),
            "wall_clock_s": time.perf_counter() - started,
            "provenance": provenance(seed=args.seed, manifest=args.manifest),
        }
        write_json_atomic(staged / "summary.json", summary)
    sae = heldout["sae_predictor"]
    print(f"held-out Spearman {fmt(sae['spearman'])}, top-{sae['k']} precision "
          f"{sae['top_k_precision']:.3f} (random {sae['top_k_precision_random_expectation']:.3f}), "
          f"AUC {fmt(sae['top_k_auc'])}; out-of-fold Spearman {fmt(oof_metrics['spearman'])}; "
          f"wrote {output_root}")


if __name__ == "__main__":
    run_main(main)
