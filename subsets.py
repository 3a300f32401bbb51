"""Subset draws: every way the pipeline picks k rows out of a scored pool, in one place, so the
attribution top-k (score.py), the SAE predictor's top-k (train_bidir_classifier.py) and the
rank-window ablations (rank_windows.py) are compared against controls drawn the same way.

Rows are integer positions in the pool (a split). A ranking is a list of positions, best first.
Every random draw is numpy `default_rng(seed)`, so the same seed gives the same subset.

  top_k_rows                    the k best-ranked rows
  random_rows                   k rows uniformly at random (the seed project's control)
  token_matched_random_rows     a random run of rows holding the reference's supervised tokens
  length_stratified_random_rows as many rows per length quintile as the reference has
  outcome_length_stratified_random_rows  as many rows per (outcome, length quintile) cell as the
                                reference has (Taboo: won / lost episodes x length)
  choose_subsets                top-k plus the control named by --random-match
  select_arm                    one arm of the verdict (ARMS): k rows of the pool by its rule
  summarize_arms                rows, tokens and mean score of each arm (score.py's summary.json)
  read_arm_scores               a second score column for a score arm (--arm-scores NAME=PATH)
  lds_subsets                   M balanced random subsets of a fraction alpha (lds.py draw)

Arms (score.py --arms) all draw from the same candidates, the rows with a finite attribution
score (rows without a supervised token have none), so arms differ only in their rule. The
reference is the attribution top-k: the random arms avoid it (unless allow_overlap) and the
stratified and token-matched ones copy its length mix or its tokens. A score arm (attribution_raw,
sae, or any name given its own scores) is the top-k of its own column among the candidates.
Random arms change with the seed; the others do not.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import PipelineError

RANDOM_MATCHES = ("rows", "tokens", "stratified")
LENGTH_STRATA = 5  # quintiles of supervised tokens
ARMS = {  # name: the rule (score.py --arms help; report.py's table)
    "attribution": "the k best attribution scores (the reference top-k)",
    "attribution_bottom": "the k lowest finite attribution scores (a working selector hurts here)",
    "attribution_raw": "the top-k of a second score run (--arm-scores attribution_raw=DIR)",
    "sae": "the top-k of the SAE predictor's out-of-fold predicted_score "
           "(--arm-scores sae=row_scores.jsonl)",
    "random": "k uniform random rows, outside the reference top-k",
    "random_stratified": "as many random rows per length quintile as the reference top-k",
    "random_tokens": "random rows until the reference top-k's supervised tokens",
    "random_outcome_stratified": "as many random rows per (outcome, length quintile) cell as the "
                                 "reference top-k (Taboo: the pool's quality column = "
                                 "meta.outcome; the seed's control)",
    "longest": "the k rows with the most supervised tokens (ties: lower position)",
    "reward": "the k highest reward_model_score (rows without one never chosen)",
}
RANDOM_ARMS = ("random", "random_stratified", "random_tokens", "random_outcome_stratified")
SCORE_ARMS = ("attribution_raw", "sae")  # need arm_scores[name]; any other name given there too


def rank_rows(scores) -> list[int]:
    """Row positions with finite scores, best first; ties go to the lower position."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(scores))
    order = np.lexsort((finite, -scores[finite]))
    return finite[order].tolist()


def top_k_rows(ranking: list[int], k: int) -> list[int]:
    if k > len(ranking):
        raise PipelineError(f"--subset-k {k} is larger than the {len(ranking)} rows with a "
                            f"finite score")
    return sorted(ranking[:k])


def random_rows(n_pool: int, k: int, seed: int, exclude=(), allow_overlap=False) -> list[int]:
    """k positions of range(n_pool) drawn uniformly, sorted. Without allow_overlap the excluded
    positions (the top-k) are never drawn."""
    import numpy as np

    candidates = np.arange(n_pool) if allow_overlap else np.setdiff1d(
        np.arange(n_pool), np.asarray(sorted(exclude), dtype=np.int64))
    if k > len(candidates):
        raise PipelineError(f"a random subset of {k} rows needs {k} candidates, the pool has "
                            f"{len(candidates)}" + _overlap_hint(allow_overlap))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(candidates, size=k, replace=False).tolist())


