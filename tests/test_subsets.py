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


# ---------------------------------------------------------------------------------------------
# the verdict's arms (select_arm): each is what its name says on a hand-made pool

# 12 rows; row 5 has no attribution score (no supervised token), so no arm may choose it
POOL_SCORES = np.array([0.9, 0.1, 0.5, 0.7, 0.3, np.nan, 0.8, 0.2, 0.6, 0.4, 0.05, 0.65])
POOL_TOKENS = np.array([10, 50, 20, 30, 50, 0, 5, 40, 15, 25, 60, 12])
POOL_REWARD = [0.2, 0.9, None, 0.5, 0.9, 1.0, 0.1, 0.3, 0.4, None, 0.7, 0.8]
RAW = np.array([1.0, 9.0, 2.0, 3.0, 8.0, 7.0, 0.0, 6.0, 4.0, 5.0, np.nan, 2.5])


def big_pool(n=200):
    rng = np.random.default_rng(11)
    tokens = rng.integers(1, 300, size=n)
    scores = tokens + rng.normal(0, 200, size=n)
    scores[[3, 50]] = np.nan
    return scores, tokens


def arm(name, k=3, seed=0, **kw):
    from subsets import select_arm

    kw.setdefault("arm_scores", {"attribution_raw": RAW, "sae": -POOL_SCORES})
    return select_arm(name, k, POOL_SCORES, supervised_tokens=POOL_TOKENS, seed=seed,
                      reward=POOL_REWARD, **kw)


def test_each_arm_is_what_its_name_says():
    top = [0, 3, 6]                                      # scores 0.9, 0.8, 0.7
    assert arm("attribution") == top
    assert arm("attribution_bottom") == [1, 7, 10]       # 0.1, 0.2, 0.05; NaN row 5 never
    # most supervised tokens: 60 (row 10), then 50 twice (rows 1 and 4: ties by position)
    assert arm("longest") == [1, 4, 10]
    assert arm("longest", k=2) == [1, 10]
    # reward 1.0 is row 5's (unscored: not a candidate); 0.9 twice (1, 4), then 0.8 (11); None never
    assert arm("reward") == [1, 4, 11]
    assert arm("reward", k=9) == sorted(set(range(12)) - {2, 5, 9})
    # score arms: the top-k of their own column among the candidates (row 5's 7.0 and row 10's
    # NaN never count)
    assert arm("attribution_raw") == [1, 4, 7]
    assert arm("sae") == arm("attribution_bottom")       # minus the score: the bottom
    assert arm("my_score", arm_scores={"my_score": POOL_TOKENS.astype(float)}) == arm("longest")
    for seed in range(20):
        uniform = arm("random", k=4, seed=seed)
        assert len(uniform) == 4 and not set(uniform) & set(top) and 5 not in uniform
        assert 5 not in arm("random", k=4, seed=seed, allow_overlap=True)
        tokens = arm("random_tokens", seed=seed)
        assert POOL_TOKENS[tokens].sum() >= POOL_TOKENS[top].sum() and not set(tokens) & set(top)


def test_random_arm_is_score_py_matched_random_k():
    """--arms random with seed s draws what --random-match rows draws with s (and likewise for
    tokens and stratified): one draw, whichever way score.py is asked."""
    from subsets import choose_subsets

    from subsets import select_arm

    scores, tokens = big_pool()
    ranking = rank_rows(scores)
    for seed in (0, 1, 7):
        for name, match in (("random", "rows"), ("random_tokens", "tokens"),
                            ("random_stratified", "stratified")):
            assert select_arm(name, 20, scores, supervised_tokens=tokens, seed=seed) == \
                choose_subsets(ranking, 20, seed, False, match, supervised_tokens=tokens)[1]


def test_stratified_arm_matches_the_reference_mix_exactly():
    from subsets import select_arm

    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 500, size=400)
    scores = tokens + rng.normal(0, 300, size=400)      # a length-biased score
    stratum = length_strata(sorted(rank_rows(scores)), tokens)
    mix = lambda rows: [sum(stratum[r] == s for r in rows) for s in range(5)]  # noqa: E731
    top = select_arm("attribution", 60, scores, supervised_tokens=tokens)
    draws = []
    for seed in (1, 2, 3):
        rows = select_arm("random_stratified", 60, scores, supervised_tokens=tokens, seed=seed)
        assert mix(rows) == mix(top) and not set(rows) & set(top)
        assert rows == select_arm("random_stratified", 60, scores, supervised_tokens=tokens,
                                  seed=seed)
        draws.append(rows)
    assert mix(top)[4] > 2 * mix(top)[0]                  # the reference really is length-biased
    assert len({tuple(d) for d in draws}) == 3


