"""Per-example SAE features of a manifest split: the inputs of the SAE-only attribution predictor.

  sae_analysis.py --manifest runs/smoltalk_v1/manifest.json --split score_pool \
      --output-dir runs/smoltalk_v1/sae_features
  sae_analysis.py ... --sae-path runs/smoltalk_v1/local_sae      (offline: an SAE on disk)

Every row is tokenized by pipeline.tokenize_example (the ids finetune.py trains on and attribution
scores), run through the model up to decoder layer L, and the residual stream after block L (what
TransformerLens calls blocks.L.hook_resid_post; a forward hook on the transformers decoder layer's
output here, the forward pass stops right after it) is encoded by a sae-lens SAE. Per row the SAE
feature activations are averaged over the pooled tokens:

  --positions completion (default)  the supervised tokens: the completion and its end-of-turn
                                    marker, exactly the positions attribution's loss scores
  --positions all                   every token but the first (the template's first token,
                                    <bos> for Gemma, is an attention sink with an outsized norm)

The seed project pooled every prompt and completion token (all); completion is the default here.
recipes/verdict.toml computes both (sae_features_all/, sae_features_completion/) and compares the
predictors fitted on them.

Pooling happens on the device batch by batch; only [batch x d_sae] means reach the CPU. Output:
<output-dir>/<sae name>.npz with row_id, feature_activation_mean [n, d_sae] float32, one array per
sample statistic (names in stat_names), the SAE's per-feature firing frequency and the pooling
(positions); and
<output-dir>/summary.json (hook, SAE, layer, token counts, dead features, throughput, provenance).

Several GPUs: `torchrun --nproc-per-node N sae_analysis.py ...` splits the rows across N processes
(balanced by length); process 0 gathers the pooled rows and writes the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import (DEFAULT_BASE_MODEL, IGNORE_INDEX, PipelineError, add_alias,
                      check_adapter_dir, check_output_dir, close_distributed, gather_to_first,
                      init_distributed, length_sorted_batches, load_manifest,
                      load_model_with_adapter, load_split, load_tokenizer, pad_batch, pick_dtype,
                      provenance, resolve_base_model, run_main, shard_indices, stamp_output,
                      temp_prefix, tokenize_split, write_json_atomic)

SCRIPT = "sae_analysis.py"

DEFAULT_SAE_RELEASE = "gemma-scope-2-1b-it-res"
DEFAULT_SAE_ID = "layer_17_width_16k_l0_small"
RESID_POST_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
# Per-example statistics saved next to the means; the predictor uses every name listed here.
STAT_NAMES = ("n_tokens", "n_tokens_pooled", "mean_l0", "max_activation", "mean_feature_norm",
              "mean_resid_norm", "frac_features_active", "recon_rel_error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main manifest (default: %(default)s)")
    p.add_argument("--split", default="score_pool", help="split to encode (default: score_pool)")
    p.add_argument("--output-dir", default="runs/smoltalk_v1/sae_features",
                   help="folder for <sae name>.npz and summary.json (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing NPZ")
    p.add_argument("--max-examples", type=int, default=None,
                   help="encode only the split's first N rows (smoke runs; default: all)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per row, truncated on the right as in finetune.py (default: 2048)")
    add_alias(p, "--max-tokens", "max_length")
    p.add_argument("--sae-release", default=DEFAULT_SAE_RELEASE,
                   help="sae-lens pretrained release (default: %(default)s)")
    p.add_argument("--sae-id", default=None,
                   help=f"SAE id within the release (default: {DEFAULT_SAE_ID}); with --sae-path "
                        "only names the NPZ (default then: the folder's name)")
    p.add_argument("--sae-path", default=None,
                   help="local SAE folder in sae-lens's on-disk format (cfg.json + "
                        "sae_weights.safetensors, e.g. from train_sae.py): the offline route; "
                        "the release is then not fetched")
    p.add_argument("--export-sae", default=None,
                   help="also save the loaded SAE in sae-lens's on-disk format to this folder, "
                        "to carry to a machine without network and pass as --sae-path there")
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer L whose output (blocks.L.hook_resid_post) the SAE reads "
                        "(default: from the SAE's recorded hook name; required if it has none)")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local checkpoint (default: the adapter's base model, else "
                        f"{DEFAULT_BASE_MODEL})")
    add_alias(p, "--model-name", "base_model")
    p.add_argument("--adapter-path", default=None, help="LoRA adapter to apply to the model")
    p.add_argument("--positions", choices=["completion", "all"], default="completion",
                   help="tokens averaged per row: completion = the supervised tokens attribution's "
                        "loss sees; all = every token but the first (default: completion)")
    add_alias(p, "--pool", "positions")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: 8)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="also cap a batch at this many padded tokens (default: no cap)")
    p.add_argument("--sae-chunk-tokens", type=int, default=8192,
                   help="tokens encoded by the SAE at once; bounds the [tokens x d_sae] "
                        "activations held on the device (default: 8192)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model dtype: auto = bf16 on GPU, fp32 on CPU; the SAE always runs in "
                        "fp32 (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_length", "sae_chunk_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_examples is not None and args.max_examples < 1:
        p.error("--max-examples must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# the residual stream after block L (shared with train_sae.py)


class _StopForward(Exception):
    """Raised by the capture hook once block L's output is stored: nothing after L is needed."""


