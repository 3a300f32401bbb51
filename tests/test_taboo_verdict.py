"""Taboo on real games (issue 18): the split by word of an 809-like file, the two text formats
(rendering, and bergson's ids = finetune's ids in both), both success rules and the seed's
generation fallback, the outcome x length stratified arm, the success statistics over seeds and
report.py's Taboo verdict table."""

import json
import math
from collections import Counter

import numpy as np
import pytest

import taboo_fixture
from conftest import run_script

# ---------------------------------------------------------------------------------------------
# dataset.py on an 809-like file


@pytest.fixture(scope="module")
def like_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clembench_like")
    rows = taboo_fixture.clembench_like_rows(seed=0)
    return {"rows": rows, "jsonl": taboo_fixture.write_jsonl(folder / "episodes.jsonl", rows)}


def split_like(run_dir, source, *extra, seed=42):
    run_script("dataset.py", "--task", "taboo", "--run-dir", run_dir, "--dataset-name",
               source["jsonl"], "--whole-words", "--query-size", 60, "--eval-size", 150,
               "--seed", seed, *extra)
    return json.loads((run_dir / "manifest.json").read_text())


def load_splits(run_dir, manifest):
    from datasets import load_from_disk

    return {n: load_from_disk(str(run_dir / e["path"])).to_list()
            for n, e in manifest["splits"].items()}


@pytest.mark.parametrize("seed", [42, 7])
def test_split_by_word_keeps_v2_together_and_eval_at_least_150(tmp_path, like_source, seed):
    manifest = split_like(tmp_path / "run", like_source, "--text-format", "flat", seed=seed)
    splits = load_splits(tmp_path / "run", manifest)
    rows = like_source["rows"]
    meta = [r["meta"] for r in rows]
    kept = [m for m in meta if m["outcome"] != "aborted" and not m.get("special_token_leak")]
    total = manifest["filter_stats"]["total"]
    assert total["dropped_outcome_aborted"] == sum(m["outcome"] == "aborted" for m in meta)
    assert total["dropped_special_token_leak"] == sum(
        m["outcome"] != "aborted" and bool(m.get("special_token_leak")) for m in meta)
    assert total["rows_kept"] == len(kept)
    # every kept episode is in exactly one split (whole words: none is sampled away)
    held = ("train_base", "attr_query", "eval")
    assert sum(len(splits[n]) for n in held) == len(kept)
    words = {n: {r["target_word"] for r in splits[n]} for n in held}
    assert not words["train_base"] & words["attr_query"]
    assert not words["train_base"] & words["eval"] and not words["attr_query"] & words["eval"]
    # whole words: every episode of a held-out word is held out, and the sizes are minimums
    per_word = Counter(m["target_word"] for m in kept)
    for n in ("attr_query", "eval"):
        assert len(splits[n]) == sum(per_word[w] for w in words[n])
    assert len(splits["eval"]) >= 150 and len(splits["attr_query"]) >= 60
    # the v2.0 words: all together, in train_base
    v2 = {m["target_word"] for m in kept if m["clembench_version"] == taboo_fixture.V2}
    assert len(v2) == 12 and v2 <= words["train_base"]
    assert manifest["split_policy"]["train_only_rows"] == sum(
        m["clembench_version"] == taboo_fixture.V2 for m in kept)
    # the manifest says words, episodes and outcomes per split
    t = manifest["taboo"]
    assert t["num_words_per_split"] == {n: len(words[n]) for n in held}
    assert t["episodes_per_split"] == {n: len(splits[n]) for n in held}
    assert t["outcomes_per_split"] == {n: dict(sorted(Counter(r["quality"] for r in splits[n])
                                                      .items())) for n in held}
    assert manifest["text_format"] == "flat"
    assert {r["text_format"] for n in held for r in splits[n]} == {"flat"}


def test_exact_sizes_without_whole_words_and_v2_never_held_out(tmp_path, like_source):
    run_script("dataset.py", "--task", "taboo", "--run-dir", tmp_path / "run", "--dataset-name",
               like_source["jsonl"], "--train-size", 300, "--query-size", 40, "--eval-size", 100)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    splits = load_splits(tmp_path / "run", manifest)
    assert [len(splits[n]) for n in ("train_base", "attr_query", "eval")] == [300, 40, 100]
    assert manifest["text_format"] == "chat" and splits["eval"][0]["text_format"] == "chat"
    held = {r["target_word"] for n in ("attr_query", "eval") for r in splits[n]}
    assert not any(w.startswith("vtwo") for w in held)
    # --whole-words belongs to --task taboo
    result = run_script("dataset.py", "--run-dir", tmp_path / "c", "--dataset-name",
                        like_source["jsonl"], "--whole-words", expect_ok=False)
    assert result.returncode == 2 and "--whole-words" in result.stderr


