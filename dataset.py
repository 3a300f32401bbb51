"""Build the experiment's splits and runs/<run>/manifest.json from a SmolTalk-shaped chat source,
or (--task taboo) from playpen-style Taboo game transcripts.

Splits written under <run-dir>/data/:
  train_base  the training pool: the base adapter trains on it and attribution ranks its rows
  score_pool  the rows attribution scores and the SAE step reads: the same rows (and the same
              folder) as train_base, named separately so later steps say what they read
  attr_query  the query set whose gradients define "useful" for attribution
  eval        held-out rows for eval loss

A source with a `test` split gives attr_query/eval from it and train_base from `train`. A source
without one (a single JSONL, say) has attr_query and eval carved out by whole groups of
--group-column, so no group (e.g. one instruction answered by ten models) is in two splits.

--task taboo reads playpen-style rows: `messages` (the player's view of one episode) and `meta`
(game, game_role, experiment, task_id, outcome, model, target_word, related_word). It keeps one
game and role (default: taboo, WordGuesser), drops aborted episodes and those with
meta.special_token_leak (counted in filter_stats), and always carves attr_query and eval out by
whole target words: no eval word is a target in train_base or attr_query, and attr_query shares no
word with train_base either. Episodes of a --taboo-train-versions source (default: the 12 v2.0
words of the 809-episode file's second source) stay together in train_base. With --whole-words the
held-out sizes are minimums and every episode of a drawn word is kept (the 809-episode file:
--eval-size 150 gives ~12 eval words); the manifest's `taboo` block lists words, episodes and
outcomes per split. --text-format flat renders every row as the seed did (see --help). Columns are the chat path's plus
target_word and related_words, mapped as
  category            = meta.experiment (e.g. high_en; the strata of the sampling)
  difficulty          = the experiment's frequency level (high / medium / low)
  quality             = meta.outcome, lower-cased: one of taboo.OUTCOMES (success, lose,
                        failure, aborted; "Success" is success); any other value is refused
  reward_model_score  = 1.0 for outcome success, 0.0 for any other outcome (a row without
                        meta.outcome or meta.experiment is an error, see "Null values")
  conversation_tokens = the row's conversation_tokens when present, else a cheap proxy:
                        whitespace-separated words over all turns (no tokenizer involved)
  group_id            = {category}::{difficulty}::{source split}::g{target word}
A row's labels are its own: target_word = meta.target_word, related_words = meta.related_word
(the taboo words the clue check judges clues by; [] for a game without any). A row whose target
word is missing, blank or not a string, or whose related words are missing or not a list of
words, is refused (or dropped and counted with --drop-bad-rows); neither is ever filled in from
elsewhere. An instances file looked up by (experiment, task_id) may be another clembench
version's, whose word for that game differs: its words would land in train and eval at once with
every check passing, so dataset.py reads no instances file (the flag that named one is refused;
fill meta.target_word from the file the games were played with before running dataset.py).
--min-reward-model-score 1 keeps only won games.

--corrupt-fraction F plants a known signal for attribution to find: after train_base is sampled,
exactly round(F * len(train_base)) of its rows (chosen with numpy default_rng(--corrupt-seed),
independent of the sampling draws, so train_base holds the same rows with or without corruption)
get the completion of another chosen row. Method "derangement": the chosen rows are put in a seeded
random cycle and each takes the completion of the next one, repaired by seeded swaps until every
row's donor has a different group_id, a different prompt and a different completion text. So no
row keeps its own answer, no row gets a group-mate's answer (with --group-column: the same
instruction answered by another model), and the multiset of completion texts in train_base is
unchanged: only the prompt-completion pairing is broken. Columns `corrupted` (bool) and
`corrupted_from_row_id` (donor row_id, else None) are added to every split when F > 0 (attr_query
and eval: always False / None; they are never corrupted); score_pool is train_base's folder, so it
is corrupted identically. The manifest's `corruption` entry records fraction, seed, count, method.
With F = 0 (default) nothing changes: no columns, no manifest entry.

Labels and types: a group key, category, difficulty or quality (with --task taboo
meta.experiment) must be a string or a number, not a dict or list (whose str() would become a
group or stratum of its own); a whole float is the int it equals, so instruction_id 5 and 5.0
are one group, not two that land in two splits. `messages` stored as a JSON string is parsed
(counted as messages_parsed_from_json_string); a string that is not a JSON list of messages is a
bad row. A row that breaks these is refused, naming it, or dropped with --drop-bad-rows. When the
filters leave no row at all, the error names each filter and how many rows it dropped.

Null values: a row whose --group-column, category or reward_model_score is null, empty or NaN
(with --task taboo: meta.experiment or meta.outcome, their sources) stops the run with one error
naming the column and how many rows have it, since such rows would all fall into one group or
category "None" (one group spread over train and held-out splits) or slip past
--min-reward-model-score; --drop-null-groups drops them instead and counts them.

Writing: the whole run (data/<split> for every split, and manifest.json) is first written into a
staging folder <run-dir>/.dataset-stage.<pid>@<host>.<random>.tmp, then swapped in by renames:
the old manifest.json and data/ are moved aside, the new ones moved in, manifest last, and the
old ones deleted. A failure (a bad row in the last split, SIGTERM, Ctrl-C) before the swap
leaves the old run as it was and removes the staging folder; one killed outright leaves the
staging folder, which the next dataset.py run on the same --run-dir removes (its process is
gone). data/ belongs to dataset.py: it is replaced whole, so a data/ holding anything but split
folders is refused. The staging folder is made before the source is read and doubles as the
run's claim on --run-dir: a run that finds another live dataset.py run's staging folder there
stops (of two runs started at once, at most one goes on), so a later run never silently replaces
an earlier one's manifest; after the claim, an existing manifest.json still needs --overwrite.
--run-dir may not be the working directory or a folder above it.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import (MANIFEST_SCHEMA_VERSION, PipelineError, SPLIT_COLUMNS, TEXT_FORMATS,
                      provenance, refuse_working_directory, relative_to, run_main, seed_type,
                      stamped_owner, write_json_atomic)
from taboo import (OUTCOMES, frequency_level, normalize_outcome, normalize_word, parse_guess,
                   same_word)

METADATA_COLUMNS = ["category", "difficulty", "quality", "reward_model_score"]
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# per --task: (run dir, dataset name, dataset config) when the flags are not given
TASK_DEFAULTS = {
    "chat": ("runs/smoltalk_v1", "HuggingFaceTB/smoltalk", "smol-magpie-ultra"),
    "taboo": ("runs/taboo_v1", "colab-potsdam/playpen-data", None),
}
TABOO_COLUMNS = ["target_word", "related_words"]
SPLIT_FOLDERS = ("train_base", "attr_query", "eval")  # what data/ holds (score_pool = train_base)
STAGE_PREFIX = ".dataset-stage."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="chat",
                   help="chat: SmolTalk-shaped rows; taboo: playpen-style Taboo transcripts, "
                        "split by target word (default: chat)")
    p.add_argument("--run-dir", default=None,
                   help="output folder: manifest.json and data/<split>/ (default: "
                        "runs/smoltalk_v1; with --task taboo runs/taboo_v1)")
    p.add_argument("--dataset-name", default=None,
                   help="hub dataset name, or a local file (.jsonl, .jsonl.gz, .json, .parquet) "
                        "or a datasets.save_to_disk folder (default: HuggingFaceTB/smoltalk; "
                        "with --task taboo colab-potsdam/playpen-data)")
    p.add_argument("--dataset-config", default=None,
                   help="hub dataset config; ignored for local sources (default: "
                        "smol-magpie-ultra; with --task taboo none)")
    p.add_argument("--train-size", type=int, default=8000, help="rows in train_base (default: 8000)")
    p.add_argument("--query-size", type=int, default=500, help="rows in attr_query (default: 500)")
    p.add_argument("--eval-size", type=int, default=500, help="rows in eval (default: 500)")
    p.add_argument("--seed", type=seed_type, default=42, help="sampling seed (default: 42)")
    p.add_argument("--max-conversation-tokens", type=int, default=2000,
                   help="drop rows whose conversation_tokens exceed this (default: 2000)")
    p.add_argument("--min-reward-model-score", type=float, default=None,
                   help="drop rows with a lower (or missing) reward_model_score (default: off)")
    p.add_argument("--group-column", default=None,
                   help="for a source without a test split: column whose groups are kept whole "
                        "when attr_query/eval are carved out (e.g. instruction_id). Required then.")
    p.add_argument("--drop-null-groups", action="store_true",
                   help="drop rows whose --group-column, category or reward_model_score is null, "
                        "empty or NaN (with --task taboo: meta.experiment, meta.outcome) and count "
                        "them, instead of stopping")
    p.add_argument("--drop-bad-rows", action="store_true",
                   help="drop rows that cannot be flattened (no messages, final turn not from the "
                        "assistant, empty completion) or carry a value of the wrong type (a dict "
                        "as category or group; with --task taboo also no readable meta, a "
                        "missing, blank or non-string meta.target_word, missing "
                        "meta.related_word, an unknown meta.outcome) and count them, instead of "
                        "stopping")
    taboo = p.add_argument_group("--task taboo")
    # gone: a target looked up by (experiment, task_id) may be another clembench version's word
    taboo.add_argument("--instances", default=None, help=argparse.SUPPRESS)
    taboo.add_argument("--taboo-game", default="taboo", help="keep rows of this meta.game "
                                                              "(default: %(default)s)")
    taboo.add_argument("--taboo-role", default="WordGuesser",
                       help="keep rows of this meta.game_role (default: %(default)s)")
    taboo.add_argument("--taboo-drop-outcomes", default="aborted",
                       help="comma-separated meta.outcome values to drop, of "
                            f"{', '.join(OUTCOMES)} (any case); '' keeps all "
                            "(default: %(default)s)")
    taboo.add_argument("--taboo-train-versions", default="paulutsch-playpen-eval",
                       help="comma-separated meta.clembench_version values whose episodes stay "
                            "together in train_base, never held out (default: %(default)s, the "
                            "12 clembench v2.0 words of the second source of the 809-episode "
                            "file; '' = none)")
    taboo.add_argument("--whole-words", action="store_true",
                       help="--query-size and --eval-size are minimums: whole target words go "
                            "to attr_query, then eval, until each holds at least that many "
                            "episodes, every episode of a held-out word is kept, and train_base "
                            "is every other episode (--train-size is then not used)")
    p.add_argument("--text-format", choices=TEXT_FORMATS, default="chat",
                   help="how every later step renders a row, recorded per row (column "
                        "text_format) and in the manifest: chat = the tokenizer's chat template; "
                        "flat = the seed's Taboo format, each turn 'ROLE: content', turns joined "
                        "by blank lines, no template (pipeline.tokenize_example; default: chat)")
    corrupt = p.add_argument_group("planted signal (see above)")
    corrupt.add_argument("--corrupt-fraction", type=float, default=0.0,
                         help="fraction of train_base rows whose completion is swapped with "
                              "another train_base row's, in [0, 1] (default: 0 = off)")
    corrupt.add_argument("--corrupt-seed", type=seed_type, default=None,
                         help="seed of the corruption draws (default: --seed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --run-dir (its manifest.json and data/, "
                        "swapped in one step once the new run is complete)")
    args = p.parse_args(argv)
    if not 0.0 <= args.corrupt_fraction <= 1.0:
        p.error("--corrupt-fraction must be in [0, 1]")
    if args.corrupt_seed is None:
        args.corrupt_seed = args.seed
    for flag in ("train_size", "query_size", "eval_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    run_dir, dataset_name, dataset_config = TASK_DEFAULTS[args.task]
    args.run_dir = args.run_dir or run_dir
    args.dataset_name = args.dataset_name or dataset_name
    if args.dataset_config is None:
        args.dataset_config = dataset_config
    if args.whole_words and args.task != "taboo":
        p.error("--whole-words is for --task taboo")
    if args.instances is not None:
        p.error("--instances is no longer read: a target word looked up by (experiment, "
                "task_id) may be another clembench version's; every row must carry its own "
                "meta.target_word and meta.related_word (fill them from the instances file the "
                "games were played with, then run without --instances)")
    if args.task == "taboo":
        if args.group_column:
            p.error("--group-column is fixed to the target word with --task taboo")
        args.group_column = "target_word"
        given = [o.strip() for o in args.taboo_drop_outcomes.split(",") if o.strip()]
        args.taboo_drop_outcomes = [normalize_outcome(o) for o in given]
        unknown = [o for o, known in zip(given, args.taboo_drop_outcomes) if known is None]
        if unknown:
            p.error(f"--taboo-drop-outcomes {unknown[0]!r} is not a Taboo outcome (one of "
                    f"{', '.join(OUTCOMES)}, any case)")
        args.taboo_train_versions = [v.strip() for v in args.taboo_train_versions.split(",")
                                     if v.strip()]
    return args


# ---------------------------------------------------------------------------------------------
# reading the source


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PipelineError(f"{path}: line {line_number} is not valid JSON ({err.msg})")
                if not isinstance(row, dict):
                    raise PipelineError(f"{path}: line {line_number} is not a JSON object")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot be read ({err})")
    return rows


def read_local_source(path: Path) -> dict[str, list[dict]]:
    """{source split name: rows}. Files hold one split, 'train'; saved folders keep theirs."""
    name = path.name
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except Exception as err:
            raise PipelineError(f"{path}: not a datasets.save_to_disk folder ({err})")
        if isinstance(loaded, Dataset):
            return {"train": loaded.to_list()}
        assert isinstance(loaded, DatasetDict)
        return {split: ds.to_list() for split, ds in loaded.items()}
    if not path.exists():
        raise PipelineError(f"dataset file {path} does not exist")
    if name.endswith((".jsonl", ".jsonl.gz")):
        rows = read_jsonl(path)
    elif name.endswith(".json"):
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: line {err.lineno} is not valid JSON ({err.msg})")
        if isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values()):
            return {split: list(v) for split, v in loaded.items()}
        if not isinstance(loaded, list):
            raise PipelineError(f"{path}: expected a JSON list of rows or {{split: rows}}")
        rows = loaded
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:
            raise PipelineError(f"{path}: cannot be read as parquet ({err})")
    else:
        raise PipelineError(f"{path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)} "
                            "or a save_to_disk folder)")
    if not rows:
        raise PipelineError(f"{path}: holds no rows")
    return {"train": rows}


def read_source(dataset_name: str, dataset_config: str | None) -> tuple[dict[str, list[dict]], str]:
    path = Path(dataset_name)
    if path.exists() or dataset_name.endswith(LOCAL_SUFFIXES):
        return read_local_source(path), str(path.resolve())
    from datasets import load_dataset

    try:
        loaded = load_dataset(dataset_name, dataset_config)
    except Exception as err:
        raise PipelineError(f"cannot load hub dataset {dataset_name} ({dataset_config}): "
                            f"{str(err).splitlines()[0]} (offline? pass a local file instead)")
    return {split: ds.to_list() for split, ds in loaded.items()}, dataset_name


# ---------------------------------------------------------------------------------------------
# flattening: prompt = turns before the final assistant turn, completion = that turn


def flatten_row(row: dict) -> tuple[list[dict] | None, str | None, str | None]:
    """(prompt messages, completion, None) or (None, None, reason it cannot be flattened)."""
    messages = row.get("messages")
    if isinstance(messages, str):
        # some exports store the list as a JSON string (as they do meta, see taboo_meta)
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            messages = None
        if not isinstance(messages, list):
            return None, None, ("column messages is a string but not a JSON list of messages "
                                f"({row['messages']!r:.40})")
    if messages is None or messages == []:
        return None, None, "missing or empty messages"
    if not isinstance(messages, list):
        return None, None, (f"column messages is a {type(messages).__name__}, not a list of "
                            "messages")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return None, None, "a message without role/content"
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                return None, None, (f"message {number} has a {key} of type "
                                    f"{type(message[key]).__name__}, not a string")
    if messages[-1]["role"] != "assistant":
        return None, None, f"final turn is from '{messages[-1]['role']}', not the assistant"
    completion = messages[-1]["content"]
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if not any(m["role"] == "user" for m in prompt):
        return None, None, "no user turn before the final assistant turn"
    if not isinstance(completion, str) or not completion.strip():
        return None, None, "empty final assistant turn"
    return prompt, completion, None


def metadata_type_problem(row: dict) -> str | None:
    """Numbers must be numbers: a string reward or token count would compare and sort wrongly."""
    for column, kinds, what in (("conversation_tokens", (int,), "a whole number"),
                                ("reward_model_score", (int, float), "a number")):
        value = row.get(column)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            return f"column {column} is {type(value).__name__} {value!r:.40}, not {what}"
    return None


def label_text(value) -> str:
    """The one text form of a group key or stratum: an id written as 5 in one row and 5.0 in
    another (JSON writers differ) is one group, not two that can land in two splits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_problem(values: dict) -> str | None:
    """Group keys and strata ({column label: value}) must be strings or numbers: str() of a dict
    or list would be a group or category named after it. Nulls are NullValues' to judge."""
    for column, value in values.items():
        if value is not None and not isinstance(value, (str, int, float)):
            return (f"column {column} is a {type(value).__name__} ({value!r:.40}), not a string "
                    "or number")
    return None


