"""make_demo_data.py: deterministic, verifiable, exactly the planted wrong fraction, and a file
dataset.py takes with --group-column instruction_id."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from decimal import Decimal

import pytest
from conftest import run_script

import make_demo_data as mdd


def read_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recompute(task: dict) -> str:
    """The answer from the question's fields, independently of make_demo_data.solve."""
    f = task["family"]
    if f in ("add", "subtract", "multiply"):
        a, b = task["a"], task["b"]
        return str({"add": a + b, "subtract": a - b, "multiply": a * b}[f])
    if f.startswith("sort_"):
        return ", ".join(map(str, sorted(task["items"])))
    if f == "reverse_word":
        return "".join(reversed(task["word"]))
    if f == "uppercase":
        return task["word"].upper()
    if f == "count_letter":
        return str(sum(c == task["letter"] for c in task["word"]))
    factor = {"km_to_m": 1000, "kg_to_g": 1000, "h_to_min": 60,
              "m_to_km": Decimal(1) / 1000, "g_to_kg": Decimal(1) / 1000}.get(f)
    value = Decimal(task["value"])
    result = value / 60 if f == "min_to_h" else value * factor
    return str(result.normalize()) if result != result.to_integral() else str(int(result))


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "data.jsonl.gz"
    run_script("make_demo_data.py", "--output", path, "--rows", 600, "--seed", 0,
               "--wrong-fraction", 0.1)
    return path


def test_same_seed_same_bytes_other_seed_differs(demo_file, tmp_path):
    again = tmp_path / "again.jsonl.gz"
    other = tmp_path / "other.jsonl.gz"
    run_script("make_demo_data.py", "--output", again, "--rows", 600, "--seed", 0)
    run_script("make_demo_data.py", "--output", other, "--rows", 600, "--seed", 1)
    assert again.read_bytes() == demo_file.read_bytes()
    assert other.read_bytes() != demo_file.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_rows_are_smoltalk_shaped_and_verifiable(demo_file):
    rows = read_rows(demo_file)
    assert len(rows) == 600
    assert set(Counter(r["category"] for r in rows)) == set(mdd.CATEGORIES)
    assert set(r["difficulty"] for r in rows) == set(mdd.DIFFICULTIES)
    assert {r["task"]["family"] for r in rows} == set(mdd.FAMILY_CATEGORY)
    groups = Counter(r["instruction_id"] for r in rows)
    assert set(groups.values()) <= {1, 2, 3} and sum(n >= 2 for n in groups.values()) > 150
    questions = {}
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        task = r["task"]
        assert mdd.FAMILY_CATEGORY[task["family"]] == r["category"]
        assert recompute(task) == task["answer"], task
        assert r["answer_given"] in assistant["content"]
        assert r["answer_correct"] == (r["answer_given"] == task["answer"])
        if r["answer_correct"]:
            assert r["quality"] in ("good", "excellent") and r["reward_model_score"] >= 0.6
        else:
            assert r["quality"] == "poor" and r["reward_model_score"] <= 0.3
        words = len(user["content"].split()) + len(assistant["content"].split())
        assert r["conversation_tokens"] == round(1.3 * words) and 5 <= words <= 100
        assert r["source"] == mdd.SOURCE and r["generator"] == mdd.GENERATOR
        # paraphrases of one question share the task; no task is under two ids
        key = json.dumps(task, sort_keys=True)
        assert questions.setdefault(key, r["instruction_id"]) == r["instruction_id"]
    phrasings = {}
    for r in rows:
        phrasings.setdefault(r["instruction_id"], set()).add(r["messages"][0]["content"])
    assert all(len(p) == groups[g] for g, p in phrasings.items())  # distinct phrasings


@pytest.mark.parametrize("rows,fraction", [(600, 0.1), (101, 0.25), (50, 0.0), (40, 1.0)])
def test_exact_wrong_fraction(rows, fraction):
    built = mdd.build_rows(rows, seed=3, wrong_fraction=fraction)
    assert len(built) == rows
    assert sum(not r["answer_correct"] for r in built) == round(fraction * rows)
    for r in built:
        assert mdd.solve(r["task"]) == r["task"]["answer"]


def test_dataset_py_accepts_the_file(demo_file, tmp_path):
    run_script("dataset.py", "--run-dir", tmp_path / "run", "--dataset-name", demo_file,
               "--group-column", "instruction_id", "--train-size", 200, "--query-size", 40,
               "--eval-size", 40)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {n: e["num_rows"] for n, e in manifest["splits"].items()} == {
        "train_base": 200, "attr_query": 40, "eval": 40, "score_pool": 200}
    assert set(manifest["category_distribution"]["train_base"]) == set(mdd.CATEGORIES)


@pytest.mark.parametrize("args,message", [
    (["--rows", "1"], "--rows must be at least 2"),
    (["--wrong-fraction", "1.5"], "--wrong-fraction must be between 0 and 1"),
    (["--output", "x.csv"], "must end in .jsonl or .jsonl.gz"),
])
def test_bad_args_one_line_exit_2(args, message, tmp_path):
    full = ["--output", tmp_path / "d.jsonl.gz"] + args
    result = run_script("make_demo_data.py", *full, expect_ok=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(demo_file, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("keep\n")
    result = run_script("make_demo_data.py", "--output", path, expect_ok=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert path.read_text() == "keep\n"
    run_script("make_demo_data.py", "--output", path, "--overwrite")
    with open(path) as f:
        plain = [json.loads(line) for line in f]
    assert plain == read_rows(demo_file)
