"""Each script as a researcher starts it, in a process of its own: the entry point runs, --help
exits 0 and names the script, an unknown flag exits 2 with argparse's one `error:` line, and a
failing check reaches the shell as `error: ...` and exit 2 (the rest of the suite calls the
scripts' main() in-process: this is where the process boundary itself is checked)."""

import re
from pathlib import Path

import pytest

from conftest import ROOT, run_script

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py")
                 if '__name__ == "__main__"' in p.read_text())
BENCHMARKS = sorted(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")
                    if '__name__ == "__main__"' in p.read_text())
SUBCOMMAND = {"finetune.py": ["train"], "lds.py": ["compute"]}


def test_every_script_is_covered():
    assert {"dataset.py", "finetune.py", "score.py", "eval_loss.py", "report.py",
            "run_experiment.py", "train_sae.py", "sae_analysis.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS + BENCHMARKS)
def test_help_and_unknown_flag(script):
    argv = SUBCOMMAND.get(script, [])
    shown = run_script(script, *argv, "--help", process=True)
    assert shown.returncode == 0 and f"usage: {Path(script).name}" in shown.stdout, shown.stderr
    bad = run_script(script, *argv, "--no-such-flag", expect_ok=False, process=True)
    assert bad.returncode == 2, bad.stderr[-2000:]
    errors = [line for line in bad.stderr.splitlines() if re.match(r"^[\w. -]+: error: ", line)]
    # argparse names the missing required flags first where there are any
    assert len(errors) == 1 and ("--no-such-flag" in errors[0] or "required" in errors[0]), \
        bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("script, argv, words", [
    ("compare_evals.py", ["--a", "no_such_a.jsonl", "--b", "no_such_b.jsonl",
                          "--output-json", "{tmp}/c.json"], ["no_such_a.jsonl"]),
    ("run_experiment.py", ["{tmp}/no_such_recipe.toml"], ["no_such_recipe.toml"]),
    ("report.py", ["--run-dir", "{tmp}/empty", "--output-dir", "{tmp}/report"],
     ["nothing to report"]),
])
def test_a_failed_check_is_one_error_line_and_exit_2(script, argv, words, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script(script, *[a.format(tmp=tmp_path) for a in argv], expect_ok=False,
                        process=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        result.stderr[-2000:]
    assert all(word in lines[0] for word in words), lines[0]


def test_ci_runs_readme_test_command():
    """CI's suite is README's: the command under README's Tests heading is the last line of
    .ci/run, word for word."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = block.strip()
    assert command.startswith("uv run pytest")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command
