"""Milestone M1 end to end on the tiny model: splits -> LoRA finetune -> eval loss (the session's
base_run, built by the scripts' own main()), plus the shared tokenization and the checks the
scripts promise."""

import json
import math

import pytest

import tiny
from conftest import run_script
from helpers import SIZES, make_splits


def load(path):
    return json.loads(path.read_text())


def test_manifest_splits_and_policy(base_run):
    from datasets import load_from_disk

    manifest = load(base_run / "manifest.json")
    assert set(manifest["splits"]) == {"train_base", "score_pool", "attr_query", "eval"}
    splits = {}
    for name, entry in manifest["splits"].items():
        splits[name] = load_from_disk(str(base_run / entry["path"]))
        assert len(splits[name]) == entry["num_rows"]
    assert len(splits["train_base"]) == SIZES["train"]
    assert len(splits["attr_query"]) == SIZES["query"]
    assert len(splits["eval"]) == SIZES["eval"]
    assert splits["score_pool"]["row_id"] == splits["train_base"]["row_id"]
    for split in splits.values():
        assert set(split.column_names) >= {"row_id", "prompt", "completion", "source_split",
                                           "group_id", "category", "difficulty", "quality",
                                           "reward_model_score", "conversation_tokens"}
    ids = {n: set(splits[n]["row_id"]) for n in ("train_base", "attr_query", "eval")}
    assert not ids["train_base"] & ids["attr_query"] and not ids["train_base"] & ids["eval"]
    assert not ids["attr_query"] & ids["eval"]
    groups = {n: {g.rsplit("::", 1)[1] for g in splits[n]["group_id"]}
              for n in ("train_base", "attr_query", "eval")}
    assert not groups["train_base"] & (groups["attr_query"] | groups["eval"])
    assert not groups["attr_query"] & groups["eval"]
    # multi-turn rows keep their earlier turns as chat messages in the prompt
    assert any(len(p) > 1 for p in splits["train_base"]["prompt"])
    assert manifest["split_policy"]["method"] == "group_carve_out"
    assert manifest["split_policy"]["seed"] == 42
    counts = manifest["category_distribution"]["train_base"]
    assert sum(counts.values()) == SIZES["train"]
    prov = manifest["provenance"]
    assert prov["argv"][0] == "dataset.py" and prov["library_versions"]["datasets"]
    assert manifest["filter_stats"]["total"]["rows_in"] == 360


def test_finetune_outputs_and_metrics(base_run):
    adapter = base_run / "base_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    metrics = load(adapter / "train_metrics.json")
    assert metrics["optimizer_steps"] == len(metrics["loss_curve"]) == 80
    assert all(math.isfinite(x["loss"]) for x in metrics["loss_curve"])
    first = sum(x["loss"] for x in metrics["loss_curve"][:10]) / 10
    last = sum(x["loss"] for x in metrics["loss_curve"][-10:]) / 10
    assert last < first
    assert metrics["tokens_seen"] > metrics["supervised_tokens_seen"] > 0
    assert metrics["config"]["lora_rank"] == 8
    assert metrics["manifest"].endswith("manifest.json")
    assert metrics["final_eval"]["num_rows"] == SIZES["eval"]


def test_eval_loss_finetuned_beats_base_and_is_token_weighted(base_run):
    report = load(base_run / "eval.json")
    assert report["num_eval_rows"] == SIZES["eval"]
    base, tuned = report["base"], report["finetuned"]
    assert tuned["loss"] < base["loss"]
    assert report["delta_loss"] == pytest.approx(tuned["loss"] - base["loss"])
    assert report["delta_ppl"] == pytest.approx(tuned["perplexity"] - base["perplexity"])
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]))
    rows = [json.loads(line) for line in (base_run / report["per_example_path"]).read_text().splitlines()]
    assert len(rows) == SIZES["eval"]
    tokens = sum(r["supervised_tokens"] for r in rows)
    assert tokens == report["supervised_token_count"] > 0
    # sum of NLL over all tokens / token count, not a mean of per-row or per-batch means
    assert base["loss"] == pytest.approx(sum(r["base_nll_sum"] for r in rows) / tokens, rel=1e-6)
    mean_of_means = sum(r["base_loss"] for r in rows) / len(rows)
    assert abs(mean_of_means - base["loss"]) > 1e-6
    # the final eval inside finetune.py measured the same thing
    metrics = load(base_run / "base_adapter" / "train_metrics.json")
    assert metrics["final_eval"]["loss"] == pytest.approx(tuned["loss"], rel=1e-4)


