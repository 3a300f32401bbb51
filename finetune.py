"""LoRA supervised finetuning with completion-only loss.

  finetune.py train --manifest runs/smoltalk_v1/manifest.json --output-dir runs/smoltalk_v1/base_adapter

Trains on the split's rows tokenized by pipeline.tokenize_example (the same ids score.py hands to
bergson): prompt tokens are masked with -100, completion tokens (including the end-of-turn marker)
are supervised. The loss of an optimizer step is the summed token NLL over every supervised token
in the step divided by their count, so long and short completions weigh per token, not per row.
Continuation manifests written by score.py work the same way (--train-split top_k, say), and
--resume-adapter continues training an existing adapter instead of starting a fresh one.

Several GPUs, data-parallel (one process per GPU; --batch-size is per process):

  torchrun --nproc-per-node 2 finetune.py train ...

Each optimizer step then takes gradient-accumulation x processes micro-batches from the same
seeded stream, process r training micro-batches r, r+N, ...; the LoRA gradients are summed over
processes before clipping. N processes with --gradient-accumulation G make the same steps as one
process with --gradient-accumulation N*G (the tests check it). On 2 H200s the training loop ran
1.87x faster than on one (device/multigpu.sh, AGENTS.md).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import (PipelineError, base_model_of_adapter, check_adapter_dir, close_distributed,
                      init_distributed, length_sorted_batches, load_manifest,
                      load_model_with_adapter, load_split, load_tokenizer, pad_batch, pick_dtype,
                      provenance, publish_dir, run_main, shard_indices, staging_dir,
                      sum_over_processes, token_nll_sums, tokenize_split, write_json_atomic)

DEFAULT_BASE_MODEL = "google/gemma-3-1b-it"
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train (or continue) a LoRA adapter on a manifest split",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main or continuation manifest")
    p.add_argument("--train-split", default="train_base", help="split to train on")
    p.add_argument("--eval-split", default="eval",
                   help="split for the final eval loss; 'none' to skip")
    p.add_argument("--output-dir", default="runs/smoltalk_v1/base_adapter",
                   help="where the adapter, tokenizer and train_metrics.json go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local checkpoint folder (default: the base model recorded in "
                        f"--resume-adapter, else {DEFAULT_BASE_MODEL})")
    p.add_argument("--resume-adapter", default=None,
                   help="continue training this saved adapter instead of a fresh LoRA")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per row; longer rows are truncated on the right")
    p.add_argument("--seed", type=int, default=42, help="seed for LoRA init and row order")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the split")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="fraction of steps with linear warm-up; then linear decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per micro-batch (per process under torchrun)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="also cap a micro-batch at this many padded tokens (long rows get "
                        "smaller batches)")
    p.add_argument("--gradient-accumulation", type=int, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS,
                   help="comma-separated module names LoRA wraps")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="trade compute for memory (long rows on a large model)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights/compute dtype: auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--eval-batch-size", type=int, default=8, help="rows per eval batch")
    p.add_argument("--log-every", type=int, default=10, help="optimizer steps between loss logs")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="run torch.profiler over this many optimizer steps (after up to 5 "
                        "warm-up steps): profile.txt in --output-dir lists operators and kernels "
                        "by device time, train_metrics.json's 'profile' gives wall-clock vs "
                        "GPU-busy time per step (how launch-bound the loop is); profiled steps "
                        "run slower, so such a run's tokens/s is no speed figure")
    args = parser.parse_args(argv)
    if args.profile_steps < 0:
        p.error("--profile-steps must be 0 or more")
    for name in ("batch_size", "gradient_accumulation", "max_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs <= 0 and not args.max_steps:
        p.error("--epochs must be positive")
    return args


def build_model(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    if args.resume_adapter:
        return load_model_with_adapter(args.base_model, args.resume_adapter, dtype, device,
                                       trainable=True)
    model = load_model_with_adapter(args.base_model, None, dtype, device)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise PipelineError(f"--lora-targets {', '.join(missing)} not found in {args.base_model}")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def epoch_batches(lengths, args, epoch: int):
    """Shuffled row order, grouped into windows of 64 micro-batches sorted by length (little
    padding without training on a length-sorted curriculum), then the batches shuffled."""
    import numpy as np

    rng = np.random.default_rng(args.seed * 1000 + epoch)
    order = rng.permutation(len(lengths))
    window = args.batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window].tolist()
        for batch in length_sorted_batches([lengths[i] for i in chunk], args.batch_size,
                                           args.max_batch_tokens):
            batches.append([chunk[i] for i in batch])
    return [batches[i] for i in rng.permutation(len(batches))]


def evaluate(model, rows, pad_token_id, device, batch_size: int, autocast, rank: int,
             world: int) -> dict:
    """Token-weighted eval loss; under torchrun each process takes a share of the rows."""
    import torch

    model.eval()
    nll_total, token_total = 0.0, 0
    lengths = [len(r["input_ids"]) for r in rows]
    mine = shard_indices(lengths, rank, world)
    with torch.no_grad(), autocast():
        for batch in length_sorted_batches([lengths[i] for i in mine], batch_size):
            batch_rows = [rows[mine[i]] for i in batch]
            input_ids, labels, mask = pad_batch(batch_rows, pad_token_id, device)
            nll, count = token_nll_sums(model, input_ids, labels, mask)
            nll_total += nll.sum().item()
            token_total += int(count.sum().item())
    nll_total, token_total = sum_over_processes([nll_total, token_total], device)
    token_total = int(token_total)
    model.train()
    loss = nll_total / token_total
    return {"loss": loss, "perplexity": math.exp(loss), "supervised_token_count": token_total,
            "num_rows": len(rows)}


def sum_gradients_over_processes(trainable) -> None:
    """One all-reduce of every trainable gradient, flattened into a single fp32 buffer (a LoRA
    model has hundreds of small tensors; one call each would be launch-bound)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param in trainable:
        n = param.numel()
        param.grad = flat[offset:offset + n].view_as(param).to(param.dtype)
        offset += n


