"""Bad input: a one-line error naming the file/split/column, exit code 2, nothing half-written."""

import json

import pytest

import tiny
from conftest import run_script


def expect_error(script, *args, mentions=()):
    result = run_script(script, *args, expect_ok=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for word in mentions:
        assert str(word) in lines[0], lines[0]
    return lines[0]


def dataset_args(run_dir, source, *extra):
    return ["--run-dir", run_dir, "--dataset-name", source, "--group-column", "instruction_id",
            "--train-size", 30, "--query-size", 6, "--eval-size", 6, *extra]


def check_nothing_written(run_dir):
    assert not (run_dir / "manifest.json").exists()
    assert not (run_dir / "data").exists() or not any((run_dir / "data").iterdir())


@pytest.fixture
def rows():
    return tiny.smoltalk_rows(90, seed=5)


def test_corrupt_jsonl_names_line(tmp_path, rows):
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    lines = source.read_text().splitlines()
    lines[11] = lines[11][:-7]
    source.write_text("\n".join(lines) + "\n")
    expect_error("dataset.py", *dataset_args(tmp_path / "run", source), mentions=[source, "line 12"])
    check_nothing_written(tmp_path / "run")


def test_truncated_gzip(tmp_path, rows):
    source = tiny.write_jsonl(tmp_path / "src.jsonl.gz", rows)
    source.write_bytes(source.read_bytes()[:200])
    expect_error("dataset.py", *dataset_args(tmp_path / "run", source), mentions=[source])
    check_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("breakage,words", [
    (lambda r: r.pop("messages"), ["row 4", "missing or empty messages"]),
    (lambda r: r.update(messages=[]), ["row 4", "missing or empty messages"]),
    (lambda r: r["messages"].append({"role": "user", "content": "more?"}), ["row 4", "final turn"]),
    (lambda r: r.pop("difficulty"), ["row 4", "difficulty"]),
])
def test_bad_rows(tmp_path, rows, breakage, words):
    breakage(rows[4])
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    expect_error("dataset.py", *dataset_args(tmp_path / "run", source), mentions=[source, *words])
    check_nothing_written(tmp_path / "run")


def test_drop_bad_rows_counts_them(tmp_path, rows):
    rows[4]["messages"].append({"role": "user", "content": "more?"})
    rows[9]["messages"] = []
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    run_script("dataset.py", *dataset_args(tmp_path / "run", source, "--drop-bad-rows"))
    stats = json.loads((tmp_path / "run" / "manifest.json").read_text())["filter_stats"]
    assert stats["total"]["dropped_unflattenable"] == 2


def test_messages_stored_as_a_json_string_are_parsed(tmp_path, rows):
    """Some exports store messages as a JSON string: it is read as the list it holds (and
    counted), so the run is the one the list gives; a string that is no JSON list is a bad row
    (tests/test_bad_input_table.py)."""
    from datasets import load_from_disk

    plain = tiny.write_jsonl(tmp_path / "plain.jsonl", rows)
    for row in rows[::4]:
        row["messages"] = json.dumps(row["messages"])
    encoded = tiny.write_jsonl(tmp_path / "encoded.jsonl", rows)
    for name, source in (("plain", plain), ("encoded", encoded)):
        run_script("dataset.py", *dataset_args(tmp_path / name, source))
    manifest = json.loads((tmp_path / "encoded" / "manifest.json").read_text())
    assert manifest["filter_stats"]["total"]["messages_parsed_from_json_string"] == len(rows[::4])
    for split in ("train_base", "attr_query", "eval"):
        assert load_from_disk(str(tmp_path / "encoded" / "data" / split)).to_list() == \
            load_from_disk(str(tmp_path / "plain" / "data" / split)).to_list()


def test_sizes_larger_than_available(tmp_path, rows):
    source = tiny.write_jsonl(tmp_path / "src.jsonl", rows)
    args = dataset_args(tmp_path / "run", source)
    args[args.index("--train-size") + 1] = 500
    expect_error("dataset.py", *args, mentions=["train_base", "500"])
    check_nothing_written(tmp_path / "run")


def test_missing_dataset_file(tmp_path):
    expect_error("dataset.py", *dataset_args(tmp_path / "run", tmp_path / "nope.jsonl"),
                 mentions=["nope.jsonl"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, chat_jsonl):
    run_dir = tmp_path_factory.mktemp("bad") / "run"
    run_script("dataset.py", *dataset_args(run_dir, chat_jsonl))
    return run_dir


def test_unknown_split(small_run, tiny_model, tmp_path):
    expect_error("finetune.py", "train", "--manifest", small_run / "manifest.json",
                 "--train-split", "no_such_split", "--base-model", tiny_model,
                 "--output-dir", tmp_path / "out", mentions=["no_such_split", "train_base"])
    assert not (tmp_path / "out").exists()
    expect_error("eval_loss.py", "--manifest", small_run / "manifest.json", "--eval-split", "nope",
                 "--base-model", tiny_model, "--output-json", tmp_path / "e.json",
                 mentions=["nope"])
    assert not (tmp_path / "e.json").exists()


def test_manifest_with_missing_paths(small_run, tiny_model, tmp_path):
    manifest = json.loads((small_run / "manifest.json").read_text())
    manifest["splits"]["eval"]["path"] = "data/gone"
    broken = small_run / "broken_manifest.json"
    broken.write_text(json.dumps(manifest))
    expect_error("eval_loss.py", "--manifest", broken, "--base-model", tiny_model,
                 "--output-json", tmp_path / "e.json", mentions=[broken, "eval", "data/gone"])
    expect_error("eval_loss.py", "--manifest", tmp_path / "absent.json", "--base-model", tiny_model,
                 "--output-json", tmp_path / "e.json", mentions=["absent.json"])


def test_adapter_dir_without_adapter_files(small_run, tiny_model, tmp_path):
    empty = tmp_path / "adapter"
    empty.mkdir()
    expect_error("eval_loss.py", "--manifest", small_run / "manifest.json", "--base-model",
                 tiny_model, "--adapter-path", empty, "--output-json", tmp_path / "e.json",
                 mentions=[empty, "adapter_config.json"])
    (empty / "adapter_config.json").write_text("{}")
    expect_error("finetune.py", "train", "--manifest", small_run / "manifest.json",
                 "--resume-adapter", empty, "--base-model", tiny_model,
                 "--output-dir", tmp_path / "out", mentions=[empty, "adapter weights"])
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "out").exists()