def _outside(candidates: list[int], reference: list[int], allow_overlap: bool) -> list[int]:
    return list(candidates) if allow_overlap else sorted(set(candidates) - set(reference))


def _overlap_hint(allow_overlap: bool) -> str:
    return "" if allow_overlap else " outside the top-k (--allow-overlap lifts this)"


def token_matched_random_rows(candidates: list[int], reference: list[int], supervised_tokens,
                              seed: int, allow_overlap: bool) -> list[int]:
    """The shortest prefix of a seeded permutation of the candidates whose supervised tokens
    reach the reference's total: the same training tokens as the reference, other rows."""
    import numpy as np

    target = int(sum(supervised_tokens[r] for r in reference))
    pool = _outside(candidates, reference, allow_overlap)
    order = np.random.default_rng(seed).permutation(len(pool))
    reached = np.cumsum([supervised_tokens[pool[i]] for i in order])
    if len(reached) == 0 or reached[-1] < target:
        have = int(reached[-1]) if len(reached) else 0
        raise PipelineError(f"--random-match tokens needs {target} supervised tokens (the "
                            f"top-k's), the candidate rows hold {have}"
                            + _overlap_hint(allow_overlap))
    n = int(np.searchsorted(reached, target)) + 1  # first prefix with reached >= target
    return sorted(pool[i] for i in order[:n])


def length_strata(candidates: list[int], supervised_tokens, n_strata: int = LENGTH_STRATA):
    """Stratum (0 = shortest) of every candidate: quantile bins of the candidates' supervised
    tokens. Ties at a bin edge go to the lower bin, so the bins depend only on the pool."""
    import numpy as np

    lengths = np.asarray([supervised_tokens[r] for r in candidates], dtype=np.float64)
    edges = np.quantile(lengths, np.linspace(0, 1, n_strata + 1)[1:-1])
    strata = np.searchsorted(edges, lengths, side="left")
    return dict(zip(candidates, strata.tolist()))


def length_stratified_random_rows(candidates: list[int], reference: list[int], supervised_tokens,
                                  seed: int, allow_overlap: bool,
                                  n_strata: int = LENGTH_STRATA) -> list[int]:
    """As many random rows from each length quintile of the candidate pool as the reference has
    in it: the reference's length mix, not its choice of rows (the seed project's control)."""
    stratum = length_strata(candidates, supervised_tokens, n_strata)
    return _draw_per_cell(stratum, candidates, reference, seed, allow_overlap,
                          lambda s: f"--random-match stratified needs {{need}} rows of length "
                                    f"quintile {s + 1}")


def outcome_length_stratified_random_rows(candidates: list[int], reference: list[int],
                                          supervised_tokens, outcome, seed: int,
                                          allow_overlap: bool,
                                          n_strata: int = LENGTH_STRATA) -> list[int]:
    """As many random rows from each (outcome, length quintile) cell of the candidate pool as the
    reference has in it: for Taboo, the top-k's mix of won and lost episodes and of their lengths
    (the seed project's control), not its choice of episodes. Length quintiles are the pool's, as
    in length_stratified_random_rows; outcome is every pool row's label (quality)."""
    stratum = length_strata(candidates, supervised_tokens, n_strata)
    cell = {r: (str(outcome[r]), stratum[r]) for r in candidates}
    return _draw_per_cell(cell, candidates, reference, seed, allow_overlap,
                          lambda key: f"arm random_outcome_stratified needs {{need}} rows of "
                                      f"outcome '{key[0]}' in length quintile {key[1] + 1}")


