"""The Taboo path: shared word helpers (stemmer, guess parser, clue check, McNemar), dataset.py
--task taboo on a fixture the tests write, and dataset -> finetune -> eval_words.py end to end on
the tiny model."""

import json
import math
from collections import Counter

import pytest

import taboo_fixture
from conftest import run_script
from taboo import clue_violations, parse_guess, same_word, stem

SIZES = dict(train=20, query=5, eval=6)


# ---------------------------------------------------------------------------------------------
# word helpers


# stems as nltk's SnowballStemmer("english") (clembench's stemmer) gives them
KNOWN_STEMS = {
    "winter": "winter", "winters": "winter", "independent": "independ", "autarkical": "autark",
    "strong-minded": "strong-mind", "separate": "separ", "chinese": "chines", "shooting": "shoot",
    "rifle": "rifl", "ordinary": "ordinari", "ferries": "ferri", "generously": "generous",
    "communication": "communic", "running": "run", "hopeful": "hope", "organization": "organ",
    "skies": "sky", "dying": "die", "news": "news", "succeeding": "succeed", "yelling": "yell",
    "agreed": "agre", "happily": "happili", "relational": "relat", "electricity": "electr",
    "abcization": "abcize", "fly": "fli", "karen": "karen", "cried": "cri", "ties": "tie",
    "conditional": "condit", "hopping": "hop", "hoping": "hope", "sized": "size",
}


@pytest.mark.parametrize("word,expected", sorted(KNOWN_STEMS.items()))
def test_stem_known_cases(word, expected):
    assert stem(word) == expected


def test_stem_agrees_with_nltk_where_installed():
    snowball = pytest.importorskip("nltk.stem.snowball")
    reference = snowball.SnowballStemmer("english")
    import random

    rng = random.Random(0)
    words = {w + suffix for w in ["winter", "nation", "happy", "hope", "general", "bias", "ski",
                                  "fortify", "logic", "care", "sense", "active", "fulfil"]
             for suffix in ["", "s", "es", "ed", "ing", "ly", "ness", "ful", "ation", "izer",
                            "ization", "ies", "edly", "ingly", "ement", "alize", "iveness",
                            "fulness", "ability", "ously", "ical", "logi", "li"]}
    words |= {"".join(rng.choice("aeiouybcdlmnrstgz") for _ in range(rng.randint(3, 11)))
              for _ in range(3000)}
    mismatches = [(w, reference.stem(w), stem(w)) for w in sorted(words)
                  if reference.stem(w) != stem(w)]
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize("reply,guess", [
    ("GUESS: Winter", "winter"),
    ("guess: winter.", "winter"),
    ("**GUESS:** Winter", "winter"),
    ("GUESS:**Winter**", "winter"),
    ('Guess - "winter"!', "winter"),
    ("GUESS: <winter>", "winter"),
    ("Let me think. GUESS: Karen.", "karen"),
    ("GUESS: Winter\nGUESS: snow", "winter"),          # first guess only
    ("GUESS: ice-cream cone", "ice-cream"),            # first word of the guess
    ("guess：ferry", "ferry"),                          # full-width colon
    ("GUESS: <a word>", None),                          # the prompt's placeholder echoed
    ("GUESS: [word]", None),
    ("GUESS:", None),
    ("GUESS: ...", None),
    ("I guess winter", None),                           # no GUESS marker
    ("Winter", None),
    ("misguess: winter", None),
    ("", None),
    (None, None),
])
def test_parse_guess(reply, guess):
    assert parse_guess(reply) == guess


def test_same_word_uses_stems():
    assert same_word("Winters", "winter") and same_word("ferries", "ferry")
    assert same_word("independence", "independent")
    assert not same_word("wint", "winter") and not same_word(None, "winter")
    assert not same_word("", "winter")


@pytest.mark.parametrize("clue,target,related,bad", [
    ("Time of year with the shortest days", "winter", ["cold", "snow", "season"], []),
    ("Cold time of year", "winter", ["cold", "snow", "season"], ["cold"]),
    ("It is snowy then", "winter", ["cold", "snow", "season"], ["snow"]),        # variant
    ("Wintery weather", "winter", ["cold", "snow", "season"], ["winter"]),
    ("WINTERS are long", "winter", ["cold", "snow", "season"], ["winter"]),      # case, stem
    ("Scolding is rude", "winter", ["cold", "snow", "season"], []),              # no boundary
    ("Change the channel", "chan", ["chinese", "internet", "irc"], []),
    ("A strong minded person", "independent", ["strong-minded"], ["strong-minded"]),
    ("Seasonal and snowed in", "winter", ["cold", "snow", "season"], ["snow", "season"]),
])
def test_clue_violations(clue, target, related, bad):
    problems = clue_violations(clue, target, related)
    assert len(problems) == len(bad), problems
    for word, problem in zip(bad, problems):
        assert f"'{word}'" in problem


