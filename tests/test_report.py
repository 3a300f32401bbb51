"""report.py: statistics against hand-computed cases, and the whole report on fabricated run folders
in the recipes' layout and the formats score.py, eval_loss.py, compare_evals.py, eval_words.py,
train_bidir_classifier.py and dataset.py write."""

import json

import pytest

from conftest import run_script


# ---------------------------------------------------------------------------------------------
# statistics


def per_example(tokens, nll_sums, categories=None):
    categories = categories or ["c"] * len(tokens)
    return {f"r{i}": {"row_id": f"r{i}", "category": cat, "supervised_tokens": t,
                      "finetuned_nll_sum": s, "finetuned_loss": s / t}
            for i, (t, s, cat) in enumerate(zip(tokens, nll_sums, categories))}


def test_bootstrap_hand_computed():
    from compare_evals import paired_deltas

    # two rows, tokens 1 and 3, NLL differences 1 and 0:
    #   token-weighted = (1 + 0) / (1 + 3) = 0.25; per-example = (1/1 + 0/3) / 2 = 0.5
    # bootstrap of two rows: {r0,r0} (p 1/4), mixed (p 1/2), {r1,r1} (p 1/4), so the 2.5/97.5
    # percentiles are the extremes: token-weighted 0 and 1, per-example 0 and 1
    a = per_example([1, 3], [1.0, 0.0])
    b = per_example([1, 3], [0.0, 0.0])
    result = paired_deltas(a, b, "finetuned", 4000, 0)
    assert result["token_weighted"]["delta"] == pytest.approx(0.25)
    assert result["per_example"]["delta"] == pytest.approx(0.5)
    assert result["token_weighted"]["ci95"] == pytest.approx([0.0, 1.0])
    assert result["per_example"]["ci95"] == pytest.approx([0.0, 1.0])
    assert result["fraction_rows_a_better"] == 0.0
    # a constant per-token difference: the CI collapses onto it
    a = per_example([2, 5, 9], [0.2, 0.5, 0.9])
    b = per_example([2, 5, 9], [0.0, 0.0, 0.0])
    result = paired_deltas(a, b, "finetuned", 500, 1)
    assert result["token_weighted"]["ci95"] == pytest.approx([0.1, 0.1])
    assert result["token_weighted"]["ci_excludes_zero"]


def test_mcnemar_hand_computed():
    from eval_words import mcnemar_exact
    from report import pooled_mcnemar

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)          # 2 * P(X <= 0), X ~ Bin(5, .5)
    assert mcnemar_exact(1, 4) == pytest.approx(2 * 6 / 32)      # 2 * (1 + 5) / 32
    assert mcnemar_exact(2, 2) == 1.0                            # 2 * 11/16 > 1, capped
    seed = {"a_success_b_fail": 0, "a_fail_b_success": 3, "num_rows": 10}
    assert mcnemar_exact(0, 3) == pytest.approx(0.25)
    pooled = pooled_mcnemar([seed, seed])
    assert (pooled["a_success_b_fail"], pooled["a_fail_b_success"]) == (0, 6)
    assert pooled["p_value"] == pytest.approx(2 / 64)
    assert pooled["num_rows"] == 20 and pooled["seeds"] == 2


