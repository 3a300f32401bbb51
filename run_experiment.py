"""Run an experiment from a recipe: the pipeline's scripts in order, with skip-if-up-to-date,
resume after a kill, per-seed replication, and every command written down.

    uv run run_experiment.py recipes/smoltalk.toml
    uv run run_experiment.py recipes/smoltalk.toml --seeds 1 2 3 --dry-run
    uv run run_experiment.py recipes/demo.toml --force finetune_base

A recipe (TOML) is a list of steps; each step is one script and its flags, written exactly as a
researcher would paste them, with {placeholders}:

    [recipe]
    run_dir = "runs/smoltalk_v1"   # --run-dir overrides
    seeds = [42]                   # --seeds overrides; per-seed steps run once per seed
    base_seed = 42                 # what {seed} means in a step that is not per-seed
    per_seed_split = false         # true: steps with per_seed = "split" become per-seed too

    [vars]                         # recipe-level values, used as {model}, {k}, ...
    model = "google/gemma-3-1b-it" # (--var model=... overrides; a var may use {run_dir})

    [[steps]]
    name = "dataset"
    run = "dataset.py --run-dir {split_dir} --seed {seed} --overwrite"
    inputs = []                    # files/folders it reads (fingerprinted; must exist)
    # optional_inputs = ["{model}"] # a hub id, or a path that may be absent (fingerprinted too)
    outputs = ["{split_dir}/manifest.json"]   # must exist after it
    per_seed = "split"             # true, false (default) or "split"
    # optional = true              # skip (with a note) when the script does not exist
    # reuse_existing = true        # skip whenever the outputs exist (e.g. a shared model folder)

Placeholders: {run_dir}; {seed} (the seed of a per-seed step, else base_seed); {seed_dir}
(= {run_dir}/seed_<seed>, per-seed steps only); {split_dir} (= {seed_dir} when per_seed_split is
true, else {run_dir}); and the names in [vars]. Anything else is an error ({{ and }} are literal
braces). The command is resolved, then split like shell words; a placeholder's value stays one
word, spaces and all (a path with spaces reaches the script as one argument, and commands.sh
quotes it), except a [vars] value that starts with `-`: that holds flags and splits into words
("--dataset-config smol-magpie-ultra" is two; quote inside it to keep a word whole), and an
empty value, which adds no word. A [vars] value may use the built-in placeholders, not other
vars. Relative paths are relative to the repository root. An input may be a glob
({run_dir}/seed_*/eval_*.json).

Checked when the recipe loads, before anything runs: each step's script exists (unless the step
is optional); no two tasks (steps, or seeds of a per-seed step) declare the same output, and no
task declares an output inside another's (a path in another step's output folder would be
deleted when that folder is written anew, and would keep the folder there when its own files are
gone, so the other step would pass as up to date). A step may declare a folder and files in it.

Inputs: a declared input that does not exist, and that no earlier step of the recipe writes, is
an error before anything runs (a mistyped path would otherwise be fingerprinted as "missing" and
its step never rerun); one that an earlier step should have written is an error when its step
comes up. A hub id, or a path that may legitimately be absent, goes under optional_inputs.

Skip rule: a step (per seed) is skipped when its declared outputs exist and its fingerprint equals
the one recorded when it last succeeded, in <run_dir>/.runner_state.json (rewritten atomically
after every successful step, never before). The fingerprint is a sha256 over the resolved command
line (script + flags, not the python executable) and the declared inputs: a file by its content;
a folder by its sorted (relative path, size) plus the content of files up to 1 MiB and the mtime_ns
of larger ones (weights are not read), ignoring datasets' cache-*.arrow files and hidden files;
an absent optional input (e.g. a hub id) as "missing". (So a step must not declare a folder it
writes into as an input: it would never be up to date.) A killed run resumes at the step it was
in, and a step reruns when its command or inputs changed:
--force STEP reruns STEP (every seed of a per-seed step); a later step that declares one of its
outputs as input then reruns too when that output changed, which with the scripts' outputs (they
record provenance and time) is always; steps that do not read them stay skipped.

Each step's stdout+stderr go to <run_dir>/logs/<step>[_seed<s>].log. <run_dir>/commands.sh holds
every command of the run (all steps, all seeds, placeholders resolved) as `uv run python ...` lines,
written before the first step runs (an optional step whose script is absent is there as a
comment); `bash <run_dir>/commands.sh` from the repository root replays the run from scratch.
Commands run with the repository root as working directory. Errors (bad recipe, unknown
--force step, a failing step) stop the runner with one `error:` line; a failing step's line
names its log.

Running steps at once (--jobs N, --gpus LIST). The plan is a DAG: a task (a step, for one seed)
waits for every earlier task in the plan one of whose declared outputs is the same path as, lies
inside, or contains one of its declared inputs or optional_inputs (globs match part by part); it
also waits for an earlier task whose outputs overlap its outputs, or whose inputs its outputs would
rewrite, so two steps never write one path at once and a step's inputs never change under it.
A task starts when everything it waits for is done, at most N at a time; among ready tasks the
earlier in recipe order goes first, so --jobs 1 (the default) runs exactly the recipe order.
Slots: --gpus 0,1 gives one slot per listed id, and an id may repeat (--gpus 0,0,1: two steps at
once on GPU 0, one on GPU 1); with --jobs N as well the list is cycled to N slots (--gpus 0
--jobs 5: five slots on GPU 0; --gpus 0,1 --jobs 4: 0,1,0,1), and N below the list's length is
an error (a listed GPU would go unused). A step runs with CUDA_VISIBLE_DEVICES set to its slot's
id, the id as written (so it names a GPU in the runner's own numbering of the machine); without
--gpus the runner sets nothing and every step sees what the runner sees. With more than one slot a
step also gets OMP_NUM_THREADS = cores // slots (unless the runner's environment sets it), so N
steps at once don't each start a thread per core. Each start and end is
one `[runner]` line with the slot, its GPU and the clock time. With --jobs 1 the first failure
stops the run, as above; with N > 1 a failure stops only the tasks that depend on it (directly or
through others), the rest run on, and the run ends with exit 1 (2 if every failure was an input
that was not there): one `error:` line per failed step, naming its log, each followed by a
`skipped because <step> failed: ...` line listing the tasks left out for it. With N > 1, a step that
fails with CUDA's out-of-memory error (its log has "CUDA out of memory" or "CUDA error: out of
memory") is not a failure yet: the GPU is shared by the run's other steps and maybe by another
run, so the memory it lacked may be free soon. Its log is kept as <log>.oom<n>.log and it goes
back in the queue, to start again once another step of the run has ended (other than by running
out of memory itself) or a minute (OOM_RETRY_WAIT_S) has passed, at most --oom-retries times
(then it fails as any step does). --min-free-gib G (with N > 1) starts a step on a GPU where
steps of the run are running only while nvidia-smi reports G GiB free there, plus G for each step
started there in the last SETTLE_S seconds (a fresh step has not reached its peak). --dry-run
prints each task's level in the DAG and the tasks it waits for. The state file is written only
by the runner, from its one scheduling loop, atomically, after each success; commands.sh stays
the sequential replay in recipe order.

One runner per run dir: <run_dir>/.runner.lock (an flock, holding pid, host and start time)
is taken before anything is written and removed at the end; a second runner on the same run dir
stops with an error naming the holder. A lock left by a runner that died is taken over with a
note. Steps run in the runner's process group (so `kill -- -PGID` stops both), and die with the
runner however it ends: SIGTERM/SIGHUP stop the running steps first, and a step gets SIGTERM
from the kernel if the runner is killed outright (Linux PR_SET_PDEATHSIG). With the lock held, a
`.*.tmp` staging folder or file under the run dir whose writer is gone (an earlier, killed run's)
is removed, with a note, before the first step. The scripts' temp names record the writer
(`.<name>.<pid>@<host>.<random>.tmp`): one whose process is alive (a training started by hand into
the run dir) or that was written on another host is kept, with a note; one whose name records no
writer is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import fcntl
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline import PipelineError, temp_writer, write_json_atomic

ROOT = Path(__file__).resolve().parent
STATE_FILE = ".runner_state.json"
LOCK_FILE = ".runner.lock"
SMALL_FILE_BYTES = 1 << 20
BUILTIN_PLACEHOLDERS = ("run_dir", "seed", "seed_dir", "split_dir")
SEED_ONLY_PLACEHOLDERS = ("seed_dir",)
RECIPE_KEYS = {"name", "description", "run_dir", "seeds", "base_seed", "per_seed_split"}
STEP_KEYS = {"name", "run", "inputs", "optional_inputs", "outputs", "per_seed", "optional",
             "reuse_existing", "comment"}
# [recipe] keys and the TOML type each must have
RECIPE_TYPES = {"name": str, "description": str, "run_dir": str, "seeds": list, "base_seed": int,
                "per_seed_split": bool}
STEP_LIST_KEYS = ("inputs", "optional_inputs", "outputs")
STEP_BOOL_KEYS = ("optional", "reuse_existing")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
STEP_STOP_GRACE_S = 10
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[A-Za-z0-9./-]+)$")  # what CUDA_VISIBLE_DEVICES accepts
POLL_S = 0.05  # how often the runner looks at its running steps (--jobs > 1)
# torch.OutOfMemoryError's message, and torch.AcceleratorError's when the allocation that failed
# was the CUDA runtime's own (seen on the H200: a subset training died of it beside five others)
OOM_MARKS = ("CUDA out of memory", "CUDA error: out of memory")
OOM_RETRY_WAIT_S = 60   # an out-of-memory step waits for another step to end, or this long
SETTLE_S = 30   # --min-free-gib: a step started this recently may not hold its memory yet
FREE_MEMORY_CACHE_S = 2.0   # --min-free-gib: nvidia-smi is asked at most this often


class RunnerError(PipelineError):
    """A problem with the recipe or the command line; printed as one `error:` line, exit 2."""


class StepFailed(Exception):
    """A step exited non-zero; printed as one `error:` line, exit 1."""


class Stopped(BaseException):
    """The runner got SIGTERM/SIGHUP. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it before the running step is stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.running: list[str] | None = None  # with --jobs > 1: the steps it stopped


