r"""Attribution: rank every training row by how well its LoRA gradient agrees with the query set's,
through bergson 2.5.1, then write the top-k and a size-matched random subset as a continuation
manifest that finetune.py and eval_loss.py take like the main manifest.

    uv run score.py --manifest runs/smoltalk_v1/manifest.json \
        --adapter-path runs/smoltalk_v1/base_adapter --output-dir runs/smoltalk_v1/attribution

The defaults are the seed's configuration (bergson <= 0.6): --score-normalization seed
--loss-reduction mean --preconditioning-mode query --damping-rule mean_abs_entry --damping 0.1
--projection-dim 32. score.py's earlier score is one flag set away: --score-normalization none
--loss-reduction sum --damping-rule mean_eig (its default was --preconditioning-mode none).

Gradients. g_i = gradient of train row i's loss w.r.t. the LoRA weights, q_j the same for query
row j, each projected per LoRA module m to p x p (--projection-dim p; 0 = none). A row's loss is
the sum (--loss-reduction sum) or the mean (mean) of the token NLL over its supervised
(completion) tokens. bergson computes every per-row gradient (one pass over the query split, one
over the train split, both written as gradient indices); the scores below are computed from them.

Hessian. H_m = (1/N) sum_j q_jm q_jm^T, the query gradients' second moment per module (bergson's
"autocorrelation" Hessian). --preconditioning-mode mixed: H_m = c * H_query,m + (1 - c) * H_pool,m
with c = --mixing-coefficient and H_pool the same second moment over the train split's gradients.
Damping, d = --damping:
  mean_abs_entry  lam_m = d * mean_ab |H_m,ab|   (the seed's: bergson <= 0.6 utils/math.py)
  mean_eig        lam_m = d * mean(eig(H_m))      (bergson 2.5.1's damped_inverse)
P = blockdiag_m (H_m + lam_m * I)^-1 (--preconditioning-mode none: P = I). ||.|| and cos are
taken over the whole gradient, all modules together.

Scores (mean = --score-mode mean, nearest = --score-mode nearest):
  none     mean     s_i = < g_i , P mean_j q_j >
           nearest  s_i = max_j < g_i , P q_j >
  seed     mean     s_i = cos( g_i , P qbar ),   qbar = mean_j ( q_j / ||q_j|| )
           nearest  s_i = max_j cos( g_i , P q_j )
  bergson  mean     s_i = mean_j cos( R g_i , R q_j ),   R = blockdiag_m (H_m + lam_m * I)^-1/2
           nearest  s_i = max_j cos( R g_i , R q_j )
seed is the seed's score: P on the query side only, the preconditioned query re-normalised, every
train gradient unit-normalised. bergson is bergson 2.5.1's own normalised score (unit_normalize
with a Hessian: the two-sided, TrackStar-style form), computed with bergson's Scorer.

What each does to length. Higher score = the row's gradient step lowers the query loss more.
  none + sum   favours long rows: a summed loss's gradient grows with the row's supervised tokens
               (on the AlpacaEval data the top-500 held 2x the supervised tokens of a random 500)
  none + mean  favours short rows: a mean loss's gradient is larger for short rows (fewer tokens
               average out less), so they win the inner product
  seed/bergson a cosine removes the gradient norm, and with it the direct length effect; sum and
               mean give the same cosine (a row's mean-loss gradient is its sum-loss gradient over
               its token count), except through the Hessian, which the loss scale enters
summary.json's length_diagnostics show what is left: the Spearman correlation of the score with
supervised tokens, total tokens and reward_model_score, the mean score per category and the top-k's
supervised tokens against the pool mean x k. --random-match tokens draws the random subset to the
top-k's supervised token count instead of its row count.

Modes of the command:
  default            bergson gradients, scores, train_scores.jsonl, summary.json, subsets
  --scores-only      train_scores.jsonl + summary.json, no subsets, no continuation manifest
  --scores-from DIR  reuse an earlier run's scores (same split: ids and content) and only draw
                     the subsets again (--subset-k, --seed)
  --gradients-from DIR  reuse an earlier --keep-gradients run's gradient indices (same splits,
                     adapter, loss reduction, projection, tokenization) and only compute the
                     scores again, e.g. another --score-normalization, --score-mode or
                     --preconditioning-mode: one bergson pass per loss reduction for every variant
  --write-score-matrix  also every individual score tau(j, i), query row j x train row i
                     (score_matrix.npy + score_matrix.json), for lds.py; mean_j tau(j, i) = s_i:
                     none <g_i, P q_j>; seed <g_i/||g_i||, P q_j/||q_j||> / ||P qbar||;
                     bergson cos(R g_i, R q_j)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

from pipeline import (PipelineError, base_model_of_adapter, check_adapter_dir, check_output_dir,
                      load_manifest, load_split, load_tokenizer, provenance, prompt_messages,
                      read_json, read_jsonl, seed_type, split_fingerprint, staged_output,
                      tokenize_split, write_json_atomic, write_jsonl_atomic,
                      write_selection_manifest)
from subsets import (ARMS, RANDOM_MATCHES, check_arms, choose_subsets, rank_rows, read_arm_scores,
                     select_arm, summarize_arms)

SCRIPT = "score.py"

# train rows per chunk when scoring from the on-disk index: about 256 MiB of fp32 gradients
CHUNK_VALUES = 1 << 26


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
                   help="replace an existing --output-dir (otherwise refuse)")
    p.add_argument("--train-split", default="score_pool",
                   help="split whose rows are ranked (default: the manifest's score_pool, the "
                        "pool that gets scored)")
    p.add_argument("--query-split", default="attr_query", help="split the scores point towards")
    p.add_argument("--score-mode", choices=["mean", "nearest"], default="mean",
                   help="mean: against the query set as a whole; nearest: the best match over "
                        "the individual query rows (formulas above)")
    p.add_argument("--score-normalization", choices=["none", "seed", "bergson"], default="seed",
                   help="none: inner product (score.py's earlier score); seed: the seed's cosine "
                        "with the one-sided preconditioned query; bergson: bergson 2.5.1's "
                        "two-sided normalised score (formulas above; default: %(default)s)")
    p.add_argument("--preconditioning-mode", choices=["none", "query", "mixed"], default="query",
                   help="query: H from the query gradients; mixed: c*H_query + (1-c)*H_pool, "
                        "H_pool from the train split's gradients; none: no Hessian")
    p.add_argument("--mixing-coefficient", type=float, default=0.99,
                   help="c in c*H_query + (1-c)*H_pool for --preconditioning-mode mixed")
    p.add_argument("--damping-rule", choices=["mean_abs_entry", "mean_eig"],
                   default="mean_abs_entry",
                   help="lam_m = d*mean|H_m,ab| (mean_abs_entry, the seed's) or "
                        "d*mean(eig H_m) (mean_eig, bergson 2.5.1's)")
    p.add_argument("--damping", type=float, default=0.1,
                   help="d in (H_m + lam_m*I) (formulas above)")
    p.add_argument("--projection-dim", type=int, default=32,
                   help="random projection of each LoRA module's gradient to p x p; 0 = none "
                        "(exact, but memory grows with the adapter size)")
    p.add_argument("--tokenization-mode", choices=["finetune_raw", "chat_template"],
                   default="finetune_raw",
                   help="finetune_raw: bergson gets the exact input_ids/labels finetune.py trains "
                        "on; chat_template: bergson renders and tokenizes the chat itself "
                        "(misaligned with training; only for comparison)")
    p.add_argument("--loss-reduction", choices=["sum", "mean"], default="mean",
                   help="a row's loss: sum or mean of NLL over its completion tokens")
    p.add_argument("--subset-k", type=int, default=500,
                   help="rows in top_k and in matched_random_k (with --scores-only: the top-k of "
                        "the length diagnostics)")
    p.add_argument("--seed", type=seed_type, default=42,
                   help="seed of the matched random subset (and of the random arms)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let the random subset include top-k rows (default: it may not)")
    p.add_argument("--random-match", choices=RANDOM_MATCHES, default="rows",
                   help="what matched_random_k matches: rows = k uniform rows (the seed's "
                        "design); tokens = the top-k's supervised token count (the shortest run "
                        "of rows, in a seeded random order, whose supervised tokens reach it); "
                        "stratified = k rows with the top-k's count per length quintile of "
                        "supervised tokens. tokens and stratified take the top-k's length bias "
                        "out of the comparison (subsets.py)")
    p.add_argument("--arms", default=None, metavar="A,B,...",
                   help="with --scores-from: instead of top_k + matched_random_k, one split per "
                        f"named arm ({', '.join(ARMS)}; subsets.py says what each is), k rows "
                        "each, drawn with --seed (the random arms change with it)")
    p.add_argument("--arm-scores", action="append", default=[], metavar="NAME=PATH",
                   help="the scores of a score arm (attribution_raw=<score.py folder>, "
                        "sae=<train_bidir_classifier.py row_scores.jsonl>): its top-k (repeatable)")
    p.add_argument("--scores-only", action="store_true",
                   help="write train_scores.jsonl and summary.json only: no subsets, no "
                        "continuation manifest (a later --scores-from run draws them)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="truncate rows on the right to this many tokens, as finetune.py does")
    p.add_argument("--token-batch-size", type=int, default=None,
                   help="tokens per bergson batch (default: 8192 on GPU, 2048 on CPU, capped "
                        "at the model's context); must be >= --max-length")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="model precision in bergson (auto: bf16 on GPU, fp32 on CPU); scores "
                        "are always computed in fp32")
    p.add_argument("--fused-attention", action="store_true",
                   help="let torch pick fused SDPA kernels (faster); by default the math kernel "
                        "is forced so a row's gradient does not depend on its batch's padding")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) bergson uses")
    p.add_argument("--keep-gradients", action="store_true",
                   help="keep bergson's gradient indices (bergson/query_index, "
                        "bergson/train_index) and the Hessian used (bergson/hessian, bergson's "
                        "format); by default they are deleted once the scores are written")
    p.add_argument("--scores-from", default=None, metavar="DIR",
                   help="reuse the train scores of an earlier score.py run on the same split "
                        "(its --output-dir; row ids and content must match) instead of running "
                        "bergson: only the top-k and the matched random subset (--subset-k, "
                        "--seed) are drawn again. The scores do not depend on --seed, so a "
                        "multi-seed run scores once and redraws the random subset per seed")
    p.add_argument("--gradients-from", default=None, metavar="DIR",
                   help="reuse the gradient indices of an earlier score.py --keep-gradients run "
                        "(same splits, adapter, --loss-reduction, --projection-dim, "
                        "--max-length, --tokenization-mode, precision) instead of running "
                        "bergson; the scores are computed again with this run's settings "
                        "(--keep-gradients then keeps nothing: the indices stay in DIR)")
    p.add_argument("--write-score-matrix", action="store_true",
                   help="also write every individual score, query row x train row, as "
                        "score_matrix.npy (float32 [n_query, n_train], NaN where a row is "
                        "unscored) + score_matrix.json (query_ids, train_ids, the variant); its "
                        "mean over the query rows is train_scores.jsonl's score (--score-mode "
                        "mean only; works with --gradients-from). lds.py reads it")
    p.add_argument("--score-matrix-max-mb", type=float, default=1024.0,
                   help="refuse --write-score-matrix when the matrix would exceed this many MiB "
                        "(it is held in memory twice while written); raise it to allow more")
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
    if not 0.0 <= args.mixing_coefficient <= 1.0:
        raise PipelineError(f"--mixing-coefficient must be in [0, 1], got "
                            f"{args.mixing_coefficient}")
    if not args.damping > 0 and args.preconditioning_mode != "none":
        raise PipelineError(f"--damping must be > 0 with --preconditioning-mode "
                            f"{args.preconditioning_mode} (a query Hessian is singular), got "
                            f"{args.damping}")
    if (args.arms or args.arm_scores) and not args.scores_from:
        raise PipelineError("--arms and --arm-scores draw from existing scores: pass "
                            "--scores-from DIR")
    if args.write_score_matrix and (args.scores_from or args.score_mode != "mean"):
        why = ("--scores-from only redraws subsets" if args.scores_from else
               "its rows average to the --score-mode mean score; nearest is a max over them")
        raise PipelineError(f"--write-score-matrix needs --score-mode mean and bergson's "
                            f"gradients (or --gradients-from): {why}")
    if args.scores_from and (args.scores_only or args.gradients_from):
        other = "--scores-only" if args.scores_only else "--gradients-from"
        raise PipelineError(f"--scores-from and {other} exclude each other: --scores-from only "
                            f"draws subsets from existing scores")


def prepare_output_dir(args) -> Path:
    """Refused before any work: the working directory, a folder holding an input, another
    script's folder (pipeline.check_output_dir)."""
    return check_output_dir(args.output_dir, args.overwrite, SCRIPT,
                            inputs=[args.manifest, args.adapter_path if not args.scores_from
                                    else None, args.scores_from, args.gradients_from,
                                    *[item.partition("=")[2] for item in args.arm_scores]])


