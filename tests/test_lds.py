"""lds.py and recipes/lds.toml: the LDS of a known linear datamodel (true attributions near 1,
random near 0, reversed near -1); the subset draws seeded and balanced; score.py
--write-score-matrix (shape, ids, its mean over queries = the mean-query score, the size guard);
the recipe's plan; a small end-to-end run of recipes/lds.toml on the tiny model (4 subsets) and
its resume after one subset's outputs are deleted (only that subset retrains)."""

import json
import re
import shutil
import tomllib

import numpy as np
import pytest

import lds
import run_experiment as rx
from conftest import ROOT, run_script
from subsets import lds_subsets
from helpers import decisions, runner

RECIPE = ROOT / "recipes" / "lds.toml"


# ---------------------------------------------------------------------------------------------
# the statistic on a known datamodel: loss_q(S) = sum_{i in S} beta_qi + noise


def linear_world(seed=0, n=120, m=40, q=60, noise=0.02):
    rng = np.random.default_rng(seed)
    member = lds_subsets(n, m, 0.5, seed)
    beta = rng.normal(scale=0.01, size=(q, n))
    losses = 2.0 + member.astype(float) @ beta.T + rng.normal(scale=noise, size=(m, q))
    return member, beta, losses


def test_true_attributions_score_near_one_and_random_near_zero():
    member, beta, losses = linear_world()
    rng = np.random.default_rng(1)
    random_tau = rng.normal(size=beta.shape)
    table = lds.lds_table(member, losses, {
        "true": (-beta, -beta.mean(axis=0)),      # a higher score lowers the loss
        "reversed": (beta, beta.mean(axis=0)),
        "random": (random_tau, random_tau.mean(axis=0))}, resamples=500)
    true, reversed_, random = table["true"], table["reversed"], table["random"]
    assert true["lds"] > 0.9 and true["lds_ci"][0] > 0.85 and true["aggregate_lds"] > 0.8
    assert reversed_["lds"] < -0.9
    assert abs(random["lds"]) < 0.1 and random["lds_ci"][0] < 0 < random["lds_ci"][1]
    assert true["n_queries"] == beta.shape[0] and len(true["per_query"]) == beta.shape[0]
    # paired by query row: true beats random on every row; the difference is the per-row mean
    pairs = lds.paired_differences(table, lds.parse_pairs(["true:random"], list(table)),
                                   resamples=500)
    pair = pairs["true-random"]
    assert pair["difference"] == pytest.approx(np.mean(np.subtract(true["per_query"],
                                                                   random["per_query"])))
    assert pair["difference_ci"][0] > 0.8 and pair["a_wins"] == pair["n_queries"] == beta.shape[0]
    with pytest.raises(lds.PipelineError, match="no predictor truth"):
        lds.parse_pairs(["truth:random"], list(table))
    # the per-query value is scipy's Spearman of the summed scores against minus the loss
    from scipy.stats import spearmanr
    pred = member.astype(float) @ -beta[3]
    assert true["per_query"][3] == pytest.approx(spearmanr(pred, -losses[:, 3]).statistic)


def test_noise_pulls_the_lds_down_and_a_per_query_scale_does_not_matter():
    member, beta, clean = linear_world(noise=0.0)
    _, _, noisy = linear_world(noise=0.2)
    scaled = -beta * np.linspace(0.1, 10, beta.shape[0])[:, None]   # a positive factor per query
    table = lds.lds_table(member, clean, {"true": (-beta, -beta.mean(0)),
                                          "scaled": (scaled, scaled.mean(0))}, resamples=200)
    assert table["true"]["lds"] == pytest.approx(1.0)
    assert table["scaled"]["per_query"] == pytest.approx(table["true"]["per_query"])
    noisy_lds = lds.lds_table(member, noisy, {"true": (-beta, -beta.mean(0))},
                              resamples=200)["true"]["lds"]
    assert 0.1 < noisy_lds < 0.9