def start_profiler(device):
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities)
    profiler.__enter__()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return profiler, time.perf_counter()


def stop_profiler(profiler, started: float, steps: int, device) -> tuple[dict, str]:
    """Wall-clock vs summed kernel time per step, and the operator/kernel table."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    profiler.__exit__(None, None, None)
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 if kernels else None
    summary = {"steps": steps, "wall_s_per_step": wall / steps,
               "kernels_per_step": len(kernels) / steps if kernels else None,
               "gpu_busy_s_per_step": busy / steps if busy is not None else None,
               "gpu_busy_fraction": busy / wall if busy is not None else None}
    sort_key = "self_device_time_total" if kernels else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_key, row_limit=30)
    return summary, table


def train(args) -> None:
    import torch

    manifest = load_manifest(args.manifest)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        raise PipelineError(f"output directory {output_dir} already exists "
                            "(pass --overwrite to replace it)")
    if args.resume_adapter:
        check_adapter_dir(args.resume_adapter)
        args.base_model = args.base_model or base_model_of_adapter(args.resume_adapter)
    args.base_model = args.base_model or DEFAULT_BASE_MODEL
    train_split = load_split(manifest, args.train_split)
    eval_split = None if args.eval_split == "none" else load_split(manifest, args.eval_split)

    rank, world, device = init_distributed(args.device)
    dtype = pick_dtype(args.precision, device)
    tokenizer = load_tokenizer(args.resume_adapter or args.base_model)
    train_rows = tokenize_split(train_split, tokenizer, args.max_length,
                                desc=f"tokenize {args.train_split}").to_list()
    n_before = len(train_rows)
    n_truncated = sum(r["truncated"] for r in train_rows)
    train_rows = [r for r in train_rows if r["num_supervised_tokens"] > 0]
    if not train_rows:
        raise PipelineError(f"check 6 failed: split '{args.train_split}' has no supervised tokens "
                            f"at --max-length {args.max_length}")
    eval_rows = None
    if eval_split is not None:
        eval_rows = tokenize_split(eval_split, tokenizer, args.max_length,
                                   desc=f"tokenize {args.eval_split}").to_list()
        if sum(r["num_supervised_tokens"] for r in eval_rows) == 0:
            raise PipelineError(f"check 6 failed: split '{args.eval_split}' has no supervised "
                                "tokens")

    model = build_model(args, device, dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        import torch.distributed as dist

        for param in trainable:  # every process starts from rank 0's adapter weights
            dist.broadcast(param.data, src=0)
        torch.manual_seed(args.seed + rank)  # independent LoRA dropout masks per process
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    lengths = [len(r["input_ids"]) for r in train_rows]
    batches_per_epoch = len(epoch_batches(lengths, args, 0))
    micro_per_step = args.gradient_accumulation * world
    steps_per_epoch = math.ceil(batches_per_epoch / micro_per_step)
    total_steps = args.max_steps or max(1, math.ceil(steps_per_epoch * args.epochs))
    warmup_steps = int(args.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate,
                                  weight_decay=args.weight_decay)

    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def micro_batch_stream():
        epoch = 0
        while True:
            for batch in epoch_batches(lengths, args, epoch):
                yield epoch, batch
            epoch += 1

    stream = micro_batch_stream()
    loss_curve, tokens_seen, supervised_seen = [], 0, 0
    pad_id = tokenizer.pad_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profile_first = min(5, max(0, total_steps - args.profile_steps))
    profile_last = min(total_steps, profile_first + args.profile_steps)
    profiler, profile_summary, profile_table = None, None, None
    started = time.perf_counter()
    progress = tqdm(range(total_steps), desc="train", unit="step", disable=rank != 0)
    for step in progress:
        if args.profile_steps and step == profile_first:
            profiler, profile_started = start_profiler(device)
        micro = [next(stream) for _ in range(micro_per_step)]
        step_rows = [[train_rows[i] for i in batch] for _, batch in micro]
        step_supervised = sum(r["num_supervised_tokens"] for rows in step_rows for r in rows)
        step_nll, step_tokens = 0.0, 0
        for rows in step_rows[rank::world]:
            input_ids, labels, mask = pad_batch(rows, pad_id, device)
            with autocast():
                nll, _ = token_nll_sums(model, input_ids, labels, mask)
            # dividing by the whole step's token count makes the accumulated gradient the
            # gradient of the step's per-token mean loss
            (nll.sum() / step_supervised).backward()
            step_nll += nll.sum().item()
            step_tokens += int(mask.sum().item())
        if world > 1:
            sum_gradients_over_processes(trainable)
            step_nll, step_tokens = sum_over_processes([step_nll, step_tokens], device)
        tokens_seen += int(step_tokens)
        supervised_seen += step_supervised
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = step_nll / step_supervised
        if not math.isfinite(step_loss):
            raise PipelineError(f"training loss became {step_loss} at step {step + 1}")
        loss_curve.append({"step": step + 1, "epoch": micro[-1][0], "loss": step_loss,
                           "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "supervised_tokens": step_supervised})
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            recent = loss_curve[-args.log_every:]
            progress.set_postfix(loss=f"{sum(x['loss'] for x in recent) / len(recent):.4f}")
        if profiler is not None and step + 1 == profile_last:
            profile_summary, profile_table = stop_profiler(profiler, profile_started,
                                                           profile_last - profile_first, device)
            profiler = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started

    eval_result = None
    if eval_rows is not None:
        eval_started = time.perf_counter()
        eval_result = evaluate(model, eval_rows, pad_id, device, args.eval_batch_size, autocast,
                               rank, world)
        eval_result["split"] = args.eval_split
        eval_result["wall_clock_s"] = time.perf_counter() - eval_started
        if rank == 0:
            print(f"eval loss on '{args.eval_split}': {eval_result['loss']:.4f} "
                  f"(ppl {eval_result['perplexity']:.2f})")
    if rank != 0:  # rank 0 holds the same adapter and writes it
        return

    staged = staging_dir(output_dir)
    model.save_pretrained(str(staged))
    tokenizer.save_pretrained(str(staged))
    if profile_table is not None:
        (staged / "profile.txt").write_text(profile_table + "\n")
        profile_summary.update(first_step=profile_first + 1, last_step=profile_last)
    metrics = {
        "base_model": args.base_model,
        "resume_adapter": args.resume_adapter,
        "train_split": args.train_split,
        "num_train_rows": n_before,
        "num_rows_without_supervised_tokens": n_before - len(train_rows),
        "num_rows_truncated": n_truncated,
        "optimizer_steps": total_steps,
        "processes": world,
        "micro_batches_per_step": micro_per_step,
        "steps_per_epoch": steps_per_epoch,
        "tokens_seen": tokens_seen,
        "supervised_tokens_seen": supervised_seen,
        "train_wall_clock_s": train_seconds,
        "train_tokens_per_s": tokens_seen / train_seconds,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30  # rank 0's
                                if device.type == "cuda" else None),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "final_train_loss": loss_curve[-1]["loss"],
        "final_eval": eval_result,
        "profile": profile_summary,
        "loss_curve": loss_curve,
        "config": {k: v for k, v in vars(args).items()},
        "manifest": manifest["_path"],
        "provenance": provenance(seed=args.seed, manifest=args.manifest),
    }
    write_json_atomic(staged / "train_metrics.json", metrics)
    publish_dir(staged, output_dir)
    print(f"saved adapter to {output_dir} ({total_steps} steps, {tokens_seen} tokens, "
          f"{tokens_seen / train_seconds:.0f} tokens/s)")


def main(argv=None):
    args = parse_args(argv)
    if args.command == "train":
        train(args)
    close_distributed()


if __name__ == "__main__":
    run_main(main)