def check_subset_k(args, train_split) -> None:
    if len(train_split) < args.subset_k:
        raise PipelineError(f"--subset-k {args.subset_k} is larger than split "
                            f"'{args.train_split}' ({len(train_split)} rows)")


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


def run_settings(args) -> dict:
    """Adapter, base model, tokenizer, bergson batch size, device and precision, checked before
    any tokenization or gradient work."""
    import torch

    adapter_path = check_adapter_dir(args.adapter_path)
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
    return {"adapter_path": adapter_path, "base_model": base_model, "tokenizer": tokenizer,
            "token_batch_size": token_batch_size, "device_type": device_type,
            "precision": precision}


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


def tokenize_step(args, run: dict, train_split, query_split, data_dir: Path) -> dict:
    """The ids bergson scores, saved under data_dir/{train,query}, and the per-row token counts
    the summary and the subsets use."""
    import numpy as np

    tokenizer = run["tokenizer"]
    train_tok = pretokenized_dataset(train_split, tokenizer, args.max_length, args.train_split)
    query_tok = pretokenized_dataset(query_split, tokenizer, args.max_length, args.query_split)
    chat = args.tokenization_mode == "chat_template"
    alignment = None
    if chat:
        warnings.warn("--tokenization-mode chat_template: bergson tokenizes the chat itself, "
                      "so the ids it scores differ from the ids finetune.py trains on")
        print("WARNING: chat_template mode scores token ids that finetune.py does not train "
              "on (see summary.json 'alignment')", file=sys.stderr)
        train_data = chat_template_dataset(train_split)
        query_data = chat_template_dataset(query_split)
        view = bergson_tokenized_view(train_data, tokenizer, run["token_batch_size"])
        alignment = alignment_stats(train_tok["input_ids"], train_tok["labels"], view)
        bergson_lengths = np.asarray([len(x) for x in view["input_ids"]])
    else:
        train_data = train_tok.select_columns(["input_ids", "labels", "length"])
        query_data = query_tok.select_columns(["input_ids", "labels", "length"])
        bergson_lengths = np.asarray(train_tok["length"])
    train_data.save_to_disk(str(data_dir / "train"))
    query_data.save_to_disk(str(data_dir / "query"))
    return {"chat": chat, "alignment": alignment, "data_dir": data_dir,
            "num_tokens": np.asarray(train_tok["length"]),
            "num_supervised": np.asarray(train_tok["num_supervised_tokens"]),
            "n_truncated": int(np.sum(train_tok["truncated"])),
            "bergson_lengths": bergson_lengths, "query_tokens": int(np.sum(query_tok["length"]))}


