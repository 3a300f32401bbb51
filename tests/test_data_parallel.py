"""Data parallelism under torchrun, checked on the CPU with the gloo backend: N processes give what
one process gives (finetune.py: one process with N x the gradient accumulation; eval_loss.py and
sae_analysis.py: the same per-row numbers and files; score.py --nproc: bergson's own workers, the
same scores and subsets)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_script
from helpers import copy_run

MAX_LENGTH = 256


def torchrun(script, *args, nproc=2):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ROOT / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def load(path):
    return json.loads(path.read_text())


def adapter_weights(adapter_dir):
    from safetensors.numpy import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, chat_run):
    return copy_run(chat_run, tmp_path_factory.mktemp("dp") / "run")


def finetune_args(run_dir, tiny_model, output_dir, accumulation):
    # no LoRA dropout: its masks are the one thing that differs between the two set-ups
    return ["train", "--preset", "fast", "--manifest", run_dir / "manifest.json",
            "--base-model", tiny_model, "--output-dir", output_dir, "--epochs", 1,
            "--batch-size", 4, "--gradient-accumulation", accumulation, "--lora-dropout", 0,
            "--lora-rank", 8, "--learning-rate", 3e-3, "--max-length", MAX_LENGTH, "--device", "cpu"]


@pytest.fixture(scope="module")
def adapters(run_dir, tiny_model):
    run_script("finetune.py", *finetune_args(run_dir, tiny_model, run_dir / "adapter_1", 2))
    torchrun("finetune.py", *finetune_args(run_dir, tiny_model, run_dir / "adapter_N", 1))
    return run_dir / "adapter_1", run_dir / "adapter_N"


def test_two_processes_train_like_one_with_double_accumulation(adapters):
    one, two = (load(a / "train_metrics.json") for a in adapters)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["micro_batches_per_step"] == two["micro_batches_per_step"] == 2
    assert one["optimizer_steps"] == two["optimizer_steps"] == 20  # 160 rows / (4 x 2)
    assert one["tokens_seen"] == two["tokens_seen"]
    assert one["supervised_tokens_seen"] == two["supervised_tokens_seen"]
    losses_one = [x["loss"] for x in one["loss_curve"]]
    losses_two = [x["loss"] for x in two["loss_curve"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert losses_one[-1] < losses_one[0]  # it trained
    assert two["final_eval"]["loss"] == pytest.approx(one["final_eval"]["loss"], rel=1e-4)
    assert two["final_eval"]["supervised_token_count"] == one["final_eval"]["supervised_token_count"]
    weights_one, weights_two = (adapter_weights(a) for a in adapters)
    assert weights_one.keys() == weights_two.keys()
    moved = 0
    for name, value in weights_one.items():
        np.testing.assert_allclose(weights_two[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
        moved += "lora_B" in name and np.abs(value).max() > 0
    assert moved  # lora_B starts at zero: the comparison is of trained weights


def test_eval_loss_split_across_processes_matches_one_process(run_dir, adapters):
    common = ["--manifest", run_dir / "manifest.json", "--adapter-path", adapters[0],
              "--max-length", MAX_LENGTH, "--batch-size", 3, "--device", "cpu"]
    run_script("eval_loss.py", *common, "--output-json", run_dir / "eval_1.json")
    torchrun("eval_loss.py", *common, "--output-json", run_dir / "eval_N.json")
    one, two = load(run_dir / "eval_1.json"), load(run_dir / "eval_N.json")
    assert (one["processes"], two["processes"]) == (1, 2)
    for name in ("base", "finetuned"):
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-5)
    rows_one = [json.loads(x) for x in (run_dir / "eval_1.per_example.jsonl").open()]
    rows_two = [json.loads(x) for x in (run_dir / "eval_N.per_example.jsonl").open()]
    assert [r["row_id"] for r in rows_two] == [r["row_id"] for r in rows_one]
    for a, b in zip(rows_one, rows_two):
        assert b["supervised_tokens"] == a["supervised_tokens"]
        assert b["finetuned_nll_sum"] == pytest.approx(a["finetuned_nll_sum"], rel=1e-5)


def test_eval_loss_token_batches_match_row_batches(run_dir, adapters):
    """--max-batch-tokens (the large-vocabulary memory bound) changes how rows are grouped, not
    any row's number: against the one-process file of the test above (3 rows a batch)."""
    rows_file = run_dir / "eval_1.per_example.jsonl"
    if not rows_file.exists():   # run alone (-k): make the one-process file here
        run_script("eval_loss.py", "--manifest", run_dir / "manifest.json", "--adapter-path",
                   adapters[0], "--max-length", MAX_LENGTH, "--batch-size", 3, "--device", "cpu",
                   "--output-json", run_dir / "eval_1.json")
    run_script("eval_loss.py", "--manifest", run_dir / "manifest.json", "--adapter-path",
               adapters[0], "--max-length", MAX_LENGTH, "--batch-size", 8, "--device", "cpu",
               "--skip-base", "--max-batch-tokens", 300, "--output-json",
               run_dir / "eval_tokens.json")
    rows, tokens = load(run_dir / "eval_1.json"), load(run_dir / "eval_tokens.json")
    assert (rows["max_batch_tokens"], tokens["max_batch_tokens"]) == (None, 300)
    assert tokens["finetuned"]["loss"] == pytest.approx(rows["finetuned"]["loss"], rel=1e-5)
    by_rows = [json.loads(x) for x in rows_file.open()]
    by_tokens = [json.loads(x) for x in (run_dir / "eval_tokens.per_example.jsonl").open()]
    assert [r["row_id"] for r in by_tokens] == [r["row_id"] for r in by_rows]
    for a, b in zip(by_rows, by_tokens):
        assert b["finetuned_nll_sum"] == pytest.approx(a["finetuned_nll_sum"], rel=1e-5)