def is_null(value) -> bool:
    """None, a blank string or NaN: values that str() would turn into one fake group 'None' /
    'nan', and that no comparison with --min-reward-model-score can judge."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


class NullValues:
    """Rows with a null group, category or reward: counted per column over the whole source, so
    the error names every such column and how many rows have it."""

    def __init__(self, source_label: str, drop: bool):
        self.source_label, self.drop = source_label, drop
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def found(self, values: dict, where: str, counts: Counter) -> bool:
        """True if the row has a null among values ({column label: value}); counts it."""
        null = [column for column, value in values.items() if is_null(value)]
        for column in null:
            self.counts[column] += 1
            self.first.setdefault(column, where)
        if null and self.drop:
            counts["dropped_null_values"] += 1
            for column in null:
                counts[f"null_{column}"] += 1
        return bool(null)

    def check(self) -> None:
        if self.drop or not self.counts:
            return
        parts = [f"'{column}' in {n} row(s) (first: {self.first[column]})"
                 for column, n in self.counts.items()]
        raise PipelineError(f"{self.source_label}: null, empty or NaN values in {'; '.join(parts)}"
                            "; such rows would form one group or category 'None' or pass "
                            "--min-reward-model-score unjudged (fix the data, or pass "
                            "--drop-null-groups to drop them)")


def below_min_reward(reward, minimum: float | None) -> bool:
    # `not >=` rather than `<`: NaN compares False both ways, and must never pass
    return minimum is not None and (reward is None or not reward >= minimum)


def add_filter_totals(stats: dict, args) -> None:
    """Counts summed over the source splits, and the filters that produced them."""
    totals = Counter()
    for counts in stats["per_source_split"].values():
        totals.update(counts)
    stats["total"] = dict(totals)
    stats["max_conversation_tokens"] = args.max_conversation_tokens
    stats["min_reward_model_score"] = args.min_reward_model_score


def drop_cause(counter: str, args) -> str:
    """The flag or field behind a filter_stats drop counter."""
    causes = {
        "dropped_too_long": f"--max-conversation-tokens {args.max_conversation_tokens}",
        "dropped_reward": f"--min-reward-model-score {args.min_reward_model_score}",
        "dropped_null_values": "--drop-null-groups",
        "dropped_other_game": f"--taboo-game {args.taboo_game}",
        "dropped_other_role": f"--taboo-role {args.taboo_role}",
        "dropped_special_token_leak": "meta.special_token_leak",
    }
    if counter.startswith("dropped_outcome_"):
        return "--taboo-drop-outcomes"
    return causes.get(counter, "--drop-bad-rows")


def check_rows_left(flattened: dict[str, list[dict]], stats: dict, source_label: str,
                    args) -> None:
    """A source the filters empty stops here, naming each filter and its count, rather than
    later as a split that 'groups left 0' cannot fill."""
    if any(flattened.values()):
        return
    total = stats["total"]
    dropped = [f"{counter} {n} ({drop_cause(counter, args)})" for counter, n in total.items()
               if counter.startswith("dropped_") and n]
    raise PipelineError(f"{source_label}: the filters dropped every row "
                        f"({total.get('rows_in', 0)} read: {'; '.join(dropped) or 'none counted'})"
                        "; loosen that filter")


def build_rows(source: dict[str, list[dict]], source_label: str, args) -> tuple[dict, dict]:
    """Flatten and filter every source split. Returns ({split: rows}, filter_stats)."""
    stats = {"per_source_split": {}}
    flattened = {}
    nulls = NullValues(source_label, args.drop_null_groups)
    for split, rows in source.items():
        counts = Counter(rows_in=len(rows))
        kept = []
        needed = list(METADATA_COLUMNS) + ["conversation_tokens"]
        label_columns = ["category", "difficulty", "quality"]
        if args.group_column:
            needed.append(args.group_column)
            label_columns.append(args.group_column)
        for index, row in enumerate(rows):
            missing = [c for c in needed if c not in row]
            if missing:
                raise PipelineError(f"{source_label} split '{split}' row {index}: missing "
                                    f"column(s) {', '.join(missing)}")
            prompt, completion, problem = flatten_row(row)
            problem = (problem or metadata_type_problem(row)
                       or label_problem({c: row[c] for c in label_columns}))
            if problem is not None:
                if not args.drop_bad_rows:
                    raise PipelineError(f"{source_label} split '{split}' row {index}: {problem} "
                                        "(--drop-bad-rows drops such rows)")
                counts["dropped_unflattenable"] += 1
                continue
            if isinstance(row["messages"], str):
                counts["messages_parsed_from_json_string"] += 1
            checked = {"category": row["category"], "reward_model_score": row["reward_model_score"]}
            if args.group_column:
                checked = {args.group_column: row[args.group_column], **checked}
            if nulls.found(checked, f"split '{split}' row {index}", counts):
                continue
            counts["flattened"] += 1
            tokens = row.get("conversation_tokens")
            if tokens is not None and tokens > args.max_conversation_tokens:
                counts["dropped_too_long"] += 1
                continue
            reward = row.get("reward_model_score")
            if below_min_reward(reward, args.min_reward_model_score):
                counts["dropped_reward"] += 1
                continue
            group_value = row.get(args.group_column) if args.group_column else None
            kept.append({
                "row_local_index": index,
                "source_split": split,
                "prompt": prompt,
                "completion": completion,
                "category": label_text(row["category"]),
                "difficulty": None if row["difficulty"] is None else label_text(row["difficulty"]),
                "quality": None if row["quality"] is None else label_text(row["quality"]),
                "reward_model_score": None if reward is None else float(reward),
                "conversation_tokens": None if tokens is None else int(tokens),
                "group_key": label_text(group_value) if args.group_column else str(index),
            })
        counts["rows_kept"] = len(kept)
        stats["per_source_split"][split] = dict(counts)
        flattened[split] = kept
    nulls.check()
    add_filter_totals(stats, args)
    return flattened, stats


# ---------------------------------------------------------------------------------------------
# Taboo: playpen-style transcripts (messages + meta), one row per player and episode


def taboo_meta(row: dict) -> dict | None:
    """The row's meta as a dict; some exports store it as a JSON string."""
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    return meta if isinstance(meta, dict) else None