# ---------------------------------------------------------------------------------------------
# bergson: per-row gradients


def index_config(args, run: dict, run_path: Path, dataset_dir: Path, adapter: Path, chat: bool):
    from bergson.config.config import DataConfig, DistributedConfig, IndexConfig

    data = (DataConfig(dataset=str(dataset_dir), conversation_column="messages", truncation=True)
            if chat else DataConfig(dataset=str(dataset_dir)))
    return IndexConfig(run_path=str(run_path), model=str(adapter), tokenizer=str(adapter),
                       data=data, precision=run["precision"],
                       projection_dim=args.projection_dim,
                       token_batch_size=run["token_batch_size"],
                       loss_reduction=args.loss_reduction,
                       force_math_sdp=not args.fused_attention,
                       distributed=DistributedConfig(nproc_per_node=args.nproc))


def build_gradient_index(cfg) -> Path:
    """bergson's Build: one projected gradient per row, written as an on-disk index
    (gradients.bin + info.json) in the row order of the dataset. No preprocessing: the
    normalisations and the Hessian are applied when scoring, so one index serves every variant."""
    from bergson.cli.commands import Build
    from bergson.config.config import PreprocessConfig

    Build(index_cfg=cfg, preprocess_cfg=PreprocessConfig()).execute()
    return Path(cfg.run_path)


def bergson_gradients_step(args, run: dict, tokens: dict, staged: Path, stage_seconds: dict):
    """The query and train gradient indices under staged/bergson/ (inside the staged output, so
    a failure removes them with it)."""
    work = staged / "bergson"
    adapter = stage_adapter(run["adapter_path"], run["base_model"], staged / "work")
    paths = {}
    for which, name in (("query", "query_index"), ("train", "train_index")):
        t0 = time.time()
        paths[which] = build_gradient_index(index_config(
            args, run, work / name, tokens["data_dir"] / which, adapter, tokens["chat"]))
        stage_seconds[f"{which}_gradients"] = time.time() - t0
    return paths


def reused_gradients(args, run: dict, train_split, query_split) -> dict:
    """--gradients-from: the gradient indices of an earlier --keep-gradients run, after checking
    that they were built from the same rows, adapter and gradient settings."""
    source = Path(args.gradients_from)
    summary = read_json(source / "summary.json", "--gradients-from summary")
    paths = {"query": source / "bergson" / "query_index",
             "train": source / "bergson" / "train_index"}
    for path in paths.values():
        if not (path / "info.json").is_file():
            raise PipelineError(f"--gradients-from {source} has no {path.relative_to(source)} "
                                f"(rerun that score.py with --keep-gradients)")
    wanted = {"train_fingerprint": split_fingerprint(train_split),
              "query_fingerprint": split_fingerprint(query_split),
              "adapter_path": str(run["adapter_path"].resolve()),
              "loss_reduction": args.loss_reduction, "projection_dim": args.projection_dim,
              "max_length": args.max_length, "tokenization_mode": args.tokenization_mode,
              "precision": run["precision"],
              "attention": "fused" if args.fused_attention else "math (forced)"}
    for key, value in wanted.items():
        if summary.get(key) != value:
            raise PipelineError(f"--gradients-from {source} was built with {key} "
                                f"{summary.get(key)!r}, this run ({args.output_dir}) needs "
                                f"{value!r}")
    return paths


