"""Eval loss of the base model and of a LoRA adapter on a manifest split.

  eval_loss.py --manifest runs/smoltalk_v1/manifest.json --adapter-path runs/smoltalk_v1/base_adapter \
      --output-json runs/smoltalk_v1/eval_base.json

Loss = (sum of token NLL over every supervised completion token of the split) / (their count): a
token-weighted mean, not a mean of batch means. The base model is evaluated with the adapter
switched off in the same loaded model, so both numbers come from one load and one tokenization.
Per-example NLL sums and token counts go to <output-json stem>.per_example.jsonl (row_id-keyed,
for paired statistics). Without --adapter-path only the base model is evaluated.

Several GPUs: `torchrun --nproc-per-node N eval_loss.py ...` splits the rows across N processes
(balanced by length); process 0 gathers the per-row sums and writes the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import (DEFAULT_BASE_MODEL, PipelineError, check_adapter_dir, check_output_file,
                      close_distributed, gather_to_first, init_distributed, length_sorted_batches,
                      load_manifest, load_model_with_adapter, load_split, load_tokenizer,
                      pad_batch, pick_dtype,
                      provenance, resolve_base_model, run_main, shard_indices, token_nll_sums,
                      tokenize_split, write_json_atomic, write_jsonl_atomic)

SCRIPT = "eval_loss.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main or continuation manifest (default: %(default)s)")
    p.add_argument("--eval-split", default="eval", help="split to evaluate (default: eval)")
    p.add_argument("--base-model", default=None,
                   help="hub id or local checkpoint (default: the adapter's recorded base model, "
                        f"else {DEFAULT_BASE_MODEL})")
    p.add_argument("--adapter-path", default=None, help="LoRA adapter folder to compare with base")
    p.add_argument("--skip-base", action="store_true",
                   help="evaluate only the adapter (no base numbers or deltas)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per row, truncated as in finetune.py (default: 2048)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per batch (default: 4)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="at most this many padded tokens per batch as well (rows sorted by "
                        "length, so short rows share a batch and long ones go a few at a time); "
                        "bounds the fp32 logits at (tokens x vocabulary), which with a large "
                        "vocabulary (Qwen's 151,936) and --batch-size alone grow with the longest "
                        "row (default: rows only)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    p.add_argument("--output-json", default="runs/smoltalk_v1/eval_loss.json",
                   help="result JSON (default: %(default)s)")
    args = p.parse_args(argv)
    if args.skip_base and not args.adapter_path:
        p.error("--skip-base needs --adapter-path")
    if args.batch_size < 1 or args.max_length < 2:
        p.error("--batch-size must be >= 1 and --max-length >= 2")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        p.error("--max-batch-tokens must be >= 1")
    return args


def per_row_nll(model, rows, pad_token_id, device, batch_size, autocast, desc, rank=0, world=1,
                max_batch_tokens=None):
    """(nll_sum, supervised_count) for every row, in row order, on rank 0 (None elsewhere);
    each process computes its share of the rows."""
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    mine = shard_indices(lengths, rank, world)
    found = {}
    batches = length_sorted_batches([lengths[i] for i in mine], batch_size, max_batch_tokens)
    with torch.no_grad(), autocast():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=rank != 0):
            indices = [mine[i] for i in batch]
            input_ids, labels, mask = pad_batch([rows[i] for i in indices], pad_token_id, device)
            nll, count = token_nll_sums(model, input_ids, labels, mask)
            found.update(zip(indices, zip(nll.tolist(), count.tolist())))
    gathered = gather_to_first(found, rank, world)
    if rank != 0:
        return None, None
    merged = {i: value for part in gathered for i, value in part.items()}
    return [merged[i][0] for i in range(len(rows))], [merged[i][1] for i in range(len(rows))]


def summarize(sums, counts, seconds, n_tokens):
    total = sum(counts)
    loss = sum(sums) / total
    return {"loss": loss, "perplexity": math.exp(loss), "nll_sum": sum(sums),
            "wall_clock_s": seconds, "tokens_per_s": n_tokens / seconds}


def main(argv=None):
    import torch

    args = parse_args(argv)
    inputs = [args.manifest, args.adapter_path]
    output = check_output_file(args.output_json, SCRIPT, inputs=inputs)
    # the per-example rows travel with the summary just checked (they carry no provenance)
    check_output_file(output.with_name(output.stem + ".per_example.jsonl"), SCRIPT,
                      inputs=inputs, overwrite=True)
    manifest = load_manifest(args.manifest)
    if args.adapter_path:
        check_adapter_dir(args.adapter_path)
    base_model = resolve_base_model(args.base_model, args.adapter_path)
    split = load_split(manifest, args.eval_split)
    rank, world, device = init_distributed(args.device)
    dtype = pick_dtype(args.precision, device)
    tokenizer = load_tokenizer(args.adapter_path or base_model)
    rows = tokenize_split(split, tokenizer, args.max_length, desc=f"tokenize {args.eval_split}")
    rows = rows.select_columns(["row_id", "category", "input_ids", "labels", "num_tokens",
                                "num_supervised_tokens"]).to_list()
    supervised = sum(r["num_supervised_tokens"] for r in rows)
    if supervised == 0:
        raise PipelineError(f"check 6 failed: split '{args.eval_split}' of {args.manifest} has no "
                            f"supervised tokens at --max-length {args.max_length}")
    n_tokens = sum(r["num_tokens"] for r in rows)

    model = load_model_with_adapter(base_model, args.adapter_path, dtype, device)
    model.eval()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    results, per_example = {}, {r["row_id"]: {"row_id": r["row_id"], "category": r["category"],
                                              "supervised_tokens": r["num_supervised_tokens"]}
                                for r in rows}
    runs = []
    if not args.skip_base:
        runs.append(("base", model.disable_adapter() if args.adapter_path
                     else contextlib.nullcontext()))
    if args.adapter_path:
        runs.append(("finetuned", contextlib.nullcontext()))
    for name, context in runs:
        started = time.perf_counter()
        with context:
            sums, counts = per_row_nll(model, rows, tokenizer.pad_token_id, device,
                                       args.batch_size, autocast, f"eval {name}", rank, world,
                                       args.max_batch_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if rank != 0:
            continue
        results[name] = summarize(sums, counts, time.perf_counter() - started, n_tokens)
        for row, s, c in zip(rows, sums, counts):
            per_example[row["row_id"]][f"{name}_nll_sum"] = s
            per_example[row["row_id"]][f"{name}_loss"] = s / c if c else None
        print(f"{name}: loss {results[name]['loss']:.4f} ppl {results[name]['perplexity']:.3f}")
    if rank == 0:
        write_report(args, manifest, base_model, rows, supervised, n_tokens, dtype, device,
                     world, results, per_example)
    close_distributed()


def write_report(args, manifest, base_model, rows, supervised, n_tokens, dtype, device, world,
                 results, per_example):
    import torch

    output = Path(args.output_json)
    per_example_path = output.with_name(output.stem + ".per_example.jsonl")
    report = {
        "manifest": manifest["_path"],
        "eval_split": args.eval_split,
        "base_model": base_model,
        "adapter_path": str(Path(args.adapter_path).resolve()) if args.adapter_path else None,
        "num_eval_rows": len(rows),
        "supervised_token_count": supervised,
        "token_count": n_tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "max_batch_tokens": args.max_batch_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": world,
        **results,
        "per_example_path": per_example_path.name,
        "provenance": provenance(manifest=args.manifest),
    }
    if "base" in results and "finetuned" in results:
        report["delta_loss"] = results["finetuned"]["loss"] - results["base"]["loss"]
        report["delta_ppl"] = results["finetuned"]["perplexity"] - results["base"]["perplexity"]
        print(f"delta_loss {report['delta_loss']:+.4f} delta_ppl {report['delta_ppl']:+.3f}")
    write_jsonl_atomic(per_example_path, per_example.values())
    write_json_atomic(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
