"""The verdict (issue 17): seed-level intervals that cover the truth at their stated rate (by
simulation), report.py's verdict sentence and table from fabricated arm runs, and the verdict
recipe's plan. The arms' selection rules are tested in tests/test_subsets.py."""

import json
import re

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# seed-level statistics, by simulation


def simulated_experiment(rng, mu, tau, sigma, n_seeds, n_rows):
    """One experiment: n_seeds training seeds of arm A and B on the same n_rows eval rows. Seed s
    has a true delta u_s ~ N(mu, tau^2) (what the training run happened to learn), each row adds
    token-level noise: NLL_A - NLL_B = tokens * u_s + sqrt(tokens) * sigma * N(0, 1). The target
    of inference is mu, the arm's effect over training runs."""
    tokens = rng.integers(5, 60, size=n_rows)
    u = rng.normal(mu, tau, size=n_seeds)
    diff = tokens * u[:, None] + np.sqrt(tokens) * sigma * rng.normal(size=(n_seeds, n_rows))
    pairs = []
    for s in range(n_seeds):
        a = {f"r{i}": {"row_id": f"r{i}", "supervised_tokens": int(tokens[i]),
                       "finetuned_nll_sum": 2.0 * tokens[i] + diff[s, i]} for i in range(n_rows)}
        b = {f"r{i}": {"row_id": f"r{i}", "supervised_tokens": int(tokens[i]),
                       "finetuned_nll_sum": 2.0 * tokens[i]} for i in range(n_rows)}
        pairs.append((f"seed_{s}", a, b))
    return pairs


def test_seed_level_interval_covers_the_truth_and_pooled_rows_do_not():
    """400 simulated experiments with real between-seed variance: compare_evals.py's seed-level
    95% t-interval covers mu in ~95% of them; the interval over the pooled rows of all seeds (the
    old pooled comparison) covers it far less often, because it counts 5 x 40 rows as independent
    evidence while the 5 training runs are the unit. The two-level bootstrap (seeds, then rows)
    covers more than the pooled rows but less than the t-interval: 5 seeds are too few for a
    percentile bootstrap, which is why the verdict quotes the t-interval."""
    import compare_evals

    rng = np.random.default_rng(2024)
    mu, tau, sigma, n_seeds, n_rows, experiments = -0.01, 0.03, 0.5, 5, 40, 400
    covered = {"t": 0, "t_per_example": 0, "bootstrap": 0, "pooled": 0}
    p_values = []
    for _ in range(experiments):
        pairs = simulated_experiment(rng, mu, tau, sigma, n_seeds, n_rows)
        level = compare_evals.seed_level(pairs, "finetuned", 300, int(rng.integers(1 << 30)))
        tw = level["token_weighted"]
        covered["t"] += tw["ci95_t"][0] <= mu <= tw["ci95_t"][1]
        pe = level["per_example"]
        covered["t_per_example"] += pe["ci95_t"][0] <= mu <= pe["ci95_t"][1]
        covered["bootstrap"] += tw["ci95_bootstrap"][0] <= mu <= tw["ci95_bootstrap"][1]
        pooled = compare_evals.paired_deltas(*compare_evals.pool_rows(pairs), "finetuned", 300, 0)
        covered["pooled"] += pooled["token_weighted"]["ci95"][0] <= mu <= \
            pooled["token_weighted"]["ci95"][1]
        p_values.append(tw["p_value"])
        assert tw["mean_delta"] == pytest.approx(np.mean(tw["per_seed_deltas"]))
        assert tw["seeds_a_better"] == sum(d < 0 for d in tw["per_seed_deltas"])
    rate = {k: v / experiments for k, v in covered.items()}
    assert 0.90 <= rate["t"] <= 0.99, rate
    assert 0.90 <= rate["t_per_example"] <= 0.99, rate
    assert rate["pooled"] < 0.75, rate                      # pooling rows undercovers
    assert rate["pooled"] < rate["bootstrap"] < rate["t"], rate
    # the t-test is the interval's dual: p < 0.05 exactly when the interval excludes 0 is not
    # checked row by row here; its rejection rate under this (non-null) mu is small but positive
    assert 0.0 < np.mean(np.array(p_values) < 0.05) < 0.5


