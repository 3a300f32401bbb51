"""dataset.py --corrupt-fraction: a planted signal (swapped completions) in train_base only, exact
count, seeded, recorded in columns and the manifest; off by default."""

import json

import pytest

from conftest import run_script
from helpers import SIZES, make_splits


def load_run(run_dir):
    from datasets import load_from_disk

    manifest = json.loads((run_dir / "manifest.json").read_text())
    splits = {name: load_from_disk(str(run_dir / entry["path"])).to_list()
              for name, entry in manifest["splits"].items()}
    return manifest, splits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_jsonl, chat_run):
    """clean (the session's chat_run: the same flags without --corrupt-fraction), corrupted seed
    42 twice, corrupted with --corrupt-seed 7."""
    root = tmp_path_factory.mktemp("corrupt")
    variants = {"a": ("--corrupt-fraction", 0.25),
                "a_again": ("--corrupt-fraction", 0.25),
                "other_seed": ("--corrupt-fraction", 0.25, "--corrupt-seed", 7)}
    out = {"clean": load_run(chat_run)}
    for name, extra in variants.items():
        make_splits(root / name, chat_jsonl, extra=extra)
        out[name] = load_run(root / name)
    return out


def corrupted_ids(splits):
    return sorted(r["row_id"] for r in splits["train_base"] if r["corrupted"])


def test_exact_count_and_manifest(runs):
    manifest, splits = runs["a"]
    expected = round(0.25 * SIZES["train"])
    assert len(corrupted_ids(splits)) == expected == 40
    assert manifest["corruption"]["count"] == expected
    assert manifest["corruption"]["fraction"] == 0.25
    assert manifest["corruption"]["seed"] == 42  # defaults to --seed
    assert manifest["corruption"]["method"] == "derangement"
    assert runs["other_seed"][0]["corruption"]["seed"] == 7
    # score_pool is train_base's folder, so it carries the same corruption
    assert splits["score_pool"] == splits["train_base"]


def test_seeded(runs):
    assert corrupted_ids(runs["a"][1]) == corrupted_ids(runs["a_again"][1])
    assert runs["a"][1]["train_base"] == runs["a_again"][1]["train_base"]
    assert corrupted_ids(runs["a"][1]) != corrupted_ids(runs["other_seed"][1])
    # the corruption draws do not move the split sampling: same rows with or without it
    for name in ("train_base", "attr_query", "eval"):
        assert ([r["row_id"] for r in runs["a"][1][name]]
                == [r["row_id"] for r in runs["clean"][1][name]]
                == [r["row_id"] for r in runs["other_seed"][1][name]])


def test_completions_changed_and_come_from_other_rows(runs):
    clean = {r["row_id"]: r for r in runs["clean"][1]["train_base"]}
    rows = runs["a"][1]["train_base"]
    donors = []
    for row in rows:
        original = clean[row["row_id"]]
        if not row["corrupted"]:
            assert row["corrupted_from_row_id"] is None
            assert row["completion"] == original["completion"]
            continue
        donor = clean[row["corrupted_from_row_id"]]
        donors.append(donor["row_id"])
        assert row["completion"] != original["completion"]
        assert row["completion"] == donor["completion"]
        assert donor["row_id"] != row["row_id"]
        assert donor["group_id"] != row["group_id"]  # never a group-mate's answer
        assert donor["prompt"] != row["prompt"]
        assert row["prompt"] == original["prompt"]  # only the completion is replaced
    # a derangement among the chosen rows: every chosen row gives its completion exactly once
    assert sorted(donors) == corrupted_ids(runs["a"][1])
    assert (sorted(r["completion"] for r in rows)
            == sorted(r["completion"] for r in clean.values()))


def test_never_in_query_or_eval(runs):
    manifest, splits = runs["a"]
    for name in ("attr_query", "eval"):
        assert splits[name], name
        assert all(r["corrupted"] is False and r["corrupted_from_row_id"] is None
                   for r in splits[name])
        clean = {r["row_id"]: r["completion"] for r in runs["clean"][1][name]}
        assert all(clean[r["row_id"]] == r["completion"] for r in splits[name])


def test_off_by_default(runs):
    manifest, splits = runs["clean"]
    assert "corruption" not in manifest
    for rows in splits.values():
        assert all("corrupted" not in r and "corrupted_from_row_id" not in r for r in rows)


@pytest.mark.parametrize("extra, message", [
    (("--corrupt-fraction", 1.5), "must be in [0, 1]"),
    (("--corrupt-fraction", 1 / 160), "needs at least 2"),
])
def test_bad_fraction_is_refused(tmp_path, chat_jsonl, extra, message):
    result = run_script("dataset.py", "--run-dir", tmp_path / "bad", "--dataset-name", chat_jsonl,
                        "--group-column", "instruction_id", "--train-size", SIZES["train"],
                        "--query-size", SIZES["query"], "--eval-size", SIZES["eval"], *extra,
                        expect_ok=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_finetune_ignores_corruption_columns(tmp_path, runs, tiny_model, chat_jsonl):
    """finetune.py reads only prompt/completion: a corrupted manifest trains like any other."""
    run_dir = tmp_path / "run"
    make_splits(run_dir, chat_jsonl, extra=("--corrupt-fraction", 0.5))
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", run_dir / "manifest.json",
               "--base-model", tiny_model, "--output-dir", run_dir / "adapter",
               "--max-steps", 2, "--batch-size", 8, "--max-length", 128)
    assert (run_dir / "adapter" / "train_metrics.json").is_file()