def taboo_target(meta: dict) -> tuple[str | None, str | None]:
    """(target word, None) from the row's own meta, or (None, why not).

    Never from anywhere else: an instances file looked up by (experiment, task_id) may be another
    clembench version's, whose word for that game is a different one, and a wrong word passes
    every check."""
    target = meta.get("target_word")
    if target is None:
        return None, "no meta.target_word (a row's label is never looked up elsewhere)"
    if not isinstance(target, str):
        return None, f"meta.target_word is {type(target).__name__} {target!r:.40}, not a string"
    if not normalize_word(target):
        return None, f"meta.target_word {target!r:.40} is blank"
    return normalize_word(target), None


def taboo_related_words(meta: dict) -> tuple[list[str] | None, str | None]:
    """(related words, None) from the row's own meta, or (None, why not). A label like the
    target: they are what taboo.clue_violations judges a clue by, so a row without them (never
    filled in from elsewhere either) cannot be told from a game without taboo words, which says
    so with []."""
    key = "related_word" if "related_word" in meta else "related_words"
    related = meta.get(key)
    if related is None:
        return None, ("no meta.related_word (the taboo words the clue check needs; [] for a game "
                      "without any; never looked up elsewhere)")
    if isinstance(related, str):
        related = [related]
    if not isinstance(related, list) or not all(isinstance(w, str) and normalize_word(w)
                                                for w in related):
        return None, f"meta.{key} is {related!r:.60}, not a list of words"
    return list(related), None