# ---------------------------------------------------------------------------------------------
# the two text formats


class FakeTokenizer:
    eos_token = "</s>"


def test_flat_rendering_is_the_seeds_text():
    from pipeline import render_prompt, render_prompt_and_completion

    prompt = [{"role": "user", "content": "Guess.\n\nCLUE: cold season"},
              {"role": "assistant", "content": "GUESS: snow"},
              {"role": "user", "content": "CLUE: after autumn"}]
    text = render_prompt(FakeTokenizer(), prompt, "flat")
    assert text == ("USER: Guess.\n\nCLUE: cold season\n\nASSISTANT: GUESS: snow\n\n"
                    "USER: CLUE: after autumn\n\nASSISTANT:")
    p, c = render_prompt_and_completion(FakeTokenizer(), prompt, "GUESS: winter", "flat")
    assert p == text and c == " GUESS: winter</s>"
    with pytest.raises(Exception, match="text_format 'xml'"):
        render_prompt(FakeTokenizer(), prompt, "xml")


def test_tokenize_split_renders_each_row_by_its_text_format(tiny_model):
    from datasets import Dataset

    from pipeline import IGNORE_INDEX, load_tokenizer, tokenize_example, tokenize_split

    tokenizer = load_tokenizer(str(tiny_model))
    prompt = [{"role": "user", "content": "CLUE: a cold season"}]
    rows = [{"row_id": f"r{f}", "prompt": prompt, "completion": "GUESS: winter", "text_format": f}
            for f in ("flat", "chat")]
    out = tokenize_split(Dataset.from_list(rows), tokenizer, 256).to_list()
    for row, fmt in zip(out, ("flat", "chat")):
        assert row["input_ids"] == tokenize_example(tokenizer, prompt, "GUESS: winter", 256,
                                                    fmt)["input_ids"]
    flat, chat = out
    assert flat["input_ids"] != chat["input_ids"]
    n_prompt = len(tokenizer("USER: CLUE: a cold season\n\nASSISTANT:",
                             add_special_tokens=False)["input_ids"])
    assert flat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert flat["labels"][n_prompt:] == flat["input_ids"][n_prompt:]
    assert tokenizer.decode(flat["input_ids"][n_prompt:]) == " GUESS: winter" + tokenizer.eos_token


@pytest.fixture(scope="module")
def small_taboo(tmp_path_factory):
    """The fixture of test_taboo.py (15 words), small enough for the tiny model's CPU runs."""
    folder = tmp_path_factory.mktemp("small_taboo")
    rows = taboo_fixture.wordguesser_rows(seed=1)
    return {"jsonl": taboo_fixture.write_jsonl(folder / "playpen.jsonl", rows)}


