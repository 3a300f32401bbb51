"""subsets.py: the one home of every subset draw (top-k, uniform random, token-matched random,
length-stratified random), on hand-made pools."""

import numpy as np
import pytest

from subsets import (choose_subsets, length_strata, length_stratified_random_rows, random_rows,
                     rank_rows)


def test_choose_subsets_overlap_policy_and_seed():
    scores = np.array([5.0, np.nan, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    ranking = rank_rows(scores)
    assert ranking == [3, 7, 5, 9, 0, 8, 2, 6, 4]
    top, rand = choose_subsets(ranking, 3, seed=1, allow_overlap=False)
    assert top == [3, 5, 7] and not set(top) & set(rand) and 1 not in rand
    assert choose_subsets(ranking, 3, seed=1, allow_overlap=False) == (top, rand)
    draws = {tuple(choose_subsets(ranking, 4, seed=s, allow_overlap=True)[1]) for s in range(30)}
    assert any(set(d) & {3, 5, 7, 9} for d in draws) and all(1 not in d for d in draws)
    with pytest.raises(Exception, match="outside the top-k"):
        choose_subsets(ranking, 5, seed=1, allow_overlap=False)


def test_token_matched_random_subset_reaches_top_k_tokens():
    scores = np.array([5.0, np.nan, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5, 0.2])
    tokens = np.array([10, 99, 3, 10, 2, 8, 5, 12, 4, 6, 7, 8])
    ranking = rank_rows(scores)
    top, rand = choose_subsets(ranking, 3, seed=3, allow_overlap=False, random_match="tokens",
                               supervised_tokens=tokens)
    assert top == [3, 5, 7]                                    # 30 tokens
    target = tokens[top].sum()
    assert not set(top) & set(rand) and 1 not in rand          # outside top-k, finite scores only
    assert tokens[rand].sum() >= target
    # the shortest prefix of the seeded order: without its last row it falls short
    pool = sorted(set(ranking) - set(top))
    order = [pool[i] for i in np.random.default_rng(3).permutation(len(pool))]
    assert sorted(order[:len(rand)]) == rand and tokens[order[:len(rand) - 1]].sum() < target
    assert choose_subsets(ranking, 3, seed=3, allow_overlap=False, random_match="tokens",
                          supervised_tokens=tokens) == (top, rand)
    with pytest.raises(Exception, match="needs 46 supervised tokens.* hold 29 outside"):
        choose_subsets(ranking, 5, seed=3, allow_overlap=False, random_match="tokens",
                       supervised_tokens=tokens)


def test_stratified_draw_matches_the_reference_length_mix_exactly():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 500, size=400)
    # a length-biased selector: the 60 best rows by a score that grows with length
    scores = tokens + rng.normal(0, 300, size=400)
    ranking = rank_rows(scores)
    candidates = sorted(ranking)
    stratum = length_strata(candidates, tokens)
    assert sorted(set(stratum.values())) == [0, 1, 2, 3, 4]
    assert all(70 <= list(stratum.values()).count(s) <= 90 for s in range(5))   # quintiles
    for seed in (1, 2):
        top, rand = choose_subsets(ranking, 60, seed=seed, allow_overlap=False,
                                   random_match="stratified", supervised_tokens=tokens)
        mix = lambda rows: [sum(stratum[r] == s for r in rows) for s in range(5)]  # noqa: E731
        assert mix(rand) == mix(top) and len(rand) == 60 and not set(rand) & set(top)
        assert mix(top)[4] > mix(top)[0]          # the reference really is length-biased
        assert choose_subsets(ranking, 60, seed=seed, allow_overlap=False,
                              random_match="stratified", supervised_tokens=tokens)[1] == rand
    other = choose_subsets(ranking, 60, seed=3, allow_overlap=False, random_match="stratified",
                           supervised_tokens=tokens)[1]
    assert other != rand
    # the uniform control does not keep the mix: its longest quintile is near 12, the top's is not
    uniform = choose_subsets(ranking, 60, seed=1, allow_overlap=False)[1]
    assert abs(mix(uniform)[4] - 12) < abs(mix(top)[4] - 12)


def test_stratified_draw_refuses_a_stratum_it_cannot_fill():
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    ranking = list(range(9, -1, -1))                 # longest first
    with pytest.raises(Exception, match="needs 2 rows of length quintile 5, the pool has 0"):
        length_stratified_random_rows(sorted(ranking), [8, 9], tokens, 1, allow_overlap=False)
    assert len(length_stratified_random_rows(sorted(ranking), [8, 9], tokens, 1,
                                             allow_overlap=True)) == 2


def test_random_rows_seeded_and_disjoint():
    a = random_rows(50, 10, seed=4, exclude=range(10))
    assert a == random_rows(50, 10, seed=4, exclude=range(10)) and min(a) >= 10
    assert a != random_rows(50, 10, seed=5, exclude=range(10))
