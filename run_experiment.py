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
braces). The command is resolved, then split like shell words: a [vars] value may hold several
flags ("--dataset-config smol-magpie-ultra"), the built-in paths stay one word each. A [vars] value
may use the built-in placeholders, not other vars. Relative paths are relative to the repository
root. An input may be a glob ({run_dir}/seed_*/eval_*.json).

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

One runner per run dir: <run_dir>/.runner.lock (an flock, holding pid, host and start time)
is taken before anything is written and removed at the end; a second runner on the same run dir
stops with an error naming the holder. A lock left by a runner that died is taken over with a
note. Steps run in the runner's process group (so `kill -- -PGID` stops both), and die with the
runner however it ends: SIGTERM/SIGHUP stop the running step first, and a step gets SIGTERM from
the kernel if the runner is killed outright (Linux PR_SET_PDEATHSIG). With the lock held, every
`.*.tmp` staging folder or file under the run dir was left by an earlier, killed run (its runner
and steps are gone), so it is removed, with a note, before the first step.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import fcntl
import fnmatch
import glob
import hashlib
import json
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

from pipeline import write_json_atomic

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


class RunnerError(Exception):
    """A problem with the recipe or the command line; printed as one `error:` line, exit 2."""


class StepFailed(Exception):
    """A step exited non-zero; printed as one `error:` line, exit 1."""


class Stopped(BaseException):
    """The runner got SIGTERM/SIGHUP. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it before the running step is stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the scripts (default: this one, so `uv run` "
                             "and a bare python3 both work); commands.sh always shows "
                             "`uv run python`")
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
    (a command line), the built-in paths are shell-quoted so they stay one word; [vars] go in as
    written, so one var may hold several flags."""
    q = shlex.quote if quote else str
    values = _KeepUnknown(run_dir=q(recipe.run_dir),
                          seed=str(recipe.base_seed if seed is None else seed))
    if seed is not None:
        values["seed_dir"] = q(f"{recipe.run_dir}/seed_{seed}")
    if seed is not None or not recipe.per_seed_split:
        values["split_dir"] = values["seed_dir"] if recipe.per_seed_split else values["run_dir"]
    values.update({k: v.format_map(values) for k, v in recipe.vars.items()})
    return text.format_map(values)


def split_command(run: str) -> list[str]:
    """A resolved command as argv, split like shell words (backslash-newlines join lines); a
    leading `uv run [python]` or `python` is dropped: the runner supplies the interpreter."""
    argv = shlex.split(run.replace("\\\n", " "))
    for prefix in (["uv", "run", "python"], ["uv", "run"], ["python"], ["python3"]):
        if argv[:len(prefix)] == prefix:
            return argv[len(prefix):]
    return argv


def plan_tasks(recipe: Recipe) -> list[Task]:
    """Every command of the run in order: steps in recipe order, a per-seed step once per seed."""
    tasks = []
    for step in recipe.steps:
        seeds = recipe.seeds if step_is_per_seed(recipe, step) else [None]
        for seed in seeds:
            argv = split_command(resolve(recipe, step["run"], seed, quote=True))
            if not argv or not argv[0].endswith(".py"):
                raise RunnerError(f"recipe {recipe.path}: step {step['name']}: run must start "
                                  f"with the script (script.py --flags ...), got {argv[:1]}")
            tasks.append(Task(
                step=step["name"], seed=seed,
                argv=argv,
                inputs=[resolve(recipe, p, seed) for p in step.get("inputs", [])],
                outputs=[resolve(recipe, p, seed) for p in step["outputs"]],
                optional_inputs=[resolve(recipe, p, seed)
                                 for p in step.get("optional_inputs", [])],
                optional=bool(step.get("optional", False)),
                reuse_existing=bool(step.get("reuse_existing", False))))
    return tasks


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
    out_parts = Path(os.path.normpath(repo_path(output))).parts
    in_parts = Path(os.path.normpath(repo_path(pattern))).parts
    for out_part, in_part in zip(out_parts, in_parts):
        if in_part == "**":
            return True
        if not fnmatch.fnmatchcase(out_part, in_part):
            return False
    return True


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


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Every `.*.tmp` under the run dir. Only called with the lock held: no other runner works
    here and the steps of earlier runners died with them, so each was left by a dead process.
    Not searched: other hidden folders (.git, .venv, caches: no step stages there) and a folder
    that another live runner holds (a run dir inside this one)."""
    removed = []
    for folder, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            path = Path(folder) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not held_by_live_runner(Path(folder) / d)]
    return removed


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
    removed = remove_stale_temp(run_dir)
    if removed:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in removed[:5])
        more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
        print(f"[runner] note: removed {len(removed)} temp folder(s)/file(s) an earlier, killed "
              f"run left in {run_dir}: {shown}{more}", flush=True)


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


def run_task(task: Task, python: str, run_dir: Path) -> float:
    script = repo_path(task.argv[0])
    if not script.is_file():
        raise StepFailed(f"step {task.step}: script {task.argv[0]} does not exist")
    log_path = run_dir / "logs" / f"{task.log_name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join([python, *task.argv])}\n")
        log.flush()
        # the step stays in the runner's process group: a signal to the group reaches both
        step = subprocess.Popen([python, *task.argv], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        try:
            code = step.wait()
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (Stopped): the step goes first
            stop_step(step)
            raise
    label = task.label
    if code != 0:
        raise StepFailed(f"step {label} failed with exit code {code}{last_error(log_path)}; "
                         f"log: {log_path}")
    missing = [p for p in task.outputs if not repo_path(p).exists()]
    if missing:
        raise StepFailed(f"step {label} exited 0 but did not write {', '.join(missing)}; "
                         f"log: {log_path}")
    return time.time() - start


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


def stop_step(step: subprocess.Popen) -> None:
    """SIGTERM (scripts clean up their staging on it), then SIGKILL after a grace period."""
    if step.poll() is not None:
        return
    step.terminate()
    try:
        step.wait(STEP_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        step.kill()
        step.wait()


def last_error(log_path: Path) -> str:
    """The script's own `error: ...` line, if it printed one (scripts end with it)."""
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    return f" ({lines[-1].strip()[:300]})" if lines and lines[-1].startswith("error:") else ""


