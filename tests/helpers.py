"""Test helpers used by more than one test module, in one place: the tiny chat run's sizes and
how it is built, the score tests' brute-force gradients and token-id check, the runner driven as
a process, and process-liveness checks. Session fixtures over these live in conftest.py."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from conftest import run_script

SIZES = dict(train=160, query=40, eval=40)
MAX_LEN = 256
# the score tests' run: (train, query, eval) rows, the split seed, the base adapter's epochs
SCORE_RUN_SIZES, SCORE_RUN_SEED, SCORE_RUN_EPOCHS = (40, 12, 12), 3, 2


def make_splits(run_dir, source, seed=42, extra=()):
    return run_script("dataset.py", "--run-dir", run_dir, "--dataset-name", source,
                      "--group-column", "instruction_id", "--train-size", SIZES["train"],
                      "--query-size", SIZES["query"], "--eval-size", SIZES["eval"],
                      "--seed", seed, *extra)


def copy_run(shared: Path, dest: Path) -> Path:
    """A private copy of a session-wide run for a test that writes into its folder (manifest
    paths are relative to the run folder, so the copy is a run of its own)."""
    shutil.copytree(shared, dest)
    return dest


def trained_run(run_dir, tiny_model, chat_jsonl, sizes=SCORE_RUN_SIZES, seed=SCORE_RUN_SEED,
                epochs=SCORE_RUN_EPOCHS):
    """dataset.py splits (train, query, eval sizes) and a LoRA adapter trained on them."""
    train, query, evaluation = sizes
    run_script("dataset.py", "--run-dir", run_dir, "--dataset-name", chat_jsonl,
               "--group-column", "instruction_id", "--train-size", train, "--query-size", query,
               "--eval-size", evaluation, "--seed", seed)
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", run_dir / "manifest.json",
               "--base-model", tiny_model, "--output-dir", run_dir / "base_adapter",
               "--epochs", epochs, "--batch-size", 8, "--learning-rate", 3e-3, "--lora-rank", 4,
               "--max-length", MAX_LEN)
    return run_dir


def split_rows(run_dir, name, manifest="manifest.json"):
    from pipeline import load_manifest, load_split

    return load_split(load_manifest(run_dir / manifest), name)


def lora_gradients(run_dir, split_name, reduction="sum"):
    """Per-row gradient of the summed (or mean) completion NLL w.r.t. each LoRA weight, by plain
    autograd on finetune.py's tokenization: {module name: [rows, numel]}."""
    import torch

    from pipeline import (base_model_of_adapter, load_model_with_adapter, load_tokenizer,
                          tokenize_split)

    adapter = run_dir / "base_adapter"
    tokenizer = load_tokenizer(base_model_of_adapter(adapter))
    rows = tokenize_split(split_rows(run_dir, split_name), tokenizer, MAX_LEN).to_list()
    model = load_model_with_adapter(base_model_of_adapter(adapter), adapter, torch.float32,
                                    torch.device("cpu"), trainable=True)
    model.eval()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    grads = {n: [] for n in params}
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction=reduction)
        model.zero_grad()
        loss.backward()
        for n, p in params.items():
            grads[n].append(p.grad.detach().flatten().double().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def assert_bergson_sees_finetune_ids(run_dir, out):
    """Load the scored data the way bergson's own pipeline does and compare with the ids
    finetune.py builds for training."""
    from bergson.config.config import DataConfig, IndexConfig
    from bergson.utils.worker_utils import setup_data_pipeline

    from finetune import parse_args
    from pipeline import base_model_of_adapter, load_tokenizer, tokenize_split

    cfg = IndexConfig(run_path=str(out / "probe"), model=str(run_dir / "base_adapter"),
                      data=DataConfig(dataset=str(out / "bergson_data" / "train")),
                      token_batch_size=512)
    seen, _ = setup_data_pipeline(cfg)
    # finetune.py loads the base model's tokenizer and tokenizes with its --max-length
    defaults = parse_args(["train", "--manifest", "x"])
    tokenizer = load_tokenizer(base_model_of_adapter(run_dir / "base_adapter"))
    trained = tokenize_split(split_rows(run_dir, "train_base"), tokenizer, MAX_LEN)
    assert defaults.max_length >= MAX_LEN
    assert seen["input_ids"] == trained["input_ids"]
    assert seen["labels"] == trained["labels"]
    assert any(-100 in labels for labels in seen["labels"])


# ---------------------------------------------------------------------------------------------
# the runner as a process, and what it printed


def runner(recipe, run_dir, *args, expect_ok=True):
    """run_experiment.py as its own process (its steps, lock and signals are processes)."""
    return run_script("run_experiment.py", recipe, "--run-dir", run_dir, *args,
                      expect_ok=expect_ok, process=True)


def decisions(stdout: str) -> dict[str, str]:
    """'[runner] finetune@seed1: run (forced): ...' -> {'finetune@seed1': 'run (forced)'}"""
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"\[runner\] (\S+): (skip[^:]*|run[^:]*)", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has died; it waits for init to reap it


def wait_dead(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)
