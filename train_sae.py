"""Train a small sparse autoencoder on one layer's residual stream, for when no pretrained SAE can
be had (offline, or a model without a released SAE). sae_analysis.py --sae-path reads the result.

  train_sae.py --manifest runs/smoltalk_v1/manifest.json --split train_base \
      --base-model google/gemma-3-1b-it --layer 17 --d-sae 4096 --k 32 \
      --output-dir runs/smoltalk_v1/local_sae

The training maths is sae-lens's own (TopKTrainingSAE with its dead-feature auxiliary loss, or
StandardTrainingSAE = ReLU + L1; its SAETrainer with Adam, clipping and the LR schedule, driven
through the trainer's public step() seam). What sae-lens's LanguageModelSAETrainingRunner would
add is its own tokenization of a hub dataset through a HookedTransformer; instead the activations
come from the plain transformers model (+ LoRA adapter) on the manifest split, tokenized by
pipeline.tokenize_example, so the SAE sees exactly the tokens finetune.py trains on. They stream
in batches through a shuffled on-device buffer: half of it is handed out, the other half mixes
with the next rows.

Activation normalisation (default expected_average_only_in, sae-lens's): inputs are scaled by a
constant so their mean norm is sqrt(d_in) while training; the constant is estimated on the first
batches, recorded in training_summary.json and folded into the weights at the end, so the saved SAE
reads raw activations. A hold-out of whole groups (group_id) never trains; training_summary.json
reports reconstruction on it: explained variance 1 - sum|x - x_hat|^2 / sum|x - mean x|^2, mean
L0 (active features per token) and dead features (never active on a held-out token).
Output: <output-dir>/cfg.json + sae_weights.safetensors (sae_lens.SAE.load_from_disk reads it; the
hook name blocks.L.hook_resid_post is in its metadata) and training_summary.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import (DEFAULT_BASE_MODEL, PipelineError, add_alias, check_adapter_dir,
                      check_output_dir, length_sorted_batches, load_manifest,
                      load_model_with_adapter, load_split, load_tokenizer, pad_batch, pick_device,
                      pick_dtype, provenance, resolve_base_model, run_main, seed_type,
                      staged_output, tokenize_split, write_json_atomic)
from sae_analysis import (check_layer, decoder_layers, pooled_mask,
                          resid_post_hook_name, residual_after_layer)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main manifest (default: %(default)s)")
    p.add_argument("--split", default="train_base", help="split to train on (default: train_base)")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local checkpoint (default: the adapter's base model, else "
                        f"{DEFAULT_BASE_MODEL})")
    add_alias(p, "--model-name", "base_model")
    p.add_argument("--adapter-path", default=None, help="LoRA adapter to apply to the model")
    p.add_argument("--layer", type=int, required=True,
                   help="decoder layer L: the SAE reads its output (blocks.L.hook_resid_post)")
    p.add_argument("--architecture", choices=["topk", "standard"], default="topk",
                   help="topk = TopK SAE (--k); standard = ReLU + L1 penalty (--l1-coefficient) "
                        "(default: topk)")
    p.add_argument("--d-sae", type=int, default=4096, help="SAE width (default: 4096)")
    p.add_argument("--k", type=int, default=32,
                   help="topk: active features per token (default: 32)")
    p.add_argument("--l1-coefficient", type=float, default=5.0,
                   help="standard: L1 penalty on feature activations (default: 5.0)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: --tokens / --batch-tokens)")
    p.add_argument("--tokens", type=int, default=20_000_000,
                   help="training tokens when --steps is not given; the split is cycled "
                        "(default: 20,000,000)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="activations per SAE optimizer step (default: 4096)")
    p.add_argument("--buffer-tokens", type=int, default=None,
                   help="shuffle-buffer size in activations (default: 32 x --batch-tokens)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: 3e-4)")
    p.add_argument("--lr-decay-fraction", type=float, default=0.2,
                   help="final fraction of steps with linear decay to 0 (default: 0.2)")
    p.add_argument("--normalize-activations", choices=["expected_average_only_in", "none"],
                   default="expected_average_only_in",
                   help="sae-lens input scaling, folded into the weights at the end "
                        "(default: expected_average_only_in)")
    p.add_argument("--norm-estimate-batches", type=int, default=32,
                   help="batches used to estimate the scaling constant (default: 32)")
    p.add_argument("--positions", choices=["all", "completion"], default="all",
                   help="tokens the SAE trains on: all = every token but the first (an attention "
                        "sink with an outsized norm), completion = the supervised tokens "
                        "(default: all)")
    p.add_argument("--holdout-fraction", type=float, default=0.05,
                   help="fraction of rows (whole groups) held out for evaluation (default: 0.05)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per row, truncated as in finetune.py (default: 2048)")
    p.add_argument("--model-batch-size", type=int, default=8,
                   help="rows per model forward pass (default: 8)")
    p.add_argument("--seed", type=seed_type, default=42, help="SAE init and row order (default: 42)")
    p.add_argument("--output-dir", default="runs/smoltalk_v1/local_sae",
                   help="SAE folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument("--log-every", type=int, default=50,
                   help="steps between loss-curve entries (default: 50)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model dtype: auto = bf16 on GPU, fp32 on CPU; the SAE trains in fp32 "
                        "(default: auto)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    args = p.parse_args(argv)
    for name in ("d_sae", "k", "batch_tokens", "model_batch_size", "max_length", "log_every",
                 "norm_estimate_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if not 0 < args.holdout_fraction < 1:
        p.error("--holdout-fraction must be between 0 and 1")
    if not 0 <= args.lr_decay_fraction < 1:
        p.error("--lr-decay-fraction must be in [0, 1)")
    if args.architecture == "topk" and args.k > args.d_sae:
        p.error("--k cannot exceed --d-sae")
    return args


def holdout_split(rows, fraction: float, seed: int):
    """(train indices, held-out indices): whole groups held out, so near-duplicate prompts of one
    group never sit on both sides."""
    import numpy as np

    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("group_id") or row["row_id"], []).append(i)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    held, target = [], max(1, round(fraction * len(rows)))
    for g in order:
        if len(held) >= target:
            break
        held.extend(groups[keys[g]])
    held_set = set(held)
    train = [i for i in range(len(rows)) if i not in held_set]
    if not train:
        raise PipelineError("the hold-out took every row: lower --holdout-fraction or use a "
                            "larger split")
    return train, sorted(held)


def row_activations(model, layer_module, rows, indices, args, pad_id, device):
    """Yields [tokens, d_in] fp32 activations of the chosen positions, rows in the given order
    (grouped into length-sorted windows so little compute goes to padding)."""
    import torch

    window = args.model_batch_size * 16
    for start in range(0, len(indices), window):
        chunk = indices[start:start + window]
        lengths = [len(rows[i]["input_ids"]) for i in chunk]
        for batch in length_sorted_batches(lengths, args.model_batch_size):
            picked = [rows[chunk[i]] for i in batch]
            input_ids, labels, mask = pad_batch(picked, pad_id, device)
            # no_grad must not span the yield: grad mode is thread state, and the SAE's
            # training step runs while this generator is suspended
            with torch.no_grad():
                resid = residual_after_layer(model, layer_module, input_ids, mask)
                acts = resid[pooled_mask(labels, mask, args.positions)].float()
            yield acts


def activation_stream(model, layer_module, rows, train_idx, args, pad_id, device, counter):
    """Endless [batch_tokens, d_in] batches: the training rows cycled in a fresh random order per
    pass, their activations mixed in an on-device buffer before being handed out."""
    import numpy as np
    import torch

    rng = np.random.default_rng(args.seed)
    buffer_size = max(args.buffer_tokens or 32 * args.batch_tokens, 2 * args.batch_tokens)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    buffer = torch.empty(0, model.config.hidden_size, device=device)
    while True:
        order = [train_idx[i] for i in rng.permutation(len(train_idx))]
        for acts in row_activations(model, layer_module, rows, order, args, pad_id, device):
            counter["tokens_forwarded"] += acts.shape[0]
            buffer = torch.cat([buffer, acts])
            if buffer.shape[0] < buffer_size:
                continue
            buffer = buffer[torch.randperm(buffer.shape[0], device=device, generator=generator)]
            n_out = (buffer.shape[0] // 2 // args.batch_tokens) * args.batch_tokens
            for start in range(0, n_out, args.batch_tokens):
                yield buffer[start:start + args.batch_tokens]
            buffer = buffer[n_out:]
        counter["passes"] += 1


def build_sae(args, d_in, device):
    import torch
    from sae_lens import (StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)

    torch.manual_seed(args.seed)
    common = dict(d_in=d_in, d_sae=args.d_sae, dtype="float32", device=str(device),
                  normalize_activations=args.normalize_activations)
    if args.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **common))
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=args.l1_coefficient,
                                                         **common))


def evaluate_heldout(sae, batches, d_sae: int) -> dict:
    """Reconstruction on held-out activations, accumulated in float64 over all of them."""
    import torch

    n, sse, sum_sq, l0 = 0, 0.0, 0.0, 0.0
    sum_x, fired = None, None
    with torch.no_grad():
        for x in batches:
            acts = sae.encode(x)
            recon = sae.decode(acts)
            x64 = x.double()
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            active = acts != 0
            fired = active.any(0) if fired is None else fired | active.any(0)
            sse += (x64 - recon.double()).pow(2).sum().item()
            sum_sq += x64.pow(2).sum().item()
            l0 += active.sum().item()
            n += x.shape[0]
    if n == 0:
        raise PipelineError("the held-out rows have no tokens to evaluate on")
    total_variance = sum_sq - (sum_x.pow(2).sum().item() / n)
    return {"tokens": n, "explained_variance": 1 - sse / total_variance,
            "mse_per_token": sse / n, "mean_l0": l0 / n,
            "dead_features": int(d_sae - fired.sum().item()),
            "dead_fraction": float(1 - fired.float().mean().item())}


def load_rows(args, manifest, tokenizer) -> list[dict]:
    """The split's rows tokenized as finetune.py trains on them, keeping those with positions to
    train on."""
    split = load_split(manifest, args.split)
    columns = ["row_id", "input_ids", "labels", "num_supervised_tokens"]
    columns += ["group_id"] if "group_id" in split.column_names else []
    rows = tokenize_split(split, tokenizer, args.max_length,
                          desc=f"tokenize {args.split}").select_columns(columns).to_list()
    if args.positions == "completion":
        rows = [r for r in rows if r["num_supervised_tokens"] > 0]
    else:
        rows = [r for r in rows if len(r["input_ids"]) > 1]
    if len(rows) < 2:
        raise PipelineError(f"split '{args.split}' has {len(rows)} usable row(s) for "
                            f"--positions {args.positions}; an SAE needs more")
    return rows


def trainer_config(args, steps: int, device):
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return SAETrainerConfig(
        total_training_samples=steps * args.batch_tokens,
        train_batch_size_samples=args.batch_tokens, lr=args.lr, lr_end=args.lr,
        lr_scheduler_name="constant", lr_decay_steps=int(args.lr_decay_fraction * steps),
        device=str(device),
        # the dead-feature window drives TopK's auxiliary loss; a short run needs a short one
        dead_feature_window=max(1, min(1000, steps // 5)),
        feature_sampling_window=max(1, min(2000, steps // 2)),
        n_batches_for_norm_estimate=args.norm_estimate_batches,
        logger=LoggingConfig(log_to_wandb=False))


def train_steps(trainer, stream, steps: int, log_every: int) -> list[dict]:
    """SAETrainer.fit()'s loop, through the public seams, to keep a loss curve without wandb."""
    import torch

    loss_curve, window = [], []
    progress = tqdm(range(steps), desc="train SAE", unit="step")
    for step in progress:
        trainer.maybe_reset_sparsity()
        output = trainer.step(next(stream))
        trainer.n_training_steps += 1
        with torch.no_grad():
            x, x_hat = output.sae_in.double(), output.sae_out.double()
            explained = 1 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
            entry = {"step": step + 1, "loss": output.loss.item(),
                     **{name: float(value) for name, value in output.losses.items()},
                     "explained_variance": explained,
                     "l0": (output.feature_acts != 0).sum(-1).float().mean().item(),
                     "lr": trainer.optimizer.param_groups[0]["lr"]}
        if not math.isfinite(entry["loss"]):
            raise PipelineError(f"SAE loss became {entry['loss']} at step {step + 1}")
        window.append(entry)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss_curve.append({key: (value if key == "step" else
                                     sum(e[key] for e in window) / len(window))
                               for key, value in entry.items()})
            window = []
            progress.set_postfix(mse=f"{loss_curve[-1]['mse_loss']:.4g}",
                                 ev=f"{loss_curve[-1]['explained_variance']:.3f}")
    return loss_curve