def test_mcnemar_hand_computed():
    from eval_words import mcnemar_exact, pairwise_mcnemar, rate_string

    assert mcnemar_exact(8, 2) == pytest.approx(0.109375)      # 2 * (1 + 10 + 45) / 2**10
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)        # 2 / 2**5
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 0) == 1.0
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 15):
        for c in range(0, 15):
            if b + c:
                assert mcnemar_exact(b, c) == pytest.approx(
                    stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert rate_string(62, 152) == "62/152 = 0.4079"
    outcomes = {"x": [True] * 8 + [False] * 2 + [True, False],
                "y": [False] * 8 + [True] * 2 + [True, False]}
    (test,) = pairwise_mcnemar(outcomes)
    assert (test["a_success_b_fail"], test["a_fail_b_success"]) == (8, 2)
    assert (test["both_success"], test["both_fail"]) == (1, 1)
    assert test["p_value"] == pytest.approx(0.109375)


# ---------------------------------------------------------------------------------------------
# dataset.py --task taboo


@pytest.fixture(scope="module")
def taboo_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taboo_src")
    rows = taboo_fixture.wordguesser_rows(seed=0)
    return {"rows": rows, "jsonl": taboo_fixture.write_jsonl(folder / "playpen.jsonl", rows)}


def taboo_split_args(run_dir, source, *extra, seed=42):
    return ["--task", "taboo", "--run-dir", run_dir, "--dataset-name", source["jsonl"],
            "--train-size", SIZES["train"],
            "--query-size", SIZES["query"], "--eval-size", SIZES["eval"], "--seed", seed, *extra]


@pytest.fixture(scope="module")
def taboo_run(tmp_path_factory, taboo_source):
    run_dir = tmp_path_factory.mktemp("taboo") / "run"
    run_script("dataset.py", *taboo_split_args(run_dir, taboo_source))
    return run_dir


def load(path):
    return json.loads(path.read_text())


def test_taboo_manifest_splits_words_and_filters(taboo_run, taboo_source):
    from datasets import load_from_disk

    manifest = load(taboo_run / "manifest.json")
    assert manifest["task"] == "taboo"
    assert manifest["split_policy"]["method"] == "group_carve_out"
    assert manifest["split_policy"]["group_column"] == "target_word"
    splits = {n: load_from_disk(str(taboo_run / e["path"])) for n, e in manifest["splits"].items()}
    assert [len(splits[n]) for n in ("train_base", "attr_query", "eval")] == list(SIZES.values())
    assert splits["score_pool"]["row_id"] == splits["train_base"]["row_id"]
    words = {n: set(splits[n]["target_word"]) for n in ("train_base", "attr_query", "eval")}
    assert not words["eval"] & (words["train_base"] | words["attr_query"])
    assert not words["attr_query"] & words["train_base"]
    assert {n: sorted(w) for n, w in words.items()} == manifest["taboo"]["words_per_split"]
    for split in splits.values():
        assert set(split.column_names) >= {
            "row_id", "prompt", "completion", "source_split", "group_id", "category",
            "difficulty", "quality", "reward_model_score", "conversation_tokens", "target_word",
            "related_words"}

    # filters: other game, other role and aborted episodes dropped and counted
    expected = taboo_fixture.expected_counts(taboo_source["rows"])
    total = manifest["filter_stats"]["total"]
    for key, value in expected.items():
        assert total.get(key, 0) == value, key
    assert total["conversation_tokens_proxy"] == expected["rows_kept"]
    assert "instances" not in manifest["taboo"]

    # column mapping, checked against the source rows
    by_index = dict(enumerate(taboo_source["rows"]))
    for row in splits["train_base"].to_list() + splits["eval"].to_list():
        source = by_index[int(row["row_id"].split(":")[1])]
        meta = source["meta"]
        assert row["target_word"] == meta["target_word"]
        assert row["related_words"] == meta["related_word"]
        assert row["category"] == meta["experiment"]
        assert row["difficulty"] == meta["experiment"].split("_")[0]
        assert row["quality"] == meta["outcome"] != "aborted"
        assert row["reward_model_score"] == (1.0 if meta["outcome"] == "success" else 0.0)
        assert row["prompt"] == source["messages"][:-1]
        assert row["completion"] == source["messages"][-1]["content"]
        assert row["conversation_tokens"] == sum(len(m["content"].split())
                                                 for m in source["messages"])
        assert row["group_id"].endswith(f"::g{row['target_word']}")
        assert len(row["related_words"]) == 3
    assert "taboo" in " ".join(map(str, manifest["checks"]["passed"]))


def test_taboo_same_seed_same_split_and_filters_flags(tmp_path, taboo_source):
    from datasets import load_from_disk

    ids = {}
    for name, seed in (("a", 5), ("b", 5)):
        run_script("dataset.py", *taboo_split_args(tmp_path / name, taboo_source, seed=seed))
        ids[name] = load_from_disk(str(tmp_path / name / "data" / "eval"))["row_id"]
    assert ids["a"] == ids["b"]
    # keeping aborted games and only won ones
    run_script("dataset.py", *taboo_split_args(tmp_path / "c", taboo_source,
                                               "--taboo-drop-outcomes", "",
                                               "--min-reward-model-score", "1",
                                               "--train-size", 10, "--query-size", 3,
                                               "--eval-size", 3))
    manifest = load(tmp_path / "c" / "manifest.json")
    assert "dropped_outcome_aborted" not in manifest["filter_stats"]["total"]
    assert manifest["filter_stats"]["total"]["dropped_reward"] > 0
    for split in ("train_base", "eval"):
        assert set(load_from_disk(str(tmp_path / "c" / "data" / split))["quality"]) == {"success"}


def test_taboo_row_without_its_target_is_named_or_dropped(tmp_path, taboo_source):
    """A row's target word is its own: one without meta.target_word is refused (or dropped and
    counted), never looked up by (experiment, task_id) in an instances file, where the same game
    may have another word in another clembench version. (This test used to check that lookup.)"""
    rows = [dict(r, meta=dict(r["meta"])) for r in taboo_source["rows"]]
    victim = next(i for i, r in enumerate(rows) if r["meta"]["game"] == "taboo"
                  and r["meta"]["game_role"] == "WordGuesser"
                  and r["meta"]["outcome"] != "aborted")
    rows[victim]["meta"].pop("target_word")     # its (experiment, task_id) is a real game
    source = dict(taboo_source, jsonl=taboo_fixture.write_jsonl(tmp_path / "bad.jsonl", rows))
    result = run_script("dataset.py", *taboo_split_args(tmp_path / "run", source),
                        expect_ok=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error:") and "bad.jsonl" in error and f"row {victim}" in error
    assert "meta.target_word" in error
    assert not (tmp_path / "run").exists()
    run_script("dataset.py", *taboo_split_args(tmp_path / "run", source, "--drop-bad-rows"))
    total = load(tmp_path / "run" / "manifest.json")["filter_stats"]["total"]
    assert total["dropped_no_target"] == 1
    assert total["target_word_from_meta"] == total["flattened"]
    # the flag that named an instances file is refused, with what to do instead
    instances = taboo_fixture.write_instances(tmp_path / "instances.json")
    result = run_script("dataset.py", *taboo_split_args(tmp_path / "run2", source),
                        "--instances", instances, expect_ok=False)
    assert result.returncode == 2 and "--instances" in result.stderr
    assert "meta.target_word" in result.stderr and not (tmp_path / "run2").exists()


def test_taboo_outcomes_are_read_without_regard_to_case(tmp_path, taboo_source):
    """"Success" is a win and " Aborted" is dropped as "success" and "aborted" are: every row's
    quality and reward are its lower-case outcome's, and the counts are the all-lower-case
    source's."""
    from datasets import load_from_disk

    rows = [dict(r, meta=dict(r["meta"])) for r in taboo_source["rows"]]
    cased = {"success": "Success", "failure": "FAILURE", "aborted": " Aborted"}
    for row in rows[1::2]:
        row["meta"]["outcome"] = cased[row["meta"]["outcome"]]
    source = dict(taboo_source, jsonl=taboo_fixture.write_jsonl(tmp_path / "cased.jsonl", rows))
    run_script("dataset.py", *taboo_split_args(tmp_path / "run", source))
    manifest = load(tmp_path / "run" / "manifest.json")
    expected = taboo_fixture.expected_counts(taboo_source["rows"])
    assert manifest["filter_stats"]["total"]["dropped_outcome_aborted"] == \
        expected["dropped_outcome_aborted"]
    seen = Counter()
    for split in ("train_base", "attr_query", "eval"):
        for row in load_from_disk(str(tmp_path / "run" / "data" / split)).to_list():
            index = int(row["row_id"].split(":")[1])
            outcome = taboo_source["rows"][index]["meta"]["outcome"]
            assert row["quality"] == outcome
            assert row["reward_model_score"] == (1.0 if outcome == "success" else 0.0)
            seen[rows[index]["meta"]["outcome"]] += 1
        assert set(manifest["taboo"]["outcomes_per_split"][split]) <= {"success", "failure"}
    assert seen["Success"] and seen["success"]     # both spellings were read as wins


def test_taboo_help_and_group_column_rejected(tmp_path, taboo_source):
    out = run_script("dataset.py", "--help").stdout
    for flag in ("--task", "meta.target_word", "--taboo-game", "--taboo-role",
                 "--taboo-drop-outcomes", "reward_model_score", "frequency level"):
        assert flag in out
    result = run_script("dataset.py", *taboo_split_args(tmp_path / "r", taboo_source),
                        "--group-column", "x", expect_ok=False)
    assert result.returncode == 2 and "--group-column" in result.stderr
    out = run_script("eval_words.py", "--help").stdout
    for flag in ("--manifest", "--eval-split", "--top-adapter", "--random-adapter", "--adapter",
                 "--generation", "--success-rule",
                 "--base-model", "--include-base", "--no-base", "--max-new-tokens",
                 "--temperature", "--seed", "--batch-size", "--device", "--precision",
                 "--output-json"):
        assert flag in out, flag


# ---------------------------------------------------------------------------------------------
# end to end: dataset.py --task taboo -> finetune.py train (two adapters) -> eval_words.py


def perturbed_copy(adapter, destination, scale: float):
    """A second, different adapter without a second finetune run (each costs ~20 s of imports on
    the CPU test machine): the same LoRA with its B matrices scaled and shifted."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, destination)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: (v * scale + 0.05 if "lora_B" in k else v) for k, v in weights.items()},
              str(destination / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def taboo_e2e(taboo_run, tiny_model):
    manifest = taboo_run / "manifest.json"
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", manifest,
               "--base-model", tiny_model,
               "--output-dir", taboo_run / "top_adapter", "--max-steps", 4, "--batch-size", 8,
               "--learning-rate", 3e-3, "--lora-rank", 4, "--max-length", 384,
               "--eval-split", "none")
    perturbed_copy(taboo_run / "top_adapter", taboo_run / "random_adapter", scale=-3.0)
    out = taboo_run / "eval_words.json"
    run_script("eval_words.py", "--manifest", manifest, "--top-adapter",
               taboo_run / "top_adapter", "--random-adapter", taboo_run / "random_adapter",
               "--adapter", f"again={taboo_run / 'top_adapter'}", "--max-new-tokens", 6,
               "--batch-size", 4, "--output-json", out)
    return taboo_run, load(out)


def test_eval_words_report(taboo_e2e, tiny_model):
    run_dir, report = taboo_e2e
    assert report["task"] == "taboo" and report["num_rows"] == SIZES["eval"]
    assert list(report["models"]) == ["base", "top", "random", "again"]
    assert report["base_model"] == str(tiny_model)
    eval_words = set(load(run_dir / "manifest.json")["taboo"]["words_per_split"]["eval"])
    for name, model in report["models"].items():
        rows = report["per_row"][name]
        assert len(rows) == model["rows"] == SIZES["eval"]
        assert model["successes"] == sum(r["success"] for r in rows)
        assert model["unparseable"] == sum(not r["parsed"] for r in rows)
        assert model["summary"] == f"{model['successes']}/{SIZES['eval']} = " \
                                   f"{model['successes'] / SIZES['eval']:.4f}"
        for row in rows:
            assert row["target_word"] in eval_words
            assert row["parsed"] == (row["guess"] is not None)
            assert row["success"] == same_word(row["guess"], row["target_word"])
            if not row["parsed"]:
                assert not row["success"]   # unparseable counts as a failure
    # the same adapter under two names generates the same (greedy) replies
    assert [r["reply"] for r in report["per_row"]["top"]] == \
           [r["reply"] for r in report["per_row"]["again"]]
    tests = {(t["model_a"], t["model_b"]): t for t in report["mcnemar"]}
    assert len(tests) == 6 and ("base", "top") in tests and ("random", "again") in tests
    for (a, b), test in tests.items():
        pairs = list(zip(report["per_row"][a], report["per_row"][b]))
        only_a = sum(x["success"] and not y["success"] for x, y in pairs)
        only_b = sum(y["success"] and not x["success"] for x, y in pairs)
        assert (test["a_success_b_fail"], test["a_fail_b_success"]) == (only_a, only_b)
        assert test["num_rows"] == SIZES["eval"]
        assert 0.0 <= test["p_value"] <= 1.0 and math.isfinite(test["p_value"])
        if only_a + only_b == 0:
            assert test["p_value"] == 1.0
    assert report["generation"]["greedy"] and report["generation"]["max_new_tokens"] == 6
    assert report["provenance"]["argv"][0] == "eval_words.py"


def test_eval_words_bad_input(taboo_e2e, tmp_path, tiny_model):
    from datasets import Dataset

    run_dir, _ = taboo_e2e
    # a chat-shaped split: no target_word column
    Dataset.from_list([{"row_id": "train:0", "prompt": [{"role": "user", "content": "hi"}],
                        "completion": "hello"}]).save_to_disk(str(tmp_path / "chat_eval"))
    chat_manifest = tmp_path / "chat_manifest.json"
    chat_manifest.write_text(json.dumps({"task": "chat", "splits": {
        "eval": {"path": "chat_eval", "num_rows": 1}}}))
    cases = [
        (["--manifest", chat_manifest, "--base-model", tiny_model], "target_word"),
        (["--manifest", run_dir / "manifest.json", "--top-adapter", tmp_path / "nope"], "nope"),
        (["--manifest", run_dir / "manifest.json", "--adapter", "justapath"], "NAME=PATH"),
        (["--manifest", run_dir / "manifest.json", "--no-base"], "nothing to evaluate"),
    ]
    for args, words in cases:
        result = run_script("eval_words.py", *args, "--output-json", tmp_path / "out.json",
                            expect_ok=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert words in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.json").exists()


def test_eval_words_seed_generation_and_both_rules(taboo_e2e, tiny_model):
    """--generation seed (16 tokens, first-word fallback) with the reference rule in front; both
    rules are reported and each per-row success follows its rule."""
    run_dir, default = taboo_e2e
    out = run_dir / "eval_words_seed.json"
    run_script("eval_words.py", "--manifest", run_dir / "manifest.json", "--top-adapter",
               run_dir / "top_adapter", "--generation", "seed", "--success-rule", "reference",
               "--batch-size", 4, "--output-json", out)
    report = load(out)
    assert report["generation"]["max_new_tokens"] == 16
    assert report["generation"]["first_word_fallback"] and report["success_rule"] == "reference"
    from datasets import load_from_disk

    completions = {r["row_id"]: r["completion"]
                   for r in load_from_disk(str(run_dir / "data" / "eval")).to_list()}
    for name, model in report["models"].items():
        rows = report["per_row"][name]
        assert set(model["by_rule"]) == {"target", "reference"}
        for rule in ("target", "reference"):
            assert model["by_rule"][rule]["successes"] == sum(r[f"success_{rule}"] for r in rows)
        assert model["successes"] == model["by_rule"]["reference"]["successes"]
        for row in rows:
            assert row["reference_guess"] == parse_guess(completions[row["row_id"]])
            assert row["success_target"] == same_word(row["guess"], row["target_word"])
            assert row["success_reference"] == (row["guess"] is not None
                                                and row["guess"] == row["reference_guess"])
            assert row["success"] == row["success_reference"]
            if row["guess_read"] == "first_word":
                assert parse_guess(row["reply"]) is None and row["guess"]
        assert model["unparseable"] == sum(r["guess"] is None for r in rows)
    assert set(report["mcnemar_by_rule"]) == {"target", "reference"}
    assert report["mcnemar"] == report["mcnemar_by_rule"]["reference"]
    # the default run: today's settings, both rules reported beside the target rule
    assert default["generation"]["preset"] == "default"
    assert not default["generation"]["first_word_fallback"]
    assert default["mcnemar"] == default["mcnemar_by_rule"]["target"]