def test_seed_level_by_hand_and_the_two_bootstraps():
    """Three seeds with constant per-row differences (no row noise): the per-seed deltas are
    exact, the t-interval is mean +- t(0.975, 2) * sd / sqrt(3), the bootstrap draws only seed
    resamples. With a split per seed (different row ids) the rows are drawn per seed."""
    from scipy import stats

    import compare_evals

    def pair(label, delta, ids):
        a = {i: {"row_id": i, "supervised_tokens": 4, "finetuned_nll_sum": 8.0 + 4 * delta}
             for i in ids}
        b = {i: {"row_id": i, "supervised_tokens": 4, "finetuned_nll_sum": 8.0} for i in ids}
        return (label, a, b)

    deltas = [-0.3, -0.1, 0.1]
    for ids_of in (lambda s: ["x", "y"], lambda s: [f"{s}:x", f"{s}:y", f"{s}:z"]):
        level = compare_evals.seed_level([pair(f"s{i}", d, ids_of(i))
                                          for i, d in enumerate(deltas)], "finetuned", 2000, 3)
        tw = level["token_weighted"]
        assert tw["per_seed_deltas"] == pytest.approx(deltas)
        assert tw["mean_delta"] == pytest.approx(-0.1)
        half = stats.t.ppf(0.975, 2) * 0.2 / np.sqrt(3)
        assert tw["ci95_t"] == pytest.approx([-0.1 - half, -0.1 + half])
        assert tw["p_value"] == pytest.approx(stats.ttest_1samp(deltas, 0).pvalue)
        assert tw["seeds_a_better"] == 2 and not tw["ci_excludes_zero"]
        low, high = tw["ci95_bootstrap"]       # means of 3 seeds drawn from {-.3, -.1, .1}
        assert -0.3 - 1e-9 <= low < -0.1 < high <= 0.1 + 1e-9
        assert level["per_example"]["per_seed_deltas"] == pytest.approx(deltas)
        assert level["per_seed"]["s0"]["token_weighted"]["delta"] == pytest.approx(-0.3)
    assert "shared row draw" in compare_evals.seed_level(
        [pair("a", 0.1, ["x"]), pair("b", 0.2, ["x"])], "finetuned", 10, 0)["bootstrap"]
    assert "per seed row draw" in level["bootstrap"]
    one = compare_evals.seed_level([pair("a", 0.1, ["x", "y"])], "finetuned", 10, 0)
    assert one["token_weighted"]["ci95_t"] is None and one["token_weighted"]["p_value"] is None


# ---------------------------------------------------------------------------------------------
# report.py's verdict, on fabricated verdict runs (recipes/verdict.toml's layout)

ARMS = ["attribution", "random", "random_stratified", "longest", "reward", "sae"]
SEEDS = [1, 2, 3, 4, 5]
EVAL_ROWS = 30


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fabricate_verdict_run(run, effects: dict, steps=None, seeds=SEEDS, k=40):
    """A run folder as recipes/verdict.toml leaves it. effects: {design: {arm: (mean, sd over
    seeds)}} of the arm's eval-loss shift per token (random: 0). steps: {(design, arm): steps}
    to break the budget match."""
    import compare_evals

    rng = np.random.default_rng(7)
    tokens = rng.integers(3, 40, size=EVAL_ROWS)
    row_noise = rng.normal(0, 0.2, size=EVAL_ROWS)
    (run / "scores").mkdir(parents=True)
    (run / "scores" / "summary.json").write_text(json.dumps(
        {"length_diagnostics": {"spearman_supervised_tokens": 0.42}}))
    for seed in seeds:
        folder = run / f"seed_{seed}"
        subset_tokens = {"attribution": 2000 + seed, "random": 1500 + seed,
                         "random_stratified": 1900, "longest": 5000, "reward": 1700,
                         "sae": 1800}
        (folder / "arms").mkdir(parents=True)
        (folder / "arms" / "summary.json").write_text(json.dumps({"arms": {
            arm: {"rows": k, "supervised_tokens": subset_tokens[arm], "tokens": 9999,
                  "mean_score": 0.1} for arm in ARMS}}))
        for design, arms in effects.items():
            for arm in ARMS:
                mean, sd = arms.get(arm, (0.0, 0.0))
                shift = mean + sd * rng.normal()
                write_jsonl(folder / f"eval_{design}_{arm}.per_example.jsonl", [
                    {"row_id": f"eval:{i}", "supervised_tokens": int(tokens[i]),
                     "finetuned_nll_sum": float(tokens[i] * (2.0 + row_noise[i] + shift)
                                                + rng.normal(0, 0.01))}
                    for i in range(EVAL_ROWS)])
                (folder / f"eval_{design}_{arm}.json").write_text(json.dumps(
                    {"finetuned": {"loss": 2.0 + shift}}))
                adapter = folder / f"adapter_{design}_{arm}"
                adapter.mkdir()
                (adapter / "train_metrics.json").write_text(json.dumps({
                    "optimizer_steps": (steps or {}).get((design, arm), 12), "rows_seen": 90,
                    "supervised_tokens_seen": 6144 + (arm == "longest") * 17,
                    "step_tokens": 512, "budget_tokens": 6144, "init": design}))
    for design in effects:
        compare_evals.main(["--label", design, "--bootstrap", "300", "--output-json",
                            str(run / f"compare_{design}.json"), "--baselines", "random",
                            "random_stratified", "longest", "reward"]
                           + [f"--arm={arm}={run}/seed_*/eval_{design}_{arm}.per_example.jsonl"
                              for arm in ARMS])
    return run


def verdict_report(run):
    import report

    report.main(["--run-dir", str(run)])
    return (json.loads((run / "report" / "report.json").read_text()),
            (run / "report" / "report.md").read_text())


def md_rows(md, design):
    """The verdict table's rows of one design, as {arm: cells}."""
    chunks = md.split("## Verdict", 1)[1].split("\n\n")
    lines = next(c for c in chunks if c.startswith("| design |")).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == design:
            rows[cells[1]] = dict(zip(header, cells))
    return rows