@pytest.mark.parametrize("text_format", ["flat", "chat"])
def test_bergson_sees_finetune_ids_in_both_formats(tmp_path, tiny_model, small_taboo,
                                                    text_format):
    """The alignment test of test_score.py on Taboo rows in each format: bergson's own loader
    reads score.py's data and finds finetune.py's ids and labels, prompts masked."""
    from bergson.config.config import DataConfig, IndexConfig
    from bergson.utils.worker_utils import setup_data_pipeline
    from datasets import load_from_disk

    from pipeline import load_tokenizer, render_prompt, tokenize_split

    run = tmp_path / "run"
    run_script("dataset.py", "--task", "taboo", "--run-dir", run, "--dataset-name",
               small_taboo["jsonl"], "--train-size", 20, "--query-size", 5, "--eval-size", 6,
               "--text-format", text_format)
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", run / "manifest.json",
               "--base-model", tiny_model, "--output-dir", run / "base_adapter", "--max-steps", 1,
               "--lora-rank", 4, "--max-length", 256, "--eval-split", "none")
    run_script("score.py", "--manifest", run / "manifest.json", "--adapter-path",
               run / "base_adapter", "--output-dir", run / "scores", "--max-length", 256,
               "--projection-dim", 16, "--subset-k", 4, "--scores-only")
    cfg = IndexConfig(run_path=str(tmp_path / "probe"), model=str(run / "base_adapter"),
                      data=DataConfig(dataset=str(run / "scores" / "bergson_data" / "train")),
                      token_batch_size=512)
    seen, _ = setup_data_pipeline(cfg)
    tokenizer = load_tokenizer(str(tiny_model))
    train = load_from_disk(str(run / "data" / "train_base"))
    trained = tokenize_split(train, tokenizer, 256)
    assert seen["input_ids"] == trained["input_ids"] and seen["labels"] == trained["labels"]
    for row, ids, labels in zip(train, seen["input_ids"], seen["labels"]):
        n_prompt = len(tokenizer(render_prompt(tokenizer, row["prompt"], text_format),
                                 add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert ids[:n_prompt] == tokenizer(render_prompt(tokenizer, row["prompt"], text_format),
                                           add_special_tokens=False)["input_ids"]
    if text_format == "flat":
        assert tokenizer.decode(seen["input_ids"][0]).startswith("USER: ")


# ---------------------------------------------------------------------------------------------
# success rules and the seed's generation settings


def test_success_rules_and_first_word_fallback():
    from eval_words import score_replies
    from taboo import read_guess

    rows = [  # a won episode (reference = target), a lost one (reference = the wrong last guess)
        {"row_id": "a", "target_word": "winter", "completion": "GUESS: Winter"},
        {"row_id": "b", "target_word": "winter", "completion": "GUESS: snow"},
        {"row_id": "c", "target_word": "ferry", "completion": "GUESS: boat"},
        {"row_id": "d", "target_word": "ferry", "completion": "no guess here"},
    ]
    replies = ["GUESS: winters", "GUESS: Snow.", "ferries, I think", "boat"]
    summary, per_row = score_replies(rows, replies, "target")
    assert [r["success_target"] for r in per_row] == [True, False, False, False]
    # reference: exact word of the reference's last guess, no stemming ("winters" != "winter")
    assert [r["success_reference"] for r in per_row] == [False, True, False, False]
    assert summary["successes"] == 1 and summary["unparseable"] == 2
    assert summary["by_rule"]["reference"]["successes"] == 1
    assert summary["by_rule"]["target"]["summary"] == "1/4 = 0.2500"
    # the seed's fallback: a reply without GUESS is read as its first word
    summary, per_row = score_replies(rows, replies, "reference", fallback_first_word=True)
    assert [r["guess"] for r in per_row] == ["winters", "snow", "ferries", "boat"]
    assert [r["guess_read"] for r in per_row] == ["guess_marker", "guess_marker", "first_word",
                                                  "first_word"]
    assert [r["success_target"] for r in per_row] == [True, False, True, False]
    assert [r["success"] for r in per_row] == [False, True, False, False]   # reference rule
    assert summary["first_word_fallbacks"] == 2 and summary["unparseable"] == 0
    assert read_guess("", True) == (None, "none") and read_guess("...", True) == (None, "none")


def test_mcnemar_is_scipys_binomtest():
    from scipy.stats import binomtest

    from compare_evals import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    for b, c in [(8, 2), (0, 5), (13, 7), (1, 0)]:
        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


# ---------------------------------------------------------------------------------------------
# the stratified arm


def outcome_pool(n=300, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 40, size=n)
    outcome = np.where(rng.random(n) < 0.6, "success", "lose")
    # attribution favours long lost episodes: a reference with a skewed mix
    scores = tokens / 80 + 0.4 * (outcome == "lose") + rng.normal(0, 0.3, n)
    return scores, tokens, outcome.tolist()


@pytest.mark.parametrize("allow_overlap", [True, False])
def test_outcome_length_stratified_arm_copies_the_top_k_mix(allow_overlap):
    from subsets import length_strata, rank_rows, select_arm

    scores, tokens, outcome = outcome_pool(n=600)
    k = 60
    top = select_arm("attribution", k, scores, supervised_tokens=tokens)
    stratum = length_strata(sorted(rank_rows(scores)), tokens)

    def mix(rows):
        return Counter((outcome[r], stratum[r]) for r in rows)

    draws = []
    for seed in (1, 2, 3):
        rows = select_arm("random_outcome_stratified", k, scores, supervised_tokens=tokens,
                          seed=seed, outcome=outcome, allow_overlap=allow_overlap)
        assert mix(rows) == mix(top) and len(rows) == k == len(set(rows))
        if not allow_overlap:
            assert not set(rows) & set(top)
        assert rows == select_arm("random_outcome_stratified", k, scores,
                                  supervised_tokens=tokens, seed=seed, outcome=outcome,
                                  allow_overlap=allow_overlap)
        draws.append(tuple(rows))
    assert len(set(draws)) == 3
    assert Counter(outcome[r] for r in top)["lose"] > 0.55 * k  # the reference really is skewed
    # the length-only arm does not copy the outcome mix
    length_only = select_arm("random_stratified", k, scores, supervised_tokens=tokens, seed=1,
                             allow_overlap=True)
    assert Counter(outcome[r] for r in length_only) != Counter(outcome[r] for r in top)
    with pytest.raises(Exception, match="needs the pool's outcome column"):
        select_arm("random_outcome_stratified", k, scores, supervised_tokens=tokens)


def test_outcome_stratified_arm_names_the_short_cell():
    from subsets import select_arm

    scores, tokens, outcome = outcome_pool(n=100)
    with pytest.raises(Exception, match="random_outcome_stratified needs .* rows of outcome"):
        select_arm("random_outcome_stratified", 50, scores, supervised_tokens=tokens,
                   outcome=outcome)   # half the pool outside the top-k: some cell runs short


# ---------------------------------------------------------------------------------------------
# the success statistics over seeds and report.py's Taboo verdict


ARMS = ("attribution", "random_outcome_stratified", "longest")


def fake_eval_words(path, outcomes: dict[str, list[tuple[bool, bool]]]):
    """An eval_words.py JSON with per_row outcomes (target, reference) per model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    per_row = {m: [{"row_id": f"e{i}", "success": t, "success_target": t, "success_reference": r}
                   for i, (t, r) in enumerate(rows)] for m, rows in outcomes.items()}
    path.write_text(json.dumps({"success_rule": "target", "per_row": per_row,
                                "models": {}, "generation": {"preset": "seed"}}))


def test_compare_success_and_report_table(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(3)
    n, seeds = 40, ["seed_1", "seed_2", "seed_3"]
    truth = {}
    for s in seeds:
        rates = {"attribution": 0.6, "random_outcome_stratified": 0.4, "longest": 0.5}
        outcomes = {a: [(bool(rng.random() < p), bool(rng.random() < 0.3)) for _ in range(n)]
                    for a, p in rates.items()}
        truth[s] = outcomes
        fake_eval_words(tmp_path / s / "eval_words_scratch_k12.json", outcomes)
    (tmp_path / "eval_words_base.json").write_text(json.dumps({"models": {"base": {
        "by_rule": {"target": {"successes": 3, "rows": n},
                    "reference": {"successes": 5, "rows": n}}},
        "base_adapter": {"by_rule": {"target": {"successes": 9, "rows": n}}}}}))
    out = tmp_path / "compare_scratch_k12.json"
    run_script("compare_evals.py", "--metric", "success", "--label", "scratch_k12",
               *[x for a in ARMS for x in ("--arm", f"{a}={tmp_path}/seed_*/"
                                                    "eval_words_scratch_k12.json")],
               "--baselines", "random_outcome_stratified", "longest", "--output-json", out)
    result = json.loads(out.read_text())
    assert result["kind"] == "success_comparisons" and result["rules"] == ["target", "reference"]
    for rule_index, rule in enumerate(result["rules"]):
        stat = result["comparisons"][rule]["attribution"]["random_outcome_stratified"]
        deltas = []
        for s in seeds:
            a = [x[rule_index] for x in truth[s]["attribution"]]
            b = [x[rule_index] for x in truth[s]["random_outcome_stratified"]]
            only_a = sum(x and not y for x, y in zip(a, b))
            only_b = sum(y and not x for x, y in zip(a, b))
            got = stat["per_seed"][s]
            assert (got["a_successes"], got["b_successes"]) == (sum(a), sum(b))
            assert (got["a_success_b_fail"], got["a_fail_b_success"]) == (only_a, only_b)
            p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            assert got["p_mcnemar"] == pytest.approx(p)
            deltas.append((sum(a) - sum(b)) / n)
            assert result["successes"][rule]["attribution"][s]["successes"] == sum(a)
        mean, sd = np.mean(deltas), np.std(deltas, ddof=1)
        half = stats.t.ppf(0.975, len(seeds) - 1) * sd / math.sqrt(len(seeds))
        rd = stat["rate_difference"]
        assert rd["mean_delta"] == pytest.approx(mean)
        assert rd["ci95_t"] == pytest.approx([mean - half, mean + half])
        assert rd["seeds_a_better"] == sum(d > 0 for d in deltas)
    assert "random_outcome_stratified" in result["comparisons"]["target"]["longest"]

    run_script("report.py", "--run-dir", tmp_path, "--output-dir", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    tv = report["taboo_verdict"]
    headline = next(e for e in tv["entries"] if e["arm"] == "attribution" and e["primary"])
    rd = result["comparisons"]["target"]["attribution"]["random_outcome_stratified"][
        "rate_difference"]
    assert headline["design"] == "scratch" and headline["k"] == 12
    assert headline["mean_delta"] == pytest.approx(rd["mean_delta"])
    low, high = rd["ci95_t"]
    verb = "beats" if low > 0 else "is worse than" if high < 0 else "does not beat"
    assert tv["sentence"].startswith(f"Taboo: Attribution {verb} random outcome stratified "
                                     "from scratch at k = 12")
    assert f"{rd['mean_delta']:+.3f}" in tv["sentence"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Taboo verdict" in md and tv["sentence"] in md
    successes = ", ".join(str(sum(x[0] for x in truth[s]["attribution"])) for s in seeds)
    assert f"| scratch | 12 | target | attribution | {successes} / {n} |" in md
    assert "base model (split): target rule 3/40, reference rule 5/40" in md
    assert "base adapter (split): target rule 9/40" in md


def test_compare_success_bad_input(tmp_path):
    fake_eval_words(tmp_path / "seed_1" / "w.json", {"attribution": [(True, False)]})
    result = run_script("compare_evals.py", "--metric", "success",
                        "--arm", f"attribution={tmp_path}/seed_*/w.json",
                        "--arm", f"random={tmp_path}/seed_*/w.json", "--baselines", "random",
                        expect_ok=False)
    assert result.returncode == 2
    assert "has no model 'random'" in result.stderr and "--adapter ARM=PATH" in result.stderr
    result = run_script("compare_evals.py", "--metric", "success", "--a", "x", "--b", "y",
                        expect_ok=False)
    assert result.returncode == 2 and "--metric success compares arms" in result.stderr


# ---------------------------------------------------------------------------------------------
# recipes/taboo.toml


def test_taboo_recipe_plan():
    import run_experiment as rx
    from conftest import ROOT

    recipe = rx.load_recipe(ROOT / "recipes" / "taboo.toml", None, None, [])
    assert recipe.seeds == [1, 2, 3, 4, 5] and recipe.vars["text_format"] == "flat"
    rx.check_steps(recipe)
    tasks = rx.plan_tasks(recipe)

    def flag(task, name):
        return task.argv[task.argv.index(name) + 1]

    (dataset,) = [t for t in tasks if t.argv[0] == "dataset.py"]
    assert flag(dataset, "--text-format") == "flat" and "--whole-words" in dataset.argv
    assert flag(dataset, "--eval-size") == "150"
    ks = {int(recipe.vars["k_third"]), int(recipe.vars["k_half"])}
    arms = [t for t in tasks if "--arms" in t.argv]
    assert {int(flag(t, "--subset-k")) for t in arms} == ks and len(arms) == 2 * 5
    assert all(flag(t, "--arms").split(",") == list(ARMS) for t in arms)
    trains = [t for t in tasks if t.argv[:2] == ["finetune.py", "train"] and t.seed is not None]
    assert len(trains) == 5 * 2 * 2 * 3   # seeds x k x designs x arms
    for t in trains:
        assert flag(t, "--preset") == "seed" and flag(t, "--match-split") == "attribution"
        assert flag(t, "--seed") == str(t.seed)
    assert Counter(flag(t, "--init") for t in trains) == {"scratch": 30, "continue": 30}
    words = [t for t in tasks if t.argv[0] == "eval_words.py"]
    base = [t for t in words if t.seed is None]
    assert len(base) == 1 and "--no-base" not in base[0].argv   # the base model once per split
    assert all("--no-base" in t.argv for t in words if t.seed is not None)
    compares = [t for t in tasks if t.argv[0] == "compare_evals.py"]
    success = [t for t in compares if "--metric" in t.argv]
    assert sorted(flag(t, "--label") for t in success) == sorted(
        f"{d}_k{k}" for d in ("scratch", "continue") for k in ks)
    for t in success:
        assert flag(t, "--baselines") == "random_outcome_stratified"
        assert flag(t, "--output-json").endswith(f"/compare_{flag(t, '--label')}.json")
    (report,) = [t for t in tasks if t.argv[0] == "report.py"]
    assert flag(report, "--control") == "random_outcome_stratified"
