"""score.py and rank_windows.py on the tiny model: bergson's scores against brute-force autograd,
the token ids bergson sees against finetune.py's, subsets, determinism and bad input. These runs
pass TODAY, the pre-2026-12 score (summed loss, inner product, mean-eigenvalue damping), so their
brute-force checks stay the plain formulas; tests/test_score_formulas.py checks every
normalisation against autograd."""

import json

import numpy as np
import pytest

from conftest import run_script
from helpers import (MAX_LEN, assert_bergson_sees_finetune_ids, copy_run, lora_gradients,
                     split_rows)
from pipeline import split_fingerprint

SCORE_ARGS = ("--max-length", MAX_LEN, "--token-batch-size", 512, "--projection-dim", 0,
              "--subset-k", 8, "--precision", "fp32")
TODAY = ("--score-normalization", "none", "--loss-reduction", "sum", "--damping-rule", "mean_eig",
         "--preconditioning-mode", "none")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, score_run):
    run_dir = copy_run(score_run, tmp_path_factory.mktemp("score") / "run")
    runs = {}
    for name, extra in {"mean": ("--score-mode", "mean"),
                        "mean_again": ("--score-mode", "mean"),
                        "nearest": ("--score-mode", "nearest"),
                        "precond": ("--score-mode", "mean", "--preconditioning-mode", "query",
                                    "--damping", 0.3)}.items():
        run_script("score.py", "--manifest", run_dir / "manifest.json",
                   "--adapter-path", run_dir / "base_adapter", "--output-dir", run_dir / name,
                   *SCORE_ARGS, *TODAY, *extra)
        runs[name] = run_dir / name
    return run_dir, runs


