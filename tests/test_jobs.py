"""run_experiment.py --jobs/--gpus: independent steps overlap, dependants wait for their inputs,
a failure stops only what needs it, SIGTERM mid-run then resume loses nothing, and each step sees
its slot's GPU. The steps are a tiny script that logs its start and end (seconds a run)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import run_experiment as rx
from conftest import ROOT
from helpers import alive, decisions as decisions_of, wait_dead

# One step: logs start/end (time, pid, CUDA_VISIBLE_DEVICES) to a shared events file, waits for
# other steps to have started (--wait-for, a barrier that only concurrent steps pass) or while a
# file exists (--hold), then fails (--fail CODE; --oom-once MARK: with torch's out-of-memory
# message, the first time) or writes --out (staged, then renamed).
STEP = r"""import json, os, pathlib, sys, time
opts = {}
for flag, value in zip(sys.argv[1::2], sys.argv[2::2]):
    opts.setdefault(flag, []).append(value)
name, events = opts["--name"][0], pathlib.Path(opts["--events"][0])

def log(event):
    line = json.dumps({"name": name, "event": event, "t": time.time(), "pid": os.getpid(),
                       "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                       "omp": os.environ.get("OMP_NUM_THREADS")})
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (line + "\n").encode())
    os.close(fd)

def started(other):
    lines = events.read_text().split("\n")[:-1] if events.exists() else []
    return any(json.loads(l)["name"] == other and json.loads(l)["event"] == "start"
               for l in lines)

log("start")
deadline = time.time() + 30
for other in opts.get("--wait-for", []):
    while not started(other):
        if time.time() > deadline:
            sys.exit(f"error: {name} waited 30 s for {other} to start")
        time.sleep(0.02)
while "--hold" in opts and pathlib.Path(opts["--hold"][0]).exists() and time.time() < deadline + 90:
    time.sleep(0.02)
time.sleep(float(opts.get("--sleep", ["0"])[0]))
if "--oom-once" in opts and not pathlib.Path(opts["--oom-once"][0]).exists():
    pathlib.Path(opts["--oom-once"][0]).write_text(name)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 34.00 MiB.")
    sys.exit(1)
if "--runtime-oom-once" in opts and not pathlib.Path(opts["--runtime-oom-once"][0]).exists():
    pathlib.Path(opts["--runtime-oom-once"][0]).write_text(name)
    print("torch.AcceleratorError: CUDA error: out of memory")
    sys.exit(1)
if "--fail" in opts:
    print("error: told to fail")
    sys.exit(int(opts["--fail"][0]))
out = pathlib.Path(opts["--out"][0])
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_name(f".{out.name}.tmp")
tmp.write_text(name)
tmp.rename(out)
log("end")
"""


def write_recipe(tmp_path: Path, steps: dict[str, dict], **variables: str) -> Path:
    """steps: name -> {flags, inputs, out (the file it writes), outputs (declared; default
    [out])}; each step runs STEP. Extra keyword arguments become [vars]."""
    (tmp_path / "step.py").write_text(STEP)
    text = (f'[recipe]\nrun_dir = "{tmp_path}/run"\nseeds = [1]\n[vars]\n'
            f'step = "{tmp_path}/step.py"\nevents = "{tmp_path}/events.jsonl"\n')
    text += "".join(f'{k} = "{v}"\n' for k, v in variables.items())
    for name, spec in steps.items():
        out = spec.get("out", f"{{run_dir}}/{name}.out")
        text += (f'[[steps]]\nname = "{name}"\n'
                 f'run = "{{step}} --name {name} --events {{events}} --out {out} '
                 f'{spec.get("flags", "")}"\n'
                 f'inputs = {json.dumps(spec.get("inputs", []))}\n'
                 f'outputs = {json.dumps(spec.get("outputs", [out]))}\n')
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def run(recipe: Path, *args, env: dict | None = None, run_dir: Path | None = None):
    extra = ["--run-dir", str(run_dir)] if run_dir else []
    return subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), str(recipe), *extra,
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env or dict(os.environ), timeout=120)


def ok(result):
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def span(evs: list[dict], name: str) -> tuple[float, float]:
    """(start, end) of the step's last run."""
    starts = [e["t"] for e in evs if e["name"] == name and e["event"] == "start"]
    ends = [e["t"] for e in evs if e["name"] == name and e["event"] == "end"]
    return starts[-1], ends[-1]


def decisions(stdout: str) -> dict[str, str]:
    """As in test_runner, less the ' [slot 2/3, GPU 0, 14:03:07]' of a run line."""
    return decisions_of(re.sub(r" \[slot [^\]]*\]", "", stdout))


def started_order(stdout: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\[runner\] (\S+): run\b", stdout, re.M)]


# ---------------------------------------------------------------------------------------------
# the rules, in-process


def task(name, inputs=(), outputs=(), optional_inputs=()):
    return rx.Task(step=name, seed=None, argv=[f"{name}.py"], inputs=list(inputs),
                   outputs=list(outputs), optional_inputs=list(optional_inputs))


def test_dependency_rule():
    tasks = [task("a", outputs=["r/a"]),
             task("same", inputs=["r/a"], outputs=["r/s"]),               # the same path
             task("inside", inputs=["r/a/x.json"], outputs=["r/i"]),      # inside an output
             task("holder", inputs=["r"], outputs=["r2/h"]),              # contains outputs
             task("glob", inputs=["r/*/x.json"], outputs=["r2/g"]),       # r/a, r/s, r/i: maybe
             task("deep", inputs=["r/**"], outputs=["r3/d"]),
             task("opt", optional_inputs=["r2/g"], outputs=["r3/o"]),     # optional inputs too
             task("free", inputs=["elsewhere/y"], outputs=["r4/f"]),
             task("rewrite", outputs=["r/a/x.json"]),  # rewrites a's output, what others read
             task("after", inputs=["r4/f/z"], outputs=["r5"])]
    deps = {tasks[i].step: [tasks[j].step for j in d] for i, d in enumerate(rx.dependencies(tasks))}
    assert deps == {"a": [], "same": ["a"], "inside": ["a"],
                    "holder": ["a", "same", "inside"], "glob": ["a", "same", "inside"],
                    "deep": ["a", "same", "inside"],
                    "opt": ["glob"], "free": [],
                    "rewrite": ["a", "same", "inside", "holder", "glob", "deep"],
                    "after": ["free"]}
    lines = rx.dag_lines(tasks, rx.dependencies(tasks))
    assert "# level 1: free" in lines and "# level 2: after <- free" in lines
    # shown less what is implied: holder waits for a through same/inside
    assert "# level 3: holder <- same, inside" in lines


def test_slot_rule():
    assert rx.plan_slots(None, None) == [None]
    assert rx.plan_slots(3, None) == [None] * 3
    assert rx.plan_slots(None, "0,1") == ["0", "1"]
    assert rx.plan_slots(None, "0,0,1") == ["0", "0", "1"]
    assert rx.plan_slots(5, "0") == ["0"] * 5
    assert rx.plan_slots(4, "0,1") == ["0", "1", "0", "1"]
    assert rx.plan_slots(None, "GPU-1a2b") == ["GPU-1a2b"]
    for jobs, gpus, message in [(0, None, "--jobs 0: must be at least 1"),
                                (2, "0,1,2", "fewer than the 3 slots"),
                                (None, "0,,1", "'' is not a GPU id"),
                                (None, "cuda:0", "'cuda:0' is not a GPU id")]:
        with pytest.raises(rx.RunnerError, match=re.escape(message)):
            rx.plan_slots(jobs, gpus)


# ---------------------------------------------------------------------------------------------
# runs


def test_independent_steps_overlap_with_jobs_2_not_with_1(tmp_path):
    # a and b wait until the other has started: they pass only if they run at once
    recipe = write_recipe(tmp_path, {"a": {"flags": "{a_flags}"}, "b": {"flags": "{b_flags}"}},
                          a_flags="--sleep 0.3", b_flags="--sleep 0.3")
    one = ok(run(recipe, "--jobs", 1, run_dir=tmp_path / "one"))
    evs = events(tmp_path)
    assert span(evs, "a")[1] <= span(evs, "b")[0]
    assert started_order(one.stdout) == ["a", "b"]
    # --jobs 1: today's lines exactly, no slot
    lines = [l for l in one.stdout.splitlines() if l.startswith("[runner]")]
    assert [re.sub(r"[\d.]+ s$", "S", l.split(": ", 2)[1]) for l in lines[:-1]] == [
        "run", "done in S", "run", "done in S"]
    (tmp_path / "events.jsonl").unlink()
    two = ok(run(recipe, "--jobs", 2, "--var", "a_flags=--wait-for b --sleep 0.3",
                 "--var", "b_flags=--wait-for a --sleep 0.3", run_dir=tmp_path / "two"))
    evs = events(tmp_path)
    (a0, a1), (b0, b1) = span(evs, "a"), span(evs, "b")
    assert a0 < b1 and b0 < a1                                 # they overlapped
    assert re.search(r"^\[runner\] a: run \[slot 1/2, \d\d:\d\d:\d\d\]: ", two.stdout, re.M)
    assert re.search(r"^\[runner\] b: run \[slot 2/2, \d\d:\d\d:\d\d\]: ", two.stdout, re.M)
    assert re.search(r"^\[runner\] a: done in \d+\.\d s \[slot 1/2, ", two.stdout, re.M)
    # commands.sh: still the sequential replay, in recipe order
    commands = (tmp_path / "two" / "commands.sh").read_text()
    assert commands.index("--name a ") < commands.index("--name b ")
    assert sorted(json.loads((tmp_path / "two" / ".runner_state.json").read_text())["steps"]) \
        == ["a", "b"]
    again = ok(run(recipe, "--jobs", 2, "--var", "a_flags=--wait-for b --sleep 0.3",
                   "--var", "b_flags=--wait-for a --sleep 0.3", run_dir=tmp_path / "two"))
    assert decisions(again.stdout) == {"a": "skip (up to date)", "b": "skip (up to date)"}


def test_dag_orders_dependants_after_their_inputs(tmp_path):
    recipe = write_recipe(tmp_path, {
        "a": {"flags": "--wait-for e --sleep 0.4", "out": "{run_dir}/a/x.json",
              "outputs": ["{run_dir}/a"]},
        "e": {"flags": "--sleep 0.2"},                                  # independent of all
        "b": {"inputs": ["{run_dir}/a"], "out": "{run_dir}/mid/b.out"},
        "c": {"inputs": ["{run_dir}/a/x.json"], "out": "{run_dir}/mid/c.out"},
        "d": {"inputs": ["{run_dir}/mid/*.out"]},
        "g": {"inputs": ["{run_dir}/mid"]},
    })
    result = ok(run(recipe, "--jobs", 3))
    evs = events(tmp_path)
    a, e, b, c, d, g = (span(evs, n) for n in "aebcdg")
    assert e[0] < a[1]                       # e ran beside a (a waited for it to start)
    assert b[0] >= a[1] and c[0] >= a[1]
    assert d[0] >= max(b[1], c[1]) and g[0] >= max(b[1], c[1])
    order = started_order(result.stdout)
    assert order[:2] == ["a", "e"] and order.index("b") < order.index("c") < order.index("d") \
        < order.index("g")                   # ready at once: recipe order
    dry = ok(run(recipe, "--jobs", 3, "--dry-run", "--run-dir", tmp_path / "dry"))
    for line in ["# level 1: a", "# level 1: e", "# level 2: b <- a", "# level 2: c <- a",
                 "# level 3: d <- b, c", "# level 3: g <- b, c"]:
        assert line in dry.stdout.splitlines(), dry.stdout
    assert "# slots: 1=unpinned, 2=unpinned, 3=unpinned" in dry.stdout


def test_a_failure_stops_only_its_dependants(tmp_path):
    recipe = write_recipe(tmp_path, {
        "base": {},
        "bad": {"inputs": ["{run_dir}/base.out"], "flags": "--sleep 0.1 {bad_flags}"},
        "child": {"inputs": ["{run_dir}/bad.out"]},
        "grandchild": {"inputs": ["{run_dir}/child.out"]},
        "sibling": {"inputs": ["{run_dir}/base.out"], "flags": "--sleep 0.5"},
        "niece": {"inputs": ["{run_dir}/sibling.out"]},
        "bad2": {"flags": "{bad2_flags}"},
        "late": {"inputs": ["{run_dir}/sibling.out", "{run_dir}/bad.out"]},
    }, bad_flags="--fail 3", bad2_flags="--fail 4")
    run_dir = tmp_path / "run"
    failed = run(recipe, "--jobs", 2)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == [
        f"error: step bad failed with exit code 3 (error: told to fail); log: "
        f"{run_dir}/logs/bad.log",
        "skipped because bad failed: child, grandchild, late",
        f"error: step bad2 failed with exit code 4 (error: told to fail); log: "
        f"{run_dir}/logs/bad2.log"]
    assert decisions(failed.stdout)["grandchild"] == "skip (needs bad, which failed)"
    assert "[runner] all steps done" not in failed.stdout
    for name in ("base", "sibling", "niece"):
        assert (run_dir / f"{name}.out").read_text() == name
    for name in ("bad", "child", "grandchild", "bad2", "late"):
        assert not (run_dir / f"{name}.out").exists()
    assert "told to fail" in (run_dir / "logs" / "bad.log").read_text()
    state = json.loads((run_dir / ".runner_state.json").read_text())["steps"]
    assert sorted(state) == ["base", "niece", "sibling"]
    assert not (run_dir / ".runner.lock").exists()
    # fixed: the rerun does only what failed or was left out
    fixed = ok(run(recipe, "--jobs", 2, "--var", "bad_flags=", "--var", "bad2_flags="))
    ran = {k for k, v in decisions(fixed.stdout).items() if v.startswith("run")}
    assert ran == {"bad", "child", "grandchild", "bad2", "late"}
    # --jobs 1 as ever: the first failure ends the run, one line
    seq = run(recipe, run_dir=tmp_path / "seq")
    assert seq.returncode == 1
    assert seq.stderr.splitlines() == [f"error: step bad failed with exit code 3 (error: told to "
                                       f"fail); log: {tmp_path}/seq/logs/bad.log"]
    assert not (tmp_path / "seq" / "sibling.out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_step_out_of_gpu_memory_starts_again_once_another_ends(tmp_path):
    """The 2026-12-02 H200 run: two recipes on one GPU, and a step that hit CUDA's out-of-memory
    error beside the others failed for good. Now it is queued again (its log kept) and starts
    once another step has ended; a step that fails otherwise, or runs out of retries, fails."""
    recipe = write_recipe(tmp_path, {
        "greedy": {"flags": "--sleep 1.0"},
        "starved": {"flags": "--oom-once {mark}"},
        "after": {"inputs": ["{run_dir}/starved.out"]},
        "runtime_starved": {"flags": "--runtime-oom-once {runtime_mark}"},
    }, mark=f"{tmp_path}/oom_seen", runtime_mark=f"{tmp_path}/runtime_oom_seen")
    run_dir = tmp_path / "run"
    result = ok(run(recipe, "--jobs", 2))
    lines = [l for l in result.stdout.splitlines() if l.startswith("[runner] starved:")]
    assert re.search(r"starved: out of GPU memory after .* starts again \(retry 1/2\) once "
                     r"another step ends; log: .*starved\.oom1\.log$", lines[1]), lines
    assert "CUDA out of memory" in (run_dir / "logs" / "starved.oom1.log").read_text()
    evs = events(tmp_path)
    starts = [e["t"] for e in evs if e["name"] == "starved" and e["event"] == "start"]
    assert len(starts) == 2 and starts[1] >= span(evs, "greedy")[1]  # after greedy ended
    assert (run_dir / "after.out").read_text() == "after"
    # the CUDA runtime's own allocation failure (torch.AcceleratorError) is retried alike
    assert "runtime_starved: out of GPU memory after" in result.stdout
    assert (run_dir / "runtime_starved.out").read_text() == "runtime_starved"
    # retries used up (--oom-retries 0): an ordinary failure, and its dependants left out
    (tmp_path / "oom_seen").unlink()
    failed = run(recipe, "--jobs", 2, "--oom-retries", 0, "--force", "starved",
                 run_dir=tmp_path / "no_retry")
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[0].startswith("error: step starved failed with exit code 1")
    assert "skipped because starved failed: after" in failed.stderr
    # --jobs 1 as ever: no retry
    (tmp_path / "oom_seen").unlink()
    seq = run(recipe, run_dir=tmp_path / "seq")
    assert seq.returncode == 1 and "out of GPU memory" not in seq.stdout
    assert run(recipe, "--jobs", 2, "--oom-retries", -1).returncode == 2


def test_min_free_gib_starts_a_step_only_while_the_gpu_has_the_memory(tmp_path):
    """--min-free-gib G: a step starts beside others only while nvidia-smi (here a fake that
    reports a file's numbers) shows G GiB free, plus G for each step started in the last 30 s
    and still running (not yet at its peak). Too little: one step at a time; room for two: two,
    the third once one ended; plenty: all three at once; no nvidia-smi: a clear error."""
    recipe = write_recipe(tmp_path, {n: {"flags": "--sleep 1.0"} for n in ("a", "b", "c")})
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\ncat "{tmp_path}/free.csv"\n')
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"

    def spans_with(free_mib: int, *args) -> tuple[str, list]:
        (tmp_path / "free.csv").write_text(f"0, {free_mib}\n")
        (tmp_path / "events.jsonl").unlink(missing_ok=True)
        result = ok(run(recipe, "--jobs", 3, "--min-free-gib", 1, *args, env=env,
                        run_dir=tmp_path / f"run_{free_mib}"))
        evs = events(tmp_path)
        return result.stdout, sorted(span(evs, name) for name in "abc")

    stdout, (a, b, c) = spans_with(500, "--gpus", "0")
    assert a[1] <= b[0] and b[1] <= c[0], (a, b, c)                 # one at a time
    assert "waiting for GPU memory: 0.5 GiB free on GPU 0, 1 step(s) started" in stdout
    _, (a, b, c) = spans_with(2500, "--gpus", "0")
    assert b[0] < a[1] and c[0] >= min(a[1], b[1]), (a, b, c)        # two, then the third
    _, (a, b, c) = spans_with(100_000)                                # unpinned: every GPU
    assert c[0] < a[1] and c[0] < b[1], (a, b, c)                     # all three at once
    env["PATH"] = str(tmp_path / "empty")
    missing = run(recipe, "--jobs", 3, "--min-free-gib", 1, env=env, run_dir=tmp_path / "none")
    assert missing.returncode == 2 and "--min-free-gib needs nvidia-smi" in missing.stderr


def test_sigterm_mid_run_then_resume_loses_nothing(tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("")
    recipe = write_recipe(tmp_path, {
        "a": {},
        "b": {"inputs": ["{run_dir}/a.out"], "flags": f"--hold {hold}"},
        "c": {"inputs": ["{run_dir}/a.out"], "flags": f"--hold {hold}"},
        "d": {"inputs": ["{run_dir}/b.out"]},
    })
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), str(recipe),
                                "--jobs", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            evs = events(tmp_path) if (tmp_path / "events.jsonl").exists() else []
            pids = {e["name"]: e["pid"] for e in evs if e["event"] == "start"}
            if {"b", "c"} <= set(pids):
                break
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "b and c never started"
            time.sleep(0.05)
        a_out = run_dir / "a.out"
        a_mtime = a_out.stat().st_mtime_ns
        process.send_signal(signal.SIGTERM)                    # the runner's pid only
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == ["error: stopped by SIGTERM (2 running step(s) stopped with it: "
                                "b, c); the same command resumes at them"]
    assert wait_dead(pids["b"]) and wait_dead(pids["c"]), "a step outlived its runner"
    assert not (run_dir / ".runner.lock").exists()
    assert sorted(json.loads((run_dir / ".runner_state.json").read_text())["steps"]) == ["a"]
    assert not any((run_dir / f"{n}.out").exists() for n in "bcd")
    hold.unlink()
    resumed = ok(run(recipe, "--jobs", 3))
    assert decisions(resumed.stdout) == {"a": "skip (up to date)", "b": "run", "c": "run",
                                         "d": "run"}
    assert a_out.stat().st_mtime_ns == a_mtime                 # a's work kept
    assert all((run_dir / f"{n}.out").read_text() == n for n in "abcd")
    evs = events(tmp_path)
    assert Counter(e["name"] for e in evs if e["event"] == "start") == {"a": 1, "b": 2, "c": 2,
                                                                       "d": 1}
    assert not any(alive(e["pid"]) for e in evs)


def test_each_step_sees_its_gpu_slot(tmp_path):
    names = ["s1", "s2", "s3", "s4"]
    recipe = write_recipe(tmp_path, {n: {"flags": "{sync}"} for n in names},
                          sync=" ".join(f"--wait-for {n}" for n in names))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    result = ok(run(recipe, "--gpus", "0,1", "--jobs", 4, env=env))     # slots 0,1,0,1
    cuda = {e["name"]: e["cuda"] for e in events(tmp_path) if e["event"] == "start"}
    assert Counter(cuda.values()) == {"0": 2, "1": 2}                 # all four ran at once
    for name in names:
        shown = re.search(rf"^\[runner\] {name}: run \[slot (\d)/4, GPU (\d), ", result.stdout,
                          re.M)
        assert shown.group(2) == cuda[name] == "01"[(int(shown.group(1)) - 1) % 2]
    assert "slots: 1=GPU 0, 2=GPU 1, 3=GPU 0, 4=GPU 1" in result.stdout
    # several slots on one GPU; and without --gpus the steps see what the runner sees
    for args, runner_env, seen in ((["--gpus", "5", "--jobs", 2], env, "5"),
                                   (["--jobs", 2], dict(env, CUDA_VISIBLE_DEVICES="7"), "7")):
        (tmp_path / "events.jsonl").unlink()
        ok(run(recipe, *args, "--var", "sync=", "--run-dir", tmp_path / seen, env=runner_env))
        assert {e["cuda"] for e in events(tmp_path)} == {seen}
    bad = run(recipe, "--gpus", "0,1,2", "--jobs", 2, "--run-dir", tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: --jobs 2 is fewer than the 3 slots of --gpus 0,1,2")
    assert not (tmp_path / "bad").exists()


def test_steps_at_once_share_the_cores(tmp_path):
    """With N slots each step gets cores // N torch threads, unless the caller chose a number."""
    recipe = write_recipe(tmp_path, {"s1": {}, "s2": {}})
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    ok(run(recipe, "--jobs", 2, env=env))
    assert {e["omp"] for e in events(tmp_path)} == {str(max(1, os.cpu_count() // 2))}
    (tmp_path / "events.jsonl").unlink()
    ok(run(recipe, "--jobs", 2, "--run-dir", tmp_path / "own", env=dict(env, OMP_NUM_THREADS="3")))
    assert {e["omp"] for e in events(tmp_path)} == {"3"}
    (tmp_path / "events.jsonl").unlink()
    ok(run(recipe, "--run-dir", tmp_path / "one", env=env))    # --jobs 1: left as it is
    assert {e["omp"] for e in events(tmp_path)} == {None}