def load_index(path: Path):
    """A bergson gradient index as (memmap [rows, D], {module: size} in column order)."""
    from bergson.data import load_gradients

    info = json.loads((path / "info.json").read_text())
    return load_gradients(path), dict(info["grad_sizes"])


def save_hessian(hessians: dict, index_path: Path, out: Path) -> None:
    """The Hessian the scores used, as a bergson GradientProcessor (the index's own projection
    settings), so bergson's Score can be pointed at it (benchmarks/score_speed.py does)."""
    from dataclasses import replace

    from bergson.gradients import GradientProcessor

    processor = GradientProcessor.load(index_path, skip_hessians=True)
    replace(processor, hessians={m: h.cpu() for m, h in hessians.items()},
            hessians_eigen={}).save(out)


# ---------------------------------------------------------------------------------------------
# scores from the gradient indices


def module_view(block, columns: dict, device) -> tuple[dict, object]:
    """fp32 tensors per module from a [rows, D] slice of a gradient index, and which rows are
    usable: finite and not all zero (a row without supervised tokens has a zero gradient under a
    summed loss and a NaN one under a mean loss; it says nothing about the query)."""
    import numpy as np
    import torch

    flat = torch.from_numpy(np.array(block, dtype=np.float32)).to(device)  # a copy: writable
    usable = torch.isfinite(flat).all(dim=1) & flat.abs().amax(dim=1).gt(0)
    flat = torch.where(usable[:, None], flat, torch.zeros((), device=device))
    return {m: flat[:, lo:hi] for m, (lo, hi) in columns.items()}, usable


def chunks(index, columns: dict, device, chunk_rows: int):
    for start in range(0, len(index), chunk_rows):
        grads, usable = module_view(index[start:start + chunk_rows], columns, device)
        yield start, grads, usable


def second_moments(grads: dict) -> dict:
    """H_m = (1/N) sum_n g_nm g_nm^T: bergson's autocorrelation Hessian (its
    AutocorrelationCollector sums the same per-row outer products and divides by the rows)."""
    return {m: g.T @ g / len(g) for m, g in grads.items()}


def pool_second_moments(index, columns: dict, device, chunk_rows: int) -> tuple[dict, int]:
    """H_pool from the train gradients already on disk, chunk by chunk: bergson would fit it with
    a second forward/backward pass over the whole pool."""
    total, n = {}, 0
    for _, grads, usable in chunks(index, columns, device, chunk_rows):
        n += int(usable.sum())
        for m, g in grads.items():  # unusable rows are zero and add nothing
            total[m] = g.T @ g if m not in total else total[m].addmm_(g.T, g)
    if n == 0:
        raise PipelineError("the train split has no usable gradient for H_pool")
    return {m: h / n for m, h in total.items()}, n


def damped_power(h, power: float, rule: str, damping: float):
    """(H + lam*I)^power through bergson 2.5.1's invert_psd_matrix (eigendecomposition in fp64,
    eigenvalues clamped at 0), and lam. mean_abs_entry: lam = d*mean|H_ab|, which bergson 2.5.1
    has no option for, so it is passed as the absolute damping of absolute_damped_inverse
    (1/(eig + c)); mean_eig: bergson's damped_inverse, 1/(eig + d*mean(eig))."""
    import torch
    from bergson.hessians.inversion import invert_psd_matrix

    if rule == "mean_abs_entry":
        lam = float(damping * h.double().abs().mean())
        return invert_psd_matrix(h, "absolute_damped_inverse", lam, power), lam
    if rule == "mean_eig":
        lam = float(damping * torch.linalg.eigvalsh(h.double()).clamp_min(0).mean())
        return invert_psd_matrix(h, "damped_inverse", damping, power), lam
    raise ValueError(f"unknown damping rule {rule!r}")


def fitted_preconditioner(q: dict, train, columns: dict, *, normalization: str,
                          preconditioning: str, mixing_coefficient: float, damping_rule: str,
                          damping: float, device, chunk_rows: int):
    """bergson's DensePreconditioner holding, per module, (H + lam I)^-1/2 for the bergson
    normalisation (it goes on both sides) or (H + lam I)^-1 for none and seed (query side only);
    None without preconditioning. Also the Hessians and what the fit used, for the summary."""
    import numpy as np
    from bergson.hessians.preconditioner import DensePreconditioner

    if preconditioning == "none":
        return None, None, {}
    hessians, info = second_moments(q), {}
    if preconditioning == "mixed":
        pool, info["n_pool_rows_in_hessian"] = pool_second_moments(train, columns, device,
                                                                   chunk_rows)
        c = mixing_coefficient
        hessians = {m: c * hessians[m] + (1 - c) * pool[m] for m in hessians}
    power = -0.5 if normalization == "bergson" else -1.0
    matrices, lams = {}, []
    for m, h in hessians.items():
        matrices[m], lam = damped_power(h, power, damping_rule, damping)
        lams.append(lam)
    info["damping_used"] = {"modules": len(lams), "min": min(lams),
                            "median": float(np.median(lams)), "max": max(lams)}
    return DensePreconditioner(matrices), hessians, info


def query_side(q: dict, precondition, normalization: str, mean: bool):
    """The query gradients as the Scorer takes them (one aggregated row for --score-mode mean,
    one row per query for nearest), and the transform the train gradients get (bergson only)."""
    import torch
    from bergson.process_grads import normalize_and_aggregate_grads

    def prepared(grads, unit_normalize: bool, aggregate: str):
        # unit_normalize divides each row by its norm over all modules together
        return normalize_and_aggregate_grads(grads, list(q), unit_normalize=unit_normalize,
                                             device=next(iter(q.values())).device,
                                             aggregate_grads=aggregate, dtype=torch.float32)

    apply = precondition.apply if precondition else (lambda grads: grads)
    aggregate = "mean" if mean else "none"
    if normalization == "none":
        # P mean_j q_j, which P's linearity makes bergson's mean-aggregated query, preconditioned
        return prepared(apply(q), False, aggregate), None
    if normalization == "seed":
        if mean:  # qbar = mean_j q_j/||q_j||, then P, then re-normalised
            return prepared(apply(prepared(q, True, "mean")), True, "none"), None
        return prepared(apply(q), True, "none"), None  # every P q_j normalised
    if normalization == "bergson":
        # bergson's create_scorer with unit_normalize and a Hessian: R q_j, each normalised,
        # then aggregated; R applied again to each train gradient as it streams in
        return prepared(apply(q), True, aggregate), precondition.apply if precondition else None
    raise ValueError(f"unknown normalization {normalization!r}")


