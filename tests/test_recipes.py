"""The shipped recipes' plans (run_experiment.py's own planning, as --dry-run prints it): score once
per split with --scores-only, subsets and evals per seed, the base model evaluated once per split,
compare_evals.py per seed and pooled, the chat recipes' shared vars, the steps m1/smoltalk/
smoltalk_sae share written alike; and device/start_recipe.sh + follow.sh rehearsed on the CPU."""

import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import run_experiment as rx
from conftest import ROOT

# score_variants.toml compares scores on one pool (no seeds, arms or evals): tested on its own
# below; lds.toml (seeds are subsets, several score passes, no base eval): tests/test_lds.py
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.toml")
                 if p.stem not in ("score_variants", "lds"))
CHAT_VARS = {"model", "dataset", "dataset_flags", "train_size", "query_size", "eval_size", "k",
             "random_match", "max_length", "eval_batch_size"}
SEEDS = [1, 2, 3]


def plan(path: Path, per_seed_split: bool = False) -> tuple[rx.Recipe, list[rx.Task]]:
    recipe = rx.load_recipe(path, None, SEEDS, [])
    recipe.per_seed_split = per_seed_split or recipe.per_seed_split
    rx.check_steps(recipe)
    return recipe, rx.plan_tasks(recipe)


def flag(task: rx.Task, name: str) -> str | None:
    return task.argv[task.argv.index(name) + 1] if name in task.argv else None


def split_dir(recipe: rx.Recipe, seed: int | None) -> str:
    return f"{recipe.run_dir}/seed_{seed}" if recipe.per_seed_split else recipe.run_dir


def test_the_recipes_exist():
    assert {p.name for p in RECIPES} >= {"demo.toml", "m1.toml", "smoltalk.toml",
                                         "smoltalk_planted.toml", "smoltalk_sae.toml",
                                         "taboo.toml"}


def has_arms(recipe: rx.Recipe) -> bool:
    """The verdict's layout (recipes/verdict.toml, demo.toml): score.py --arms per seed, one
    compare step per design over the seed folders."""
    return any("--arms" in step["run"] for step in recipe.steps)


@pytest.mark.parametrize("per_seed_split", [False, True], ids=["shared_split", "split_per_seed"])
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_score_once_per_split_and_subsets_per_seed(path, per_seed_split):
    recipe, tasks = plan(path, per_seed_split)
    splits = SEEDS if per_seed_split else [None]
    score_py = [t for t in tasks if t.argv[0] == "score.py"]
    if not score_py:
        assert path.stem == "m1"
        return
    scoring = [t for t in score_py if "--scores-from" not in t.argv]
    by_step = {}
    for task in scoring:
        by_step.setdefault(task.step, []).append(task.seed)
    assert by_step and all(seeds == splits for seeds in by_step.values()), by_step
    for task in scoring:
        assert "--scores-only" in task.argv
        assert "--seed" not in task.argv   # --subset-k only sizes the length diagnostics
        assert flag(task, "--output-dir") in {f"{split_dir(recipe, task.seed)}/scores",
                                              f"{split_dir(recipe, task.seed)}/scores_raw"}
    assert any(flag(t, "--output-dir").endswith("/scores") for t in scoring)
    subsets = [t for t in score_py if "--scores-from" in t.argv]
    per_step = {}   # taboo.toml draws its arms at two k: one step per k, each once per seed
    for task in subsets:
        per_step.setdefault(task.step, []).append(task.seed)
    assert per_step and all(seeds == SEEDS for seeds in per_step.values()), per_step
    for task in subsets:
        assert flag(task, "--scores-from") == f"{split_dir(recipe, task.seed)}/scores"
        assert flag(task, "--seed") == str(task.seed) and "--subset-k" in task.argv
        folder = "arms" if "--arms" in task.argv else "attribution"
        if len(per_step) > 1:
            folder += f"_k{flag(task, '--subset-k')}"
        assert flag(task, "--output-dir") == f"{recipe.run_dir}/seed_{task.seed}/{folder}"