def test_unscored_rows_add_nothing_and_unscored_queries_have_no_lds():
    member, beta, losses = linear_world()
    tau = -beta.copy()
    tau[:, :5] = np.nan      # unscored train rows: 0 in every sum
    tau[7] = np.nan          # a query without a usable gradient
    result = lds.lds_table(member, losses, {"t": (tau, np.nan_to_num(tau).mean(axis=0))},
                           resamples=200)["t"]
    assert result["n_queries"] == beta.shape[0] - 1 and result["n_queries_without_lds"] == 1
    assert result["per_query"][7] is None
    filled = np.nan_to_num(tau[0], nan=0.0)
    assert np.allclose(lds.predictions(member, tau)[:, 0], member.astype(float) @ filled)


# ---------------------------------------------------------------------------------------------
# score.py's individual scores, against the formulas written out by hand


@pytest.mark.parametrize("preconditioning", ["none", "query"])
@pytest.mark.parametrize("normalization", ["none", "seed", "bergson"])
def test_individual_scores_equal_the_formulas(normalization, preconditioning):
    from score import attribution_scores

    rng = np.random.default_rng(0)
    sizes = {"a": 6, "b": 4}
    query, train = rng.normal(size=(5, 10)), rng.normal(size=(12, 10))
    query[2] = 0.0          # an unusable query row: NaN in the matrix, left out of the mean
    train[4] = 0.0          # an unusable train row: a NaN column
    scores, info = attribution_scores(query.astype(np.float32), train.astype(np.float32), sizes,
                                      normalization=normalization, score_mode="mean",
                                      preconditioning=preconditioning, individual=True)
    matrix = info["matrix"]
    q = np.delete(query, 2, axis=0)
    blocks = {"a": slice(0, 6), "b": slice(6, 10)}

    def power(h, p):   # (H + lam I)^p, lam = 0.1 * mean |H_ab| (the default damping)
        w, v = np.linalg.eigh(h + 0.1 * np.abs(h).mean() * np.eye(len(h)))
        return (v * np.clip(w, 0, None) ** p) @ v.T

    def side(x, p):    # x @ blockdiag(P_m^p) (P = I without preconditioning)
        if preconditioning == "none":
            return x
        out = x.copy()
        for cols in blocks.values():
            out[:, cols] = x[:, cols] @ power(q[:, cols].T @ q[:, cols] / len(q), p)
        return out

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    g = np.delete(train, 4, axis=0)
    if normalization == "none":
        expected = side(q, -1) @ g.T
    elif normalization == "seed":
        pq = side(unit(q), -1)
        expected = pq @ unit(g).T / np.linalg.norm(pq.mean(axis=0))
    else:
        expected = unit(side(q, -0.5)) @ unit(side(g, -0.5)).T
    got = np.delete(np.delete(matrix, 2, axis=0), 4, axis=1)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())
    assert np.isnan(matrix[2]).all() and np.isnan(matrix[:, 4]).all()
    scored = np.isfinite(scores)
    assert scored.sum() == 11
    np.testing.assert_allclose(np.nanmean(matrix[:, scored], axis=0), scores[scored],
                               rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the draw


def test_subset_draws_are_seeded_and_balanced():
    a, b, c = lds_subsets(60, 10, 0.5, 3), lds_subsets(60, 10, 0.5, 3), lds_subsets(60, 10, 0.5, 4)
    assert (a == b).all() and not (a == c).all()
    assert set(a.sum(axis=0)) == {5}          # every row in round(alpha * M) subsets
    assert set(a.sum(axis=1)) == {30}         # every subset the same size
    overlaps = (a[:, None, :] & a[None, :, :]).sum(-1)[np.triu_indices(10, 1)]
    assert overlaps.min() > 0                 # mixed: no subset is another's complement
    assert overlaps.std() > 1
    odd = lds_subsets(25, 6, 0.3, 0)          # n * c / M not whole: sizes differ by one at most
    assert set(odd.sum(axis=0)) == {2} and np.ptp(odd.sum(axis=1)) <= 1
    # over many seeds every row is in a subset equally often (no position is favoured)
    first = np.mean([lds_subsets(40, 4, 0.5, s)[0] for s in range(300)], axis=0)
    assert abs(first.mean() - 0.5) < 1e-9 and first.min() > 0.35 and first.max() < 0.65


@pytest.mark.parametrize("n, m, alpha, message", [
    (40, 1, 0.5, "--subsets must be >= 2"), (40, 10, 1.0, "--alpha must be in (0, 1)"),
    (40, 10, 0.01, "puts every row in 0 subsets")])
def test_bad_draws_are_refused(n, m, alpha, message):
    with pytest.raises(lds.PipelineError, match=re.escape(message)):
        lds_subsets(n, m, alpha, 0)


# ---------------------------------------------------------------------------------------------
# the recipe's plan (the real run: 50 subsets)


def test_recipe_plan():
    recipe = rx.load_recipe(RECIPE, None, None, [])
    assert recipe.seeds == list(range(int(recipe.vars["subsets"])))
    tasks = rx.plan_tasks(recipe)
    flag = lambda t, f: t.argv[t.argv.index(f) + 1] if f in t.argv else None  # noqa: E731
    score = [t for t in tasks if t.argv[0] == "score.py"]
    passes = [t for t in score if "--gradients-from" not in t.argv]
    assert sorted((flag(t, "--projection-dim"), flag(t, "--loss-reduction") or "mean")
                  for t in passes) == sorted((p, r) for p in ("16", "32", "64")
                                             for r in ("sum", "mean"))
    for task in score:
        assert {"--write-score-matrix", "--scores-only"} <= set(task.argv)
        assert flag(task, "--train-split") == "pool"
        # gradients kept only where another step reads them (16 GB a pass at projection 64)
        read = {flag(t, "--gradients-from") for t in score}
        assert (flag(task, "--output-dir") in read) == ("--keep-gradients" in task.argv)
        if task not in passes:   # rescored from the pass with its loss and projection
            source = next(t for t in passes
                          if flag(t, "--output-dir") == flag(task, "--gradients-from"))
            assert flag(source, "--projection-dim") == flag(task, "--projection-dim")
            assert flag(source, "--loss-reduction") == flag(task, "--loss-reduction")
    finetunes = [t for t in tasks if t.step == "finetune"]
    assert [flag(t, "--train-split") for t in finetunes] == [f"subset_{s}" for s in recipe.seeds]
    assert len({flag(t, "--seed") for t in finetunes}) == 1     # one init: only the rows differ
    compute = next(t for t in tasks if t.step == "compute")
    names = [v.split("=")[0] for v in compute.argv if "=" in v and not v.startswith("-")]
    assert sorted(names) == sorted(f"{v}_p{p}" for v in ("none_sum", "seed", "bergson")
                                   for p in (16, 32, 64))
    assert flag(compute, "--evals") == f"{recipe.run_dir}/seed_{{m}}/eval_query.per_example.jsonl"
    # scratch: the subset trainings wait only for the draw, not for the base adapter
    waits = rx.dependencies(tasks)
    for i, task in enumerate(tasks):
        if task.step == "finetune":
            assert [tasks[j].step for j in waits[i]] == ["draw"], task.key
    continued = rx.plan_tasks(rx.load_recipe(RECIPE, None, [0, 1], [
        "init_flags=--init continue --resume-adapter {run_dir}/base_adapter",
        "init_waits_for={run_dir}/base_adapter"]))
    task = next(t for t in continued if t.step == "finetune")
    assert flag(task, "--init") == "continue" and f"{recipe.run_dir}/base_adapter" in task.inputs


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model: the recipe with 4 subsets and one projection


def small_recipe(path):
    """recipes/lds.toml with only the projection-16 seed pass and its bergson rescoring (CPU
    time); every other step as shipped."""
    text = RECIPE.read_text()
    head, *steps = text.split("[[steps]]")
    keep = []
    for block in steps:
        name = re.search(r'name = "([^"]+)"', block).group(1)
        if name.startswith("score_") and name not in ("score_seed_p16", "score_bergson_p16"):
            continue
        if name == "compute":
            block = "\n".join(line for line in block.splitlines()
                              if not re.search(r"none_sum|_p32|_p64", line))
            block = re.sub(r'score_matrix\.npy",\s*\noutputs', 'score_matrix.npy"]\noutputs',
                           block) + "\n"
        keep.append(block)
    path.write_text("[[steps]]".join([head, *keep]))
    tomllib.loads(path.read_text())
    return path


TINY_VARS = ["dataset_flags=--group-column instruction_id", "train_size=24", "query_size=8",
             "eval_size=8", "pool_size=20", "subsets=4", "k=6", "max_length=256",
             "eval_batch_size=8", "step_tokens=96"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_model, chat_jsonl):
    where = tmp_path_factory.mktemp("lds")
    recipe, run_dir = small_recipe(where / "lds_small.toml"), where / "run"
    args = ["--seeds", 0, 1, 2, 3, "--jobs", 2, *[f"--var={v}" for v in TINY_VARS],
            f"--var=dataset={chat_jsonl}", f"--var=model={tiny_model}"]
    first = runner(recipe, run_dir, *args)
    return recipe, run_dir, args, first


def test_end_to_end_table(e2e):
    _, run_dir, _, first = e2e
    assert "[runner] all steps done" in first.stdout
    report = json.loads((run_dir / "lds" / "lds.json").read_text())
    assert list(report["predictors"]) == ["seed_p16", "bergson_p16", "random", "length", "reward"]
    assert report["n_queries"] == 8 and report["draw"]["subsets"] == 4
    assert list(report["pairs"]) == ["bergson_p16-seed_p16"]   # the pairs of what ran
    for name, entry in report["predictors"].items():
        values = [v for v in entry["per_query"] if v is not None]
        assert len(entry["per_query"]) == 8 and all(-1 <= v <= 1 for v in values), name
        assert entry["lds"] is None or entry["lds"] == pytest.approx(np.mean(values))
    assert (run_dir / "lds" / "lds.png").read_bytes()[:4] == b"\x89PNG"
    table = (run_dir / "lds" / "lds.md").read_text()
    assert "| seed_p16 | score |" in table and "| length | baseline |" in table
    assert report["provenance"]["argv"][0] == "lds.py"
    json.loads((run_dir / "lds" / "lds.json").read_text(), parse_constant=pytest.fail)  # no NaN
    # the draw: a 20-row pool of train_base, 4 subsets of 10, every row in 2, as manifest splits
    info = json.loads((run_dir / "subsets" / "subsets.json").read_text())
    manifest = json.loads((run_dir / "subsets" / "manifest.json").read_text())
    assert {f"subset_{m}" for m in range(4)} | {"pool", "attr_query", "eval"} == \
        set(manifest["splits"])
    assert info["pool_size"] == 20 and info["subset_rows"] == [10] and \
        info["subsets_per_row"] == 2
    from datasets import load_from_disk
    subset = load_from_disk(str(run_dir / "subsets" / manifest["splits"]["subset_2"]["path"]))
    assert list(subset["row_id"]) == [info["pool_row_ids"][i] for i in info["members"][2]]


def test_score_matrix_shape_ids_and_mean(e2e, tmp_path):
    _, run_dir, _, _ = e2e
    from datasets import load_from_disk
    manifest = json.loads((run_dir / "subsets" / "manifest.json").read_text())
    pool = load_from_disk(str(run_dir / "subsets" / manifest["splits"]["pool"]["path"]))
    query = load_from_disk(str(run_dir / "data" / "attr_query"))
    # the none variant from the same gradients (no bergson pass) alongside the recipe's two
    run_script("score.py", "--manifest", run_dir / "subsets" / "manifest.json", "--train-split",
               "pool", "--adapter-path", run_dir / "base_adapter", "--gradients-from",
               run_dir / "scores_seed_p16", "--score-normalization", "none", "--projection-dim",
               16, "--max-length", 256, "--subset-k", 6, "--scores-only", "--write-score-matrix",
               "--output-dir", tmp_path / "none")
    for folder in (run_dir / "scores_seed_p16", run_dir / "scores_bergson_p16", tmp_path / "none"):
        matrix = np.load(folder / "score_matrix.npy")
        ids = json.loads((folder / "score_matrix.json").read_text())
        assert matrix.dtype == np.float32 and matrix.shape == (8, 20)
        assert ids["query_ids"] == list(query["row_id"]) and ids["train_ids"] == list(pool["row_id"])
        rows = [json.loads(line) for line in (folder / "train_scores.jsonl").read_text().splitlines()]
        scores = np.array([np.nan if r["score"] is None else r["score"] for r in rows])
        assert np.isfinite(scores).sum() > 10
        np.testing.assert_allclose(matrix.mean(axis=0), scores, rtol=1e-4,
                                   atol=1e-6 * np.nanmax(np.abs(scores)))
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["score_matrix"]["shape"] == [8, 20]
    # the variants really differ (not one matrix written three times)
    a, b = (np.load(run_dir / f / "score_matrix.npy") for f in ("scores_seed_p16",
                                                                 "scores_bergson_p16"))
    assert not np.allclose(a, b)


def test_score_matrix_refusals(e2e, tmp_path):
    _, run_dir, _, _ = e2e
    common = ["--manifest", run_dir / "subsets" / "manifest.json", "--train-split", "pool",
              "--adapter-path", run_dir / "base_adapter", "--projection-dim", 16,
              "--max-length", 256, "--subset-k", 6, "--scores-only", "--write-score-matrix"]
    big = run_script("score.py", *common, "--score-matrix-max-mb", 0.0001,
                     "--output-dir", tmp_path / "big", expect_ok=False)
    assert big.returncode == 2 and big.stderr.count("\n") == 1
    assert "8 query rows (attr_query) x 20 train rows (pool)" in big.stderr
    assert "--score-matrix-max-mb" in big.stderr and not (tmp_path / "big").exists()
    nearest = run_script("score.py", *common, "--score-mode", "nearest",
                         "--output-dir", tmp_path / "near", expect_ok=False)
    assert nearest.returncode == 2 and "--score-mode mean" in nearest.stderr
    assert not (tmp_path / "near").exists()


def test_compute_refuses_missing_evals_and_another_pool(e2e, tmp_path):
    _, run_dir, _, _ = e2e
    base = ["compute", "--subsets", run_dir / "subsets", "--output-dir", tmp_path / "out"]
    missing = run_script("lds.py", *base, "--evals", f"{tmp_path}/seed_{{m}}/e.jsonl",
                         expect_ok=False)
    assert missing.returncode == 2 and "4 of the 4 subsets have no eval file" in missing.stderr
    assert not (tmp_path / "out").exists()
    # a score folder of other rows (the main manifest's score_pool, not the draw's pool)
    other = tmp_path / "other"
    shutil.copytree(run_dir / "scores_seed_p16", other, ignore=shutil.ignore_patterns("bergson*"))
    ids = json.loads((other / "score_matrix.json").read_text())
    ids["train_fingerprint"] = "0" * 64
    (other / "score_matrix.json").write_text(json.dumps(ids))
    wrong = run_script("lds.py", *base, "--evals",
                       f"{run_dir}/seed_{{m}}/eval_query.per_example.jsonl",
                       "--scores-from", f"x={other}", expect_ok=False)
    assert wrong.returncode == 2 and "other content than the draw's pool" in wrong.stderr
    assert not (tmp_path / "out").exists()


def test_resume_retrains_only_the_deleted_subset(e2e):
    recipe, run_dir, args, _ = e2e
    before = (run_dir / "seed_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    losses = (run_dir / "seed_2" / "eval_query.per_example.jsonl").read_text()
    shutil.rmtree(run_dir / "seed_2")
    again = runner(recipe, run_dir, *args)
    ran = {k for k, v in decisions(again.stdout).items() if v.startswith("run")}
    # compute reads the per-example files: the retrained subset wrote the same losses (same
    # rows, same training seed), so it is up to date and skipped too
    assert ran == {"finetune@seed2", "eval_query@seed2"}, again.stdout
    assert decisions(again.stdout)["compute"] == "skip (up to date)"
    assert (run_dir / "seed_2" / "eval_query.per_example.jsonl").is_file()
    assert (run_dir / "seed_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns \
        == before
    # the same training seed and rows: the retrained subset gives the same losses as before
    again_losses = (run_dir / "seed_2" / "eval_query.per_example.jsonl").read_text()
    assert [json.loads(line)["finetuned_loss"] for line in again_losses.splitlines()] == \
        pytest.approx([json.loads(line)["finetuned_loss"] for line in losses.splitlines()])