def test_random_arms_change_with_the_seed_deterministic_arms_do_not():
    from subsets import ARMS, RANDOM_ARMS

    from subsets import select_arm

    scores, tokens = big_pool()
    rng = np.random.default_rng(5)
    extra = {"attribution_raw": rng.normal(size=len(scores)), "sae": rng.normal(size=len(scores))}
    reward = rng.uniform(size=len(scores)).tolist()
    outcome = ["success" if i % 3 else "lose" for i in range(len(scores))]  # Taboo's arm

    def draw(name, seed):
        return tuple(select_arm(name, 20, scores, supervised_tokens=tokens, seed=seed,
                                reward=reward, arm_scores=extra, outcome=outcome))

    for name in ARMS:
        per_seed = {draw(name, s) for s in range(6)}
        if name in RANDOM_ARMS:
            assert len(per_seed) == 6, name
            assert draw(name, 4) == draw(name, 4), name           # seeded: reproducible
        else:
            assert len(per_seed) == 1, name


def test_arm_errors_name_the_arm():
    from subsets import check_arms, select_arm

    with pytest.raises(Exception, match="unknown arm 'best'"):
        check_arms(["attribution", "best"])
    with pytest.raises(Exception, match="--arms sae needs its scores: --arm-scores sae=PATH"):
        check_arms(["sae"])
    with pytest.raises(Exception, match="names random twice"):
        check_arms(["random", "attribution", "random"])
    with pytest.raises(Exception, match="arm reward needs the pool's reward_model_score"):
        select_arm("reward", 2, POOL_SCORES, supervised_tokens=POOL_TOKENS)
    with pytest.raises(Exception, match="arm reward: k 10 is larger than the 9 candidate rows"):
        arm("reward", k=10)
    with pytest.raises(Exception, match="the scores of arm sae has 3 entries, the pool has 12"):
        arm("sae", arm_scores={"sae": [1.0, 2.0, 3.0]})


def test_summarize_and_read_arm_scores(tmp_path):
    import json

    from subsets import read_arm_scores, summarize_arms

    selections = {"attribution": arm("attribution"), "longest": arm("longest"),
                  "attribution_raw": arm("attribution_raw")}
    summary = summarize_arms(selections, POOL_SCORES, POOL_TOKENS + 100, POOL_TOKENS,
                             {"attribution_raw": RAW})
    assert summary["attribution"] == {"rows": 3, "tokens": 345, "supervised_tokens": 45,
                                      "mean_score": pytest.approx(0.8)}
    assert summary["longest"]["supervised_tokens"] == 160
    assert summary["attribution_raw"]["mean_own_score"] == pytest.approx((9 + 8 + 6) / 3)

    ids = [f"train:{i}" for i in range(4)]
    folder = tmp_path / "scores_raw"
    folder.mkdir()
    (folder / "train_scores.jsonl").write_text("".join(
        json.dumps({"row_id": i, "score": s, "rank": 1}) + "\n"
        for i, s in zip(reversed(ids), [4.0, None, 2.0, 1.0])))
    got = read_arm_scores("attribution_raw", folder, ids)
    assert got[0] == 1.0 and got[1] == 2.0 and np.isnan(got[2]) and got[3] == 4.0
    sae = tmp_path / "row_scores.jsonl"           # train_bidir_classifier.py's file
    sae.write_text("".join(json.dumps({"row_id": i, "true_score": 9.0, "predicted_score": p})
                           + "\n" for i, p in zip(ids, [0.1, 0.2, None, 0.4])))
    got = read_arm_scores("sae", sae, ids)
    assert got[0] == 0.1 and np.isnan(got[2]) and got[3] == 0.4
    with pytest.raises(Exception, match=r"does not cover the pool's rows \(1 missing, 0 not in"):
        read_arm_scores("sae", sae, ids + ["train:9"])