@pytest.mark.parametrize("per_seed_split", [False, True], ids=["shared_split", "split_per_seed"])
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_base_model_evaluated_once_per_split(path, per_seed_split):
    recipe, tasks = plan(path, per_seed_split)
    evals = [t for t in tasks if t.argv[0] == "eval_loss.py"]
    if not evals:  # the planted-signal recipe has no eval-loss step
        assert path.stem == "smoltalk_planted"
        return
    with_base = [t for t in evals if "--skip-base" not in t.argv]
    assert {t.step for t in with_base} == {"eval_base"}
    assert [t.seed for t in with_base] == (SEEDS if per_seed_split else [None])
    for task in with_base:
        where = split_dir(recipe, task.seed)
        assert flag(task, "--adapter-path") == f"{where}/base_adapter"
        assert flag(task, "--output-json") == f"{where}/eval_base.json"
    for task in evals:
        if task not in with_base:
            assert task.seed in SEEDS
            assert flag(task, "--output-json").startswith(f"{recipe.run_dir}/seed_{task.seed}/")


PAIR_RECIPES = [p for p in RECIPES if not has_arms(rx.load_recipe(p, None, None, []))]


@pytest.mark.parametrize("path", PAIR_RECIPES, ids=[p.stem for p in PAIR_RECIPES])
def test_compare_per_seed_and_pooled(path):
    """Every pair of per-seed evals is compared per seed and pooled over the seed folders, into
    the compare_*.json files report.py reads (the verdict's arm comparisons: test_verdict.py)."""
    recipe, tasks = plan(path)
    compares = [t for t in tasks if t.argv[0] == "compare_evals.py"]
    per_seed = [t for t in compares if t.seed is not None]
    pooled = [t for t in compares if t.seed is None]
    evals = [t for t in tasks if t.argv[0] == "eval_loss.py" and t.seed is not None]
    assert len(per_seed) == len(evals) // 2
    assert len(pooled) == len(per_seed) // len(SEEDS)
    for task in per_seed:
        a, b, out = flag(task, "--a"), flag(task, "--b"), flag(task, "--output-json")
        seed_dir = f"{recipe.run_dir}/seed_{task.seed}"
        assert a.startswith(seed_dir) and b.startswith(seed_dir)
        assert out.startswith(f"{seed_dir}/compare_") and out.endswith("_top_vs_random.json")
        assert {a, b} <= {p for e in evals if e.seed == task.seed for p in e.outputs}
    for task in pooled:
        name = Path(flag(task, "--output-json")).name
        assert flag(task, "--output-json") == f"{recipe.run_dir}/{name}"
        assert {Path(p).name for p in (flag(task, "--a"), flag(task, "--b"))} == {
            Path(flag(t, f)).name for t in per_seed if Path(flag(t, "--output-json")).name == name
            for f in ("--a", "--b")}
        assert flag(task, "--a").startswith(f"{recipe.run_dir}/seed_*/")


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "taboo"],
                         ids=[p.stem for p in RECIPES if p.stem != "taboo"])
def test_chat_recipes_share_the_var_names(path):
    recipe = rx.load_recipe(path, None, None, [])
    # the arm recipes have no random_match: their random arms are named (random, random_stratified)
    shared = CHAT_VARS - {"random_match"} if has_arms(recipe) else CHAT_VARS
    assert shared <= set(recipe.vars), shared - set(recipe.vars)
    # so one set of --var flags (device/start_recipe.sh) fits every chat recipe
    rx.load_recipe(path, None, None, [f"{name}={recipe.vars[name]}" for name in shared])


def test_m1_smoltalk_and_sae_share_their_first_steps():
    """The steps m1, smoltalk and smoltalk_sae have in common resolve to the same commands, so a
    later recipe on the same run folder skips what an earlier one did."""
    plans = {}
    for name in ("m1", "smoltalk", "smoltalk_sae"):
        recipe = rx.load_recipe(ROOT / "recipes" / f"{name}.toml", "runs/same", SEEDS, [])
        plans[name] = {t.key: (t.argv, t.inputs, t.outputs) for t in rx.plan_tasks(recipe)}
    assert set(plans["m1"]) == {"dataset", "finetune_base", "eval_base"}
    for name in ("smoltalk", "smoltalk_sae"):
        assert {key: plans[name][key] for key in plans["m1"]} == plans["m1"], name
    shared = (set(plans["smoltalk"]) & set(plans["smoltalk_sae"])) - {"report"}
    assert {"score", "subsets@seed1", "subsets@seed3"} <= shared
    assert {key: plans["smoltalk"][key] for key in shared} == \
        {key: plans["smoltalk_sae"][key] for key in shared}