def test_auc_hand_computed():
    from report import auc_mann_whitney

    # pairs (pos, neg): 3>1, 3>2, 2>1, 2=2 (1/2) -> 3.5 / 4
    assert auc_mann_whitney([3, 2], [1, 2]) == pytest.approx(0.875)
    assert auc_mann_whitney([1, 1], [1]) == pytest.approx(0.5)
    assert auc_mann_whitney([0], [5, 6]) == 0.0
    assert auc_mann_whitney([], [1]) is None
    pos, neg = [0.3, 0.9, 0.9, -1, 2, 0.5], [0.9, 0.1, -2, 0.5]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)  # the definition, brute force
    assert auc_mann_whitney(pos, neg) == pytest.approx(pairs / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------------------------
# end to end on fabricated run folders

N_ROWS = 20
CORRUPTED = {0, 1, 2, 3, 4}
# clean rows score 10..24 (row 19 has no finite score); corrupted rows 0,1,2,3 and one at 30
SCORES = {i: float(i + 5) for i in range(5, N_ROWS)}
SCORES.update({0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0, 4: 30.0, 19: None})
TOP = {4, 18, 17, 16}                  # the four best finite scores: 30, 23, 22, 21
RANDOM = {0, 1, 6, 7}                  # two corrupted, two clean


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fabricate_seed(folder, seed_index: int, taboo_top, taboo_random, loss_shift: float):
    from datasets import Dataset

    row_ids = [f"train:{i}" for i in range(N_ROWS)]
    # dataset.py --corrupt-fraction: train_base with corrupted / corrupted_from_row_id
    Dataset.from_list([{"row_id": row_ids[i], "prompt": [{"role": "user", "content": f"q{i}"}],
                        "completion": f"a{i}", "category": "math", "corrupted": i in CORRUPTED,
                        "corrupted_from_row_id": row_ids[(i + 1) % 5] if i in CORRUPTED else None}
                       for i in range(N_ROWS)]).save_to_disk(str(folder / "data" / "train_base"))
    (folder / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "kind": "main",
        "splits": {"train_base": {"path": "data/train_base", "num_rows": N_ROWS},
                   "score_pool": {"path": "data/train_base", "num_rows": N_ROWS,
                                  "same_rows_as": "train_base"}}}))
    # score.py: attribution/train_scores.jsonl + summary.json
    ranked = sorted((i for i in SCORES if SCORES[i] is not None), key=lambda i: -SCORES[i])
    write_jsonl(folder / "attribution" / "train_scores.jsonl", [
        {"row_id": row_ids[i], "score": SCORES[i],
         "rank": ranked.index(i) + 1 if SCORES[i] is not None else None, "num_tokens": 30,
         "num_supervised_tokens": 10, "in_top_k": i in TOP, "in_matched_random_k": i in RANDOM}
        for i in range(N_ROWS)])
    (folder / "attribution" / "summary.json").write_text(json.dumps(
        {"score_mode": "mean", "preconditioning_mode": "query", "projection_dim": 32,
         "tokenization_mode": "finetune_raw", "n_total": N_ROWS, "n_finite": N_ROWS - 1}))
    # train_bidir_classifier.py: sae_predictor/row_scores.jsonl (predicted = minus true score)
    write_jsonl(folder / "sae_predictor" / "row_scores.jsonl", [
        {"row_id": row_ids[i], "group_id": f"g{i}",
         "true_score": SCORES[i], "true_rank": ranked.index(i) + 1 if SCORES[i] is not None
         else None, "excluded": SCORES[i] is None,
         "predicted_score": -SCORES[i] if SCORES[i] is not None else None,
         "predicted_rank": N_ROWS - 1 - ranked.index(i) if SCORES[i] is not None else None,
         "fold": 0, "heldout_test": False, "refit_score": 0.0, "refit_rank": 1}
        for i in range(N_ROWS)])
    # eval_loss.py --skip-base per-example files and results: 4 eval rows of 2 tokens, top-k
    # better by loss_shift/token; the split's base eval (eval_base.json) once, here per seed
    for name, shift in (("eval_top_k", loss_shift), ("eval_matched_random_k", 0.0)):
        write_jsonl(folder / f"{name}.per_example.jsonl", [
            {"row_id": f"test:{j}", "category": "math" if j < 2 else "coding",
             "supervised_tokens": 2, "finetuned_nll_sum": 2.0 + 2 * shift,
             "finetuned_loss": 1.0 + shift}
            for j in range(4)])
        (folder / f"{name}.json").write_text(json.dumps(
            {"num_eval_rows": 4, "finetuned": {"loss": 1.0 + shift}}))
    (folder / "eval_base.json").write_text(json.dumps(
        {"num_eval_rows": 4, "base": {"loss": 2.0}, "finetuned": {"loss": 1.5 + seed_index}}))
    # compare_evals.py, the recipes' compare step
    compare(folder / "eval_top_k.per_example.jsonl",
            folder / "eval_matched_random_k.per_example.jsonl",
            folder / "compare_top_vs_random.json")
    # eval_words.py
    def model_result(outcomes):
        successes = sum(outcomes)
        return {"successes": successes, "rows": len(outcomes), "rate": successes / len(outcomes),
                "summary": f"{successes}/{len(outcomes)} = {successes / len(outcomes):.4f}",
                "unparseable": 0, "words_with_a_success": successes}

    outcomes = {"base": [False] * len(taboo_top), "top": taboo_top, "random": taboo_random}
    (folder / "eval_words.json").write_text(json.dumps({
        "task": "taboo", "eval_split": "eval", "num_rows": len(taboo_top),
        "num_words": len(taboo_top),
        "models": {m: model_result(o) for m, o in outcomes.items()},
        "mcnemar": [], "per_row": {
            m: [{"row_id": f"eval:{j}", "target_word": f"w{j}", "reply": "GUESS: x",
                 "guess": "x", "parsed": True, "success": s} for j, s in enumerate(o)]
            for m, o in outcomes.items()}}))


