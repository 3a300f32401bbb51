"""compare_evals.py: paired deltas on a hand-computed case, and refusal of mismatched files."""

import json

import pytest

from conftest import run_script


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(row_id, tokens, nll, category="c"):
    return {"row_id": row_id, "category": category, "supervised_tokens": tokens,
            "finetuned_nll_sum": nll, "finetuned_loss": nll / tokens}


def test_token_weighted_and_per_example_deltas_by_hand(tmp_path):
    # A helps the long row (100 tokens: 150 -> 100 NLL) and hurts the two short ones
    a = write(tmp_path / "a.jsonl", [row("x", 100, 100.0), row("y", 10, 20.0), row("z", 10, 20.0)])
    b = write(tmp_path / "b.jsonl", [row("x", 100, 150.0), row("y", 10, 10.0), row("z", 10, 10.0)])
    out = tmp_path / "cmp.json"
    run_script("compare_evals.py", "--a", a, "--b", b, "--output-json", out, "--bootstrap", 2000)
    result = json.loads(out.read_text())
    assert result["token_weighted"]["delta"] == pytest.approx((-50 + 10 + 10) / 120)
    assert result["per_example"]["delta"] == pytest.approx((-0.5 + 1.0 + 1.0) / 3)
    assert result["fraction_rows_a_better"] == pytest.approx(1 / 3)
    low, high = result["per_example"]["ci95"]
    assert low <= result["per_example"]["delta"] <= high


def test_different_rows_are_refused(tmp_path):
    a = write(tmp_path / "a.jsonl", [row("x", 10, 10.0)])
    b = write(tmp_path / "b.jsonl", [row("y", 10, 10.0)])
    result = run_script("compare_evals.py", "--a", a, "--b", b, expect_ok=False)
    assert result.returncode == 2 and "different eval rows" in result.stderr
