"""One report over a run (or several seeds of it): report.md, report.json and PNG plots from
whatever the pipeline's scripts left in the run folders. Nothing is recomputed on a GPU; missing
parts are skipped and listed under "not found".

    uv run report.py --run-dir runs/smoltalk_real                       # one run = one seed
    uv run report.py --run-dir runs/multi                               # runs/multi/seed_*/
    uv run report.py --run-dir runs/multi --seeds-glob 'seed_[0-4]'
    uv run report.py --run-dir runs/multi --seed-dirs runs/a runs/b     # explicit folders

Seed folders (which folders count as seeds, in this order of precedence):
  --seed-dirs D [D ...]   exactly these folders, in the order given
  --seeds-glob PATTERN    folders under --run-dir matching PATTERN (default: seed_*), sorted by the
                          number in their name, else by name
  neither matches         --run-dir itself is the one seed folder
A seed is labelled by its folder name. Every seed folder is read with the layout the device scripts
produce (device/real_attribution_a.sh, real_score.sh, real_attribution_b.sh, real_sae.sh,
real_taboo.sh); a file that is absent only drops its section:
  manifest.json                                  dataset.py (train_base's `corrupted` column, if
                                                 any, is the planted signal); a seed folder
                                                 without one uses --run-dir's manifest.json
                                                 (splits made once, seeds repeat the rest)
  attribution/train_scores.jsonl, summary.json   score.py (score, rank, in_top_k,
                                                 in_matched_random_k per train row)
  eval_top_k.per_example.jsonl                   eval_loss.py on the attribution top-k adapter
  eval_matched_random_k.per_example.jsonl        ... and on the matched random adapter
  eval_sae_top_k.per_example.jsonl               eval_loss.py on the SAE-predictor selection
  eval_sae_matched_random_k.per_example.jsonl    (real_sae.sh)
  sae_predictor/row_scores.jsonl                 train_bidir_classifier.py (out-of-fold
                                                 predicted_score / predicted_rank, true_rank)
  eval_words.json                                eval_words.py (Taboo: per-model successes,
                                                 per-row outcomes)

Sections:
  SmolTalk     per seed, compare_evals.paired_deltas of top-k minus matched random ("finetuned"
               losses; negative = top-k better): token-weighted and per-example deltas with paired
               bootstrap 95% CIs over eval rows, per-category token-weighted deltas. Pooled: the
               paired rows of all seeds concatenated (row ids prefixed by the seed) and passed to
               the same function, so the bootstrap resamples rows from the pool; it treats rows
               as independent and so does not capture seed-to-seed (training) variance; the
               per-seed deltas, their mean and how many seeds favour top-k are shown next to it.
  Taboo        per seed and model: successes/rows ("62/152 = 0.4079") and distinct target words;
               per pair of models the exact McNemar of eval_words.py (recomputed from its per-row
               outcomes with its own function when present, else its stored numbers). Pooled:
               exact McNemar (eval_words.mcnemar_exact) on the discordant counts b, c summed over
               seeds; valid when the seeds' eval rows are independent pairs (if every seed
               evaluates the same rows, the pooled p-value is optimistic).
  Attribution  per seed: histogram of finite scores with the top-k cut (lowest top-k score),
               finite coverage, mean score of top-k and matched random; Jaccard overlap of the
               top-k row ids between every two seeds; SAE predictor: out-of-fold predicted rank
               vs attribution rank scatter and their Spearman.
  Planted      when train_base has a `corrupted` column (dataset.py --corrupt-fraction): the AUC
  signal       of the attribution score for telling clean (positive) from corrupted rows
               (Mann-Whitney, ties count 1/2; 1 = every clean row outscores every corrupted
               row, 0.5 = chance; rows without a finite score left out and counted), the same for
               the SAE predictor's out-of-fold predicted_score, and corrupted rows in top_k and
               matched_random_k against the number expected by chance.

The output folder is written whole, then renamed into place (an existing report folder there is
replaced; a non-empty folder without report.json is refused).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shutil
from pathlib import Path

from compare_evals import paired_deltas, read_per_example
from eval_words import mcnemar_exact, pairwise_mcnemar, rate_string
from pipeline import (PipelineError, load_manifest, load_split, provenance, publish_dir, read_json,
                      run_main, staging_dir, write_json_atomic)

COMPARISONS = {  # name: (A = selected, B = matched random) per-example files in a seed folder
    "attribution": ("eval_top_k.per_example.jsonl", "eval_matched_random_k.per_example.jsonl"),
    "sae_predictor": ("eval_sae_top_k.per_example.jsonl",
                      "eval_sae_matched_random_k.per_example.jsonl"),
}
SCORES_FILE = Path("attribution") / "train_scores.jsonl"
SCORE_SUMMARY_FILE = Path("attribution") / "summary.json"
SAE_ROWS_FILE = Path("sae_predictor") / "row_scores.jsonl"
TABOO_FILE = Path("eval_words.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True,
                   help="the run folder: a seed folder itself, or the parent of seed_*/ folders")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed-dirs", nargs="+", default=None, metavar="DIR",
                       help="explicit seed folders (paths as given, not under --run-dir)")
    seeds.add_argument("--seeds-glob", default="seed_*",
                       help="seed folders under --run-dir (default: %(default)s); when none "
                            "match, --run-dir itself is the one seed")
    p.add_argument("--output-dir", default=None,
                   help="report.md, report.json, *.png (default: <run-dir>/report)")
    p.add_argument("--column", choices=["finetuned", "base"], default="finetuned",
                   help="which losses of the per-example files to compare (default: finetuned)")
    p.add_argument("--bootstrap", type=int, default=10000,
                   help="bootstrap resamples for the SmolTalk CIs (default: %(default)s)")
    p.add_argument("--bootstrap-seed", type=int, default=0,
                   help="bootstrap seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        p.error("--bootstrap must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# statistics


def auc_mann_whitney(positives, negatives) -> float | None:
    """P(a random positive scores above a random negative), ties counted 1/2 (= ROC AUC)."""
    import numpy as np

    pos = np.asarray(positives, dtype=float)
    neg = np.asarray(negatives, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return None
    values = np.concatenate([pos, neg])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):  # average ranks (1-based) over runs of ties
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def spearman(x, y) -> float | None:
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return None
    rx = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    ry = np.argsort(np.argsort(y, kind="stable"), kind="stable")
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def jaccard(a: set, b: set) -> float | None:
    return len(a & b) / len(a | b) if a | b else None


def pooled_mcnemar(tests: list[dict]) -> dict:
    """Exact McNemar on the discordant counts summed over seeds."""
    b = sum(t["a_success_b_fail"] for t in tests)
    c = sum(t["a_fail_b_success"] for t in tests)
    rows = sum(t["num_rows"] for t in tests)
    return {"seeds": len(tests), "num_rows": rows, "a_success_b_fail": b, "a_fail_b_success": c,
            "p_value": mcnemar_exact(b, c),
            "test": "exact McNemar (eval_words.mcnemar_exact) on b, c summed over seeds"}


# ---------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PipelineError(f"{path} line {line_number} is not JSON: {err.msg}")
    return rows


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
    return dirs or [run_dir]


def manifest_of(seed_dir: Path, run_dir: Path) -> Path | None:
    """The seed folder's manifest.json, else --run-dir's (a runner that splits once and repeats
    only attribution/training per seed keeps the manifest there)."""
    for path in (seed_dir / "manifest.json", run_dir / "manifest.json"):
        if path.is_file():
            return path
    return None


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


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


# ---------------------------------------------------------------------------------------------
# sections


def smoltalk_section(seeds: dict[str, Path], args) -> dict:
    out = {}
    for name, (file_a, file_b) in COMPARISONS.items():
        per_seed, pooled_a, pooled_b = {}, {}, {}
        for label, folder in seeds.items():
            if not ((folder / file_a).is_file() and (folder / file_b).is_file()):
                continue
            a = read_per_example(str(folder / file_a), args.column)
            b = read_per_example(str(folder / file_b), args.column)
            per_seed[label] = paired_deltas(a, b, args.column, args.bootstrap, args.bootstrap_seed)
            pooled_a.update({f"{label}/{k}": v for k, v in a.items()})
            pooled_b.update({f"{label}/{k}": v for k, v in b.items()})
        if not per_seed:
            continue
        pooled = paired_deltas(pooled_a, pooled_b, args.column, args.bootstrap,
                               args.bootstrap_seed)
        deltas = [r["token_weighted"]["delta"] for r in per_seed.values()]
        pooled["over_seeds"] = {
            "seeds": len(deltas),
            "mean_token_weighted_delta": sum(deltas) / len(deltas),
            "mean_per_example_delta": sum(r["per_example"]["delta"] for r in per_seed.values())
                                      / len(deltas),
            "seeds_a_better_token_weighted": sum(d < 0 for d in deltas),
        }
        out[name] = {"a": file_a, "b": file_b, "column": args.column, "per_seed": per_seed,
                     "pooled": pooled,
                     "pooling": "paired rows of all seeds concatenated (row ids prefixed by the "
                                "seed), compare_evals.paired_deltas over the pool"}
    return out


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


def attribution_section(seeds: dict[str, Path], run_dir: Path) -> tuple[dict, dict]:
    """(attribution diagnostics, planted-signal results); also keeps the per-row data for plots
    under the private key '_rows'."""
    import numpy as np

    per_seed, planted, top_sets = {}, {}, {}
    for label, folder in seeds.items():
        scores_path = folder / SCORES_FILE
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
            summary_path = folder / SCORE_SUMMARY_FILE
            if summary_path.is_file():
                summary = read_json(summary_path, "score summary")
                entry["score_settings"] = {key: summary.get(key) for key in (
                    "score_mode", "preconditioning_mode", "projection_dim", "tokenization_mode")}
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
            "unscored_rows": len(rows) - len(scored),
            "corrupted_in_top_k": sum(corruption[r["row_id"]] for r in in_top),
            "top_k": len(in_top),
            "corrupted_in_matched_random_k": sum(corruption[r["row_id"]] for r in in_random),
            "matched_random_k": len(in_random),
            "expected_by_chance": None if rate is None else rate * len(in_top),
        }
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


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    lines = [f"# Report: {report['run_dir']}", "",
             "Seeds: " + ", ".join(f"`{k}` ({v})" for k, v in report["seeds"].items()), ""]
    smoltalk = report["smoltalk"]
    lines += ["## SmolTalk: top-k vs matched random (eval loss)", ""]
    if not smoltalk:
        lines += ["No per-example eval files found.", ""]
    for name, comp in smoltalk.items():
        lines += [f"### {name} selection: `{comp['a']}` minus `{comp['b']}`", "",
                  "Delta = A - B in NLL per token (< 0: the selected subset is better); 95% "
                  "paired bootstrap CI over eval rows; * = CI excludes 0.", ""]
        rows = []
        for label, r in list(comp["per_seed"].items()) + [("pooled", comp["pooled"])]:
            rows.append([label, r["rows"], r["supervised_tokens"], ci(r["token_weighted"]),
                         ci(r["per_example"]), f"{r['fraction_rows_a_better']:.3f}"])
        lines += table(["seed", "rows", "tokens", "token-weighted delta [95% CI]",
                        "per-example delta [95% CI]", "frac rows A better"], rows)
        over = comp["pooled"]["over_seeds"]
        lines += [f"Pooled = all seeds' paired rows concatenated (bootstrap over rows; seed "
                  f"variance not included). Mean of per-seed token-weighted deltas "
                  f"{over['mean_token_weighted_delta']:+.5f}; top-k better in "
                  f"{over['seeds_a_better_token_weighted']}/{over['seeds']} seeds.", ""]
        seeds = list(comp["per_seed"])
        categories = sorted(comp["pooled"]["per_category"])
        if categories:
            rows = []
            for cat in categories:
                pooled = comp["pooled"]["per_category"][cat]
                rows.append([cat, pooled["rows"], fmt(pooled["token_weighted_delta"], 5, True)]
                            + [fmt(comp["per_seed"][s]["per_category"].get(cat, {})
                                   .get("token_weighted_delta"), 5, True) for s in seeds])
            lines += ["Per-category token-weighted delta:", ""]
            lines += table(["category", "rows (pooled)", "pooled"] + seeds, rows)
    if "smoltalk" in plots:
        lines += [f"![SmolTalk deltas]({plots['smoltalk']})", ""]

    taboo = report["taboo"]
    lines += ["## Taboo: word-guessing success", ""]
    if not taboo:
        lines += ["No eval_words.json found.", ""]
    else:
        models = sorted({m for s in taboo["per_seed"].values() for m in s["models"]})
        rows = []
        for label, seed in taboo["per_seed"].items():
            rows.append([label, seed["num_rows"], seed["num_words"]]
                        + [seed["models"][m]["summary"] if m in seed["models"] else "n/a"
                           for m in models])
        lines += ["Successes / eval rows per model (eval_words.py's form); words = distinct "
                  "target words among the rows.", ""]
        lines += table(["seed", "rows", "words"] + models, rows)
        rows = []
        for label, seed in taboo["per_seed"].items():
            for t in seed["mcnemar"]:
                rows.append([label, f"{t['model_a']} vs {t['model_b']}", t["a_success_b_fail"],
                             t["a_fail_b_success"], f"{t['p_value']:.4g}"])
        for t in taboo["pooled_mcnemar"]:
            rows.append([f"pooled ({t['seeds']} seed(s))", f"{t['model_a']} vs {t['model_b']}",
                         t["a_success_b_fail"], t["a_fail_b_success"], f"{t['p_value']:.4g}"])
        lines += ["Exact McNemar (two-sided binomial on discordant rows; b = only the first "
                  "model right, c = only the second). Pooled: b and c summed over seeds.", ""]
        lines += table(["seed", "pair", "b", "c", "p"], rows)
        if "taboo" in plots:
            lines += [f"![Taboo]({plots['taboo']})", ""]

    attribution = report["attribution"]
    lines += ["## Attribution diagnostics", ""]
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
    for key, path in plots.items():
        if key.startswith(("scores:", "sae:")):
            lines += [f"![{key}]({path})", ""]

    planted = report["planted_signal"]
    lines += ["## Planted signal (corrupted train_base rows)", ""]
    if not planted:
        lines += ["No `corrupted` column in any seed's train_base.", ""]
    else:
        lines += ["AUC: how well the score ranks clean rows (positive) above corrupted ones "
                  "(0.5 = chance, 1 = perfect).", ""]
        rows = []
        for label, p in planted.items():
            att = p.get("attribution", {})
            sae = p.get("sae_predictor", {})
            rows.append([label, f"{p['corrupted_rows']}/{p['train_base_rows']}",
                         fmt(att.get("auc_clean_vs_corrupted")),
                         fmt(sae.get("auc_clean_vs_corrupted")),
                         f"{att['corrupted_in_top_k']}/{att['top_k']}" if att else "n/a",
                         f"{att['corrupted_in_matched_random_k']}/{att['matched_random_k']}"
                         if att else "n/a",
                         fmt(att.get("expected_by_chance"), 1)])
        lines += table(["seed", "corrupted", "AUC attribution", "AUC SAE predictor",
                        "corrupted in top-k", "corrupted in random-k", "expected by chance"],
                       rows)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    train_base_corruption.cache_clear()
    import matplotlib

    matplotlib.use("Agg")
    seed_dirs = find_seed_dirs(args)
    seeds = {d.name: d for d in seed_dirs}
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.run_dir) / "report"
    if (output_dir.exists() and any(output_dir.iterdir())
            and not (output_dir / "report.json").is_file()):
        raise PipelineError(f"output folder {output_dir} is not empty and holds no report.json: "
                            "refusing to replace it")

    smoltalk = smoltalk_section(seeds, args)
    taboo = taboo_section(seeds)
    attribution, planted = attribution_section(seeds, Path(args.run_dir))
    if not (smoltalk or taboo or attribution["per_seed"] or planted):
        raise PipelineError(f"nothing to report in {', '.join(map(str, seed_dirs))}: no "
                            "per-example eval files, eval_words.json, attribution scores, SAE "
                            "predictor rows or corrupted train_base")
    not_found = []
    for label, folder in seeds.items():
        for rel in [SCORES_FILE, SAE_ROWS_FILE, TABOO_FILE,
                    *[Path(f) for pair in COMPARISONS.values() for f in pair]]:
            if not (folder / rel).is_file():
                not_found.append(f"{label}: {rel}")

    staged = staging_dir(output_dir)
    try:
        plots = {}
        if smoltalk:
            plots["smoltalk"] = "smoltalk_deltas.png"
            plot_smoltalk(staged / plots["smoltalk"], smoltalk)
        if taboo:
            plots["taboo"] = "taboo_success.png"
            plot_taboo(staged / plots["taboo"], taboo)
        for label, entry in attribution["per_seed"].items():
            if "_rows" in entry:
                name = f"scores_{safe_name(label)}.png"
                corruption = (train_base_corruption(seeds[label], Path(args.run_dir))
                              if label in planted else None)
                plot_scores(staged / name, label, entry, corruption)
                plots[f"scores:{label}"] = name
            if "sae_predictor" in entry and entry["sae_predictor"]["rows"]:
                name = f"sae_scatter_{safe_name(label)}.png"
                plot_sae(staged / name, label, entry["sae_predictor"])
                plots[f"sae:{label}"] = name
        report = strip_private({
            "run_dir": str(Path(args.run_dir)),
            "seeds": {label: str(folder) for label, folder in seeds.items()},
            "smoltalk": smoltalk, "taboo": taboo, "attribution": attribution,
            "planted_signal": planted, "plots": plots, "not_found": not_found,
            "settings": {"column": args.column, "bootstrap": args.bootstrap,
                         "bootstrap_seed": args.bootstrap_seed},
            "provenance": provenance(seed=args.bootstrap_seed),
        })
        (staged / "report.md").write_text(render_markdown(report, plots))
        write_json_atomic(staged / "report.json", report)
        publish_dir(staged, output_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"wrote {output_dir}/report.md, report.json and {len(plots)} plot(s) "
          f"for {len(seeds)} seed folder(s)")


if __name__ == "__main__":
    run_main(main)