@pytest.mark.parametrize("case", ["wins", "loses", "spans_zero"])
def test_verdict_sentence_follows_the_table(tmp_path, case):
    effect = {"wins": (-0.05, 0.004), "loses": (0.05, 0.004), "spans_zero": (0.0, 0.03)}[case]
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"attribution": effect},
                                                   "continue": {"attribution": effect}})
    result, md = verdict_report(run)
    verdict = result["verdict"]
    entries = {d: verdict["designs"][d]["arms"]["attribution"] for d in ("scratch", "continue")}
    verb = {"wins": "beats", "loses": "is worse than", "spans_zero": "does not beat"}[case]
    for design, entry in entries.items():
        stat = entry["vs"]["random"]
        low, high = stat["ci95_t"]
        assert entry["verdict"] == verb
        if case == "wins":
            assert high < 0 and entry["p_holm"] < 0.05
        elif case == "loses":
            assert low > 0 and entry["p_holm"] < 0.05
        else:
            assert low < 0 < high
        row = md_rows(md, design)["attribution"]
        assert row["Δ vs random [95% CI over seeds]"] == \
            f"{stat['mean_delta']:+.4f} [{low:+.4f}, {high:+.4f}]"
        assert row["Holm p"] == f"{entry['p_holm']:.2g}"
        # the sentence quotes exactly the table's numbers
        assert f"{stat['mean_delta']:+.4f} [{low:+.4f}, {high:+.4f}] over 5 seeds" in \
            verdict["sentence"]
        assert f"{stat['seeds_better']}/5 seeds better" in verdict["sentence"]
    sentence = verdict["sentence"]
    assert sentence.startswith(f"Attribution (top-40) {verb} budget-matched random data here: ")
    assert md.splitlines()[2] == f"**Verdict.** {sentence}"       # report.md opens with it
    assert "from scratch" in sentence and "continuing the base adapter" in sentence
    assert (run / "report" / "verdict_seeds.png").stat().st_size > 1000


def test_attribution_diagnostics_read_the_arms_step(tmp_path):
    """The verdict's scores carry no subset flags (--scores-only): the diagnostics take k, the
    top-k cut and the subsets' scores and tokens from each seed's arms summary."""
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"attribution": (0.01, 0.001)}})
    write_jsonl(run / "scores" / "train_scores.jsonl",
                [{"row_id": f"pool:{i}", "score": float(i)} for i in range(100)])
    diagnostics = verdict_report(run)[0]["attribution"]["per_seed"]["seed_1"]
    assert diagnostics["k"] == 40 and diagnostics["top_k_cut"] == 60.0   # the 40th highest
    assert diagnostics["matched_random_rows"] == 40
    assert (diagnostics["supervised_tokens_top_k"],
            diagnostics["supervised_tokens_matched_random_k"]) == (2001, 1501)


def test_verdict_sentence_when_the_designs_disagree(tmp_path):
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"attribution": (-0.05, 0.004)},
                                                   "continue": {"attribution": (0.0, 0.03)}})
    sentence = verdict_report(run)[0]["verdict"]["sentence"]
    assert sentence.startswith("Attribution (top-40) beats budget-matched random data from "
                               "scratch (Δ eval loss vs random -0.0")
    assert ", but does not beat it continuing the base adapter (Δ eval loss vs random " in sentence


def test_budget_match_is_visible_in_the_table(tmp_path):
    """Arms of different subset sizes (tokens) trained the same steps and tokens: the table shows
    it; one arm with other steps turns the sentence's "budget-matched" off."""
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"attribution": (0.0, 0.03)}})
    result, md = verdict_report(run)
    rows = md_rows(md, "scratch")
    assert set(rows) == set(ARMS)
    assert {rows[a]["steps"] for a in ARMS} == {"12"}
    trained = {a: rows[a]["sup. tokens trained"] for a in ARMS}
    assert trained == {**{a: "6144" for a in ARMS}, "longest": "6161"}   # one row's overshoot
    assert {rows[a]["rows trained"] for a in ARMS} == {"90"}
    assert rows["longest"]["subset sup. tokens"] == "5000"
    assert rows["attribution"]["subset sup. tokens"] == "2001-2005"       # varies by seed
    assert rows["attribution"]["score-length Spearman"] == "0.420"
    assert rows["random"]["Δ vs random [95% CI over seeds]"] == "(control)"
    design = result["verdict"]["designs"]["scratch"]
    assert design["budget_matched"] and design["arms"]["longest"]["optimizer_steps"] == {
        "min": 12, "max": 12, "mean": 12.0, "seeds": 5}
    assert "budget-matched:" in md

    unmatched = fabricate_verdict_run(tmp_path / "unmatched", {"scratch": {}},
                                      steps={("scratch", "longest"): 9})
    result, md = verdict_report(unmatched)
    assert not result["verdict"]["designs"]["scratch"]["budget_matched"]
    assert md_rows(md, "scratch")["longest"]["steps"] == "9"
    assert "random data (not budget-matched" in result["verdict"]["sentence"]
    assert "NOT budget-matched" in md


