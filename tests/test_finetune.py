"""finetune.py on TRL's SFTTrainer, on the tiny model: the trainer's own batches hold exactly
tokenize_example's ids and labels, scratch and continue start from the documented weights, budget
matching gives equal steps and supervised tokens, --keep best keeps the best evaluation, bad
input."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from conftest import run_script
from helpers import copy_run

MAX_LENGTH = 256


def load(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, chat_run):
    return copy_run(chat_run, tmp_path_factory.mktemp("ft") / "run")


def split_rows(manifest_path, split, tiny_model):
    from pipeline import load_manifest, load_split, load_tokenizer, tokenize_split

    dataset = load_split(load_manifest(manifest_path), split)
    return dataset, tokenize_split(dataset, load_tokenizer(str(tiny_model)), MAX_LENGTH).to_list()


# ---------------------------------------------------------------------------------------------
# the trainer's own batches

@pytest.fixture(scope="module")
def recorded(run_dir, tiny_model):
    """One epoch of train_base as 20 steps of 2 micro-batches x 4 rows, every training batch the
    trainer's compute_loss received written down."""
    import finetune

    trainer_class = finetune.trainer_classes()[1]
    original = trainer_class.compute_loss
    seen = []

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            keys = ("input_ids", "labels", "attention_mask")
            seen.append({"step": self.state.global_step, **{k: inputs[k].tolist() for k in keys}})
        return original(self, model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_class, "compute_loss", recording)
        run_script("finetune.py", "train", "--preset", "fast", "--manifest",
                   run_dir / "manifest.json", "--base-model", tiny_model, "--output-dir",
                   run_dir / "scratch", "--batch-size", 4, "--gradient-accumulation", 2,
                   "--max-length", MAX_LENGTH, "--eval-split", "none")
    assert seen
    return seen, run_dir / "scratch"


def test_trainer_batches_hold_exactly_tokenize_example_rows(recorded, run_dir, tiny_model):
    batches, adapter = recorded
    metrics = load(adapter / "train_metrics.json")
    assert metrics["optimizer_steps"] == 20 and len(batches) == 40
    assert [b["step"] for b in batches] == [s for s in range(20) for _ in range(2)]
    trained = []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n)  # right padding
            assert set(labels[n:]) <= {-100}  # padding is never supervised
            trained.append((tuple(ids[:n]), tuple(labels[:n])))
    _, rows = split_rows(run_dir / "manifest.json", "train_base", tiny_model)
    expected = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in rows]
    assert Counter(trained) == Counter(expected)  # one epoch: every row once, ids and labels exact
    per_step = [sum(1 for b in batches[2 * s:2 * s + 2] for x in b["labels"] for y in x[1:]
                    if y != -100) for s in range(20)]
    assert [x["supervised_tokens"] for x in metrics["loss_curve"]] == per_step
    assert metrics["supervised_tokens_seen"] == sum(r["num_supervised_tokens"] for r in rows)
    assert metrics["rows_seen"] == 160
    assert metrics["tokens_seen"] == sum(len(ids) for ids, _ in expected)
    # each step's running token count and loop time (bench.py's per-half tokens/s read them)
    per_step_tokens = [sum(sum(m) for b in batches[2 * s:2 * s + 2] for m in b["attention_mask"])
                       for s in range(20)]
    curve = metrics["loss_curve"]
    assert [x["tokens_so_far"] for x in curve] == list(np.cumsum(per_step_tokens))
    elapsed = [x["elapsed_s"] for x in curve]
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:]))
    assert elapsed[-1] == pytest.approx(metrics["train_wall_clock_s"], rel=0.05)


def test_step_loss_is_token_nll_over_the_whole_step(recorded, tiny_model):
    """The first step's loss, recomputed with pipeline.token_nll_sums on the base model (a fresh
    LoRA has lora_B = 0): summed NLL of both micro-batches / their supervised tokens, not a mean of
    the two micro-batch means."""
    import torch

    from pipeline import load_base_model, token_nll_sums

    batches, adapter = recorded
    model = load_base_model(str(tiny_model), torch.float32, torch.device("cpu"))
    nll, count, means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches[:2]:
            sums, counts = token_nll_sums(model, *(torch.tensor(batch[k]) for k in
                                                   ("input_ids", "labels", "attention_mask")))
            nll, count = nll + sums.sum().item(), count + int(counts.sum())
            means.append(sums.sum().item() / counts.sum().item())
    first = load(adapter / "train_metrics.json")["loss_curve"][0]
    assert first["supervised_tokens"] == count
    assert first["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert abs(first["loss"] - sum(means) / 2) > 1e-5  # the two normalisations do differ here


# ---------------------------------------------------------------------------------------------
# budget matching and the two arms' starting weights


@pytest.fixture(scope="module")
def long_short(run_dir, tiny_model):
    """A manifest with the 40 rows of most supervised tokens ('long') and the 80 of fewest
    ('short'): about the same tokens in twice the rows."""
    from pipeline import load_manifest, write_selection_manifest

    dataset, rows = split_rows(run_dir / "manifest.json", "train_base", tiny_model)
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["num_supervised_tokens"])
    manifest = run_dir / "long_short" / "manifest.json"
    write_selection_manifest(load_manifest(run_dir / "manifest.json"), manifest,
                             {"long": dataset.select(order[:40]),
                              "short": dataset.select(order[-80:])}, {"method": "by length"})
    return manifest, max(r["num_supervised_tokens"] for r in rows)


