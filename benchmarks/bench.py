"""Every GPU step against its hardware floor, in one run, on the same real tokens.

    uv run benchmarks/bench.py --manifest runs/smoltalk_real/manifest.json \
        --base-model runs/models/SmolLM2-135M-Instruct --sae-path runs/smoltalk_real/local_sae \
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

finetune.py and score.py run once per configuration (--finetune-variant / --score-variant, each
NAME=FLAGS; the first is the reference): the table gives each one's tokens/s against the best
configuration measured in this run, and a score variant's Spearman correlation with the first
one's scores (a faster configuration only pays if the score stays the same). A finetune
variant's tokens/s is its training loop's (train_metrics.json), and "2nd half" is that of its
second half of steps: without the first steps' CUDA and allocator warm-up, but with other row
lengths (group-by-length order), so it is no clean steady-state figure. One finetune
variant is run again under torch.profiler (--profile-variant): wall-clock vs GPU-busy time and
kernels per step, and its profile.txt.

MFU = FLOP/token x params x tokens / time / --peak-tflops, with 4 FLOP/token per parameter for the
LoRA training loop and for scoring (forward + the backward through activations; the frozen
weights get no gradient) and 2 for the forward-only steps. Peak memory: a finetune variant's own
peak allocation (train_metrics.json); for the other steps, the most GPU memory nvidia-smi saw in
use while the step ran, less what was in use before it (a whole process: CUDA context and the
allocator's cache included).

Prints a markdown table and writes bench.json / bench.md to --output-dir. Speed figures live here,
never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import (PipelineError, base_model_of_adapter, check_output_dir,  # noqa: E402
                      length_sorted_batches, load_base_model, load_manifest, load_split, load_tokenizer, pad_batch,
                      provenance, read_jsonl, run_main, token_nll_sums, tokenize_split,
                      stamp_output, write_json_atomic, write_selection_manifest)

# A step's rows and tokens are the verdict recipe's budgets where that matters: fast = 8 rows a
# step in one micro-batch (the issue's "8 rows x 2048"); verdict_arm = an arm's 4096 supervised
# tokens a step in two micro-batches.
FAST = "--preset fast --max-steps 60 --eval-split none"
FINETUNE_VARIANTS = [
    f"fast={FAST}",
    f"fast_sdpa_cudnn={FAST} --attn-implementation sdpa_cudnn",
    f"fast_eager={FAST} --attn-implementation eager",
    "verdict_arm=--preset seed --step-tokens 4096 --gradient-accumulation 2 --keep last "
    "--max-steps 30 --eval-split none",
    "fast_32_rows=--preset fast --batch-size 32 --max-steps 20 --eval-split none",
]
SCORE_VARIANTS = [
    "default=",
    "fused_attention=--fused-attention",
]


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
    p.add_argument("--adapter-path", default=None,
                   help="adapter score.py attributes through and the eval/SAE steps use "
                        "(default: the first finetune variant's, trained on the bench rows)")
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
    p.add_argument("--finetune-variant", action="append", default=None, metavar="NAME=FLAGS",
                   help="a finetune.py configuration to time (repeatable; default: "
                        + "; ".join(FINETUNE_VARIANTS) + ")")
    p.add_argument("--score-variant", action="append", default=None, metavar="NAME=FLAGS",
                   help="a score.py configuration to time (repeatable; default: "
                        + "; ".join(SCORE_VARIANTS) + ")")
    p.add_argument("--profile-variant", default=None,
                   help="finetune variant run again under torch.profiler (default: the first; "
                        "'none' to skip)")
    p.add_argument("--profile-steps", type=int, default=10, help="profiled optimizer steps")
    p.add_argument("--variant-timeout", type=float, default=360,
                   help="seconds a finetune/score variant may run before it is stopped and "
                        "reported as failed (a configuration that hangs, say)")
    p.add_argument("--output-dir", default="runs/bench", help="bench manifest, outputs, table")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run without a GPU (a rehearsal of the script; the figures mean nothing)")
    args = p.parse_args(argv)
    args.finetune_variants = parse_variants(args.finetune_variant or FINETUNE_VARIANTS, p,
                                            "--finetune-variant")
    args.score_variants = parse_variants(args.score_variant or SCORE_VARIANTS, p, "--score-variant")
    if args.profile_variant is None:
        args.profile_variant = next(iter(args.finetune_variants))
    if args.profile_variant != "none" and args.profile_variant not in args.finetune_variants:
        p.error(f"--profile-variant {args.profile_variant} is not one of the finetune variants "
                f"({', '.join(args.finetune_variants)})")
    return args


def parse_variants(specs: list[str], parser, flag: str) -> dict[str, list[str]]:
    variants = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            parser.error(f"{flag} {spec!r}: expected NAME=FLAGS")
        if name.strip() in variants:
            parser.error(f"{flag} {name.strip()} given twice")
        variants[name.strip()] = shlex.split(flags)
    return variants


class GpuMemoryPeak:
    """The most GPU memory in use (nvidia-smi, all processes) while a step runs, less what was in
    use when it started: a child process's whole use, which torch's allocator stats inside the
    bench process cannot see. Read through the runner's nvidia-smi reader (free MiB per GPU
    index; nvidia-smi ignores CUDA_VISIBLE_DEVICES, so the index is the first one it names)."""

    def __init__(self, enabled: bool, interval: float = 0.25):
        self.enabled, self.interval = enabled, interval
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self.peak_gib = None

    def free_mib(self) -> int:
        from run_experiment import gpu_free_mib

        return gpu_free_mib()[self.gpu]

    def __enter__(self):
        if self.enabled:
            self.before = self.least = self.free_mib()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(self.interval):
            self.least = min(self.least, self.free_mib())

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.peak_gib = (self.before - self.least) / 1024


def run_step(name: str, args: list, log_dir: Path, gpu: bool,
             timeout: float | None = None) -> float | None:
    """Run a step as its own process; returns its peak GPU memory (GiB, nvidia-smi) or None."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log, GpuMemoryPeak(gpu) as memory:
        try:
            result = subprocess.run([sys.executable, *map(str, args)], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PipelineError(f"bench step {name} stopped after {timeout:g} s; see {log_path}")
    if result.returncode != 0:
        raise PipelineError(f"bench step {name} failed (exit {result.returncode}); see {log_path}")
    return memory.peak_gib


def failed_row(step: str, name: str, err: Exception) -> dict:
    print(f"warning: {err}", file=sys.stderr)
    return {"step": step, "config": name, "failed": str(err)}


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


def finetune_row(name: str, metrics: dict) -> dict:
    curve = metrics["loss_curve"]
    half = len(curve) // 2
    after = None
    if half and curve[-1]["elapsed_s"] > curve[half - 1]["elapsed_s"]:
        after = ((curve[-1]["tokens_so_far"] - curve[half - 1]["tokens_so_far"])
                 / (curve[-1]["elapsed_s"] - curve[half - 1]["elapsed_s"]))
    return {"step": "finetune.py train (training loop)", "config": name,
            "seconds": metrics["train_wall_clock_s"], "tokens": metrics["tokens_seen"],
            "second_half_tokens_per_second": after,
            "peak_gib": metrics["peak_gpu_memory_gib"], "peak_source": "torch allocator",
            "optimizer_steps": metrics["optimizer_steps"],
            "rows_per_step": metrics["rows_seen"] / metrics["optimizer_steps"],
            "micro_batches_per_step": metrics["micro_batches_per_step"],
            "final_train_loss": metrics["final_train_loss"],
            "step_rows": [x["rows"] for x in curve], "step_losses": [x["loss"] for x in curve]}


def bench_finetune(args, manifest: Path, base_model: str, out: Path, gpu: bool,
                   progress) -> list[dict]:
    """Each finetune variant on the bench rows, same seed, and the largest gap of its per-step
    losses to the first variant's where both steps held as many rows (the same seed then draws
    the same rows); progress(rows) after each one."""
    def command(output_dir, flags):
        return ["finetune.py", "train", "--manifest", manifest, "--train-split", "bench",
                "--base-model", base_model, "--output-dir", output_dir,
                "--max-length", args.max_length, *flags, "--overwrite"]

    rows = []
    for i, (name, flags) in enumerate(args.finetune_variants.items()):
        try:
            run_step(f"finetune_{name}", command(out / f"ft_{name}", flags), out / "logs", gpu,
                     None if i == 0 else args.variant_timeout)
        except PipelineError as err:
            if i == 0:  # the reference: its adapter feeds the other steps
                raise
            rows.append(failed_row("finetune.py train (training loop)", name, err))
            continue
        rows.append(finetune_row(name, json.loads(
            (out / f"ft_{name}" / "train_metrics.json").read_text())))
        progress(rows)
    reference = rows[0]
    for row in (r for r in rows if "failed" not in r):
        same = row["step_rows"] == reference["step_rows"]
        row["max_step_loss_gap_to_first"] = (
            max(abs(a - b) for a, b in zip(row["step_losses"], reference["step_losses"]))
            if same else None)
    profiled = next((r for r in rows if r["config"] == args.profile_variant), None)
    if profiled is not None and "failed" not in profiled:
        flags = [*args.finetune_variants[args.profile_variant],
                 "--max-steps", 5 + args.profile_steps + 1, "--profile-steps", args.profile_steps]
        run_step("finetune_profile", command(out / "ft_profile", flags), out / "logs", gpu)
        metrics = json.loads((out / "ft_profile" / "train_metrics.json").read_text())
        shutil.copy(out / "ft_profile" / "profile.txt", out / "profile_finetune.txt")
        profiled["profile"] = metrics["profile"]
    return rows


def score_spearman(first: Path, other: Path) -> float:
    from scipy.stats import spearmanr

    def read(path):
        return {x["row_id"]: x["score"]
                for x in read_jsonl(path / "train_scores.jsonl", "bench scores")}

    a, b = read(first), read(other)
    both = [r for r in a if a[r] is not None and b.get(r) is not None]
    return float(spearmanr([a[r] for r in both], [b[r] for r in both]).statistic)


def bench_score(args, manifest: Path, adapter: str, tokens: int, out: Path, gpu: bool):
    """Each score variant (the first keeps its gradients: bergson direct and the floor reuse its
    query index and data); returns the rows, the first variant's summary and its folder."""
    rows, first = [], None
    first_dir = out / f"score_{next(iter(args.score_variants))}"
    for name, flags in args.score_variants.items():
        keep = ["--keep-gradients"] if first is None else []
        try:
            peak = run_step(f"score_{name}", ["score.py", "--manifest", manifest, "--train-split",
                                              "bench", "--adapter-path", adapter,
                                              "--output-dir", out / f"score_{name}",
                                              "--score-mode", "mean", "--preconditioning-mode",
                                              "query", "--projection-dim", 32, "--subset-k", 10,
                                              *keep, "--max-length", args.max_length, *flags,
                                              "--overwrite"], out / "logs", gpu,
                            None if first is None else args.variant_timeout)
        except PipelineError as err:
            if first is None:
                raise
            rows.append(failed_row("score.py (train scoring stage)", name, err))
            continue
        summary = json.loads((out / f"score_{name}" / "summary.json").read_text())
        rows.append({"step": "score.py (train scoring stage)", "config": name,
                     "seconds": summary["stage_seconds"]["train_scoring"], "tokens": tokens,
                     "peak_gib": peak, "peak_source": "nvidia-smi",
                     "whole_run_seconds": summary["total_seconds"],
                     "spearman_to_first": (score_spearman(first_dir, out / f"score_{name}")
                                           if first is not None else 1.0)})
        first = first or summary
    return rows, first, first_dir


def bench_direct_bergson(summary: dict, score_dir: Path, out: Path,
                         tokens: int) -> tuple[dict, float]:
    """bergson's Score called here on the first score variant's data and query index, and the
    bare fwd+bwd over bergson's batches (benchmarks/score_speed.py)."""
    from benchmarks.score_speed import timed_direct_bergson, timed_floor

    tmp = out / "score_direct"
    shutil.copytree(summary["adapter_path"], tmp / "adapter")
    config_path = tmp / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = summary["base_model"]
    config_path.write_text(json.dumps(config))
    direct = timed_direct_bergson(summary, score_dir, tmp)
    floor_seconds, _ = timed_floor(summary, score_dir, tmp / "adapter", 1)
    return ({"step": "bergson Score, called directly", "config": "default", "seconds": direct,
             "tokens": tokens}, floor_seconds)


def fill_ratios(rows: list[dict], floor_seconds: float | None, tokens: int, n_params: int,
                flop_per_token: int, peak_tflops: float) -> None:
    """tokens/s, MFU, step / floor and step / best configuration of this run, per row."""
    def mfu(n_tokens, seconds):
        return flop_per_token * n_params * n_tokens / seconds / (peak_tflops * 1e12)

    floor_tps = tokens / floor_seconds if floor_seconds else None
    rows = [row for row in rows if "failed" not in row]
    for row in rows:
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        row["mfu"] = mfu(row["tokens"], row["seconds"])
        row["flop_per_token_per_parameter"] = flop_per_token
        row["floor_tokens_per_second"] = floor_tps
        row["floor_mfu"] = mfu(tokens, floor_seconds) if floor_seconds else None
        row["ratio_to_floor"] = row["tokens_per_second"] / floor_tps if floor_tps else None
    best = max(row["tokens_per_second"] for row in rows)
    for row in rows:
        row["ratio_to_best_config"] = row["tokens_per_second"] / best


def markdown(result: dict, n_params: int) -> str:
    def num(x, fmt):
        return format(x, fmt) if x is not None else "n/a"

    lines = [f"Device: {result['device']}; {result['rows']} rows, {result['tokens']} tokens "
             f"({result['supervised_tokens']} supervised); floors in bf16 with "
             f"{result['floor_batch_tokens']}-token batches; {n_params / 1e6:.1f}M parameters, "
             f"MFU against {result['peak_tflops']:g} TFLOP/s.", "",
             "| step | config | seconds | tokens/s | 2nd half tokens/s | floor tokens/s | "
             "step / floor | step / best config | MFU | floor MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in (r for r in result["table"] if "failed" not in r):
        peak = num(row.get("peak_gib"), ".1f")
        if row.get("peak_source") == "nvidia-smi" and peak != "n/a":
            peak += " (smi)"
        lines.append(
            f"| {row['step']} | {row['config']} | {row['seconds']:.1f} | "
            f"{row['tokens_per_second']:,.0f} | "
            f"{num(row.get('second_half_tokens_per_second'), ',.0f')} | "
            f"{num(row['floor_tokens_per_second'], ',.0f')} | "
            f"{num(row['ratio_to_floor'], '.2f')} | {row['ratio_to_best_config']:.2f} | "
            f"{row['mfu']:.2%} | {num(row['floor_mfu'], '.2%')} | {peak} |")
    finetune = [r for r in result["table"]
                if r["step"].startswith("finetune") and "failed" not in r]
    if finetune:
        lines += ["", "| finetune config | steps | rows / step | micro-batches / step | "
                  "final train loss | max step-loss gap to first |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in finetune:
            lines.append(f"| {r['config']} | {r['optimizer_steps']} | {r['rows_per_step']:.1f} | "
                         f"{r['micro_batches_per_step']} | {r['final_train_loss']:.4f} | "
                         f"{num(r.get('max_step_loss_gap_to_first'), '.4f')} |")
        for r in finetune:
            if r.get("profile"):
                prof = r["profile"]
                lines.append(f"\nProfile of {r['config']} ({prof['steps']} steps under "
                             f"torch.profiler): {prof['wall_s_per_step']:.3f} s wall a step, GPU "
                             f"busy {num(prof['gpu_busy_s_per_step'], '.3f')} s "
                             f"({num(prof['gpu_busy_fraction'], '.0%')}), "
                             f"{num(prof['kernels_per_step'], ',.0f')} kernels a step "
                             "(profile_finetune.txt)")
    for r in result["table"]:
        if "spearman_to_first" in r and r["spearman_to_first"] != 1.0:
            lines.append(f"\nscore.py {r['config']}: Spearman {r['spearman_to_first']:.4f} with "
                         "the first configuration's scores")
    for r in (r for r in result["table"] if "failed" in r):
        lines.append(f"\nFailed: {r['step']} {r['config']}: {r['failed']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    # the bench folder is rewritten whole: only one bench.py wrote, never the checkout or an input
    out = check_output_dir(args.output_dir, True, "bench.py",
                           inputs=[args.manifest, args.adapter_path])
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise PipelineError("bench.py measures GPU steps; no CUDA device is visible")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not args.adapter_path and "finetune" not in steps:
        raise PipelineError("--adapter-path is needed when --steps leaves out finetune")
    if not args.adapter_path and not args.base_model:
        raise PipelineError("give --base-model (or --adapter-path, whose base model is used)")
    base_model = args.base_model or base_model_of_adapter(args.adapter_path)
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    stamp_output(out, "bench.py")
    manifest = bench_rows(args.manifest, args.split, args.rows, out)
    rows = tokenized_rows(manifest, base_model, args.max_length)
    tokens = sum(len(r["input_ids"]) for r in rows)
    supervised = sum(r["num_supervised_tokens"] for r in rows)
    n_params = count_parameters(base_model)
    table = []
    adapter = args.adapter_path

    def publish():
        """bench.json and bench.md after every step: a run cut short keeps what it measured."""
        result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "rows": len(rows),
                  "tokens": tokens, "supervised_tokens": supervised, "base_model": base_model,
                  "adapter_path": adapter, "floor_batch_tokens": args.floor_batch_tokens,
                  "peak_tflops": args.peak_tflops, "parameters": n_params,
                  "finetune_variants": args.finetune_variants,
                  "score_variants": args.score_variants, "table": table,
                  "provenance": provenance(manifest=args.manifest)}
        text = markdown(result, n_params)
        write_json_atomic(out / "bench.json", result)
        (out / "bench.md").write_text(text)
        return text

    if "finetune" in steps:
        def progress(done):
            fill_ratios(done, None, tokens, n_params, 4, args.peak_tflops)
            table[:] = done
            publish()

        finetune = bench_finetune(args, manifest, base_model, out, gpu, progress)
        floor_seconds, _ = floor_train(rows, base_model, args.floor_batch_tokens, device)
        fill_ratios(finetune, floor_seconds, tokens, n_params, 4, args.peak_tflops)
        table[:] = finetune
        adapter = adapter or str(out / f"ft_{finetune[0]['config']}")
        publish()
    if "score" in steps:
        score, summary, first_dir = bench_score(args, manifest, adapter, tokens, out, gpu)
        direct, floor_seconds = bench_direct_bergson(summary, first_dir, out, tokens)
        fill_ratios(score + [direct], floor_seconds, tokens, n_params, 4, args.peak_tflops)
        score[0]["vs_direct_bergson"] = direct["seconds"] / score[0]["seconds"]
        table += score + [direct]
        publish()
    forward_floor = None
    if "eval_loss" in steps:
        peak = run_step("eval_loss", ["eval_loss.py", "--manifest", manifest, "--eval-split",
                                      "bench", "--adapter-path", adapter, "--skip-base",
                                      "--batch-size", 16, "--max-length", args.max_length,
                                      "--output-json", out / "eval.json"], out / "logs", gpu)
        result = json.loads((out / "eval.json").read_text())
        forward_floor = floor_forward(rows, base_model, args.floor_batch_tokens, device)
        row = {"step": "eval_loss.py (adapter pass)", "config": "batch 16",
               "seconds": result["finetuned"]["wall_clock_s"], "tokens": tokens,
               "peak_gib": peak, "peak_source": "nvidia-smi"}
        fill_ratios([row], forward_floor, tokens, n_params, 2, args.peak_tflops)
        table.append(row)
        publish()
    if "sae_analysis" in steps and args.sae_path:
        peak = run_step("sae_analysis", ["sae_analysis.py", "--manifest", manifest, "--split",
                                         "bench", "--sae-path", args.sae_path, "--base-model",
                                         base_model, "--output-dir", out / "sae",
                                         "--max-length", args.max_length], out / "logs", gpu)
        summary = json.loads((out / "sae" / "summary.json").read_text())
        if forward_floor is None:
            forward_floor = floor_forward(rows, base_model, args.floor_batch_tokens, device)
        row = {"step": "sae_analysis.py (features)", "config": "default",
               "seconds": summary["wall_clock_s"], "tokens": tokens, "peak_gib": peak,
               "peak_source": "nvidia-smi"}
        fill_ratios([row], forward_floor, tokens, n_params, 2, args.peak_tflops)
        table.append(row)

    print(publish())


if __name__ == "__main__":
    run_main(main)