def read_scores(out_dir):
    return [json.loads(line) for line in (out_dir / "train_scores.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def brute_force(scored_run):
    run_dir, _ = scored_run
    return lora_gradients(run_dir, "train_base"), lora_gradients(run_dir, "attr_query")


def scores_array(out_dir):
    return np.array([r["score"] for r in read_scores(out_dir)], dtype=float)


def test_mean_scores_equal_bruteforce_dot_with_mean_query_gradient(scored_run, brute_force):
    train, query = brute_force
    expected = sum((train[m] @ query[m].mean(0)).numpy() for m in train)
    np.testing.assert_allclose(scores_array(scored_run[1]["mean"]), expected, rtol=2e-3,
                               atol=1e-3 * np.abs(expected).max())


def test_nearest_scores_equal_bruteforce_max_over_queries(scored_run, brute_force):
    train, query = brute_force
    per_query = sum((train[m] @ query[m].T).numpy() for m in train)
    expected = per_query.max(axis=1)
    np.testing.assert_allclose(scores_array(scored_run[1]["nearest"]), expected, rtol=2e-3,
                               atol=1e-3 * np.abs(expected).max())
    assert not np.allclose(expected, scores_array(scored_run[1]["mean"]), rtol=0.05)


def test_query_preconditioning_matches_documented_formula(scored_run, brute_force):
    """s_i = sum_m g_im^T (H_m + d*mean(eig H_m)*I)^-1 mean_j q_jm, H_m = mean_j q_jm q_jm^T."""
    import torch

    train, query = brute_force
    damping = 0.3
    expected = 0.0
    for m in train:
        h = query[m].T @ query[m] / query[m].shape[0]
        damped = h + damping * torch.linalg.eigvalsh(h).mean() * torch.eye(h.shape[0],
                                                                           dtype=h.dtype)
        expected = expected + (train[m] @ torch.linalg.solve(damped, query[m].mean(0))).numpy()
    got = scores_array(scored_run[1]["precond"])
    np.testing.assert_allclose(got, expected, rtol=5e-3, atol=2e-3 * np.abs(expected).max())
    summary = json.loads((scored_run[1]["precond"] / "summary.json").read_text())
    assert summary["preconditioning_mode"] == "query" and summary["damping"] == damping


@pytest.mark.parametrize("name", ["mean", "nearest", "precond"])
def test_bergson_sees_exactly_finetune_token_ids(scored_run, name):
    run_dir, runs = scored_run
    assert_bergson_sees_finetune_ids(run_dir, runs[name])


def test_chat_template_mode_scores_different_ids(scored_run):
    run_dir, _ = scored_run
    out = run_dir / "chat"
    result = run_script("score.py", "--manifest", run_dir / "manifest.json",
                        "--adapter-path", run_dir / "base_adapter", "--output-dir", out,
                        "--tokenization-mode", "chat_template", *SCORE_ARGS, *TODAY)
    assert "chat_template mode" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenization_mode"] == "chat_template"
    alignment = summary["alignment"]
    assert alignment["rows"] == 40
    assert alignment["rows_with_identical_labels"] < alignment["rows"]
    assert not np.allclose(scores_array(out), scores_array(run_dir / "mean"), rtol=1e-3)


def test_outputs_rank_subsets_and_manifest(scored_run):
    run_dir, runs = scored_run
    out = runs["mean"]
    rows = read_scores(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_total"] == 40 and summary["finite_coverage"] == 1.0
    assert summary["projection_dim"] == 0 and summary["tokenization_mode"] == "finetune_raw"
    assert summary["provenance"]["argv"][0] == "score.py" and summary["bergson_version"]
    assert summary["train_split"] == "score_pool"  # the default: the manifest's score_pool
    assert (summary["score_normalization"], summary["loss_reduction"], summary["damping_rule"],
            summary["preconditioning_mode"]) == ("none", "sum", "mean_eig", "none")
    assert summary["train_fingerprint"] == split_fingerprint(split_rows(run_dir, "train_base"))
    assert not (out / "bergson").exists()  # the gradient indices go unless --keep-gradients
    assert (out / "bergson_data" / "train").is_dir()
    ranked = sorted(rows, key=lambda r: r["rank"])
    assert [r["rank"] for r in ranked] == list(range(1, 41))
    assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:]))
    top_ids = {r["row_id"] for r in ranked[:8]}

    manifest = json.loads((out / "continuation_manifest.json").read_text())
    assert set(manifest["splits"]) == {"top_k", "matched_random_k", "eval", "attr_query"}
    assert manifest["selection"]["allow_overlap"] is False and manifest["selection"]["seed"] == 42
    top = set(split_rows(out, "top_k", "continuation_manifest.json")["row_id"])
    rand = set(split_rows(out, "matched_random_k", "continuation_manifest.json")["row_id"])
    assert top == top_ids and len(rand) == 8 and not top & rand
    assert {r["row_id"] for r in rows if r["in_matched_random_k"]} == rand


def test_same_seed_same_ranking_and_subsets(scored_run):
    _, runs = scored_run
    a, b = read_scores(runs["mean"]), read_scores(runs["mean_again"])
    assert [(r["row_id"], r["rank"], r["in_top_k"], r["in_matched_random_k"]) for r in a] == \
           [(r["row_id"], r["rank"], r["in_top_k"], r["in_matched_random_k"]) for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-6)


def test_continuation_manifest_trains_and_evaluates(scored_run):
    run_dir, runs = scored_run
    manifest = runs["mean"] / "continuation_manifest.json"
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", manifest,
               "--train-split", "top_k",
               "--resume-adapter", run_dir / "base_adapter", "--output-dir", run_dir / "top_ft",
               "--max-steps", 2, "--max-length", MAX_LEN)
    run_script("eval_loss.py", "--manifest", manifest, "--adapter-path", run_dir / "top_ft",
               "--output-json", run_dir / "top_eval.json", "--max-length", MAX_LEN)
    result = json.loads((run_dir / "top_eval.json").read_text())
    assert result["num_eval_rows"] == 12