def test_sae_features_split_across_processes_match_one_process(run_dir, tiny_model):
    run_script("train_sae.py", "--manifest", run_dir / "manifest.json", "--model-name",
               tiny_model, "--layer", 0, "--d-sae", 64, "--k", 8, "--steps", 60,
               "--batch-tokens", 256, "--max-length", MAX_LENGTH, "--device", "cpu",
               "--output-dir", run_dir / "sae")
    common = ["--manifest", run_dir / "manifest.json", "--split", "train_base", "--sae-path",
              run_dir / "sae", "--model-name", tiny_model, "--max-tokens", MAX_LENGTH,
              "--batch-size", 5, "--device", "cpu"]
    run_script("sae_analysis.py", *common, "--output-dir", run_dir / "features_1")
    torchrun("sae_analysis.py", *common, "--output-dir", run_dir / "features_N")
    one = np.load(run_dir / "features_1" / "sae.npz")
    two = np.load(run_dir / "features_N" / "sae.npz")
    assert list(two["row_id"]) == list(one["row_id"])
    np.testing.assert_allclose(two["feature_activation_mean"], one["feature_activation_mean"],
                               rtol=1e-4, atol=1e-5)
    for name in one["stat_names"]:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(two["feature_frequency"], one["feature_frequency"])
    summary_one = load(run_dir / "features_1" / "summary.json")
    summary_two = load(run_dir / "features_N" / "summary.json")
    assert (summary_one["processes"], summary_two["processes"]) == (1, 2)
    assert summary_two["total_tokens_forwarded"] == summary_one["total_tokens_forwarded"]
    assert summary_two["total_tokens"] == summary_one["total_tokens"]


