"""One report over a recipe's run (recipes/*.toml through run_experiment.py): report.md,
report.json and PNG plots from what the steps left in the run folder. Nothing is recomputed on a
GPU, and the paired eval-loss statistics are compare_evals.py's (the recipes' compare steps), read
from its JSON; a file that is absent only drops its part and is listed under "not found".

    uv run report.py --run-dir runs/smoltalk_v1                         # its seed_*/ folders
    uv run report.py --run-dir runs/smoltalk_v1 --seeds-glob 'seed_[0-4]'
    uv run report.py --run-dir runs/smoltalk_v1 --seed-dirs runs/smoltalk_v1/seed_42 runs/b/seed_1

report.md opens with the verdict when the run has one (recipes/verdict.toml): one sentence made
from the numbers (never written by hand), then the table it summarises; the older sections follow.

Seed folders: --seed-dirs D [D ...] exactly these, in the order given; else the folders under
--run-dir matching --seeds-glob (default seed_*), sorted by the number in their name, else by
name. A seed is labelled by its folder name.

The layout the recipes write (<split> is the run folder, or with per_seed_split = true the seed
folder, which is looked in first):
  <split>/manifest.json, data/             dataset.py (train_base's `corrupted` column, if any,
                                           is the planted signal)
  <split>/eval_base.json                   eval_loss.py on the base adapter (step eval_base): the
                                           base model's and the base adapter's eval loss, once
                                           per split
  <run>/compare_top_vs_random.json         compare_evals.py over every seed folder's paired rows
  <run>/compare_sae_top_vs_random.json     (steps compare_pooled, compare_sae_pooled)
  seed_<s>/attribution/train_scores.jsonl, summary.json
                                           score.py --scores-from (step subsets: score, rank,
                                           in_top_k, in_matched_random_k per train row)
  seed_<s>/eval_top_k.json, eval_matched_random_k.json, eval_sae_top_k.json,
  eval_sae_matched_random_k.json           eval_loss.py --skip-base on each continuation adapter
  seed_<s>/compare_top_vs_random.json      compare_evals.py: attribution top-k vs matched random
  seed_<s>/compare_sae_top_vs_random.json  ... the SAE predictor's top-k vs matched random
  seed_<s>/sae_predictor/row_scores.jsonl  train_bidir_classifier.py (out-of-fold
                                           predicted_score / predicted_rank, true_rank)
  seed_<s>/eval_words.json                 eval_words.py (Taboo: per-model successes, per-row
                                           outcomes)

The verdict's layout (recipes/verdict.toml; <design> is scratch or continue):
  <run>/compare_<design>.json              compare_evals.py --arm ... --baselines ...: every arm
                                           against random, random_stratified, longest, reward,
                                           the seeds as the unit
  seed_<s>/arms/summary.json               score.py --arms: arms.<arm>.rows, supervised_tokens
  seed_<s>/adapter_<design>_<arm>/train_metrics.json
                                           finetune.py: optimizer_steps, rows_seen,
                                           supervised_tokens_seen, step_tokens, budget_tokens
  seed_<s>/eval_<design>_<arm>.json        eval_loss.py --skip-base
  <split>/scores/summary.json, scores_raw/summary.json
                                           score.py --scores-only: length_diagnostics (the
                                           score-length Spearman of attribution / attribution_raw)
  <split>/sae_predictor_<pooling>/summary.json, row_scores.jsonl
                                           train_bidir_classifier.py on sae_analysis.py's
                                           features of one pooling (all, completion): out_of_fold
                                           metrics, pooling, length_diagnostics (the sae arm's
                                           score-length Spearman); per row the out-of-fold
                                           predicted_score and the attribution true_score
  seed_<s>/arms/continuation_manifest.json selection.arm_scores: the file each score arm (sae)
                                           was drawn from, so the table names the predictor used

The Taboo verdict's layout (recipes/taboo.toml; <label> is <design>_k<k>):
  <run>/compare_<label>.json               compare_evals.py --metric success: per rule, arm and
                                           seed the successes, per seed the exact McNemar, over
                                           seeds the t-interval of the success-rate difference
  <run>/eval_words_base.json               eval_words.py on the base model, once per split (or
                                           seed_<s>/eval_words_base.json with per_seed_split)

Sections:
  Taboo        per design, k, success rule and arm: successes / eval episodes per seed, the mean
  verdict      over seeds of the success-rate difference against the control (the compare
               file's first --baselines, e.g. random_outcome_stratified; > 0: the arm is better)
               with its 95% t-interval over seeds, seeds better, the exact McNemar p per seed;
               the base model's successes. The sentence names --headline on the files' primary
               rule: "beats" when the interval lies above 0, "is worse than" when below, else
               "does not beat".
  Verdict      per design and arm: the mean over seeds of the per-seed token-weighted delta
               against the control arm (--control, default random; < 0: the arm is better) with
               its 95% t-interval over seeds (compare_evals.py's seed_level; the seeds are the
               unit, so the interval holds the training variance), seeds where the arm is
               better, the Holm-adjusted p-value (Holm's step-down over the arms compared with
               the control in that design), the per-example delta, the deltas against
               random_stratified, longest and reward, each arm's subset (rows, supervised tokens)
               and what it trained on (optimizer steps, supervised tokens: equal steps and tokens
               = budget-matched), its mean eval loss and the score-length Spearman. The sentence
               names --headline (default attribution): "beats" when its t-interval lies below 0
               and its Holm-adjusted p < 0.05, "is worse than" when above 0 with p < 0.05, else
               "does not beat". A plot: one point per seed per arm.
  SAE          per split and predictor folder (sae_predictor_<pooling>/): the features' pooling,
  predictor    the out-of-fold Spearman of the prediction with the attribution rank (every row
               predicted by a model that never saw its group), how many of its top-k are in the
               attribution top-k (and the chance expectation), with planted rows the AUC of the
               prediction and of the attribution score itself for clean vs corrupted, and which
               arm drew its top-k from it (arms/continuation_manifest.json) in how many seeds;
               one generated line per split gives the two poolings' differences (Spearman with
               the attribution score; planted AUC) with a paired bootstrap interval over the
               rows, and names a pooling better only where the interval excludes 0.
  SmolTalk     per seed, compare_evals.py's top-k minus matched random ("finetuned" losses;
               negative = top-k better): token-weighted and per-example deltas with paired
               bootstrap 95% CIs over eval rows, per-category token-weighted deltas. Pooled:
               compare_evals.py over the paired rows of all seeds (shown when it pooled exactly
               the seeds reported): the bootstrap resamples rows from the pool, so it treats rows
               as independent and does not capture seed-to-seed (training) variance; the mean of
               the per-seed deltas and how many seeds favour top-k are shown next to it. Eval
               loss per seed: base model and base adapter (its split's eval_base.json) and each
               continuation adapter.
  Taboo        per seed and model: successes/rows ("62/152 = 0.4079") and distinct target words;
               per pair of models the exact McNemar of eval_words.py (recomputed from its per-row
               outcomes with its own function when present, else its stored numbers). Pooled:
               exact McNemar (eval_words.mcnemar_exact) on the discordant counts b, c summed over
               seeds; valid when the seeds' eval rows are independent pairs (if every seed
               evaluates the same rows, the pooled p-value is optimistic).
  Attribution  per seed: histogram of finite scores with the top-k cut (lowest top-k score),
               finite coverage, mean score of top-k and matched random; Jaccard overlap of the
               top-k row ids between every two seeds; SAE predictor: out-of-fold predicted rank
               vs attribution rank scatter and their Spearman (scipy.stats.spearmanr).
  Planted      when train_base has a `corrupted` column (dataset.py --corrupt-fraction): the ROC
  signal       AUC (sklearn.metrics.roc_auc_score; ties count 1/2; 1 = every clean row outscores
               every corrupted row, 0.5 = chance) of the attribution score for telling clean
               (positive) from corrupted rows (rows without a finite score left out and
               counted), the same for the SAE predictor's out-of-fold predicted_score, and
               corrupted rows in top_k and matched_random_k against the number expected by chance.

The output folder is written whole, then renamed into place (an existing report folder there is
replaced; a non-empty folder without report.json is refused).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from pathlib import Path

from eval_words import mcnemar_exact, pairwise_mcnemar, rate_string
from pipeline import (PipelineError, check_output_dir, load_manifest, load_split, provenance,
                      read_json, read_jsonl, run_main, split_fingerprint, staged_output,
                      write_json_atomic)

SCRIPT = "report.py"
COMPARISONS = {  # name: compare_evals.py's output, per seed folder and (pooled) in the run folder
    "attribution": "compare_top_vs_random.json",
    "sae_predictor": "compare_sae_top_vs_random.json",
}
COMPARE_STATS = ("rows", "supervised_tokens", "token_weighted", "per_example",
                 "fraction_rows_a_better", "per_category")
EVAL_BASE_FILE = "eval_base.json"
EVAL_FILES = {  # continuation adapter: eval_loss.py's result in a seed folder
    "top_k": "eval_top_k.json", "matched_random_k": "eval_matched_random_k.json",
    "sae_top_k": "eval_sae_top_k.json", "sae_matched_random_k": "eval_sae_matched_random_k.json",
}
SCORES_FILE = Path("attribution") / "train_scores.jsonl"
SAE_ROWS_FILE = Path("sae_predictor") / "row_scores.jsonl"
SAE_PREDICTOR_GLOB = "sae_predictor_*"   # the verdict's per-split predictors, one per pooling
ARMS_MANIFEST_FILE = Path("arms") / "continuation_manifest.json"
TABOO_FILE = Path("eval_words.json")
SPLIT_SCORES_FILE = Path("scores") / "train_scores.jsonl"   # the score step's, once per split
ARMS_SUMMARY_FILE = Path("arms") / "summary.json"
VERDICT_GLOB = "compare_*.json"
DESIGN_ORDER = ("scratch", "continue")
DESIGN_PHRASE = {"scratch": "from scratch", "continue": "continuing the base adapter"}
VERDICT_BASELINES = ("random_stratified", "longest", "reward")  # columns beside the control
ARM_SCORE_SUMMARY = {  # arm: the score folder (in the split folder) whose length diagnostics apply
    "attribution": "scores", "attribution_bottom": "scores", "attribution_raw": "scores_raw"}
ALPHA = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the recipe's run folder (--run-dir)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed-dirs", nargs="+", default=None, metavar="DIR",
                       help="explicit seed folders (paths as given, not under --run-dir)")
    seeds.add_argument("--seeds-glob", default="seed_*",
                       help="seed folders under --run-dir (default: %(default)s)")
    p.add_argument("--output-dir", default=None,
                   help="report.md, report.json, *.png (default: <run-dir>/report)")
    p.add_argument("--control", default="random",
                   help="the verdict's control arm (default: %(default)s)")
    p.add_argument("--headline", default="attribution",
                   help="the arm the verdict sentence is about (default: %(default)s)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# statistics (the paired eval-loss deltas are compare_evals.py's, read from its output)


def auc_mann_whitney(positives, negatives) -> float | None:
    """P(a random positive scores above a random negative), ties counted 1/2: the ROC AUC
    (= Mann-Whitney U / (n_pos n_neg)), from sklearn."""
    from sklearn.metrics import roc_auc_score

    if len(positives) == 0 or len(negatives) == 0:
        return None
    labels = [1] * len(positives) + [0] * len(negatives)
    return float(roc_auc_score(labels, [*positives, *negatives]))


def spearman(x, y) -> float | None:
    import numpy as np
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # undefined: scipy would warn, return nan
        return None
    return float(spearmanr(x, y)[0])


def jaccard(a: set, b: set) -> float | None:
    return len(a & b) / len(a | b) if a | b else None


def holm(p_values: dict) -> dict:
    """Holm's step-down adjustment of a family of p-values: the i-th smallest (i from 0) times
    (m - i), made non-decreasing, capped at 1. Written here because scipy has no Holm
    (statsmodels' multipletests has, but is not a dependency for ten lines). None (no test, e.g.
    one seed) stays None and is not counted in m."""
    tested = sorted((p, name) for name, p in p_values.items() if p is not None)
    m, running, out = len(tested), 0.0, {name: None for name in p_values}
    for i, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = running
    return out


def pooled_mcnemar(tests: list[dict]) -> dict:
    """Exact McNemar on the discordant counts summed over seeds."""
    b = sum(t["a_success_b_fail"] for t in tests)
    c = sum(t["a_fail_b_success"] for t in tests)
    rows = sum(t["num_rows"] for t in tests)
    return {"seeds": len(tests), "num_rows": rows, "a_success_b_fail": b, "a_fail_b_success": c,
            "p_value": mcnemar_exact(b, c),
            "test": "exact McNemar (eval_words.mcnemar_exact) on b, c summed over seeds"}


# ---------------------------------------------------------------------------------------------
# reading the layout


def seed_sort_key(path: Path):
    numbers = re.findall(r"\d+", path.name)
    return (0, int(numbers[-1]), path.name) if numbers else (1, 0, path.name)


def find_seed_dirs(args) -> list[Path]:
    run_dir = Path(args.run_dir)
    if args.seed_dirs:
        dirs = [Path(d) for d in args.seed_dirs]
        for d in dirs:
            if not d.is_dir():
                raise PipelineError(f"seed folder {d} does not exist")
        names = [d.name for d in dirs]
        if len(set(names)) != len(names):
            raise PipelineError("--seed-dirs: two seed folders share a name (the name is the "
                                "seed's label)")
        return dirs
    if not run_dir.is_dir():
        raise PipelineError(f"run folder {run_dir} does not exist")
    dirs = sorted((d for d in run_dir.glob(args.seeds_glob) if d.is_dir()), key=seed_sort_key)
    if not dirs:
        raise PipelineError(f"nothing to report in {run_dir}: no seed folders matching "
                            f"{args.seeds_glob} (a recipe writes <run_dir>/seed_<s>/)")
    return dirs


def split_file(seed_dir: Path, run_dir: Path, name: str) -> Path | None:
    """A file of the seed's split: in the seed folder (per_seed_split = true), else in the run
    folder (the split made once, the seeds repeat the rest)."""
    for path in (seed_dir / name, run_dir / name):
        if path.is_file():
            return path
    return None


def manifest_of(seed_dir: Path, run_dir: Path) -> Path | None:
    return split_file(seed_dir, run_dir, "manifest.json")


@functools.lru_cache(maxsize=None)
def base_eval(path: Path) -> dict:
    """eval_base.json, read once per split however many seeds share it."""
    result = read_json(path, "base eval")
    return {"eval_base": str(path),
            "base_model": (result.get("base") or {}).get("loss"),
            "base_adapter": (result.get("finetuned") or {}).get("loss"),
            "eval_rows": result.get("num_eval_rows")}


@functools.lru_cache(maxsize=None)
def train_base_corruption(seed_dir: Path, run_dir: Path) -> dict | None:
    """{row_id: corrupted} of the manifest's train_base, or None without a `corrupted` column."""
    path = manifest_of(seed_dir, run_dir)
    if path is None:
        return None
    manifest = load_manifest(path)
    if "train_base" not in manifest["splits"]:
        return None
    split = load_split(manifest, "train_base")
    if "corrupted" not in split.column_names:
        return None
    return dict(zip(split["row_id"], map(bool, split["corrupted"])))