@pytest.mark.parametrize("change, message", [
    (("--subset-k", 41), "larger than split 'score_pool'"),
    (("--train-split", "nope"), "has no split 'nope'"),
    (("--adapter-path", "MISSING"), "does not exist"),
    (("--max-length", 600), "exceeds --token-batch-size"),
])
def test_bad_input_fails_cleanly(scored_run, tmp_path, change, message):
    run_dir, _ = scored_run
    args = ["--manifest", run_dir / "manifest.json", "--adapter-path", run_dir / "base_adapter",
            "--output-dir", tmp_path / "out", *SCORE_ARGS]
    flag, value = change
    if value == "MISSING":
        value = tmp_path / "no_adapter"
    i = args.index(flag) if flag in args else None
    if i is None:
        args += [flag, value]
    else:
        args[i + 1] = value
    result = run_script("score.py", *args, expect_ok=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_dir_is_refused(scored_run):
    run_dir, runs = scored_run
    result = run_script("score.py", "--manifest", run_dir / "manifest.json",
                        "--adapter-path", run_dir / "base_adapter", "--output-dir", runs["mean"],
                        *SCORE_ARGS, expect_ok=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_rank_windows_splits(scored_run, tmp_path):
    run_dir, runs = scored_run
    out = tmp_path / "ablations" / "manifest.json"
    args = ["--scores-dir", runs["mean"], "--output", out, "--top", 10, "--window", 11, 21,
            "--random-from", 6, 21, "--seed", 5]
    run_script("rank_windows.py", *args)
    manifest = json.loads(out.read_text())
    names = {"top10_from_mean12", "rank11_20", "rand6_from_rank21plus", "eval", "attr_query"}
    assert set(manifest["splits"]) == names
    rank_of = {r["row_id"]: r["rank"] for r in read_scores(runs["mean"])}
    ranks = {n: sorted(rank_of[r] for r in split_rows(out.parent, n, "manifest.json")["row_id"])
             for n in ("top10_from_mean12", "rank11_20", "rand6_from_rank21plus")}
    assert ranks["top10_from_mean12"] == list(range(1, 11))
    assert ranks["rank11_20"] == list(range(11, 21))
    assert len(ranks["rand6_from_rank21plus"]) == 6 and min(ranks["rand6_from_rank21plus"]) >= 21
    run_script("rank_windows.py", *args, "--overwrite")
    again = json.loads(out.read_text())
    assert again["selection"]["rank_positions"] == manifest["selection"]["rank_positions"]
    bad = run_script("rank_windows.py", "--scores-dir", runs["mean"], "--output",
                     tmp_path / "b.json", "--window", 30, 60, expect_ok=False)
    assert bad.returncode == 2 and "--window 30 60" in bad.stderr


def test_help_documents_every_mode():
    out = run_script("score.py", "--help").stdout
    for flag in ["--manifest", "--adapter-path", "--output-dir", "--score-mode", "nearest",
                 "--preconditioning-mode", "--projection-dim", "--tokenization-mode",
                 "finetune_raw", "chat_template", "--subset-k", "--train-split", "--query-split",
                 "--seed", "--allow-overlap", "--max-length", "--precision",
                 "--token-batch-size", "--score-normalization", "--damping-rule",
                 "mean_abs_entry", "mean_eig", "--mixing-coefficient", "--scores-only",
                 "--gradients-from", "--keep-gradients", "cos( g_i , P qbar )",
                 "qbar = mean_j ( q_j / ||q_j|| )", "max_j cos( R g_i , R q_j )",
                 "favours long rows", "favours short rows", "removes the gradient norm"]:
        assert flag in out, flag


def test_scores_from_redraws_only_the_subsets(scored_run, tmp_path):
    run_dir, runs = scored_run
    common = ["--manifest", run_dir / "manifest.json", "--scores-from", runs["mean"],
              "--subset-k", 8]
    run_script("score.py", *common, "--seed", 42, "--output-dir", tmp_path / "same_seed")
    run_script("score.py", *common, "--seed", 7, "--output-dir", tmp_path / "seed_7")
    original = read_scores(runs["mean"])
    # the same seed reproduces the bergson run's outputs, without running bergson
    assert read_scores(tmp_path / "same_seed") == original
    assert not (tmp_path / "same_seed" / "bergson").exists()
    assert (split_rows(tmp_path / "same_seed", "matched_random_k", "continuation_manifest.json")
            ["row_id"] == split_rows(runs["mean"], "matched_random_k",
                                     "continuation_manifest.json")["row_id"])
    # another seed: same scores and top-k, another random subset, still outside the top-k
    redrawn = read_scores(tmp_path / "seed_7")
    assert [(r["row_id"], r["score"], r["rank"], r["in_top_k"]) for r in redrawn] == \
           [(r["row_id"], r["score"], r["rank"], r["in_top_k"]) for r in original]
    random_7 = {r["row_id"] for r in redrawn if r["in_matched_random_k"]}
    random_42 = {r["row_id"] for r in original if r["in_matched_random_k"]}
    assert len(random_7) == 8 and random_7 != random_42
    assert not random_7 & {r["row_id"] for r in redrawn if r["in_top_k"]}
    summary = json.loads((tmp_path / "seed_7" / "summary.json").read_text())
    assert summary["scores_from"] == str(runs["mean"].resolve())
    assert summary["provenance"]["seed"] == 7 and summary["n_finite"] == 40
    manifest = json.loads((tmp_path / "seed_7" / "continuation_manifest.json").read_text())
    assert manifest["selection"]["seed"] == 7 and manifest["selection"]["scores_from"]
    # --random-match tokens: the random subset matches the top-k's supervised tokens
    run_script("score.py", *common, "--seed", 7, "--random-match", "tokens",
               "--output-dir", tmp_path / "tokens")
    by_tokens = json.loads((tmp_path / "tokens" / "summary.json").read_text())
    top_tokens = by_tokens["top_k"]["supervised_tokens"]
    assert by_tokens["random_match"] == "tokens" and summary["random_match"] == "rows"
    assert by_tokens["matched_random_k"]["supervised_tokens"] >= top_tokens
    token_rows = split_rows(tmp_path / "tokens", "matched_random_k", "continuation_manifest.json")
    assert len(token_rows["row_id"]) == by_tokens["matched_random_k"]["rows"]
    selection = json.loads((tmp_path / "tokens" / "continuation_manifest.json").read_text())[
        "selection"]
    assert selection["random_match"] == "tokens"
    assert selection["matched_random_rows"] == by_tokens["matched_random_k"]["rows"]
    # scores of other rows are refused
    result = run_script("score.py", "--manifest", run_dir / "manifest.json", "--scores-from",
                        runs["mean"], "--train-split", "eval", "--subset-k", 4,
                        "--output-dir", tmp_path / "bad", expect_ok=False)
    assert result.returncode == 2 and "scored split 'score_pool'" in result.stderr
    assert not (tmp_path / "bad").exists()
    # the same row ids with other content (a corrupted twin) are refused too
    twin = corrupted_twin(run_dir, tmp_path / "twin")
    result = run_script("score.py", "--manifest", twin, "--scores-from", runs["mean"],
                        "--subset-k", 8, "--output-dir", tmp_path / "twin_out", expect_ok=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(runs["mean"]) in result.stderr and str(tmp_path / "twin_out") in result.stderr
    assert "train_fingerprint" in result.stderr and not (tmp_path / "twin_out").exists()


def corrupted_twin(run_dir, out):
    """A manifest whose score_pool has the same row ids as run_dir's and one other completion."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    pool = split_rows(run_dir, "score_pool")
    twin = pool.map(lambda row, i: {"completion": row["completion"] + (" (changed)" if i == 0
                                                                        else "")},
                    with_indices=True)
    twin.save_to_disk(str(out / "score_pool"))
    for name, entry in manifest["splits"].items():
        entry["path"] = str(out / "score_pool") if name == "score_pool" else str(
            (run_dir / entry["path"]).resolve())
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert twin["row_id"] == pool["row_id"]
    return out / "manifest.json"


def test_split_fingerprint_sees_content_and_order(scored_run, tmp_path):
    run_dir, _ = scored_run
    pool = split_rows(run_dir, "score_pool")
    assert split_fingerprint(pool) == split_fingerprint(split_rows(run_dir, "train_base"))
    assert split_fingerprint(pool).startswith("sha256:")
    changed = split_rows(tmp_path, "score_pool", corrupted_twin(run_dir, tmp_path).name)
    assert split_fingerprint(changed) != split_fingerprint(pool)
    assert split_fingerprint(pool.select(range(len(pool))[::-1])) != split_fingerprint(pool)