def save_and_reload(sae, staged: Path, held_batches, device):
    """Save the inference SAE and check that the reloaded one encodes like the trained one."""
    import torch
    from sae_lens import SAE

    sae.eval()
    sae.save_inference_model(str(staged))
    loaded = SAE.load_from_disk(str(staged), device=str(device))
    loaded.eval()
    probe = torch.cat(held_batches)[:1024]
    with torch.no_grad():
        reload_diff = (loaded.encode(probe) - sae.encode(probe)).abs().max().item()
    if reload_diff > 1e-4:
        raise PipelineError(f"the saved SAE encodes differently from the trained one after "
                            f"reloading (max |diff| {reload_diff:.3g})")
    return loaded, reload_diff


def training_summary(args, output_dir, manifest, loaded, metadata, d_in, model_name, rows,
                     train_idx, held_idx, steps, counter, scaling_factor, train_seconds,
                     loss_curve, heldout, reload_diff, device, dtype) -> dict:
    """training_summary.json: what was trained on what, how it went, and where it came from."""
    import torch

    return {
        "sae_path": str(output_dir.resolve()),
        "architecture": args.architecture,
        "inference_architecture": loaded.cfg.architecture(),
        "hook_name": metadata.hook_name,
        "hf_hook_name": metadata.hf_hook_name,
        "layer": args.layer,
        "d_in": d_in,
        "d_sae": args.d_sae,
        "k": args.k if args.architecture == "topk" else None,
        "l1_coefficient": args.l1_coefficient if args.architecture == "standard" else None,
        "model_name": model_name,
        "adapter_path": metadata.adapter_path,
        "manifest": manifest["_path"],
        "split": args.split,
        "positions": args.positions,
        "num_rows": len(rows),
        "num_train_rows": len(train_idx),
        "num_heldout_rows": len(held_idx),
        "heldout_row_ids": [rows[i]["row_id"] for i in held_idx],
        "steps": steps,
        "batch_tokens": args.batch_tokens,
        "training_tokens": steps * args.batch_tokens,
        "passes_over_split": counter["passes"],
        "tokens_forwarded": counter["tokens_forwarded"],
        "activation_normalization": {
            "method": args.normalize_activations,
            "scaling_factor": scaling_factor,
            "note": ("training inputs were x * scaling_factor; the factor is folded into the "
                     "saved weights, which therefore take raw activations") if scaling_factor
                    else "none",
        },
        "lr": args.lr,
        "lr_decay_steps": int(args.lr_decay_fraction * steps),
        "train_wall_clock_s": train_seconds,
        "train_tokens_per_s": steps * args.batch_tokens / train_seconds,
        "final_train": loss_curve[-1],
        "heldout": heldout,
        "training_window_dead_features": metadata.num_dead_features,
        "reload_max_abs_diff": reload_diff,
        "loss_curve": loss_curve,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_dtype": str(dtype).replace("torch.", ""),
        "config": vars(args),
        "provenance": provenance(seed=args.seed, manifest=args.manifest),
    }