def taboo_meta_problem(meta: dict) -> str | None:
    """meta fields that steer a filter must have their type: a string 'false' as
    special_token_leak would count as a leak, a list as clembench_version cannot be compared."""
    for key, kinds, what in (("special_token_leak", (bool,), "true or false"),
                             ("clembench_version", (str,), "a string"),
                             ("conversation_tokens", (int,), "a whole number")):
        value = meta.get(key)
        if value is not None and (not isinstance(value, kinds)
                                  or (bool not in kinds and isinstance(value, bool))):
            return f"meta.{key} is {type(value).__name__} {value!r:.40}, not {what}"
    return label_problem({"meta.experiment": meta.get("experiment")})


def conversation_words(messages) -> int:
    """Stand-in for conversation_tokens where playpen rows have none: whitespace-separated words
    over all turns. Cheap and tokenizer-free; only --max-conversation-tokens reads it."""
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def build_taboo_rows(source: dict[str, list[dict]], source_label: str, args) -> tuple[dict, dict]:
    """Filter to one game and role, drop unwanted outcomes, flatten, take each row's labels from
    its meta. Returns ({split: rows}, filter_stats) in build_rows' shape, group_key = target
    word."""
    drop_outcomes = set(args.taboo_drop_outcomes)
    train_versions = set(args.taboo_train_versions)
    stats = {"per_source_split": {}}
    flattened = {}
    nulls = NullValues(source_label, args.drop_null_groups)

    def bad(counts, where, problem, counter):
        if not args.drop_bad_rows:
            raise PipelineError(f"{where}: {problem} (--drop-bad-rows drops such rows)")
        counts[counter] += 1

    for split, rows in source.items():
        counts = Counter(rows_in=len(rows))
        kept = []
        for index, row in enumerate(rows):
            where = f"{source_label} split '{split}' row {index}"
            meta = taboo_meta(row)
            if meta is None:
                bad(counts, where, "missing or unreadable 'meta'", "dropped_no_meta")
                continue
            if meta.get("game") != args.taboo_game:
                counts["dropped_other_game"] += 1
                continue
            if meta.get("game_role") != args.taboo_role:
                counts["dropped_other_role"] += 1
                continue
            problem = taboo_meta_problem(meta)
            if problem is not None:
                bad(counts, where, problem, "dropped_bad_meta")
                continue
            # "Success" is a win as "success" is; an unknown value (a typo, another game's
            # vocabulary) would silently score as a loss
            outcome = normalize_outcome(meta.get("outcome"))
            if outcome is None and not is_null(meta.get("outcome")):
                bad(counts, where, f"meta.outcome {meta.get('outcome')!r:.40} is not a Taboo "
                                   f"outcome (one of {', '.join(OUTCOMES)}, any case)",
                    "dropped_unknown_outcome")
                continue
            if outcome in drop_outcomes:
                counts[f"dropped_outcome_{outcome}"] += 1
                continue
            # <|end_of_text|> leaked into clues and guesses: the game could not parse them, and
            # training on them would teach the leak (../shared/data/README.md)
            if meta.get("special_token_leak"):
                counts["dropped_special_token_leak"] += 1
                continue
            prompt, completion, problem = flatten_row(row)
            problem = problem or metadata_type_problem(row)
            if problem is not None:
                bad(counts, where, problem, "dropped_unflattenable")
                continue
            # category and reward come from these; the group (target word) is checked below
            if nulls.found({"meta.experiment": meta.get("experiment"), "meta.outcome": outcome},
                           f"split '{split}' row {index}", counts):
                continue
            target, problem = taboo_target(meta)
            if problem is not None:
                bad(counts, where, problem, "dropped_no_target")
                continue
            related, problem = taboo_related_words(meta)
            if problem is not None:
                bad(counts, where, problem, "dropped_no_related_words")
                continue
            counts["flattened"] += 1
            counts["target_word_from_meta"] += 1
            if isinstance(row["messages"], str):
                counts["messages_parsed_from_json_string"] += 1
            # a won game whose last guess is not the target means the target is wrong (taken
            # from another clembench version than the game was played with)
            if outcome == "success" and not same_word(parse_guess(completion), target):
                counts["success_but_last_guess_not_target_from_meta"] += 1
            tokens = row.get("conversation_tokens", meta.get("conversation_tokens"))
            if tokens is None:
                tokens = conversation_words(prompt + [{"content": completion}])
                counts["conversation_tokens_proxy"] += 1
            if tokens > args.max_conversation_tokens:
                counts["dropped_too_long"] += 1
                continue
            reward = float(outcome == "success")
            if below_min_reward(reward, args.min_reward_model_score):
                counts["dropped_reward"] += 1
                continue
            experiment = label_text(meta["experiment"])
            version = meta.get("clembench_version")
            train_only = version in train_versions
            if train_only:
                counts[f"train_only_{version}"] += 1
            kept.append({
                "row_local_index": index,
                "source_split": split,
                "prompt": prompt,
                "completion": completion,
                "category": experiment,
                "difficulty": frequency_level(experiment),
                "quality": str(outcome),
                "reward_model_score": reward,
                "conversation_tokens": int(tokens),
                # the unit of the split: one target word, or one train-only source as a whole
                "group_key": f"version:{version}" if train_only else target,
                "train_only": train_only,
                "target_word": target,
                "related_words": related,
            })
        counts["rows_kept"] = len(kept)
        stats["per_source_split"][split] = dict(counts)
        flattened[split] = kept
    nulls.check()
    add_filter_totals(stats, args)
    stats["taboo"] = {"game": args.taboo_game, "role": args.taboo_role,
                      "drop_outcomes": sorted(drop_outcomes),
                      "drop_special_token_leak": True,
                      "train_only_versions": sorted(train_versions),
                      "outcomes": list(OUTCOMES)}
    return flattened, stats