def _draw_per_cell(cell: dict, candidates: list[int], reference: list[int], seed: int,
                   allow_overlap: bool, shortfall) -> list[int]:
    """As many random rows of each cell (cell[row], over the candidates) as the reference has in
    it, cells in sorted order, from the candidates outside the reference. shortfall(key): the
    error's start, with {need} for the count."""
    import numpy as np

    pool = _outside(candidates, reference, allow_overlap)
    rng = np.random.default_rng(seed)
    drawn = []
    for key in sorted(set(cell.values())):
        need = sum(1 for r in reference if cell[r] == key)
        members = [r for r in pool if cell[r] == key]
        if need > len(members):
            raise PipelineError(shortfall(key).format(need=need) + f", the pool has "
                                f"{len(members)}" + _overlap_hint(allow_overlap))
        if need:
            drawn.extend(rng.choice(np.asarray(members), size=need, replace=False).tolist())
    return sorted(drawn)


def choose_subsets(ranking: list[int], k: int, seed: int, allow_overlap: bool,
                   random_match: str = "rows", supervised_tokens=None):
    """(top-k rows, control rows). The control is drawn among the finitely scored rows (outside
    the top-k unless overlap is allowed): the same candidate pool, so the comparison is only about
    the ranking. random_match: rows = k uniform rows; tokens = the top-k's supervised tokens;
    stratified = the top-k's count per length quintile."""
    if random_match not in RANDOM_MATCHES:
        raise PipelineError(f"--random-match {random_match}: expected one of "
                            f"{', '.join(RANDOM_MATCHES)}")
    top = top_k_rows(ranking, k)
    if random_match != "rows" and supervised_tokens is None:
        raise PipelineError(f"--random-match {random_match} needs each row's supervised tokens")
    return top, random_control(sorted(ranking), top, k, seed, allow_overlap, random_match,
                               supervised_tokens)


def random_control(candidates: list[int], reference: list[int], k: int, seed: int,
                   allow_overlap: bool, random_match: str, supervised_tokens) -> list[int]:
    """The random draw of choose_subsets (and of the random arms, so `--arms random` with a
    seed is the matched_random_k of `--random-match rows` with that seed)."""
    if random_match == "tokens":
        return token_matched_random_rows(candidates, reference, supervised_tokens, seed,
                                         allow_overlap)
    if random_match == "stratified":
        return length_stratified_random_rows(candidates, reference, supervised_tokens, seed,
                                             allow_overlap)
    position = {row: i for i, row in enumerate(candidates)}
    drawn = random_rows(len(candidates), k, seed, exclude=[position[r] for r in reference],
                        allow_overlap=allow_overlap)
    return [candidates[i] for i in drawn]


# ---------------------------------------------------------------------------------------------
# the verdict's arms


def check_arms(arms, arm_scores: dict | None = None) -> list[str]:
    """The arm names of --arms, each known (ARMS, or given its own scores) and given once."""
    arm_scores = arm_scores or {}
    arms = list(arms)
    if not arms:
        raise PipelineError("--arms: no arm named")
    for arm in arms:
        if arm not in ARMS and arm not in arm_scores:
            raise PipelineError(f"--arms: unknown arm '{arm}' (known: {', '.join(ARMS)}; any "
                                "other name needs --arm-scores NAME=PATH)")
        if arm in SCORE_ARMS and arm not in arm_scores:
            raise PipelineError(f"--arms {arm} needs its scores: --arm-scores {arm}=PATH")
    twice = sorted({a for a in arms if arms.count(a) > 1})
    if twice:
        raise PipelineError(f"--arms names {twice[0]} twice")
    return arms


def _as_float(values, n: int, what: str):
    """A float array of n entries, None as NaN."""
    import numpy as np

    values = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    if values.shape != (n,):
        raise PipelineError(f"{what} has {values.size} entries, the pool has {n} rows")
    return values


def _best(values, candidates: list[int], k: int, arm: str, what: str) -> list[int]:
    """The k candidates with the highest finite value, ties to the lower position."""
    import numpy as np

    masked = np.full(len(values), np.nan)
    masked[candidates] = values[candidates]
    ranking = rank_rows(masked)
    if k > len(ranking):
        raise PipelineError(f"arm {arm}: k {k} is larger than the {len(ranking)} candidate rows "
                            f"with {what} (rows with a finite attribution score)")
    return sorted(ranking[:k])


