"""Bad input, table-driven, across the scripts: every case ends with exit code 2, exactly one
`error:` line naming the file / split / column / flag at fault, and nothing left behind in the
case's folder (no output, no hidden temp folder). Cases run in-process (the scripts' main() under
pipeline.run_main), so the table stays fast; each case gets a fresh copy of a small run."""

import hashlib
import json
import os
import platform
import re
import shutil
import stat
from pathlib import Path

import pytest

import taboo_fixture
import tiny
from conftest import run_script

import pipeline


# ---------------------------------------------------------------------------------------------
# a small run every case starts from (copied per case)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("bad_input_template")
    source = tiny.write_jsonl(root / "chat.jsonl", tiny.smoltalk_rows(90, seed=5))
    run_script("dataset.py", "--run-dir", root / "run", "--dataset-name", source,
               "--group-column", "instruction_id", "--train-size", 30, "--query-size", 6,
               "--eval-size", 6, "--seed", 1)
    adapter = root / "run" / "base_adapter"   # enough for the checks that run before a load
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tiny_model), "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    scores = root / "run" / "scores"
    scores.mkdir()
    (scores / "summary.json").write_text(json.dumps({"train_split": "train_base"}))
    (scores / "train_scores.jsonl").write_text("")
    twin = root / "twin_run"     # the corrupted twin's case: scores of other content, same ids
    shutil.copytree(root / "run", twin, ignore=shutil.ignore_patterns("base_adapter"))
    (twin / "seed_1").mkdir()
    (twin / "scores" / "summary.json").write_text(json.dumps(
        {"train_split": "train_base", "train_fingerprint": "0" * 64}))
    (twin / "scores" / "train_scores.jsonl").write_text(
        json.dumps({"row_id": "x", "score": 1.0, "rank": 1}) + "\n")
    evals = root / "evals"
    evals.mkdir()
    rows = [{"row_id": f"r{i}", "finetuned_nll_sum": 2.0 + i, "supervised_tokens": 4}
            for i in range(6)]
    tiny.write_jsonl(evals / "a.per_example.jsonl", rows)
    tiny.write_jsonl(evals / "b.per_example.jsonl", rows)
    write_broken_sources(root)
    write_bad_manifests(root)
    write_bad_recipes(root)
    tiny.write_jsonl(evals / "dup.per_example.jsonl", rows + [rows[1]])
    tiny.write_jsonl(evals / "nofield.per_example.jsonl",
                     [{k: v for k, v in r.items() if k != "supervised_tokens"} for r in rows])
    write_score_folders(root)
    shutil.copytree(root / "good_scores", root / "list_scores")
    (root / "list_scores" / "summary.json").write_text("[]\n")    # JSON of the wrong shape
    truncated = root / "truncated_model"           # a model whose weights file was cut short
    shutil.copytree(tiny_model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (root / "report.json").write_text("{}")   # a report.json in the working directory
    (root / "run" / "scores" / pipeline.OUTPUT_STAMP).write_text('{"script": "score.py"}\n')
    foreign = root / "foreign"          # somebody else's folder: --overwrite must not touch it
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    return root


def write_score_folders(root: Path) -> None:
    """good_scores: score.py-shaped scores of the run's score_pool; twin_scores: the same row ids
    with the fingerprint of other content (the corrupted twin's scores)."""
    pool = pipeline.load_split(pipeline.load_manifest(root / "run" / "manifest.json"),
                               "score_pool")
    for name, fingerprint in (("good_scores", pipeline.split_fingerprint(pool)),
                              ("twin_scores", "sha256:" + "0" * 64)):
        folder = root / name
        folder.mkdir()
        tiny.write_jsonl(folder / "train_scores.jsonl", [
            {"row_id": row_id, "score": float(i), "rank": len(pool) - i, "num_tokens": 20,
             "num_supervised_tokens": 8} for i, row_id in enumerate(pool["row_id"])])
        (folder / "summary.json").write_text(json.dumps(
            {"train_split": "score_pool", "train_fingerprint": fingerprint}))


def write_broken_sources(root: Path) -> None:
    """One source file per row-level breakage, each in row 3."""
    breakages = {
        "content_int": lambda r: r["messages"][0].update(content=7),
        "content_list": lambda r: r["messages"][-1].update(content=["a", "b"]),
        "content_null": lambda r: r["messages"][0].update(content=None),
        "tokens_str": lambda r: r.update(conversation_tokens="12"),
        "reward_str": lambda r: r.update(reward_model_score="0.5"),
        "group_null": lambda r: r.update(instruction_id=None),
    }
    for name, breakage in breakages.items():
        rows = tiny.smoltalk_rows(90, seed=5)
        breakage(rows[3])
        tiny.write_jsonl(root / f"{name}.jsonl", rows)
    write_label_cases(root)


def write_label_cases(root: Path) -> None:
    """dataset.py's labels, types and messages: chat and Taboo sources broken in row 3, and a run
    folder another dataset.py run is writing."""
    breakages = {
        "category_dict": lambda r: r.update(category={"name": "math"}),
        "group_list": lambda r: r.update(instruction_id=[1, 2]),
        "messages_str": lambda r: r.update(messages=json.dumps(r["messages"])[:-3]),
    }
    for name, breakage in breakages.items():
        rows = tiny.smoltalk_rows(90, seed=5)
        breakage(rows[3])
        tiny.write_jsonl(root / f"{name}.jsonl", rows)
    # Taboo: only rows dataset.py keeps, so row 3 is one it reads to the end
    playable = [r for r in taboo_fixture.wordguesser_rows(seed=0)
                if r["meta"]["game"] == "taboo" and r["meta"]["game_role"] == "WordGuesser"
                and r["meta"]["outcome"] != "aborted"]
    taboo_breakages = {
        "taboo": lambda m: None,
        "taboo_no_target": lambda m: m.pop("target_word"),  # its (experiment, task_id) is a game
        "taboo_target_int": lambda m: m.update(target_word=7),
        "taboo_no_related": lambda m: m.pop("related_word"),
        "taboo_outcome_won": lambda m: m.update(outcome="won"),
    }
    for name, breakage in taboo_breakages.items():
        rows = [dict(r, meta=dict(r["meta"])) for r in playable]
        breakage(rows[3]["meta"])
        taboo_fixture.write_jsonl(root / f"{name}.jsonl", rows)
    taboo_fixture.write_instances(root / "instances.json")
    # a dataset.py run at work in busy_run: its staging folder, named by this (live) process
    stage = root / "busy_run" / f".dataset-stage.{os.getpid()}@{platform.node()}.a1b2c3.tmp"
    (stage / "data" / "train_base").mkdir(parents=True)


def write_bad_manifests(root: Path) -> None:
    folder = root / "bad_manifest"
    folder.mkdir()
    (folder / "list.json").write_text(json.dumps({"splits": [{"path": "x"}]}))
    (folder / "nopath.json").write_text(json.dumps({"splits": {"eval": {"num_rows": 3}}}))


def write_bad_recipes(root: Path) -> None:
    folder = root / "recipes"
    folder.mkdir()
    step = '[[steps]]\nname = "a"\nrun = "eval_loss.py --help"\noutputs = ["o.txt"]\n'
    (folder / "steps_table.toml").write_text(
        '[recipe]\nrun_dir = "r"\n[steps]\nname = "a"\nrun = "eval_loss.py --help"\n')
    (folder / "seeds_str.toml").write_text('[recipe]\nrun_dir = "r"\nseeds = ["one"]\n' + step)
    (folder / "missing_input.toml").write_text(
        '[recipe]\nrun_dir = "r"\n' + step + 'inputs = ["no_such_file.txt"]\n')


@pytest.fixture
def case_dir(template, tmp_path, monkeypatch):
    work = tmp_path / "case"
    shutil.copytree(template, work)
    monkeypatch.chdir(work)
    return work


def tree(root: Path) -> dict:
    """Every path under root (hidden ones too) with its content's sha256; folders as None."""
    return {str(p.relative_to(root)): (None if p.is_dir() else
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def run_case(script: str, argv) -> str:
    """One case in-process, in the case folder: exit 2 and exactly one error line."""
    result = run_script(script, *argv, expect_ok=False, cwd=Path.cwd())
    assert result.returncode == 2, result.stderr[-2000:]
    # ours: "error: ..."; argparse's usage errors: "<prog>: error: ..."
    lines = [line for line in result.stderr.strip().splitlines()
             if re.match(r"^([\w. -]+: )?error: ", line)]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the table: (script, argv, words the error line names); paths are relative to the case folder


M = "run/manifest.json"
ADAPTER = "run/base_adapter"
TABOO_SIZES = ["--train-size", 10, "--query-size", 3, "--eval-size", 3]

CASES = {
    # dataset.py
    "dataset: missing source file": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "nope.jsonl", "--train-size", 10],
        ["nope.jsonl"]),
    "dataset: sizes beyond the data": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "chat.jsonl", "--group-column",
                       "instruction_id", "--train-size", 900, "--query-size", 6,
                       "--eval-size", 6], ["train_base", "900"]),
    "dataset: run dir is a file": (
        "dataset.py", ["--run-dir", "chat.jsonl", "--dataset-name", "chat.jsonl",
                       "--group-column", "instruction_id", "--train-size", 10, "--query-size", 6,
                       "--eval-size", 6], ["chat.jsonl"]),
    "dataset: negative seed": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "chat.jsonl", "--seed", -3],
        ["--seed", "-3"]),
    "dataset: message content is an int": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "content_int.jsonl",
                       "--group-column", "instruction_id"], ["content_int.jsonl", "row 3",
                                                            "content of type int"]),
    "dataset: message content is a list": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "content_list.jsonl",
                       "--group-column", "instruction_id"], ["row 3", "content of type list"]),
    "dataset: null content in a user turn": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "content_null.jsonl",
                       "--group-column", "instruction_id"], ["row 3", "NoneType"]),
    "dataset: conversation_tokens is a string": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "tokens_str.jsonl",
                       "--group-column", "instruction_id"], ["row 3", "conversation_tokens"]),
    "dataset: reward is a string": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "reward_str.jsonl",
                       "--group-column", "instruction_id"], ["row 3", "reward_model_score"]),
    "dataset: null group": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "group_null.jsonl",
                       "--group-column", "instruction_id"], ["instruction_id"]),
    # manifests
    "manifest: splits is a list": (
        "eval_loss.py", ["--manifest", "bad_manifest/list.json", "--output-json", "e.json"],
        ["bad_manifest/list.json", "splits"]),
    "manifest: split without a path": (
        "eval_loss.py", ["--manifest", "bad_manifest/nopath.json", "--output-json", "e.json"],
        ["bad_manifest/nopath.json", "eval", "path"]),
    "manifest: not JSON": (
        "eval_loss.py", ["--manifest", "chat.jsonl", "--output-json", "e.json"],
        ["chat.jsonl", "not valid JSON"]),
    # compare_evals.py
    "compare: duplicated row_id": (
        "compare_evals.py", ["--a", "evals/dup.per_example.jsonl", "--b",
                             "evals/b.per_example.jsonl", "--output-json", "c.json"],
        ["dup.per_example.jsonl", "r1"]),
    "compare: missing field": (
        "compare_evals.py", ["--a", "evals/nofield.per_example.jsonl", "--b",
                             "evals/b.per_example.jsonl", "--output-json", "c.json"],
        ["nofield.per_example.jsonl"]),
    "compare: --bootstrap 0": (
        "compare_evals.py", ["--a", "evals/a.per_example.jsonl", "--b",
                             "evals/b.per_example.jsonl", "--bootstrap", 0,
                             "--output-json", "c.json"], ["--bootstrap"]),
    # run_experiment.py
    "runner: steps as a table": (
        "run_experiment.py", ["recipes/steps_table.toml", "--dry-run"], ["steps_table.toml"]),
    "runner: non-integer seeds": (
        "run_experiment.py", ["recipes/seeds_str.toml", "--dry-run"],
        ["seeds_str.toml", "seeds"]),
    "runner: missing declared input": (
        "run_experiment.py", ["recipes/missing_input.toml", "--dry-run"],
        ["no_such_file.txt"]),
    # finetune.py (the data-loss cases: the checkout and a run folder must survive)
    "finetune: output is the working directory": (
        "finetune.py", ["train", "--manifest", M, "--output-dir", ".", "--overwrite"],
        ["--output-dir", "working directory"]),
    "finetune: output is the run folder holding the manifest": (
        "finetune.py", ["train", "--manifest", M, "--output-dir", "run", "--overwrite"],
        ["run", "holds the input"]),
    "finetune: foreign folder with --overwrite": (
        "finetune.py", ["train", "--manifest", M, "--output-dir", "foreign", "--overwrite"],
        ["foreign", "not written by finetune.py"]),
    "finetune: negative seed": (
        "finetune.py", ["train", "--manifest", M, "--seed", -1], ["--seed"]),
    # score.py
    "score: --scores-from into the working directory": (
        "score.py", ["--manifest", M, "--scores-from", "run/scores", "--output-dir", ".",
                     "--overwrite"], ["working directory"]),
    "score: output is the run folder": (
        "score.py", ["--manifest", M, "--scores-from", "run/scores", "--output-dir", "run",
                     "--overwrite"], ["run", "holds the input"]),
    "score: --arms without --scores-from": (
        "score.py", ["--manifest", M, "--arms", "attribution", "--output-dir", "arms"],
        ["--arms", "--scores-from"]),
    # report.py
    "report: scores of other content than the manifest's pool": (
        "report.py", ["--run-dir", "twin_run", "--output-dir", "rep"],
        ["twin_run/scores/summary.json", "train_fingerprint", "do not belong"]),
    # eval_loss.py
    "eval_loss: output json is a folder": (
        "eval_loss.py", ["--manifest", M, "--adapter-path", ADAPTER, "--output-json", "run"],
        ["--output-json", "run", "folder"]),
    "eval_loss: missing split": (
        "eval_loss.py", ["--manifest", M, "--adapter-path", ADAPTER, "--eval-split", "nope",
                         "--output-json", "out/e.json"], ["nope"]),
    "eval_loss: missing adapter": (
        "eval_loss.py", ["--manifest", M, "--adapter-path", "no_adapter",
                         "--output-json", "out/e.json"], ["no_adapter"]),
    "eval_loss: missing manifest": (
        "eval_loss.py", ["--manifest", "nope/manifest.json", "--output-json", "out/e.json"],
        ["nope/manifest.json"]),
    "eval_loss: missing local base model": (
        "eval_loss.py", ["--manifest", M, "--base-model", "./models/none",
                         "--output-json", "out/e.json"], ["./models/none", "does not exist"]),
    # eval_words.py
    "eval_words: output json is a folder": (
        "eval_words.py", ["--manifest", M, "--base-model", "x/y", "--output-json", "run"],
        ["--output-json", "run"]),
    "eval_words: split without target words": (
        "eval_words.py", ["--manifest", M, "--base-model", "x/y", "--eval-split", "eval",
                          "--output-json", "out/w.json"], ["target_word", "eval"]),
    # train_sae.py
    "train_sae: output is the working directory": (
        "train_sae.py", ["--manifest", M, "--layer", 0, "--output-dir", ".", "--overwrite"],
        ["--output-dir", "working directory"]),
    "train_sae: foreign folder with --overwrite": (
        "train_sae.py", ["--manifest", M, "--layer", 0, "--output-dir", "foreign",
                         "--overwrite"], ["foreign", "not written by train_sae.py"]),
    "train_sae: output holds the manifest": (
        "train_sae.py", ["--manifest", M, "--layer", 0, "--output-dir", "run", "--overwrite"],
        ["run", "holds the input"]),
    "train_sae: non-empty output without --overwrite": (
        "train_sae.py", ["--manifest", M, "--layer", 0, "--output-dir", "foreign"],
        ["foreign", "--overwrite"]),
    # train_bidir_classifier.py
    "predictor: output root is the working directory": (
        "train_bidir_classifier.py", ["--manifest", M, "--scores-from", "run/scores",
                                      "--output-root", ".", "--overwrite"],
        ["--output-root", "working directory"]),
    "predictor: output root holds the scores": (
        "train_bidir_classifier.py", ["--manifest", M, "--scores-from", "run/scores",
                                      "--output-root", "run", "--overwrite"],
        ["run", "holds the input"]),
    "predictor: missing scores": (
        "train_bidir_classifier.py", ["--manifest", M, "--scores-from", "no_scores",
                                      "--output-root", "pred"], ["no_scores"]),
    "predictor: empty score file": (
        "train_bidir_classifier.py", ["--manifest", M, "--scores-from", "run/scores",
                                      "--output-root", "pred"], ["train_scores.jsonl", "empty"]),
    "predictor: bad --alphas": (
        "train_bidir_classifier.py", ["--manifest", M, "--alphas", "a,b", "--output-root",
                                      "pred"], ["--alphas"]),
    # sae_analysis.py
    "sae_analysis: missing SAE folder": (
        "sae_analysis.py", ["--manifest", M, "--sae-path", "no_sae", "--output-dir", "feat"],
        ["--sae-path", "no_sae"]),
    "sae_analysis: missing adapter": (
        "sae_analysis.py", ["--manifest", M, "--adapter-path", "no_adapter", "--output-dir",
                            "feat"], ["no_adapter"]),
    "sae_analysis: --max-length 0 (old spelling)": (
        "sae_analysis.py", ["--manifest", M, "--max-tokens", 0], ["--max-length"]),
    # rank_windows.py
    "rank_windows: missing scores": (
        "rank_windows.py", ["--scores-from", "no_scores", "--output", "abl/manifest.json",
                            "--top", 3], ["no_scores"]),
    # outputs that are inputs, or another script's: one check (pipeline.check_output_place)
    "report: --output-dir . beside a report.json": (
        "report.py", ["--run-dir", "run", "--output-dir", "."], ["--output-dir", "working directory"]),
    "report: --output-dir is the run folder": (
        "report.py", ["--run-dir", "run", "--output-dir", "run"], ["run", "is the input"]),
    "eval_loss: --output-json is the manifest": (
        "eval_loss.py", ["--manifest", M, "--adapter-path", ADAPTER, "--output-json", M],
        [M, "is the input"]),
    "compare_evals: --output-json is its --a file": (
        "compare_evals.py", ["--a", "evals/a.per_example.jsonl", "--b", "evals/b.per_example.jsonl",
                             "--output-json", "evals/a.per_example.jsonl"],
        ["evals/a.per_example.jsonl", "is the input"]),
    "compare_evals: --output-json is the run's manifest": (
        "compare_evals.py", ["--a", "evals/a.per_example.jsonl", "--b", "evals/b.per_example.jsonl",
                             "--output-json", M], [M, "written by dataset.py"]),
    "compare_evals: --output-json inside score.py's folder": (
        "compare_evals.py", ["--a", "evals/a.per_example.jsonl", "--b", "evals/b.per_example.jsonl",
                             "--output-json", "run/scores/summary.json"],
        ["run/scores", "score.py wrote"]),
    "sae_analysis: --output-dir is score.py's folder": (
        "sae_analysis.py", ["--manifest", M, "--output-dir", "run/scores", "--overwrite"],
        ["run/scores", "not written by sae_analysis.py"]),
    "rank_windows: --output inside its --scores-from": (
        "rank_windows.py", ["--scores-from", "good_scores", "--output", "good_scores/m.json",
                            "--top", 3], ["good_scores", "inside the input"]),
    "generator: --output-dir is score.py's folder": (
        "generate_synthetic_openrouter.py", ["--output-dir", "run/scores", "--describer-model", "d",
                                             "--guesser-models", "g"],
        ["run/scores", "not written by generate_synthetic_openrouter.py"]),
    "bench: --output-dir is the working directory": (
        "benchmarks/bench.py", ["--manifest", M, "--base-model", "m", "--output-dir", "."],
        ["working directory"]),
    "score_variants: --output-dir is a variant's folder": (
        "benchmarks/score_variants.py", ["--manifest", M, "--variant", "a=good_scores",
                                         "--output-dir", "good_scores"], ["good_scores", "input"]),
    "dataset: --run-dir is score.py's folder": (
        "dataset.py", ["--run-dir", "run/scores", "--dataset-name", "chat.jsonl", "--train-size",
                       10], ["run/scores", "score.py wrote"]),
    # score files of other content than the pool (same row ids): refused like --scores-from
    "score: --arm-scores of a corrupted twin": (
        "score.py", ["--manifest", M, "--scores-from", "good_scores", "--arms", "attribution,twin",
                     "--arm-scores", "twin=twin_scores", "--subset-k", 3, "--output-dir", "arms"],
        ["twin_scores", "train_fingerprint"]),
    # files of the wrong shape or cut short: one line, not a traceback
    "score: --scores-from summary.json holding a list": (
        "score.py", ["--manifest", M, "--scores-from", "list_scores", "--subset-k", 3,
                     "--output-dir", "redrawn"], ["list_scores/summary.json", "JSON list"]),
    # prepare_model.py
    "prepare_model: missing GGUF": (
        "prepare_model.py", ["--gguf", "none.gguf", "--output-dir", "model"], ["none.gguf"]),
    "prepare_model: output is the working directory": (
        "prepare_model.py", ["--gguf", "chat.jsonl", "--output-dir", ".", "--overwrite"],
        ["working directory"]),
    "prepare_model: foreign folder with --overwrite": (
        "prepare_model.py", ["--gguf", "chat.jsonl", "--output-dir", "foreign", "--overwrite"],
        ["not written by prepare_model.py"]),
    # dataset.py: labels, types, messages
    "dataset: taboo target word from an instances file": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo_no_target.jsonl", "--instances", "instances.json", *TABOO_SIZES],
        ["--instances", "meta.target_word"]),
    "dataset: taboo row without its target word": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo_no_target.jsonl", *TABOO_SIZES],
        ["taboo_no_target.jsonl", "split 'train' row 3", "no meta.target_word",
         "never looked up"]),
    "dataset: taboo target word is not a string": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo_target_int.jsonl", *TABOO_SIZES],
        ["taboo_target_int.jsonl", "row 3", "meta.target_word", "not a string"]),
    "dataset: taboo row without related words": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo_no_related.jsonl", *TABOO_SIZES],
        ["taboo_no_related.jsonl", "row 3", "meta.related_word"]),
    "dataset: taboo outcome unknown": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo_outcome_won.jsonl", *TABOO_SIZES],
        ["taboo_outcome_won.jsonl", "row 3", "meta.outcome", "'won'", "success, lose"]),
    "dataset: taboo unknown outcome to drop": (
        "dataset.py", ["--task", "taboo", "--run-dir", "new", "--dataset-name",
                       "taboo.jsonl", "--taboo-drop-outcomes", "abortd",
                       *TABOO_SIZES], ["--taboo-drop-outcomes", "abortd"]),
    "dataset: category is a dict": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "category_dict.jsonl",
                       "--group-column", "instruction_id"],
        ["category_dict.jsonl", "row 3", "column category is a dict"]),
    "dataset: group id is a list": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "group_list.jsonl",
                       "--group-column", "instruction_id"],
        ["group_list.jsonl", "row 3", "column instruction_id is a list"]),
    "dataset: a filter drops every row": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "chat.jsonl", "--group-column",
                       "instruction_id", "--max-conversation-tokens", 1],
        ["chat.jsonl", "dropped every row", "dropped_too_long 90",
         "--max-conversation-tokens 1"]),
    "dataset: messages is a string but not JSON": (
        "dataset.py", ["--run-dir", "new", "--dataset-name", "messages_str.jsonl",
                       "--group-column", "instruction_id"],
        ["messages_str.jsonl", "row 3", "column messages", "not a JSON list"]),
    "dataset: second run on a folder another run is writing": (
        "dataset.py", ["--run-dir", "busy_run", "--dataset-name", "chat.jsonl",
                       "--group-column", "instruction_id", "--train-size", 30, "--query-size", 6,
                       "--eval-size", 6], ["--run-dir busy_run", "another dataset.py run"]),
    "dataset: run dir is the working directory": (
        "dataset.py", ["--run-dir", ".", "--dataset-name", "chat.jsonl", "--group-column",
                       "instruction_id", "--train-size", 30, "--query-size", 6, "--eval-size", 6,
                       "--overwrite"], ["--run-dir .", "working directory"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_case(name, case_dir):
    script, argv, words = CASES[name]
    before = tree(case_dir)
    line = run_case(script, argv)
    for word in words:
        assert str(word) in line, f"{name}: {line!r} does not name {word!r}"
    assert tree(case_dir) == before, f"{name}: the case left something behind"


def test_unwritable_output_places_are_refused_before_work(case_dir):
    """A parent that is a file, and (as a non-root user) a read-only folder."""
    line = run_case("eval_loss.py", ["--manifest", M, "--adapter-path", ADAPTER,
                                     "--output-json", "chat.jsonl/e.json"])
    assert "cannot be written" in line and "chat.jsonl" in line
    line = run_case("train_sae.py", ["--manifest", M, "--layer", 0, "--output-dir",
                                     "chat.jsonl/sae"])
    assert "cannot be written" in line
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = case_dir / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            line = run_case("eval_loss.py", ["--manifest", M, "--adapter-path", ADAPTER,
                                             "--output-json", "locked/e.json"])
            assert "cannot be written" in line
        finally:
            locked.chmod(0o755)


def test_check_output_dir_never_takes_an_ancestor_of_the_working_directory(case_dir):
    inner = case_dir / "run" / "seed_1"
    inner.mkdir()
    os.chdir(inner)
    for target in (inner, case_dir / "run", case_dir):
        with pytest.raises(pipeline.PipelineError, match="working directory"):
            pipeline.check_output_dir(target, True, "finetune.py")
    assert (case_dir / "run" / "manifest.json").is_file()


def test_overwrite_replaces_only_the_same_scripts_folder(case_dir):
    out = case_dir / "out"
    with pipeline.staged_output(out, "score.py") as staged:
        (staged / "a.txt").write_text("1")
    assert pipeline.output_writer(out) == "score.py"
    pipeline.check_output_dir(out, True, "score.py")        # same script: allowed
    with pytest.raises(pipeline.PipelineError, match="written by score.py"):
        pipeline.check_output_dir(out, True, "finetune.py")
    with pytest.raises(RuntimeError):                       # a failure leaves no temp folder
        with pipeline.staged_output(out, "score.py") as staged:
            (staged / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in case_dir.iterdir() if p.name.startswith(".")) == []
    assert (out / "a.txt").read_text() == "1" and not (out / "b.txt").exists()


def test_a_write_the_machine_refuses_is_one_error_line(capsys):
    """A full or read-only disk (or no permission) mid-run: exit 2 and one line naming the file,
    not a traceback; an OSError of the code's own making still raises."""
    import errno

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "run/scores/train_scores.jsonl")

    with pytest.raises(SystemExit) as stop:
        pipeline.run_main(full_disk)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: No space left on device (run/scores/train_scores.jsonl)")

    def bug():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        pipeline.run_main(bug)


def test_truncated_weights_are_one_error_line(case_dir):
    """A model or adapter whose weights file was cut short: PipelineError naming the folder (the
    loaders every script uses), not safetensors' own exception."""
    import torch

    with pytest.raises(pipeline.PipelineError, match="cannot load model truncated_model"):
        pipeline.load_base_model("truncated_model", torch.float32, torch.device("cpu"))