@pytest.fixture(scope="module")
def arms(long_short, recorded, tiny_model):
    """Both subsets matched to the long one (--match-split long): 16 rows a step (8 x 2
    micro-batches) make 3 steps of its 40 rows, so 3 steps of a third of its tokens each. The long
    arm continues the scratch adapter, the short arm starts a fresh LoRA on its base model."""
    manifest, _ = long_short
    out = manifest.parent
    _, adapter = recorded
    for split, init in (("long", "continue"), ("short", "scratch")):
        run_script("finetune.py", "train", "--preset", "fast", "--manifest", manifest,
                   "--train-split", split, "--init", init, "--resume-adapter", adapter,
                   "--output-dir", out / split, "--match-split", "long", "--batch-size", 8,
                   "--gradient-accumulation", 2, "--max-length", MAX_LENGTH, "--eval-split", "none")
    return {split: load(out / split / "train_metrics.json") for split in ("long", "short")}


def test_budget_matching_gives_equal_steps_and_tokens(arms, long_short, tiny_model):
    manifest, longest_row = long_short
    budget = sum(r["num_supervised_tokens"] for r in split_rows(manifest, "long", tiny_model)[1])
    step_tokens = math.ceil(budget / 3)
    long, short = arms["long"], arms["short"]
    assert long["optimizer_steps"] == short["optimizer_steps"] == 3
    assert short["rows_seen"] > 1.5 * long["rows_seen"]  # the same tokens in many more rows
    for metrics in arms.values():
        assert (metrics["step_tokens"], metrics["budget_tokens"]) == (step_tokens, budget)
        assert metrics["rows_seen"] == sum(x["rows"] for x in metrics["loss_curve"])
        assert budget <= metrics["supervised_tokens_seen"] < budget + longest_row
        cumulative = np.cumsum([x["supervised_tokens"] for x in metrics["loss_curve"]])
        for step, tokens in enumerate(cumulative[:-1], 1):  # a step ends at the row crossing s x T
            assert step_tokens * step <= tokens < step_tokens * step + longest_row
        assert min(x["rows"] for x in metrics["loss_curve"]) >= 2  # a row per micro-batch
    assert abs(long["supervised_tokens_seen"] - short["supervised_tokens_seen"]) < longest_row


def adapter_sha256(adapter_dir):
    """The digest train_metrics.json's start_weights gives, from the saved file."""
    import hashlib

    from safetensors.numpy import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].astype(np.float32).tobytes())
    return digest.hexdigest()


def test_scratch_and_continue_start_from_the_documented_weights(arms, recorded, run_dir):
    _, adapter = recorded
    fresh = load(adapter / "train_metrics.json")
    assert fresh["init"] == "scratch" and fresh["resume_adapter"] is None
    assert fresh["start_weights"]["lora_B_max_abs"] == 0  # a fresh LoRA: B = 0, A random
    assert fresh["start_weights"]["lora_A_max_abs"] > 0
    continued, scratch = arms["long"], arms["short"]
    assert continued["init"] == "continue"
    assert continued["start_weights"]["sha256"] == adapter_sha256(adapter)
    assert continued["start_weights"]["lora_B_max_abs"] > 0
    # --init scratch with --resume-adapter: the adapter names the base model, its weights unused
    assert scratch["init"] == "scratch" and scratch["base_model"] == fresh["base_model"]
    assert scratch["start_weights"]["lora_B_max_abs"] == 0
    assert scratch["start_weights"]["sha256"] != adapter_sha256(adapter)
    assert adapter_sha256(run_dir / "long_short" / "long") != adapter_sha256(adapter)  # trained