def test_dry_run_output_shows_one_score_and_one_base_eval():
    """What a user sees: the --dry-run plan of every recipe, from the command line."""
    for path in RECIPES:
        out = subprocess.run([sys.executable, "run_experiment.py", str(path), "--dry-run",
                              "--seeds", *map(str, SEEDS)], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        decisions = [line for line in out.splitlines()
                     if re.match(r"^# \S+: (run|skip)", line)]
        commands = [shlex.split(line) for line in out.splitlines() if line.startswith("uv run ")]
        scoring = [c for c in commands if c[3] == "score.py" and "--scores-only" in c]
        base_evals = [c for c in commands if c[3] == "eval_loss.py" and "--skip-base" not in c]
        scores = {"m1": 0, "verdict": 2}.get(path.stem, 1)   # verdict: default and raw score
        assert len(scoring) == scores, path
        assert len(base_evals) == (0 if path.stem == "smoltalk_planted" else 1), path
        assert [c for c in commands if c[3] == "score.py"] == scoring + [
            c for c in commands if c[3] == "score.py" and "--scores-from" in c]
        assert len(decisions) == len(commands), out  # each planned command says what it would do


def test_device_scripts_parse():
    for script in sorted((ROOT / "device").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    names = {p.name for p in (ROOT / "device").glob("*.sh")}
    assert names == {"bench.sh", "env.sh", "fetch_carry.sh", "follow.sh", "setup.sh",
                     "start_recipe.sh"}


def test_start_recipe_and_follow_on_the_cpu(tmp_path, tiny_model, chat_jsonl):
    """device/start_recipe.sh starts recipes/m1.toml (tiny model) as a background job;
    device/follow.sh waits for it, prints the runner's step lines and packs the results without
    weights or datasets into $OUT."""
    job, out, run_dir = tmp_path / "job", tmp_path / "out", tmp_path / "run"
    env = dict(os.environ, PY=sys.executable, JOB=str(job), OUT=str(out), PYTHONPATH="",
               HF_HUB_OFFLINE="1")
    variables = [f"dataset={chat_jsonl}", "dataset_flags=--group-column instruction_id",
                 f"model={tiny_model}", "train_size=120", "query_size=30", "eval_size=30",
                 "max_length=256", "eval_batch_size=8", "base_preset=fast"]
    args = ["recipes/m1.toml", "--run-dir", str(run_dir), *[f"--var={v}" for v in variables]]

    bad = subprocess.run(["bash", "device/start_recipe.sh", "recipes/m1.toml", "--var", "nope=1"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "error: --var nope=1" in bad.stdout + bad.stderr
    assert not job.exists()

    started = subprocess.run(["bash", "device/start_recipe.sh", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    assert f"run folder {run_dir}" in started.stdout
    # a second job in the same job folder is refused while the first runs (it takes well over
    # the second's start: torch's import alone)
    again = subprocess.run(["bash", "device/start_recipe.sh", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "still running" in again.stdout, again.stdout
    followed = subprocess.run(["bash", "device/follow.sh", "600"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=700)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "JOB DONE" in followed.stdout
    for step in ("dataset", "finetune_base", "eval_base"):
        assert f"[runner] {step}: done in" in followed.stdout
    assert (job / "rc").read_text().strip() == "0"
    assert "--python" in (job / "command").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "runner.log", "status"]
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("eval_base.json") for n in names)
    assert any(n.endswith("base_adapter/train_metrics.json") for n in names)
    assert any(n.endswith("logs/eval_base.log") for n in names)
    assert not [n for n in names if n.endswith((".safetensors", ".arrow"))]


def test_score_variants_recipe_runs_bergson_once_per_loss_reduction():
    """Two bergson passes (sum and mean loss, gradients kept); every other variant recomputed
    from the pass with its loss reduction; the table reads all eight."""
    recipe = rx.load_recipe(ROOT / "recipes" / "score_variants.toml", None, None, [])
    tasks = rx.plan_tasks(recipe)
    score = [t for t in tasks if t.argv[0] == "score.py"]
    passes = [t for t in score if "--gradients-from" not in t.argv]
    assert sorted(t.step for t in passes) == ["score_none_sum", "score_seed"]
    assert all("--keep-gradients" in t.argv for t in passes)
    reduction = {t.step: flag(t, "--loss-reduction") or "mean" for t in score}
    for task in score:
        if task in passes:
            continue
        source = flag(task, "--gradients-from")
        producer = next(t for t in passes if flag(t, "--output-dir") == source)
        assert reduction[task.step] == reduction[producer.step], task.step
    table = next(t for t in tasks if t.step == "table")
    assert table.argv.count("--variant") == len(score) == 8