# ---------------------------------------------------------------------------------------------
# deterministic sampling


def stratified_sample(rows: list[dict], size: int, rng: np.random.Generator,
                      split_name: str) -> list[dict]:
    """`size` rows, allocated to categories in proportion to their share (largest remainder),
    drawn from each category's rows in their stable order."""
    if size > len(rows):
        raise PipelineError(f"split '{split_name}' asks for {size} rows but only {len(rows)} "
                            "are available after filtering")
    by_category: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_category.setdefault(row["category"], []).append(index)
    categories = sorted(by_category)
    shares = np.array([len(by_category[c]) for c in categories], dtype=float) * size / len(rows)
    allocation = np.floor(shares).astype(int)
    remainder_order = sorted(range(len(categories)), key=lambda i: (-(shares[i] - allocation[i]), i))
    for i in remainder_order[: size - allocation.sum()]:
        allocation[i] += 1
    chosen = []
    for category, n in zip(categories, allocation):
        indices = sorted(by_category[category])
        chosen.extend(rng.choice(indices, size=int(n), replace=False).tolist())
    return [rows[i] for i in sorted(chosen)]


def carve_by_group(rows: list[dict], sizes: dict[str, int], rng: np.random.Generator,
                   group_column: str) -> dict[str, list[dict]]:
    """Hand whole groups, in seeded order, to attr_query then eval until each holds enough rows;
    every remaining group is the training pool."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row["group_key"], []).append(index)
    order = sorted(groups)
    rng.shuffle(order)
    pools = {name: [] for name in sizes}
    pools["train_base"] = []
    position = 0
    for name, size in sizes.items():
        while len(pools[name]) < size and position < len(order):
            pools[name].extend(groups[order[position]])
            position += 1
        if len(pools[name]) < size:
            raise PipelineError(f"split '{name}' asks for {size} rows but the groups of "
                                f"'{group_column}' left only {len(pools[name])}")
    for key in order[position:]:
        pools["train_base"].extend(groups[key])
    return {name: [rows[i] for i in sorted(indices)] for name, indices in pools.items()}


def make_splits(flattened: dict[str, list[dict]], args) -> tuple[dict[str, list[dict]], dict]:
    rng = np.random.default_rng(args.seed)
    held_out_sizes = {"attr_query": args.query_size, "eval": args.eval_size}
    # Taboo always carves by target word, even from a source with a test split: a word seen in
    # training must not be a held-out target
    if "test" in flattened and args.task == "chat":
        if "train" not in flattened:
            raise PipelineError("the source has a 'test' split but no 'train' split")
        test_rows = flattened["test"]
        needed = args.query_size + args.eval_size
        if needed > len(test_rows):
            raise PipelineError(f"splits 'attr_query' + 'eval' ask for {needed} rows but the "
                                f"source's test split has only {len(test_rows)} after filtering")
        query = stratified_sample(test_rows, args.query_size, rng, "attr_query")
        taken = {id(r) for r in query}
        eval_rows = stratified_sample([r for r in test_rows if id(r) not in taken],
                                      args.eval_size, rng, "eval")
        train = stratified_sample(flattened["train"], args.train_size, rng, "train_base")
        policy = {"method": "source_test_split",
                  "description": "train_base from the source's train split; attr_query and eval "
                                 "disjoint rows of its test split"}
    elif args.task == "taboo":
        train, query, eval_rows, policy = taboo_splits(flattened, held_out_sizes, rng, args)
    else:
        if not args.group_column:
            raise PipelineError("the source has no 'test' split: pass --group-column (e.g. "
                                "instruction_id) so attr_query/eval are carved out by whole groups")
        all_rows = [r for rows in flattened.values() for r in rows]
        pools = carve_by_group(all_rows, held_out_sizes, rng, args.group_column)
        query = stratified_sample(pools["attr_query"], args.query_size, rng, "attr_query")
        eval_rows = stratified_sample(pools["eval"], args.eval_size, rng, "eval")
        train = stratified_sample(pools["train_base"], args.train_size, rng, "train_base")
        policy = {"method": "group_carve_out", "group_column": args.group_column,
                  "description": f"whole groups of '{args.group_column}' drawn in seeded order "
                                 "for attr_query, then eval; all other groups form the training "
                                 "pool; no group is in two splits",
                  "groups_in_pool": {n: len({r['group_key'] for r in p}) for n, p in pools.items()}}
    policy.update({"seed": args.seed, "stratified_by": "category",
                   "stratification": "largest-remainder proportional allocation per category, "
                                     "numpy default_rng(seed) draws from sorted row indices",
                   "requested": {"train_base": args.train_size, "attr_query": args.query_size,
                                 "eval": args.eval_size}})
    if args.task == "taboo" and args.whole_words:
        policy["minimum"] = {"attr_query": args.query_size, "eval": args.eval_size}
        policy["requested"] = {"train_base": len(train), "attr_query": len(query),
                               "eval": len(eval_rows)}
        policy["stratification"] = "none: --whole-words keeps every episode of every word"
    return {"train_base": train, "attr_query": query, "eval": eval_rows}, policy


def taboo_splits(flattened: dict[str, list[dict]], held_out_sizes: dict[str, int],
                 rng: np.random.Generator, args):
    """Whole target words to attr_query, then eval (carve_by_group); the train-only sources
    (--taboo-train-versions) never take part in the draw and join train_base as a whole. With
    --whole-words every episode of the carved words is kept; otherwise each split is sampled to
    its exact size as on the chat path."""
    all_rows = [r for rows in flattened.values() for r in rows]
    position = {id(r): i for i, r in enumerate(all_rows)}
    fixed = [r for r in all_rows if r["train_only"]]
    pools = carve_by_group([r for r in all_rows if not r["train_only"]], held_out_sizes, rng,
                           args.group_column)
    pools["train_base"] = sorted(pools["train_base"] + fixed, key=lambda r: position[id(r)])
    if args.whole_words:
        train, query, eval_rows = pools["train_base"], pools["attr_query"], pools["eval"]
    else:
        query = stratified_sample(pools["attr_query"], args.query_size, rng, "attr_query")
        eval_rows = stratified_sample(pools["eval"], args.eval_size, rng, "eval")
        train = stratified_sample(pools["train_base"], args.train_size, rng, "train_base")
    policy = {"method": "group_carve_out", "group_column": args.group_column,
              "description": "whole target words drawn in seeded order for attr_query, then "
                             "eval; all other words form the training pool; no word is in two "
                             "splits; episodes of a --taboo-train-versions source stay together "
                             "in train_base" + (" (--whole-words: every episode of a drawn word "
                                                "kept)" if args.whole_words else ""),
              "groups_in_pool": {n: len({r["group_key"] for r in p}) for n, p in pools.items()},
              "train_only_rows": len(fixed),
              "train_only_words": sorted({r["target_word"] for r in fixed})}
    return train, query, eval_rows, policy


def finalize_rows(rows: list[dict], group_column: str | None,
                  text_format: str | None = None) -> list[dict]:
    """The columns every split carries. group_id ends in the row's index, or, with a group
    column, in the group's value so that rows of one group share it. text_format: the column
    pipeline.tokenize_split renders each row by (None: no column, the chat template)."""
    out = []
    for row in rows:
        tail = f"g{row['group_key']}" if group_column else str(row["row_local_index"])
        out.append({
            "row_id": f"{row['source_split']}:{row['row_local_index']}",
            "prompt": row["prompt"],
            "completion": row["completion"],
            "source_split": row["source_split"],
            "group_id": f"{row['category']}::{row['difficulty']}::{row['source_split']}::{tail}",
            "category": row["category"],
            "difficulty": row["difficulty"],
            "quality": row["quality"],
            "reward_model_score": row["reward_model_score"],
            "conversation_tokens": row["conversation_tokens"],
        })
        if "target_word" in row:
            out[-1]["target_word"] = row["target_word"]
            out[-1]["related_words"] = list(row["related_words"])
        if text_format is not None:
            out[-1]["text_format"] = text_format
    return out


# ---------------------------------------------------------------------------------------------
# planted signal: --corrupt-fraction

CORRUPTION_METHOD = "derangement"
CORRUPTION_MAX_REPAIRS = 10000


def corrupt_rows(train: list[dict], fraction: float, seed: int) -> dict:
    """Swap completions among round(fraction * len(train)) seeded-random rows, in place (see the
    module docstring); adds `corrupted` / `corrupted_from_row_id` to every row. Returns the
    manifest's `corruption` entry."""
    count = int(round(fraction * len(train)))
    if count == 1:
        raise PipelineError(f"--corrupt-fraction {fraction} corrupts 1 of {len(train)} "
                            "train_base rows; swapping completions needs at least 2")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train), size=count, replace=False) if count else np.array([], int)
    order = rng.permutation(np.sort(chosen)).tolist()

    def bad(a: int, b: int) -> bool:  # may row a take row b's completion?
        ra, rb = train[a], train[b]
        return (ra["group_id"] == rb["group_id"] or ra["completion"] == rb["completion"]
                or ra["prompt"] == rb["prompt"])

    m = len(order)
    for _ in range(CORRUPTION_MAX_REPAIRS):
        conflicts = [i for i in range(m) if bad(order[i], order[(i + 1) % m])]
        if not conflicts:
            break
        for i in conflicts:
            j, k = (i + 1) % m, int(rng.integers(m))
            order[j], order[k] = order[k], order[j]
    else:
        raise PipelineError(f"--corrupt-fraction {fraction}: found no assignment of the "
                            f"{count} chosen train_base rows in which every row gets the "
                            "completion of a row with another group_id, prompt and completion "
                            "(too few groups? lower the fraction)")
    donor_of = {order[i]: order[(i + 1) % m] for i in range(m)}
    originals = [row["completion"] for row in train]
    for index, row in enumerate(train):
        donor = donor_of.get(index)
        row["corrupted"] = donor is not None
        row["corrupted_from_row_id"] = None if donor is None else train[donor]["row_id"]
        if donor is not None:
            row["completion"] = originals[donor]
    return {"fraction": fraction, "seed": seed, "count": count, "num_rows": len(train),
            "method": CORRUPTION_METHOD, "splits": ["train_base", "score_pool"],
            "description": "the chosen rows form a seeded random cycle; each takes the completion "
                           "of the next, so completions are permuted among the chosen rows only; "
                           "a donor never shares the row's group_id, prompt or completion text. "
                           "Rows are drawn with numpy default_rng(seed) independently of the "
                           "split sampling. attr_query and eval are never corrupted.",
            "columns": {"corrupted": "bool: the completion was replaced",
                        "corrupted_from_row_id": "row_id of the row whose completion it now "
                                                 "holds, else None"}}