# ---------------------------------------------------------------------------------------------
# --keep best


def test_keep_best_saves_the_evaluation_with_the_lowest_loss(run_dir, tiny_model, tmp_path):
    """Training on the math rows (in random order) and evaluating on the editing rows at a constant
    learning rate: the eval loss falls, then rises again, so the best epoch is not the last."""
    import torch

    from pipeline import (load_manifest, load_model_with_adapter, load_split, pad_batch,
                          token_nll_sums, write_selection_manifest)

    parent = load_manifest(run_dir / "manifest.json")
    train = load_split(parent, "train_base")
    manifest = tmp_path / "by_category" / "manifest.json"
    write_selection_manifest(parent, manifest, {
        "math": train.filter(lambda r: r["category"] == "math"),
        "editing": train.filter(lambda r: r["category"] == "editing")}, {"method": "category"})
    run_script("finetune.py", "train", "--preset", "fast", "--keep", "best", "--epochs", 3,
               "--no-group-by-length",
               "--manifest", manifest, "--train-split", "math", "--eval-split", "editing",
               "--base-model", tiny_model, "--output-dir", tmp_path / "best",
               "--learning-rate", 0.01, "--lr-scheduler", "constant", "--warmup-ratio", 0,
               "--lora-dropout", 0, "--max-length", MAX_LENGTH)
    metrics = load(tmp_path / "best" / "train_metrics.json")
    evals = metrics["evals"]
    assert [e["step"] for e in evals] == [5, 10, 15]  # 39 rows, 8 a step: an eval per epoch
    best = min(evals, key=lambda e: e["loss"])
    assert best["step"] != metrics["optimizer_steps"]  # the case this test is about
    assert metrics["kept_step"] == metrics["final_eval"]["step"] == best["step"]
    assert metrics["final_eval"]["loss"] == best["loss"]
    assert not (tmp_path / "best" / "checkpoints").exists()
    # the saved adapter is the best evaluation's, measured again outside the trainer
    _, rows = split_rows(manifest, "editing", tiny_model)
    model = load_model_with_adapter(str(tiny_model), str(tmp_path / "best"), torch.float32,
                                    torch.device("cpu"))
    with torch.no_grad():
        nll, count = token_nll_sums(model, *pad_batch(rows, 0, torch.device("cpu")))
    loss = nll.sum().item() / count.sum().item()
    assert loss == pytest.approx(best["loss"], rel=1e-5)
    assert abs(loss - evals[-1]["loss"]) > 1e-3
    assert math.isclose(metrics["final_eval"]["perplexity"], math.exp(best["loss"]))


# ---------------------------------------------------------------------------------------------
# bad input: one error line, exit 2, no output


def expect_error(out, *args, mentions=()):
    result = run_script("finetune.py", "train", *args, "--output-dir", out, expect_ok=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in mentions:
        assert str(word) in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_bad_flag_combinations(run_dir, tiny_model, tmp_path):
    common = ["--manifest", run_dir / "manifest.json", "--base-model", tiny_model,
              "--max-length", MAX_LENGTH]
    out = tmp_path / "out"
    expect_error(out, *common, "--init", "continue", mentions=["--init continue",
                                                               "--resume-adapter"])
    expect_error(out, *common, "--keep", "best", "--eval-split", "none",
                 mentions=["--keep best", "--eval-split"])
    expect_error(out, *common, "--device", "cuda:1", mentions=["cuda:1", "CUDA_VISIBLE_DEVICES"])
    # 10 supervised tokens a step cannot feed 16 micro-batches of at least a row each
    expect_error(out, *common, "--step-tokens", 10,
                 mentions=["--step-tokens 10", "16 micro-batches", "--gradient-accumulation"])
    expect_error(out, *common, "--preset", "fast", "--max-batch-tokens", 64,
                 mentions=["--max-batch-tokens 64", "padded tokens"])


def test_sdpa_leaves_out_the_cudnn_backend_unless_asked(tiny_model):
    """--attn-implementation sdpa is SDPA without cuDNN (it trained Qwen2.5 to NaN on the
    H200); sdpa_cudnn is SDPA with PyTorch's own backend choice; both load as transformers'
    sdpa."""
    import torch

    from pipeline import SDPA_CUDNN, load_base_model

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for name, loads_as, cudnn in [("sdpa", "sdpa", False), (SDPA_CUDNN, "sdpa", True),
                                      ("eager", "eager", False)]:
            model = load_base_model(str(tiny_model), torch.float32, torch.device("cpu"), name)
            assert model.config._attn_implementation == loads_as, name
            assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn, name
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
