"""Every GPU step against its hardware floor, in one run, on the same real tokens.

    uv run benchmarks/bench.py --manifest runs/smoltalk_real/manifest.json \
        --adapter-path runs/smoltalk_real/base_adapter --sae-path runs/smoltalk_real/local_sae \
        --rows 1000 --output-dir runs/bench

The first --rows rows of --split become a bench manifest; each step runs as the researcher runs it
(its own process, its own timing of its main loop) and each floor runs here on the same rows:

  finetune.py train  vs  bare fwd+bwd: the same LoRA config, bf16 weights, token-budget batches
                        (length-sorted, --floor-batch-tokens), logits only at supervised positions,
                        no optimizer
  score.py           vs  bergson Score called directly (same data, query index, settings) and the
                        bare fwd+bwd of benchmarks/score_speed.py over bergson's own batches
  eval_loss.py       vs  bare bf16 forward (no grad, one logit per row) over token-budget batches
  sae_analysis.py    vs  the same bare forward (a conservative floor: the step stops at layer L)

MFU = FLOP/token x params x tokens / time / --peak-tflops, with 4 FLOP/token per parameter for the
LoRA training loop and for scoring (forward + the backward through activations; the frozen
weights get no gradient) and 2 for the forward-only steps.

Prints a markdown table and writes bench.json / bench.md to --output-dir. Speed figures live here,
never in tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import (PipelineError, base_model_of_adapter, length_sorted_batches,  # noqa: E402
                      load_base_model, load_manifest, load_split, load_tokenizer, pad_batch,
                      provenance, run_main, token_nll_sums, tokenize_split, write_json_atomic,
                      write_selection_manifest)


def count_parameters(base_model: str) -> int:
    """The base model's parameters, from its config on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    return sum(p.numel() for p in model.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="main manifest with the real rows")
    p.add_argument("--split", default="train_base", help="split the bench rows come from")
    p.add_argument("--adapter-path", required=True,
                   help="base adapter (score.py attributes through it; eval/SAE steps use it)")
    p.add_argument("--base-model", default=None, help="default: the adapter's base model")
    p.add_argument("--sae-path", default=None, help="SAE folder for sae_analysis.py (optional)")
    p.add_argument("--rows", type=int, default=1000, help="rows of --split to bench on")
    p.add_argument("--max-length", type=int, default=2048, help="as the steps' --max-length")
    p.add_argument("--floor-batch-tokens", type=int, default=8192,
                   help="padded tokens per floor batch")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU for MFU (H100 / H200 SXM: 989)")
    p.add_argument("--steps", default="finetune,score,eval_loss,sae_analysis",
                   help="comma-separated subset of the steps")
    p.add_argument("--output-dir", default="runs/bench", help="bench manifest, outputs, table")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run without a GPU (a rehearsal of the script; the figures mean nothing)")
    return p.parse_args(argv)