@functools.lru_cache(maxsize=None)
def split_content(manifest_path: Path, split: str) -> str | None:
    manifest = load_manifest(manifest_path)
    if split not in manifest["splits"]:
        return None
    return split_fingerprint(load_split(manifest, split))


def check_scores_belong(summary: dict, summary_path: Path, manifest_path: Path | None) -> None:
    """Refuse scores of other content than the manifest's pool (same row ids, other completions:
    a corrupted twin's scores would print a planted-signal AUC of chance as a result)."""
    recorded, split = summary.get("train_fingerprint"), summary.get("train_split")
    if manifest_path is None or not recorded or not split:
        return
    actual = split_content(manifest_path, split)
    if actual is not None and actual != recorded:
        raise PipelineError(f"{summary_path} scored other content than split '{split}' of "
                            f"{manifest_path} (train_fingerprint {recorded} vs {actual}): these "
                            "scores do not belong to this run")


def read_comparison(path: Path) -> dict:
    result = read_json(path, "comparison")
    missing = [key for key in COMPARE_STATS if key not in result]
    if missing:
        raise PipelineError(f"{path} has no {missing[0]}: not compare_evals.py's output")
    return result


def pooled_labels(pooled: dict) -> list[str]:
    """The seed folders a compare_evals.py result covers (one pair: the folder of its --a)."""
    if "pooled_from" in pooled:
        return [p["label"] for p in pooled["pooled_from"]]
    return [Path(pooled["a"]).parent.name] if "a" in pooled else []


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


# ---------------------------------------------------------------------------------------------
# sections


def over_seeds(per_seed: dict) -> dict:
    deltas = [r["token_weighted"]["delta"] for r in per_seed.values()]
    return {"seeds": len(deltas),
            "mean_token_weighted_delta": sum(deltas) / len(deltas),
            "mean_per_example_delta": sum(r["per_example"]["delta"] for r in per_seed.values())
                                      / len(deltas),
            "seeds_a_better_token_weighted": sum(d < 0 for d in deltas)}


def smoltalk_section(seeds: dict[str, Path], run_dir: Path) -> dict:
    """Per comparison: the seeds' compare_evals.py results and the run folder's pooled one; the
    pooled entry always holds the over-seeds summary, and compare_evals.py's numbers when its
    file pools exactly these seeds."""
    out = {}
    for name, file in COMPARISONS.items():
        results = {label: read_comparison(folder / file) for label, folder in seeds.items()
                   if (folder / file).is_file()}
        if not results:
            continue
        first = next(iter(results.values()))
        pooled = {"over_seeds": over_seeds(results)}
        pooled_path = run_dir / file
        if pooled_path.is_file():
            pooled_result = read_comparison(pooled_path)
            if sorted(pooled_labels(pooled_result)) == sorted(results):
                pooled.update({key: pooled_result[key] for key in COMPARE_STATS},
                              source=str(pooled_path))
                if "seed_level" in pooled_result:   # compare_evals.py's seeds-as-unit answer
                    level = pooled_result["seed_level"]
                    pooled["seed_level"] = {key: level[key] for key in (
                        "seeds", "interval", "bootstrap", "token_weighted", "per_example")}
            else:
                covered = ", ".join(pooled_labels(pooled_result))
                pooled["skipped"] = f"{pooled_path} pools {covered}, not the seeds reported"
        out[name] = {"file": file, "a": Path(first.get("a", "A")).name,
                     "b": Path(first.get("b", "B")).name, "column": first.get("column"),
                     "bootstrap": first.get("bootstrap"),
                     "per_seed": {label: {key: r[key] for key in COMPARE_STATS}
                                  for label, r in results.items()},
                     "pooled": pooled,
                     "pooling": "compare_evals.py over the paired rows of all seeds (row ids "
                                "prefixed by the seed folder), bootstrap over the pool"}
    return out


