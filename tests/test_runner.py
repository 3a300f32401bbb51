"""run_experiment.py on the tiny model: skip when up to date, resume after a failed step, --force,
commands.sh replays to the same artifacts, per-seed folders, recipe errors; and the shipped
recipes name only scripts and flags that exist."""

import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_experiment as rx
from conftest import ROOT
import helpers
from helpers import alive, decisions, runner, wait_dead

SIZES = "--train-size {train} --query-size {query} --eval-size {eval}".format(**helpers.SIZES)


def write_recipe(path: Path, model: Path, data: Path, finetune_extra: str = "") -> Path:
    """dataset (shared) -> finetune (per seed) -> eval_loss (per seed), the tiny model's sizes."""
    text = f'''
[recipe]
run_dir = "unused"
seeds = [1]

[vars]
model = "{model}"
data = "{data}"
max_length = 256

[[steps]]
name = "dataset"
run = """dataset.py --run-dir {{run_dir}} --dataset-name {{data}} --group-column instruction_id \\
  {SIZES} --seed 42 --overwrite"""
inputs = ["{{data}}"]
outputs = ["{{run_dir}}/manifest.json", "{{run_dir}}/data"]

[[steps]]
name = "finetune"
per_seed = true
run = """finetune.py train --preset fast --manifest {{run_dir}}/manifest.json --base-model {{model}} \\
  --output-dir {{seed_dir}}/adapter --epochs 1 --max-length {{max_length}} --eval-split none \\
  --seed {{seed}} --overwrite {finetune_extra}"""
inputs = ["{{run_dir}}/manifest.json", "{{run_dir}}/data", "{{model}}"]
outputs = ["{{seed_dir}}/adapter/adapter_model.safetensors",
           "{{seed_dir}}/adapter/train_metrics.json"]
'''
    text += '''
[[steps]]
name = "eval"
per_seed = true
run = """eval_loss.py --manifest {run_dir}/manifest.json --adapter-path {seed_dir}/adapter \\
  --max-length {max_length} --output-json {seed_dir}/eval.json"""
inputs = ["{run_dir}/manifest.json", "{run_dir}/data", "{seed_dir}/adapter"]
outputs = ["{seed_dir}/eval.json", "{seed_dir}/eval.per_example.jsonl"]
'''
    path.write_text(text)
    return path


def mtimes(run_dir: Path) -> dict[str, int]:
    skip = {"commands.sh", ".runner_state.json"}
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name not in skip and "logs" not in p.parts}


def load(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# the real chain (dataset -> finetune -> eval_loss, seed 1): its second step first fails on a bad
# flag, the recipe is fixed, the run resumes; a rerun then skips everything; commands.sh replays


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_model, chat_jsonl):
    base = tmp_path_factory.mktemp("runner")
    run_dir = base / "run"
    bad = write_recipe(base / "bad.toml", tiny_model, chat_jsonl, "--no-such-flag")
    failed = runner(bad, run_dir, expect_ok=False)
    state_after_failure = load(run_dir / ".runner_state.json")
    failed_log = (run_dir / "logs" / "finetune_seed1.log").read_text()
    good = write_recipe(base / "good.toml", tiny_model, chat_jsonl)
    fixed = runner(good, run_dir)
    return {"run_dir": run_dir, "recipe": good, "failed": failed, "fixed": fixed,
            "state_after_failure": state_after_failure, "failed_log": failed_log}


def test_failed_step_stops_and_the_rerun_resumes(real):
    run_dir, failed = real["run_dir"], real["failed"]
    assert failed.returncode == 1
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: step finetune (seed 1) failed")
    assert error[0].endswith(f"log: {run_dir}/logs/finetune_seed1.log")
    assert "unrecognized arguments: --no-such-flag" in real["failed_log"]
    assert list(real["state_after_failure"]["steps"]) == ["dataset"]
    assert decisions(real["fixed"].stdout) == {"dataset": "skip (up to date)",
                                               "finetune@seed1": "run", "eval@seed1": "run"}
    assert (run_dir / "seed_1" / "adapter" / "adapter_model.safetensors").is_file()
    assert load(run_dir / "seed_1" / "eval.json")
    assert sorted(load(run_dir / ".runner_state.json")["steps"]) == [
        "dataset", "eval@seed1", "finetune@seed1"]
    for log in ("dataset", "finetune_seed1", "eval_seed1"):
        assert (run_dir / "logs" / f"{log}.log").is_file()