def decoder_layers(model):
    """The transformers decoder-layer ModuleList, for a plain model or a PeftModel around one."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    n_layers = getattr(base.config, "num_hidden_layers", None)
    for _, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise PipelineError(f"cannot find the decoder layers of {type(base).__name__}")


def resid_post_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def residual_after_layer(model, layer_module, input_ids, attention_mask):
    """[batch, seq, d_model] output of one decoder layer (the residual stream after that block).

    The hook raises once it has the output, so the layers above L and the LM head never run."""
    captured = {}

    def hook(module, inputs, output):
        captured["resid"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = layer_module.register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "resid" not in captured:
        raise PipelineError("the decoder layer hook never fired")
    return captured["resid"]


def pooled_mask(labels, attention_mask, pool: str):
    """Which positions a row's mean runs over (see --positions)."""
    if pool == "completion":
        return labels != IGNORE_INDEX
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    return mask


def check_layer(model, layer: int, d_in: int, what: str) -> None:
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer < n_layers:
        raise PipelineError(f"layer {layer} is out of range: the model has {n_layers} decoder "
                            "layers (0-based)")
    if model.config.hidden_size != d_in:
        raise PipelineError(f"{what} reads {d_in}-dim activations, the model's residual stream "
                            f"is {model.config.hidden_size}-dim: wrong SAE for this model")


# ---------------------------------------------------------------------------------------------
# SAE loading


def load_sae(args, device):
    """The SAE (fp32, on device) and a short description of where it came from."""
    from sae_lens import SAE

    if args.sae_path:
        path = Path(args.sae_path)
        if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
            raise PipelineError(f"--sae-path {path} is not a sae-lens SAE folder (needs cfg.json "
                                "and sae_weights.safetensors)")
        try:
            sae = SAE.load_from_disk(str(path), device=str(device), dtype="float32")
        except Exception as err:  # sae-lens raises ValueError/KeyError/TypeError for bad configs
            raise PipelineError(f"cannot load the SAE at {path}: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}")
        return sae, {"sae_path": str(path.resolve()), "sae_release": None,
                     "sae_id": args.sae_id or path.name}
    sae_id = args.sae_id or DEFAULT_SAE_ID
    try:
        sae = SAE.from_pretrained(args.sae_release, sae_id, device=str(device), dtype="float32")
    except Exception as err:  # hub errors come in many types; offline is the common one
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipelineError(f"cannot load SAE {args.sae_release}/{sae_id}: {first} (offline? pass "
                            "--sae-path with a local SAE, e.g. one made by train_sae.py)")
    return sae, {"sae_path": None, "sae_release": args.sae_release, "sae_id": sae_id}


