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

Several seeds: --a and --b each take several files, or a glob pattern (quoted; expanded here,
since the runner passes it as it is), e.g.

    uv run compare_evals.py --a 'runs/smoltalk_v1/seed_*/eval_top_k.per_example.jsonl' \
        --b 'runs/smoltalk_v1/seed_*/eval_matched_random_k.per_example.jsonl' \
        --output-json runs/smoltalk_v1/compare_top_vs_random.json

Files are paired by the name of their folder (the seed folder). Two answers come out:
  seed_level  the seeds are the unit. Per seed, the paired deltas above over its eval rows; across
              seeds the mean delta with a 95% t-interval over the seeds (scipy.stats.t, n - 1
              degrees of freedom; the interval the verdict uses), the one-sample t-test of the
              per-seed deltas against 0 (scipy.stats.ttest_1samp) and how many seeds favour A;
              beside it a two-level bootstrap: resample seeds, then eval rows (the same row draw
              for every seed when the seeds share their eval rows, a draw per seed when each has
              its own split). With few seeds the percentile bootstrap is too narrow (it ignores
              that the seed-to-seed spread is itself estimated from n seeds), so the t-interval
              is the one to quote. A training seed changes the LoRA init, the row order, the
              dropout and the random arms' rows: this is the interval that includes them.
  pooled      the paired rows of all seeds concatenated (row ids prefixed by the folder name),
              bootstrap over that pool: it treats rows as independent, so it leaves out the
              seed-to-seed (training) variance and is too narrow whenever seeds differ; kept for
              comparison with earlier reports.