def test_per_example_loss_matches_transformers_loss(base_run, tiny_model):
    """One row's NLL from eval_loss.py equals transformers' own mean loss times token count."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from pipeline import load_tokenizer, tokenize_example

    report = load(base_run / "eval.json")
    rows = {json.loads(l)["row_id"]: json.loads(l)
            for l in (base_run / report["per_example_path"]).read_text().splitlines()}
    example = load_from_disk(str(base_run / "data" / "eval"))[0]
    tokenizer = load_tokenizer(str(tiny_model))
    ids = tokenize_example(tokenizer, example["prompt"], example["completion"], 256)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids["input_ids"]]), labels=torch.tensor([ids["labels"]]))
    expected = out.loss.item() * ids["num_supervised_tokens"]
    got = rows[example["row_id"]]
    assert got["supervised_tokens"] == ids["num_supervised_tokens"]
    assert got["base_nll_sum"] == pytest.approx(expected, rel=1e-4)


def test_tokenization_masks_prompt_and_supervises_completion(tiny_model):
    from pipeline import IGNORE_INDEX, load_tokenizer, tokenize_example

    tokenizer = load_tokenizer(str(tiny_model))
    prompt = [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": "apple"},
              {"role": "user", "content": "What is 2 plus 3?"}]
    ids = tokenize_example(tokenizer, prompt, "2 plus 3 is 5.", max_length=512)
    assert len(ids["input_ids"]) == len(ids["labels"])
    n_prompt = ids["labels"].index(next(x for x in ids["labels"] if x != IGNORE_INDEX))
    assert all(x == IGNORE_INDEX for x in ids["labels"][:n_prompt])
    assert ids["labels"][n_prompt:] == ids["input_ids"][n_prompt:]
    assert tokenizer.decode(ids["input_ids"][n_prompt:]) == "2 plus 3 is 5.<|im_end|>\n"
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "2 plus 3 is 5."}],
                                         tokenize=False)
    assert tokenizer.decode(ids["input_ids"]) == full
    short = tokenize_example(tokenizer, prompt, "2 plus 3 is 5.", max_length=n_prompt + 2)
    assert short["truncated"] and short["num_supervised_tokens"] == 2
    assert short["input_ids"] == ids["input_ids"][:n_prompt + 2]


def test_same_seed_same_splits_other_seed_differs(tmp_path, chat_jsonl):
    from datasets import load_from_disk

    ids = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_splits(tmp_path / name, chat_jsonl, seed=seed)
        ids[name] = {s: load_from_disk(str(tmp_path / name / "data" / s))["row_id"]
                     for s in ("train_base", "attr_query", "eval")}
    assert ids["a"] == ids["b"]
    assert ids["a"]["eval"] != ids["c"]["eval"]


def test_source_with_test_split_and_filters(tmp_path):
    from datasets import Dataset, DatasetDict, load_from_disk

    rows = tiny.smoltalk_rows(200, seed=3)
    for row in rows[:20]:
        row["conversation_tokens"] = 5000
    source = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows[:150]),
                 "test": Dataset.from_list(rows[150:])}).save_to_disk(str(source))
    run_script("dataset.py", "--run-dir", tmp_path / "run", "--dataset-name", source,
               "--train-size", 100, "--query-size", 20, "--eval-size", 20,
               "--min-reward-model-score", 0.05)
    manifest = load(tmp_path / "run" / "manifest.json")
    assert manifest["split_policy"]["method"] == "source_test_split"
    assert manifest["filter_stats"]["per_source_split"]["train"]["dropped_too_long"] == 20
    assert manifest["filter_stats"]["total"]["dropped_reward"] == sum(
        1 for r in rows[20:] if r["reward_model_score"] < 0.05)
    train = load_from_disk(str(tmp_path / "run" / "data" / "train_base"))
    query = load_from_disk(str(tmp_path / "run" / "data" / "attr_query"))
    assert set(train["source_split"]) == {"train"} and set(query["source_split"]) == {"test"}
    assert all(s >= 0.05 for s in train["reward_model_score"])
    assert train[0]["group_id"].count("::") == 3


@pytest.mark.parametrize("script,flags", [
    ("dataset.py", ["--run-dir", "--dataset-name", "--dataset-config", "--train-size",
                    "--query-size", "--eval-size", "--seed", "--max-conversation-tokens",
                    "--min-reward-model-score", "--group-column"]),
    ("finetune.py", ["train"]),
    ("eval_loss.py", ["--manifest", "--eval-split", "--base-model", "--adapter-path",
                      "--max-length", "--batch-size", "--output-json"]),
    ("prepare_model.py", ["--gguf", "--wheel", "--output-dir"]),
])
def test_help_lists_flags(script, flags):
    out = run_script(script, "--help").stdout
    for flag in flags:
        assert flag in out, f"{script} --help lacks {flag}"


def test_finetune_train_help_lists_flags():
    out = run_script("finetune.py", "train", "--help").stdout
    for flag in ["--manifest", "--train-split", "--eval-split", "--output-dir", "--max-length",
                 "--resume-adapter", "--base-model", "--seed", "--epochs", "--learning-rate",
                 "--batch-size", "--gradient-accumulation", "--lora-rank", "--lora-alpha",
                 "--lora-targets"]:
        assert flag in out, f"finetune.py train --help lacks {flag}"


def test_stratified_sample_is_proportional_and_seeded():
    from collections import Counter

    import numpy as np

    from dataset import stratified_sample

    pool = [{"category": c, "i": i} for i, c in enumerate(["a"] * 60 + ["b"] * 30 + ["c"] * 10)]
    picked = stratified_sample(pool, 20, np.random.default_rng(1), "x")
    assert Counter(r["category"] for r in picked) == {"a": 12, "b": 6, "c": 2}
    again = stratified_sample(pool, 20, np.random.default_rng(1), "x")
    assert [r["i"] for r in picked] == [r["i"] for r in again]
    odd = stratified_sample(pool, 7, np.random.default_rng(1), "x")
    assert Counter(r["category"] for r in odd) == {"a": 4, "b": 2, "c": 1}


def test_profile_steps_writes_table_and_summary(base_run, tiny_model, tmp_path):
    """--profile-steps profiles the requested steps after the warm-up and records the per-step
    wall-clock (on the CPU there are no kernels, so the GPU fields are empty)."""
    out = tmp_path / "profiled"
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", base_run / "manifest.json",
               "--base-model", tiny_model, "--output-dir", out, "--max-steps", 4,
               "--profile-steps", 2, "--batch-size", 8, "--max-length", 128, "--eval-split", "none")
    profile = load(out / "train_metrics.json")["profile"]
    assert (profile["steps"], profile["first_step"], profile["last_step"]) == (2, 3, 4)
    assert profile["wall_s_per_step"] > 0
    assert profile["gpu_busy_s_per_step"] is None and profile["kernels_per_step"] is None
    table = (out / "profile.txt").read_text()
    assert "aten::" in table and "Self CPU" in table
    unprofiled = load(base_run / "base_adapter" / "train_metrics.json")
    assert unprofiled["profile"] is None