def eval_loss_section(seeds: dict[str, Path], run_dir: Path) -> dict:
    """Per seed: its split's base model and base adapter loss, and each continuation adapter's."""
    per_seed = {}
    for label, folder in seeds.items():
        entry = {}
        base_path = split_file(folder, run_dir, EVAL_BASE_FILE)
        if base_path is not None:
            entry.update(base_eval(base_path))
        for key, name in EVAL_FILES.items():
            if (folder / name).is_file():
                entry[key] = (read_json(folder / name, "eval result").get("finetuned")
                              or {}).get("loss")
        if entry:
            per_seed[label] = entry
    return per_seed


def taboo_section(seeds: dict[str, Path]) -> dict:
    per_seed = {}
    for label, folder in seeds.items():
        path = folder / TABOO_FILE
        if not path.is_file():
            continue
        result = read_json(path, "Taboo results")
        models = {}
        for model, summary in result.get("models", {}).items():
            models[model] = {"successes": summary["successes"], "rows": summary["rows"],
                             "summary": rate_string(summary["successes"], summary["rows"]),
                             "unparseable": summary.get("unparseable"),
                             "words_with_a_success": summary.get("words_with_a_success")}
        per_row = result.get("per_row") or {}
        if per_row and set(per_row) >= set(models):
            order = [m for m in models]
            ids = [r["row_id"] for r in per_row[order[0]]]
            for m in order:
                if [r["row_id"] for r in per_row[m]] != ids:
                    raise PipelineError(f"{path}: per_row of '{m}' is not in the same row order "
                                        f"as '{order[0]}'")
            tests = pairwise_mcnemar({m: [bool(r["success"]) for r in per_row[m]] for m in order})
            source = "recomputed from per_row with eval_words.pairwise_mcnemar"
        else:
            tests = result.get("mcnemar", [])
            source = "stored in eval_words.json"
        per_seed[label] = {"num_rows": result.get("num_rows"), "num_words": result.get("num_words"),
                           "models": models, "mcnemar": tests, "mcnemar_source": source}
    if not per_seed:
        return {}
    pairs = {}
    for seed in per_seed.values():
        for test in seed["mcnemar"]:
            pairs.setdefault((test["model_a"], test["model_b"]), []).append(test)
    pooled = [dict(model_a=a, model_b=b, **pooled_mcnemar(tests))
              for (a, b), tests in pairs.items()]
    return {"per_seed": per_seed, "pooled_mcnemar": pooled,
            "pooling": "exact McNemar on the discordant counts summed over seeds"}



