"""compare_evals.py: paired deltas on a hand-computed case, pooling seed folders, and one `error:`
line (exit 2, nothing written) for each kind of bad input."""

import json

import pytest

from conftest import run_script


def write(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def row(row_id, tokens, nll, category="c"):
    return {"row_id": row_id, "category": category, "supervised_tokens": tokens,
            "finetuned_nll_sum": nll, "finetuned_loss": nll / tokens if tokens else None}


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
    assert result["a"] == str(a.resolve()) and result["bootstrap"] == 2000


def test_rows_without_supervised_tokens_count_in_neither_delta(tmp_path):
    """A row whose completion was cut away entirely (0 tokens, NLL 0) changes no delta; the
    trailing blank line of a hand-edited file is fine."""
    import compare_evals

    a = write(tmp_path / "a.jsonl", [row("x", 4, 2.0), row("cut", 0, 0.0)], tail="\n")
    b = write(tmp_path / "b.jsonl", [row("x", 4, 4.0), row("cut", 0, 0.0)])
    rows_a = compare_evals.read_per_example(a, "finetuned")
    assert list(rows_a) == ["x", "cut"]
    result = compare_evals.paired_deltas(rows_a, compare_evals.read_per_example(b, "finetuned"),
                                         "finetuned", 200, 0)
    assert result["token_weighted"]["delta"] == pytest.approx(-0.5)
    assert result["per_example"]["delta"] == pytest.approx(-0.5)
    assert result["token_weighted"]["ci95"] == pytest.approx([-0.5, -0.5])
    assert result["rows"] == 2 and result["fraction_rows_a_better"] == 1.0


def test_pooled_over_seed_folders(tmp_path):
    """Several files (a glob) are paired by folder name; the pool is the concatenation of the
    seeds' rows, so the pooled token-weighted delta is the pooled sums' ratio."""
    import compare_evals

    for seed, (nll_a, tokens) in {"seed_1": (1.0, 2), "seed_2": (9.0, 6)}.items():
        write(tmp_path / seed / "top.jsonl", [row("r", tokens, nll_a)])
        write(tmp_path / seed / "random.jsonl", [row("r", tokens, 3.0)])
    out = tmp_path / "pooled.json"
    compare_evals.main(["--a", str(tmp_path / "seed_*" / "top.jsonl"),
                        "--b", str(tmp_path / "seed_2" / "random.jsonl"),
                        str(tmp_path / "seed_1" / "random.jsonl"),
                        "--output-json", str(out), "--bootstrap", "100"])
    result = json.loads(out.read_text())
    assert [p["label"] for p in result["pooled_from"]] == ["seed_1", "seed_2"]
    assert result["pooled_from"][1]["b"] == str((tmp_path / "seed_2" / "random.jsonl").resolve())
    assert result["rows"] == 2 and result["supervised_tokens"] == 8
    assert result["token_weighted"]["delta"] == pytest.approx((1 - 3 + 9 - 3) / 8)
    assert result["per_example"]["delta"] == pytest.approx(((1 - 3) / 2 + (9 - 3) / 6) / 2)
    assert result["fraction_rows_a_better"] == 0.5

    # a seed folder on one side only is refused, naming it
    write(tmp_path / "seed_3" / "top.jsonl", [row("r", 2, 1.0)])
    with pytest.raises(compare_evals.PipelineError, match="no file in a folder named seed_3"):
        compare_evals.main(["--a", str(tmp_path / "seed_*" / "top.jsonl"),
                            "--b", str(tmp_path / "seed_*" / "random.jsonl")])
    with pytest.raises(compare_evals.PipelineError, match="matches no file"):
        compare_evals.main(["--a", str(tmp_path / "seed_*" / "top.jsonl"),
                            "--b", str(tmp_path / "nothing_*" / "random.jsonl")])


GOOD = [row("x", 10, 10.0), row("y", 5, 4.0)]
ZERO_TOKENS = [row("x", 0, 0.0), row("y", 0, 0.0)]
BAD_INPUTS = {  # name: (rows or raw text of file A, extra flags, what the error line must say)
    "different rows": ([row("x", 10, 10.0), row("q", 5, 4.0)], [], "different eval rows"),
    "duplicated row_id": ([row("x", 10, 10.0), row("y", 5, 4.0), row("x", 10, 9.0)], [],
                          "a.jsonl line 3: row_id 'x' appears twice (first on line 1)"),
    "empty file": ("", [], "a.jsonl has no rows"),
    "only blank lines": ("\n\n", [], "a.jsonl has no rows"),
    "zero supervised tokens": (ZERO_TOKENS, [],
                               "none of the 2 eval rows has a supervised token"),
    "NaN loss": ('{"row_id": "x", "supervised_tokens": 10, "finetuned_nll_sum": NaN}\n'
                 + json.dumps(row("y", 5, 4.0)) + "\n", [],
                 "a.jsonl line 1: finetuned_nll_sum must be a finite number, got nan"),
    "infinite loss": ([row("x", 10, float("inf")), row("y", 5, 4.0)], [],
                      "a.jsonl line 1: finetuned_nll_sum must be a finite number"),
    "missing loss field": ([{"row_id": "x", "supervised_tokens": 10}, row("y", 5, 4.0)], [],
                           "a.jsonl line 1 has no finetuned_nll_sum"),
    "missing tokens field": ([{"row_id": "x", "finetuned_nll_sum": 1.0}, row("y", 5, 4.0)], [],
                             "a.jsonl line 1 has no supervised_tokens"),
    "missing row_id": ([row("x", 10, 10.0), {"supervised_tokens": 5, "finetuned_nll_sum": 4.0}],
                       [], "a.jsonl line 2 has no row_id"),
    "missing base column": (GOOD, ["--column", "base"], "a.jsonl line 1 has no base_nll_sum"),
    "negative tokens": ([row("x", -1, 10.0), row("y", 5, 4.0)], [],
                        "a.jsonl line 1: supervised_tokens must be an integer >= 0"),
    "not JSON": (json.dumps(row("x", 10, 10.0)) + "\n{oops\n", [], "a.jsonl line 2 is not JSON"),
    "bootstrap 0": (GOOD, ["--bootstrap", "0"], "--bootstrap must be at least 1, got 0"),
    "missing file": (None, [], "missing.jsonl does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(tmp_path, case):
    content, flags, message = BAD_INPUTS[case]
    a = tmp_path / ("missing.jsonl" if content is None else "a.jsonl")
    if isinstance(content, str):
        a.write_text(content)
    elif content is not None:
        write(a, content)
    b = write(tmp_path / "b.jsonl", ZERO_TOKENS if content is ZERO_TOKENS else GOOD)
    out = tmp_path / "cmp.json"
    result = run_script("compare_evals.py", "--a", a, "--b", b, "--output-json", out, *flags,
                        expect_ok=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        result.stderr
    assert message in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".*"))
