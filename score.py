"""Attribution: rank every training row by how well its LoRA gradient agrees with the query set's,
through bergson 2.5.1's Python API, then write the top-k and a size-matched random subset as a
continuation manifest that finetune.py and eval_loss.py take like the main manifest.

    uv run score.py --manifest runs/smoltalk_v1/manifest.json \
        --adapter-path runs/smoltalk_v1/base_adapter --output-dir runs/smoltalk_v1/attribution \
        --score-mode mean --preconditioning-mode query --projection-dim 32 --subset-k 500

Scores (g_i = gradient of train row i's loss w.r.t. the LoRA weights, projected per module to
p x p when --projection-dim p > 0; q_j the same for query row j; sums run over LoRA modules m):
  mean      s_i = sum_m < g_im , mean_j q_jm >
  nearest   s_i = max_j sum_m < g_im , q_jm >
With --preconditioning-mode query the query side is first multiplied, per module, by
(H_m + d * mean(eig(H_m)) * I)^-1 where H_m = (1/N_query) sum_j q_jm q_jm^T is the query gradients'
second moment (bergson's "autocorrelation" Hessian, fitted with the dataset's own labels) and d is
--damping. This is the one-sided damped inverse of bergson <= 0.6; bergson 2.5.1's two-sided
H^-1/2 form with unit normalisation is not used (it turns scores into cosines).

A row's loss is the sum (--loss-reduction sum, bergson's default) or mean of token NLL over its
supervised (completion) tokens. Higher score = the row's gradient step lowers the query loss more.
The sum favours long rows (on the AlpacaEval data the top-500 held 2.5x the supervised tokens of a
random 500), so --random-match tokens draws the random subset to the top-k's supervised token
count instead of its row count; run both to tell the ranking from the length.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from pipeline import (PipelineError, base_model_of_adapter, check_adapter_dir,
                      load_manifest, load_split, load_tokenizer, provenance, prompt_messages,
                      publish_dir, read_json, read_jsonl, staging_dir, tokenize_split,
                      write_json_atomic, write_jsonl_atomic, write_selection_manifest)
from subsets import RANDOM_MATCHES, choose_subsets, rank_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/smoltalk_v1/manifest.json",
                   help="main (or continuation) manifest holding the train and query splits")
    p.add_argument("--adapter-path", default="runs/smoltalk_v1/base_adapter",
                   help="LoRA adapter whose gradients are attributed (finetune.py output)")
    p.add_argument("--output-dir", default="runs/smoltalk_v1/attribution",
                   help="train_scores.jsonl, summary.json, continuation_manifest.json go here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output-dir (otherwise refuse: bergson would nest "
                        "new results inside old ones)")
    p.add_argument("--train-split", default="train_base", help="split whose rows are ranked")
    p.add_argument("--query-split", default="attr_query", help="split the scores point towards")
    p.add_argument("--score-mode", choices=["mean", "nearest"], default="mean",
                   help="mean: dot product with the mean query gradient; nearest: best dot "
                        "product over the individual query gradients")
    p.add_argument("--preconditioning-mode", choices=["none", "query"], default="none",
                   help="query: multiply the query gradients by the damped inverse of their own "
                        "second-moment matrix, per LoRA module (formula above)")
    p.add_argument("--damping", type=float, default=0.1,
                   help="d in (H + d*mean(eig H)*I)^-1 for --preconditioning-mode query")
    p.add_argument("--projection-dim", type=int, default=32,
                   help="random projection of each LoRA module's gradient to p x p; 0 = none "
                        "(exact, but memory grows with the adapter size)")
    p.add_argument("--tokenization-mode", choices=["finetune_raw", "chat_template"],
                   default="finetune_raw",
                   help="finetune_raw: bergson gets the exact input_ids/labels finetune.py trains "
                        "on; chat_template: bergson renders and tokenizes the chat itself "
                        "(misaligned with training; only for comparison)")
    p.add_argument("--loss-reduction", choices=["sum", "mean"], default="sum",
                   help="a row's loss: sum or mean of NLL over its completion tokens")
    p.add_argument("--subset-k", type=int, default=500,
                   help="rows in top_k and in matched_random_k")
    p.add_argument("--seed", type=int, default=42, help="seed of the matched random subset")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let the random subset include top-k rows (default: it may not)")
    p.add_argument("--random-match", choices=RANDOM_MATCHES, default="rows",
                   help="what matched_random_k matches: rows = k uniform rows (the seed's "
                        "design); tokens = the top-k's supervised token count (the shortest run "
                        "of rows, in a seeded random order, whose supervised tokens reach it); "
                        "stratified = k rows with the top-k's count per length quintile of "
                        "supervised tokens. tokens and stratified take the top-k's length bias "
                        "out of the comparison (subsets.py)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="truncate rows on the right to this many tokens, as finetune.py does")
    p.add_argument("--token-batch-size", type=int, default=None,
                   help="tokens per bergson batch (default: 8192 on GPU, 2048 on CPU, capped "
                        "at the model's context); must be >= --max-length")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model precision in bergson (auto: bf16 on GPU, fp32 on CPU); scores "
                        "are always accumulated in fp32")
    p.add_argument("--fused-attention", action="store_true",
                   help="let torch pick fused SDPA kernels (faster); by default the math kernel "
                        "is forced so a row's gradient does not depend on its batch's padding")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) bergson uses")
    p.add_argument("--keep-gradients", action="store_true",
                   help="keep bergson's query gradient index and Hessian under bergson/")
    p.add_argument("--scores-from", default=None, metavar="DIR",
                   help="reuse the train scores of an earlier score.py run on the same split "
                        "(its --output-dir) instead of running bergson: only the top-k and the "
                        "matched random subset (--subset-k, --seed) are drawn again. The scores "
                        "do not depend on --seed, so a multi-seed run scores once and redraws "
                        "the random subset per seed")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# inputs


def check_args(args) -> None:
    if args.subset_k < 1:
        raise PipelineError(f"--subset-k must be >= 1, got {args.subset_k}")
    if args.projection_dim < 0:
        raise PipelineError(f"--projection-dim must be >= 0, got {args.projection_dim}")
    if args.max_length < 2:
        raise PipelineError(f"--max-length must be >= 2, got {args.max_length}")
    if args.nproc < 1:
        raise PipelineError(f"--nproc must be >= 1, got {args.nproc}")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise PipelineError(f"output directory {path} exists and is not empty "
                                f"(pass --overwrite to replace it)")


def resolve_base_model(adapter_path: Path) -> str:
    """The adapter's base model: a local folder as an absolute path (bergson's workers may run
    elsewhere), a hub id as it is (it must be in the local cache when offline)."""
    base = base_model_of_adapter(adapter_path)
    if not base:
        raise PipelineError(f"adapter {adapter_path}/adapter_config.json names no base model")
    return str(Path(base).resolve()) if Path(base).exists() else base


def stage_adapter(adapter_path: Path, base_model: str, work: Path) -> Path:
    """A copy of the adapter whose base model is an absolute path, so bergson resolves it from
    any working directory and its worker processes."""
    import json

    copy = work / "adapter"
    shutil.copytree(adapter_path, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2))
    return copy


def model_context_length(base_model: str, tokenizer) -> int:
    from bergson.utils.worker_utils import max_tokens_for_model

    return int(max_tokens_for_model(tokenizer, base_model, None, False) or 8192)


def pretokenized_dataset(split, tokenizer, max_length: int, name: str):
    """input_ids/labels from the shared tokenization (the ids finetune.py trains on), plus a
    length column; bergson keeps these columns and never tokenizes again."""
    tokenized = tokenize_split(split, tokenizer, max_length, desc=f"tokenize {name}")
    return tokenized.select_columns(["input_ids", "labels", "num_tokens",
                                     "num_supervised_tokens", "truncated"]).rename_column(
        "num_tokens", "length")


def chat_template_dataset(split):
    """The chat as messages; bergson applies the chat template and finds the completion span."""
    def to_messages(row):
        return {"messages": prompt_messages(row["prompt"])
                + [{"role": "assistant", "content": row["completion"]}]}

    return split.map(to_messages, remove_columns=split.column_names, desc="to messages",
                     load_from_cache_file=False)


def bergson_tokenized_view(dataset, tokenizer, max_length: int):
    """What bergson's own tokenizer step makes of a chat_template dataset (its function, same
    arguments), so the run can report how far it drifts from the training ids."""
    from bergson.config.config import DataConfig
    from bergson.data import tokenize

    return dataset.map(tokenize, batched=True, load_from_cache_file=False,
                       fn_kwargs=dict(args=DataConfig(conversation_column="messages",
                                                      truncation=True),
                                      tokenizer=tokenizer, max_length=max_length))


def alignment_stats(train_ids: list, train_labels: list, other) -> dict:
    same_ids = sum(a == b for a, b in zip(train_ids, other["input_ids"]))
    same_labels = sum(a == b for a, b in zip(train_labels, other["labels"]))
    return {"rows": len(train_ids), "rows_with_identical_input_ids": same_ids,
            "rows_with_identical_labels": same_labels}


# ---------------------------------------------------------------------------------------------
# bergson


def index_config(args, run_path: Path, dataset_dir: Path, adapter: Path, precision: str,
                 token_batch_size: int, chat: bool):
    from bergson.config.config import DataConfig, DistributedConfig, IndexConfig

    data = (DataConfig(dataset=str(dataset_dir), conversation_column="messages", truncation=True)
            if chat else DataConfig(dataset=str(dataset_dir)))
    return IndexConfig(run_path=str(run_path), model=str(adapter), tokenizer=str(adapter),
                       data=data, precision=precision, projection_dim=args.projection_dim,
                       token_batch_size=token_batch_size, loss_reduction=args.loss_reduction,
                       force_math_sdp=not args.fused_attention,
                       distributed=DistributedConfig(nproc_per_node=args.nproc))


def fit_query_hessian(args, cfg_for) -> Path:
    from bergson.config.config import HessianConfig
    from bergson.hessians.hessian_approximations import approximate_hessians

    cfg = cfg_for("hessian", "query")
    approximate_hessians(cfg, HessianConfig(method="autocorrelation", use_dataset_labels=True))
    return Path(cfg.run_path)


def build_query_index(args, cfg_for) -> Path:
    from bergson.build import build_query
    from bergson.config.config import PreprocessConfig, QuerySetConfig

    cfg = cfg_for("query_index", "query")
    aggregation = "mean" if args.score_mode == "mean" else "none"
    query_set = QuerySetConfig.from_data(cfg.data, aggregation=aggregation)
    return Path(build_query(cfg, query_set, PreprocessConfig()))


def score_train(args, cfg_for, query_path: Path, hessian_path: Path | None) -> Path:
    from bergson.cli.commands import Score
    from bergson.config.config import InversionConfig, PreprocessConfig, ScoreConfig

    cfg = cfg_for("scores", "train")
    preprocess = PreprocessConfig(
        unit_normalize=False, hessian_path=str(hessian_path) if hessian_path else None,
        inversion_cfg=InversionConfig(inversion="damped_inverse", damping_factor=args.damping))
    score_mode = "individual" if args.score_mode == "mean" else "nearest"
    Score(score_cfg=ScoreConfig(query_path=str(query_path), score=score_mode, precision="fp32"),
          index_cfg=cfg, preprocess_cfg=preprocess).execute()
    return Path(cfg.run_path)


def read_scores(score_path: Path, n_rows: int):
    """One float per train row; NaN where bergson wrote nothing (rows under 2 tokens). main()
    also sets NaN on rows without supervised tokens."""
    import numpy as np
    from bergson.data import load_scores

    scores = load_scores(score_path)
    values = np.asarray(scores[:], dtype=np.float64).reshape(n_rows, -1)
    names = scores.mmap.dtype.names or ()
    written = np.stack([np.asarray(scores.mmap[n]) for n in names if n.startswith("written_")],
                       axis=1) if any(n.startswith("written_") for n in names) else None
    if values.shape[1] != 1:
        raise PipelineError(f"bergson wrote {values.shape[1]} score columns in {score_path}, "
                            f"expected 1")
    values = values[:, 0]
    if written is not None:
        values[~written.all(axis=1)] = np.nan
    return values


# ---------------------------------------------------------------------------------------------
# ranking and subsets


def score_statistics(scores) -> dict:
    import numpy as np

    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return {"n_finite": 0}
    q = np.quantile(finite, [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    return {"n_finite": int(finite.size), "mean": float(finite.mean()),
            "std": float(finite.std()), "min": float(finite.min()), "max": float(finite.max()),
            "quantiles": dict(zip(["p01", "p10", "p25", "p50", "p75", "p90", "p99"],
                                  map(float, q))),
            "n_positive": int((finite > 0).sum())}


def subset_summary(rows: list[int], scores, num_tokens, num_supervised) -> dict:
    import numpy as np

    idx = np.asarray(rows)
    return {"rows": len(rows), "mean_score": float(np.mean(scores[idx])),
            "tokens": int(np.sum(num_tokens[idx])),
            "supervised_tokens": int(np.sum(num_supervised[idx]))}


def write_selection(args, manifest, train_split, scores, num_tokens, num_supervised, staged: Path,
                    output_dir: Path, method: dict):
    """train_scores.jsonl and continuation_manifest.json (top_k, matched_random_k) into staged;
    returns the subsets' summary fields for summary.json (random_match, top_k,
    matched_random_k)."""
    ranking = rank_rows(scores)
    rank_of = {row: r + 1 for r, row in enumerate(ranking)}
    top, random_rows = choose_subsets(ranking, args.subset_k, args.seed, args.allow_overlap,
                                      random_match=args.random_match,
                                      supervised_tokens=num_supervised)
    row_ids = train_split["row_id"]
    top_set, random_set = set(top), set(random_rows)
    write_jsonl_atomic(staged / "train_scores.jsonl", (
        {"row_id": row_ids[i], "score": float(scores[i]) if math.isfinite(scores[i]) else None,
         "rank": rank_of.get(i), "num_tokens": int(num_tokens[i]),
         "num_supervised_tokens": int(num_supervised[i]),
         "in_top_k": i in top_set, "in_matched_random_k": i in random_set}
        for i in range(len(scores))))
    selection = {"method": "bergson", "source_split": args.train_split, **method,
                 "k": args.subset_k, "seed": args.seed, "allow_overlap": args.allow_overlap,
                 "random_match": args.random_match, "matched_random_rows": len(random_rows),
                 "overlap_rows": len(top_set & random_set),
                 "random_pool": "rows with a finite score"
                                + ("" if args.allow_overlap else ", outside the top-k"),
                 "scores": str((output_dir / "train_scores.jsonl").resolve())}
    write_selection_manifest(manifest, staged / "continuation_manifest.json",
                             {"top_k": train_split.select(top),
                              "matched_random_k": train_split.select(random_rows)},
                             selection)
    return {"random_match": args.random_match,
            "top_k": subset_summary(top, scores, num_tokens, num_supervised),
            "matched_random_k": subset_summary(random_rows, scores, num_tokens, num_supervised)}


def redraw_subsets(args, manifest, train_split, output_dir: Path) -> None:
    """--scores-from: the earlier run's scores, subsets drawn again with this run's k and seed."""
    import numpy as np

    source = Path(args.scores_from)
    source_summary = read_json(source / "summary.json", "--scores-from summary")
    rows = read_jsonl(source / "train_scores.jsonl", "--scores-from scores")
    if source_summary.get("train_split") != args.train_split:
        raise PipelineError(f"--scores-from {source} scored split "
                            f"'{source_summary.get('train_split')}', not '{args.train_split}'")
    if [r["row_id"] for r in rows] != train_split["row_id"]:
        raise PipelineError(f"--scores-from {source}/train_scores.jsonl does not hold the rows of "
                            f"split '{args.train_split}' of {args.manifest} in order")
    scores = np.array([np.nan if r["score"] is None else r["score"] for r in rows])
    num_tokens = np.array([r["num_tokens"] for r in rows])
    num_supervised = np.array([r["num_supervised_tokens"] for r in rows])
    staged = staging_dir(output_dir)
    try:
        method = {k: source_summary.get(k) for k in
                  ("score_mode", "preconditioning_mode", "projection_dim")}
        subsets = write_selection(args, manifest, train_split, scores, num_tokens,
                                  num_supervised, staged, output_dir,
                                  {**method, "scores_from": str(source.resolve())})
        summary = {**source_summary, "scores_from": str(source.resolve()), **subsets,
                   "provenance": provenance(seed=args.seed, manifest=args.manifest)}
        write_json_atomic(staged / "summary.json", summary)
        publish_dir(staged, output_dir)  # replaces an existing output_dir
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"drew top-{args.subset_k} and a matched random {subsets['matched_random_k']['rows']} "
          f"rows (matched by {args.random_match}, seed {args.seed}) from the scores in {source}; "
          f"wrote {output_dir}")


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    import numpy as np
    import torch

    started = time.time()
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir, args.overwrite)
    manifest = load_manifest(args.manifest)
    train_split = load_split(manifest, args.train_split)
    if len(train_split) < args.subset_k:
        raise PipelineError(f"--subset-k {args.subset_k} is larger than split "
                            f"'{args.train_split}' ({len(train_split)} rows)")
    if args.scores_from:
        redraw_subsets(args, manifest, train_split, output_dir)
        return
    adapter_path = check_adapter_dir(args.adapter_path)
    query_split = load_split(manifest, args.query_split)
    base_model = resolve_base_model(adapter_path)
    tokenizer = load_tokenizer(str(adapter_path))
    context = model_context_length(base_model, tokenizer)
    # a CPU run keeps batches small: bergson's per-module gradient hooks hold every activation of
    # the batch, and 8192 tokens of a 135M model in fp32 no longer fit in 24 GiB
    default_batch = 8192 if torch.cuda.is_available() else 2048
    token_batch_size = args.token_batch_size or min(default_batch, context)
    if token_batch_size > context:
        raise PipelineError(f"--token-batch-size {token_batch_size} exceeds the model's context "
                            f"({context} tokens)")
    if args.max_length > token_batch_size:
        raise PipelineError(f"--max-length {args.max_length} exceeds --token-batch-size "
                            f"{token_batch_size}: a row must fit in one bergson batch")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device_type == "cuda" else "fp32")

    staged = staging_dir(output_dir)
    try:
        work = staged / "bergson"
        data_dir = staged / "bergson_data"
        adapter = stage_adapter(adapter_path, base_model, staged / "work")
        stage_seconds = {}

        t0 = time.time()
        train_tok = pretokenized_dataset(train_split, tokenizer, args.max_length, args.train_split)
        query_tok = pretokenized_dataset(query_split, tokenizer, args.max_length, args.query_split)
        num_tokens = np.asarray(train_tok["length"])
        num_supervised = np.asarray(train_tok["num_supervised_tokens"])
        alignment = None
        chat = args.tokenization_mode == "chat_template"
        if chat:
            warnings.warn("--tokenization-mode chat_template: bergson tokenizes the chat itself, "
                          "so the ids it scores differ from the ids finetune.py trains on")
            print("WARNING: chat_template mode scores token ids that finetune.py does not train "
                  "on (see summary.json 'alignment')", file=sys.stderr)
            train_data = chat_template_dataset(train_split)
            query_data = chat_template_dataset(query_split)
            view = bergson_tokenized_view(train_data, tokenizer, token_batch_size)
            alignment = alignment_stats(train_tok["input_ids"], train_tok["labels"], view)
            bergson_lengths = np.asarray([len(x) for x in view["input_ids"]])
        else:
            train_data = train_tok.select_columns(["input_ids", "labels", "length"])
            query_data = query_tok.select_columns(["input_ids", "labels", "length"])
            bergson_lengths = num_tokens
        train_data.save_to_disk(str(data_dir / "train"))
        query_data.save_to_disk(str(data_dir / "query"))
        stage_seconds["tokenize"] = time.time() - t0

        def cfg_for(run_name: str, which: str):
            return index_config(args, work / run_name, data_dir / which, adapter, precision,
                                token_batch_size, chat)

        hessian_path = None
        if args.preconditioning_mode == "query":
            t0 = time.time()
            hessian_path = fit_query_hessian(args, cfg_for)
            stage_seconds["query_hessian"] = time.time() - t0
        t0 = time.time()
        query_path = build_query_index(args, cfg_for)
        stage_seconds["query_gradients"] = time.time() - t0
        t0 = time.time()
        score_path = score_train(args, cfg_for, query_path, hessian_path)
        stage_seconds["train_scoring"] = time.time() - t0

        scores = read_scores(score_path, len(train_split))
        too_short = int(np.sum(bergson_lengths < 2))
        unsupervised = (num_supervised == 0) if not chat else np.zeros(len(scores), bool)
        scores[unsupervised] = np.nan  # a zero gradient says nothing; finetune ignores the row
        subsets = write_selection(args, manifest, train_split, scores, num_tokens,
                                  num_supervised, staged, output_dir,
                                           {"score_mode": args.score_mode,
                                            "preconditioning_mode": args.preconditioning_mode,
                                            "projection_dim": args.projection_dim})

        scored_tokens = int(bergson_lengths.sum())
        query_tokens = int(np.sum(query_tok["length"]))
        n_finite = int(np.isfinite(scores).sum())
        summary = {
            "manifest": str(Path(args.manifest).resolve()),
            "adapter_path": str(adapter_path.resolve()), "base_model": base_model,
            "train_split": args.train_split, "query_split": args.query_split,
            "score_mode": args.score_mode, "preconditioning_mode": args.preconditioning_mode,
            "preconditioning": ("none" if hessian_path is None else
                                "query side x (H + d*mean(eig H)*I)^-1, H = query gradient "
                                "second moment per LoRA module (bergson autocorrelation, "
                                "dataset labels)"),
            "damping": args.damping, "projection_dim": args.projection_dim,
            "tokenization_mode": args.tokenization_mode, "alignment": alignment,
            "loss_reduction": args.loss_reduction, "precision": precision,
            "score_precision": "fp32", "token_batch_size": token_batch_size,
            "max_length": args.max_length, "attention": "fused" if args.fused_attention
            else "math (forced)", "nproc": args.nproc, "device": device_type,
            "gpu": torch.cuda.get_device_name() if device_type == "cuda" else None,
            "n_total": len(scores), "n_finite": n_finite,
            "finite_coverage": n_finite / len(scores),
            "n_under_2_tokens": too_short, "n_no_supervised_tokens": int(unsupervised.sum()),
            "n_truncated": int(np.sum(train_tok["truncated"])),
            "n_query": len(query_split), "query_tokens": query_tokens,
            "train_tokens": scored_tokens,
            "score_stats": score_statistics(scores),
            **subsets,
            "stage_seconds": stage_seconds,
            "tokens_per_second": {
                "query_gradients": query_tokens / stage_seconds["query_gradients"],
                "train_scoring": scored_tokens / stage_seconds["train_scoring"]},
            "total_seconds": time.time() - started,
            "bergson_version": provenance()["library_versions"].get("bergson"),
            "provenance": provenance(seed=args.seed, manifest=args.manifest),
        }
        if not args.keep_gradients:
            for name in ("query_index", "hessian"):
                shutil.rmtree(work / name, ignore_errors=True)
        shutil.rmtree(staged / "work")
        write_json_atomic(staged / "summary.json", summary)
        publish_dir(staged, output_dir)  # replaces an existing output_dir
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"scored {n_finite}/{len(scores)} rows in {summary['total_seconds']:.1f}s "
          f"({summary['tokens_per_second']['train_scoring']:.0f} train tokens/s); "
          f"top-{args.subset_k} mean score {summary['top_k']['mean_score']:.4g} vs random "
          f"{summary['matched_random_k']['mean_score']:.4g}; wrote {output_dir}")


if __name__ == "__main__":
    from pipeline import run_main

    run_main(main)