def fabricate_sae_predictors(run, n=60, k=10, noises=(0.3, 3)):
    """Two predictors as train_bidir_classifier.py leaves them in the verdict's split folder (one
    per pooling), a train_base with planted rows, and the arms steps' record that the sae arm
    drew from sae_predictor_all (recorded as an absolute path on another machine)."""
    from datasets import Dataset

    rng = np.random.default_rng(3)
    ids = [f"train:{i}" for i in range(n)]
    corrupted = rng.random(n) < 0.25
    Dataset.from_dict({"row_id": ids, "prompt": [[{"role": "user", "content": "q"}]] * n,
                       "completion": ["a"] * n, "corrupted": corrupted.tolist()}).save_to_disk(
        str(run / "data" / "train_base"))
    (run / "manifest.json").write_text(json.dumps(
        {"splits": {"train_base": {"path": "data/train_base", "num_rows": n}}}))
    truth = rng.normal(size=n) - 2.0 * corrupted
    truth[0] = np.nan   # an unscored row: no prediction, left out of both AUCs
    made = {}
    for pooling, spearman, overlap, noise in (("all", 0.61, 6, noises[0]),
                                              ("completion", 0.38, 4, noises[1])):
        folder = run / f"sae_predictor_{pooling}"
        folder.mkdir()
        predicted = truth + noise * rng.normal(size=n)
        write_jsonl(folder / "row_scores.jsonl", [
            {"row_id": r, "true_score": None if np.isnan(t) else float(t),
             "predicted_score": None if np.isnan(t) else float(q)}
            for r, t, q in zip(ids, truth, predicted)])
        (folder / "summary.json").write_text(json.dumps({
            "pooling": pooling, "n_scored": n - 1, "length_diagnostics": {
                "spearman_supervised_tokens": 0.2 if pooling == "all" else 0.7},
            "out_of_fold": {"spearman": spearman, "k": k, "top_k_overlap": overlap,
                            "top_k_precision": overlap / k,
                            "top_k_precision_random_expectation": k / (n - 1)}}))
        made[pooling] = (predicted, spearman, overlap)
    for seed in SEEDS:
        (run / f"seed_{seed}" / "arms" / "continuation_manifest.json").write_text(json.dumps(
            {"selection": {"arm_scores": {
                "sae": "/elsewhere/verdict_alpaca/sae_predictor_all/row_scores.jsonl"}}}))
    return truth, corrupted, made


def test_sae_predictor_table(tmp_path):
    """report.py's SAE predictor table: per pooling the out-of-fold Spearman and top-k overlap
    of its summary.json, the planted AUC of its out-of-fold prediction and of the attribution
    score (by sklearn here), which arm used it; the generated line names the better pooling for
    each; the sae arm is in the verdict table with its predictor's score-length Spearman."""
    from sklearn.metrics import roc_auc_score

    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"sae": (-0.01, 0.02)}})
    truth, corrupted, made = fabricate_sae_predictors(run)
    result, md = verdict_report(run)
    section = result["sae_predictors"]["run"]
    keep = ~np.isnan(truth)
    auc = {pooling: roc_auc_score(~corrupted[keep], predicted[keep])
           for pooling, (predicted, _, _) in made.items()}
    attribution_auc = roc_auc_score(~corrupted[keep], truth[keep])
    assert auc["completion"] < auc["all"]   # the planted rows: noise 3 vs 0.3
    lines = md.split("## SAE predictor", 1)[1].split("\n")
    header = next(line for line in lines if line.startswith("| split |"))
    cells = {}
    for line in lines:
        if line.startswith("| run |"):
            row = dict(zip([c.strip() for c in header.strip("|").split("|")],
                           [c.strip() for c in line.strip("|").split("|")]))
            cells[row["pooling"]] = row
    assert set(cells) == {"all", "completion"}
    for pooling, (_, spearman, overlap) in made.items():
        entry = section["predictors"][f"sae_predictor_{pooling}"]
        assert entry["planted_auc"] == pytest.approx(auc[pooling])
        assert entry["attribution_planted_auc"] == pytest.approx(attribution_auc)
        row = cells[pooling]
        assert row["out-of-fold Spearman"] == f"{spearman:.3f}"
        assert row["top-k overlap"] == f"{overlap}/10 ({10 * 10 / 59:.1f})"
        assert row["planted AUC"] == f"{auc[pooling]:.3f}"
        assert row["attribution planted AUC"] == f"{attribution_auc:.3f}"
    assert cells["all"]["used by"] == "sae (5 seeds)" and cells["completion"]["used by"] == "-"
    # the poolings compared on the same rows, by a paired bootstrap: the point differences are
    # the rows' own (scipy's Spearman, sklearn's AUC), and noise 0.3 vs 3 is a clear difference
    from scipy.stats import spearmanr

    gap = (spearmanr(made["all"][0][keep], truth[keep]).statistic
           - spearmanr(made["completion"][0][keep], truth[keep]).statistic)
    match = re.fullmatch(
        r"Out of fold, `all` - `completion` \(paired bootstrap over 59 rows, 95%\): "
        r"attribution-rank Spearman ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\], `all` better; "
        r"planted AUC ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\], `all` better; "
        r"the attribution score itself: AUC ([\d.]+)\.", section["comparison"])
    assert match, section["comparison"]
    values = [float(v) for v in match.groups()]
    assert values[0] == pytest.approx(gap, abs=5e-4) and 0 < values[1] < values[0] < values[2]
    assert values[3] == pytest.approx(auc["all"] - auc["completion"], abs=5e-4)
    assert values[4] < values[3] < values[5]
    assert values[6] == pytest.approx(attribution_auc, abs=5e-4)
    assert f"- run: {section['comparison']}" in md
    sae = md_rows(md, "scratch")["sae"]
    assert sae["score-length Spearman"] == "0.200"   # sae_predictor_all's, the one it drew from
    assert sae["subset rows"] == "40"
    assert result["verdict"]["designs"]["scratch"]["arms"]["sae"]["verdict"] in (
        "beats", "does not beat", "is worse than")


