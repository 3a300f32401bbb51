"""Subset draws: every way the pipeline picks k rows out of a scored pool, in one place, so the
attribution top-k (score.py), the SAE predictor's top-k (train_bidir_classifier.py) and the
rank-window ablations (rank_windows.py) are compared against controls drawn the same way.

Rows are integer positions in the pool (a split). A ranking is a list of positions, best first.
Every random draw is numpy `default_rng(seed)`, so the same seed gives the same subset.

  top_k_rows                    the k best-ranked rows
  random_rows                   k rows uniformly at random (the seed project's control)
  token_matched_random_rows     a random run of rows holding the reference's supervised tokens
  length_stratified_random_rows as many rows per length quintile as the reference has
  choose_subsets                top-k plus the control named by --random-match
"""

from __future__ import annotations

from pipeline import PipelineError

RANDOM_MATCHES = ("rows", "tokens", "stratified")
LENGTH_STRATA = 5  # quintiles of supervised tokens


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
    import numpy as np

    stratum = length_strata(candidates, supervised_tokens, n_strata)
    pool = _outside(candidates, reference, allow_overlap)
    rng = np.random.default_rng(seed)
    drawn = []
    for s in range(n_strata):
        need = sum(1 for r in reference if stratum[r] == s)
        members = [r for r in pool if stratum[r] == s]
        if need > len(members):
            raise PipelineError(f"--random-match stratified needs {need} rows of length quintile "
                                f"{s + 1}, the pool has {len(members)}"
                                + _overlap_hint(allow_overlap))
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
    candidates = sorted(ranking)
    if random_match != "rows" and supervised_tokens is None:
        raise PipelineError(f"--random-match {random_match} needs each row's supervised tokens")
    if random_match == "tokens":
        return top, token_matched_random_rows(candidates, top, supervised_tokens, seed,
                                              allow_overlap)
    if random_match == "stratified":
        return top, length_stratified_random_rows(candidates, top, supervised_tokens, seed,
                                                  allow_overlap)
    position = {row: i for i, row in enumerate(candidates)}
    drawn = random_rows(len(candidates), k, seed, exclude=[position[r] for r in top],
                        allow_overlap=allow_overlap)
    return top, [candidates[i] for i in drawn]