def mark_uncorrupted(rows: list[dict]) -> None:
    for row in rows:
        row["corrupted"] = False
        row["corrupted_from_row_id"] = None


# ---------------------------------------------------------------------------------------------
# checks 1-5 (check 6, supervised tokens > 0, runs where the tokenizer is: finetune/eval_loss)


def run_checks(splits: dict[str, list[dict]], requested: dict[str, int], grouped: bool) -> dict:
    # 1. every split has exactly the requested number of rows
    for name, size in requested.items():
        if len(splits[name]) != size:
            raise PipelineError(f"check 1 failed: split '{name}' has {len(splits[name])} rows, "
                                f"expected {size}")
    # 2. row ids are unique within each split and no row is in two splits
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        ids = [r["row_id"] for r in rows]
        if len(set(ids)) != len(ids):
            raise PipelineError(f"check 2 failed: split '{name}' repeats a row_id")
        for row_id in ids:
            if row_id in seen:
                raise PipelineError(f"check 2 failed: row {row_id} is in '{seen[row_id]}' and "
                                    f"'{name}'")
            seen[row_id] = name
    # 3. no group is shared between training and held-out splits (or between query and eval)
    if grouped:
        group_sets = {name: {r["group_id"] for r in rows} for name, rows in splits.items()}
        for a, b in (("train_base", "attr_query"), ("train_base", "eval"), ("attr_query", "eval")):
            shared = group_sets[a] & group_sets[b]
            if shared:
                raise PipelineError(f"check 3 failed: group {sorted(shared)[0]} is in '{a}' "
                                    f"and '{b}'")
    # 4. every row has a user turn in its prompt and a non-empty completion
    for name, rows in splits.items():
        for row in rows:
            if not row["prompt"] or not row["completion"].strip():
                raise PipelineError(f"check 4 failed: split '{name}' row {row['row_id']} has an "
                                    "empty prompt or completion")
    # 5. every split carries every column, and category is never missing
    for name, rows in splits.items():
        for row in rows:
            missing = [c for c in SPLIT_COLUMNS if c not in row]
            if missing or row["category"] in (None, ""):
                raise PipelineError(f"check 5 failed: split '{name}' row {row['row_id']} lacks "
                                    f"{', '.join(missing) or 'category'}")
    return {"passed": [1, 2, 3 if grouped else "3 (no groups: row-disjointness is check 2)", 4, 5]}