def test_two_poolings_alike_are_not_called_different(tmp_path):
    """Predictions of equal quality (the same noise): the interval covers 0 and the line says
    so, whatever the point estimates (one fit each is not a finding)."""
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"sae": (-0.01, 0.02)}})
    fabricate_sae_predictors(run, noises=(1.0, 1.0))
    result, _ = verdict_report(run)
    comparison = result["sae_predictors"]["run"]["comparison"]
    assert comparison.count("no difference shown") == 2 and "better" not in comparison


def test_holm_by_hand():
    from report import holm

    # sorted 0.01, 0.02, 0.04 (m = 3): 0.03, 0.04, 0.04 (monotone); None stays out
    assert holm({"a": 0.04, "b": 0.01, "c": 0.02, "d": None}) == pytest.approx(
        {"a": 0.04, "b": 0.03, "c": 0.04, "d": None})
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}


# ---------------------------------------------------------------------------------------------
# recipes/verdict.toml and the demo's small verdict: the plan the runner makes

VERDICT_ARMS = ["attribution", "attribution_raw", "random", "random_stratified", "longest",
                "reward", "sae", "attribution_bottom"]
DESIGNS = ["scratch", "continue"]


def verdict_plan(name="verdict", seeds=(1, 2, 3, 4, 5), per_seed_split=None):
    import run_experiment as rx
    from conftest import ROOT

    recipe = rx.load_recipe(ROOT / "recipes" / f"{name}.toml", "runs/v", list(seeds), [])
    if per_seed_split is not None:
        recipe.per_seed_split = per_seed_split
        rx.check_steps(recipe)
    tasks = rx.plan_tasks(recipe)
    rx.check_inputs_declared(recipe, tasks)
    return recipe, tasks


def flag(task, name):
    return task.argv[task.argv.index(name) + 1] if name in task.argv else None


def test_every_arm_and_design_is_trained_and_evaluated_alike():
    """One finetune and one eval step per design x arm x seed, the same command but for the
    arm's split and the design's --init (so no arm gets another budget or recipe by a typo), and
    the arms are exactly the ones score.py --arms draws and compare_evals.py compares."""
    import subsets

    import tomllib

    from conftest import ROOT

    steps = tomllib.loads((ROOT / "recipes" / "verdict.toml").read_text())["steps"]
    inits = {"scratch": "--init scratch --base-model {model}",
             "continue": "--init continue --resume-adapter {split_dir}/base_adapter"}
    shapes = {}
    for step in steps:
        for design in DESIGNS:
            for arm in VERDICT_ARMS:
                if step["name"] in (f"finetune_{design}_{arm}", f"eval_{design}_{arm}"):
                    text = json.dumps(step).replace(inits[design], "INIT")
                    text = text.replace(f"{design}_{arm}", "DESIGN_ARM")
                    text = text.replace(f"--train-split {arm} ", "--train-split ARM ")
                    text = text.replace(', "{split_dir}/base_adapter"]', "]")  # continue
                    shapes.setdefault(step["name"].split("_")[0], set()).add(
                        text.replace(f'"{step["name"]}"', '"NAME"'))
    assert {k: len(v) for k, v in shapes.items()} == {"finetune": 1, "eval": 1}, shapes

    recipe, tasks = verdict_plan()
    by_key = {t.key: t for t in tasks}
    arms_task = by_key["arms@seed1"]
    assert flag(arms_task, "--arms").split(",") == VERDICT_ARMS
    assert set(VERDICT_ARMS) <= set(subsets.ARMS)
    assert [arms_task.argv[i + 1] for i, a in enumerate(arms_task.argv) if a == "--arm-scores"] \
        == ["attribution_raw=runs/v/scores_raw", "sae=runs/v/sae_predictor_all/row_scores.jsonl"]
    for seed in (1, 2, 3, 4, 5):
        assert flag(by_key[f"arms@seed{seed}"], "--seed") == str(seed)  # random arms redraw
        for design in DESIGNS:
            for arm in VERDICT_ARMS:
                train = by_key[f"finetune_{design}_{arm}@seed{seed}"]
                assert flag(train, "--train-split") == arm
                assert flag(train, "--manifest") == \
                    f"runs/v/seed_{seed}/arms/continuation_manifest.json"
                assert flag(train, "--seed") == str(seed)
                assert flag(train, "--init") == design
                if design == "continue":
                    assert flag(train, "--resume-adapter") == "runs/v/base_adapter"
                else:
                    assert "--resume-adapter" not in train.argv and flag(train, "--base-model")
                out = f"runs/v/seed_{seed}/adapter_{design}_{arm}"
                assert flag(train, "--output-dir") == out
                for name, var in (("--preset", "preset"), ("--step-tokens", "step_tokens"),
                                  ("--budget-tokens", "budget_tokens")):
                    assert flag(train, name) == recipe.vars[var]
                assert flag(train, "--keep") == "last" and flag(train, "--eval-split") == "none"
                evaluate = by_key[f"eval_{design}_{arm}@seed{seed}"]
                assert flag(evaluate, "--adapter-path") == out and "--skip-base" in evaluate.argv
                assert flag(evaluate, "--output-json") == \
                    f"runs/v/seed_{seed}/eval_{design}_{arm}.json"
    for design in DESIGNS:
        compare = by_key[f"compare_{design}"]
        arms = [a.split("=")[0] for a in compare.argv[1:]
                if "=" in a and a.endswith(".per_example.jsonl")]
        assert arms == VERDICT_ARMS and flag(compare, "--label") == design
        assert [f"{a}=runs/v/seed_*/eval_{design}_{a}.per_example.jsonl" for a in VERDICT_ARMS] \
            == [compare.argv[i + 1] for i, a in enumerate(compare.argv) if a == "--arm"]
        i = compare.argv.index("--baselines")
        assert compare.argv[i + 1:i + 5] == ["random", "random_stratified", "longest", "reward"]
        assert flag(compare, "--output-json") == f"runs/v/compare_{design}.json"


