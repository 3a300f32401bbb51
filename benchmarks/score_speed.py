"""Scoring speed against its references, on the tokens of one finished score.py run:

  score.py         the train-scoring stage as score.py timed it (summary.json)
  bergson direct   bergson's Score command called here by hand on the same pretokenized data,
                   query index and settings (no score.py around it)
  fwd+bwd floor    a plain bf16 forward + backward of the same LoRA model over the same token
                   batches (bergson's own batch allocation), no gradient hooks, no scoring

    uv run benchmarks/score_speed.py --scores-from runs/smoltalk_v1/scores

score.py must have been run with --keep-gradients (the query index is reused). Prints a markdown
table and writes score_speed.json next to it (or --output-json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import (PipelineError, check_output_file, load_model_with_adapter,  # noqa: E402
                      pick_dtype, provenance, run_main, write_json_atomic)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores-from", "--score-dir", dest="score_dir", required=True, metavar="DIR",
                   help="a score.py output folder (its --output-dir, run with --keep-gradients); "
                        "--score-dir is the old spelling")
    p.add_argument("--output-json", default=None,
                   help="default: <scores-from>_speed.json, beside the score folder (never in it)")
    p.add_argument("--floor-repeats", type=int, default=1, help="passes of the floor loop")
    return p.parse_args(argv)


def timed_direct_bergson(summary: dict, score_dir: Path, tmp: Path) -> float:
    """The same Score call score.py makes, built from the recorded settings."""
    from bergson.cli.commands import Score
    from bergson.config.config import (DataConfig, DistributedConfig, IndexConfig,
                                       InversionConfig, PreprocessConfig, ScoreConfig)

    hessian = score_dir / "bergson" / "hessian"
    cfg = IndexConfig(run_path=str(tmp / "scores"), model=str(tmp / "adapter"),
                      tokenizer=str(tmp / "adapter"),
                      data=DataConfig(dataset=str(score_dir / "bergson_data" / "train")),
                      precision=summary["precision"], projection_dim=summary["projection_dim"],
                      token_batch_size=summary["token_batch_size"],
                      loss_reduction=summary["loss_reduction"],
                      force_math_sdp=summary["attention"].startswith("math"),
                      distributed=DistributedConfig(nproc_per_node=summary["nproc"]))
    preprocess = PreprocessConfig(
        hessian_path=str(hessian) if summary["preconditioning_mode"] == "query" else None,
        inversion_cfg=InversionConfig(damping_factor=summary["damping"]))
    mode = "individual" if summary["score_mode"] == "mean" else "nearest"
    start = time.time()
    Score(score_cfg=ScoreConfig(query_path=str(score_dir / "bergson" / "query_index"),
                                score=mode, precision="fp32"),
          index_cfg=cfg, preprocess_cfg=preprocess).execute()
    return time.time() - start


def timed_floor(summary: dict, score_dir: Path, adapter: Path, repeats: int) -> tuple[float, int]:
    import torch
    from bergson.data import allocate_batches
    from datasets import load_from_disk

    data = load_from_disk(str(score_dir / "bergson_data" / "train"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(summary["precision"], device)
    model = load_model_with_adapter(summary["base_model"], adapter, dtype, device,
                                    trainable=True)
    batches = allocate_batches(data["length"][:], summary["token_batch_size"])
    ids, labels = data["input_ids"], data["labels"]

    def run_batch(batch):
        width = max(len(ids[i]) for i in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, i in enumerate(batch):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            y[r, :len(labels[i])] = torch.tensor(labels[i])
        x, y = x.to(device), y.to(device)
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 y[:, 1:].flatten(), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)

    run_batch(batches[0])  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    for _ in range(repeats):
        for batch in batches:
            run_batch(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - start) / repeats, int(sum(data["length"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    score_dir = Path(args.score_dir)
    output = check_output_file(args.output_json or score_dir.with_name(score_dir.name + "_speed.json"),
                               "score_speed.py", inputs=[score_dir])
    summary = json.loads((score_dir / "summary.json").read_text())
    if not (score_dir / "bergson" / "query_index").is_dir():
        raise PipelineError(f"{score_dir} has no bergson/query_index: rerun score.py with "
                            f"--keep-gradients")
    tmp = score_dir / "speed_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["adapter_path"], tmp / "adapter")
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = summary["base_model"]
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    try:
        direct_seconds = timed_direct_bergson(summary, score_dir, tmp)
        floor_seconds, tokens = timed_floor(summary, score_dir, tmp / "adapter",
                                            args.floor_repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = summary["stage_seconds"]["train_scoring"]
    rows = {
        "score.py (train scoring stage)": ours,
        "score.py (whole run, incl. tokenize, Hessian, query)": summary["total_seconds"],
        "bergson Score called directly": direct_seconds,
        "bf16 fwd+bwd floor (same batches)": floor_seconds,
    }
    table = {name: {"seconds": s, "tokens_per_second": tokens / s,
                    "ratio_to_floor": floor_seconds / s} for name, s in rows.items()}
    result = {"tokens": tokens, "rows": summary["n_total"], "table": table,
              "score_py_vs_direct": direct_seconds / ours, "settings": {
                  k: summary[k] for k in ("score_mode", "preconditioning_mode", "projection_dim",
                                          "precision", "token_batch_size", "attention", "gpu")},
              "provenance": provenance()}
    write_json_atomic(output, result)
    print(f"| step | seconds | tokens/s | floor / step |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['seconds']:.1f} | {row['tokens_per_second']:.0f} | "
              f"{row['ratio_to_floor']:.2f} |")
    print(f"score.py / direct bergson throughput: {result['score_py_vs_direct']:.3f} "
          f"({tokens} tokens, {summary['n_total']} rows, {summary.get('gpu')})")


if __name__ == "__main__":
    run_main(main)
