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
    inputs = []                    # files/folders it reads (fingerprinted)
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

Skip rule: a step (per seed) is skipped when its declared outputs exist and its fingerprint equals
the one recorded when it last succeeded, in <run_dir>/.runner_state.json (rewritten atomically
after every successful step, never before). The fingerprint is a sha256 over the resolved command
line (script + flags, not the python executable) and the declared inputs: a file by its content;
a folder by its sorted (relative path, size) plus the content of files up to 1 MiB and the mtime_ns
of larger ones (weights are not read), ignoring datasets' cache-*.arrow files and hidden files;
a missing path (e.g. a hub id) as "missing". (So a step must not declare a folder it writes into
as an input: it would never be up to date.) A killed run resumes at the step it was in, and a step
reruns when its command or inputs changed:
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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import re
import shlex
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
SMALL_FILE_BYTES = 1 << 20
BUILTIN_PLACEHOLDERS = ("run_dir", "seed", "seed_dir", "split_dir")
SEED_ONLY_PLACEHOLDERS = ("seed_dir",)
RECIPE_KEYS = {"name", "description", "run_dir", "seeds", "base_seed", "per_seed_split"}
STEP_KEYS = {"name", "run", "inputs", "outputs", "per_seed", "optional", "reuse_existing",
             "comment"}
STEP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RunnerError(Exception):
    """A problem with the recipe or the command line; printed as one `error:` line, exit 2."""


class StepFailed(Exception):
    """A step exited non-zero; printed as one `error:` line, exit 1."""


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
    except tomllib.TOMLDecodeError as err:
        raise RunnerError(f"recipe {path} is not valid TOML: {err}")
    head = data.get("recipe", {})
    unknown = set(data) - {"recipe", "vars", "steps"} or set(head) - RECIPE_KEYS
    if unknown:
        raise RunnerError(f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))}")
    variables = {str(k): str(v) for k, v in data.get("vars", {}).items()}
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
                    seeds=[int(s) for s in (seeds or head.get("seeds", [42]))],
                    base_seed=int(head.get("base_seed", 42)),
                    per_seed_split=bool(head.get("per_seed_split", False)),
                    vars=variables, steps=data.get("steps", []))
    if not recipe.run_dir:
        raise RunnerError(f"recipe {path} has no [recipe] run_dir; pass --run-dir")
    check_steps(recipe)
    return recipe


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
        if not step.get("outputs"):
            raise RunnerError(f"{where}: step {name} declares no outputs (paths that must exist "
                              "after it)")
        if step.get("per_seed", False) not in (True, False, "split"):
            raise RunnerError(f"{where}: step {name}: per_seed must be true, false or \"split\"")
        for text in [step["run"], *step["outputs"], *step.get("inputs", [])]:
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
    inputs = {p: hash_input(p) for p in task.inputs}
    blob = json.dumps({"argv": task.argv, "inputs": inputs}, sort_keys=True)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest(), "inputs": inputs}


def load_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {"version": 1, "steps": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunnerError(f"state file {path} is damaged; delete it to rerun every step")


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
        code = subprocess.run([python, *task.argv], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    label = task.label
    if code != 0:
        raise StepFailed(f"step {label} failed with exit code {code}{last_error(log_path)}; "
                         f"log: {log_path}")
    missing = [p for p in task.outputs if not repo_path(p).exists()]
    if missing:
        raise StepFailed(f"step {label} exited 0 but did not write {', '.join(missing)}; "
                         f"log: {log_path}")
    return time.time() - start


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
    text = commands_text(recipe, tasks)
    if args.dry_run:
        state = load_state(repo_path(recipe.run_dir))
        print(text, end="")
        for task in tasks:
            print(f"# {task.key}: {decide(task, state, set(args.force))}")
        return
    run_dir = repo_path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "commands.sh", text)
    execute(recipe, tasks, set(args.force), args.python)
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
