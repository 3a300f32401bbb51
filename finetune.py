"""LoRA supervised finetuning with completion-only loss, on TRL's SFTTrainer.

  finetune.py train --manifest runs/smoltalk_v1/manifest.json \
      --output-dir runs/smoltalk_v1/base_adapter

The trainer trains on the split's rows as pipeline.tokenize_example tokenized them (the ids score.py
hands to bergson): SFTTrainer gets them already tokenized, `input_ids` plus a `completion_mask` that
is 1 exactly where tokenize_example's label is not -100, and TRL turns the mask back into those
labels (completion-only loss); nothing is tokenized twice. The loss of an optimizer step is the
summed token NLL over every supervised token of the step divided by their count (the Trainer's
num_items_in_batch, over all micro-batches and processes), so long and short completions weigh per
token, not per row. TRL's fused LM head scores the supervised positions in tiles (on a GPU only
those), so the (rows x positions x vocabulary) logits are never built.

Presets (every flag below overrides its preset's value):
  --preset seed (default)  the seed's recipe: learning rate 1e-4, cosine schedule, 3 epochs, 16
                           rows per optimizer step (1 row x 16 accumulation), weight decay 0.01,
                           LoRA r 16 / alpha 32 / dropout 0.05 on every linear projection, and the
                           epoch with the lowest --eval-split loss kept (load_best_model_at_end)
  --preset fast            2e-4, linear with 3% warm-up, 1 epoch, 8 rows per step (8 x 1), no
                           weight decay, the last step kept, rows grouped by length (little
                           padding in a batch of 8)
The loss is evaluated on --eval-split after every epoch and at the end.

Arms: --init scratch trains a fresh LoRA (lora_B = 0) on the base model; --init continue (what
--resume-adapter PATH alone means) continues training the adapter in PATH. With --init scratch,
--resume-adapter PATH only names the base model (the one PATH was trained on), so one command line
switches between the two designs.

Budget matching: --step-tokens T cuts the row stream into optimizer steps at every multiple of T
supervised tokens (steps equal in tokens, +- one row, not in rows); --budget-tokens N stops after N
supervised tokens. With both, two arms of different row counts train the same tokens in the same
number of steps (ceil(N / T)). --match-split NAME sets both from a split of the manifest (T = its
supervised tokens / the steps its rows make, N = --epochs x its supervised tokens): arms that pass
the same NAME are matched. train_metrics.json records the rows and supervised tokens of every step,
as the trainer counted them.

Several GPUs, data-parallel through the Trainer's own launch (one process per GPU):

  torchrun --nproc-per-node 2 finetune.py train ...

Every process plans the same steps; each step's rows are split into --gradient-accumulation x
processes micro-batches and process r trains its share of them. N processes with
--gradient-accumulation G make the same steps as one process with --gradient-accumulation N*G (the
tests check it). Process 0 writes the adapter and train_metrics.json.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import shutil
import time
from pathlib import Path

from pipeline import (DEFAULT_BASE_MODEL, IGNORE_INDEX, PipelineError, check_adapter_dir,
                      check_output_dir, close_distributed, init_distributed, load_manifest,
                      load_model_with_adapter, load_split, load_tokenizer, pick_dtype, provenance,
                      publish_dir, resolve_base_model, run_main, seed_type, stamp_output,
                      staging_dir, sum_over_processes, tokenize_split, write_json_atomic)

SCRIPT = "finetune.py"
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PRESETS = {
    "seed": dict(learning_rate=1e-4, lr_scheduler="cosine", warmup_ratio=0.0, epochs=3.0,
                 batch_size=1, gradient_accumulation=16, weight_decay=0.01, lora_rank=16,
                 lora_alpha=32.0, lora_dropout=0.05, keep="best", group_by_length=False),
    "fast": dict(learning_rate=2e-4, lr_scheduler="linear", warmup_ratio=0.03, epochs=1.0,
                 batch_size=8, gradient_accumulation=1, weight_decay=0.0, lora_rank=16,
                 lora_alpha=32.0, lora_dropout=0.05, keep="last", group_by_length=True),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None (an unset flag, or one its preset sets)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def from_preset(name: str) -> str:
    return "(" + ", ".join(f"{preset}: {values[name]}" for preset, values in PRESETS.items()) + ")"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train (or continue) a LoRA adapter on a manifest split",
                            formatter_class=HelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main or continuation manifest")
    p.add_argument("--train-split", default="train_base", help="split to train on")
    p.add_argument("--eval-split", default="eval",
                   help="split whose loss is evaluated each epoch and at the end; 'none' to skip")
    p.add_argument("--output-dir", default="runs/smoltalk_v1/base_adapter",
                   help="where the adapter, tokenizer and train_metrics.json go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed",
                   help="training recipe the flags below default to (see the description)")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local checkpoint folder (default: the base model recorded in "
                        f"--resume-adapter, else {DEFAULT_BASE_MODEL})")
    p.add_argument("--init", choices=["scratch", "continue"], default=None,
                   help="scratch: a fresh LoRA on the base model; continue: keep training "
                        "--resume-adapter (default: continue if --resume-adapter is given)")
    p.add_argument("--resume-adapter", default=None,
                   help="the saved adapter to continue (with --init scratch: only its base model)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per row; longer rows are truncated on the right")
    p.add_argument("--seed", type=seed_type, default=42, help="seed for LoRA init and row order")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the split (in supervised tokens with --step-tokens) "
                        + from_preset("epochs"))
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="an optimizer step takes rows until this many supervised tokens (at every "
                        "multiple of it in the row stream) instead of a fixed row count; its rows "
                        "are split into --gradient-accumulation micro-batches per process")
    p.add_argument("--budget-tokens", type=int, default=None,
                   help="stop after this many supervised tokens (overrides --epochs)")
    p.add_argument("--match-split", default=None,
                   help="budget-match to this split of the manifest: --step-tokens = its "
                        "supervised tokens / the steps it takes at --batch-size x "
                        "--gradient-accumulation x processes rows a step, --budget-tokens = "
                        "--epochs x its supervised tokens (arms that all pass the same split "
                        "train equal tokens in equal steps)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="peak learning rate " + from_preset("learning_rate"))
    p.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default=None,
                   help="decay after the warm-up " + from_preset("lr_scheduler"))
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="fraction of the steps with linear warm-up " + from_preset("warmup_ratio"))
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay " + from_preset("weight_decay"))
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per micro-batch, per process (without --step-tokens) "
                        + from_preset("batch_size"))
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="order each epoch's rows as transformers' group_by_length does (shuffled, "
                        "then sorted by length within mega-batches of 50 steps): steps of similar "
                        "lengths, little padding " + from_preset("group_by_length"))
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="refuse to run (before loading the model) if a micro-batch would hold more "
                        "padded tokens than this")
    p.add_argument("--gradient-accumulation", type=int, default=None,
                   help="micro-batches per optimizer step, per process "
                        + from_preset("gradient_accumulation"))
    p.add_argument("--keep", choices=["best", "last"], default=None,
                   help="adapter to save: the evaluation with the lowest --eval-split loss, or "
                        "the last step " + from_preset("keep"))
    fresh = "(a fresh LoRA; --init continue keeps the adapter's)"
    p.add_argument("--lora-rank", type=int, default=None,
                   help=f"LoRA rank r {fresh} " + from_preset("lora_rank"))
    p.add_argument("--lora-alpha", type=float, default=None,
                   help=f"LoRA alpha {fresh} " + from_preset("lora_alpha"))
    p.add_argument("--lora-dropout", type=float, default=None,
                   help=f"LoRA dropout {fresh} " + from_preset("lora_dropout"))
    p.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS,
                   help=f"comma-separated module names LoRA wraps {fresh}")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="trade compute for memory (long rows on a large model)")
    p.add_argument("--padding-free", action="store_true",
                   help="flatten each micro-batch into one unpadded sequence (TRL's padding_free); "
                        "sequence boundaries come from position ids, which flash_attention_2/3 "
                        "handle natively and sdpa through a block-diagonal mask over the whole "
                        "micro-batch")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="attention kernel the model loads with: sdpa (PyTorch's SDPA without "
                        "its cuDNN backend, which trained Qwen2.5 to a NaN loss on the H200), "
                        "sdpa_cudnn (SDPA with PyTorch's own backend choice), eager, "
                        "flash_attention_2, ...")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights/compute dtype: auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto",
                   help="auto, cuda or cpu (one GPU: set CUDA_VISIBLE_DEVICES)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="rows per eval batch")
    p.add_argument("--log-every", type=int, default=10,
                   help="optimizer steps between printed loss lines (every step is recorded)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="run torch.profiler over this many optimizer steps (after up to 5 "
                        "warm-up steps): profile.txt in --output-dir lists operators and kernels "
                        "by device time, train_metrics.json's 'profile' gives wall-clock vs "
                        "GPU-busy time per step (how launch-bound the loop is); profiled steps "
                        "run slower, so such a run's tokens/s is no speed figure")
    args = parser.parse_args(argv)
    args.keep_given = args.keep is not None
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "gradient_accumulation", "max_length", "eval_batch_size",
                 "log_every", "lora_rank", "max_steps", "step_tokens", "budget_tokens",
                 "max_batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.profile_steps < 0:
        p.error("--profile-steps must be 0 or more")
    if not 0 <= args.warmup_ratio < 1:
        p.error("--warmup-ratio must be in [0, 1)")
    if args.epochs <= 0 and not (args.max_steps or args.budget_tokens):
        p.error("--epochs must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# inputs, checked before a model loads


def check_arguments(args) -> tuple[dict, Path]:
    """Flags, paths and splits: every bad input fails here, before tokenization and the model."""
    manifest = load_manifest(args.manifest)
    output_dir = check_output_dir(args.output_dir, args.overwrite, SCRIPT,
                                  inputs=[args.manifest, args.resume_adapter])
    args.init = args.init or ("continue" if args.resume_adapter else "scratch")
    if args.init == "continue" and not args.resume_adapter:
        raise PipelineError("--init continue needs --resume-adapter PATH (the adapter to continue)")
    if args.resume_adapter:
        check_adapter_dir(args.resume_adapter)
    args.base_model = resolve_base_model(args.base_model, args.resume_adapter)
    if args.eval_split == "none" and args.keep == "best":
        if args.keep_given:
            raise PipelineError("--keep best picks the step with the lowest --eval-split loss; "
                                "it needs an --eval-split (or pass --keep last)")
        args.keep = "last"
        print(f"--eval-split none: keeping the last step (preset {args.preset} keeps the best "
              "evaluation, and there is none)")
    if args.device.startswith("cuda:"):
        raise PipelineError(f"--device {args.device}: the Trainer takes the GPU its launcher "
                            "gives it; set CUDA_VISIBLE_DEVICES instead")
    if args.device not in ("auto", "cuda", "cpu"):
        raise PipelineError(f"--device {args.device}: expected auto, cuda or cpu")
    for split in (args.train_split, args.eval_split, args.match_split):
        if split not in (None, "none"):
            load_split(manifest, split)
    return manifest, output_dir


def tokenized_rows(args, manifest, tokenizer) -> tuple[list[dict], list[dict] | None, dict]:
    """The train and eval rows as tokenize_example makes them; rows without supervised tokens are
    dropped from training (they carry no loss)."""
    train_rows = tokenize_split(load_split(manifest, args.train_split), tokenizer, args.max_length,
                                desc=f"tokenize {args.train_split}").to_list()
    counts = {"num_train_rows": len(train_rows),
              "num_rows_truncated": sum(r["truncated"] for r in train_rows)}
    train_rows = [r for r in train_rows if r["num_supervised_tokens"] > 0]
    counts["num_rows_without_supervised_tokens"] = counts["num_train_rows"] - len(train_rows)
    if not train_rows:
        raise PipelineError(f"check 6 failed: split '{args.train_split}' has no supervised tokens "
                            f"at --max-length {args.max_length}")
    eval_rows = None
    if args.eval_split != "none":
        eval_rows = tokenize_split(load_split(manifest, args.eval_split), tokenizer,
                                   args.max_length, desc=f"tokenize {args.eval_split}").to_list()
        if sum(r["num_supervised_tokens"] for r in eval_rows) == 0:
            raise PipelineError(f"check 6 failed: split '{args.eval_split}' has no supervised "
                                "tokens")
    return train_rows, eval_rows, counts


def match_budget(args, manifest, tokenizer, world: int) -> None:
    """--match-split: the step and budget tokens that make this arm train what that split trains
    in its row-count steps, in tokens (explicit --step-tokens / --budget-tokens win)."""
    rows = tokenize_split(load_split(manifest, args.match_split), tokenizer, args.max_length,
                          desc=f"tokenize {args.match_split}")["num_supervised_tokens"]
    rows = [n for n in rows if n > 0]
    if not rows:
        raise PipelineError(f"--match-split: split '{args.match_split}' has no supervised tokens")
    steps = math.ceil(len(rows) / (args.batch_size * args.gradient_accumulation * world))
    args.step_tokens = args.step_tokens or math.ceil(sum(rows) / steps)
    args.budget_tokens = args.budget_tokens or math.ceil(args.epochs * sum(rows))


def trainer_dataset(rows: list[dict]):
    """input_ids + completion_mask, the pre-tokenized form SFTTrainer turns into labels itself."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows],
        "completion_mask": [[int(label != IGNORE_INDEX) for label in r["labels"]] for r in rows]})