def test_score_with_two_bergson_workers_matches_one(run_dir, adapters):
    common = ["--manifest", run_dir / "manifest.json", "--adapter-path", adapters[0],
              "--score-mode", "mean", "--preconditioning-mode", "query", "--projection-dim", 16,
              "--subset-k", 20, "--max-length", MAX_LENGTH]
    for nproc in (1, 2):
        run_script("score.py", *common, "--nproc", nproc, "--output-dir",
                   run_dir / f"score_{'1' if nproc == 1 else 'N'}")
    one, two = (load(run_dir / name / "summary.json") for name in ("score_1", "score_N"))
    assert (one["nproc"], two["nproc"]) == (1, 2)
    assert one["n_finite"] == two["n_finite"] == one["n_total"]
    rows_one = [json.loads(x) for x in (run_dir / "score_1" / "train_scores.jsonl").open()]
    rows_two = [json.loads(x) for x in (run_dir / "score_N" / "train_scores.jsonl").open()]
    scores_one = np.array([r["score"] for r in rows_one])
    scores_two = np.array([r["score"] for r in rows_two])
    np.testing.assert_allclose(scores_two, scores_one, rtol=0, atol=1e-4 * np.abs(scores_one).max())
    for flag in ("in_top_k", "in_matched_random_k"):
        assert [r[flag] for r in rows_two] == [r[flag] for r in rows_one]


def test_multigpu_compare_reads_the_runs(run_dir, adapters):
    """benchmarks/multigpu_compare.py (the table of `BENCH=multigpu bash device/bench.sh`) on the
    runs above: it runs after the eval, SAE and score tests, whose outputs it reads."""
    log = run_dir / "log.txt"
    log.write_text("STEP_WALL finetune_1 30000 ms\nSTEP_WALL finetune_N 20000 ms\n")
    run_script("benchmarks/multigpu_compare.py", "--run-dir", run_dir, "--log", log,
               "--output-dir", run_dir / "compare")
    table = load(run_dir / "compare" / "multigpu.json")
    steps = {row["step"]: row for row in table["steps"]}
    assert set(steps) == {"finetune", "eval_loss", "score", "sae_analysis"} and not table["notes"]
    assert steps["finetune"]["wall_1"] == 30.0 and steps["finetune"]["wall_n"] == 20.0
    assert steps["finetune"]["agreement"]["same_steps"] is True
    assert steps["finetune"]["agreement"]["max_rel_step_loss_diff"] < 1e-4
    assert steps["eval_loss"]["agreement"]["max_per_token_nll_diff"] < 1e-4
    assert steps["sae_analysis"]["processes"] == steps["score"]["processes"] == 2
    assert steps["score"]["agreement"]["spearman"] > 0.999
    assert "| finetune | training loop | 2 |" in (run_dir / "compare" / "multigpu.md").read_text()


def test_one_micro_batch_of_n_rows_trains_like_n_micro_batches(run_dir, tiny_model, adapters):
    """The speed lever recipes/taboo.toml takes for the seed's recipe: its 16 rows a step as one
    16-row micro-batch instead of 16 one-row micro-batches (launch-bound on a GPU). The loss is the
    step's summed token NLL over its supervised tokens either way, so the steps are the same
    optimisation: here one 8-row micro-batch a step against adapter_1's two of 4 rows."""
    wide = run_dir / "adapter_8x1"
    args = finetune_args(run_dir, tiny_model, wide, 1)
    args[args.index("--batch-size") + 1] = 8
    run_script("finetune.py", *args)
    narrow = adapters[0]
    one, two = load(wide / "train_metrics.json"), load(narrow / "train_metrics.json")
    assert (one["micro_batches_per_step"], two["micro_batches_per_step"]) == (1, 2)
    assert one["optimizer_steps"] == two["optimizer_steps"] == 20  # 160 rows / 8
    assert one["supervised_tokens_seen"] == two["supervised_tokens_seen"]
    losses_one = [x["loss"] for x in one["loss_curve"]]
    assert losses_one == pytest.approx([x["loss"] for x in two["loss_curve"]], rel=1e-4)
    assert losses_one[-1] < losses_one[0]
    weights_one, weights_two = (adapter_weights(a) for a in (wide, narrow))
    for name, value in weights_two.items():
        np.testing.assert_allclose(weights_one[name], value, rtol=1e-3, atol=1e-5, err_msg=name)