def individual_query_rows(q: dict, precondition, normalization: str) -> dict:
    """One row per query whose mean over the queries is query_side's mean-mode query, so the
    individual scores tau(j, i) average to the mean score s_i:
      none     P q_j                           (mean: P mean_j q_j)
      seed     P q^_j / ||P qbar||,  q^_j = q_j / ||q_j||   (mean: P qbar / ||P qbar||)
      bergson  R q_j / ||R q_j||               (mean: their mean)
    seed's rows differ from nearest's cos(g_i, P q_j) only by a positive factor per query, which
    a per-query rank statistic (lds.py) does not see."""
    import torch
    from bergson.process_grads import normalize_and_aggregate_grads

    def prepared(grads, unit_normalize: bool, aggregate: str):
        return normalize_and_aggregate_grads(grads, list(q), unit_normalize=unit_normalize,
                                             device=next(iter(q.values())).device,
                                             aggregate_grads=aggregate, dtype=torch.float32)

    apply = precondition.apply if precondition else (lambda grads: grads)
    if normalization == "none":
        return prepared(apply(q), False, "none")
    if normalization == "bergson":
        return prepared(apply(q), True, "none")
    if normalization == "seed":
        rows = prepared(apply(prepared(q, True, "none")), False, "none")
        norm = torch.sqrt(sum(r.mean(dim=0).pow(2).sum() for r in rows.values()))
        return {m: r / norm.clamp_min(1e-30) for m, r in rows.items()}
    raise ValueError(f"unknown normalization {normalization!r}")