# ---------------------------------------------------------------------------------------------
# which rows each optimizer step trains on


def epoch_order(lengths: list[int], args, epoch: int, rows_per_step: int) -> list[int]:
    if not args.group_by_length:
        import numpy as np

        return np.random.default_rng(args.seed * 1000 + epoch).permutation(len(lengths)).tolist()
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    return get_length_grouped_indices(lengths, rows_per_step, generator=generator)


def plan_steps(supervised: list[int], lengths: list[int], args, world: int) -> dict:
    """The rows of every optimizer step of the run, decided before the model loads.

    Rows come as one stream, epoch after epoch, each epoch in its own seeded order (epoch_order).
    The stream is cut into steps of --batch-size x --gradient-accumulation x processes rows, or
    with --step-tokens T where it crosses each multiple of T supervised tokens (step s ends with
    the row that reaches (s+1)T, so a step's overshoot never accumulates into the next). It stops
    after --max-steps steps, after --budget-tokens supervised tokens, or after --epochs passes
    (counted in rows, or in supervised tokens with --step-tokens). A step needs a row for each of
    its micro-batches."""
    micro_batches = args.gradient_accumulation * world
    rows_per_step = args.batch_size * micro_batches
    total = sum(supervised)
    stop_tokens, stop_steps = args.budget_tokens, args.max_steps
    if args.step_tokens and not (stop_tokens or stop_steps):
        stop_tokens = math.ceil(args.epochs * total)
    elif not args.step_tokens and not (stop_tokens or stop_steps):
        stop_steps = max(1, math.ceil(args.epochs * len(supervised) / rows_per_step))
    steps, step_epoch, epoch_ends = [], [], []
    current, seen, epoch = [], 0, 0
    while True:
        for row in epoch_order(lengths, args, epoch, rows_per_step):
            current.append(row)
            seen += supervised[row]
            spent = stop_tokens is not None and seen >= stop_tokens
            full = (seen >= (len(steps) + 1) * args.step_tokens if args.step_tokens
                    else len(current) == rows_per_step)
            if len(current) < micro_batches and (full or spent):
                if not spent:
                    raise PipelineError(
                        f"--step-tokens {args.step_tokens}: step {len(steps) + 1} reaches its "
                        f"tokens with {len(current)} row(s), but a step needs one row for each of "
                        f"its {micro_batches} micro-batches (--gradient-accumulation "
                        f"{args.gradient_accumulation} x {world} process(es)); raise --step-tokens "
                        "or lower --gradient-accumulation")
                continue  # the last step: take rows until every micro-batch has one
            if full or spent:
                steps.append(current)
                step_epoch.append(epoch)
                current = []
                if spent or len(steps) == stop_steps:
                    return {"steps": steps, "step_epoch": step_epoch, "epoch_end_steps": epoch_ends,
                            "micro_batches_per_step": micro_batches,
                            "rows_per_step": None if args.step_tokens else rows_per_step,
                            "steps_per_epoch": math.ceil(total / args.step_tokens
                                                         if args.step_tokens
                                                         else len(supervised) / rows_per_step)}
        epoch_ends.append(len(steps) + (1 if current else 0))  # the step the epoch ends in
        epoch += 1