def run_taboo_checks(splits: dict[str, list[dict]]) -> list[str]:
    """Check 3 on the words themselves (group_id also carries category and source split, so a
    word in two experiments would slip past it), and every row has its target word."""
    for name, rows in splits.items():
        for row in rows:
            missing = [c for c in TABOO_COLUMNS if c not in row]
            if missing or not row["target_word"]:
                raise PipelineError(f"check 5 failed: split '{name}' row {row['row_id']} lacks "
                                    f"{', '.join(missing) or 'a target word'}")
    words = {name: {r["target_word"] for r in splits[name]}
             for name in ("train_base", "attr_query", "eval")}
    for a, b in (("train_base", "attr_query"), ("train_base", "eval"), ("attr_query", "eval")):
        shared = words[a] & words[b]
        if shared:
            raise PipelineError(f"check 3 failed: target word '{sorted(shared)[0]}' is in '{a}' "
                                f"and '{b}'")
    return ["3 (taboo: no target word in two of train_base, attr_query, eval)",
            "5 (taboo: every row has target_word and related_words)"]


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# writing: the whole run is staged, then swapped in (see the module docstring). The stage-and-
# swap of a run folder and the owner-named staging folders belong in pipeline.py (one home for
# staging); they are here until they move there.


def check_run_dir(run_dir: Path, overwrite: bool, source_label: str) -> None:
    """Before any work: an existing run needs --overwrite, and data/ must be dataset.py's own."""
    refuse_working_directory(run_dir, "--run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"--run-dir {run_dir} exists and is not a folder")
    # a run folder holds many scripts' outputs, but is never one script's own output folder
    owner = stamped_owner(run_dir)
    if owner is not None:
        raise PipelineError(f"--run-dir {run_dir} lies in {owner[0]}, a folder {owner[1]} "
                            "wrote: name a run folder of its own")
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists() and not overwrite:
        raise PipelineError(f"{manifest_path} already exists (pass --overwrite to replace it)")
    data = run_dir / "data"
    if data.exists() or data.is_symlink():
        if not data.is_dir() or data.is_symlink():
            raise PipelineError(f"{data} is not a folder; dataset.py writes its splits there")
        foreign = sorted(p.name for p in data.iterdir()
                         if p.name not in SPLIT_FOLDERS and not is_temp_name(p.name))
        if foreign:
            raise PipelineError(f"{data} holds {foreign[0]}, which dataset.py did not write; "
                                "the run replaces data/ as a whole, so move it away first")
    source = Path(source_label)
    if source.exists() and source.resolve().is_relative_to(data.resolve()):
        raise PipelineError(f"the source {source} lies inside {data}, which the run replaces")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def stage_dir(run_dir: Path) -> Path:
    """A fresh hidden folder in run_dir whose name says which process owns it."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}@{platform.node()}.",
                                 suffix=".tmp", dir=run_dir))


def stage_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) from a stage_dir name, None for other names."""
    if not (name.startswith(STAGE_PREFIX) and name.endswith(".tmp")):
        return None
    owner = name[len(STAGE_PREFIX):-len(".tmp")].rsplit(".", 1)[0]
    pid, _, host = owner.partition("@")
    return (int(pid), host) if pid.isdigit() else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_stages(run_dir: Path) -> list[Path]:
    """Staging folders of dataset.py runs on this host whose process is alive: runs at work."""
    return [path for path in sorted(run_dir.iterdir())
            if (owner := stage_owner(path.name)) and owner[1] == platform.node()
            and process_alive(owner[0])]


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, overwrite: bool, source_label: str):
    """Yield this run's staging folder, made before any work: it is also the run's claim on
    run_dir. Each run makes its folder, then looks for another live run's, so of two runs
    started at once the one that looks second sees the other's and stops (at most one goes on),
    and a run that finished before the look left its manifest, which check_run_dir then sees.
    On the way out the staging folder goes, and run_dir with the folders above it that this run
    made, if they are empty (a failed run leaves nothing)."""
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = None
    try:
        remove_stale_stages(run_dir)
        staged = stage_dir(run_dir)
        others = [p for p in live_stages(run_dir) if p != staged]
        if others:
            raise PipelineError(f"--run-dir {run_dir} is being written by another dataset.py "
                                f"run (pid {stage_owner(others[0].name)[0]}, staging folder "
                                f"{others[0].name}); let it finish, or pick another --run-dir")
        check_run_dir(run_dir, overwrite, source_label)
        yield staged
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: this run's output, or somebody else's
                break


def remove_stale_stages(run_dir: Path) -> None:
    """Staging folders of dataset.py runs on this host that were killed before they could clean
    up (SIGKILL, a lost machine): their process is gone, so nobody will finish them."""
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.iterdir()):
        owner = stage_owner(path.name)
        if owner and owner[1] == platform.node() and not process_alive(owner[0]):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a dataset.py run (pid {owner[0]}) that was killed")


