"""One process vs N processes, step by step: speed-up and agreement, from the run of
`BENCH=multigpu device/bench.sh`.

  benchmarks/multigpu_compare.py --run-dir runs/multigpu --log /tmp/out/log.txt \
      --output-dir runs/multigpu/compare

Reads the outputs the 1-process and N-process runs wrote side by side in --run-dir
(adapter_1 / adapter_N, eval_1.json / eval_N.json, score_1 / score_N, features_1 / features_N)
and the STEP_WALL lines of device/env.sh's log, and prints (and writes as JSON and markdown) per
step: the timed stage in seconds on 1 and N processes, its speed-up, the whole process's wall-clock
speed-up, and how far the N-process results are from the 1-process ones. A step whose outputs are
missing is left out with a note.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import (PipelineError, check_output_dir, read_json, read_jsonl,  # noqa: E402
                      run_main, staged_output, write_json_atomic)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/multigpu",
                   help="the run folder of BENCH=multigpu device/bench.sh")
    p.add_argument("--log", default=None,
                   help="device/env.sh log with STEP_WALL lines (default: no process wall-clock)")
    p.add_argument("--output-dir", default=None,
                   help="write multigpu.json and multigpu.md here (default: print only)")
    return p.parse_args(argv)


def step_walls(log_path) -> dict[str, float]:
    if log_path is None:
        return {}
    walls = {}
    for line in Path(log_path).read_text().splitlines():
        match = re.match(r"STEP_WALL (\S+) (\d+) ms", line)
        if match:
            walls[match.group(1)] = int(match.group(2)) / 1000
    return walls


def compare_finetune(run_dir: Path) -> dict:
    one = read_json(run_dir / "adapter_1" / "train_metrics.json", "1-process train metrics")
    many = read_json(run_dir / "adapter_N" / "train_metrics.json", "N-process train metrics")
    losses = [(a["loss"], b["loss"]) for a, b in zip(one["loss_curve"], many["loss_curve"])]
    return {"stage": "training loop", "seconds_1": one["train_wall_clock_s"],
            "seconds_n": many["train_wall_clock_s"], "processes": many["processes"],
            "agreement": {
                "same_steps": one["optimizer_steps"] == many["optimizer_steps"],
                "max_rel_step_loss_diff": max(abs(a - b) / abs(a) for a, b in losses),
                "final_eval_loss_1": one["final_eval"]["loss"] if one["final_eval"] else None,
                "final_eval_loss_n": many["final_eval"]["loss"] if many["final_eval"] else None}}


def compare_eval(run_dir: Path) -> dict:
    one, many = read_json(run_dir / "eval_1.json"), read_json(run_dir / "eval_N.json")
    rows_one = {r["row_id"]: r for r in read_jsonl(run_dir / "eval_1.per_example.jsonl")}
    rows_many = {r["row_id"]: r for r in read_jsonl(run_dir / "eval_N.per_example.jsonl")}
    if rows_one.keys() != rows_many.keys():
        raise PipelineError("eval_1 and eval_N scored different rows")
    diffs = [abs(rows_one[k]["finetuned_nll_sum"] - rows_many[k]["finetuned_nll_sum"])
             / max(rows_one[k]["supervised_tokens"], 1) for k in rows_one]
    return {"stage": "adapter eval pass", "seconds_1": one["finetuned"]["wall_clock_s"],
            "seconds_n": many["finetuned"]["wall_clock_s"], "processes": many["processes"],
            "agreement": {"loss_1": one["finetuned"]["loss"], "loss_n": many["finetuned"]["loss"],
                          "max_per_token_nll_diff": max(diffs)}}


def compare_score(run_dir: Path) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    one = read_json(run_dir / "score_1" / "summary.json")
    many = read_json(run_dir / "score_N" / "summary.json")
    rows_one = read_jsonl(run_dir / "score_1" / "train_scores.jsonl")
    rows_many = read_jsonl(run_dir / "score_N" / "train_scores.jsonl")
    a = np.array([r["score"] if r["score"] is not None else np.nan for r in rows_one])
    b = np.array([r["score"] if r["score"] is not None else np.nan for r in rows_many])
    both = np.isfinite(a) & np.isfinite(b)
    top_one = {r["row_id"] for r in rows_one if r["in_top_k"]}
    top_many = {r["row_id"] for r in rows_many if r["in_top_k"]}
    return {"stage": "train scoring", "seconds_1": one["stage_seconds"]["train_scoring"],
            "seconds_n": many["stage_seconds"]["train_scoring"], "processes": many["nproc"],
            "agreement": {"spearman": float(spearmanr(a[both], b[both]).statistic),
                          "max_rel_score_diff": float(np.max(np.abs(a[both] - b[both]))
                                                      / np.max(np.abs(a[both]))),
                          "top_k_overlap": f"{len(top_one & top_many)}/{len(top_one)}"}}


def compare_features(run_dir: Path) -> dict:
    import numpy as np

    one = read_json(run_dir / "features_1" / "summary.json")
    many = read_json(run_dir / "features_N" / "summary.json")
    a = np.load(run_dir / "features_1" / one["npz"])
    b = np.load(run_dir / "features_N" / many["npz"])
    if list(a["row_id"]) != list(b["row_id"]):
        raise PipelineError("features_1 and features_N hold different rows")
    diff = np.abs(a["feature_activation_mean"] - b["feature_activation_mean"])
    return {"stage": "encode loop", "seconds_1": one["wall_clock_s"],
            "seconds_n": many["wall_clock_s"], "processes": many["processes"],
            "agreement": {"max_abs_feature_diff": float(diff.max()),
                          "max_feature_mean": float(np.abs(a["feature_activation_mean"]).max())}}


STEPS = {"finetune": compare_finetune, "eval_loss": compare_eval, "score": compare_score,
         "sae_analysis": compare_features}


def to_markdown(rows: list[dict], notes: list[str]) -> str:
    lines = ["| step | stage | processes | stage s (1) | stage s (N) | stage speed-up | "
             "process wall s (1 / N) | process speed-up | agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        walls = (f"{r['wall_1']:.1f} / {r['wall_n']:.1f}" if r.get("wall_1") and r.get("wall_n")
                 else "")
        wall_speedup = f"{r['wall_1'] / r['wall_n']:.2f}" if walls else ""
        agreement = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in r["agreement"].items())
        lines.append(f"| {r['step']} | {r['stage']} | {r['processes']} | {r['seconds_1']:.2f} | "
                     f"{r['seconds_n']:.2f} | **{r['seconds_1'] / r['seconds_n']:.2f}** | {walls} | "
                     f"{wall_speedup} | {agreement} |")
    return "\n".join(lines + [f"\n- {n}" for n in notes]) + "\n"


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.output_dir:
        check_output_dir(args.output_dir, True, "multigpu_compare.py", inputs=[args.log],
                         containers=[run_dir])
    walls = step_walls(args.log)
    rows, notes = [], []
    for step, compare in STEPS.items():
        try:
            row = {"step": step, **compare(run_dir)}
        except PipelineError as err:
            notes.append(f"{step}: left out ({err})")
            continue
        row["wall_1"], row["wall_n"] = walls.get(f"{step}_1"), walls.get(f"{step}_N")
        rows.append(row)
    if not rows:
        raise PipelineError(f"nothing to compare in {run_dir}")
    markdown = to_markdown(rows, notes)
    print(markdown)
    if args.output_dir:
        with staged_output(args.output_dir, "multigpu_compare.py") as out:
            write_json_atomic(out / "multigpu.json", {"steps": rows, "notes": notes})
            (out / "multigpu.md").write_text(markdown)


if __name__ == "__main__":
    run_main(main)