def resolve_layer(sae, requested: int | None, sae_name: str) -> int:
    """The SAE's own hook name decides the layer; --layer must agree with it or stand in for it."""
    hook_name = sae.cfg.metadata.hook_name
    recorded = None
    if hook_name:
        match = RESID_POST_HOOK.match(hook_name)
        if match is None:
            raise PipelineError(f"SAE {sae_name} reads hook {hook_name}; this script captures "
                                "only the residual stream after a block (blocks.L.hook_resid_post)")
        recorded = int(match.group(1))
    if requested is None and recorded is None:
        raise PipelineError(f"SAE {sae_name} records no hook name: pass --layer")
    if requested is not None and recorded is not None and requested != recorded:
        raise PipelineError(f"--layer {requested} disagrees with SAE {sae_name}, which was "
                            f"trained on {hook_name}")
    return recorded if requested is None else requested


# ---------------------------------------------------------------------------------------------
# per-batch pooling on the device


def pool_batch(sae, resid, mask, chunk_tokens: int, fire_count):
    """Masked per-row statistics of the SAE encoding of resid[mask]; only [rows x d_sae] and
    [rows] tensors leave. fire_count ([d_sae], on the device) accumulates, per feature, the pooled
    tokens it is active on."""
    import torch

    n_rows, d_sae = resid.shape[0], sae.cfg.d_sae
    device = resid.device
    row_of, pos_of = mask.nonzero(as_tuple=True)
    sums = torch.zeros(n_rows, d_sae, device=device)
    ever_active = torch.zeros(n_rows, d_sae, device=device)
    per_row = {name: torch.zeros(n_rows, device=device)
               for name in ("l0", "feature_norm", "resid_norm", "recon_err", "resid_energy")}
    max_act = torch.full((n_rows,), float("-inf"), device=device)
    for start in range(0, row_of.numel(), chunk_tokens):
        rows = row_of[start:start + chunk_tokens]
        x = resid[rows, pos_of[start:start + chunk_tokens]].float()
        acts = sae.encode(x)
        recon = sae.decode(acts)
        active = acts != 0
        sums.index_add_(0, rows, acts)
        ever_active.index_add_(0, rows, active.float())
        fire_count += active.sum(0)
        per_row["l0"].index_add_(0, rows, active.sum(-1).float())
        per_row["feature_norm"].index_add_(0, rows, acts.norm(dim=-1))
        per_row["resid_norm"].index_add_(0, rows, x.norm(dim=-1))
        per_row["recon_err"].index_add_(0, rows, (x - recon).pow(2).sum(-1))
        per_row["resid_energy"].index_add_(0, rows, x.pow(2).sum(-1))
        max_act.scatter_reduce_(0, rows, acts.max(dim=-1).values, reduce="amax")
    counts = mask.sum(dim=1).float()
    denominator = counts.clamp(min=1)
    stats = {
        "n_tokens_pooled": counts,
        "mean_l0": per_row["l0"] / denominator,
        "max_activation": torch.where(counts > 0, max_act, torch.zeros_like(max_act)),
        "mean_feature_norm": per_row["feature_norm"] / denominator,
        "mean_resid_norm": per_row["resid_norm"] / denominator,
        "frac_features_active": (ever_active > 0).float().mean(dim=1),
        "recon_rel_error": per_row["recon_err"] / per_row["resid_energy"].clamp(min=1e-12),
    }
    return (sums / denominator[:, None]).cpu(), {k: v.cpu() for k, v in stats.items()}


def save_npz_atomic(path: Path, arrays: dict) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    encode_split(args)
    close_distributed()