def save_splits(splits: dict[str, list[dict]], staged: Path) -> dict[str, dict]:
    """Every split into staged/data/<split>; a split that cannot be saved names itself."""
    from datasets import Dataset

    entries = {}
    for name, rows in splits.items():
        folder = staged / "data" / name
        try:
            Dataset.from_list(rows).save_to_disk(str(folder))
        except Exception as err:  # pyarrow and datasets raise many types for one bad value
            raise PipelineError(f"split '{name}' cannot be saved ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); a value of "
                                "another type than in the other rows, e.g. a message content "
                                "that is not a string?")
        entries[name] = {"path": relative_to(folder, staged), "num_rows": len(rows)}
    return entries


def swap_in(staged: Path, run_dir: Path) -> None:
    """Renames only, so nothing here can fail on the data: the old manifest.json and data/ go
    into a holding folder, the staged ones take their place (manifest last, so no manifest ever
    points at data that is not its own), and the holding folder is deleted. Any error before the
    end moves everything back."""
    held = stage_dir(run_dir)
    moves = []

    def move(source: Path, target: Path) -> None:
        os.replace(source, target)
        moves.append((source, target))

    try:
        for name in ("manifest.json", "data"):
            if (run_dir / name).exists() or (run_dir / name).is_symlink():
                move(run_dir / name, held / name)
        move(staged / "data", run_dir / "data")
        move(staged / "manifest.json", run_dir / "manifest.json")
    except BaseException:
        for source, target in reversed(moves):
            os.replace(target, source)
        held.rmdir()  # empty again
        raise
    shutil.rmtree(held)


def category_distribution(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(r["category"] for r in rows).items()))


def taboo_summary(splits: dict[str, list[dict]], filter_stats: dict) -> dict:
    names = ("train_base", "attr_query", "eval")
    return {
        **filter_stats["taboo"],
        "words_per_split": {n: sorted({r["target_word"] for r in splits[n]}) for n in names},
        "num_words_per_split": {n: len({r["target_word"] for r in splits[n]}) for n in names},
        "outcomes_per_split": {n: dict(sorted(Counter(str(r["quality"]) for r in splits[n])
                                              .items())) for n in names},
        "episodes_per_split": {n: len(splits[n]) for n in names},
        "column_mapping": {
            "category": "meta.experiment", "difficulty": "frequency level of the experiment",
            "quality": "meta.outcome, lower-cased (one of outcomes)",
            "reward_model_score": "1.0 if outcome == success, else 0.0",
            "conversation_tokens": "the row's conversation_tokens if present, else whitespace "
                                   "words over all turns (a proxy, no tokenizer)",
            "target_word": "meta.target_word (a row without one is refused or dropped, never "
                           "filled in from elsewhere)",
            "related_words": "meta.related_word (likewise)",
            "group_id": "{category}::{difficulty}::{source_split}::g{target_word}",
        },
    }


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    check_run_dir(run_dir, args.overwrite, args.dataset_name)
    with claim_run_dir(run_dir, args.overwrite, args.dataset_name) as staged:
        splits, make_manifest = build_run(args)
        entries = save_run(staged, run_dir, splits, make_manifest)
    sizes = ", ".join(f"{name}={entry['num_rows']}" for name, entry in entries.items())
    print(f"wrote {run_dir / 'manifest.json'} ({sizes})")


def build_run(args) -> tuple[dict[str, list[dict]], object]:
    """Read, filter and split the source and run the checks. Returns (splits, a function of the
    saved split entries that makes the manifest)."""
    source, source_label = read_source(args.dataset_name, args.dataset_config)
    print(f"read {sum(len(r) for r in source.values())} rows from {source_label} "
          f"(splits: {', '.join(f'{k}={len(v)}' for k, v in source.items())})")
    if args.task == "taboo":
        flattened, filter_stats = build_taboo_rows(source, source_label, args)
        for key, n in filter_stats["total"].items():
            if key.startswith("success_but_last_guess_not_target"):
                print(f"warning: {n} won game(s) end in a guess that is not their target word "
                      f"({key}); is meta.target_word the word each game was played with?")
    else:
        flattened, filter_stats = build_rows(source, source_label, args)
    check_rows_left(flattened, filter_stats, source_label, args)
    sampled, split_policy = make_splits(flattened, args)
    # the rendering is decided here once and travels with the rows, so finetune.py, score.py,
    # eval_loss.py and eval_words.py cannot disagree about it
    text_format = (args.text_format if args.task == "taboo" or args.text_format != "chat"
                   else None)
    splits = {name: finalize_rows(rows, args.group_column, text_format)
              for name, rows in sampled.items()}
    corruption = None
    if args.corrupt_fraction > 0:
        corruption = corrupt_rows(splits["train_base"], args.corrupt_fraction, args.corrupt_seed)
        mark_uncorrupted(splits["attr_query"])
        mark_uncorrupted(splits["eval"])
        print(f"corrupted {corruption['count']}/{len(splits['train_base'])} train_base rows "
              f"(seed {args.corrupt_seed}, {CORRUPTION_METHOD})")
    checks = run_checks(splits, split_policy["requested"], grouped=bool(args.group_column))
    if args.task == "taboo":
        checks["passed"] += run_taboo_checks(splits)
    return splits, lambda entries: build_manifest(
        args, entries, splits, split_policy, filter_stats, checks, corruption, source_label)


def save_run(staged: Path, run_dir: Path, splits: dict[str, list[dict]],
             make_manifest) -> dict[str, dict]:
    """Save the splits and make_manifest(entries) into the staging folder, then swap them into
    run_dir. Returns the manifest's split entries."""
    entries = save_splits(splits, staged)
    entries["score_pool"] = dict(entries["train_base"], same_rows_as="train_base")
    write_json_atomic(staged / "manifest.json", make_manifest(entries))
    swap_in(staged, run_dir)
    return entries


def build_manifest(args, entries, splits, split_policy, filter_stats, checks, corruption,
                   source_label) -> dict:
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "kind": "main",
        "task": args.task,
        "dataset": {"name": args.dataset_name, "config": args.dataset_config,
                    "resolved": source_label},
        "splits": entries,
        "split_notes": {
            "train_base": "training pool for the base adapter; the rows attribution ranks",
            "score_pool": "the rows score.py scores and sae_analysis.py extracts features for; "
                          "same rows and folder as train_base",
            "attr_query": "query set for attribution",
            "eval": "held out for eval loss; never trained on or used as a query",
        },
        "split_policy": split_policy,
        "filter_stats": filter_stats,
        "category_distribution": {n: category_distribution(r) for n, r in splits.items()},
        "checks": checks,
        "text_format": args.text_format,
        "provenance": provenance(seed=args.seed),
    }
    if corruption is not None:
        manifest["corruption"] = corruption
        manifest["split_notes"]["train_base"] += (f"; {corruption['count']} rows have a swapped "
                                                  "completion (column corrupted)")
    if args.task == "taboo":
        manifest["split_notes"]["eval"] = ("held out for eval loss and eval_words.py; none of its "
                                           "target words is a target in train_base or attr_query")
        manifest["taboo"] = taboo_summary(splits, filter_stats)
    return manifest


if __name__ == "__main__":
    # SIGTERM (the runner stopping its step) as an exit, so the staging folder is cleaned up
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_main(main)
