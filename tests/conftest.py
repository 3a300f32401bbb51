import contextlib
import gc
import importlib
import importlib.util
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: README's command runs two pytest workers on two cores, and the steps they
# start are processes too; a second torch/OpenMP thread each only adds spin-waits on tiny tensors.
# Set before anything imports torch (the children inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(script: str, *args, expect_ok: bool = True, cwd=None, process: bool = False):
    """Run one pipeline script as a researcher does and return what a process would have shown:
    args, returncode, stdout, stderr.

    In-process by default: the script's main(argv) under pipeline.run_main, with sys.argv, the
    working directory and the environment as a fresh process would have them and restored after,
    so a test pays the ~20 s of `import torch, transformers, trl` once per session rather than
    once per call. process=True runs it as its own process, for the tests where the process
    boundary is the thing checked (entry point, exit code of the real interpreter, signals)."""
    argv = [str(a) for a in args]
    if process:
        result = run_process(script, argv, cwd)
    else:
        result = run_in_process(script, argv, cwd)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(argv)} failed "
                             f"({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def run_process(script: str, argv: list[str], cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *argv],
                          capture_output=True, text=True, env=env, cwd=cwd or ROOT)


def run_in_process(script: str, argv: list[str], cwd=None) -> subprocess.CompletedProcess:
    import pipeline

    module = script_module(script)
    if hasattr(module, "cli"):   # the runner maps its own errors to exit codes
        runner = lambda: module.cli(argv)
    else:
        runner = lambda: pipeline.run_main(lambda: module.main(argv))
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = [script, *argv]
    os.chdir(cwd or ROOT)
    code = 0
    try:
        # warnings shown once per process are shown again in each run, as in a fresh process
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            fresh_process_warnings()
            try:
                runner()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        gc.collect()
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def script_module(script: str):
    """The script's module: a top-level script by its name (as the scripts import each other),
    one in a subfolder (benchmarks/) from its path."""
    path = ROOT / script
    if path.parent == ROOT:
        return importlib.import_module(path.stem)
    name = f"{path.parent.name}.{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fresh_process_warnings() -> None:
    """Warnings as a fresh interpreter shows them: its default filters, each shown once, written
    to (the redirected) sys.stderr rather than to pytest's warning capture."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                     ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl.gz"
    return tiny.write_jsonl(path, tiny.smoltalk_rows(360, seed=7))


# ---------------------------------------------------------------------------------------------
# the shared tiny runs, built once per session; read-only to the tests (helpers.copy_run gives a
# test its own copy to write into)


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, chat_jsonl) -> Path:
    """dataset.py's splits of chat_jsonl at helpers.SIZES, split seed 42."""
    from helpers import make_splits

    run_dir = tmp_path_factory.mktemp("chat_run") / "run"
    make_splits(run_dir, chat_jsonl)
    return run_dir


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, chat_run, tiny_model) -> Path:
    """chat_run plus its base adapter (4 epochs of train_base, LoRA r 8) and that adapter's
    eval_loss.py report (eval.json)."""
    from helpers import MAX_LEN, copy_run

    run_dir = copy_run(chat_run, tmp_path_factory.mktemp("base_run") / "run")
    manifest = run_dir / "manifest.json"
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", manifest,
               "--base-model", tiny_model, "--output-dir", run_dir / "base_adapter", "--epochs", 4,
               "--batch-size", 8, "--learning-rate", 3e-3, "--lora-rank", 8,
               "--max-length", MAX_LEN)
    run_script("eval_loss.py", "--manifest", manifest, "--adapter-path", run_dir / "base_adapter",
               "--output-json", run_dir / "eval.json", "--max-length", MAX_LEN)
    return run_dir


@pytest.fixture(scope="session")
def score_run(tmp_path_factory, tiny_model, chat_jsonl) -> Path:
    """The score tests' small run: helpers.SCORE_RUN_SIZES splits and a LoRA r 4 base adapter,
    small enough for brute-force autograd over every row."""
    from helpers import trained_run

    return trained_run(tmp_path_factory.mktemp("score_run") / "run", tiny_model, chat_jsonl)


# The longest modules first, one to each worker. README's command runs the suite on two workers,
# a module whole on one (`--dist loadfile`: its module fixtures built once), in collection order
# (`--no-loadscope-reorder`; xdist would otherwise order modules by their count of tests): a long
# module that started last would set the suite's wall-clock alone.
SLOW_FIRST = ("test_lds.py", "test_data_parallel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