class RunFailed(Exception):
    """With --jobs > 1, steps failed while the others ran on: one `error:` line per failure,
    each followed by the tasks left out because of it; exit 1 (2: only missing inputs)."""

    def __init__(self, lines: list[str], code: int):
        super().__init__("\n".join(lines))
        self.lines, self.code = lines, code


@dataclass
class Recipe:
    path: Path
    run_dir: str
    seeds: list[int]
    base_seed: int
    per_seed_split: bool
    vars: dict[str, str]
    steps: list[dict]


@dataclass
class Task:
    """One command to run: a step, for one seed if it is per-seed."""
    step: str
    seed: int | None
    argv: list[str]          # script + flags, placeholders resolved
    inputs: list[str]
    outputs: list[str]
    optional_inputs: list[str] = ()
    optional: bool = False
    reuse_existing: bool = False

    @property
    def label(self) -> str:
        return self.step if self.seed is None else f"{self.step} (seed {self.seed})"

    @property
    def key(self) -> str:
        return self.step if self.seed is None else f"{self.step}@seed{self.seed}"

    @property
    def log_name(self) -> str:
        return self.step if self.seed is None else f"{self.step}_seed{self.seed}"


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe TOML (e.g. recipes/smoltalk.toml)")
    parser.add_argument("--run-dir", help="output folder (default: the recipe's run_dir)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds of the per-seed steps (default: the recipe's seeds)")
    parser.add_argument("--force", action="append", default=[], metavar="STEP",
                        help="rerun this step even if up to date (repeatable); later steps whose "
                             "inputs it rewrites rerun as well")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="override one of the recipe's [vars] (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands and whether each would run; run and write nothing")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="run up to N steps at once, each when the steps it needs are done "
                             "(default: 1, or one per --gpus entry)")
    parser.add_argument("--gpus", metavar="ID[,ID...]",
                        help="GPU slots: each entry is one slot, an id may repeat (0,0,1); with "
                             "--jobs N the list is cycled to N slots (--gpus 0 --jobs 5: five "
                             "on GPU 0); each step runs with CUDA_VISIBLE_DEVICES=<its slot's id>")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the scripts (default: this one, so `uv run` "
                             "and a bare python3 both work); commands.sh always shows "
                             "`uv run python`")
    parser.add_argument("--oom-retries", type=int, default=2, metavar="N",
                        help="with --jobs > 1: start a step that ran out of GPU memory again, up "
                             "to N times, once another step has ended other than out of memory, or "
                             f"after {OOM_RETRY_WAIT_S} s (0: fail at once)")
    parser.add_argument("--min-free-gib", type=float, default=0, metavar="G",
                        help="with --jobs > 1: start a step on a GPU where steps of the run are "
                             "running only while nvidia-smi reports G GiB free there, plus G for "
                             f"each step started there in the last {SETTLE_S} s (not yet at its "
                             "peak); 0: off")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# recipe: load, check, resolve placeholders


