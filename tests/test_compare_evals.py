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


# ---------------------------------------------------------------------------------------------
# several seeds: the seed-level answer beside the pooled one, and the verdict's arm matrix
# (the coverage of the seed-level interval is simulated in tests/test_verdict.py)


def test_pooled_output_carries_the_seed_level_answer(tmp_path):
    import compare_evals

    for seed, (nll_a, tokens) in {"seed_1": (1.0, 2), "seed_2": (9.0, 6),
                                  "seed_3": (4.0, 2)}.items():
        write(tmp_path / seed / "top.jsonl", [row("r", tokens, nll_a), row("s", 2, 2.0)])
        write(tmp_path / seed / "random.jsonl", [row("r", tokens, 3.0), row("s", 2, 2.0)])
    out = tmp_path / "pooled.json"
    compare_evals.main(["--a", str(tmp_path / "seed_*" / "top.jsonl"),
                        "--b", str(tmp_path / "seed_*" / "random.jsonl"),
                        "--output-json", str(out), "--bootstrap", "200"])
    level = json.loads(out.read_text())["seed_level"]
    # per seed: (1 - 3) / 4, (9 - 3) / 8, (4 - 3) / 4
    assert level["token_weighted"]["per_seed_deltas"] == pytest.approx([-0.5, 0.75, 0.25])
    assert level["token_weighted"]["mean_delta"] == pytest.approx(0.5 / 3)
    assert level["token_weighted"]["seeds_a_better"] == 1 and level["seeds"] == 3
    assert level["labels"] == ["seed_1", "seed_2", "seed_3"]
    assert "t-interval over the seeds" in level["interval"]
    # the same row ids, but seed_2's row r has other tokens: not one eval split, so per seed
    assert "two-level" in level["bootstrap"] and "per seed row draw" in level["bootstrap"]
    low, high = level["token_weighted"]["ci95_t"]
    assert low < 0 < high


def test_arm_matrix_every_arm_against_every_baseline(tmp_path):
    import compare_evals

    # arm x seed: the per-token loss shift of every eval row (2 rows of 4 tokens, base 2.0)
    shifts = {"top": [-0.2, -0.1], "random": [0.0, 0.0], "longest": [0.1, 0.3]}
    for arm, per_seed in shifts.items():
        for seed, shift in zip(("seed_1", "seed_2"), per_seed):
            write(tmp_path / seed / f"eval_{arm}.jsonl",
                  [row(r, 4, 4 * (2.0 + shift)) for r in ("x", "y")])
    out = tmp_path / "matrix.json"
    compare_evals.main(["--label", "scratch", "--baselines", "random", "longest",
                        "--output-json", str(out), "--bootstrap", "100"]
                       + [f"--arm={arm}={tmp_path}/seed_*/eval_{arm}.jsonl" for arm in shifts])
    result = json.loads(out.read_text())
    assert result["kind"] == "arm_comparisons" and result["label"] == "scratch"
    comparisons = result["comparisons"]
    assert {a: sorted(v) for a, v in comparisons.items()} == {
        "top": ["longest", "random"], "random": ["longest"], "longest": ["random"]}
    top = comparisons["top"]["random"]["token_weighted"]
    assert top["per_seed_deltas"] == pytest.approx([-0.2, -0.1])
    assert top["mean_delta"] == pytest.approx(-0.15) and top["seeds_a_better"] == 2
    assert comparisons["top"]["longest"]["token_weighted"]["mean_delta"] == pytest.approx(-0.35)
    assert comparisons["longest"]["random"]["token_weighted"]["seeds_a_better"] == 0
    assert list(result["arms"]["top"]) == ["seed_1", "seed_2"]

    base = ["--baselines", "random", "--bootstrap", "10"]
    with pytest.raises(compare_evals.PipelineError, match="--baselines reward is not one of"):
        compare_evals.main(["--baselines", "reward", f"--arm=top={tmp_path}/seed_*/eval_top.jsonl"])
    write(tmp_path / "seed_3" / "eval_top.jsonl", [row("x", 4, 8.0), row("y", 4, 8.0)])
    with pytest.raises(compare_evals.PipelineError,
                       match="--arm random has no file in a folder named seed_3"):
        compare_evals.main(base + [f"--arm=top={tmp_path}/seed_*/eval_top.jsonl",
                                   f"--arm=random={tmp_path}/seed_*/eval_random.jsonl"])
    with pytest.raises(compare_evals.PipelineError, match="--arm top is given twice"):
        compare_evals.main(base + ["--arm=top=a", "--arm=top=b", "--arm=random=c"])
    with pytest.raises(compare_evals.PipelineError, match="replace --a/--b"):
        compare_evals.main(base + ["--a", "x", "--b", "y", "--arm=top=a"])
    with pytest.raises(compare_evals.PipelineError, match="--arm and --baselines go together"):
        compare_evals.main(["--arm=top=a"])