def record_success(state: dict, task: Task, fp: dict, wall_s: float, run_dir: Path) -> None:
    state["steps"][task.key] = {
        **fp, "argv": task.argv, "outputs": task.outputs, "wall_s": round(wall_s, 2),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(run_dir / STATE_FILE, state)


def execute(recipe: Recipe, tasks: list[Task], forced: set[str], python: str) -> None:
    run_dir = repo_path(recipe.run_dir)
    state = load_state(run_dir)
    for task in tasks:
        if not (task.optional and not repo_path(task.argv[0]).is_file()):
            check_inputs_present(task)
        decision = decide(task, state, forced)
        if decision.startswith("skip"):
            print(f"[runner] {task.key}: {decision}", flush=True)
            continue
        print(f"[runner] {task.key}: {decision}: {shlex.join(task.argv)}", flush=True)
        fp = fingerprint(task)  # inputs as they are before the step runs
        wall_s = run_task(task, python, run_dir)
        record_success(state, task, fp, wall_s, run_dir)
        print(f"[runner] {task.key}: done in {wall_s:.1f} s", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    recipe = load_recipe(Path(args.recipe), args.run_dir, args.seeds, args.var)
    names = [s["name"] for s in recipe.steps]
    unknown = [f for f in args.force if f not in names]
    if unknown:
        raise RunnerError(f"--force {', '.join(unknown)}: no such step in {recipe.path} "
                          f"(steps: {', '.join(names)})")
    tasks = plan_tasks(recipe)
    check_inputs_declared(recipe, tasks)
    text = commands_text(recipe, tasks)
    if args.dry_run:
        state = load_state(repo_path(recipe.run_dir))
        print(text, end="")
        for task in tasks:
            print(f"# {task.key}: {decide(task, state, set(args.force))}")
        return
    run_dir = repo_path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = {signum: signal.signal(signum, on_stop_signal) for signum in STOP_SIGNALS}
    lock = RunLock(run_dir)
    try:
        take_run_dir(run_dir, lock)
        write_text_atomic(run_dir / "commands.sh", text)
        execute(recipe, tasks, set(args.force), args.python)
    finally:
        lock.release()
        for signum, handler in handlers.items():  # main() may run inside another program
            signal.signal(signum, handler)
    print(f"[runner] all steps done; commands: {run_dir / 'commands.sh'}")


if __name__ == "__main__":
    try:
        main()
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StepFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; the same command resumes at the step that was running",
              file=sys.stderr)
        sys.exit(130)
    except Stopped as stop:
        print(f"error: stopped by {signal.Signals(stop.signum).name} (the running step was "
              "stopped with it); the same command resumes at that step", file=sys.stderr)
        sys.exit(128 + stop.signum)