def test_verdict_shares_the_m1_steps_and_scores_once_per_split():
    import run_experiment as rx
    from conftest import ROOT

    plans = {name: {t.key: (t.argv, t.inputs, t.outputs) for t in rx.plan_tasks(
        rx.load_recipe(ROOT / "recipes" / f"{name}.toml", "runs/same", [1, 2], []))}
        for name in ("m1", "verdict")}
    assert {k: plans["verdict"][k] for k in plans["m1"]} == plans["m1"]
    recipe, tasks = verdict_plan()
    scoring = [t for t in tasks if t.argv[0] == "score.py" and "--scores-only" in t.argv]
    assert [(t.step, t.seed) for t in scoring] == [("score", None), ("score_raw", None)]
    raw = next(t for t in scoring if t.step == "score_raw")
    assert (flag(raw, "--score-normalization"), flag(raw, "--loss-reduction"),
            flag(raw, "--damping-rule")) == ("none", "sum", "mean_eig")
    default = next(t for t in scoring if t.step == "score")
    for name in ("--score-normalization", "--loss-reduction", "--damping-rule",
                 "--preconditioning-mode"):
        assert name not in default.argv          # the default score is score.py's default


def test_per_seed_split_plans_a_split_and_scores_per_seed():
    import run_experiment as rx

    recipe, tasks = verdict_plan(seeds=(1, 2, 3), per_seed_split=True)
    by_key = {t.key: t for t in tasks}
    for step in ("dataset", "finetune_base", "eval_base", "score", "score_raw"):
        assert [t.seed for t in tasks if t.step == step] == [1, 2, 3]
    for seed in (1, 2, 3):
        assert flag(by_key[f"score@seed{seed}"], "--output-dir") == f"runs/v/seed_{seed}/scores"
        assert flag(by_key[f"arms@seed{seed}"], "--scores-from") == f"runs/v/seed_{seed}/scores"
        assert flag(by_key[f"finetune_continue_random@seed{seed}"], "--resume-adapter") == \
            f"runs/v/seed_{seed}/base_adapter"
    verdict_plan("demo", seeds=(1, 2), per_seed_split=True)     # its inputs resolve too
    deps = rx.dependencies(tasks)
    index = {t.key: i for i, t in enumerate(tasks)}
    waits = lambda key: {tasks[j].key for j in deps[index[key]]}  # noqa: E731
    assert waits("arms@seed2") >= {"score@seed2", "score_raw@seed2"}
    assert not any(k.endswith(("@seed1", "@seed3")) for k in waits("arms@seed2"))