# ---------------------------------------------------------------------------------------------
# the library pieces, defined on first use: importing trl and transformers' Trainer takes ~20 s,
# and bad input should fail before that


@functools.cache
def trainer_classes():
    import torch
    from transformers import ProgressCallback, TrainerCallback
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import SFTTrainer

    class StepSampler(BatchRebalanceSampler):
        """This process's micro-batches of the planned steps, in order.

        transformers' BatchRebalanceSampler splits each step's rows into processes x accumulation
        micro-batches of balanced padded cost, and the Trainer hands it to the DataLoader as a
        batch sampler without re-sharding it; but it draws a fixed number of rows per step in its
        own fixed-seed order. Steps of equal supervised tokens (and an order set by --seed) are
        offered neither by it nor by TRL, so the steps come from plan_steps and only the split
        into micro-batches is the library's."""

        def __init__(self, steps, lengths, world, accumulation, rank):
            super().__init__(lengths, effective_batch_size=max(map(len, steps)), dp_size=world,
                             grad_accum=accumulation, shuffle=False, rank=rank)
            # [step][process][micro-batch] -> row indices
            self.micro_batches = [self._assign(step, [lengths[i] for i in step]) for step in steps]

        def __iter__(self):
            for per_process in self.micro_batches:
                yield from per_process[self.rank]

        def __len__(self):
            return len(self.micro_batches) * self.grad_accum

    class CompletionTrainer(SFTTrainer):
        """SFTTrainer on the planned steps, counting what each step trained on, with a
        token-weighted eval loss (the Trainer's averages per-batch means: a batch of short
        completions would weigh like one of long ones)."""

        def __init__(self, *args, step_sampler, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_sampler = step_sampler
            self.step_counts = []  # per step: [rows, supervised tokens] this process trained on
            self.evals = []
            self.paused_seconds = 0.0  # evaluation and checkpointing inside the training loop
            # TRL's compute_loss divides by num_items_in_batch itself; the Trainer counts it only
            # for models it believes take loss kwargs
            self.model_accepts_loss_kwargs = True

        def _get_train_sampler(self, train_dataset=None):
            return self.step_sampler

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            # kept as tensors: reading them back every step would stall the GPU's queue
            self.step_counts.append(torch.stack([
                sum(sequences_in(batch) for batch in batches),
                sum((batch["labels"][..., 1:] != IGNORE_INDEX).sum() for batch in batches)]))
            return batches, num_items

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                out = model(**inputs, use_cache=False, fused_lm_head=True)
            nll, counted = -out.log_probs.double(), out.label_mask.double()
            if "seq_idx" in inputs:  # padding-free: one flattened row, summed per sequence
                sequence = inputs["seq_idx"][0, 1:].long()  # the sequence of each target token
                n = int(inputs["seq_idx"].max()) + 1
                per_row = torch.stack([nll.new_zeros(n).index_add_(0, sequence, nll[0]),
                                       nll.new_zeros(n).index_add_(0, sequence, counted[0])], -1)
            else:
                per_row = torch.stack([nll.sum(-1), counted.sum(-1)], -1)
            # gather_for_metrics drops the rows the last batch repeats to even out processes
            self.eval_sums += self.accelerator.gather_for_metrics(per_row).sum(0)
            return (per_row[:, 0].sum() / per_row[:, 1].sum().clamp(min=1)).float(), None, None

        def evaluation_loop(self, dataloader, *args, metric_key_prefix="eval", **kwargs):
            self.eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            output = super().evaluation_loop(dataloader, *args,
                                             metric_key_prefix=metric_key_prefix, **kwargs)
            nll, tokens = self.eval_sums.tolist()
            output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
            output.metrics[f"{metric_key_prefix}_supervised_tokens"] = int(tokens)
            return output

        def evaluate(self, *args, **kwargs):
            started = time.perf_counter()
            metrics = super().evaluate(*args, **kwargs)
            seconds = time.perf_counter() - started
            self.paused_seconds += seconds
            self.evals.append({"step": self.state.global_step, "loss": metrics["eval_loss"],
                               "supervised_tokens": metrics["eval_supervised_tokens"],
                               "wall_clock_s": seconds})
            return metrics

        def _save_checkpoint(self, model, trial):
            started = time.perf_counter()
            super()._save_checkpoint(model, trial)
            self.paused_seconds += time.perf_counter() - started

    class RunRecorder(TrainerCallback):
        """Epoch-end evaluations of the planned stream, the starting weights, loop time and peak
        memory, the profiler window, and a stop on a non-finite loss."""

        def __init__(self, trainer, epoch_end_steps, profile_steps):
            self.trainer, self.epoch_end_steps = trainer, set(epoch_end_steps)
            self.profile_steps, self.profiler = profile_steps, None
            self.profile_summary = self.profile_table = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            torch.manual_seed(args.seed + args.process_index)  # independent LoRA dropout masks
            self.start_weights = weights_digest(peft_weights(model))
            self.profile_first = min(5, max(0, state.max_steps - self.profile_steps))
            self.profile_last = min(state.max_steps, self.profile_first + self.profile_steps)
            if args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(args.device)
            self.started = time.perf_counter()
            self.step_elapsed = []  # loop seconds at each step's end (bench.py's second-half tokens/s)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profile_steps and state.global_step == self.profile_first:
                self.profiler, self.profile_started = start_profiler(args.device)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.epoch_end_steps:
                control.should_evaluate = True
            self.step_elapsed.append(time.perf_counter() - self.started
                                     - self.trainer.paused_seconds)
            if self.profiler is not None and state.global_step == self.profile_last:
                self.profile_summary, self.profile_table = stop_profiler(
                    self.profiler, self.profile_started, self.profile_last - self.profile_first,
                    args.device)
                self.profile_summary.update(first_step=self.profile_first + 1,
                                            last_step=self.profile_last)
                self.profiler = None
            if state.global_step == state.max_steps:
                if args.device.type == "cuda":
                    torch.cuda.synchronize(args.device)
                self.loop_seconds = (time.perf_counter() - self.started
                                     - self.trainer.paused_seconds)
                self.peak_gpu_memory = (torch.cuda.max_memory_allocated(args.device)
                                        if args.device.type == "cuda" else None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise PipelineError(f"training loss became {loss} at step {state.global_step}")

    class SparseProgress(ProgressCallback):
        """The Trainer's progress bar, printing a train log line only every --log-every steps (the
        Trainer logs every step: train_metrics.json's loss curve needs each one)."""

        def __init__(self, every):
            super().__init__()
            self.every = every

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" not in (logs or {}) or state.global_step % self.every == 0:
                super().on_log(args, state, control, logs=logs, **kwargs)

    return StepSampler, CompletionTrainer, RunRecorder, SparseProgress


def sequences_in(batch):
    """Rows in a collated micro-batch (a tensor); a padding-free one is a single row of sequences
    that each start at position 0."""
    if "attention_mask" not in batch and "position_ids" in batch:
        return (batch["position_ids"] == 0).sum()
    ids = batch["input_ids"]
    return ids.new_tensor(ids.shape[0])


def peft_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    return {name: value.detach().float().cpu().numpy()
            for name, value in get_peft_model_state_dict(model).items()}


def weights_digest(weights: dict) -> dict:
    """sha256 over the adapter's tensors (names sorted, float32 bytes, the names as the saved
    adapter_model.safetensors has them) and the largest |lora_A| and |lora_B|: a fresh LoRA has
    lora_B = 0, a continued one the saved adapter's digest."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    largest = {part: max((float(np.abs(v).max()) for k, v in weights.items() if part in k),
                         default=None) for part in ("lora_A", "lora_B")}
    return {"sha256": digest.hexdigest(), "lora_A_max_abs": largest["lora_A"],
            "lora_B_max_abs": largest["lora_B"]}


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


# ---------------------------------------------------------------------------------------------
# model and trainer


def build_model(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    if args.init == "continue":
        return load_model_with_adapter(args.base_model, args.resume_adapter, dtype, device,
                                       trainable=True, attn_implementation=args.attn_implementation)
    model = load_model_with_adapter(args.base_model, None, dtype, device,
                                    attn_implementation=args.attn_implementation)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise PipelineError(f"--lora-targets {', '.join(missing)} not found in {args.base_model}")
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def shared_staging_dir(output_dir: Path, rank: int, world: int) -> Path:
    """Process 0's staging folder, known to every process (the best checkpoint is saved there by
    process 0 and loaded back by all)."""
    staged = [str(staging_dir(output_dir)) if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(staged, src=0)
    return Path(staged[0])


def build_trainer(args, model, tokenizer, train_rows, eval_rows, plan, sampler, checkpoints,
                  dtype, device):
    import torch
    from transformers import ProgressCallback
    from trl import SFTConfig

    _, CompletionTrainer, RunRecorder, SparseProgress = trainer_classes()
    steps = len(plan["steps"])
    evaluating = eval_rows is not None
    config = SFTConfig(
        output_dir=str(checkpoints), report_to="none", seed=args.seed,
        use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=False,
        max_steps=steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, optim="adamw_torch",
        logging_steps=1, logging_nan_inf_filter=False,
        # evaluations come at the planned epoch ends (RunRecorder) and, this eval_steps being
        # out of reach, at the last step
        eval_strategy="steps" if evaluating else "no", eval_steps=steps + 1,
        save_strategy="best" if args.keep == "best" else "no", save_only_model=True,
        save_total_limit=1, load_best_model_at_end=args.keep == "best",
        metric_for_best_model="loss",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # rows arrive tokenized and truncated by tokenize_example
        completion_only_loss=True, max_length=None, padding_free=args.padding_free,
        ddp_find_unused_parameters=False, dataloader_num_workers=0)
    # eval rows longest first: little padding, and an out-of-memory shows at the first batch
    eval_rows = sorted(eval_rows, key=lambda r: -len(r["input_ids"])) if evaluating else None
    trainer = CompletionTrainer(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=trainer_dataset(train_rows),
        eval_dataset=trainer_dataset(eval_rows) if evaluating else None, step_sampler=sampler)
    if len(trainer.train_dataset) != len(train_rows):  # the sampler's indices are ours
        raise PipelineError(f"SFTTrainer dropped {len(train_rows) - len(trainer.train_dataset)} "
                            "training rows")
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(SparseProgress(args.log_every))
    recorder = RunRecorder(trainer, plan["epoch_end_steps"] if evaluating else [],
                           args.profile_steps)
    trainer.add_callback(recorder)
    return trainer, recorder


# ---------------------------------------------------------------------------------------------
# results


def run_record(trainer, recorder, plan, args, eval_rows) -> dict:
    """What the trainer did, step by step, summed over processes."""
    counts = sum_over_processes([int(x) for pair in trainer.step_counts for x in pair.tolist()],
                                trainer.args.device)
    steps_done = len(trainer.step_counts)
    rows = [int(counts[2 * i]) for i in range(steps_done)]
    supervised = [int(counts[2 * i + 1]) for i in range(steps_done)]
    train_logs = [x for x in trainer.state.log_history if "loss" in x and "step" in x]
    curve = [{"step": x["step"], "epoch": plan["step_epoch"][x["step"] - 1], "loss": x["loss"],
              "lr": x.get("learning_rate"), "grad_norm": x.get("grad_norm"),
              "rows": rows[x["step"] - 1], "supervised_tokens": supervised[x["step"] - 1],
              "tokens_so_far": int(x["num_tokens"]),
              "elapsed_s": recorder.step_elapsed[x["step"] - 1]}
             for x in train_logs]
    evals = [dict(e, epoch=plan["step_epoch"][e["step"] - 1] if e["step"] else None)
             for e in trainer.evals]
    kept_step = (trainer.state.best_global_step if args.keep == "best"
                 else trainer.state.global_step)
    final_eval = None
    if eval_rows is not None:
        kept = next(e for e in reversed(evals) if e["step"] == kept_step)
        final_eval = {"loss": kept["loss"], "perplexity": math.exp(kept["loss"]),
                      "supervised_token_count": kept["supervised_tokens"],
                      "num_rows": len(eval_rows), "split": args.eval_split, "step": kept_step,
                      "wall_clock_s": kept["wall_clock_s"]}
    return {"optimizer_steps": trainer.state.global_step, "loss_curve": curve, "evals": evals,
            "kept_step": kept_step, "final_eval": final_eval, "rows_seen": sum(rows),
            "supervised_tokens_seen": sum(supervised),
            # TRL's logged count: every non-padding token of every micro-batch, all processes
            "tokens_seen": int(train_logs[-1]["num_tokens"])}


def write_outputs(staged: Path, output_dir: Path, trainer, recorder, record, plan, args, tokenizer,
                  counts, manifest, dtype, world) -> None:
    import torch

    shutil.rmtree(staged / "checkpoints", ignore_errors=True)
    trainer.model.save_pretrained(str(staged))
    tokenizer.save_pretrained(str(staged))
    if recorder.profile_table is not None:
        (staged / "profile.txt").write_text(recorder.profile_table + "\n")
    device = trainer.args.device
    peft_config = trainer.model.peft_config["default"]
    seconds = recorder.loop_seconds
    metrics = {
        "base_model": args.base_model,
        "init": args.init,
        "resume_adapter": args.resume_adapter,
        "start_weights": recorder.start_weights,
        "preset": args.preset,
        "keep": args.keep,
        "train_split": args.train_split,
        **counts,
        "processes": world,
        "micro_batches_per_step": plan["micro_batches_per_step"],
        "rows_per_step": plan["rows_per_step"],
        "step_tokens": args.step_tokens,
        "budget_tokens": args.budget_tokens,
        "match_split": args.match_split,
        "steps_per_epoch": plan["steps_per_epoch"],
        "planned": {"steps": len(plan["steps"]), "rows": sum(map(len, plan["steps"]))},
        **{k: record[k] for k in ("optimizer_steps", "rows_seen", "tokens_seen",
                                  "supervised_tokens_seen")},
        "train_wall_clock_s": seconds,
        "train_tokens_per_s": record["tokens_seen"] / seconds,
        "train_supervised_tokens_per_s": record["supervised_tokens_seen"] / seconds,
        "peak_gpu_memory_gib": (recorder.peak_gpu_memory / 2**30  # process 0's
                                if recorder.peak_gpu_memory is not None else None),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "padding_free": args.padding_free,
        "attn_implementation": args.attn_implementation,
        "lora": {"r": peft_config.r, "alpha": peft_config.lora_alpha,
                 "dropout": peft_config.lora_dropout,
                 "targets": sorted(peft_config.target_modules)},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                    if p.requires_grad),
        "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "final_train_loss": record["loss_curve"][-1]["loss"],
        "kept_step": record["kept_step"],
        "final_eval": record["final_eval"],
        "evals": record["evals"],
        "profile": recorder.profile_summary,
        "loss_curve": record["loss_curve"],
        "config": {k: v for k, v in vars(args).items() if k != "keep_given"},
        "manifest": manifest["_path"],
        "provenance": provenance(seed=args.seed, manifest=args.manifest),
    }
    write_json_atomic(staged / "train_metrics.json", metrics)
    stamp_output(staged, SCRIPT)
    publish_dir(staged, output_dir)
    kept = (f", kept step {record['kept_step']} (eval loss {record['final_eval']['loss']:.4f})"
            if record["final_eval"] else "")
    print(f"saved adapter to {output_dir} ({record['optimizer_steps']} steps, "
          f"{record['rows_seen']} rows, {record['supervised_tokens_seen']} supervised tokens, "
          f"{record['tokens_seen'] / seconds:.0f} tokens/s{kept})")


def check_micro_batches(sampler, rows, args) -> None:
    """--max-batch-tokens: the Trainer takes a fixed number of micro-batches a step, so a step's
    rows cannot spill into more of them; an oversized one stops the run before the model loads."""
    if args.max_batch_tokens is None:
        return
    for step, per_process in enumerate(sampler.micro_batches, 1):
        for batch in (b for process in per_process for b in process):
            padded = len(batch) * max(len(rows[i]["input_ids"]) for i in batch)
            if padded > args.max_batch_tokens:
                raise PipelineError(
                    f"--max-batch-tokens {args.max_batch_tokens}: a micro-batch of step {step} "
                    f"holds {len(batch)} row(s), {padded} padded tokens; raise "
                    "--gradient-accumulation (or lower --batch-size / --step-tokens)")


def check_device(device, world: int) -> None:
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is visible")
    if device.type == "cuda" and world == 1 and torch.cuda.device_count() > 1:
        raise PipelineError(f"{torch.cuda.device_count()} GPUs visible to one process: launch with "
                            "torchrun --nproc-per-node N, or set CUDA_VISIBLE_DEVICES to one GPU")


def train(args) -> None:
    manifest, output_dir = check_arguments(args)
    tokenizer = load_tokenizer(args.resume_adapter or args.base_model)
    train_rows, eval_rows, counts = tokenized_rows(args, manifest, tokenizer)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.match_split:
        match_budget(args, manifest, tokenizer, world)
    plan = plan_steps([r["num_supervised_tokens"] for r in train_rows],
                      [len(r["input_ids"]) for r in train_rows], args, world)
    StepSampler = trainer_classes()[0]
    sampler = StepSampler(plan["steps"], [len(r["input_ids"]) for r in train_rows], world,
                          args.gradient_accumulation, rank)
    check_micro_batches(sampler, train_rows, args)

    rank, world, device = init_distributed(args.device)
    check_device(device, world)
    dtype = pick_dtype(args.precision, device)
    staged = shared_staging_dir(output_dir, rank, world)
    try:
        model = build_model(args, device, dtype)
        trainer, recorder = build_trainer(args, model, tokenizer, train_rows, eval_rows, plan,
                                          sampler, staged / "checkpoints", dtype, device)
        trainer.train()
        record = run_record(trainer, recorder, plan, args, eval_rows)
        if rank == 0:
            write_outputs(staged, output_dir, trainer, recorder, record, plan, args, tokenizer,
                          counts, manifest, dtype, world)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staged, ignore_errors=True)
        raise


def main(argv=None):
    args = parse_args(argv)
    if args.command == "train":
        train(args)
    close_distributed()


if __name__ == "__main__":
    run_main(main)