def select_arm(arm: str, k: int, scores, *, supervised_tokens, seed: int = 0, reward=None,
               arm_scores: dict | None = None, allow_overlap: bool = False,
               outcome=None) -> list[int]:
    """The k (random_tokens: as many as it takes) row positions of one arm, sorted.

    scores: the attribution score of every pool row (NaN = unscored; those rows are never
    chosen by any arm). supervised_tokens: every row's supervised tokens. reward: every row's
    reward_model_score (None/NaN never chosen; only the reward arm needs it). arm_scores:
    {arm name: that arm's score per pool row} for the score arms. seed: the random arms' draw.
    outcome: every row's outcome label (only random_outcome_stratified needs it)."""
    import numpy as np

    check_arms([arm], arm_scores)
    scores = _as_float(scores, len(scores), "scores")
    n = len(scores)
    tokens = _as_float(supervised_tokens, n, "supervised_tokens")
    ranking = rank_rows(scores)
    candidates = sorted(ranking)
    if arm in (arm_scores or {}):
        return _best(_as_float(arm_scores[arm], n, f"the scores of arm {arm}"), candidates, k,
                     arm, f"a finite {arm} score")
    if arm == "attribution":
        return top_k_rows(ranking, k)
    if arm == "attribution_bottom":
        return _best(-scores, candidates, k, arm, "a finite score")
    if arm == "longest":
        return _best(tokens, candidates, k, arm, "supervised tokens")
    if arm == "reward":
        if reward is None:
            raise PipelineError("arm reward needs the pool's reward_model_score column")
        return _best(_as_float(reward, n, "reward_model_score"), candidates, k, arm,
                     "a reward_model_score")
    reference = top_k_rows(ranking, k)
    if arm == "random_outcome_stratified":
        if outcome is None:
            raise PipelineError("arm random_outcome_stratified needs the pool's outcome column "
                                "(quality; dataset.py --task taboo writes it)")
        if len(outcome) != n:
            raise PipelineError(f"outcome has {len(outcome)} entries, the pool has {n} rows")
        return outcome_length_stratified_random_rows(candidates, reference,
                                                     np.asarray(supervised_tokens), list(outcome),
                                                     seed, allow_overlap)
    match = {"random": "rows", "random_stratified": "stratified", "random_tokens": "tokens"}[arm]
    return random_control(candidates, reference, k, seed, allow_overlap, match,
                          np.asarray(supervised_tokens))


def summarize_arms(selections: dict, scores, num_tokens, num_supervised,
                   arm_scores: dict | None = None) -> dict:
    """{arm: rows, tokens, supervised_tokens, mean_score (the attribution score, comparable
    across arms), mean_own_score (a score arm's own column)} for score.py's summary.json; report.py
    shows them next to the tokens each arm trained on."""
    import numpy as np

    scores = _as_float(scores, len(scores), "scores")
    out = {}
    for arm, rows in selections.items():
        idx = np.asarray(rows, dtype=np.int64)
        entry = {"rows": len(rows), "tokens": int(np.sum(np.asarray(num_tokens)[idx])),
                 "supervised_tokens": int(np.sum(np.asarray(num_supervised)[idx])),
                 "mean_score": float(np.mean(scores[idx])) if len(rows) else None}
        if arm in (arm_scores or {}):
            own = _as_float(arm_scores[arm], len(scores), f"the scores of arm {arm}")
            entry["mean_own_score"] = float(np.mean(own[idx])) if len(rows) else None
        out[arm] = entry
    return out