def attribution_scores(query, train, grad_sizes: dict, *, normalization: str, score_mode: str,
                       preconditioning: str, mixing_coefficient: float = 0.99,
                       damping_rule: str = "mean_abs_entry", damping: float = 0.1,
                       device="cpu", chunk_rows: int | None = None, individual: bool = False):
    """One score per train row (formulas in the module docstring) from per-row gradients laid
    out as bergson's index ([rows, D], modules in grad_sizes order): query [N_query, D], train
    [N_train, D] (a memmap is read chunk by chunk, so memory stays bounded). Returns (scores as
    float64, NaN where the train gradient is unusable; info: query rows used, the Hessians, the
    damping per module; with individual=True (score mode mean) also "matrix", float32
    [N_query, N_train] of the individual scores (individual_query_rows), NaN in the rows of
    unusable queries and the columns of unusable train rows: its mean over the usable query
    rows is the score).

    The query side is composed from bergson 2.5.1's parts (its damped inverse, its per-row
    normalisation and aggregation, its dense preconditioner); the train side runs through
    bergson's Scorer, which takes the inner products and, when normalising, divides by each
    train gradient's norm after its index_transform, so `bergson` is bergson's own score."""
    import numpy as np
    import torch
    from bergson.data import column_offsets
    from bergson.score.score_writer import InMemorySequenceScoreWriter
    from bergson.score.scorer import Scorer

    device = torch.device(device)
    columns = column_offsets(grad_sizes)
    chunk_rows = chunk_rows or max(1, CHUNK_VALUES // max(1, train.shape[1]))
    q, q_usable = module_view(query, columns, device)
    q = {m: g[q_usable] for m, g in q.items()}
    if not q_usable.any():
        raise PipelineError("no query row has a usable gradient (all zero or non-finite)")
    precondition, hessians, info = fitted_preconditioner(
        q, train, columns, normalization=normalization, preconditioning=preconditioning,
        mixing_coefficient=mixing_coefficient, damping_rule=damping_rule, damping=damping,
        device=device, chunk_rows=chunk_rows)
    mean = score_mode == "mean"
    queries, transform = query_side(q, precondition, normalization, mean)

    writer = InMemorySequenceScoreWriter(len(train), 1, dtype=torch.float32)
    scorer = Scorer(query_grads=queries, modules=list(grad_sizes), writer=writer, device=device,
                    dtype=torch.float32, unit_normalize=normalization != "none",
                    score_mode="individual" if mean else "nearest", index_transform=transform)
    matrix_scorer = None
    if individual:
        if not mean:
            raise ValueError("individual scores average to the mean score: score_mode mean")
        rows = individual_query_rows(q, precondition, normalization)
        matrix_writer = InMemorySequenceScoreWriter(len(train), int(q_usable.sum()),
                                                    dtype=torch.float32)
        matrix_scorer = Scorer(query_grads=rows, modules=list(grad_sizes), writer=matrix_writer,
                               device=device, dtype=torch.float32,
                               unit_normalize=normalization != "none", score_mode="individual",
                               index_transform=transform)
    usable_rows = np.zeros(len(train), dtype=bool)
    for start, grads, usable in chunks(train, columns, device, chunk_rows):
        scorer(list(range(start, start + len(usable))), grads)
        if matrix_scorer:
            matrix_scorer(list(range(start, start + len(usable))), grads)
        usable_rows[start:start + len(usable)] = usable.cpu().numpy()
    scores = writer.scores[:, 0].double().numpy()
    scores[~usable_rows] = np.nan
    if matrix_scorer:
        matrix = np.full((len(query), len(train)), np.nan, dtype=np.float32)
        matrix[q_usable.cpu().numpy()] = matrix_writer.scores.numpy().T
        matrix[:, ~usable_rows] = np.nan
        info["matrix"] = matrix
    return scores, {"n_query_used": int(q_usable.sum()), "hessians": hessians, **info}


def scores_step(args, paths: dict, tokens: dict, n_train: int) -> tuple:
    """The scores of this run's settings from the two gradient indices (on the GPU when there is
    one), NaN for rows bergson could not take (under 2 tokens) and rows without supervised
    tokens."""
    import numpy as np
    import torch

    query, query_sizes = load_index(paths["query"])
    train, train_sizes = load_index(paths["train"])
    if query_sizes != train_sizes or len(train) != n_train:
        raise PipelineError(f"the gradient indices in {paths['train'].parent} do not match: "
                            f"{len(train)} train rows for a split of {n_train}, modules "
                            f"{'equal' if query_sizes == train_sizes else 'differ'}")
    scores, info = attribution_scores(
        query, train, train_sizes, normalization=args.score_normalization,
        score_mode=args.score_mode, preconditioning=args.preconditioning_mode,
        mixing_coefficient=args.mixing_coefficient, damping_rule=args.damping_rule,
        damping=args.damping, device="cuda" if torch.cuda.is_available() else "cpu",
        individual=args.write_score_matrix)
    too_short = tokens["bergson_lengths"] < 2
    unsupervised = (tokens["num_supervised"] == 0) if not tokens["chat"] else np.zeros(
        n_train, bool)
    scores[too_short | unsupervised] = np.nan  # a zero gradient says nothing; finetune skips it
    if "matrix" in info:
        info["matrix"][:, too_short | unsupervised] = np.nan
    info.update(n_under_2_tokens=int(too_short.sum()),
                n_no_supervised_tokens=int(unsupervised.sum()))
    return scores, info


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


def length_diagnostics(scores, num_tokens, num_supervised, split, k: int) -> dict:
    """How much of the score is length (and reward, and category): Spearman correlations over
    the finitely scored rows, the mean score per category, and the top-k's supervised tokens
    against what k rows of the pool hold on average."""
    import numpy as np
    from scipy.stats import spearmanr

    finite = np.isfinite(scores)

    def spearman(values):
        values = np.asarray(values, dtype=float)
        keep = finite & np.isfinite(values)
        if keep.sum() < 3 or np.ptp(values[keep]) == 0 or np.ptp(scores[keep]) == 0:
            return None
        return float(spearmanr(scores[keep], values[keep]).statistic)

    out = {"n_rows": int(finite.sum()),
           "spearman_supervised_tokens": spearman(num_supervised),
           "spearman_total_tokens": spearman(num_tokens)}
    if "reward_model_score" in split.column_names:
        out["spearman_reward_model_score"] = spearman(
            [np.nan if v is None else v for v in split["reward_model_score"]])
    if "category" in split.column_names:
        categories = np.asarray([str(c) for c in split["category"]])
        out["mean_score_by_category"] = {
            c: {"rows": int((categories[finite] == c).sum()),
                "mean_score": float(scores[finite][categories[finite] == c].mean())}
            for c in sorted(set(categories[finite]))}
    top = rank_rows(scores)[:k]
    expected = float(np.mean(num_supervised[finite])) * len(top) if top else None
    top_tokens = int(np.sum(num_supervised[top]))
    out["top_k_supervised_tokens"] = {
        "k": len(top), "top_k": top_tokens, "pool_mean_x_k": expected,
        "ratio": top_tokens / expected if expected else None}
    return out


def subset_summary(rows: list[int], scores, num_tokens, num_supervised) -> dict:
    import numpy as np

    idx = np.asarray(rows)
    return {"rows": len(rows), "mean_score": float(np.mean(scores[idx])),
            "tokens": int(np.sum(num_tokens[idx])),
            "supervised_tokens": int(np.sum(num_supervised[idx]))}


def write_train_scores(path: Path, row_ids, scores, num_tokens, num_supervised,
                       subsets: tuple | None) -> None:
    """One line per train row: score (null where not finite), rank, token counts, and with
    subsets=(top, random_rows) whether the row is in each."""
    rank_of = {row: r + 1 for r, row in enumerate(rank_rows(scores))}
    top_set, random_set = (set(subsets[0]), set(subsets[1])) if subsets else (None, None)

    def line(i):
        row = {"row_id": row_ids[i],
               "score": float(scores[i]) if math.isfinite(scores[i]) else None,
               "rank": rank_of.get(i), "num_tokens": int(num_tokens[i]),
               "num_supervised_tokens": int(num_supervised[i])}
        if subsets:
            row.update(in_top_k=i in top_set, in_matched_random_k=i in random_set)
        return row

    write_jsonl_atomic(path, (line(i) for i in range(len(scores))))


def write_selection(args, manifest, train_split, scores, num_tokens, num_supervised, staged: Path,
                    output_dir: Path, method: dict):
    """train_scores.jsonl and continuation_manifest.json (top_k, matched_random_k) into staged;
    returns the subsets' summary fields for summary.json (random_match, top_k,
    matched_random_k)."""
    top, random_rows = choose_subsets(rank_rows(scores), args.subset_k, args.seed,
                                      args.allow_overlap, random_match=args.random_match,
                                      supervised_tokens=num_supervised)
    write_train_scores(staged / "train_scores.jsonl", train_split["row_id"], scores, num_tokens,
                       num_supervised, (top, random_rows))
    top_set, random_set = set(top), set(random_rows)
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


def write_arms(args, manifest, train_split, scores, num_tokens, num_supervised, staged: Path,
               method: dict) -> dict:
    """--arms: train_scores.jsonl and a continuation manifest with one split per arm (k rows
    each, subsets.select_arm); returns summary.json's arms field."""
    import numpy as np

    arm_scores = {}
    for item in args.arm_scores:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PipelineError(f"--arm-scores {item}: expected NAME=PATH")
        arm_scores[name] = read_arm_scores(name, path, train_split["row_id"])
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        check_scored_content(read_json(folder / "summary.json", f"--arm-scores {name} summary"),
                             f"--arm-scores {name}={path}", args, train_split, args.output_dir)
    arms = check_arms([a.strip() for a in args.arms.split(",") if a.strip()], arm_scores)
    reward = (np.array([np.nan if v is None else v for v in train_split["reward_model_score"]],
                       dtype=np.float64)
              if "reward_model_score" in train_split.column_names else None)
    outcome = (train_split["quality"] if "random_outcome_stratified" in arms
               and "quality" in train_split.column_names else None)  # Taboo: meta.outcome
    selections = {arm: select_arm(arm, args.subset_k, scores, supervised_tokens=num_supervised,
                                  seed=args.seed, reward=reward, arm_scores=arm_scores,
                                  allow_overlap=args.allow_overlap, outcome=outcome)
                  for arm in arms}
    write_train_scores(staged / "train_scores.jsonl", train_split["row_id"], scores, num_tokens,
                       num_supervised, None)
    selection = {"method": "arms", "source_split": args.train_split, **method,
                 "k": args.subset_k, "seed": args.seed, "allow_overlap": args.allow_overlap,
                 "arms": {arm: ARMS.get(arm, "top-k of its own scores") for arm in arms},
                 "arm_scores": {item.partition("=")[0]: str(Path(item.partition("=")[2]).resolve())
                                for item in args.arm_scores}}
    write_selection_manifest(manifest, staged / "continuation_manifest.json",
                             {arm: train_split.select(rows) for arm, rows in selections.items()},
                             selection)
    return {"arms": summarize_arms(selections, scores, num_tokens, num_supervised, arm_scores)}


METHOD_KEYS = ("score_mode", "score_normalization", "preconditioning_mode", "projection_dim",
               "loss_reduction", "damping_rule", "damping", "mixing_coefficient")


def check_scored_content(summary: dict, what: str, args, train_split, output_dir) -> None:
    """Scores read from an earlier run (--scores-from, --arm-scores) must be of this split's
    content, not only its row ids: a pool with the same ids and other completions (a corrupted
    twin) is refused by the train_fingerprint its summary.json records."""
    fingerprint = split_fingerprint(train_split)
    if summary.get("train_fingerprint") is None:
        raise PipelineError(f"{what}: its summary.json records no train_fingerprint (an older "
                            "script wrote it), so its content cannot be checked against split "
                            f"'{args.train_split}': score again into {output_dir}")
    if summary["train_fingerprint"] != fingerprint:
        raise PipelineError(f"{what} scored other content than split '{args.train_split}' of "
                            f"{args.manifest} (same row ids, train_fingerprint "
                            f"{summary['train_fingerprint']} vs {fingerprint}): score this "
                            f"split into {output_dir} instead")


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
    check_scored_content(source_summary, f"--scores-from {source}", args, train_split, output_dir)
    scores = np.array([np.nan if r["score"] is None else r["score"] for r in rows])
    num_tokens = np.array([r["num_tokens"] for r in rows])
    num_supervised = np.array([r["num_supervised_tokens"] for r in rows])
    method = {k: source_summary.get(k) for k in METHOD_KEYS}
    with staged_output(output_dir, SCRIPT) as staged:
        if args.arms:
            subsets = write_arms(args, manifest, train_split, scores, num_tokens, num_supervised,
                                 staged, {**method, "scores_from": str(source.resolve())})
        else:
            subsets = write_selection(args, manifest, train_split, scores, num_tokens,
                                      num_supervised, staged, output_dir,
                                      {**method, "scores_from": str(source.resolve())})
        summary = {**source_summary, "scores_from": str(source.resolve()), **subsets,
                   "length_diagnostics": length_diagnostics(scores, num_tokens, num_supervised,
                                                            train_split, args.subset_k),
                   "provenance": provenance(seed=args.seed, manifest=args.manifest)}
        write_json_atomic(staged / "summary.json", summary)
    if args.arms:
        print(f"drew {len(subsets['arms'])} arms of {args.subset_k} rows (seed {args.seed}) from "
              f"the scores in {source}: " + ", ".join(
                  f"{arm} {info['supervised_tokens']:,} tokens"
                  for arm, info in subsets["arms"].items()) + f"; wrote {output_dir}")
        return
    print(f"drew top-{args.subset_k} and a matched random {subsets['matched_random_k']['rows']} "
          f"rows (matched by {args.random_match}, seed {args.seed}) from the scores in {source}; "
          f"wrote {output_dir}")


# ---------------------------------------------------------------------------------------------


SCORE_FORMULAS = {
    ("none", "mean"): "< g_i , P mean_j q_j >",
    ("none", "nearest"): "max_j < g_i , P q_j >",
    ("seed", "mean"): "cos( g_i , P mean_j (q_j / ||q_j||) )",
    ("seed", "nearest"): "max_j cos( g_i , P q_j )",
    ("bergson", "mean"): "mean_j cos( R g_i , R q_j ), R = P^1/2",
    ("bergson", "nearest"): "max_j cos( R g_i , R q_j ), R = P^1/2",
}


def preconditioning_text(args) -> str:
    if args.preconditioning_mode == "none":
        return "none (P = I)"
    hessian = ("H = query gradient second moment per LoRA module" if
               args.preconditioning_mode == "query" else
               f"H = {args.mixing_coefficient} * H_query + {1 - args.mixing_coefficient:.6g} * "
               f"H_pool (second moments of the query and train gradients) per LoRA module")
    damping = ("d * mean|H_ab|" if args.damping_rule == "mean_abs_entry" else "d * mean(eig H)")
    return f"P = (H + lam * I)^-1, lam = {damping}, d = {args.damping}; {hessian}"


def summary_step(args, run: dict, train_split, query_split, tokens: dict, scores, info: dict,
                 stage_seconds: dict, started: float) -> dict:
    import numpy as np
    import torch

    n_finite = int(np.isfinite(scores).sum())
    train_tokens = int(tokens["bergson_lengths"].sum())
    train_seconds = stage_seconds.get("train_gradients", 0.0) + stage_seconds["scores"]
    stage_seconds["train_scoring"] = train_seconds  # the whole train stage: gradients + scores
    return {
        "manifest": str(Path(args.manifest).resolve()),
        "adapter_path": str(run["adapter_path"].resolve()), "base_model": run["base_model"],
        "train_split": args.train_split, "query_split": args.query_split,
        "train_fingerprint": split_fingerprint(train_split),
        "query_fingerprint": split_fingerprint(query_split),
        "score_mode": args.score_mode, "score_normalization": args.score_normalization,
        "score_formula": SCORE_FORMULAS[(args.score_normalization, args.score_mode)],
        "preconditioning_mode": args.preconditioning_mode,
        "preconditioning": preconditioning_text(args),
        "damping_rule": args.damping_rule, "damping": args.damping,
        "damping_used": info.get("damping_used"),
        "mixing_coefficient": args.mixing_coefficient,
        "n_pool_rows_in_hessian": info.get("n_pool_rows_in_hessian"),
        "projection_dim": args.projection_dim,
        "tokenization_mode": args.tokenization_mode, "alignment": tokens["alignment"],
        "loss_reduction": args.loss_reduction, "precision": run["precision"],
        "score_precision": "fp32", "token_batch_size": run["token_batch_size"],
        "max_length": args.max_length,
        "attention": "fused" if args.fused_attention else "math (forced)",
        "nproc": args.nproc, "device": run["device_type"],
        "gpu": torch.cuda.get_device_name() if run["device_type"] == "cuda" else None,
        "gradients_from": str(Path(args.gradients_from).resolve()) if args.gradients_from
        else None,
        "n_total": len(scores), "n_finite": n_finite, "finite_coverage": n_finite / len(scores),
        "n_under_2_tokens": info["n_under_2_tokens"],
        "n_no_supervised_tokens": info["n_no_supervised_tokens"],
        "n_truncated": tokens["n_truncated"],
        "n_query": len(query_split), "n_query_used": info["n_query_used"],
        "query_tokens": tokens["query_tokens"], "train_tokens": train_tokens,
        "score_stats": score_statistics(scores),
        "length_diagnostics": length_diagnostics(scores, tokens["num_tokens"],
                                                 tokens["num_supervised"], train_split,
                                                 args.subset_k),
        "stage_seconds": stage_seconds,
        "tokens_per_second": {
            "query_gradients": (tokens["query_tokens"] / stage_seconds["query_gradients"]
                                if stage_seconds.get("query_gradients") else None),
            "train_scoring": train_tokens / train_seconds},
        "total_seconds": time.time() - started,
        "bergson_version": provenance()["library_versions"].get("bergson"),
        "provenance": provenance(seed=args.seed, manifest=args.manifest),
    }


def check_score_matrix_size(args, n_query: int, n_train: int) -> None:
    """--write-score-matrix: refused before any work when the matrix would be too large."""
    if not args.write_score_matrix:
        return
    mib = n_query * n_train * 4 / 2**20
    if mib > args.score_matrix_max_mb:
        raise PipelineError(f"--write-score-matrix: {n_query} query rows ({args.query_split}) x "
                            f"{n_train} train rows ({args.train_split}) is {mib:,.0f} MiB of "
                            f"float32, over --score-matrix-max-mb {args.score_matrix_max_mb:g} "
                            f"(raise it to write it anyway)")


def write_score_matrix(staged: Path, matrix, query_split, train_split, summary: dict) -> dict:
    """score_matrix.npy (float32 [n_query, n_train], rows in the query split's order, columns in
    the train split's) and score_matrix.json beside it (the ids of both axes, the variant and
    the fingerprints, so a reader can check it scored the rows it thinks); returns the summary's
    score_matrix block."""
    import numpy as np

    np.save(staged / "score_matrix.npy", matrix)
    variant = {k: summary[k] for k in METHOD_KEYS}
    finite_queries = int(np.isfinite(matrix).any(axis=1).sum())
    block = {"file": "score_matrix.npy", "ids": "score_matrix.json", "shape": list(matrix.shape),
             "dtype": "float32", "n_query_scored": finite_queries,
             "mean_over_queries": "train_scores.jsonl score"}
    write_json_atomic(staged / "score_matrix.json", {
        **block, **variant, "score_formula": summary["score_formula"],
        "individual_score": INDIVIDUAL_FORMULAS[summary["score_normalization"]],
        "query_split": summary["query_split"], "train_split": summary["train_split"],
        "query_fingerprint": summary["query_fingerprint"],
        "train_fingerprint": summary["train_fingerprint"],
        "query_ids": list(query_split["row_id"]), "train_ids": list(train_split["row_id"]),
        "provenance": summary["provenance"]})
    return block


INDIVIDUAL_FORMULAS = {  # tau(j, i); mean_j tau(j, i) = the mean score (individual_query_rows)
    "none": "< g_i , P q_j >",
    "seed": "< g_i / ||g_i|| , P q_j / ||q_j|| > / ||P qbar||",
    "bergson": "cos( R g_i , R q_j ), R = P^1/2",
}


def publish_step(args, manifest, train_split, scores, tokens: dict, summary: dict,
                 hessians: dict | None, paths: dict, staged: Path, output_dir: Path) -> None:
    """Scores (and, unless --scores-only, the subsets and their manifest) into the staged
    folder; the gradient indices kept or removed (staged_output then renames it onto
    output_dir)."""
    if args.scores_only:
        write_train_scores(staged / "train_scores.jsonl", train_split["row_id"], scores,
                           tokens["num_tokens"], tokens["num_supervised"], None)
    else:
        summary.update(write_selection(args, manifest, train_split, scores, tokens["num_tokens"],
                                       tokens["num_supervised"], staged, output_dir,
                                       {k: summary[k] for k in METHOD_KEYS}))
    work = staged / "bergson"
    if args.keep_gradients and not args.gradients_from:
        if hessians:
            save_hessian(hessians, paths["query"], work / "hessian")
    else:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(staged / "work", ignore_errors=True)
    write_json_atomic(staged / "summary.json", summary)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    started = time.time()
    output_dir = prepare_output_dir(args)
    manifest = load_manifest(args.manifest)
    train_split = load_split(manifest, args.train_split)
    check_subset_k(args, train_split)
    if args.scores_from:
        redraw_subsets(args, manifest, train_split, output_dir)
        return
    query_split = load_split(manifest, args.query_split)
    check_score_matrix_size(args, len(query_split), len(train_split))
    run = run_settings(args)
    reused = reused_gradients(args, run, train_split, query_split) if args.gradients_from \
        else None

    with staged_output(output_dir, SCRIPT) as staged:
        stage_seconds = {}
        t0 = time.time()
        tokens = tokenize_step(args, run, train_split, query_split, staged / "bergson_data")
        stage_seconds["tokenize"] = time.time() - t0
        paths = reused or bergson_gradients_step(args, run, tokens, staged, stage_seconds)
        t0 = time.time()
        scores, info = scores_step(args, paths, tokens, len(train_split))
        stage_seconds["scores"] = time.time() - t0
        hessians = info.pop("hessians", None)
        matrix = info.pop("matrix", None)
        summary = summary_step(args, run, train_split, query_split, tokens, scores, info,
                               stage_seconds, started)
        if matrix is not None:
            summary["score_matrix"] = write_score_matrix(staged, matrix, query_split,
                                                         train_split, summary)
        publish_step(args, manifest, train_split, scores, tokens, summary, hessians, paths,
                     staged, output_dir)
    subsets = ("" if args.scores_only else
               f"; top-{args.subset_k} mean score {summary['top_k']['mean_score']:.4g} vs "
               f"random {summary['matched_random_k']['mean_score']:.4g}")
    print(f"scored {summary['n_finite']}/{summary['n_total']} rows "
          f"({args.score_normalization}, {args.score_mode}, {args.loss_reduction} loss) in "
          f"{time.time() - started:.1f}s ({summary['tokens_per_second']['train_scoring']:.0f} "
          f"train tokens/s){subsets}; wrote {output_dir}")


if __name__ == "__main__":
    from pipeline import run_main

    run_main(main)