Arms (the verdict's matrix): --arm NAME=FILES (repeated; FILES a glob over the seed folders) and
--baselines NAME [NAME ...] compare every arm with every baseline it is not, seed level as above:

    uv run compare_evals.py --label scratch \
        --arm 'attribution=runs/v/seed_*/eval_scratch_attribution.per_example.jsonl' \
        --arm 'random=runs/v/seed_*/eval_scratch_random.per_example.jsonl' \
        --arm 'longest=runs/v/seed_*/eval_scratch_longest.per_example.jsonl' \
        --baselines random longest --output-json runs/v/compare_scratch.json

Every arm must have a file in the same seed folders. report.py reads comparisons[arm][baseline].

Taboo word-guessing success (--metric success): the same arm matrix over eval_words.py's JSON
files, one per seed folder (the arm's model is the one eval_words.py named after the arm, e.g.
--adapter attribution=...). Per seed and pair (A, baseline): successes of each on the same eval
episodes, the success-rate difference A - baseline (positive = A better) and the exact McNemar
test on the discordant episodes (scipy.stats.binomtest(b, b + c, 1/2), two-sided; p = 1 when
b + c = 0); across seeds the mean difference with the same 95% t-interval over seeds as the loss
(t_interval). Every success rule the files report (target, reference) gets its own matrix:

    uv run compare_evals.py --metric success --label scratch_k184 \
        --arm 'attribution=runs/t/seed_*/eval_words_scratch_k184.json' \
        --arm 'random_outcome_stratified=runs/t/seed_*/eval_words_scratch_k184.json' \
        --baselines random_outcome_stratified --output-json runs/t/compare_scratch_k184.json

Bad input (a missing or non-finite field, a duplicated row_id, an empty file, no supervised token,
files over different rows, an arm without a seed another has) stops with one `error:` line naming
the file and line; exit 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import warnings
from pathlib import Path

from pipeline import (PipelineError, check_output_file, provenance, read_json, run_main, seed_type,
                      write_json_atomic)

SCRIPT = "compare_evals.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="+", metavar="FILE",
                   help="per_example.jsonl of condition A (eval_loss.py); several files or a glob "
                        "give one per seed folder (paired with --b's by folder name)")
    p.add_argument("--b", nargs="+", metavar="FILE",
                   help="per_example.jsonl of condition B, as --a")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FILES",
                   help="one arm's per-example files over the seed folders (a glob; repeat per "
                        "arm); with --baselines, instead of --a/--b")
    p.add_argument("--baselines", nargs="+", default=None, metavar="NAME",
                   help="the arms every other arm is compared with (each one of the --arm names)")
    p.add_argument("--metric", choices=["loss", "success"], default="loss",
                   help="loss: eval_loss.py's per-example NLL (default); success: Taboo "
                        "word-guessing success from eval_words.py's JSON (with --arm/--baselines)")
    p.add_argument("--label", default=None,
                   help="recorded in the output (e.g. the design: scratch, continue)")
    p.add_argument("--column", default="finetuned", choices=["finetuned", "base"],
                   help="which model's losses in each file to compare (default: finetuned)")
    p.add_argument("--bootstrap", type=int, default=10000,
                   help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=seed_type, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--output-json", default=None, help="also write the result here")
    return p.parse_args(argv)


def check_mode(args) -> None:
    """--a with --b (one comparison) or --arm with --baselines (the arm matrix)."""
    if args.metric == "success" and not (args.arm and args.baselines):
        raise PipelineError("--metric success compares arms: give --arm and --baselines")
    if args.arm or args.baselines:
        if args.a or args.b:
            raise PipelineError("--arm/--baselines replace --a/--b: give one or the other")
        if not (args.arm and args.baselines):
            raise PipelineError("--arm and --baselines go together")
    elif not (args.a and args.b):
        raise PipelineError("give --a and --b (or --arm and --baselines)")


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


def declared_inputs(args) -> list[str]:
    """Every file --a, --b and --arm name (their globs expanded): --output-json is none of them."""
    patterns = [*(args.a or []), *(args.b or []), *(item.partition("=")[2] for item in args.arm)]
    return [path for pattern in patterns for path in (glob.glob(pattern) or [pattern])]


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


def read_seed_pairs(pairs, column: str) -> list[tuple[str, dict, dict]]:
    """(label, rows of A, rows of B) per pair, each pair over the same eval rows."""
    out = []
    for label, path_a, path_b in pairs:
        rows_a, rows_b = read_per_example(path_a, column), read_per_example(path_b, column)
        if set(rows_a) != set(rows_b):
            raise PipelineError(f"{path_a} and {path_b} cover different eval rows "
                                f"({len(set(rows_a) ^ set(rows_b))} differ): compare runs on the "
                                "same eval split")
        out.append((label, rows_a, rows_b))
    return out


def pool_rows(seed_pairs) -> tuple[dict, dict]:
    """The rows of every pair in one pool; with several pairs, row ids prefixed by the pair's
    label."""
    a, b = {}, {}
    for label, rows_a, rows_b in seed_pairs:
        prefix = f"{label}/" if label else ""
        a.update({f"{prefix}{k}": v for k, v in rows_a.items()})
        b.update({f"{prefix}{k}": v for k, v in rows_b.items()})
    return a, b


def parse_arms(items: list[str]) -> dict[str, list[str]]:
    arms = {}
    for item in items:
        name, sep, files = item.partition("=")
        if not sep or not name or not files:
            raise PipelineError(f"--arm {item}: expected NAME=FILES")
        if name in arms:
            raise PipelineError(f"--arm {name} is given twice")
        arms[name] = [files]
    return arms


# ---------------------------------------------------------------------------------------------
# the statistic


def paired_arrays(a: dict, b: dict, column: str):
    """(row ids, supervised tokens, NLL_A - NLL_B) over the rows of two checked files."""
    import numpy as np

    if set(a) != set(b):
        raise PipelineError(f"the two files cover different eval rows ({len(set(a) ^ set(b))} "
                            f"differ): compare runs on the same eval split")
    ids = sorted(a)
    tokens = np.array([a[i]["supervised_tokens"] for i in ids], dtype=float)
    if not np.array_equal(tokens, [b[i]["supervised_tokens"] for i in ids]):
        raise PipelineError("supervised token counts differ between the files: different "
                            "tokenization or --max-length")
    if tokens.sum() == 0:
        raise PipelineError(f"none of the {len(ids)} eval rows has a supervised token: nothing to "
                            "compare (prompts longer than --max-length?)")
    nll_diff = np.array([a[i][f"{column}_nll_sum"] - b[i][f"{column}_nll_sum"] for i in ids])
    return ids, tokens, nll_diff


def check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise PipelineError(f"--bootstrap must be at least 1, got {resamples}")


def paired_deltas(a: dict, b: dict, column: str, resamples: int, seed: int) -> dict:
    import numpy as np

    check_resamples(resamples)
    ids, tokens, nll_diff = paired_arrays(a, b, column)
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


# the seeds as the unit

SEED_INTERVAL = ("t-interval over the seeds' deltas (scipy.stats.t, n - 1 degrees of freedom); "
                 "p: one-sample t-test of the per-seed deltas against 0 (scipy.stats.ttest_1samp)")


def t_interval(deltas, level: float = 0.95):
    """(mean, low, high, p) over the last axis (the seeds) of deltas; low/high/p are NaN with one
    seed, and p is NaN when every seed has the same delta."""
    import numpy as np
    from scipy import stats

    deltas = np.asarray(deltas, dtype=float)
    n = deltas.shape[-1]
    mean = deltas.mean(-1)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan, nan
    sd = deltas.std(-1, ddof=1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical deltas: scipy warns, gives nan
        p = stats.ttest_1samp(deltas, 0.0, axis=-1).pvalue
    spread = sd > 1e-12 * np.abs(deltas).max(-1)  # identical up to rounding: no test
    p = np.where(spread, p, np.nan)
    return mean, mean - half, mean + half, p


def bootstrap_two_level(seeds: list[tuple], resamples: int, rng):
    """Resamples of the mean over seeds of (token-weighted, per-example) delta: seeds drawn with
    replacement, then each drawn seed's eval rows. seeds: (tokens, NLL diff, row ids) per seed.
    When every seed has the same rows and tokens (one eval split), one row draw serves all seeds
    of a resample: the rows are a shared sample, and drawing them per seed would average their
    noise away. Otherwise (a split per seed) each drawn seed gets its own row draw."""
    import numpy as np

    n = len(seeds)
    shared = all(s[2] == seeds[0][2] and np.array_equal(s[0], seeds[0][0]) for s in seeds)
    pick = rng.integers(0, n, size=(resamples, n))

    def counts(m):
        draw = rng.integers(0, m, size=(resamples, m))
        flat = (np.arange(resamples)[:, None] * m + draw).ravel()
        return np.bincount(flat, minlength=resamples * m).reshape(resamples, m).astype(float)

    def deltas(c, tokens, nll):  # (resamples, seeds) token-weighted and per-example deltas
        keep = tokens > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            tw = (c @ nll.T) / (c @ tokens)[:, None]
            pe = (c[:, keep] @ (nll[:, keep] / tokens[keep]).T) / c[:, keep].sum(1)[:, None]
        return tw, pe

    if shared:
        tokens = seeds[0][0]
        tw, pe = deltas(counts(len(tokens)), tokens, np.stack([s[1] for s in seeds]))
        rows = np.arange(resamples)[:, None]
        tw, pe = tw[rows, pick], pe[rows, pick]
    else:
        per_seed = [deltas(counts(len(t)), t, nll[None, :]) for t, nll, _ in seeds]
        tw_all = np.stack([d[0][:, 0] for d in per_seed])     # (seeds, resamples)
        pe_all = np.stack([d[1][:, 0] for d in per_seed])
        # slot j of resample b takes seed pick[b, j]'s row resample order[j, b]: independent
        # row draws for the slots, without a row draw per (resample, slot) in memory
        order = np.stack([rng.permutation(resamples) for _ in range(n)])
        tw = tw_all[pick, order.T]
        pe = pe_all[pick, order.T]
    tw, pe = tw.mean(1), pe.mean(1)
    return tw[np.isfinite(tw)], pe[np.isfinite(pe)], "shared" if shared else "per seed"


def seed_level(seed_pairs, column: str, resamples: int, seed: int) -> dict:
    """The seed-level statistics of the docstring over (label, rows A, rows B) per seed, and each
    seed's own paired deltas (with its row bootstrap)."""
    import numpy as np

    check_resamples(resamples)
    per_seed, arrays = {}, []
    for i, (label, rows_a, rows_b) in enumerate(seed_pairs):
        per_seed[label] = paired_deltas(rows_a, rows_b, column, resamples, seed + i)
        ids, tokens, nll_diff = paired_arrays(rows_a, rows_b, column)
        arrays.append((tokens, nll_diff, ids))
    labels = list(per_seed)
    boot_tw, boot_pe, rows = bootstrap_two_level(arrays, resamples, np.random.default_rng(seed))
    out = {"seeds": len(labels), "labels": labels, "interval": SEED_INTERVAL,
           "bootstrap": (f"two-level: seeds with replacement, then eval rows ({rows} row draw; "
                         f"{resamples} resamples); percentile 95%"),
           "per_seed": per_seed}
    for key, boot in (("token_weighted", boot_tw), ("per_example", boot_pe)):
        out[key] = over_seeds([per_seed[s][key]["delta"] for s in labels], a_better=-1)
        out[key]["ci95_bootstrap"] = ([float(v) for v in np.percentile(boot, [2.5, 97.5])]
                                      if len(boot) else None)
    return out


def over_seeds(deltas, a_better: int) -> dict:
    """One delta per seed -> its mean, sd, 95% t-interval and t-test p over the seeds (the seeds
    are the unit), and in how many seeds A was better (a_better: the sign of a better delta, -1
    for a loss, +1 for a success rate)."""
    import numpy as np

    deltas = np.asarray(deltas, dtype=float)
    mean, low, high, p = t_interval(deltas)
    finite = bool(np.isfinite(low))
    return {"per_seed_deltas": deltas.tolist(), "mean_delta": float(mean),
            "sd_over_seeds": float(deltas.std(ddof=1)) if len(deltas) > 1 else None,
            "ci95_t": [float(low), float(high)] if finite else None,
            "p_value": float(p) if np.isfinite(p) else None,
            "ci_excludes_zero": bool(finite and (low > 0 or high < 0)),
            "seeds_a_better": int((a_better * deltas > 0).sum())}


def check_arm_files(arm_pairs: dict, baselines: list[str]) -> list[str]:
    """Every baseline is an arm, and every arm has a file in every seed folder any arm has; the
    seed folders' labels, sorted."""
    missing = [b for b in baselines if b not in arm_pairs]
    if missing:
        raise PipelineError(f"--baselines {missing[0]} is not one of the --arm names "
                            f"({', '.join(arm_pairs)})")
    labels = sorted({label for files in arm_pairs.values() for label in files})
    for arm, files in arm_pairs.items():
        absent = [label for label in labels if label not in files]
        if absent:
            other = next(a for a, f in arm_pairs.items() if absent[0] in f)
            raise PipelineError(f"--arm {arm} has no file in a folder named {absent[0]} "
                                f"(--arm {other} has {arm_pairs[other][absent[0]]})")
    return labels


def compare_arms(arm_pairs: dict, baselines: list[str], column: str, resamples: int,
                 seed: int) -> dict:
    """comparisons[arm][baseline] = seed_level(arm vs baseline) for every arm and every baseline
    it is not. arm_pairs: {arm: {seed label: path}}."""
    labels = check_arm_files(arm_pairs, baselines)
    rows = {arm: {label: read_per_example(path, column) for label, path in files.items()}
            for arm, files in arm_pairs.items()}
    comparisons = {}
    for arm in arm_pairs:
        for baseline in baselines:
            if baseline == arm:
                continue
            pairs = []
            for label in labels:
                a, b = rows[arm][label], rows[baseline][label]
                if set(a) != set(b):
                    raise PipelineError(f"{arm_pairs[arm][label]} and "
                                        f"{arm_pairs[baseline][label]} cover different eval rows "
                                        f"({len(set(a) ^ set(b))} differ): compare runs on the "
                                        "same eval split")
                pairs.append((label, a, b))
            comparisons.setdefault(arm, {})[baseline] = seed_level(pairs, column, resamples, seed)
    return comparisons


def arm_files(arms: dict[str, list[str]]) -> dict[str, dict[str, Path]]:
    """{arm: {seed folder name: file}} from each arm's glob."""
    out = {}
    for arm, patterns in arms.items():
        files = {}
        for path in expand(patterns, f"--arm {arm}"):
            if path.parent.name in files:
                raise PipelineError(f"--arm {arm}: {files[path.parent.name]} and {path} are in "
                                    f"folders of the same name ({path.parent.name}): files are "
                                    "paired by folder name")
            files[path.parent.name] = path
        out[arm] = files
    return out


# ---------------------------------------------------------------------------------------------
# Taboo word-guessing success (--metric success)

SUCCESS_TEST = ("exact McNemar: scipy.stats.binomtest(b, b + c, 1/2), two-sided, on the "
                "discordant episodes (b = only A right, c = only the baseline right)")


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of b vs c discordant pairs; 1.0 when there are none."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(int(b), int(b + c), 0.5).pvalue)


def read_successes(path: Path, model: str) -> dict:
    """{row_id: {rule: success}} of one model in one eval_words.py JSON."""
    result = read_json_file(path)
    per_row = result.get("per_row")
    if not isinstance(per_row, dict) or not per_row:
        raise PipelineError(f"{path} has no per_row block: not eval_words.py's output")
    if model not in per_row:
        raise PipelineError(f"{path} has no model '{model}' (it has: {', '.join(per_row)}); "
                            "name the adapter after the arm (eval_words.py --adapter ARM=PATH)")
    rules = [r.removeprefix("success_") for r in (per_row[model][0] if per_row[model] else {})
             if r.startswith("success_")]
    out = {}
    for i, row in enumerate(per_row[model]):
        where = f"{path} per_row.{model}[{i}]"
        if not isinstance(row, dict) or "row_id" not in row:
            raise PipelineError(f"{where} has no row_id")
        missing = [r for r in rules if not isinstance(row.get(f"success_{r}"), bool)]
        if missing or not rules:
            raise PipelineError(f"{where} has no boolean success_{(missing or ['<rule>'])[0]}")
        if row["row_id"] in out:
            raise PipelineError(f"{where}: row_id {row['row_id']!r} appears twice")
        out[row["row_id"]] = {r: row[f"success_{r}"] for r in rules}
    if not out:
        raise PipelineError(f"{path}: model '{model}' has no rows")
    return out


def read_json_file(path: Path) -> dict:
    if not Path(path).is_file():
        raise PipelineError(f"eval_words file {path} does not exist")
    return read_json(path, "eval_words result")


def success_pair(a: dict, b: dict, rule: str) -> dict:
    ids = sorted(a)
    xa = [a[i][rule] for i in ids]
    xb = [b[i][rule] for i in ids]
    only_a = sum(x and not y for x, y in zip(xa, xb))
    only_b = sum(y and not x for x, y in zip(xa, xb))
    return {"rows": len(ids), "a_successes": sum(xa), "b_successes": sum(xb),
            "a_success_b_fail": only_a, "a_fail_b_success": only_b,
            "both_success": sum(x and y for x, y in zip(xa, xb)),
            "rate_difference": (sum(xa) - sum(xb)) / len(ids),
            "p_mcnemar": mcnemar_exact(only_a, only_b)}


def success_seed_level(pairs: list[tuple[str, dict, dict]], rule: str) -> dict:
    """Per seed the paired success counts and McNemar; across seeds the t-interval of the
    success-rate difference (the loss's seed-level convention, t_interval)."""
    per_seed = {label: success_pair(a, b, rule) for label, a, b in pairs}
    labels = list(per_seed)
    return {"seeds": len(labels), "labels": labels, "interval": SEED_INTERVAL,
            "test": SUCCESS_TEST, "per_seed": per_seed,
            "rate_difference": over_seeds([per_seed[s]["rate_difference"] for s in labels],
                                          a_better=+1)}


def compare_success(arm_pairs: dict, baselines: list[str]) -> tuple[dict, dict]:
    """(successes[rule][arm][seed], comparisons[rule][arm][baseline]) for every rule all files
    report; arm_pairs: {arm: {seed label: eval_words.json}}."""
    labels = check_arm_files(arm_pairs, baselines)
    rows = {arm: {label: read_successes(path, arm) for label, path in files.items()}
            for arm, files in arm_pairs.items()}
    rules = None
    for arm, by_label in rows.items():
        for label, r in by_label.items():
            found = list(next(iter(r.values())))
            rules = found if rules is None else [x for x in rules if x in found]
            if set(r) != set(rows[baselines[0]][label]):
                raise PipelineError(f"{arm_pairs[arm][label]} and "
                                    f"{arm_pairs[baselines[0]][label]} cover different eval "
                                    "episodes: compare runs on the same eval split")
    successes = {rule: {arm: {label: {"successes": sum(v[rule] for v in r.values()),
                                      "rows": len(r),
                                      "rate": sum(v[rule] for v in r.values()) / len(r)}
                              for label, r in by_label.items()}
                        for arm, by_label in rows.items()} for rule in rules}
    comparisons = {rule: {arm: {b: success_seed_level(
        [(label, rows[arm][label], rows[b][label]) for label in labels], rule)
        for b in baselines if b != arm} for arm in arm_pairs} for rule in rules}
    return successes, comparisons


def main_success(args) -> None:
    arm_pairs = arm_files(parse_arms(args.arm))
    successes, comparisons = compare_success(arm_pairs, args.baselines)
    first = read_json_file(next(iter(next(iter(arm_pairs.values())).values())))
    result = {"kind": "success_comparisons", "label": args.label, "metric": "success",
              "baselines": args.baselines, "rules": list(comparisons),
              "primary_rule": first.get("success_rule", "target"),
              "generation": first.get("generation"), "unit": "seed", "interval": SEED_INTERVAL,
              "test": SUCCESS_TEST,
              "arms": {arm: {label: str(path.resolve()) for label, path in files.items()}
                       for arm, files in arm_pairs.items()},
              "successes": successes, "comparisons": comparisons,
              "provenance": provenance(seed=args.seed)}
    if args.output_json:
        write_json_atomic(args.output_json, result)
    for rule, matrix in comparisons.items():
        for arm, against in matrix.items():
            for baseline, r in against.items():
                s = r["rate_difference"]
                t = (f"[{s['ci95_t'][0]:+.4f}, {s['ci95_t'][1]:+.4f}]" if s["ci95_t"]
                     else "[n/a]")
                counts = ", ".join(f"{x['a_successes']}-{x['b_successes']} "
                                   f"(p {x['p_mcnemar']:.2g})" for x in r["per_seed"].values())
                print(f"{rule}: {arm} - {baseline}: success rate {s['mean_delta']:+.4f} 95% t {t}"
                      f" over {r['seeds']} seeds; per seed {counts}")


def print_seed_level(name: str, r: dict) -> None:
    for key in ("token_weighted", "per_example"):
        s = r[key]
        t = (f"[{s['ci95_t'][0]:+.5f}, {s['ci95_t'][1]:+.5f}]" if s["ci95_t"] else "[n/a]")
        boot = (f"[{s['ci95_bootstrap'][0]:+.5f}, {s['ci95_bootstrap'][1]:+.5f}]"
                if s["ci95_bootstrap"] else "[n/a]")
        p = f"{s['p_value']:.3g}" if s["p_value"] is not None else "n/a"
        print(f"{name} {key:>15}: mean over {r['seeds']} seeds {s['mean_delta']:+.5f}, 95% t "
              f"{t}, two-level bootstrap {boot}, p {p}, A better in "
              f"{s['seeds_a_better']}/{r['seeds']} seeds")


def main_arms(args) -> None:
    arm_pairs = arm_files(parse_arms(args.arm))
    comparisons = compare_arms(arm_pairs, args.baselines, args.column, args.bootstrap,
                               args.seed)
    result = {"kind": "arm_comparisons", "label": args.label, "column": args.column,
              "bootstrap": args.bootstrap, "baselines": args.baselines,
              "unit": "seed", "interval": SEED_INTERVAL,
              "arms": {arm: {label: str(path.resolve()) for label, path in files.items()}
                       for arm, files in arm_pairs.items()},
              "comparisons": comparisons, "provenance": provenance(seed=args.seed)}
    if args.output_json:
        write_json_atomic(args.output_json, result)
    for arm, against in comparisons.items():
        for baseline, r in against.items():
            print_seed_level(f"{arm} - {baseline}", r)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_mode(args)
    if args.output_json:
        check_output_file(args.output_json, SCRIPT, inputs=declared_inputs(args))
    if args.metric == "success":
        main_success(args)
        return
    if args.arm:
        main_arms(args)
        return
    pairs = pair_files(args.a, args.b)
    seed_pairs = read_seed_pairs(pairs, args.column)
    a, b = pool_rows(seed_pairs)
    result = paired_deltas(a, b, args.column, args.bootstrap, args.seed)
    result.update({"column": args.column, "bootstrap": args.bootstrap, "label": args.label,
                   "provenance": provenance(seed=args.seed)})
    if len(pairs) == 1:
        result.update({"a": str(pairs[0][1].resolve()), "b": str(pairs[0][2].resolve())})
    else:
        result["pooled_from"] = [{"label": label, "a": str(path_a.resolve()),
                                  "b": str(path_b.resolve())} for label, path_a, path_b in pairs]
        result["pooling"] = ("the seeds' paired rows concatenated, bootstrap over rows: leaves "
                             "out seed-to-seed variance (see seed_level)")
        result["seed_level"] = seed_level(seed_pairs, args.column, args.bootstrap, args.seed)
    if args.output_json:
        write_json_atomic(args.output_json, result)
    pooled = " (pooled rows)" if len(pairs) > 1 else ""
    for name in ("token_weighted", "per_example"):
        r = result[name]
        print(f"{name:>15}: A - B = {r['delta']:+.5f}  95% CI [{r['ci95'][0]:+.5f}, "
              f"{r['ci95'][1]:+.5f}]{pooled}")
    print(f"A better on {result['fraction_rows_a_better']:.1%} of {result['rows']} rows"
          + (f" pooled over {len(pairs)} seed folders" if len(pairs) > 1 else ""))
    if len(pairs) > 1:
        print_seed_level("A - B", result["seed_level"])


if __name__ == "__main__":
    run_main(main)