def test_rerun_skips_everything(real):
    run_dir = real["run_dir"]
    before, state_before = mtimes(run_dir), (run_dir / ".runner_state.json").read_text()
    again = runner(real["recipe"], run_dir)
    assert decisions(again.stdout) == {k: "skip (up to date)"
                                       for k in ("dataset", "finetune@seed1", "eval@seed1")}
    assert mtimes(run_dir) == before
    assert (run_dir / ".runner_state.json").read_text() == state_before
    dry = runner(real["recipe"], run_dir, "--dry-run")  # agrees, and writes nothing
    assert dry.stdout.count("skip (up to date)") == 3 and mtimes(run_dir) == before


def test_commands_sh_replays_to_the_same_artifacts(real, tmp_path):
    run_dir, fresh = real["run_dir"], tmp_path / "replay"
    script = (run_dir / "commands.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n# Every command of run")
    assert script.count("\nuv run python ") == 3 and "--no-such-flag" not in script
    script = script.replace(str(run_dir), str(fresh)).replace("uv run python", sys.executable)
    # the eval command is left out only to save test time: what is compared below is the
    # splits and the training run (the brief's check); eval_loss.py adds ~15 s of CPU
    script = "\n".join(line for line in script.splitlines() if "eval_loss.py" not in line)
    (tmp_path / "replay.sh").write_text(script + "\n")
    subprocess.run(["bash", str(tmp_path / "replay.sh")], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    from datasets import load_from_disk

    a, b = load(run_dir / "manifest.json"), load(fresh / "manifest.json")
    assert a["splits"] == b["splits"]
    for name, entry in a["splits"].items():
        assert (load_from_disk(str(run_dir / entry["path"]))["row_id"]
                == load_from_disk(str(fresh / entry["path"]))["row_id"])
    ma = load(run_dir / "seed_1" / "adapter" / "train_metrics.json")
    mb = load(fresh / "seed_1" / "adapter" / "train_metrics.json")
    assert ma["final_train_loss"] == pytest.approx(mb["final_train_loss"], rel=1e-4)
    curve = [p["loss"] for p in ma["loss_curve"]]
    assert curve == pytest.approx([p["loss"] for p in mb["loss_curve"]], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# seeds and --force on a stand-in script (milliseconds a step): the runner's bookkeeping only

STAND_IN = """import json, pathlib, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
out = pathlib.Path(args["--out"])
out.parent.mkdir(parents=True, exist_ok=True)
read = pathlib.Path(args["--in"]).read_text() if "--in" in args else ""
# like the real scripts, the output records when it was made (provenance)
out.write_text(json.dumps({"seed": args.get("--seed"), "read": read, "time": time.time_ns()}))
"""


@pytest.fixture
def stand_in(tmp_path):
    (tmp_path / "step.py").write_text(STAND_IN)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'''
[recipe]
run_dir = "{tmp_path}/run"
seeds = [7]
[vars]
step = "{tmp_path}/step.py"
[[steps]]
name = "make"
run = "{{step}} --out {{run_dir}}/a.json"
outputs = ["{{run_dir}}/a.json"]
[[steps]]
name = "train"
per_seed = true
run = "{{step}} --in {{run_dir}}/a.json --out {{seed_dir}}/b.json --seed {{seed}}"
inputs = ["{{run_dir}}/a.json"]
outputs = ["{{seed_dir}}/b.json"]
[[steps]]
name = "eval"
per_seed = true
run = "{{step}} --in {{seed_dir}}/b.json --out {{seed_dir}}/c.json"
inputs = ["{{seed_dir}}/b.json"]
outputs = ["{{seed_dir}}/c.json"]
[[steps]]
name = "side"
run = "{{step}} --in {{run_dir}}/a.json --out {{run_dir}}/side/d.json"
inputs = ["{{run_dir}}/a.json"]
outputs = ["{{run_dir}}/side/d.json"]
[[steps]]
name = "report"
optional = true
run = "{tmp_path}/not_written_yet.py --out {{run_dir}}/report.json"
outputs = ["{{run_dir}}/report.json"]
''')
    return recipe, tmp_path / "run"


def test_seeds_keep_their_own_folders(stand_in):
    recipe, run_dir = stand_in
    first = runner(recipe, run_dir, "--seeds", 1, 2)
    assert list(decisions(first.stdout)) == ["make", "train@seed1", "train@seed2", "eval@seed1",
                                             "eval@seed2", "side", "report"]
    assert decisions(first.stdout)["report"].startswith("skip (optional;")
    assert "# # uv run python" not in (run_dir / "commands.sh").read_text()
    assert "\n# uv run python " + str(run_dir.parent) in (run_dir / "commands.sh").read_text()
    for seed in (1, 2):
        assert load(run_dir / f"seed_{seed}" / "b.json")["seed"] == str(seed)
        assert (run_dir / f"seed_{seed}" / "c.json").is_file()
        assert (run_dir / "logs" / f"train_seed{seed}.log").is_file()
    assert not (run_dir / "seed_7").exists() and not (run_dir / "b.json").exists()
    assert (run_dir / "logs" / "make.log").is_file()
    # another seed later: only its own steps run
    third = runner(recipe, run_dir, "--seeds", 1, 2, 3)
    ran = {k for k, d in decisions(third.stdout).items() if d.startswith("run")}
    assert ran == {"train@seed3", "eval@seed3"}
    commands = (run_dir / "commands.sh").read_text()
    assert f"--out {run_dir}/seed_3/b.json --seed 3" in commands


def test_force_reruns_the_step_and_its_dependents(stand_in):
    recipe, run_dir = stand_in
    runner(recipe, run_dir, "--seeds", 1, 2)
    before = mtimes(run_dir)
    result = runner(recipe, run_dir, "--seeds", 1, 2, "--force", "train")
    assert decisions(result.stdout) == {
        "make": "skip (up to date)", "side": "skip (up to date)",
        "report": decisions(result.stdout)["report"],
        "train@seed1": "run (forced)", "train@seed2": "run (forced)",
        "eval@seed1": "run (command or inputs changed)",
        "eval@seed2": "run (command or inputs changed)"}
    after = mtimes(run_dir)
    assert {p for p in after if after[p] != before[p]} == {
        f"seed_{s}/{f}.json" for s in (1, 2) for f in "bc"}
    # a changed command line reruns the step too
    recipe.write_text(recipe.read_text().replace("--out {run_dir}/side/d.json",
                                                 "--out {run_dir}/side/d.json --note x"))
    assert decisions(runner(recipe, run_dir, "--seeds", 1, 2).stdout)["side"] == \
        "run (command or inputs changed)"


def test_step_that_writes_no_output_and_reuse_existing(stand_in):
    recipe, run_dir = stand_in
    text = recipe.read_text()
    recipe.write_text(text.replace('outputs = ["{run_dir}/a.json"]',
                                   'outputs = ["{run_dir}/a.json", "{run_dir}/nope.json"]'))
    result = runner(recipe, run_dir, expect_ok=False)
    assert result.returncode == 1
    assert result.stderr == (f"error: step make exited 0 but did not write {run_dir}/nope.json; "
                             f"log: {run_dir}/logs/make.log\n")
    assert not (run_dir / ".runner_state.json").exists()
    # reuse_existing: outputs there -> skipped whatever the record says (a shared model folder)
    recipe.write_text(text.replace('name = "make"', 'name = "make"\nreuse_existing = true'))
    result = runner(recipe, run_dir)
    assert decisions(result.stdout)["make"] == "skip (outputs exist; reuse_existing)"


# ---------------------------------------------------------------------------------------------
# bad recipes and arguments: one error naming the problem, nothing run


def run_main(*argv):
    with pytest.raises(rx.RunnerError) as err:
        rx.main([str(a) for a in argv])
    return str(err.value)


def test_bad_recipes_are_refused(tmp_path):
    good = write_recipe(tmp_path / "ok.toml", tmp_path / "model", tmp_path / "data.jsonl")
    text = good.read_text()
    run_dir = tmp_path / "run"

    def variant(name, old, new):
        assert old in text
        path = tmp_path / f"{name}.toml"
        path.write_text(text.replace(old, new, 1))
        return path

    msg = run_main(variant("ph", "--seed 42", "--seed {sede}"), "--run-dir", run_dir)
    assert "step dataset uses unknown placeholder {sede}" in msg and "{seed_dir}" in msg
    msg = run_main(variant("shared", "--run-dir {run_dir}", "--run-dir {seed_dir}"),
                   "--run-dir", run_dir)
    assert "step dataset is not per-seed but uses {seed_dir}" in msg
    msg = run_main(good, "--run-dir", run_dir, "--force", "finetun")
    assert "--force finetun: no such step" in msg and "dataset, finetune, eval" in msg
    msg = run_main(variant("noout", 'outputs = ["{run_dir}/manifest.json", "{run_dir}/data"]',
                           "outputs = []"), "--run-dir", run_dir)
    assert "step dataset declares no outputs" in msg
    msg = run_main(variant("key", "per_seed = true", "per_sed = true"), "--run-dir", run_dir)
    assert "unknown key(s) per_sed" in msg
    msg = run_main(variant("dup", 'name = "eval"', 'name = "finetune"'), "--run-dir", run_dir)
    assert "step name finetune is used twice" in msg
    msg = run_main(good, "--run-dir", run_dir, "--var", "modle=x")
    assert "--var modle=x" in msg
    # the plan itself: two tasks writing one path, a path inside another step's output folder,
    # a misspelled script, each found as the recipe loads
    msg = run_main(variant("dupout", 'outputs = ["{seed_dir}/eval.json"',
                           'outputs = ["{seed_dir}/adapter/train_metrics.json"'),
                   "--run-dir", run_dir)
    assert msg.endswith("steps finetune (seed 1) and eval (seed 1) both declare the output "
                        f"{run_dir}/seed_1/adapter/train_metrics.json"), msg
    msg = run_main(variant("seedout", '"{seed_dir}/adapter/train_metrics.json"',
                           '"{run_dir}/train_metrics.json"'), "--run-dir", run_dir,
                   "--seeds", 1, 2)
    assert ("steps finetune (seed 1) and finetune (seed 2) both declare the output "
            f"{run_dir}/train_metrics.json (a per-seed step's outputs need {{seed_dir}}") in msg
    msg = run_main(variant("inside", 'outputs = ["{seed_dir}/eval.json"',
                           'outputs = ["{run_dir}/data/eval.json"'), "--run-dir", run_dir)
    assert (f"step eval (seed 1)'s output {run_dir}/data/eval.json lies inside step dataset's "
            f"output {run_dir}/data;") in msg
    misspelled = variant("script", "finetune.py train", "finetun.py train")
    msg = run_main(misspelled, "--run-dir", run_dir)
    assert "step finetune: script finetun.py does not exist" in msg and "\n" not in msg
    with pytest.raises(rx.RunnerError, match="script finetun.py does not exist"):
        rx.load_recipe(misspelled, str(run_dir), None, [])
    # optional = true: a script that may be absent (skipped with a note when its step comes up)
    optional = misspelled.read_text().replace('name = "finetune"', 'name = "finetune"\n'
                                                                   'optional = true')
    misspelled.write_text(optional)
    assert rx.load_recipe(misspelled, str(run_dir), None, []).steps[1]["optional"]
    assert "does not exist" in run_main(tmp_path / "nope.toml")
    assert not run_dir.exists()
    # from the command line: one `error:` line, exit code 2
    result = runner(variant("cli", "--seed 42", "--seed {sede}"), run_dir, expect_ok=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: recipe")


def test_placeholders_vars_and_per_seed_split(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('''
[recipe]
run_dir = "runs/x y"
seeds = [3]
per_seed_split = true
[vars]
extra = "--a 1 --b '2 3'"
data = "{run_dir}/d.jsonl"
[[steps]]
name = "split"
per_seed = "split"
run = "uv run python dataset.py --run-dir {split_dir} --dataset-name {data} {extra}"
outputs = ["{split_dir}/manifest.json"]
[[steps]]
name = "shared"
run = "compare_evals.py --a {run_dir}/a --seed {seed} --x {{literal}}"
outputs = ["{run_dir}/c.json"]
''')
    r = rx.load_recipe(recipe, None, None, [])
    split, shared = rx.plan_tasks(r)
    assert split.argv == ["dataset.py", "--run-dir", "runs/x y/seed_3", "--dataset-name",
                          "runs/x y/d.jsonl", "--a", "1", "--b", "2 3"]
    assert split.outputs == ["runs/x y/seed_3/manifest.json"] and split.key == "split@seed3"
    assert shared.argv == ["compare_evals.py", "--a", "runs/x y/a", "--seed", "42", "--x",
                           "{literal}"]
    assert "uv run python dataset.py --run-dir 'runs/x y/seed_3'" in rx.commands_text(r, [split])


def test_a_var_with_spaces_is_one_argument(tmp_path):
    """A [vars] value holding a path with spaces (here set by --var) reaches the script as one
    argument, and commands.sh replays it so; a value that starts with `-` still holds flags."""
    step = tmp_path / "step.py"
    step.write_text(STAND_IN)
    data = tmp_path / "my data" / "rows in.txt"
    data.parent.mkdir()
    data.write_text("rows")
    run_dir = tmp_path / "run dir"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'''
[recipe]
run_dir = "unused"
[vars]
step = "{step}"
data = "{tmp_path}/data.txt"
flags = "--seed 5"
[[steps]]
name = "read"
run = "{{step}} --in {{data}} --out {{run_dir}}/b.json {{flags}}"
inputs = ["{{data}}"]
outputs = ["{{run_dir}}/b.json"]
''')
    result = runner(recipe, run_dir, "--var", f"data={data}")
    assert decisions(result.stdout) == {"read": "run"}
    assert load(run_dir / "b.json")["read"] == "rows" and load(run_dir / "b.json")["seed"] == "5"
    commands = (run_dir / "commands.sh").read_text()
    line = next(l for l in commands.splitlines() if l.startswith("uv run python"))
    assert shlex.split(line) == ["uv", "run", "python", str(step), "--in", str(data), "--out",
                                 f"{run_dir}/b.json", "--seed", "5"]
    (run_dir / "b.json").unlink()
    subprocess.run(["bash", "-c", commands.replace("uv run python", shlex.quote(sys.executable))],
                   cwd=ROOT, check=True, capture_output=True)
    assert load(run_dir / "b.json")["read"] == "rows"


# ---------------------------------------------------------------------------------------------
# the shipped recipes: parse, resolve, and name only scripts and flags that exist

def test_recipes_name_existing_scripts_and_flags():
    commands = {}  # (script, subcommand) -> flags used anywhere
    recipes = sorted((ROOT / "recipes").glob("*.toml"))
    assert {p.name for p in recipes} >= {"smoltalk.toml", "taboo.toml", "demo.toml"}
    for path in recipes:
        recipe = rx.load_recipe(path, None, [1, 2], [])
        for task in rx.plan_tasks(recipe):
            sub = task.argv[1] if len(task.argv) > 1 and not task.argv[1].startswith("-") else None
            flags = {a.split("=")[0] for a in task.argv[1:] if a.startswith("--")}
            commands.setdefault((task.argv[0], sub), set()).update(flags)
    runnable = {k: v for k, v in commands.items() if (ROOT / k[0]).is_file()}
    missing = {k[0] for k in commands} - {k[0] for k in runnable}
    assert not missing, f"recipes name missing scripts {missing}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = {k: subprocess.Popen([sys.executable, k[0], *([k[1]] if k[1] else []), "--help"],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for k in runnable}
    for (script, sub), proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{script} {sub or ''} --help failed:\n{out[-2000:]}"
        for flag in sorted(runnable[(script, sub)]):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out), \
                f"{script} {sub or ''} has no {flag} (recipes use it)"


# ---------------------------------------------------------------------------------------------
# declared inputs: a missing one is an error unless it is an optional input (a hub id)


def test_missing_input_is_an_error_unless_optional(stand_in):
    recipe, run_dir = stand_in
    text = recipe.read_text()
    # a mistyped input no step writes: refused before anything runs or is written
    recipe.write_text(text.replace('inputs = ["{run_dir}/a.json"]\noutputs = ["{seed_dir}/b.json"]',
                                   'inputs = ["{run_dir}/a.jsn"]\noutputs = ["{seed_dir}/b.json"]'))
    result = runner(recipe, run_dir, expect_ok=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: recipe {recipe}: step train (seed 7): input "
                                    f"{run_dir}/a.jsn does not exist and no earlier step writes")
    assert "optional_inputs" in result.stderr and not run_dir.exists()
    # a hub id (or any input that may be absent) goes under optional_inputs: fingerprinted as
    # missing, no error; moving an existing path there changes no fingerprint
    recipe.write_text(text.replace('inputs = ["{run_dir}/a.json"]\noutputs = ["{seed_dir}/b.json"]',
                                   'inputs = ["{run_dir}/a.json"]\noutputs = ["{seed_dir}/b.json"]'
                                   '\noptional_inputs = ["some-org/some-model"]'))
    first = runner(recipe, run_dir)
    assert decisions(first.stdout)["train@seed7"] == "run"
    state = load(run_dir / ".runner_state.json")["steps"]
    assert state["train@seed7"]["inputs"] == {f"{run_dir}/a.json": state["train@seed7"]["inputs"][
        f"{run_dir}/a.json"], "some-org/some-model": "missing"}
    moved = recipe.read_text().replace(
        'inputs = ["{run_dir}/a.json"]\noutputs = ["{seed_dir}/b.json"]\n'
        'optional_inputs = ["some-org/some-model"]',
        'inputs = []\noutputs = ["{seed_dir}/b.json"]\n'
        'optional_inputs = ["some-org/some-model", "{run_dir}/a.json"]')
    assert moved != recipe.read_text()
    recipe.write_text(moved)
    assert decisions(runner(recipe, run_dir).stdout)["train@seed7"] == "skip (up to date)"
    # an input an earlier step should have written inside its output folder, but did not: an
    # error when its step comes up, after the steps before it ran
    moved = moved.replace('outputs = ["{run_dir}/side/d.json"]',
                          'outputs = ["{run_dir}/side/d.json", "{run_dir}/side"]')
    recipe.write_text(moved + '''
[[steps]]
name = "late"
run = "{step} --in {run_dir}/side/nope.json --out {run_dir}/late.json"
inputs = ["{run_dir}/side/nope.json"]
outputs = ["{run_dir}/late.json"]
''')
    late = runner(recipe, run_dir, expect_ok=False)
    assert late.returncode == 2
    assert late.stderr == (f"error: step late: input {run_dir}/side/nope.json does not exist (the "
                           "steps before it did not write it; a hub id, or an input that may be "
                           "absent, goes under optional_inputs)\n")
    assert not (run_dir / "late.json").exists()


def test_recipe_type_errors_are_one_line(stand_in):
    recipe, run_dir = stand_in
    text = recipe.read_text()
    one_step = text[:text.index("[[steps]]", text.index("[[steps]]") + 1)]
    cases = [
        (text, one_step.replace("[[steps]]", "[steps]"), "steps is a [steps] table"),
        ("seeds = [7]", 'seeds = ["a"]', "seeds: 'a' is not a non-negative integer"),
        ("seeds = [7]", "seeds = [1.5]", "seeds: 1.5 is not a non-negative integer"),
        ("seeds = [7]", "seeds = 7", "[recipe] seeds must be an array, not an integer"),
        ("seeds = [7]", "seeds = [-1]", "seeds: -1 is not a non-negative integer"),
        ("seeds = [7]", "seeds = [3, 3]", "lists a seed twice"),
        ("seeds = [7]", 'seeds = [7]\nbase_seed = "x"', "[recipe] base_seed must be an integer"),
        ("seeds = [7]", 'seeds = [7]\nper_seed_split = "yes"', "per_seed_split must be a boolean"),
        ("[vars]", "[vars]\nnested = {a = 1}", "[vars] nested must be a string or a number"),
        ('name = "make"', 'name = "make"\noptional = "yes"', "optional must be true or false"),
        ('outputs = ["{run_dir}/a.json"]', 'outputs = "{run_dir}/a.json"',
         "outputs must be a list of strings"),
        ("per_seed = true", "per_seed = 1", 'per_seed must be true, false or "split"'),
    ]
    for old, new, message in cases:
        assert old in text, old
        recipe.write_text(text.replace(old, new, 1))
        result = runner(recipe, run_dir, expect_ok=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (new, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, (new,
                                                                                  result.stderr)
        assert not run_dir.exists()
    recipe.write_text(text)
    result = runner(recipe, run_dir, "--seeds", "-2", expect_ok=False)
    assert result.returncode == 2 and "--seeds: -2 is not a non-negative integer" in result.stderr
    # a malformed state file: one line, naming the file, whatever its shape
    runner(recipe, run_dir)
    state = run_dir / ".runner_state.json"
    for damage in ("{not json", "[]", '{"steps": []}', '{"steps": {"make": 3}}',
                   '{"steps": {"make": {"fingerprint": 5}}}', b"\xff\xfe"):
        state.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        for extra in ((), ("--dry-run",)):
            result = runner(recipe, run_dir, *extra, expect_ok=False)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, (damage,
                                                                               result.stderr)
            assert result.stderr.startswith(f"error: state file {state} is damaged"), damage
        assert not (run_dir / ".runner.lock").exists()


# ---------------------------------------------------------------------------------------------
# one runner per run dir; its steps die with it

BLOCKING_STEP = """import os, pathlib, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
pid = pathlib.Path(args["--pid"])
pid.with_suffix(".part").write_text(str(os.getpid()))
pid.with_suffix(".part").rename(pid)
deadline = time.time() + 120
while pathlib.Path(args["--hold"]).exists() and time.time() < deadline:
    time.sleep(0.05)
out = pathlib.Path(args["--out"])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("done")
"""


@pytest.fixture
def blocking(tmp_path):
    (tmp_path / "block.py").write_text(BLOCKING_STEP)
    (tmp_path / "hold").write_text("")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'''
[recipe]
run_dir = "{tmp_path}/run"
seeds = [1]
[[steps]]
name = "block"
run = "{tmp_path}/block.py --pid {tmp_path}/step.pid --hold {tmp_path}/hold --out {{run_dir}}/x"
outputs = ["{{run_dir}}/x"]
''')
    started = []

    def start():
        (tmp_path / "step.pid").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), str(recipe)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        started.append(process)
        deadline = time.monotonic() + 60
        while not (tmp_path / "step.pid").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.05)
        return process, int((tmp_path / "step.pid").read_text())

    yield {"recipe": recipe, "run_dir": tmp_path / "run", "hold": tmp_path / "hold",
           "start": start}
    for process in started:  # whatever a failed assertion left running
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_second_runner_refused_and_stale_lock_taken_over(blocking):
    recipe, run_dir = blocking["recipe"], blocking["run_dir"]
    first, step_pid = blocking["start"]()
    assert os.getpgid(step_pid) == os.getpgid(first.pid)   # the step is in the runner's group
    lock = run_dir / ".runner.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = runner(recipe, run_dir, expect_ok=False)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert second.stderr.startswith(f"error: run dir {run_dir} is in use by another runner "
                                    f"(pid {first.pid} on host ")
    assert "[runner]" not in second.stdout and alive(step_pid)
    # SIGKILL, which the runner cannot handle: the kernel stops its step (PR_SET_PDEATHSIG)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert wait_dead(step_pid), "the step outlived its runner"
    assert json.loads(lock.read_text())["pid"] == first.pid   # left behind: stale
    # temp folders and files the killed run left; a hidden non-temp file stays
    (run_dir / ".x.abc123.tmp" / "part").mkdir(parents=True)
    (run_dir / "seed_1").mkdir()
    (run_dir / "seed_1" / ".eval.json.k2j3.tmp").write_text("{")
    (run_dir / ".keep").write_text("")
    blocking["hold"].unlink()
    third = runner(recipe, run_dir)
    assert (f"[runner] note: took over the lock {lock} left by a runner that is gone "
            f"(pid {first.pid} on host ") in third.stdout
    assert "removed 2 temp folder(s)/file(s)" in third.stdout
    assert not (run_dir / ".x.abc123.tmp").exists()
    assert not (run_dir / "seed_1" / ".eval.json.k2j3.tmp").exists()
    assert (run_dir / ".keep").exists() and (run_dir / "x").read_text() == "done"
    assert not lock.exists()                                  # a clean end removes it
    again = runner(recipe, run_dir)
    assert "note:" not in again.stdout
    assert decisions(again.stdout) == {"block": "skip (up to date)"}