@pytest.mark.parametrize("per_seed_split", [False, True], ids=["shared_split", "split_per_seed"])
def test_sae_steps_once_per_split_on_both_poolings(per_seed_split):
    """One SAE per split, its features pooled both ways, a predictor of the split's default
    score on each (the seed of the split's steps: the folds do not change with the training
    seed), and the arms step reading the predictor that sae_positions names (the seed's all by
    default; --var sae_positions=completion switches it)."""
    import run_experiment as rx
    from conftest import ROOT

    seeds = (1, 2, 3)
    recipe, tasks = verdict_plan(seeds=seeds, per_seed_split=per_seed_split)
    splits = list(seeds) if per_seed_split else [None]
    where = lambda seed: f"runs/v/seed_{seed}" if per_seed_split else "runs/v"  # noqa: E731
    by_step = {}
    for task in tasks:
        by_step.setdefault(task.step, []).append(task)
    assert [t.seed for t in by_step["train_sae"]] == splits
    for pooling in ("all", "completion"):
        for features, predictor in zip(by_step[f"sae_features_{pooling}"],
                                       by_step[f"sae_predictor_{pooling}"]):
            split = where(features.seed)
            assert features.seed == predictor.seed and features.seed in splits
            assert flag(features, "--positions") == pooling
            assert flag(features, "--sae-path") == f"{split}/local_sae"
            assert flag(features, "--output-dir") == f"{split}/sae_features_{pooling}"
            assert flag(predictor, "--sae-dir") == f"{split}/sae_features_{pooling}"
            assert flag(predictor, "--scores-from") == f"{split}/scores"  # the attribution arm's
            assert flag(predictor, "--output-root") == f"{split}/sae_predictor_{pooling}"
            assert flag(predictor, "--seed") == str(recipe.base_seed if features.seed is None
                                                    else features.seed)
            assert flag(predictor, "--top-k") == recipe.vars["k"]
    assert recipe.vars["sae_positions"] == "all"
    for task in by_step["arms"]:
        scores = [task.argv[i + 1] for i, a in enumerate(task.argv) if a == "--arm-scores"]
        assert f"sae={where(task.seed)}/sae_predictor_all/row_scores.jsonl" in scores
    other = rx.load_recipe(ROOT / "recipes" / "verdict.toml", "runs/v", [1],
                           ["sae_positions=completion"])
    arms = next(t for t in rx.plan_tasks(other) if t.step == "arms")
    assert "sae=runs/v/sae_predictor_completion/row_scores.jsonl" in arms.argv
    assert "runs/v/sae_predictor_completion/row_scores.jsonl" in arms.inputs


def test_dry_run_with_jobs_plans_one_score_per_split_and_arms_per_seed():
    import re
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "run_experiment.py", "recipes/verdict.toml",
                          "--dry-run", "--seeds", "1", "2", "3", "4", "5", "--jobs", "5"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    levels = dict(re.findall(r"^# level \d+: (\S+)(.*)$", out, re.M))
    assert [k for k in levels if k.split("@")[0] in ("score", "score_raw")] == ["score",
                                                                                "score_raw"]
    assert [k for k in levels if k.startswith("arms")] == [f"arms@seed{s}" for s in range(1, 6)]
    for s in range(1, 6):
        # score itself is reached through sae_predictor_all (the plan lists the nearest steps)
        assert set(levels[f"arms@seed{s}"].removeprefix(" <- ").split(", ")) == {
            "score_raw", "sae_predictor_all"}
        assert levels["sae_predictor_all"] == " <- score, sae_features_all"
        assert levels[f"finetune_scratch_reward@seed{s}"] == f" <- arms@seed{s}"
    assert len([k for k in levels if k.startswith("finetune_")]) == 1 + 5 * 2 * 8
    assert "# slots: 1=unpinned, 2=unpinned, 3=unpinned, 4=unpinned, 5=unpinned" in out


def test_the_demo_is_a_small_verdict():
    """The demo's arm steps are verdict.toml's continue-design commands (the same TOML text),
    two seeds, the SAE steps kept; its arms and designs are a subset of the verdict's."""
    import tomllib

    from conftest import ROOT

    steps = {name: {s["name"]: s for s in tomllib.loads(
        (ROOT / "recipes" / f"{name}.toml").read_text())["steps"]} for name in ("demo", "verdict")}
    recipe, tasks = verdict_plan("demo", seeds=(1, 2))
    trained = [t for t in tasks if t.step.startswith("finetune_continue_")]
    assert {flag(t, "--train-split") for t in trained} == {"attribution", "random", "longest",
                                                            "sae"}
    for task in trained:
        name = task.step
        for key in ("run", "outputs"):
            assert steps["demo"][name][key] == steps["verdict"][name][key], (name, key)
        evaluate = name.replace("finetune_", "eval_")
        assert steps["demo"][evaluate]["run"] == steps["verdict"][evaluate]["run"]
    assert steps["demo"]["compare_continue"]["outputs"] == \
        steps["verdict"]["compare_continue"]["outputs"]
    for step in ("train_sae", "sae_features_all", "sae_features_completion", "sae_predictor_all",
                 "sae_predictor_completion"):
        assert step in steps["demo"], step
    for pooling in ("all", "completion"):   # the predictor's command is the verdict's
        name = f"sae_predictor_{pooling}"
        assert steps["demo"][name]["run"] == steps["verdict"][name]["run"]
    assert not any(s.startswith("finetune_scratch") for s in steps["demo"])
    import run_experiment as rx

    assert rx.load_recipe(ROOT / "recipes" / "demo.toml", None, None, []).seeds == [1, 2]