def main(argv=None):
    args = parse_args(argv)
    # heavy imports after parsing, so --help and usage errors answer at once (sae-lens alone
    # takes ~20 s to import on a small machine)
    import torch
    from sae_lens import SAETrainer

    manifest = load_manifest(args.manifest)
    output_dir = check_output_dir(args.output_dir, args.overwrite, "train_sae.py",
                                  inputs=[args.manifest, args.adapter_path])
    if args.adapter_path:
        check_adapter_dir(args.adapter_path)
    model_name = resolve_base_model(args.base_model, args.adapter_path)
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    tokenizer = load_tokenizer(args.adapter_path or model_name)
    rows = load_rows(args, manifest, tokenizer)
    train_idx, held_idx = holdout_split(rows, args.holdout_fraction, args.seed)

    model = load_model_with_adapter(model_name, args.adapter_path, dtype, device)
    model.eval()
    check_layer(model, args.layer, model.config.hidden_size, "the SAE")
    layer_module = decoder_layers(model)[args.layer]
    module_path = next(name for name, m in model.named_modules() if m is layer_module)
    d_in = model.config.hidden_size
    pad_id = tokenizer.pad_token_id

    steps = args.steps or max(1, args.tokens // args.batch_tokens)
    sae = build_sae(args, d_in, device)
    counter = {"tokens_forwarded": 0, "passes": 0}
    stream = activation_stream(model, layer_module, rows, train_idx, args, pad_id, device,
                               counter)
    trainer = SAETrainer(cfg=trainer_config(args, steps, device), sae=sae, data_provider=stream)

    started = time.perf_counter()
    scaling_factor = None
    if args.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(d_in, stream, args.norm_estimate_batches)
        scaling_factor = trainer.activation_scaler.scaling_factor
    loss_curve = train_steps(trainer, stream, steps, args.log_every)
    if scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(scaling_factor)
    trainer.set_final_sae_metadata()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - started

    metadata = sae.cfg.metadata
    metadata.hook_name = resid_post_hook_name(args.layer)
    metadata.hf_hook_name = f"{module_path}.output"
    metadata.model_name = model_name
    metadata.adapter_path = str(Path(args.adapter_path).resolve()) if args.adapter_path else None
    metadata.context_size = args.max_length
    metadata.dataset_path = f"{manifest['_path']}:{args.split}"
    metadata.positions = args.positions
    with staged_output(output_dir, "train_sae.py") as staged:
        held_batches = list(row_activations(model, layer_module, rows, held_idx, args, pad_id,
                                            device))
        loaded, reload_diff = save_and_reload(sae, staged, held_batches, device)
        heldout = evaluate_heldout(loaded, held_batches, args.d_sae)
        summary = training_summary(args, output_dir, manifest, loaded, metadata, d_in, model_name,
                                   rows, train_idx, held_idx, steps, counter, scaling_factor,
                                   train_seconds, loss_curve, heldout, reload_diff, device, dtype)
        write_json_atomic(staged / "training_summary.json", summary)
    print(f"saved SAE to {output_dir}: held-out explained variance "
          f"{heldout['explained_variance']:.3f}, L0 {heldout['mean_l0']:.1f}, "
          f"{heldout['dead_features']} dead of {args.d_sae}")


if __name__ == "__main__":
    run_main(main)