def load_recipe(path: Path, run_dir: str | None, seeds: list[int] | None,
                var_overrides: list[str]) -> Recipe:
    if not path.is_file():
        raise RunnerError(f"recipe {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunnerError(f"recipe {path} is not valid TOML: {err}")
    head, variables, steps = check_recipe_types(path, data)
    for item in var_overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in variables:
            raise RunnerError(f"--var {item}: expected NAME=VALUE with NAME one of the recipe's "
                              f"[vars] ({', '.join(variables) or 'none'})")
        variables[name] = value
    shadowed = set(variables) & set(BUILTIN_PLACEHOLDERS)
    if shadowed:
        raise RunnerError(f"recipe {path}: [vars] may not redefine {', '.join(sorted(shadowed))}")
    recipe = Recipe(path=path, run_dir=run_dir or head.get("run_dir", ""),
                    seeds=(check_seeds(seeds, "--seeds") if seeds is not None
                           else check_seeds(head.get("seeds", [42]), f"recipe {path}: seeds")),
                    base_seed=check_seeds([head.get("base_seed", 42)],
                                          f"recipe {path}: base_seed")[0],
                    per_seed_split=head.get("per_seed_split", False),
                    vars=variables, steps=steps)
    if not recipe.run_dir:
        raise RunnerError(f"recipe {path} has no [recipe] run_dir; pass --run-dir")
    check_steps(recipe)
    plan_tasks(recipe)   # its checks: scripts, outputs, before anything runs
    return recipe


def type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def check_recipe_types(path: Path, data: dict) -> tuple[dict, dict[str, str], list[dict]]:
    """([recipe] table, [vars] as strings, [[steps]] tables), each checked for its TOML type, so
    that a recipe of the wrong shape is one error line and not a traceback later."""
    where = f"recipe {path}"
    unknown = set(data) - {"recipe", "vars", "steps"}
    if unknown:
        raise RunnerError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    head, variables, steps = data.get("recipe", {}), data.get("vars", {}), data.get("steps", [])
    if not isinstance(head, dict):
        raise RunnerError(f"{where}: recipe must be a [recipe] table, not {type_name(head)}")
    unknown = set(head) - RECIPE_TYPES.keys()
    if unknown:
        raise RunnerError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key, value in head.items():
        expected = RECIPE_TYPES[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise RunnerError(f"{where}: [recipe] {key} must be {type_name(expected())}, not "
                              f"{type_name(value)} ({value!r})")
    if not isinstance(variables, dict):
        raise RunnerError(f"{where}: vars must be a [vars] table, not {type_name(variables)}")
    for name, value in variables.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RunnerError(f"{where}: [vars] {name} must be a string or a number, not "
                              f"{type_name(value)}")
    if isinstance(steps, dict):
        raise RunnerError(f"{where}: steps is a [steps] table; write each step as its own "
                          "[[steps]] entry (an array of tables)")
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise RunnerError(f"{where}: steps must be [[steps]] entries (an array of tables)")
    return head, {str(k): str(v) for k, v in variables.items()}, steps


def check_seeds(seeds, what: str) -> list[int]:
    """Seeds are non-negative integers (numpy's default_rng refuses negative ones), each once."""
    if not isinstance(seeds, list) or not seeds:
        raise RunnerError(f"{what} must be a non-empty list of integers, not {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RunnerError(f"{what}: {seed!r} is not a non-negative integer")
    if len(set(seeds)) != len(seeds):
        raise RunnerError(f"{what} lists a seed twice ({seeds})")
    return list(seeds)


def check_steps(recipe: Recipe) -> None:
    where = f"recipe {recipe.path}"
    if not recipe.steps:
        raise RunnerError(f"{where} has no [[steps]]")
    seen = set()
    for i, step in enumerate(recipe.steps):
        name = step.get("name")
        if not isinstance(name, str) or not STEP_NAME.match(name):
            raise RunnerError(f"{where}: step {i + 1} needs a name (letters, digits, _ . -)")
        if name in seen:
            raise RunnerError(f"{where}: step name {name} is used twice")
        seen.add(name)
        unknown = set(step) - STEP_KEYS
        if unknown:
            raise RunnerError(f"{where}: step {name} has unknown key(s) "
                              f"{', '.join(sorted(unknown))}")
        if not isinstance(step.get("run"), str) or not step["run"].strip():
            raise RunnerError(f"{where}: step {name} needs run = \"script.py --flags ...\"")
        for key in STEP_LIST_KEYS:
            value = step.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RunnerError(f"{where}: step {name}: {key} must be a list of strings, not "
                                  f"{value!r}")
        for key in STEP_BOOL_KEYS:
            if not isinstance(step.get(key, False), bool):
                raise RunnerError(f"{where}: step {name}: {key} must be true or false, not "
                                  f"{step[key]!r}")
        if not isinstance(step.get("comment", ""), str):
            raise RunnerError(f"{where}: step {name}: comment must be a string")
        if not step.get("outputs"):
            raise RunnerError(f"{where}: step {name} declares no outputs (paths that must exist "
                              "after it)")
        per_seed = step.get("per_seed", False)
        if not (isinstance(per_seed, bool) or per_seed == "split"):
            raise RunnerError(f"{where}: step {name}: per_seed must be true, false or \"split\"")
        both = set(step.get("inputs", [])) & set(step.get("optional_inputs", []))
        if both:
            raise RunnerError(f"{where}: step {name}: {sorted(both)[0]} is in both inputs and "
                              "optional_inputs")
        for text in [step["run"], *step["outputs"], *step.get("inputs", []),
                     *step.get("optional_inputs", [])]:
            check_placeholders(recipe, step, text)


def step_is_per_seed(recipe: Recipe, step: dict) -> bool:
    per_seed = step.get("per_seed", False)
    return per_seed is True or (per_seed == "split" and recipe.per_seed_split)


def check_placeholders(recipe: Recipe, step: dict, text: str) -> None:
    """Every {name} in a step's text (and in the [vars] it uses) must be known; a [vars] value may
    use the built-in placeholders only; {seed_dir} (and {split_dir} under per_seed_split) only in
    a per-seed step."""
    used = placeholder_names(text)
    for name in used:
        if name not in BUILTIN_PLACEHOLDERS and name not in recipe.vars:
            known = sorted(set(BUILTIN_PLACEHOLDERS) | set(recipe.vars))
            raise RunnerError(f"recipe {recipe.path}: step {step['name']} uses unknown "
                              f"placeholder {{{name}}} (known: "
                              f"{', '.join('{' + k + '}' for k in known)})")
    for var in [n for n in used if n in recipe.vars]:
        for name in placeholder_names(recipe.vars[var]):
            if name not in BUILTIN_PLACEHOLDERS:
                builtins = ", ".join("{" + k + "}" for k in BUILTIN_PLACEHOLDERS)
                raise RunnerError(f"recipe {recipe.path}: [vars] {var} uses {{{name}}}; a var may "
                                  f"use only {builtins}")
            used.append(name)
    per_seed = step_is_per_seed(recipe, step)
    for name in used:
        needs_seed = (name in SEED_ONLY_PLACEHOLDERS
                      or (name == "split_dir" and recipe.per_seed_split))
        if needs_seed and not per_seed:
            raise RunnerError(f"recipe {recipe.path}: step {step['name']} is not per-seed but "
                              f"uses {{{name}}}")


def placeholder_names(text: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise RunnerError(f"bad placeholder syntax in {text!r}: {err}")


class _KeepUnknown(dict):
    def __missing__(self, key):  # a [vars] value this step does not use may stay unresolved
        return "{" + key + "}"


def resolve(recipe: Recipe, text: str, seed: int | None, quote: bool = False) -> str:
    """Fill the placeholders of one string (checked beforehand by check_placeholders). With quote
    (a command line, split into words next), every value is shell-quoted so it stays one word,
    spaces and all, except a [vars] value that holds flags (is_flags): it goes in as written, to
    be split into several words, and an empty one, which adds no word."""
    plain = _KeepUnknown(run_dir=recipe.run_dir,
                         seed=str(recipe.base_seed if seed is None else seed))
    if seed is not None:
        plain["seed_dir"] = f"{recipe.run_dir}/seed_{seed}"
    if seed is not None or not recipe.per_seed_split:
        plain["split_dir"] = plain["seed_dir"] if recipe.per_seed_split else plain["run_dir"]
    if not quote:
        values = _KeepUnknown(plain)
        values.update({k: v.format_map(plain) for k, v in recipe.vars.items()})
        return text.format_map(values)
    quoted = _KeepUnknown({k: shlex.quote(v) for k, v in plain.items()})
    values = _KeepUnknown(quoted)
    for name, value in recipe.vars.items():
        if is_flags(value):
            values[name] = value.format_map(quoted)   # a path in a flag stays one word too
        else:
            value = value.format_map(plain)
            values[name] = shlex.quote(value) if value.strip() else ""
    return text.format_map(values)


def is_flags(value: str) -> bool:
    """A [vars] value that starts with `-` holds flags ("--dataset-config smol-magpie-ultra"):
    it is split like shell words in a command. Any other value is one word (a path with spaces
    reaches the script as one argument)."""
    return value.lstrip().startswith("-")


def split_command(run: str) -> list[str]:
    """A resolved command as argv, split like shell words (backslash-newlines join lines); a
    leading `uv run [python]` or `python` is dropped: the runner supplies the interpreter."""
    argv = shlex.split(run.replace("\\\n", " "))
    for prefix in (["uv", "run", "python"], ["uv", "run"], ["python"], ["python3"]):
        if argv[:len(prefix)] == prefix:
            return argv[len(prefix):]
    return argv


def plan_tasks(recipe: Recipe) -> list[Task]:
    """Every command of the run in order: steps in recipe order, a per-seed step once per seed;
    checked (scripts exist, check_outputs) before it is returned."""
    tasks = []
    for step in recipe.steps:
        seeds = recipe.seeds if step_is_per_seed(recipe, step) else [None]
        for seed in seeds:
            where = f"recipe {recipe.path}: step {step['name']}"
            try:
                argv = split_command(resolve(recipe, step["run"], seed, quote=True))
            except ValueError as err:   # an unclosed quote
                raise RunnerError(f"{where}: run cannot be split into words ({err})")
            if not argv or not argv[0].endswith(".py"):
                raise RunnerError(f"{where}: run must start with the script (script.py --flags "
                                  f"...), got {argv[:1]}")
            if not step.get("optional", False) and not repo_path(argv[0]).is_file():
                # found now, not hours later when the step comes up
                raise RunnerError(f"{where}: script {argv[0]} does not exist (a step whose "
                                  "script may be absent is marked optional = true)")
            tasks.append(Task(
                step=step["name"], seed=seed,
                argv=argv,
                inputs=[resolve(recipe, p, seed) for p in step.get("inputs", [])],
                outputs=[resolve(recipe, p, seed) for p in step["outputs"]],
                optional_inputs=[resolve(recipe, p, seed)
                                 for p in step.get("optional_inputs", [])],
                optional=bool(step.get("optional", False)),
                reuse_existing=bool(step.get("reuse_existing", False))))
    check_outputs(recipe, tasks)
    return tasks


def check_outputs(recipe: Recipe, tasks: list[Task]) -> None:
    """Each output belongs to one task. Two tasks declaring one path overwrite each other; a
    path inside another task's output folder is deleted when that folder is staged anew, and
    keeps the folder existing when its own files are gone, so the other task passes as up to
    date. A task may declare a folder and files inside it."""
    owner: dict[tuple[str, ...], tuple[Task, str]] = {}
    for task in tasks:
        for out in task.outputs:
            first = owner.setdefault(path_parts(out), (task, out))
            if first[0] is not task:
                hint = (" (a per-seed step's outputs need {seed_dir} or {seed})"
                        if first[0].step == task.step else "")
                raise RunnerError(f"recipe {recipe.path}: steps {first[0].label} and "
                                  f"{task.label} both declare the output {out}{hint}")
    for task in tasks:
        for out in task.outputs:
            parts = path_parts(out)
            for end in range(1, len(parts)):
                outer = owner.get(parts[:end])
                if outer and outer[0] is not task:
                    raise RunnerError(f"recipe {recipe.path}: step {task.label}'s output {out} "
                                      f"lies inside step {outer[0].label}'s output {outer[1]}; "
                                      "declare each output in one step")


# ---------------------------------------------------------------------------------------------
# fingerprints and state


def repo_path(path: str) -> Path:
    return ROOT / path  # an absolute path stays as it is


def hash_path(path: Path) -> str:
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        relative = item.relative_to(path)
        if not item.is_file() or ignored(relative):
            continue
        stat = item.stat()
        small = stat.st_size <= SMALL_FILE_BYTES
        part = file_digest(item) if small else f"mtime_ns={stat.st_mtime_ns}"
        digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{part}\n".encode())
    return "dir:" + digest.hexdigest()


def ignored(relative: Path) -> bool:
    """Files in an input folder that readers write or that are not results: datasets' map caches
    (cache-*.arrow, written next to a split when a script reads it) and hidden/staging files."""
    name = relative.name
    return (any(part.startswith(".") for part in relative.parts)
            or (name.startswith("cache-") and name.endswith(".arrow")))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_input(pattern: str) -> str:
    """One declared input: a path, or a glob (e.g. {run_dir}/seed_*/eval_*.json) whose sorted
    matches are hashed together."""
    if not glob.has_magic(pattern):
        return hash_path(repo_path(pattern))
    matches = sorted(glob.glob(str(repo_path(pattern)), recursive=True))
    if not matches:
        return "missing"
    blob = "\n".join(f"{m}\0{hash_path(Path(m))}" for m in matches)
    return "glob:" + hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(task: Task) -> dict:
    # one mapping for both kinds: moving a path between inputs and optional_inputs changes no
    # fingerprint, so no step reruns for it
    inputs = {p: hash_input(p) for p in [*task.inputs, *task.optional_inputs]}
    blob = json.dumps({"argv": task.argv, "inputs": inputs}, sort_keys=True)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest(), "inputs": inputs}


def load_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {"version": 1, "steps": {}}
    damaged = f"state file {path} is damaged"
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunnerError(f"{damaged} (not JSON: {err}); delete it to rerun every step")
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        raise RunnerError(f"{damaged} (no 'steps' object); delete it to rerun every step")
    for key, entry in state["steps"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("fingerprint", ""), str):
            raise RunnerError(f"{damaged} (entry {key!r} is not a step record); delete it to "
                              "rerun every step")
    return state


# ---------------------------------------------------------------------------------------------
# declared inputs: present, or written by an earlier step


def input_exists(pattern: str) -> bool:
    if glob.has_magic(pattern):
        return bool(glob.glob(str(repo_path(pattern)), recursive=True))
    return repo_path(pattern).exists()


def may_write(output: str, pattern: str) -> bool:
    """Could a step that declares `output` create `pattern`: the same path, a path inside it, or
    a folder that will hold it. Globs are matched part by part over the shorter of the two."""
    for out_part, in_part in zip(path_parts(output), path_parts(pattern)):
        if in_part == "**":
            return True
        if out_part != in_part and not (glob.has_magic(in_part)
                                         and fnmatch.fnmatchcase(out_part, in_part)):
            return False
    return True


@functools.lru_cache(maxsize=None)
def path_parts(path: str) -> tuple[str, ...]:
    # cached: the DAG compares every pair of tasks' paths (hundreds of tasks in a big recipe)
    return Path(os.path.normpath(repo_path(path))).parts


def check_inputs_declared(recipe: Recipe, tasks: list[Task]) -> None:
    """Before anything runs: each required input exists now, or an earlier step declares it (or
    a folder around it) as an output."""
    produced: list[str] = []
    for task in tasks:
        if task.optional and not repo_path(task.argv[0]).is_file():
            continue  # skipped: writes nothing
        for pattern in task.inputs:
            if not input_exists(pattern) and not any(may_write(o, pattern) for o in produced):
                raise RunnerError(f"recipe {recipe.path}: step {task.label}: input {pattern} "
                                  "does not exist and no earlier step writes it (a hub id, or "
                                  "an input that may be absent, goes under optional_inputs)")
        produced.extend(task.outputs)


def check_inputs_present(task: Task) -> None:
    """When the step comes up: what an earlier step should have written is there."""
    missing = [p for p in task.inputs if not input_exists(p)]
    if missing:
        raise RunnerError(f"step {task.label}: input {missing[0]} does not exist (the steps "
                          "before it did not write it; a hub id, or an input that may be "
                          "absent, goes under optional_inputs)")


def decide(task: Task, state: dict, forced: set[str]) -> str:
    """'run' or why it is skipped."""
    if task.optional and not repo_path(task.argv[0]).is_file():
        return f"skip (optional; {task.argv[0]} does not exist)"
    if task.step in forced:
        return "run (forced)"
    if not all(repo_path(p).exists() for p in task.outputs):
        return "run"
    if task.reuse_existing:
        return "skip (outputs exist; reuse_existing)"
    recorded = state["steps"].get(task.key, {}).get("fingerprint")
    if recorded is None:
        return "run (outputs exist but no record of a successful run)"
    if recorded != fingerprint(task)["fingerprint"]:
        return "run (command or inputs changed)"
    return "skip (up to date)"


# ---------------------------------------------------------------------------------------------
# one runner per run dir


class RunLock:
    """<run_dir>/.runner.lock: an exclusive flock (the kernel drops it when its holder dies, so a
    lock is never stale in the sense of blocking), with pid, host and start time inside for the
    messages. The file is removed at a clean end; one left behind names a runner that died."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock; returns what a dead holder left in the file, else None."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunnerError(f"run dir {self.path.parent} is in use by another runner "
                                  f"({describe_holder(holder)}; lock {self.path}); wait for it "
                                  "to finish or stop it first")
            except OSError as err:
                os.close(fd)
                raise RunnerError(f"cannot lock {self.path}: {err}")
            # the holder may have removed the file between our open and flock: then we hold a
            # lock on a deleted file, and must lock the path's current file instead
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read(fd)
        me = {"pid": os.getpid(), "host": platform.node(),
              "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return previous

    @staticmethod
    def _read(fd: int) -> dict | None:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        return holder if isinstance(holder, dict) else {"unreadable": text[:100]}

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: nobody can take it in between
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    if "unreadable" in holder:
        return f"lock file reads {holder['unreadable']!r}"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, "
            f"started {holder.get('started_utc')}")


def remove_stale_temp(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(removed, kept): every `.*.tmp` under the run dir whose writer is gone is removed. Only
    called with the lock held: no other runner works here and the steps of earlier runners died
    with them; but a script started by hand may be writing into the run dir. Its temp name
    records its pid and host (pipeline.temp_prefix), so a temp whose writer is alive here, or
    runs on another host (whether it is alive cannot be told), is kept; one whose name records
    no writer was left by an earlier run. Not searched: other hidden folders (.git, .venv,
    caches: no step stages there) and a folder that another live runner holds (a run dir inside
    this one)."""
    removed, kept = [], []
    host = platform.node()
    for folder, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = Path(folder) / name
            writer = temp_writer(name)
            if writer and (writer[1] != host or process_alive(writer[0])):
                kept.append(path)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not held_by_live_runner(Path(folder) / d)]
    return removed, kept


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def held_by_live_runner(folder: Path) -> bool:
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing also drops the shared lock, if it was taken
    return False


def take_run_dir(run_dir: Path, lock: RunLock) -> None:
    previous = lock.acquire()
    if previous is not None:
        print(f"[runner] note: took over the lock {lock.path} left by a runner that is gone "
              f"({describe_holder(previous)})", flush=True)
    removed, kept = remove_stale_temp(run_dir)
    if removed:
        print(f"[runner] note: removed {len(removed)} temp folder(s)/file(s) an earlier, killed "
              f"run left in {run_dir}: {shown_paths(removed, run_dir)}", flush=True)
    if kept:
        print(f"[runner] note: kept {len(kept)} temp folder(s)/file(s) in {run_dir} whose writer "
              f"is still running (or runs on another host): {shown_paths(kept, run_dir)}",
              flush=True)


def shown_paths(paths: list[Path], run_dir: Path) -> str:
    shown = ", ".join(str(p.relative_to(run_dir)) for p in paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def on_stop_signal(signum, frame):
    raise Stopped(signum)


# ---------------------------------------------------------------------------------------------
# commands.sh and running


def commands_text(recipe: Recipe, tasks: list[Task]) -> str:
    seeds = " ".join(map(str, recipe.seeds))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = ["#!/usr/bin/env bash",
             f"# Every command of run {recipe.run_dir}, written by run_experiment.py from "
             f"{recipe.path} at {now} (seeds: {seeds}).",
             "# Placeholders resolved, in the order the runner runs them; run from the repository "
             "root to replay the run from scratch.",
             "set -euo pipefail"]
    for task in tasks:
        label = task.label
        command = shlex.join(["uv", "run", "python", *task.argv])
        if task.optional and not repo_path(task.argv[0]).is_file():
            lines += [f"# {label} [optional; {task.argv[0]} does not exist, so left out]",
                      f"# {command}"]
        else:
            lines += [f"# {label}" + (" [optional]" if task.optional else ""), command]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start_task(task: Task, python: str, run_dir: Path, gpu: str | None,
               n_slots: int = 1) -> tuple[subprocess.Popen, Path]:
    script = repo_path(task.argv[0])
    if not script.is_file():
        raise StepFailed(f"step {task.step}: script {task.argv[0]} does not exist")
    log_path = run_dir / "logs" / f"{task.log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if n_slots > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N steps at once would each start a thread per core for torch's CPU ops and fight over
        # the cores; the CPU side of a GPU step (kernel launches, collation) needs one or two
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_slots))
    with open(log_path, "w") as log:  # the step keeps its own copy of the file descriptor
        log.write(f"$ {shlex.join([python, *task.argv])}\n")
        log.flush()
        # the step stays in the runner's process group: a signal to the group reaches both
        step = subprocess.Popen([python, *task.argv], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    return step, log_path


def check_finished(task: Task, code: int, log_path: Path) -> None:
    label = task.label
    if code != 0:
        raise StepFailed(f"step {label} failed with exit code {code}{last_error(log_path)}; "
                         f"log: {log_path}")
    missing = [p for p in task.outputs if not repo_path(p).exists()]
    if missing:
        raise StepFailed(f"step {label} exited 0 but did not write {', '.join(missing)}; "
                         f"log: {log_path}")


def die_with_parent():
    """A preexec function asking the kernel to SIGTERM the step when the runner dies, even by
    SIGKILL, which no handler in the runner sees (Linux only; elsewhere None: the runner's
    signal handlers still stop the step)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    runner_pid = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != runner_pid:  # the runner died before prctl took effect
            os._exit(128 + signal.SIGTERM)
    return preexec


def last_error(log_path: Path) -> str:
    """The script's own `error: ...` line, if it printed one (scripts end with it)."""
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    return f" ({lines[-1].strip()[:300]})" if lines and lines[-1].startswith("error:") else ""


def record_success(state: dict, task: Task, fp: dict, wall_s: float, run_dir: Path) -> None:
    state["steps"][task.key] = {
        **fp, "argv": task.argv, "outputs": task.outputs, "wall_s": round(wall_s, 2),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(run_dir / STATE_FILE, state)


@dataclass
class Running:
    task: Task
    slot: int
    step: subprocess.Popen
    log_path: Path
    fp: dict        # the inputs as they were when it started
    start: float


class Scheduler:
    """Runs the tasks over the slots: a task starts when the tasks it waits for are done, the
    earliest ready one in recipe order first. One thread starts, reaps and records every step:
    the state file has one writer, and PR_SET_PDEATHSIG fires when the *thread* that started a
    step ends, so steps must not be started from worker threads. Polling the running steps
    (every POLL_S) is what lets a plain signal handler interrupt the wait at any moment."""

    def __init__(self, recipe: Recipe, tasks: list[Task], forced: set[str], python: str,
                 slots: list[str | None], oom_retries: int = 0, min_free_gib: float = 0):
        self.tasks, self.forced, self.python, self.slots = tasks, forced, python, slots
        self.min_free_mib = 0 if len(slots) == 1 else min_free_gib * 1024
        self.free_read: tuple[float, dict] = (-math.inf, {})
        self.waiting_for = None   # (GPU, steps settling) of the last "waiting" line
        self.oom_retries = oom_retries
        self.retries: dict[int, int] = {}            # task -> out-of-memory restarts so far
        self.held: dict[int, tuple[int, float]] = {}  # task -> (steps ended, time) at its OOM
        self.ended = 0             # steps ended (succeeded, or failed other than out of memory)
        self.run_dir = repo_path(recipe.run_dir)
        self.state = load_state(self.run_dir)
        self.deps = dependencies(tasks)
        self.sequential = len(slots) == 1   # the first failure ends the run, as it always did
        self.show_slots = not (self.sequential and slots[0] is None)
        self.pending = list(range(len(tasks)))      # recipe order
        self.done: set[int] = set()                  # succeeded or skipped
        self.failed: dict[int, Exception] = {}
        self.left_out: dict[int, set[int]] = {}     # task -> the failed tasks it needed
        self.running: dict[int, Running] = {}
        self.free = list(range(len(slots)))

    def run(self) -> None:
        try:
            while self.pending or self.running:
                self.reap()
                self.leave_out_dependants()
                self.dispatch()
                if self.sequential and self.running:
                    next(iter(self.running.values())).step.wait()
                elif self.running or self.pending:   # pending alone: a step held after an OOM
                    time.sleep(POLL_S)
        except BaseException as err:  # a failure (--jobs 1), Ctrl-C, SIGTERM/SIGHUP (Stopped)
            if isinstance(err, Stopped) and not self.sequential:
                err.running = [run.task.key for run in self.running.values()]
            self.stop_all()
            raise
        if self.failed:
            code = 1 if any(isinstance(e, StepFailed) for e in self.failed.values()) else 2
            raise RunFailed(self.failure_lines(), code)

    def reap(self) -> None:
        for i, run in list(self.running.items()):
            code = run.step.poll()
            if code is None:
                continue
            with signals_held():  # a SIGTERM now would lose a finished step's record
                del self.running[i]
                self.free.append(run.slot)
                self.free.sort()
                wall_s = time.time() - run.start
                try:
                    check_finished(run.task, code, run.log_path)
                except StepFailed as err:
                    # a step that ran out of memory releases no held step: on the H200 ten
                    # trainings ran out together and, each releasing the next, spent their
                    # retries within a minute
                    if self.retry_after_oom(i, run, wall_s):
                        continue
                    self.ended += 1
                    self.fail(i, err, f"failed after {wall_s:.1f} s{self.where(run.slot)}; "
                                      f"log: {run.log_path}")
                    continue
                self.ended += 1
                record_success(self.state, run.task, run.fp, wall_s, self.run_dir)
                self.done.add(i)
            print(f"[runner] {run.task.key}: done in {wall_s:.1f} s{self.where(run.slot)}",
                  flush=True)

    def retry_after_oom(self, i: int, run: Running, wall_s: float) -> bool:
        """Put a step that ran out of GPU memory back in the queue (its log kept aside), to
        start once another step has ended or after OOM_RETRY_WAIT_S; False: a real failure."""
        if self.sequential or self.retries.get(i, 0) >= self.oom_retries:
            return False
        log_text = run.log_path.read_text(errors="replace")
        if not any(mark in log_text for mark in OOM_MARKS):
            return False
        self.retries[i] = self.retries.get(i, 0) + 1
        kept = run.log_path.with_suffix(f".oom{self.retries[i]}.log")
        run.log_path.rename(kept)
        self.held[i] = (self.ended, time.time())
        self.pending.append(i)
        self.pending.sort()   # recipe order
        print(f"[runner] {run.task.key}: out of GPU memory after {wall_s:.1f} s"
              f"{self.where(run.slot)}; starts again (retry {self.retries[i]}/{self.oom_retries}) "
              f"once another step ends; log: {kept}", flush=True)
        return True

    def ready(self, i: int) -> bool:
        if i in self.held:
            ended, since = self.held[i]
            if self.ended == ended and time.time() - since < OOM_RETRY_WAIT_S:
                return False
            del self.held[i]
        return all(j in self.done for j in self.deps[i])

    def leave_out_dependants(self) -> None:
        """Drop every pending task that needs a failed one (directly or through a dropped one);
        one pass suffices since a task waits only for earlier ones."""
        for i in list(self.pending):
            causes = set()
            for j in self.deps[i]:
                causes |= {j} if j in self.failed else self.left_out.get(j, set())
            if causes:
                self.pending.remove(i)
                self.left_out[i] = causes
                names = ", ".join(self.tasks[j].key for j in sorted(causes))
                print(f"[runner] {self.tasks[i].key}: skip (needs {names}, which failed)",
                      flush=True)

    def dispatch(self) -> None:
        while self.free:
            i = next((i for i in self.pending if self.ready(i)), None)
            if i is None:
                return
            # before the task's checks and fingerprint: a wait for memory must not redo them
            # every poll
            slot = next((s for s in self.free if self.memory_allows(s)), None)
            if slot is None:   # no GPU with a free slot has the memory yet
                return
            self.pending.remove(i)
            task = self.tasks[i]
            if not (task.optional and not repo_path(task.argv[0]).is_file()):
                try:
                    check_inputs_present(task)
                except RunnerError as err:
                    self.fail(i, err, f"not started: {err}")
                    continue
            decision = decide(task, self.state, self.forced)
            if decision.startswith("skip"):
                print(f"[runner] {task.key}: {decision}", flush=True)
                self.done.add(i)
                continue
            self.free.remove(slot)
            print(f"[runner] {task.key}: {decision}{self.where(slot)}: {shlex.join(task.argv)}",
                  flush=True)
            fp = fingerprint(task)  # inputs as they are before the step runs
            start = time.time()
            try:
                step, log_path = start_task(task, self.python, self.run_dir, self.slots[slot],
                                             len(self.slots))
            except StepFailed as err:
                self.free = sorted([slot, *self.free])
                self.fail(i, err, f"not started: {err}")
                continue
            self.running[i] = Running(task, slot, step, log_path, fp, start)

    def memory_allows(self, slot: int) -> bool:
        """--min-free-gib: the slot's GPU has G GiB free beyond G for each step running there
        that started in the last SETTLE_S; always, when no step of the run runs there (the run
        goes on)."""
        if not self.min_free_mib:
            return True
        gpu = self.slots[slot]
        if not any(self.slots[run.slot] == gpu for run in self.running.values()):
            return True
        now = time.time()
        if now - self.free_read[0] > FREE_MEMORY_CACHE_S:
            self.free_read = (now, gpu_free_mib())
        free = self.free_read[1]
        # an unpinned slot sees every GPU the runner sees
        visible = [gpu] if gpu is not None else (
            [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
            if os.environ.get("CUDA_VISIBLE_DEVICES") else list(free))
        if any(g not in free for g in visible):
            raise RunnerError(f"--min-free-gib: nvidia-smi lists no GPU {visible} "
                              f"(it lists {', '.join(free) or 'none'})")
        available = min(free[g] for g in visible)
        settling = sum(1 for run in self.running.values()
                       if self.slots[run.slot] == gpu and now - run.start < SETTLE_S)
        if available - settling * self.min_free_mib >= self.min_free_mib:
            self.waiting_for = None
            return True
        if self.waiting_for != (gpu, settling):   # one line per change, not one per poll
            print(f"[runner] waiting for GPU memory: {available / 1024:.1f} GiB free"
                  f"{f' on GPU {gpu}' if gpu is not None else ''}, {settling} step(s) started "
                  f"there in the last {SETTLE_S} s; the next starts at "
                  f"{(settling + 1) * self.min_free_mib / 1024:g} GiB free", flush=True)
            self.waiting_for = (gpu, settling)
        return False

    def fail(self, i: int, err: Exception, note: str) -> None:
        if self.sequential:
            raise err
        self.failed[i] = err
        print(f"[runner] {self.tasks[i].key}: {note}", flush=True)

    def where(self, slot: int) -> str:
        """' [slot 2/4, GPU 0, 14:03:07]', or '' when the run has one unpinned slot (as ever)."""
        if not self.show_slots:
            return ""
        gpu = self.slots[slot]
        parts = [f"slot {slot + 1}/{len(self.slots)}", *([f"GPU {gpu}"] if gpu else []),
                 time.strftime("%H:%M:%S")]
        return f" [{', '.join(parts)}]"

    def stop_all(self) -> None:
        """SIGTERM every running step (scripts clean up their staging on it), SIGKILL what is
        left after one grace period; signals held, so a second SIGTERM cannot cut this short
        and leave a step behind."""
        with signals_held():
            steps = [run.step for run in self.running.values() if run.step.poll() is None]
            for step in steps:
                step.terminate()
            deadline = time.monotonic() + STEP_STOP_GRACE_S
            for step in steps:
                try:
                    step.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    step.kill()
                    step.wait()

    def failure_lines(self) -> list[str]:
        lines = []
        for i in sorted(self.failed):
            lines.append(f"error: {self.failed[i]}")
            dropped = [self.tasks[j].key for j in sorted(self.left_out) if i in self.left_out[j]]
            if dropped:
                lines.append(f"skipped because {self.tasks[i].key} failed: {', '.join(dropped)}")
        return lines


@contextlib.contextmanager
def signals_held():
    """Defer SIGTERM/SIGHUP/SIGINT over a piece of bookkeeping (delivered right after it). Never
    around starting a step: a child would inherit the blocked mask and ignore SIGTERM."""
    held = (*STOP_SIGNALS, signal.SIGINT)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def execute(recipe: Recipe, tasks: list[Task], forced: set[str], python: str,
            slots: list[str | None], oom_retries: int = 0, min_free_gib: float = 0) -> None:
    Scheduler(recipe, tasks, forced, python, slots, oom_retries, min_free_gib).run()


def gpu_free_mib() -> dict[str, int]:
    """{GPU index: free MiB} as nvidia-smi reports them (--min-free-gib)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RunnerError(f"--min-free-gib needs nvidia-smi: {err}") from err
    if out.returncode != 0:
        raise RunnerError(f"--min-free-gib: nvidia-smi failed: {out.stderr.strip()[:200]}")
    try:
        return {index.strip(): int(float(free)) for index, free in
                (line.split(",") for line in out.stdout.strip().splitlines())}
    except ValueError as err:
        raise RunnerError(f"--min-free-gib: cannot read nvidia-smi's output "
                          f"{out.stdout.strip()[:200]!r}") from err


# ---------------------------------------------------------------------------------------------
# slots and the DAG


def plan_slots(jobs: int | None, gpus: str | None) -> list[str | None]:
    """One entry per slot: the CUDA_VISIBLE_DEVICES of the steps it runs (None: left as the
    runner's). --gpus lists the slots (an id may repeat); --jobs N cycles that list to N slots;
    --jobs alone gives N unpinned slots."""
    if jobs is not None and jobs < 1:
        raise RunnerError(f"--jobs {jobs}: must be at least 1")
    if gpus is None:
        return [None] * (jobs or 1)
    ids = [g.strip() for g in gpus.split(",")]
    bad = [g for g in ids if not GPU_ID.match(g)]
    if bad:
        raise RunnerError(f"--gpus {gpus}: {bad[0]!r} is not a GPU id (expected ids separated by "
                          "commas, an id repeated for several slots on one GPU: 0,0,1; or "
                          "GPU-<uuid>)")
    jobs = jobs or len(ids)
    if jobs < len(ids):
        raise RunnerError(f"--jobs {jobs} is fewer than the {len(ids)} slots of --gpus {gpus}: "
                          "the last would never be used; list fewer GPUs or raise --jobs")
    return [ids[i % len(ids)] for i in range(jobs)]


def describe_slots(slots: list[str | None]) -> str:
    return ", ".join(f"{n}={'GPU ' + gpu if gpu else 'unpinned'}"
                     for n, gpu in enumerate(slots, 1))


def reads(task: Task) -> list[str]:
    return [*task.inputs, *task.optional_inputs]


def must_follow(earlier: Task, later: Task) -> bool:
    """`later` reads or rewrites what `earlier` writes, or rewrites what `earlier` reads."""
    return (any(may_write(out, path) for out in earlier.outputs
                for path in [*reads(later), *later.outputs])
            or any(may_write(out, path) for out in later.outputs for path in reads(earlier)))


def dependencies(tasks: list[Task]) -> list[list[int]]:
    """For each task, the earlier tasks (indices) it waits for."""
    return [[j for j in range(i) if must_follow(tasks[j], tasks[i])] for i in range(len(tasks))]


def dag_lines(tasks: list[Task], deps: list[list[int]]) -> list[str]:
    """Each task's level (1 + the deepest task it waits for) and the tasks it waits for, less
    those it waits for anyway through another (shown once, not 30 times for a report step)."""
    level, ancestors = [], []
    for direct in deps:
        level.append(1 + max((level[j] for j in direct), default=0))
        ancestors.append(set(direct).union(*(ancestors[j] for j in direct)))
    lines = ["# DAG: a task waits for the tasks after '<-'; those of one level may run at once"]
    for i in sorted(range(len(tasks)), key=lambda i: (level[i], i)):
        shown = [j for j in deps[i] if not any(j in ancestors[k] for k in deps[i])]
        after = f" <- {', '.join(tasks[j].key for j in shown)}" if shown else ""
        lines.append(f"# level {level[i]}: {tasks[i].key}{after}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(Path(args.recipe), args.run_dir, args.seeds, args.var)
    names = [s["name"] for s in recipe.steps]
    unknown = [f for f in args.force if f not in names]
    if unknown:
        raise RunnerError(f"--force {', '.join(unknown)}: no such step in {recipe.path} "
                          f"(steps: {', '.join(names)})")
    slots = plan_slots(args.jobs, args.gpus)
    if args.oom_retries < 0:
        raise RunnerError(f"--oom-retries {args.oom_retries}: must be 0 or more")
    if args.min_free_gib < 0:
        raise RunnerError(f"--min-free-gib {args.min_free_gib}: must be 0 or more")
    tasks = plan_tasks(recipe)
    check_inputs_declared(recipe, tasks)
    text = commands_text(recipe, tasks)
    if args.dry_run:
        state = load_state(repo_path(recipe.run_dir))
        print(text, end="")
        for task in tasks:
            print(f"# {task.key}: {decide(task, state, set(args.force))}")
        print("\n".join(dag_lines(tasks, dependencies(tasks))))
        print(f"# slots: {describe_slots(slots)}")
        return
    run_dir = repo_path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    lock = RunLock(run_dir)
    try:
        take_run_dir(run_dir, lock)
        write_text_atomic(run_dir / "commands.sh", text)
        if slots != [None]:
            print(f"[runner] up to {len(slots)} step(s) at once; slots: {describe_slots(slots)}",
                  flush=True)
        execute(recipe, tasks, set(args.force), args.python, slots, args.oom_retries,
                args.min_free_gib)
    finally:
        lock.release()
        for signum, handler in handlers.items():  # main() may run inside another program
            signal.signal(signum, handler)
    print(f"[runner] all steps done; commands: {run_dir / 'commands.sh'}")


def cli(argv=None) -> None:
    """main() with its errors as one message and the exit code the docstring lists."""
    try:
        main(argv)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except RunFailed as failed:
        print("\n".join(failed.lines), file=sys.stderr)
        sys.exit(failed.code)
    except KeyboardInterrupt:
        print("error: interrupted; the same command resumes at the step that was running",
              file=sys.stderr)
        sys.exit(130)
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        if stop.running is None:
            print(f"error: stopped by {name} (the running step was stopped with it); the same "
                  "command resumes at that step", file=sys.stderr)
        else:
            print(f"error: stopped by {name} ({len(stop.running)} running step(s) stopped with "
                  f"it: {', '.join(stop.running) or 'none'}); the same command resumes at them",
                  file=sys.stderr)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    cli()