def verdict_files(run_dir: Path) -> dict[str, tuple[Path, dict]]:
    """{design: (path, result)} of the run folder's compare_evals.py arm comparisons, designs in
    DESIGN_ORDER, then by name."""
    found = {}
    for path in sorted(run_dir.glob(VERDICT_GLOB)):
        result = read_json(path, "comparison")
        if result.get("kind") != "arm_comparisons":
            continue
        if not isinstance(result.get("comparisons"), dict) or not result["comparisons"]:
            raise PipelineError(f"{path} has no comparisons: not compare_evals.py --arm output")
        design = result.get("label") or path.stem.removeprefix("compare_")
        if design in found:
            raise PipelineError(f"{found[design][0]} and {path} are both design {design}")
        found[design] = (path, result)
    order = {d: i for i, d in enumerate(DESIGN_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def value_range(values: list) -> dict | None:
    """min / max / mean of the values that exist (the seeds'); None if none does."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values),
            "seeds": len(values)}


def seed_stat(result: dict) -> dict:
    """The verdict's numbers of one compare_evals.py seed_level result."""
    tw, pe = result["token_weighted"], result["per_example"]
    return {"seeds": result["seeds"], "mean_delta": tw["mean_delta"], "ci95_t": tw["ci95_t"],
            "ci95_bootstrap": tw["ci95_bootstrap"], "p_value": tw["p_value"],
            "seeds_better": tw["seeds_a_better"], "per_seed_deltas": tw["per_seed_deltas"],
            "labels": result["labels"], "per_example_mean_delta": pe["mean_delta"],
            "per_example_ci95_t": pe["ci95_t"]}


def judge(stat: dict | None, p_holm: float | None) -> str:
    """beats / is worse than / does not beat (or 'cannot be judged' without a seed-level
    interval): the interval and the Holm-adjusted p must agree before a difference is claimed."""
    if stat is None or stat["ci95_t"] is None:
        return "cannot be judged against"
    low, high = stat["ci95_t"]
    if p_holm is not None and p_holm < ALPHA and high < 0:
        return "beats"
    if p_holm is not None and p_holm < ALPHA and low > 0:
        return "is worse than"
    return "does not beat"


def arm_training(folder: Path, design: str, arm: str) -> dict | None:
    path = folder / f"adapter_{design}_{arm}" / "train_metrics.json"
    if not path.is_file():
        return None
    metrics = read_json(path, "train metrics")
    return {key: metrics.get(key) for key in ("optimizer_steps", "rows_seen",
                                              "supervised_tokens_seen", "step_tokens",
                                              "budget_tokens", "init", "preset")}


def arm_score_sources(folder: Path) -> dict[str, Path]:
    """{arm: the file or folder its scores came from} of a seed's arms step (score.py
    --arm-scores, recorded in the continuation manifest's selection)."""
    path = folder / ARMS_MANIFEST_FILE
    if not path.is_file():
        return {}
    selection = read_json(path, "arms manifest").get("selection") or {}
    return {arm: Path(source) for arm, source in (selection.get("arm_scores") or {}).items()}


def score_length_spearman(folder: Path, run_dir: Path, arm: str) -> float | None:
    name = ARM_SCORE_SUMMARY.get(arm)
    source = arm_score_sources(folder).get(arm) if name is None else None
    if source is not None:  # e.g. sae: a predictor's row_scores.jsonl, its summary.json beside it
        name = source.parent.name if source.suffix == ".jsonl" else source.name
    path = split_file(folder, run_dir, f"{name}/summary.json") if name else None
    if path is None:
        return None
    diagnostics = read_json(path, "score summary").get("length_diagnostics") or {}
    return diagnostics.get("spearman_supervised_tokens")


def verdict_design(design: str, path: Path, result: dict, seeds: dict[str, Path], run_dir: Path,
                   control: str, missing: list[str]) -> dict:
    comparisons = result["comparisons"]
    arms = list(result.get("arms") or comparisons)
    labels = next(iter(next(iter(comparisons.values())).values()))["labels"]
    folders = {label: seeds.get(label, run_dir / label) for label in labels}
    entries = {}
    for arm in arms:
        against = comparisons.get(arm, {})
        entry = {"vs": {b: seed_stat(r) for b, r in against.items()}}
        selection, training, losses, rho = [], [], [], []
        for label, folder in folders.items():
            summary_path = folder / ARMS_SUMMARY_FILE
            if summary_path.is_file():
                selection.append((read_json(summary_path, "arms summary").get("arms") or {})
                                 .get(arm))
            else:
                missing.append(f"{label}: {ARMS_SUMMARY_FILE}")
            trained = arm_training(folder, design, arm)
            if trained is None:
                missing.append(f"{label}: adapter_{design}_{arm}/train_metrics.json")
            training.append(trained)
            eval_path = folder / f"eval_{design}_{arm}.json"
            losses.append((read_json(eval_path, "eval result").get("finetuned") or {}).get("loss")
                          if eval_path.is_file() else None)
            rho.append(score_length_spearman(folder, run_dir, arm))
        entry.update({
            "subset_rows": value_range([s.get("rows") for s in selection if s]),
            "subset_supervised_tokens": value_range([s.get("supervised_tokens")
                                                     for s in selection if s]),
            "optimizer_steps": value_range([t.get("optimizer_steps") for t in training if t]),
            "supervised_tokens_trained": value_range([t.get("supervised_tokens_seen")
                                                      for t in training if t]),
            "rows_trained": value_range([t.get("rows_seen") for t in training if t]),
            "eval_loss": value_range(losses),
            "score_length_spearman": value_range(rho),
            "_training": training})
        entries[arm] = entry
    adjusted = holm({arm: e["vs"][control]["p_value"] for arm, e in entries.items()
                     if control in e["vs"]})
    for arm, entry in entries.items():
        entry["p_holm"] = adjusted.get(arm)
        entry["verdict"] = (judge(entry["vs"].get(control), entry["p_holm"])
                            if arm != control else None)
    trainings = [t for e in entries.values() for t in e.pop("_training")]
    matched = (bool(trainings) and all(trainings)
               and len({(t["optimizer_steps"], t["budget_tokens"], t["step_tokens"])
                        for t in trainings}) == 1
               and trainings[0]["budget_tokens"] is not None
               and trainings[0]["step_tokens"] is not None)
    k = (entries.get("attribution") or {}).get("subset_rows")  # the top-k's k
    return {"file": str(path), "seeds": labels, "control": control, "arms": entries,
            "k": int(k["max"]) if k else None, "budget_matched": matched,
            "budget_rule": ("every arm and seed trained the same optimizer steps under the same "
                            "--step-tokens and --budget-tokens (finetune.py's train_metrics.json)"),
            "holm": f"Holm step-down over the {sum(p is not None for p in adjusted.values())} "
                    f"arm(s) compared with {control} in this design",
            "interval": result.get("interval")}


def verdict_section(seeds: dict[str, Path], run_dir: Path, control: str,
                    headline: str) -> tuple[dict, list[str]]:
    missing: list[str] = []
    designs = {design: verdict_design(design, path, result, seeds, run_dir, control, missing)
               for design, (path, result) in verdict_files(run_dir).items()}
    if not designs:
        return {}, []
    for design, d in designs.items():
        if control not in d["arms"]:
            raise PipelineError(f"{d['file']}: no arm '{control}' (--control); arms: "
                                f"{', '.join(d['arms'])}")
    return ({"control": control, "headline": headline, "designs": designs,
             "sentence": verdict_sentence(designs, control, headline)}, missing)


# ---------------------------------------------------------------------------------------------
# the Taboo verdict (compare_evals.py --metric success)

TABOO_VERDICT_KIND = "success_comparisons"
TABOO_BASE_FILE = "eval_words_base.json"


def taboo_verdict_files(run_dir: Path) -> dict[str, tuple[Path, dict]]:
    found = {}
    for path in sorted(run_dir.glob(VERDICT_GLOB)):
        result = read_json(path, "comparison")
        if result.get("kind") != TABOO_VERDICT_KIND:
            continue
        if not isinstance(result.get("comparisons"), dict) or not result["comparisons"]:
            raise PipelineError(f"{path} has no comparisons: not compare_evals.py --metric "
                                "success output")
        found[result.get("label") or path.stem.removeprefix("compare_")] = (path, result)
    return found


def design_and_k(label: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(.+)_k(\d+)", label)
    return (match.group(1), int(match.group(2))) if match else (label, None)


def taboo_base(seeds: dict[str, Path], run_dir: Path) -> dict:
    """{"model (where)": {rule: successes, rows}} of the eval_words.py runs before any arm (once
    per split): the base model and, where evaluated, the base adapter the continue design starts
    from."""
    out = {}
    for label, folder in [("split", run_dir), *seeds.items()]:
        path = folder / TABOO_BASE_FILE
        if path.is_file():
            models = read_json(path, "Taboo base results").get("models") or {}
            for name, model in models.items():
                shown = "base model" if name == "base" else name.replace("_", " ")
                out[f"{shown} ({label})"] = {
                    rule: {"successes": r["successes"], "rows": r["rows"]}
                    for rule, r in (model.get("by_rule") or {}).items()}
    return out


def taboo_judge(interval) -> str:
    if interval is None:
        return "cannot be judged against"
    return "beats" if interval[0] > 0 else "is worse than" if interval[1] < 0 else "does not beat"


def taboo_verdict_section(seeds: dict[str, Path], run_dir: Path, headline: str) -> dict:
    files = taboo_verdict_files(run_dir)
    if not files:
        return {}
    entries = []
    for label, (path, result) in files.items():
        design, k = design_and_k(label)
        control = result["baselines"][0]
        for rule, matrix in result["comparisons"].items():
            for arm, counts in result["successes"][rule].items():
                stat = (matrix.get(arm) or {}).get(control)
                rd = stat["rate_difference"] if stat else None
                entries.append({
                    "file": str(path), "label": label, "design": design, "k": k, "rule": rule,
                    "primary": rule == result.get("primary_rule"), "arm": arm,
                    "control": control,
                    "successes": {s: c["successes"] for s, c in counts.items()},
                    "rows": {s: c["rows"] for s, c in counts.items()},
                    "mean_delta": rd["mean_delta"] if rd else None,
                    "ci95_t": rd["ci95_t"] if rd else None,
                    "seeds_better": rd["seeds_a_better"] if rd else None,
                    "seeds": stat["seeds"] if stat else len(counts),
                    "p_mcnemar": ({s: x["p_mcnemar"] for s, x in stat["per_seed"].items()}
                                  if stat else None),
                    "verdict": taboo_judge(rd["ci95_t"]) if rd else None})
    clauses = []
    for e in entries:
        if e["arm"] == headline and e["primary"] and e["verdict"]:
            where = f"{DESIGN_PHRASE.get(e['design'], 'in design ' + e['design'])}"
            where += f" at k = {e['k']}" if e["k"] else ""
            clauses.append(f"{e['verdict']} {e['control'].replace('_', ' ')} {where} "
                           f"(Δ success rate {e['mean_delta']:+.3f} {fmt_interval(e['ci95_t'])} "
                           f"over {e['seeds']} seeds, {e['seeds_better']}/{e['seeds']} better; "
                           f"{e['rule']} rule)")
    sentence = (f"Taboo: {headline.replace('_', ' ').capitalize()} " + "; ".join(clauses) + "."
                if clauses else f"Taboo: no comparison of arm '{headline}' with a control.")
    return {"entries": entries, "base": taboo_base(seeds, run_dir), "sentence": sentence,
            "interval": next(iter(files.values()))[1].get("interval"),
            "test": next(iter(files.values()))[1].get("test")}


def render_taboo_verdict(tv: dict) -> list[str]:
    lines = ["## Taboo verdict", "", f"**Taboo verdict.** {tv['sentence']}", "",
             "Successes = won eval episodes per seed (seeds in folder order) out of the eval "
             "episodes; Δ = arm minus control success rate (> 0: the arm is better), mean over "
             f"seeds with its 95% {tv['interval']}; McNemar: {tv['test']}, one p per seed.", ""]
    for where, rules in tv["base"].items():
        lines.append(f"- {where}: " + ", ".join(
            f"{rule} rule {r['successes']}/{r['rows']}" for rule, r in rules.items()))
    if tv["base"]:
        lines.append("")
    header = ["design", "k", "rule", "arm", "successes per seed", "Δ success rate vs control "
              "[95% CI over seeds]", "seeds better", "McNemar p per seed"]
    rows = []
    for e in sorted(tv["entries"], key=lambda e: (not e["primary"], e["rule"], e["design"],
                                                  e["k"] or 0)):
        n = sorted(set(e["rows"].values()))
        per_seed = ", ".join(str(v) for v in e["successes"].values()) + \
            f" / {'/'.join(map(str, n))}"
        delta = (f"{e['mean_delta']:+.3f} {fmt_interval(e['ci95_t'])}"
                 if e["mean_delta"] is not None else f"(control: {e['control']})")
        p = ", ".join(fmt_p(v) for v in e["p_mcnemar"].values()) if e["p_mcnemar"] else ""
        rows.append([e["design"], e["k"] if e["k"] else "", e["rule"], e["arm"], per_seed, delta,
                     f"{e['seeds_better']}/{e['seeds']}" if e["seeds_better"] is not None
                     else "", p])
    return lines + table(header, rows)


def fmt_interval(interval) -> str:
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "[no interval]"


def fmt_p(p) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def verdict_sentence(designs: dict, control: str, headline: str) -> str:
    """One sentence from the numbers: the headline arm against the control, per design."""
    clauses, verbs = [], []
    for design, d in designs.items():
        entry = d["arms"].get(headline)
        stat = (entry or {}).get("vs", {}).get(control)
        if stat is None:
            continue
        phrase = DESIGN_PHRASE.get(design, f"in design {design}")
        seeds = f"{stat['seeds']} seed{'s' if stat['seeds'] != 1 else ''}"
        clauses.append((entry["verdict"], phrase,
                        f"{stat['mean_delta']:+.4f} {fmt_interval(stat['ci95_t'])} over {seeds}",
                        f"{stat['seeds_better']}/{stat['seeds']} seeds better; Holm-adjusted "
                        f"p = {fmt_p(entry['p_holm'])}"))
        verbs.append(entry["verdict"])
    if not clauses:
        return (f"No verdict: no design compares arm '{headline}' with '{control}' "
                f"({', '.join(designs)}).")
    k = next((d["k"] for d in designs.values() if d["k"]), None)
    name = headline.replace("_", " ").capitalize() + (f" (top-{k})" if k and headline.startswith(
        "attribution") and headline != "attribution_bottom" else "")
    matched = all(d["budget_matched"] for d in designs.values())
    control_text = (f"budget-matched {control.replace('_', ' ')} data" if matched
                    else f"{control.replace('_', ' ')} data (not budget-matched: see the steps "
                         "and tokens below)")
    if len(set(verbs)) == 1:
        body = "; ".join(f"{delta} {phrase} ({rest})" for _, phrase, delta, rest in clauses)
        return (f"{name} {verbs[0]} {control_text} here: Δ eval loss vs {control} {body}.")
    # one clause per verdict, its designs joined by "and", in the order they first appear
    groups = {}
    for verb, phrase, delta, rest in clauses:
        groups.setdefault(verb, []).append(f"{phrase} (Δ eval loss vs {control} {delta}; {rest})")
    parts = [f"{verb} {control_text if i == 0 else 'it'} " + " and ".join(where)
             for i, (verb, where) in enumerate(groups.items())]
    return f"{name} " + ", but ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:]) + "."


def sae_predictor_folders(seeds: dict[str, Path], run_dir: Path) -> list[Path]:
    """The split folders' predictor folders: the run folder's, and the seeds' (per_seed_split)."""
    found = {d for folder in [run_dir, *seeds.values()] for d in folder.glob(SAE_PREDICTOR_GLOB)
             if (d / "summary.json").is_file()}
    return sorted(found, key=lambda d: (seed_sort_key(d.parent), d.name))


def sae_predictor_entry(folder: Path, run_dir: Path) -> dict:
    """One predictor: its out-of-fold numbers (train_bidir_classifier.py), and with planted rows
    the AUC of its out-of-fold prediction and of the attribution score it predicts."""
    summary = read_json(folder / "summary.json", "SAE predictor summary")
    oof = summary.get("out_of_fold")
    if not isinstance(oof, dict):
        raise PipelineError(f"{folder / 'summary.json'} has no out_of_fold: not "
                            "train_bidir_classifier.py's output")
    entry = {"folder": str(folder), "pooling": summary.get("pooling"),
             "rows": summary.get("n_scored"), "spearman": oof.get("spearman"),
             "k": oof.get("k"), "top_k_overlap": oof.get("top_k_overlap"),
             "top_k_precision": oof.get("top_k_precision"),
             "top_k_chance": oof.get("top_k_precision_random_expectation"),
             "score_length_spearman": (summary.get("length_diagnostics") or {}).get(
                 "spearman_supervised_tokens"),
             "planted_auc": None, "attribution_planted_auc": None}
    corruption = train_base_corruption(folder.parent, run_dir)
    rows_path = folder / "row_scores.jsonl"
    if corruption is not None and rows_path.is_file():
        rows = read_jsonl(rows_path)
        entry["planted_auc"] = planted_signal(corruption, None, rows)["sae_predictor"][
            "auc_clean_vs_corrupted"]
        truth = [(r["true_score"], corruption.get(r["row_id"])) for r in rows
                 if r.get("true_score") is not None]
        entry["attribution_planted_auc"] = auc_mann_whitney(
            [t for t, c in truth if c is False], [t for t, c in truth if c is True])
    return entry


def sae_predictor_section(seeds: dict[str, Path], run_dir: Path) -> dict:
    """{split label: {"predictors": {folder name: entry}, "comparison": line}}; which arm drew
    from which predictor, per seed, from the arms step's record."""
    splits: dict[str, dict] = {}
    for folder in sae_predictor_folders(seeds, run_dir):
        label = "run" if folder.parent == run_dir else folder.parent.name
        entry = sae_predictor_entry(folder, run_dir)
        entry["used_by"] = {}
        for seed, seed_folder in seeds.items():
            split = seed_folder if (seed_folder / folder.name).is_dir() else run_dir
            if split != folder.parent:
                continue
            for arm, source in arm_score_sources(seed_folder).items():
                if source.parent.name == folder.name:
                    entry["used_by"].setdefault(arm, []).append(seed)
        splits.setdefault(label, {"predictors": {}})["predictors"][folder.name] = entry
    for split in splits.values():
        split["comparison"] = compare_poolings(split["predictors"], run_dir)
    return splits


POOLING_RESAMPLES = 2000


def compare_poolings(predictors: dict, run_dir: Path) -> str | None:
    """Two poolings' out-of-fold predictions of the same rows, compared by a paired bootstrap
    over the rows (95%): the difference in Spearman with the attribution score and, with planted
    rows, in AUC. One fit each on a few hundred rows moves by a few hundredths from machine to
    machine, so only a difference whose interval excludes 0 is named as better. None with one
    pooling or without the row files."""
    import numpy as np

    by_pooling = {e["pooling"]: e for e in predictors.values() if e["pooling"]}
    if len(by_pooling) < 2:
        return None
    (name_a, a), (name_b, b) = sorted(by_pooling.items(), key=lambda kv: -(kv[1]["spearman"]
                                                                          or -np.inf))[:2]
    rows = {}
    for name, entry in ((name_a, a), (name_b, b)):
        path = Path(entry["folder"]) / "row_scores.jsonl"
        if not path.is_file():
            return None
        rows[name] = {r["row_id"]: r for r in read_jsonl(path)}
    ids = [i for i, r in rows[name_a].items() if i in rows[name_b]
           and r.get("true_score") is not None and r.get("predicted_score") is not None
           and rows[name_b][i].get("predicted_score") is not None]
    if len(ids) < 5:
        return None
    pred_a = np.array([rows[name_a][i]["predicted_score"] for i in ids])
    pred_b = np.array([rows[name_b][i]["predicted_score"] for i in ids])
    truth = np.array([rows[name_a][i]["true_score"] for i in ids])
    def spearman_gap(r):
        values = [spearman(p[r], truth[r]) for p in (pred_a, pred_b)]
        return None if None in values else values[0] - values[1]

    parts = [pooling_difference("attribution-rank Spearman", name_a, name_b, ids, spearman_gap)]
    corruption = train_base_corruption(Path(a["folder"]).parent, run_dir)
    if corruption is not None:
        clean = np.array([corruption.get(i) is False for i in ids])
        planted = np.array([corruption.get(i) is True for i in ids])

        def auc_gap(r):
            gaps = [auc_mann_whitney(p[r][clean[r]], p[r][planted[r]]) for p in (pred_a, pred_b)]
            return None if None in gaps else gaps[0] - gaps[1]

        parts.append(pooling_difference("planted AUC", name_a, name_b, ids, auc_gap))
        reference = next((e["attribution_planted_auc"] for e in by_pooling.values()
                          if e["attribution_planted_auc"] is not None), None)
        if reference is not None:
            parts[-1] += f"; the attribution score itself: AUC {reference:.3f}"
    return (f"Out of fold, `{name_a}` - `{name_b}` (paired bootstrap over {len(ids)} rows, "
            "95%): " + "; ".join(parts) + ".")


def pooling_difference(what: str, name_a: str, name_b: str, ids: list, statistic) -> str:
    """`what` difference with its percentile interval over row resamples, and what it shows.
    A resample where the statistic is undefined (a constant prediction, no planted row) is
    skipped, which scipy.stats.bootstrap cannot do, hence the loop."""
    import numpy as np

    value = statistic(np.arange(len(ids)))
    if value is None or not np.isfinite(value):
        return f"{what}: undefined"
    rng = np.random.default_rng(0)
    draws = [statistic(rng.integers(0, len(ids), len(ids))) for _ in range(POOLING_RESAMPLES)]
    draws = np.array([d for d in draws if d is not None and np.isfinite(d)])
    low, high = np.percentile(draws, [2.5, 97.5])
    shown = (f"`{name_a}` better" if low > 0 else f"`{name_b}` better" if high < 0
             else "no difference shown")
    return f"{what} {value:+.3f} [{low:+.3f}, {high:+.3f}], {shown}"


def arm_subset_diagnostics(arms_summary: dict, finite_scores: list[float]) -> dict:
    """The top-k / matched-random diagnostics from the arms step's summary, where the scores
    file carries no subset flags (score.py --scores-only, then --scores-from per seed)."""
    arms = arms_summary.get("arms", {})
    top, random_k = arms.get("attribution"), arms.get("random")
    if not top:
        return {}
    k = top["rows"]
    return {"k": k, "top_k_cut": finite_scores[-k] if 0 < k <= len(finite_scores) else None,
            "mean_score_top_k": top.get("mean_score"),
            "mean_score_matched_random_k": (random_k or {}).get("mean_score"),
            "matched_random_rows": (random_k or {}).get("rows", 0),
            "supervised_tokens_top_k": top.get("supervised_tokens", 0),
            "supervised_tokens_matched_random_k": (random_k or {}).get("supervised_tokens", 0)}


def attribution_section(seeds: dict[str, Path], run_dir: Path) -> tuple[dict, dict]:
    """(attribution diagnostics, planted-signal results); also keeps the per-row data for plots
    under the private key '_rows'."""
    import numpy as np

    per_seed, planted, top_sets = {}, {}, {}
    for label, folder in seeds.items():
        scores_path = folder / SCORES_FILE
        if not scores_path.is_file():  # the verdict's layout: the split's scores, no subsets
            scores_path = split_file(folder, run_dir, str(SPLIT_SCORES_FILE)) or scores_path
        sae_path = folder / SAE_ROWS_FILE
        corruption = train_base_corruption(folder, run_dir)
        entry = {}
        rows = read_jsonl(scores_path) if scores_path.is_file() else None
        if rows is not None:
            finite = [r for r in rows if r.get("score") is not None and math.isfinite(r["score"])]
            top = [r for r in rows if r.get("in_top_k")]
            random_k = [r for r in rows if r.get("in_matched_random_k")]
            top_scores = [r["score"] for r in top if r.get("score") is not None]
            entry.update({
                "n_total": len(rows), "n_finite": len(finite),
                "finite_coverage": len(finite) / len(rows) if rows else None,
                "k": len(top), "top_k_cut": min(top_scores) if top_scores else None,
                "mean_score_top_k": float(np.mean(top_scores)) if top_scores else None,
                "mean_score_matched_random_k": float(np.mean([r["score"] for r in random_k]))
                if random_k else None,
                "matched_random_rows": len(random_k),
                # the sum loss favours long rows: the subsets' token counts show the length bias
                "supervised_tokens_top_k": sum(r.get("num_supervised_tokens", 0) for r in top),
                "supervised_tokens_matched_random_k": sum(r.get("num_supervised_tokens", 0)
                                                          for r in random_k),
                "_rows": rows,
            })
            arms_path = folder / ARMS_SUMMARY_FILE
            if not top and arms_path.is_file():  # the verdict's layout: the arms step's subsets
                entry.update(arm_subset_diagnostics(read_json(arms_path, "arms summary"),
                                                    sorted(r["score"] for r in finite)))
            summary_path = scores_path.parent / "summary.json"
            if summary_path.is_file():
                summary = read_json(summary_path, "score summary")
                check_scores_belong(summary, summary_path, manifest_of(folder, run_dir))
                entry["score_settings"] = {key: summary.get(key) for key in (
                    "score_mode", "preconditioning_mode", "projection_dim", "tokenization_mode")}
            entry["scores_file"] = str(scores_path)
            if any("in_top_k" in r for r in rows):
                top_sets[label] = {r["row_id"] for r in top}
        sae_rows = read_jsonl(sae_path) if sae_path.is_file() else None
        if sae_rows is not None:
            kept = [r for r in sae_rows if r.get("predicted_rank") is not None
                    and r.get("true_rank") is not None]
            entry["sae_predictor"] = {
                "rows": len(kept),
                "spearman_predicted_vs_attribution_rank": spearman(
                    [r["true_rank"] for r in kept], [r["predicted_rank"] for r in kept]),
                "_rows": kept}
        if entry:
            per_seed[label] = entry
        if corruption is not None:
            planted[label] = planted_signal(corruption, rows, sae_rows)
            planted[label]["manifest"] = str(manifest_of(folder, run_dir))
    overlap = {}
    labels = list(top_sets)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            overlap[f"{a} vs {b}"] = {"jaccard": jaccard(top_sets[a], top_sets[b]),
                                      "shared": len(top_sets[a] & top_sets[b]),
                                      "k_a": len(top_sets[a]), "k_b": len(top_sets[b])}
    return {"per_seed": per_seed, "top_k_jaccard": overlap}, planted


def planted_signal(corruption: dict, rows, sae_rows) -> dict:
    out = {"train_base_rows": len(corruption),
           "corrupted_rows": sum(corruption.values()),
           "positive_class": "clean (not corrupted)"}
    if rows is not None:
        scored = [(r["score"], corruption.get(r["row_id"])) for r in rows
                  if r.get("score") is not None and math.isfinite(r["score"])]
        unknown = [r["row_id"] for r in rows if r["row_id"] not in corruption]
        if unknown:
            raise PipelineError(f"attribution row {unknown[0]} is not in the manifest's "
                                "train_base: scores and manifest come from different runs")
        clean = [s for s, c in scored if not c]
        bad = [s for s, c in scored if c]
        in_top = [r for r in rows if r.get("in_top_k")]
        in_random = [r for r in rows if r.get("in_matched_random_k")]
        rate = len(bad) / len(scored) if scored else None
        out["attribution"] = {
            "auc_clean_vs_corrupted": auc_mann_whitney(clean, bad),
            "scored_clean": len(clean), "scored_corrupted": len(bad),
            "unscored_rows": len(rows) - len(scored)}
        if any("in_top_k" in r for r in rows):  # scores with subsets (not the verdict's layout)
            out["attribution"].update({
                "corrupted_in_top_k": sum(corruption[r["row_id"]] for r in in_top),
                "top_k": len(in_top),
                "corrupted_in_matched_random_k": sum(corruption[r["row_id"]] for r in in_random),
                "matched_random_k": len(in_random),
                "expected_by_chance": None if rate is None else rate * len(in_top)})
    if sae_rows is not None:
        scored = [(r["predicted_score"], corruption.get(r["row_id"], None)) for r in sae_rows
                  if r.get("predicted_score") is not None]
        out["sae_predictor"] = {
            "auc_clean_vs_corrupted": auc_mann_whitney([s for s, c in scored if c is False],
                                                       [s for s, c in scored if c is True]),
            "score": "out-of-fold predicted_score (row_scores.jsonl)",
            "rows": sum(c is not None for _, c in scored)}
    return out


# ---------------------------------------------------------------------------------------------
# plots


def plot_smoltalk(path: Path, smoltalk: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    entries = []  # (label, result)
    for name, comp in smoltalk.items():
        for label, result in comp["per_seed"].items():
            entries.append((f"{name}: {label}", result))
        if "token_weighted" in comp["pooled"]:
            entries.append((f"{name}: pooled", comp["pooled"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(entries)), squeeze=False)
    for ax, key in zip(axes[0], ("token_weighted", "per_example")):
        for y, (label, result) in enumerate(entries):
            r = result[key]
            ax.errorbar(r["delta"], y, xerr=[[r["delta"] - r["ci95"][0]],
                                             [r["ci95"][1] - r["delta"]]],
                        fmt="s" if label.endswith("pooled") else "o", capsize=3,
                        color="black" if label.endswith("pooled") else "tab:blue")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(entries)), [e[0] for e in entries])
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("loss delta, NLL per token")
        ax.set_title(key.replace("_", "-"))
    fig.suptitle("top-k minus matched random, 95% bootstrap CI (< 0: top-k better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_verdict(path: Path, verdict: dict) -> None:
    """One panel per design: each seed's token-weighted delta against the control (a dot per seed
    per arm), the mean over seeds and its 95% t-interval (a bar)."""
    import matplotlib.pyplot as plt

    control = verdict["control"]
    designs = verdict["designs"]
    n_arms = max(len(d["arms"]) for d in designs.values())
    fig, axes = plt.subplots(1, len(designs), figsize=(5.5 * len(designs), 1.2 + 0.5 * n_arms),
                             squeeze=False, sharey=False)
    for ax, (design, d) in zip(axes[0], designs.items()):
        arms = [a for a in d["arms"] if control in d["arms"][a]["vs"]]
        for y, arm in enumerate(arms):
            stat = d["arms"][arm]["vs"][control]
            deltas = stat["per_seed_deltas"]
            jitter = [(i - (len(deltas) - 1) / 2) * 0.08 for i in range(len(deltas))]
            ax.scatter(deltas, [y + j for j in jitter], s=18, color="tab:blue", zorder=3)
            if stat["ci95_t"]:
                low, high = stat["ci95_t"]
                ax.errorbar(stat["mean_delta"], y, xerr=[[stat["mean_delta"] - low],
                                                         [high - stat["mean_delta"]]],
                            fmt="s", color="black", capsize=4, zorder=2)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(arms)), arms)
        ax.invert_yaxis()
        ax.set_xlabel(f"eval loss delta vs {control} (NLL/token; < 0: arm better)")
        ax.set_title(f"{design}: {len(d['seeds'])} seeds (dots), mean and 95% t-CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_taboo(path: Path, taboo: dict) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = list(taboo["per_seed"])
    models = sorted({m for s in taboo["per_seed"].values() for m in s["models"]})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(seeds) * len(models)), 4))
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        rates = [(taboo["per_seed"][s]["models"].get(model) or {}) for s in seeds]
        values = [r["successes"] / r["rows"] if r.get("rows") else np.nan for r in rates]
        ax.bar(np.arange(len(seeds)) + j * width, values, width, label=model)
    ax.set_xticks(np.arange(len(seeds)) + width * (len(models) - 1) / 2, seeds)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Taboo word-guessing success per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(path: Path, label: str, entry: dict, corruption: dict | None) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in entry["_rows"] if r.get("score") is not None and math.isfinite(r["score"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges([r["score"] for r in rows], bins=50) if rows else 50
    if corruption is not None:
        for flag, name in ((False, "clean"), (True, "corrupted")):
            values = [r["score"] for r in rows if corruption.get(r["row_id"]) is flag]
            if values:
                ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
        ax.legend()
    else:
        ax.hist([r["score"] for r in rows], bins=bins, color="tab:blue")
    if entry.get("top_k_cut") is not None:
        ax.axvline(entry["top_k_cut"], color="red", ls="--",
                   label=f"top-{entry['k']} cut")
        ax.legend()
    ax.set_xlabel("attribution score")
    ax.set_ylabel("train rows")
    ax.set_title(f"{label}: {entry['n_finite']}/{entry['n_total']} rows with a finite score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sae(path: Path, label: str, sae: dict) -> None:
    import matplotlib.pyplot as plt

    rows = sae["_rows"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([r["true_rank"] for r in rows], [r["predicted_rank"] for r in rows], s=4, alpha=0.4)
    rho = sae["spearman_predicted_vs_attribution_rank"]
    ax.set_xlabel("attribution rank (1 = top)")
    ax.set_ylabel("SAE-predicted rank (out-of-fold)")
    ax.set_title(f"{label}: Spearman {rho:.3f}" if rho is not None else label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# markdown


def fmt(value, digits=4, signed=False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def ci(result: dict) -> str:
    low, high = result["ci95"]
    star = " *" if result["ci_excludes_zero"] else ""
    return f"{result['delta']:+.5f} [{low:+.5f}, {high:+.5f}]{star}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_header(report: dict) -> list[str]:
    lines = [f"# Report: {report['run_dir']}", ""]
    if report["verdict"]:
        lines += [f"**Verdict.** {report['verdict']['sentence']}", ""]
    return lines + ["Seeds: " + ", ".join(f"`{k}` ({v})" for k, v in report["seeds"].items()),
                    ""]


def fmt_range(r: dict | None, digits: int = 0) -> str:
    """A value over seeds: one number when every seed has it, else min-max."""
    if r is None:
        return "n/a"
    show = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{round(v)}")
    return show(r["min"]) if r["min"] == r["max"] else f"{show(r['min'])}-{show(r['max'])}"


def render_verdict(verdict: dict, plots: dict[str, str]) -> list[str]:
    control = verdict["control"]
    lines = ["## Verdict", "",
             f"Δ = arm minus {control}, eval loss in NLL per supervised token (< 0: the arm is "
             "better), the mean over seeds of each seed's paired token-weighted delta, with its "
             "95% t-interval over seeds (the seeds are the unit: compare_evals.py seed_level). "
             f"Holm p: Holm-adjusted over the arms compared with {control} in that design. "
             "Subset = the rows the arm selected; trained = what finetune.py saw (rows counted "
             "with repeats; steps and supervised tokens: equal in every arm when the budget is "
             "matched). Spearman: the "
             "arm's score against supervised tokens over the pool. Ranges are min-max over "
             "seeds.", ""]
    others = [b for b in VERDICT_BASELINES if b != control]
    header = (["design", "arm", f"Δ vs {control} [95% CI over seeds]", "seeds better", "Holm p",
               "per-example Δ"] + [f"Δ vs {b}" for b in others]
              + ["subset rows", "subset sup. tokens", "steps", "rows trained",
                 "sup. tokens trained", "eval loss", "score-length Spearman"])
    rows = []
    for design, d in verdict["designs"].items():
        for arm, e in d["arms"].items():
            stat = e["vs"].get(control)
            main = ([f"{stat['mean_delta']:+.4f} {fmt_interval(stat['ci95_t'])}",
                     f"{stat['seeds_better']}/{stat['seeds']}", fmt_p(e["p_holm"]),
                     f"{stat['per_example_mean_delta']:+.4f}"] if stat
                    else ["(control)" if arm == control else "n/a", "", "", ""])
            vs = [f"{e['vs'][b]['mean_delta']:+.4f} {fmt_interval(e['vs'][b]['ci95_t'])}"
                  if b in e["vs"] else "" for b in others]
            rows.append([design, arm, *main, *vs, fmt_range(e["subset_rows"]),
                         fmt_range(e["subset_supervised_tokens"]), fmt_range(e["optimizer_steps"]),
                         fmt_range(e["rows_trained"]), fmt_range(e["supervised_tokens_trained"]),
                         fmt_range(e["eval_loss"], 4),
                         fmt_range(e["score_length_spearman"], 3)])
    lines += table(header, rows)
    for design, d in verdict["designs"].items():
        budget = ("budget-matched: " + d["budget_rule"] if d["budget_matched"] else
                  "NOT budget-matched: the arms' optimizer steps, --step-tokens or "
                  "--budget-tokens differ (or a train_metrics.json is missing)")
        lines.append(f"- {design}: {len(d['seeds'])} seeds ({', '.join(d['seeds'])}), "
                     f"{d['file']}; {budget}; {d['holm']}.")
    lines.append("")
    if "verdict" in plots:
        lines += [f"![verdict: one point per seed per arm]({plots['verdict']})", ""]
    return lines


def render_comparison(name: str, comp: dict) -> list[str]:
    lines = [f"### {name} selection: `{comp['a']}` minus `{comp['b']}`", "",
             "Delta = A - B in NLL per token (< 0: the selected subset is better); 95% "
             "paired bootstrap CI over eval rows (compare_evals.py); * = CI excludes 0.", ""]
    pooled = comp["pooled"]
    entries = list(comp["per_seed"].items())
    if "token_weighted" in pooled:
        entries.append(("pooled", pooled))
    rows = [[label, r["rows"], r["supervised_tokens"], ci(r["token_weighted"]),
             ci(r["per_example"]), f"{r['fraction_rows_a_better']:.3f}"] for label, r in entries]
    lines += table(["seed", "rows", "tokens", "token-weighted delta [95% CI]",
                    "per-example delta [95% CI]", "frac rows A better"], rows)
    over = pooled["over_seeds"]
    pooled_note = ("Pooled = all seeds' paired rows concatenated (bootstrap over rows; seed "
                   "variance not included). " if "token_weighted" in pooled
                   else f"No pooled comparison: {pooled.get('skipped', 'not found')}. ")
    lines += [f"{pooled_note}Mean of per-seed token-weighted deltas "
              f"{over['mean_token_weighted_delta']:+.5f}; top-k better in "
              f"{over['seeds_a_better_token_weighted']}/{over['seeds']} seeds.", ""]
    level = pooled.get("seed_level")
    if level:
        tw = level["token_weighted"]
        lines += [f"Seeds as the unit (compare_evals.py seed_level): mean token-weighted delta "
                  f"{tw['mean_delta']:+.5f}, 95% t-interval over {level['seeds']} seeds "
                  f"{fmt_interval(tw['ci95_t'])}, two-level bootstrap "
                  f"{fmt_interval(tw['ci95_bootstrap'])}, t-test p {fmt_p(tw['p_value'])}.", ""]
    return lines + render_per_category(comp)


def render_per_category(comp: dict) -> list[str]:
    seeds = list(comp["per_seed"])
    pooled = comp["pooled"].get("per_category", {})
    categories = sorted(set(pooled) | {c for s in seeds
                                       for c in comp["per_seed"][s]["per_category"]})
    if not categories:
        return []
    rows = [[cat, (pooled.get(cat) or {}).get("rows", "n/a"),
             fmt((pooled.get(cat) or {}).get("token_weighted_delta"), 5, True)]
            + [fmt(comp["per_seed"][s]["per_category"].get(cat, {}).get("token_weighted_delta"),
                   5, True) for s in seeds]
            for cat in categories]
    return (["Per-category token-weighted delta:", ""]
            + table(["category", "rows (pooled)", "pooled"] + seeds, rows))


def render_eval_losses(losses: dict) -> list[str]:
    if not losses:
        return []
    columns = [("base_model", "base model"), ("base_adapter", "base adapter"),
               ("top_k", "top-k"), ("matched_random_k", "random-k"),
               ("sae_top_k", "SAE top-k"), ("sae_matched_random_k", "SAE random-k")]
    shown = [(key, head) for key, head in columns if any(key in e for e in losses.values())]
    rows = [[label] + [fmt(e.get(key)) for key, _ in shown] for label, e in losses.items()]
    return (["Eval loss (NLL per supervised token; base model and base adapter from the split's "
             "eval_base.json, computed once per split):", ""]
            + table(["seed"] + [head for _, head in shown], rows))


def render_smoltalk(report: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## SmolTalk: top-k vs matched random (eval loss)", ""]
    if not report["smoltalk"]:
        lines += [report["smoltalk_missing"], ""]
    for name, comp in report["smoltalk"].items():
        lines += render_comparison(name, comp)
    if "smoltalk" in plots:
        lines += [f"![SmolTalk deltas]({plots['smoltalk']})", ""]
    return lines + render_eval_losses(report["eval_loss"])


def render_taboo(taboo: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Taboo: word-guessing success", ""]
    if not taboo:
        return lines + ["No eval_words.json found.", ""]
    models = sorted({m for s in taboo["per_seed"].values() for m in s["models"]})
    rows = [[label, seed["num_rows"], seed["num_words"]]
            + [seed["models"][m]["summary"] if m in seed["models"] else "n/a" for m in models]
            for label, seed in taboo["per_seed"].items()]
    lines += ["Successes / eval rows per model (eval_words.py's form); words = distinct "
              "target words among the rows.", ""]
    lines += table(["seed", "rows", "words"] + models, rows)
    rows = [[label, f"{t['model_a']} vs {t['model_b']}", t["a_success_b_fail"],
             t["a_fail_b_success"], f"{t['p_value']:.4g}"]
            for label, seed in taboo["per_seed"].items() for t in seed["mcnemar"]]
    rows += [[f"pooled ({t['seeds']} seed(s))", f"{t['model_a']} vs {t['model_b']}",
              t["a_success_b_fail"], t["a_fail_b_success"], f"{t['p_value']:.4g}"]
             for t in taboo["pooled_mcnemar"]]
    lines += ["Exact McNemar (two-sided binomial on discordant rows; b = only the first "
              "model right, c = only the second). Pooled: b and c summed over seeds.", ""]
    lines += table(["seed", "pair", "b", "c", "p"], rows)
    if "taboo" in plots:
        lines += [f"![Taboo]({plots['taboo']})", ""]
    return lines


def render_attribution(attribution: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Attribution diagnostics", ""]
    if not attribution["per_seed"]:
        lines += ["No attribution/train_scores.jsonl or sae_predictor/row_scores.jsonl found.",
                  ""]
    rows = [[label, e["n_finite"], e["n_total"], fmt(e["finite_coverage"]), e["k"],
             fmt(e["top_k_cut"], 4), fmt(e["mean_score_top_k"]),
             fmt(e["mean_score_matched_random_k"]), e["matched_random_rows"],
             f"{e['supervised_tokens_top_k']} / {e['supervised_tokens_matched_random_k']}"]
            for label, e in attribution["per_seed"].items() if "n_total" in e]
    if rows:
        lines += table(["seed", "finite", "rows", "finite coverage", "k", "top-k cut",
                        "mean score top-k", "mean score random-k", "random rows",
                        "supervised tokens top / random"], rows)
    if attribution["top_k_jaccard"]:
        lines += ["Top-k overlap between seeds:", ""]
        lines += table(["pair", "shared", "k", "Jaccard"],
                       [[pair, o["shared"], f"{o['k_a']}/{o['k_b']}", fmt(o["jaccard"])]
                        for pair, o in attribution["top_k_jaccard"].items()])
    sae_rows = [[label, e["sae_predictor"]["rows"],
                 fmt(e["sae_predictor"]["spearman_predicted_vs_attribution_rank"])]
                for label, e in attribution["per_seed"].items() if "sae_predictor" in e]
    if sae_rows:
        lines += ["SAE predictor (out-of-fold) vs attribution rank:", ""]
        lines += table(["seed", "rows", "Spearman"], sae_rows)
    return lines + [line for key, path in plots.items() if key.startswith(("scores:", "sae:"))
                    for line in (f"![{key}]({path})", "")]


def render_sae_predictors(section: dict) -> list[str]:
    lines = ["## SAE predictor", "",
             "A ridge predictor of the attribution rank from per-row SAE features "
             "(train_bidir_classifier.py), one per pooling of the features: all = every prompt "
             "and completion token (the seed project's), completion = the supervised tokens. "
             "Out of fold: every row predicted by a model that never saw its group. Top-k "
             "overlap: of its top-k, how many are in the attribution top-k (chance in brackets). "
             "AUC: clean (positive) vs planted corrupted rows, 0.5 = chance. Used by: the arm "
             "that drew its top-k from this predictor, and in how many seeds. The line under the "
             "table compares point estimates (one fit per pooling on one split, no interval).",
             ""]
    rows = []
    for label, split in section.items():
        for name, e in split["predictors"].items():
            chance = e["top_k_chance"] * e["k"] if e["top_k_chance"] is not None else None
            used = ", ".join(f"{arm} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})"
                             for arm, seeds in e["used_by"].items()) or "-"
            rows.append([label, name, e["pooling"] or "n/a", fmt(e["rows"]),
                         fmt(e["spearman"], 3),
                         f"{e['top_k_overlap']}/{e['k']} ({fmt(chance, 1)})"
                         if e["k"] else "n/a",
                         fmt(e["planted_auc"], 3), fmt(e["attribution_planted_auc"], 3),
                         fmt(e["score_length_spearman"], 3), used])
    lines += table(["split", "predictor", "pooling", "rows", "out-of-fold Spearman",
                    "top-k overlap", "planted AUC", "attribution planted AUC",
                    "score-length Spearman", "used by"], rows)
    for label, split in section.items():
        if split["comparison"]:
            lines.append(f"- {label}: {split['comparison']}")
    return lines + ([""] if any(s["comparison"] for s in section.values()) else [])


def render_planted(planted: dict) -> list[str]:
    lines = ["## Planted signal (corrupted train_base rows)", ""]
    if not planted:
        return lines + ["No `corrupted` column in any seed's train_base.", ""]
    lines += ["AUC: how well the score ranks clean rows (positive) above corrupted ones "
              "(0.5 = chance, 1 = perfect).", ""]
    rows = []
    for label, p in planted.items():
        att = p.get("attribution", {})
        sae = p.get("sae_predictor", {})
        rows.append([label, f"{p['corrupted_rows']}/{p['train_base_rows']}",
                     fmt(att.get("auc_clean_vs_corrupted")),
                     fmt(sae.get("auc_clean_vs_corrupted")),
                     f"{att['corrupted_in_top_k']}/{att['top_k']}" if "top_k" in att else "n/a",
                     f"{att['corrupted_in_matched_random_k']}/{att['matched_random_k']}"
                     if "top_k" in att else "n/a",
                     fmt(att.get("expected_by_chance"), 1)])
    return lines + table(["seed", "corrupted", "AUC attribution", "AUC SAE predictor",
                          "corrupted in top-k", "corrupted in random-k", "expected by chance"],
                         rows)


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    verdict = render_verdict(report["verdict"], plots) if report["verdict"] else []
    verdict += render_sae_predictors(report["sae_predictors"]) if report["sae_predictors"] else []
    smoltalk = ([] if report["verdict"] and not report["smoltalk"]
                else render_smoltalk(report, plots))
    taboo = ([] if (report["verdict"] or report["taboo_verdict"]) and not report["taboo"]
             else render_taboo(report["taboo"], plots))
    taboo_verdict = (render_taboo_verdict(report["taboo_verdict"]) if report["taboo_verdict"]
                     else [])
    if report["taboo_verdict"] and not report["verdict"] and not report["smoltalk"]:
        smoltalk = []
    lines = (render_header(report) + taboo_verdict + verdict + smoltalk + taboo
             + render_attribution(report["attribution"], plots)
             + render_planted(report["planted_signal"]))
    if report["not_found"]:
        lines += ["## Not found", ""] + [f"- {item}" for item in report["not_found"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def strip_private(obj):
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def smoltalk_missing(seeds: dict[str, Path]) -> str:
    """Why there is no SmolTalk table: no eval files at all, or the compare steps did not run."""
    per_example = [f for folder in seeds.values() for f in folder.glob("eval_*.per_example.jsonl")]
    if not per_example:
        return "No per-example eval files found."
    return (f"Per-example eval files ({per_example[0].name}, ...) but no "
            f"{' or '.join(COMPARISONS.values())}: run the recipe's compare steps.")


def not_found(seeds: dict[str, Path], run_dir: Path, smoltalk: dict, verdict: bool) -> list[str]:
    missing = []
    # a verdict run has no per-seed top-k subsets or top-vs-random comparisons to miss
    # (its SAE predictors are per split: the SAE predictor table shows the ones found)
    expected = ([] if verdict
                else [SCORES_FILE, SAE_ROWS_FILE, TABOO_FILE, *map(Path, COMPARISONS.values())])
    for label, folder in seeds.items():
        for rel in expected:
            if not (folder / rel).is_file():
                missing.append(f"{label}: {rel}")
        evaluated = any((folder / name).is_file() for name in EVAL_FILES.values())
        if evaluated and split_file(folder, run_dir, EVAL_BASE_FILE) is None:
            missing.append(f"{label}: {EVAL_BASE_FILE} (in the seed or the run folder)")
    for comp in smoltalk.values():
        if "token_weighted" not in comp["pooled"]:
            missing.append(f"pooled {run_dir / comp['file']}"
                           + (f" ({comp['pooled']['skipped']})" if "skipped" in comp["pooled"]
                              else ""))
    return missing


def collect(seeds: dict[str, Path], run_dir: Path, control: str = "random",
            headline: str = "attribution") -> dict:
    verdict, verdict_missing = verdict_section(seeds, run_dir, control, headline)
    smoltalk = smoltalk_section(seeds, run_dir)
    taboo = taboo_section(seeds)
    taboo_verdict = taboo_verdict_section(seeds, run_dir, headline)
    attribution, planted = attribution_section(seeds, run_dir)
    sae_predictors = sae_predictor_section(seeds, run_dir)
    if not (verdict or taboo_verdict or smoltalk or taboo or attribution["per_seed"] or planted
            or sae_predictors):
        raise PipelineError(f"nothing to report in {', '.join(map(str, seeds.values()))}: no "
                            "compare_*.json, eval_words.json, attribution scores, SAE predictor "
                            "rows or corrupted train_base")
    return {"run_dir": str(run_dir),
            "seeds": {label: str(folder) for label, folder in seeds.items()},
            "verdict": verdict, "taboo_verdict": taboo_verdict,
            "smoltalk": smoltalk, "smoltalk_missing": smoltalk_missing(seeds),
            "eval_loss": eval_loss_section(seeds, run_dir), "taboo": taboo,
            "attribution": attribution, "planted_signal": planted,
            "sae_predictors": sae_predictors,
            "not_found": sorted(set(verdict_missing)) + not_found(seeds, run_dir, smoltalk,
                                                                  bool(verdict or taboo_verdict))}


def write_plots(staged: Path, report: dict, seeds: dict[str, Path], run_dir: Path) -> dict:
    plots = {}
    if report["verdict"]:
        plots["verdict"] = "verdict_seeds.png"
        plot_verdict(staged / plots["verdict"], report["verdict"])
    if report["smoltalk"]:
        plots["smoltalk"] = "smoltalk_deltas.png"
        plot_smoltalk(staged / plots["smoltalk"], report["smoltalk"])
    if report["taboo"]:
        plots["taboo"] = "taboo_success.png"
        plot_taboo(staged / plots["taboo"], report["taboo"])
    for label, entry in report["attribution"]["per_seed"].items():
        if "_rows" in entry:
            name = f"scores_{safe_name(label)}.png"
            corruption = (train_base_corruption(seeds[label], run_dir)
                          if label in report["planted_signal"] else None)
            plot_scores(staged / name, label, entry, corruption)
            plots[f"scores:{label}"] = name
        if "sae_predictor" in entry and entry["sae_predictor"]["rows"]:
            name = f"sae_scatter_{safe_name(label)}.png"
            plot_sae(staged / name, label, entry["sae_predictor"])
            plots[f"sae:{label}"] = name
    return plots


def main(argv=None) -> None:
    args = parse_args(argv)
    train_base_corruption.cache_clear()
    base_eval.cache_clear()
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(args.run_dir)
    output_dir = Path(args.output_dir) if args.output_dir else run_dir / "report"
    # the report folder is report.py's own: rewritten whole on every run, never another's
    check_output_dir(output_dir, True, SCRIPT, containers=[run_dir])
    seeds = {d.name: d for d in find_seed_dirs(args)}
    collected = collect(seeds, run_dir, args.control, args.headline)
    with staged_output(output_dir, SCRIPT) as staged:
        plots = write_plots(staged, collected, seeds, run_dir)
        report = strip_private({**collected, "plots": plots, "provenance": provenance()})
        (staged / "report.md").write_text(render_markdown(report, plots))
        write_json_atomic(staged / "report.json", report)
    if collected["verdict"]:
        print(collected["verdict"]["sentence"])
    if collected["taboo_verdict"]:
        print(collected["taboo_verdict"]["sentence"])
    print(f"wrote {output_dir}/report.md, report.json and {len(plots)} plot(s) "
          f"for {len(seeds)} seed folder(s)")


if __name__ == "__main__":
    run_main(main)