def run_step(name: str, args: list, log_dir: Path) -> float:
    start = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        result = subprocess.run([sys.executable, *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        raise PipelineError(f"bench step {name} failed (exit {result.returncode}); see "
                            f"{log_dir / (name + '.log')}")
    return time.time() - start


def bench_rows(manifest_path: str, split: str, n: int, out: Path) -> Path:
    manifest = load_manifest(manifest_path)
    rows = load_split(manifest, split)
    if n > len(rows):
        raise PipelineError(f"--rows {n} but split '{split}' has {len(rows)} rows")
    return write_selection_manifest(manifest, out / "manifest.json",
                                    {"bench": rows.select(range(n))},
                                    {"method": "bench", "source_split": split, "rows": n})


def tokenized_rows(manifest_path: Path, base_model: str, max_length: int) -> list[dict]:
    tokenizer = load_tokenizer(base_model)
    split = load_split(load_manifest(manifest_path), "bench")
    return tokenize_split(split, tokenizer, max_length, desc="tokenize bench").to_list()


def timed_loop(rows, batch_tokens, step, device) -> float:
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    batches = length_sorted_batches(lengths, max_rows=10**9, max_tokens=batch_tokens)
    step([rows[i] for i in batches[0]])  # warm-up: kernels, allocator
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    sync(device)
    start = time.time()
    for batch in batches:
        step([rows[i] for i in batch])
    sync(device)
    return time.time() - start


def floor_train(rows, base_model: str, batch_tokens: int, device) -> tuple[float, int]:
    """Bare fwd+bwd of a fresh LoRA with finetune.py's default config, bf16 weights."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from peft import LoraConfig, get_peft_model

    from finetune import DEFAULT_LORA_TARGETS

    model = load_base_model(base_model, dtype, device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=DEFAULT_LORA_TARGETS.split(","),
                                             task_type="CAUSAL_LM"))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    def step(batch):
        input_ids, labels, mask = pad_batch(batch, 0, device)
        nll, _ = token_nll_sums(model, input_ids, labels, mask)
        nll.sum().backward()
        model.zero_grad(set_to_none=True)

    seconds = timed_loop(rows, batch_tokens, step, device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, n_params


def floor_forward(rows, base_model: str, batch_tokens: int, device) -> float:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base_model(base_model, dtype, device).eval()

    def step(batch):
        input_ids, _, mask = pad_batch(batch, 0, device)
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    seconds = timed_loop(rows, batch_tokens, step, device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise PipelineError("bench.py measures GPU steps; no CUDA device is visible")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    base_model = args.base_model or base_model_of_adapter(args.adapter_path)
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    manifest = bench_rows(args.manifest, args.split, args.rows, out)
    rows = tokenized_rows(manifest, base_model, args.max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    supervised = sum(r["num_supervised_tokens"] for r in rows)
    table = {}

    n_params = count_parameters(base_model)

    def add(name, seconds, floor_seconds, flop_per_token, extra=None):
        mfu = lambda s: flop_per_token * n_params * tokens / s / (args.peak_tflops * 1e12)  # noqa: E731
        table[name] = {"seconds": seconds, "tokens_per_second": tokens / seconds,
                       "flop_per_token_per_parameter": flop_per_token, "mfu": mfu(seconds),
                       "floor_mfu": mfu(floor_seconds) if floor_seconds else None,
                       "floor_seconds": floor_seconds,
                       "floor_tokens_per_second": tokens / floor_seconds if floor_seconds else None,
                       "ratio_to_floor": floor_seconds / seconds if floor_seconds else None,
                       **(extra or {})}

    forward_floor = None
    if "finetune" in steps:
        run_step("finetune", ["finetune.py", "train", "--manifest", manifest, "--train-split",
                              "bench", "--eval-split", "eval", "--base-model", base_model,
                              "--output-dir", out / "ft", "--max-length", args.max_length],
                 out / "logs")
        metrics = json.loads((out / "ft" / "train_metrics.json").read_text())
        floor_seconds, _ = floor_train(rows, base_model, args.floor_batch_tokens, device)
        add("finetune.py train (training loop)", metrics["train_wall_clock_s"], floor_seconds, 4,
            {"peak_gpu_memory_gib": metrics.get("peak_gpu_memory_gib")})
    if "score" in steps:
        from benchmarks.score_speed import timed_direct_bergson, timed_floor

        run_step("score", ["score.py", "--manifest", manifest, "--train-split", "bench",
                           "--adapter-path", args.adapter_path, "--output-dir", out / "score",
                           "--score-mode", "mean", "--preconditioning-mode", "query",
                           "--projection-dim", 32, "--subset-k", 10, "--keep-gradients",
                           "--max-length", args.max_length], out / "logs")
        summary = json.loads((out / "score" / "summary.json").read_text())
        tmp = out / "score_direct"
        shutil.copytree(summary["adapter_path"], tmp / "adapter")
        config_path = tmp / "adapter" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = summary["base_model"]
        config_path.write_text(json.dumps(config))
        direct = timed_direct_bergson(summary, out / "score", tmp)
        floor_seconds, _ = timed_floor(summary, out / "score", tmp / "adapter", 1)
        ours = summary["stage_seconds"]["train_scoring"]
        add("score.py (train scoring stage)", ours, floor_seconds, 4,
            {"vs_direct_bergson": direct / ours, "whole_run_seconds": summary["total_seconds"]})
        add("bergson Score, called directly", direct, floor_seconds, 4)
    if "eval_loss" in steps:
        run_step("eval_loss", ["eval_loss.py", "--manifest", manifest, "--eval-split", "bench",
                               "--adapter-path", args.adapter_path, "--skip-base",
                               "--batch-size", 16, "--max-length", args.max_length,
                               "--output-json", out / "eval.json"], out / "logs")
        result = json.loads((out / "eval.json").read_text())
        forward_floor = floor_forward(rows, base_model, args.floor_batch_tokens, device)
        add("eval_loss.py (adapter pass)", result["finetuned"]["wall_clock_s"], forward_floor, 2)
    if "sae_analysis" in steps and args.sae_path:
        run_step("sae_analysis", ["sae_analysis.py", "--manifest", manifest, "--split", "bench",
                                  "--sae-path", args.sae_path, "--base-model", base_model,
                                  "--output-dir", out / "sae", "--max-length", args.max_length],
                 out / "logs")
        summary = json.loads((out / "sae" / "summary.json").read_text())
        if forward_floor is None:
            forward_floor = floor_forward(rows, base_model, args.floor_batch_tokens, device)
        add("sae_analysis.py (features)", summary["wall_clock_s"], forward_floor, 2)

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": len(rows), "tokens": tokens,
              "supervised_tokens": supervised, "base_model": base_model,
              "floor_batch_tokens": args.floor_batch_tokens, "peak_tflops": args.peak_tflops,
              "table": table, "provenance": provenance(manifest=args.manifest)}
    lines = [f"Device: {result['device']}; {len(rows)} rows, {tokens} tokens "
             f"({supervised} supervised); floors in bf16 with {args.floor_batch_tokens}-token "
             f"batches; {n_params / 1e6:.1f}M parameters, MFU against {args.peak_tflops:g} "
             "TFLOP/s.", "",
             "| step | seconds | tokens/s | floor tokens/s | step / floor | MFU | floor MFU | "
             "peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in table.items():
        floor_mfu = f"{row['floor_mfu']:.2%}" if row["floor_mfu"] is not None else "n/a"
        peak = row.get("peak_gpu_memory_gib")
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['tokens_per_second']:,.0f} | "
                     f"{row['floor_tokens_per_second']:,.0f} | {row['ratio_to_floor']:.2f} | "
                     f"{row['mfu']:.2%} | {floor_mfu} | "
                     f"{f'{peak:.1f}' if peak is not None else 'n/a'} |")
    for name, row in table.items():
        if "vs_direct_bergson" in row:
            lines.append(f"\nscore.py / direct bergson throughput: {row['vs_direct_bergson']:.3f}")
    write_json_atomic(out / "bench.json", result)
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