def read_arm_scores(name: str, path, row_ids: list):
    """The scores of arm `name` for the pool rows row_ids, in their order: from a score.py folder
    (its train_scores.jsonl, field score) or a JSONL file (train_bidir_classifier.py's
    row_scores.jsonl: predicted_score, the out-of-fold prediction; else score). null = NaN. The
    file must cover exactly the pool's rows: other rows mean scores from another run."""
    import numpy as np

    from pipeline import read_jsonl

    path = Path(path)
    file = path / "train_scores.jsonl" if path.is_dir() else path
    what = f"--arm-scores {name}={path}:"
    rows = read_jsonl(file, f"--arm-scores {name}")
    if not rows:
        raise PipelineError(f"{what} {file} has no rows")
    field = "predicted_score" if "predicted_score" in rows[0] else "score"
    by_id = {}
    for line, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "row_id" not in row or field not in row:
            raise PipelineError(f"{what} {file} row {line} has no row_id or {field}")
        value = row[field]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PipelineError(f"{what} {file} row {line}: {field} must be a number or null, "
                                f"got {value!r}")
        if row["row_id"] in by_id:
            raise PipelineError(f"{what} {file} lists row_id {row['row_id']!r} twice")
        by_id[row["row_id"]] = np.nan if value is None else float(value)
    missing = [r for r in row_ids if r not in by_id]
    extra = set(by_id) - set(row_ids)
    if missing or extra:
        example = missing[0] if missing else sorted(map(str, extra))[0]
        raise PipelineError(f"{what} {file} does not cover the pool's rows ({len(missing)} "
                            f"missing, {len(extra)} not in the pool, e.g. {example!r}): scores "
                            "of another split or run")
    return np.asarray([by_id[r] for r in row_ids], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# the linear datamodeling score's subsets (lds.py draw)


def lds_subsets(n_pool: int, n_subsets: int, alpha: float, seed: int, trades: int | None = None):
    """M = n_subsets random subsets of range(n_pool) for the linear datamodeling score, as a
    boolean membership matrix [M, n_pool]: every row is in exactly c = round(alpha * M) subsets
    and every subset holds n_pool * c / M rows (+-1), so no row is over- or under-represented and
    a subset's size says nothing (its score sum is then comparable across subsets).

    Independent uniform draws (TRAK's) leave each row in Binomial(M, alpha) subsets; fixing both
    margins and drawing the matrix uniformly among those that have them is what no library
    offers, so it is done here with the curveball algorithm (Strona et al. 2014): start from a
    cyclic design on a seeded permutation of the rows, then trade between random pairs of subsets
    (the rows in exactly one of the two are pooled, shuffled and dealt back in the same numbers),
    which keeps both margins and mixes the overlaps. Same seed, same subsets."""
    import numpy as np

    if n_subsets < 2:
        raise PipelineError(f"--subsets must be >= 2 (a Spearman correlation over subsets), got "
                            f"{n_subsets}")
    if not 0.0 < alpha < 1.0:
        raise PipelineError(f"--alpha must be in (0, 1), got {alpha}")
    per_row = int(round(alpha * n_subsets))
    if not 1 <= per_row <= n_subsets - 1:
        raise PipelineError(f"--alpha {alpha} x --subsets {n_subsets} puts every row in "
                            f"{per_row} subsets: need 1 .. {n_subsets - 1}")
    if n_pool < 2:
        raise PipelineError(f"the pool has {n_pool} rows: a subset draw needs >= 2")
    rng = np.random.default_rng(seed)
    member = np.zeros((n_subsets, n_pool), dtype=bool)
    # cyclic start: the row at position p fills slots p*c .. p*c+c-1, slot s goes to subset s % M
    order = rng.permutation(n_pool)
    slots = np.arange(n_pool * per_row)
    member[slots % n_subsets, order[slots // per_row]] = True
    for _ in range(trades if trades is not None else 50 * n_subsets):
        a, b = rng.choice(n_subsets, size=2, replace=False)
        only_a = np.flatnonzero(member[a] & ~member[b])
        only_b = np.flatnonzero(member[b] & ~member[a])
        pooled = rng.permutation(np.concatenate([only_a, only_b]))
        member[a, pooled] = False
        member[b, pooled] = False
        member[a, pooled[:len(only_a)]] = True
        member[b, pooled[len(only_a):]] = True
    return member
