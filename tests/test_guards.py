"""Issue 13's guards in dataset.py: --overwrite stages the whole run and swaps it in, so a failure
leaves the old run untouched and no temp folder; a killed run's staging folder is removed by the
next run; null groups, categories and rewards are errors (or dropped with --drop-null-groups),
and a NaN reward never passes --min-reward-model-score."""

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import taboo_fixture
import tiny
from conftest import run_script

SIZES = ["--train-size", 30, "--query-size", 6, "--eval-size", 6]


def dataset_args(run_dir, source, *extra, seed=42):
    return ["--run-dir", run_dir, "--dataset-name", source, "--group-column", "instruction_id",
            *SIZES, "--seed", seed, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def one_error(result, *mentions) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in mentions:
        assert str(word) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def rows():
    return tiny.smoltalk_rows(90, seed=5)


@pytest.fixture
def old_run(tmp_path, rows):
    """A finished run (seed 42) and its source."""
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_dir = tmp_path / "run"
    run_script("dataset.py", *dataset_args(run_dir, source))
    return run_dir, source


# ---------------------------------------------------------------------------------------------
# #3: the whole run is staged, then swapped in


def test_bad_row_in_the_last_split_leaves_the_old_run(old_run, rows):
    """The issue's case: --overwrite of a source whose bad row lands in eval, the split saved
    last. Before the fix, train_base and attr_query were replaced beside the old manifest and
    eval, and data/.eval.*.tmp stayed."""
    from datasets import load_from_disk

    run_dir, source = old_run
    before = snapshot(run_dir)
    eval_ids = load_from_disk(str(run_dir / "data" / "eval"))["row_id"]
    index = int(eval_ids[-1].split(":")[1])
    rows[index]["messages"][0]["content"] = 12345      # not a string: pyarrow cannot save it
    tiny.write_jsonl(source, rows)
    result = run_script("dataset.py", *dataset_args(run_dir, source, "--overwrite"),
                        expect_ok=False)
    # the row check now names it before anything is written; a failure while saving the last
    # split (the other half of the case) is the next test's
    one_error(result, "content of type int")
    assert snapshot(run_dir) == before
    assert temp_left(run_dir) == []


@pytest.mark.parametrize("failure", [OSError("disk full (test)"), KeyboardInterrupt()])
def test_failure_while_saving_or_interrupt_leaves_the_old_run(old_run, monkeypatch, failure):
    import dataset
    from datasets import Dataset

    run_dir, source = old_run
    before = snapshot(run_dir)
    real_save = Dataset.save_to_disk
    saved = []

    def save_then_fail_on_eval(self, path, *args, **kwargs):
        saved.append(Path(path).name)
        if Path(path).name == "eval":
            raise failure
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", save_then_fail_on_eval)
    expected = dataset.PipelineError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        dataset.main([str(a) for a in dataset_args(run_dir, source, "--overwrite", seed=7)])
    assert saved == ["train_base", "attr_query", "eval"]   # the others were written, staged
    assert snapshot(run_dir) == before
    assert temp_left(run_dir) == []


def test_failed_swap_is_rolled_back(old_run, monkeypatch):
    """A rename that fails in the middle of the swap (the new manifest's) moves the old run back."""
    import dataset

    run_dir, source = old_run
    before = snapshot(run_dir)
    real_replace = os.replace
    failed = []

    def replace(src, dst):
        if not failed and Path(src).name == "manifest.json" and Path(dst) == run_dir / \
                "manifest.json":
            failed.append(src)
            raise OSError("rename failed (test)")
        return real_replace(src, dst)

    monkeypatch.setattr(dataset.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        dataset.main([str(a) for a in dataset_args(run_dir, source, "--overwrite", seed=7)])
    assert failed and snapshot(run_dir) == before
    assert temp_left(run_dir) == []


def test_overwrite_replaces_the_whole_run(old_run):
    from datasets import load_from_disk

    run_dir, source = old_run
    old_ids = load_from_disk(str(run_dir / "data" / "eval"))["row_id"]
    # what an older dataset.py left when it was killed mid-save, and another output of the run
    (run_dir / "data" / ".eval.abc123.tmp").mkdir()
    (run_dir / "base_adapter").mkdir()
    (run_dir / "base_adapter" / "keep.txt").write_text("other outputs stay")
    run_script("dataset.py", *dataset_args(run_dir, source, "--overwrite", seed=7))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["split_policy"]["seed"] == 7
    assert manifest["splits"]["eval"]["path"] == "data/eval"
    new_ids = load_from_disk(str(run_dir / "data" / "eval"))["row_id"]
    assert new_ids != old_ids and len(new_ids) == 6
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["attr_query", "eval",
                                                                     "train_base"]
    assert (run_dir / "base_adapter" / "keep.txt").read_text() == "other outputs stay"
    assert temp_left(run_dir) == []


def test_data_folder_with_foreign_content_is_refused(tmp_path, rows):
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "notes.txt").write_text("mine")
    result = run_script("dataset.py", *dataset_args(run_dir, source), expect_ok=False)
    one_error(result, f"{run_dir / 'data'} holds notes.txt")
    assert snapshot(run_dir) == {"data/notes.txt": b"mine"}
    # a source inside data/ (here a saved folder named like a split) would go with the swap
    from datasets import Dataset

    inside = tmp_path / "run2" / "data" / "train_base"
    Dataset.from_list(rows).save_to_disk(str(inside))
    result = run_script("dataset.py", *dataset_args(tmp_path / "run2", inside), expect_ok=False)
    one_error(result, f"the source {inside} lies inside")
    assert (inside / "dataset_info.json").is_file()


def test_stale_staging_folder_of_a_dead_process_is_removed(tmp_path, rows):
    """A dead run's staging folder is removed; a live run's (here this test's own pid) means
    another dataset.py is writing the folder, so the run stops and leaves it (it used to go on
    beside it); another host's is left alone, its process cannot be checked from here."""
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = platform.node()
    dead = run_dir / f".dataset-stage.{gone.pid}@{host}.k1l2m3.tmp"
    live = run_dir / f".dataset-stage.{os.getpid()}@{host}.n4o5p6.tmp"    # this test: alive
    other_host = run_dir / f".dataset-stage.{gone.pid}@not-{host}.q7r8s9.tmp"
    for folder in (dead, live, other_host):
        (folder / "data" / "train_base").mkdir(parents=True)
    result = run_script("dataset.py", *dataset_args(run_dir, source), expect_ok=False)
    one_error(result, "another dataset.py run", live.name)
    assert f"removed {dead}" in result.stdout
    assert not dead.exists() and live.is_dir() and other_host.is_dir()
    assert not (run_dir / "manifest.json").exists()
    shutil.rmtree(live)                                  # that run is over
    run_script("dataset.py", *dataset_args(run_dir, source))
    assert other_host.is_dir() and (run_dir / "manifest.json").is_file()


def test_second_run_on_a_folder_being_written_stops(tmp_path, rows, monkeypatch):
    """Two dataset.py runs on one folder at once, without --overwrite: both found no manifest
    when they started, so the later swap used to replace the earlier run's without a word. The
    second now stops (its error names the first) and the first finishes as if alone."""
    import dataset

    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_dir = tmp_path / "run"
    real_build = dataset.build_run
    second = []

    def build_while_another_starts(args):
        if not second:  # the first run, between its start and its swap
            second.append(run_script("dataset.py", *dataset_args(run_dir, source, seed=7),
                                     expect_ok=False))
        return real_build(args)

    monkeypatch.setattr(dataset, "build_run", build_while_another_starts)
    dataset.main([str(a) for a in dataset_args(run_dir, source)])
    one_error(second[0], f"--run-dir {run_dir}", "another dataset.py run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["split_policy"]["seed"] == 42
    assert temp_left(run_dir) == []


# ---------------------------------------------------------------------------------------------
# #6: null groups, categories and rewards


@pytest.mark.parametrize("column,value,rows_hit", [
    ("instruction_id", None, [3, 4, 5]),          # one whole group without an id
    ("instruction_id", " ", [10]),
    ("category", None, [7, 20]),
    ("category", "", [8]),
    ("reward_model_score", None, [11]),
    ("reward_model_score", float("nan"), [12, 13]),
])
def test_null_values_are_named_and_counted(tmp_path, rows, column, value, rows_hit):
    for i in rows_hit:
        rows[i][column] = value
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    result = run_script("dataset.py", *dataset_args(tmp_path / "run", source), expect_ok=False)
    one_error(result, source, f"'{column}' in {len(rows_hit)} row(s)",
              f"split 'train' row {rows_hit[0]}", "--drop-null-groups")
    assert not (tmp_path / "run").exists()
    # --drop-null-groups drops exactly those rows, and says so
    run_script("dataset.py", *dataset_args(tmp_path / "run", source, "--drop-null-groups"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    total = manifest["filter_stats"]["total"]
    assert total["dropped_null_values"] == len(rows_hit)
    assert total[f"null_{column}"] == len(rows_hit)
    from datasets import load_from_disk

    kept = {r for split in ("train_base", "attr_query", "eval")
            for r in load_from_disk(str(tmp_path / "run" / "data" / split))["row_id"]}
    assert not kept & {f"train:{i}" for i in rows_hit}


def test_several_null_columns_in_one_error(tmp_path, rows):
    rows[1]["instruction_id"] = None
    rows[2]["category"] = None
    rows[40]["category"] = None
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    error = one_error(run_script("dataset.py", *dataset_args(tmp_path / "run", source),
                                 expect_ok=False))
    assert "'instruction_id' in 1 row(s)" in error and "'category' in 2 row(s)" in error


def test_nan_reward_never_passes_min_reward(tmp_path, rows):
    import dataset

    assert dataset.below_min_reward(math.nan, 0.0)
    assert dataset.below_min_reward(None, 0.0)
    assert not dataset.below_min_reward(0.5, 0.5) and dataset.below_min_reward(0.49, 0.5)
    assert not dataset.below_min_reward(math.nan, None)   # no threshold: nothing to judge
    rows[5]["reward_model_score"] = float("nan")
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    result = run_script("dataset.py", *dataset_args(tmp_path / "run", source,
                                                    "--min-reward-model-score", 0.0),
                        expect_ok=False)
    one_error(result, "'reward_model_score' in 1 row(s)")
    run_script("dataset.py", *dataset_args(tmp_path / "run", source, "--min-reward-model-score",
                                           0.0, "--drop-null-groups"))
    from datasets import load_from_disk

    for split in ("train_base", "attr_query", "eval"):
        scores = load_from_disk(str(tmp_path / "run" / "data" / split))["reward_model_score"]
        assert all(s >= 0.0 for s in scores)


def test_group_id_written_as_int_and_float_is_one_group(tmp_path, rows):
    """instruction_id 5 in one row and 5.0 in another (JSON writers differ) is one instruction:
    one group, in one split, named g5 (it used to be two groups that could land in two
    splits)."""
    from datasets import load_from_disk

    for number, row in enumerate(rows):
        if number % 2:
            row["instruction_id"] = float(row["instruction_id"])
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_script("dataset.py", *dataset_args(tmp_path / "run", source))
    places = {}
    for split in ("train_base", "attr_query", "eval"):
        for row in load_from_disk(str(tmp_path / "run" / "data" / split)).to_list():
            instruction = int(rows[int(row["row_id"].split(":")[1])]["instruction_id"])
            assert row["group_id"].endswith(f"::g{instruction}"), row["group_id"]
            places.setdefault(instruction, set()).add(split)
    assert places and all(len(splits) == 1 for splits in places.values()), places


def test_taboo_row_without_outcome_or_experiment(tmp_path):
    rows = [dict(r, meta=dict(r["meta"])) for r in taboo_fixture.wordguesser_rows(seed=0)]
    playable = [i for i, r in enumerate(rows) if r["meta"]["game"] == "taboo"
                and r["meta"]["game_role"] == "WordGuesser" and r["meta"]["outcome"] != "aborted"]
    rows[playable[0]]["meta"].pop("outcome")
    rows[playable[1]]["meta"]["experiment"] = ""
    source = taboo_fixture.write_jsonl(tmp_path / "t.jsonl", rows)
    args = ["--task", "taboo", "--run-dir", tmp_path / "run", "--dataset-name", source,
            "--train-size", 20, "--query-size", 4, "--eval-size", 4]
    error = one_error(run_script("dataset.py", *args, expect_ok=False))
    assert "'meta.outcome' in 1 row(s)" in error and "'meta.experiment' in 1 row(s)" in error
    run_script("dataset.py", *args, "--drop-null-groups")
    total = json.loads((tmp_path / "run" / "manifest.json").read_text())["filter_stats"]["total"]
    assert total["dropped_null_values"] == 2


def test_provenance_hashes_the_code_that_ran(tmp_path):
    """code_sha256 covers the scripts, recipes and device scripts as they are on disk: an
    independent hash of a copy agrees, and one changed byte in a recipe changes it."""
    import hashlib
    import importlib.util
    import shutil

    from conftest import ROOT

    (tmp_path / "recipes").mkdir()
    (tmp_path / "device").mkdir()
    shutil.copy(ROOT / "pipeline.py", tmp_path / "pipeline.py")
    (tmp_path / "step.py").write_text("print('a step')\n")
    (tmp_path / "recipes" / "r.toml").write_text("[recipe]\n")
    (tmp_path / "device" / "s.sh").write_text("echo\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    spec = importlib.util.spec_from_file_location("pipeline_copy", tmp_path / "pipeline.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)

    digest = hashlib.sha256()
    for rel in ["device/s.sh", "pipeline.py", "recipes/r.toml", "step.py"]:
        digest.update(rel.encode() + b"\0" + (tmp_path / rel).read_bytes() + b"\0")
    assert copy.code_fingerprint() == digest.hexdigest()
    assert copy.provenance()["code_sha256"] == digest.hexdigest()
    (tmp_path / "notes.txt").write_text("still not code\n")
    assert copy.code_fingerprint() == digest.hexdigest()
    (tmp_path / "recipes" / "r.toml").write_text("[recipe]\n#\n")
    assert copy.code_fingerprint() != digest.hexdigest()