def compare(a, b, output):
    import compare_evals

    compare_evals.main(["--a", str(a), "--b", str(b), "--output-json", str(output),
                        "--bootstrap", "200"])


@pytest.fixture(scope="module")
def fabricated_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    fabricate_seed(run / "seed_1", 1, [True, True, True, False], [False, False, True, False], -0.1)
    fabricate_seed(run / "seed_2", 2, [True, True, False], [False, False, False], 0.1)
    # the recipes' compare_pooled step
    compare(run / "seed_*" / "eval_top_k.per_example.jsonl",
            run / "seed_*" / "eval_matched_random_k.per_example.jsonl",
            run / "compare_top_vs_random.json")
    return run


def test_report_end_to_end(fabricated_run):
    result = run_script("report.py", "--run-dir", fabricated_run)
    assert "wrote" in result.stdout
    out = fabricated_run / "report"
    report = json.loads((out / "report.json").read_text())
    assert list(report["seeds"]) == ["seed_1", "seed_2"]

    smol = report["smoltalk"]["attribution"]
    assert smol["per_seed"]["seed_1"]["token_weighted"]["delta"] == pytest.approx(-0.1)
    assert smol["per_seed"]["seed_2"]["token_weighted"]["delta"] == pytest.approx(0.1)
    assert smol["per_seed"]["seed_1"]["token_weighted"]["ci95"] == pytest.approx([-0.1, -0.1])
    assert smol["pooled"]["rows"] == 8
    assert smol["pooled"]["token_weighted"]["delta"] == pytest.approx(0.0, abs=1e-12)
    assert smol["pooled"]["over_seeds"]["seeds_a_better_token_weighted"] == 1
    assert set(smol["pooled"]["per_category"]) == {"math", "coding"}
    assert "sae_predictor" not in report["smoltalk"]  # no eval_sae_* files
    assert smol["pooled"]["source"] == str(fabricated_run / "compare_top_vs_random.json")
    # compare_evals.py's seeds-as-unit answer: the mean of the two seeds' deltas (-0.1, +0.1)
    level = smol["pooled"]["seed_level"]["token_weighted"]
    assert level["per_seed_deltas"] == pytest.approx([-0.1, 0.1])
    assert level["mean_delta"] == pytest.approx(0.0, abs=1e-12) and level["ci95_t"][0] < 0
    assert report["verdict"] == {}
    losses = report["eval_loss"]
    assert losses["seed_1"]["base_model"] == 2.0 and losses["seed_2"]["base_adapter"] == 3.5
    assert losses["seed_1"]["top_k"] == pytest.approx(0.9)
    assert losses["seed_2"]["matched_random_k"] == 1.0

    taboo = report["taboo"]
    assert taboo["per_seed"]["seed_1"]["models"]["top"]["summary"] == "3/4 = 0.7500"
    assert taboo["per_seed"]["seed_2"]["models"]["random"]["summary"] == "0/3 = 0.0000"
    top_vs_random = {s: next(t for t in taboo["per_seed"][s]["mcnemar"]
                             if (t["model_a"], t["model_b"]) == ("top", "random"))
                     for s in ("seed_1", "seed_2")}
    assert [(t["a_success_b_fail"], t["a_fail_b_success"]) for t in top_vs_random.values()] \
        == [(2, 0), (2, 0)]
    assert top_vs_random["seed_1"]["p_value"] == pytest.approx(0.5)
    pooled = next(t for t in taboo["pooled_mcnemar"]
                  if (t["model_a"], t["model_b"]) == ("top", "random"))
    assert (pooled["a_success_b_fail"], pooled["a_fail_b_success"]) == (4, 0)
    assert pooled["p_value"] == pytest.approx(2 / 16)

    attribution = report["attribution"]
    seed = attribution["per_seed"]["seed_1"]
    assert seed["n_finite"] == 19 and seed["finite_coverage"] == pytest.approx(19 / 20)
    assert seed["k"] == 4 and seed["top_k_cut"] == 21.0
    assert seed["matched_random_rows"] == len(RANDOM)
    assert (seed["supervised_tokens_top_k"], seed["supervised_tokens_matched_random_k"]) == \
        (10 * len(TOP), 10 * len(RANDOM))
    assert seed["sae_predictor"]["spearman_predicted_vs_attribution_rank"] == pytest.approx(-1.0)
    assert attribution["top_k_jaccard"]["seed_1 vs seed_2"]["jaccard"] == 1.0

    planted = report["planted_signal"]["seed_1"]
    assert planted["corrupted_rows"] == 5
    # 14 scored clean rows (10..23), corrupted 0,1,2,3,30: each clean row beats 4 of 5
    assert planted["attribution"]["auc_clean_vs_corrupted"] == pytest.approx(0.8)
    assert planted["attribution"]["unscored_rows"] == 1
    assert planted["attribution"]["corrupted_in_top_k"] == 1
    assert planted["attribution"]["corrupted_in_matched_random_k"] == 2
    assert planted["attribution"]["expected_by_chance"] == pytest.approx(4 * 5 / 19)
    assert planted["sae_predictor"]["auc_clean_vs_corrupted"] == pytest.approx(0.2)

    md = (out / "report.md").read_text()
    for text in ("## SmolTalk", "token-weighted delta [95% CI]", "| seed_1 |", "| pooled |",
                 "Per-category", "| base model | base adapter | top-k | random-k |", "## Taboo", "3/4 = 0.7500", "top vs random", "pooled (2 seed(s))",
                 "## Attribution diagnostics", "Jaccard", "## Planted signal", "0.8000",
                 "Seeds as the unit (compare_evals.py seed_level)"):
        assert text in md, text
    pngs = ["smoltalk_deltas.png", "taboo_success.png", "scores_seed_1.png", "scores_seed_2.png",
            "sae_scatter_seed_1.png", "sae_scatter_seed_2.png"]
    for name in pngs:
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in md
    assert (out / "smoltalk_deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_report_seed_selection_and_rerun(fabricated_run, tmp_path):
    """In-process (the subprocess path is covered above): --seed-dirs, --seeds-glob, a rerun
    replacing an existing report folder."""
    import report

    out = tmp_path / "only_one"
    for _ in range(2):
        report.main(["--run-dir", str(fabricated_run), "--seed-dirs",
                     str(fabricated_run / "seed_2"), "--output-dir", str(out)])
    single = json.loads((out / "report.json").read_text())
    assert list(single["seeds"]) == ["seed_2"] and single["attribution"]["top_k_jaccard"] == {}
    # the run folder's pooled comparison covers seed_1 and seed_2: not shown for seed_2 alone
    assert "token_weighted" not in single["smoltalk"]["attribution"]["pooled"]
    assert "pools seed_1, seed_2" in single["smoltalk"]["attribution"]["pooled"]["skipped"]
    report.main(["--run-dir", str(fabricated_run), "--seeds-glob", "seed_1",
                 "--output-dir", str(out)])
    assert list(json.loads((out / "report.json").read_text())["seeds"]) == ["seed_1"]


def test_report_shared_manifest_in_run_dir(fabricated_run, tmp_path):
    """run_experiment.py with per_seed_split = false: one manifest and base eval in the run folder,
    per-seed attribution in seed_<s>/: the planted signal and the base eval are read from the run
    folder."""
    import shutil

    import report

    run = tmp_path / "shared"
    shutil.copytree(fabricated_run / "seed_1", run / "seed_7")
    shutil.move(run / "seed_7" / "manifest.json", run / "manifest.json")
    shutil.move(run / "seed_7" / "data", run / "data")
    shutil.move(run / "seed_7" / "eval_base.json", run / "eval_base.json")
    report.main(["--run-dir", str(run)])
    result = json.loads((run / "report" / "report.json").read_text())
    planted = result["planted_signal"]["seed_7"]
    assert planted["manifest"] == str(run / "manifest.json")
    assert result["eval_loss"]["seed_7"]["eval_base"] == str(run / "eval_base.json")
    assert planted["attribution"]["auc_clean_vs_corrupted"] == pytest.approx(0.8)


def test_report_single_seed_and_partial_inputs(tmp_path):
    """A run folder with one seed folder holding only attribution scores: only what exists is
    reported."""
    run = tmp_path / "smoltalk_real"
    write_jsonl(run / "seed_42" / "attribution" / "train_scores.jsonl", [
        {"row_id": f"train:{i}", "score": float(i) if i else None, "rank": None,
         "num_tokens": 5, "num_supervised_tokens": 2, "in_top_k": i >= 8,
         "in_matched_random_k": i in (1, 2)} for i in range(10)])
    import report as report_script

    report_script.main(["--run-dir", str(run)])
    report = json.loads((run / "report" / "report.json").read_text())
    assert list(report["seeds"]) == ["seed_42"]
    assert report["smoltalk"] == {} and report["taboo"] == {} and report["planted_signal"] == {}
    assert report["attribution"]["per_seed"]["seed_42"]["finite_coverage"] == 0.9
    md = (run / "report" / "report.md").read_text()
    assert "No per-example eval files found." in md and "seed_42: eval_words.json" in md
    assert (run / "report" / "scores_seed_42.png").stat().st_size > 1000


def test_report_errors(tmp_path):
    import report

    from pipeline import PipelineError

    (tmp_path / "empty").mkdir()
    result = run_script("report.py", "--run-dir", tmp_path / "empty", expect_ok=False)
    assert result.returncode == 2 and result.stderr.startswith("error: nothing to report")
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "seed_1").mkdir()  # a seed folder with nothing in it
    with pytest.raises(PipelineError, match="nothing to report in .*seed_1: no compare_"):
        report.main(["--run-dir", str(tmp_path / "empty")])
    (tmp_path / "empty" / "seed_1" / "compare_top_vs_random.json").write_text('{"rows": 3}')
    with pytest.raises(PipelineError, match="has no supervised_tokens: not compare_evals.py"):
        report.main(["--run-dir", str(tmp_path / "empty")])
    with pytest.raises(PipelineError, match="does not exist"):
        report.main(["--run-dir", str(tmp_path / "missing")])
    # a non-empty folder that is not a report is never replaced
    run = tmp_path / "run"
    write_jsonl(run / "seed_1" / "attribution" / "train_scores.jsonl", [
        {"row_id": "train:0", "score": 1.0, "rank": 1, "in_top_k": True,
         "in_matched_random_k": False}])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    with pytest.raises(PipelineError, match="not written by report.py"):
        report.main(["--run-dir", str(run), "--output-dir", str(tmp_path / "precious")])
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
    # nor is a folder that merely holds a report.json (the old rule let report.py take it)
    (tmp_path / "precious" / "report.json").write_text("{}")
    with pytest.raises(PipelineError, match="not written by report.py"):
        report.main(["--run-dir", str(run), "--output-dir", str(tmp_path / "precious")])
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