def test_the_scale_recipe_is_the_verdict_with_four_arms():
    """recipes/verdict_scale.toml (a larger model in one GPU lease) runs verdict.toml's steps of
    the same names with the same TOML, except the arms and compare steps, which list the arms the
    scale comparison needs; no SAE or raw-score step, and no step of its own."""
    import tomllib

    from conftest import ROOT

    steps = {name: {s["name"]: s for s in tomllib.loads(
        (ROOT / "recipes" / f"{name}.toml").read_text())["steps"]}
        for name in ("verdict_scale", "verdict")}
    scale, verdict = steps["verdict_scale"], steps["verdict"]
    assert set(scale) <= set(verdict)
    differ = {name for name in scale if scale[name] != verdict[name]}
    assert differ == {"arms", "compare_scratch", "compare_continue", "report"}, differ
    four = ["attribution", "random", "longest", "reward"]
    recipe, tasks = verdict_plan("verdict_scale")
    by_key = {t.key: t for t in tasks}
    assert flag(by_key["arms@seed1"], "--arms").split(",") == four
    assert "--arm-scores" not in by_key["arms@seed1"].argv
    trained = {(flag(t, "--init"), flag(t, "--train-split")) for t in tasks
               if t.step.startswith("finetune_") and t.step != "finetune_base"}
    assert trained == {(d, a) for d in DESIGNS for a in four}
    for design in DESIGNS:
        compare = by_key[f"compare_{design}"]
        assert [compare.argv[i + 1].split("=")[0] for i, a in enumerate(compare.argv)
                if a == "--arm"] == four
        i = compare.argv.index("--baselines")
        assert compare.argv[i + 1:i + 4] == ["random", "longest", "reward"]
    assert not any("sae" in t.step or t.step == "score_raw" for t in tasks)
    # report: the verdict's, with the optional inputs of the dropped steps left out
    assert scale["report"]["run"] == verdict["report"]["run"]
    assert scale["report"]["inputs"] == verdict["report"]["inputs"]
    assert set(scale["report"]["optional_inputs"]) < set(verdict["report"]["optional_inputs"])


# ---------------------------------------------------------------------------------------------
# score.py --arms: the arms step on fabricated scores (no model needed)


def fake_scores(folder, split, scores, fingerprint):
    folder.mkdir(parents=True)
    rows = [{"row_id": r, "score": float(s), "rank": None, "num_tokens": 10 + i,
             "num_supervised_tokens": 3 + (i % 7) * 5} for i, (r, s) in
            enumerate(zip(split["row_id"], scores))]
    (folder / "train_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"train_split": "score_pool",
                                                     "train_fingerprint": fingerprint}))
    return rows


def test_score_arms_step_writes_one_split_per_arm(tmp_path, monkeypatch):
    import tiny
    from conftest import run_script
    from pipeline import load_manifest, load_split, split_fingerprint

    source = tiny.write_jsonl(tmp_path / "chat.jsonl", tiny.smoltalk_rows(120, seed=3))
    run_script("dataset.py", "--run-dir", tmp_path / "run", "--dataset-name", source,
               "--group-column", "instruction_id", "--train-size", 60, "--query-size", 6,
               "--eval-size", 6, "--seed", 1)
    manifest = load_manifest(tmp_path / "run" / "manifest.json")
    split = load_split(manifest, "score_pool")
    rng = np.random.default_rng(0)
    rows = fake_scores(tmp_path / "run" / "scores", split, rng.normal(size=len(split)),
                       split_fingerprint(split))
    fake_scores(tmp_path / "run" / "scores_raw", split, rng.normal(size=len(split)),
                split_fingerprint(split))
    arms = "attribution,attribution_raw,random,random_stratified,longest,reward,attribution_bottom"

    def arms_step(seed):
        out = tmp_path / f"arms_{seed}"
        run_script("score.py", "--manifest", tmp_path / "run" / "manifest.json",
                   "--scores-from", tmp_path / "run" / "scores", "--arms", arms,
                   "--arm-scores", f"attribution_raw={tmp_path / 'run' / 'scores_raw'}",
                   "--subset-k", 8, "--seed", seed, "--output-dir", out, "--overwrite")
        picked = load_manifest(out / "continuation_manifest.json")
        return ({arm: sorted(load_split(picked, arm)["row_id"]) for arm in arms.split(",")},
                json.loads((out / "summary.json").read_text()))

    first, summary = arms_step(1)
    again, _ = arms_step(1)
    other, _ = arms_step(2)
    assert first == again
    by_score = sorted(rows, key=lambda r: -r["score"])
    assert first["attribution"] == sorted(r["row_id"] for r in by_score[:8])
    assert first["attribution_bottom"] == sorted(r["row_id"] for r in by_score[-8:])
    assert not set(first["random"]) & set(first["attribution"])
    assert first["random"] != other["random"] and first["longest"] == other["longest"]
    assert set(summary["arms"]) == set(arms.split(","))
    assert all(summary["arms"][a]["rows"] == 8 for a in arms.split(","))
    longest_tokens = summary["arms"]["longest"]["supervised_tokens"]
    assert all(summary["arms"][a]["supervised_tokens"] <= longest_tokens for a in summary["arms"])


def test_verdict_sentence_groups_designs_with_the_same_verdict(tmp_path):
    run = fabricate_verdict_run(tmp_path / "run", {"scratch": {"attribution": (0.05, 0.004)},
                                                   "continue": {"attribution": (0.0, 0.03)},
                                                   "other": {"attribution": (0.04, 0.004)}})
    sentence = verdict_report(run)[0]["verdict"]["sentence"]
    worse = sentence.index("is worse than budget-matched random data")
    assert sentence.count("is worse than") == 1 and sentence.count(", but ") == 1
    assert worse < sentence.index("from scratch") < sentence.index(") and in design other (")
    assert sentence.index("in design other") < sentence.index(", but does not beat it continuing")