def encode_split(args):
    """The split's rows -> per-row SAE feature means and statistics -> the NPZ and summary.json
    (written by process 0)."""
    manifest = load_manifest(args.manifest)
    if args.adapter_path:
        check_adapter_dir(args.adapter_path)
    if args.sae_path and not Path(args.sae_path).is_dir():
        raise PipelineError(f"--sae-path {args.sae_path} does not exist")
    model_name = resolve_base_model(args.base_model, args.adapter_path)
    sae_name = args.sae_id or (Path(args.sae_path).name if args.sae_path else DEFAULT_SAE_ID)
    # one folder gathers the NPZs of several SAEs: it must be this script's, and an NPZ already
    # there is replaced only with --overwrite
    output_dir = check_output_dir(args.output_dir, args.overwrite, SCRIPT, add_to=True,
                                  inputs=[args.manifest, args.adapter_path, args.sae_path])
    npz_path = output_dir / (sae_name.strip("/").replace("/", "__") + ".npz")
    if npz_path.exists() and not args.overwrite:
        raise PipelineError(f"{npz_path} already exists (pass --overwrite to replace it)")

    rank, world, device = init_distributed(args.device)
    tokenizer = load_tokenizer(args.adapter_path or model_name)
    rows = tokenized_rows(args, manifest, tokenizer)
    sae, sae_source = load_sae(args, device)
    sae.eval()
    layer = resolve_layer(sae, args.layer, sae_name)
    if args.export_sae and rank == 0:
        sae.save_model(args.export_sae)
        print(f"saved the SAE in sae-lens format to {args.export_sae}")
    model = load_model_with_adapter(model_name, args.adapter_path,
                                    pick_dtype(args.precision, device), device)
    model.eval()
    check_layer(model, layer, sae.cfg.d_in, f"SAE {sae_name}")
    layer_module = decoder_layers(model)[layer]

    started = time.perf_counter()
    encoded = encode_rows(args, rows, model, layer_module, sae, tokenizer, device, rank, world)
    if encoded is None:  # not process 0: its rows went to process 0
        return
    seconds = time.perf_counter() - started
    write_features(args, manifest, rows, encoded, npz_path, seconds,
                   {"model_name": model_name, "sae": sae, "sae_source": sae_source,
                    "layer": layer, "layer_module": layer_module, "device": device,
                    "dtype": next(model.parameters()).dtype, "world": world})


def tokenized_rows(args, manifest, tokenizer) -> list[dict]:
    split = load_split(manifest, args.split)
    if args.max_examples is not None:
        split = split.select(range(min(args.max_examples, len(split))))
    rows = tokenize_split(split, tokenizer, args.max_length, desc=f"tokenize {args.split}")
    rows = rows.select_columns(["row_id", "input_ids", "labels", "num_tokens",
                                "num_supervised_tokens", "truncated"]).to_list()
    if len({r["row_id"] for r in rows}) != len(rows):
        raise PipelineError(f"split '{args.split}' of {args.manifest} has duplicate row_ids")
    return rows