# writes a staging folder the way every script does (pipeline.staging_dir), then holds it
WRITER = """import os, sys, time
import pipeline
print(os.getpid(), pipeline.staging_dir(sys.argv[1]), flush=True)
if sys.argv[2] == "hold":
    time.sleep(120)
"""


def test_sweep_keeps_the_staging_of_a_live_writer(stand_in):
    """A training started by hand into the run dir is still writing its staging folder when the
    runner starts: the sweep removes only temp whose writer is gone."""
    recipe, run_dir = stand_in
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir / "seed_7" / "adapter"),
                             "hold"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        live_stage = Path(live.stdout.readline().split(maxsplit=1)[1].strip())
        dead = subprocess.run([sys.executable, "-c", WRITER, str(run_dir / "scores"), "exit"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
        dead_pid, dead_stage = dead.stdout.split(maxsplit=1)
        dead_stage = Path(dead_stage.strip())
        assert live_stage.is_dir() and dead_stage.is_dir() and live_stage.parent.name == "seed_7"
        (live_stage / "part").write_text("half a checkpoint")
        # the same dead pid on another host: whether that writer lives cannot be told here
        elsewhere = run_dir / f".report.{dead_pid}@not-{platform.node()}.abc123.tmp"
        elsewhere.mkdir()
        first = runner(recipe, run_dir)
        assert live_stage.is_dir() and (live_stage / "part").read_text() == "half a checkpoint"
        assert not dead_stage.exists() and elsewhere.is_dir()
        assert (f"[runner] note: removed 1 temp folder(s)/file(s) an earlier, killed run left "
                f"in {run_dir}: {dead_stage.name}") in first.stdout
        kept = re.search(r"^\[runner\] note: kept 2 temp folder\(s\)/file\(s\) in (.*) whose "
                         r"writer is still running \(or runs on another host\): (.*)$",
                         first.stdout, re.M)
        assert kept and kept.group(1) == str(run_dir), first.stdout
        assert sorted(kept.group(2).split(", ")) == sorted([elsewhere.name,
                                                            f"seed_7/{live_stage.name}"])
    finally:
        live.kill()
        live.communicate()
    again = runner(recipe, run_dir)      # its writer gone: removed
    assert not live_stage.exists() and "removed 1 temp folder(s)" in again.stdout
    assert f"note: kept 1 temp folder(s)/file(s) in {run_dir} whose" in again.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_runner_kills_its_step(blocking):
    process, step_pid = blocking["start"]()
    process.send_signal(signal.SIGTERM)                       # the runner's pid only
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.count("\n") == 1 and err.startswith("error: stopped by SIGTERM")
    assert wait_dead(step_pid), "the step outlived its runner"
    assert not (blocking["run_dir"] / ".runner.lock").exists()
    assert not (blocking["run_dir"] / "x").exists()