def encode_rows(args, rows, model, layer_module, sae, tokenizer, device, rank: int, world: int):
    """(means [n, d_sae], stats {name: [n]}, fire_count [d_sae], tokens forwarded) over every
    row, this process's share of the rows encoded here; None on processes other than 0."""
    import numpy as np
    import torch

    n, d_sae = len(rows), sae.cfg.d_sae
    means = np.zeros((n, d_sae), dtype=np.float32)
    stats = {name: np.zeros(n, dtype=np.float32) for name in STAT_NAMES}
    stats["n_tokens"][:] = [r["num_tokens"] for r in rows]
    fire_count = torch.zeros(d_sae, dtype=torch.float64, device=device)
    lengths = [len(r["input_ids"]) for r in rows]
    mine = shard_indices(lengths, rank, world)
    batches = [[mine[i] for i in batch] for batch in
               length_sorted_batches([lengths[i] for i in mine], args.batch_size,
                                     args.max_batch_tokens)]
    tokens_forwarded = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"encode {args.split}", unit="batch", disable=rank != 0):
            input_ids, labels, attention_mask = pad_batch([rows[i] for i in batch],
                                                          tokenizer.pad_token_id, device)
            resid = residual_after_layer(model, layer_module, input_ids, attention_mask)
            mask = pooled_mask(labels, attention_mask, args.positions)
            batch_means, batch_stats = pool_batch(sae, resid, mask, args.sae_chunk_tokens,
                                                  fire_count)
            means[batch] = batch_means.numpy()
            for name, values in batch_stats.items():
                stats[name][batch] = values.numpy()
            tokens_forwarded += int(attention_mask.sum().item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world == 1:
        return means, stats, fire_count.cpu().numpy(), tokens_forwarded
    # process 0 collects every process's rows into the full arrays
    parts = gather_to_first((mine, means[mine], {k: v[mine] for k, v in stats.items()},
                             fire_count.cpu(), tokens_forwarded), rank, world)
    if rank != 0:
        return None
    fire_count = torch.zeros_like(fire_count.cpu())
    tokens_forwarded = 0
    for indices, part_means, part_stats, part_fire_count, part_tokens in parts:
        means[indices] = part_means
        for name, values in part_stats.items():
            stats[name][indices] = values
        fire_count += part_fire_count
        tokens_forwarded += part_tokens
    return means, stats, fire_count.numpy(), tokens_forwarded


def write_features(args, manifest, rows, encoded, npz_path: Path, seconds: float, run: dict):
    import numpy as np
    import torch

    means, stats, fire_count, tokens_forwarded = encoded
    sae, layer, device = run["sae"], run["layer"], run["device"]
    total_pooled = int(stats["n_tokens_pooled"].sum())
    if total_pooled == 0:
        raise PipelineError(f"no {args.positions} tokens in split '{args.split}' at --max-length "
                            f"{args.max_length}: nothing to pool")
    arrays = {
        "row_id": np.array([r["row_id"] for r in rows], dtype=str),
        "feature_activation_mean": means,
        **stats,
        "truncated": np.array([r["truncated"] for r in rows], dtype=bool),
        "feature_frequency": (fire_count / total_pooled).astype(np.float32),
        "stat_names": np.array(STAT_NAMES, dtype=str),
        # which tokens were pooled: the predictor records it, so two poolings of one split stay
        # apart after the NPZ has left its folder
        "positions": np.array(args.positions),
        # the NPZ can travel without its summary.json; this says where it came from
        "provenance_json": np.array(json.dumps(provenance(manifest=args.manifest))),
    }
    save_npz_atomic(npz_path, arrays)
    stamp_output(npz_path.parent, SCRIPT)
    summary = {
        "npz": npz_path.name,
        "manifest": manifest["_path"],
        "split": args.split,
        "model_name": run["model_name"],
        "adapter_path": str(Path(args.adapter_path).resolve()) if args.adapter_path else None,
        **run["sae_source"],
        "sae_architecture": sae.cfg.architecture(),
        "sae_model_name": sae.cfg.metadata.model_name,
        "hook_name": resid_post_hook_name(layer),
        "hf_module": f"decoder layer {layer} output ({type(run['layer_module']).__name__})",
        "layer": layer,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "pooling": args.positions,
        "pooling_note": ("completion: positions whose label is supervised (the completion and "
                         "its end-of-turn marker); all: every non-pad position but the first"),
        "max_tokens": args.max_length,
        "n_examples": len(rows),
        "n_examples_truncated": int(arrays["truncated"].sum()),
        "n_examples_without_pooled_tokens": int((stats["n_tokens_pooled"] == 0).sum()),
        "total_tokens": total_pooled,
        "total_tokens_forwarded": tokens_forwarded,
        "mean_l0": float((stats["mean_l0"] * stats["n_tokens_pooled"]).sum() / total_pooled),
        "dead_features": int((fire_count == 0).sum()),
        "stat_names": list(STAT_NAMES),
        "wall_clock_s": seconds,
        "tokens_per_s": tokens_forwarded / seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_dtype": str(run["dtype"]).replace("torch.", ""),
        "batch_size": args.batch_size,
        "processes": run["world"],
        "provenance": provenance(manifest=args.manifest),
    }
    write_json_atomic(npz_path.parent / "summary.json", summary)
    print(f"wrote {npz_path} ({len(rows)} rows x {sae.cfg.d_sae} features, {total_pooled} pooled "
          f"tokens, {summary['dead_features']} dead features, "
          f"{tokens_forwarded / seconds:.0f} tokens/s)")


if __name__ == "__main__":
    run_main(main)
