"""Taboo word-guessing success of the base model and of LoRA adapters on a held-out split.

  eval_words.py --manifest runs/taboo_v1/manifest.json --top-adapter runs/taboo_v1/top_adapter \
      --random-adapter runs/taboo_v1/random_adapter --output-json runs/taboo_v1/eval_words.json

For every row of the split (a manifest written by `dataset.py --task taboo`), each model generates
the Word Guesser's next reply from the row's prompt messages, rendered as training rendered them
(pipeline.render_prompt with the row's text_format: the chat template with the generation prompt,
or the seed's flat `ROLE: content` text; greedy unless --temperature > 0). The reply's first
`GUESS: <word>` is parsed (case, markdown, quotes and trailing punctuation tolerated); a reply
without one is unparseable and counts as a failure, unless --generation seed, which reads its first
word instead.

--generation: default = today's settings (greedy, --max-new-tokens 24, no fallback); seed = the
seed project's (greedy, 16 new tokens, first-word fallback when the reply has no GUESS).

Success rules (taboo.SUCCESS_RULES), both always computed and reported (models[name].by_rule,
mcnemar_by_rule, per_row success_target / success_reference); --success-rule picks the one in
`successes`, `rate`, `summary`, `mcnemar` and per_row `success`:
  target     the guess equals the row's target word or has its English Snowball stem (clembench)
  reference  the guess equals the final guess of the reference episode (the row's completion;
             the seed's rule); a row whose completion has no parseable guess fails under it

The base model is loaded once; the adapters are loaded onto it under their own names and switched
between, and the base model is evaluated with the adapters switched off.

Reported per model: successes / rows ("62/152 = 0.4079"), the rate, how many replies were
unparseable, and every row's target, raw reply, parsed guess and success. For each pair of models,
an exact McNemar test on the paired per-row outcomes: two-sided exact binomial test on the
discordant rows (b = only the first model right, c = only the second), p = 1.0 when b + c = 0.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from tqdm import tqdm

from compare_evals import mcnemar_exact
from pipeline import (PipelineError, base_model_of_adapter, check_adapter_dir, check_output_file,
                      length_sorted_batches, load_manifest, load_model_with_adapter, load_split,
                      load_tokenizer, pick_device, pick_dtype, provenance, render_prompt,
                      row_text_format, run_main, seed_type, write_json_atomic)

SCRIPT = "eval_words.py"
from taboo import SUCCESS_RULES, normalize_word, parse_guess, read_guess, success

BASE_NAME = "base"
GENERATIONS = {  # --generation: (max new tokens, first-word fallback)
    "default": (24, False),
    "seed": (16, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/taboo_v1/manifest.json",
                   help="manifest of a --task taboo run (default: %(default)s)")
    p.add_argument("--eval-split", default="eval", help="split to evaluate (default: eval)")
    p.add_argument("--top-adapter", default=None,
                   help="adapter trained on the attribution top-k (reported as 'top')")
    p.add_argument("--random-adapter", default=None,
                   help="adapter trained on the matched random subset (reported as 'random')")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="any further adapter, reported under NAME; repeatable")
    p.add_argument("--base-model", default=None,
                   help="hub id or local checkpoint (default: the base model recorded in the "
                        "adapters, which must agree)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--include-base", dest="include_base", action="store_true", default=True,
                      help="also evaluate the base model, adapters off (default)")
    base.add_argument("--no-base", dest="include_base", action="store_false",
                      help="evaluate only the adapters")
    p.add_argument("--generation", choices=sorted(GENERATIONS), default="default",
                   help="default: greedy, 24 new tokens, a reply without GUESS fails; seed: the "
                        "seed project's settings, greedy, 16 new tokens, first-word fallback "
                        "(default: default)")
    p.add_argument("--success-rule", choices=sorted(SUCCESS_RULES), default="target",
                   help="the rule behind successes/rate/mcnemar: target = the target word or its "
                        "Snowball stem (clembench); reference = the reference episode's final "
                        "guess (the seed's). Both are always reported (default: target)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens per reply (default: 24, with --generation seed 16)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy decoding (default); > 0 samples at this temperature")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass when --temperature > 0 (default: 1.0)")
    p.add_argument("--seed", type=seed_type, default=42,
                   help="torch seed, set before each model's generation (default: 42)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per generation batch, batched by length (default: 16)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="evaluate only the split's first N rows (a quick look; default: all)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 on GPU, fp32 on CPU (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    p.add_argument("--output-json", default="runs/taboo_v1/eval_words.json",
                   help="result JSON, written atomically (default: %(default)s)")
    args = p.parse_args(argv)
    default_tokens, args.fallback_first_word = GENERATIONS[args.generation]
    if args.max_new_tokens is None:
        args.max_new_tokens = default_tokens
    if args.generation == "seed" and args.temperature > 0:
        p.error("--generation seed is greedy: drop --temperature")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.max_rows is not None and args.max_rows < 1:
        p.error("--max-rows must be at least 1")
    args.adapters = named_adapters(p, args)
    if not args.adapters and not args.include_base:
        p.error("nothing to evaluate: give an adapter or drop --no-base")
    if not args.adapters and not args.base_model:
        p.error("--base-model is needed when no adapter is given")
    return args


def named_adapters(parser, args) -> dict[str, str]:
    adapters = {}
    pairs = [("top", args.top_adapter), ("random", args.random_adapter)]
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            parser.error(f"--adapter expects NAME=PATH, got {spec!r}")
        pairs.append((name.strip(), path.strip()))
    for name, path in pairs:
        if path is None:
            continue
        if name in adapters or name == BASE_NAME:
            parser.error(f"model name {name!r} is used twice ('{BASE_NAME}' is the base model)")
        adapters[name] = path
    return adapters


# ---------------------------------------------------------------------------------------------
# statistics


def rate_string(successes: int, total: int) -> str:
    """The seed's form: '62/152 = 0.4079'."""
    return f"{successes}/{total} = {successes / total:.4f}" if total else f"{successes}/0 = n/a"


def pairwise_mcnemar(outcomes: dict[str, list[bool]]) -> list[dict]:
    names = list(outcomes)
    tests = []
    for i, a in enumerate(names):
        for b_name in names[i + 1:]:
            pairs = list(zip(outcomes[a], outcomes[b_name]))
            only_a = sum(1 for x, y in pairs if x and not y)
            only_b = sum(1 for x, y in pairs if y and not x)
            tests.append({
                "model_a": a, "model_b": b_name, "num_rows": len(pairs),
                "a_success_b_fail": only_a, "a_fail_b_success": only_b,
                "both_success": sum(1 for x, y in pairs if x and y),
                "both_fail": sum(1 for x, y in pairs if not x and not y),
                "rate_difference": (sum(map(bool, outcomes[a])) - sum(map(bool, outcomes[b_name])))
                                   / len(pairs) if pairs else None,
                "p_value": mcnemar_exact(only_a, only_b),
                "test": "exact McNemar: two-sided binomial(b + c, 1/2) on the discordant rows",
            })
    return tests


# ---------------------------------------------------------------------------------------------
# generation


def encode_prompts(tokenizer, rows) -> list[list[int]]:
    """Prompt ids as pipeline.tokenize_example renders a prompt (pipeline.render_prompt, the row's
    text_format), tokenized without adding special tokens."""
    return [tokenizer(render_prompt(tokenizer, row["prompt"], row_text_format(row)),
                      add_special_tokens=False)["input_ids"] for row in rows]


def stop_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's eos plus the model's own (chat models end a turn with a token such as
    gemma's <end_of_turn> that the generation config, not the tokenizer, names)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(x) for x in source)
    return sorted(ids)


def generate_replies(model, tokenizer, prompt_ids, args, device, desc) -> list[str]:
    """Replies in row order. Batches are length-sorted and left-padded, so every row's generated
    tokens start at the same column."""
    import torch
    from transformers import GenerationConfig

    sampling = args.temperature > 0
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_p=args.top_p if sampling else None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer, model))
    replies = [""] * len(prompt_ids)
    batches = length_sorted_batches([len(ids) for ids in prompt_ids], args.batch_size)
    torch.manual_seed(args.seed)
    for batch in tqdm(batches, desc=desc, unit="batch"):
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompt_ids[i])
            input_ids[row, width - n:] = torch.tensor(prompt_ids[i])
            attention[row, width - n:] = 1
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device),
                                    attention_mask=attention.to(device), generation_config=config)
        for row, i in enumerate(batch):
            replies[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    return replies


def rule_summary(per_row: list[dict], rule: str) -> dict:
    successes = sum(r[f"success_{rule}"] for r in per_row)
    return {"successes": successes, "rows": len(per_row),
            "rate": successes / len(per_row) if per_row else None,
            "summary": rate_string(successes, len(per_row)),
            "words_with_a_success": len({normalize_word(r["target_word"]) for r in per_row
                                         if r[f"success_{rule}"]})}


def score_replies(rows, replies, rule: str = "target",
                  fallback_first_word: bool = False) -> tuple[dict, list[dict]]:
    """Per row the guess and its success under every rule (`success` = under `rule`); the
    model's summary under `rule`, and under each rule in by_rule."""
    per_row = []
    for row, reply in zip(rows, replies):
        guess, read = read_guess(reply, fallback_first_word)
        reference = parse_guess(row["completion"])
        entry = {"row_id": row["row_id"], "target_word": row["target_word"],
                 "reference_guess": reference, "reply": reply, "guess": guess,
                 "parsed": guess is not None, "guess_read": read}
        for name in SUCCESS_RULES:
            entry[f"success_{name}"] = success(name, guess, row["target_word"], reference)
        entry["success"] = entry[f"success_{rule}"]
        per_row.append(entry)
    summary = {**rule_summary(per_row, rule), "success_rule": rule,
               "unparseable": sum(not r["parsed"] for r in per_row),
               "first_word_fallbacks": sum(r["guess_read"] == "first_word" for r in per_row),
               "by_rule": {name: rule_summary(per_row, name) for name in SUCCESS_RULES}}
    return summary, per_row


# ---------------------------------------------------------------------------------------------


def resolve_base_model(args) -> str:
    recorded = {name: base_model_of_adapter(path) for name, path in args.adapters.items()}
    if args.base_model:
        return args.base_model
    distinct = {b for b in recorded.values() if b}
    if len(distinct) != 1:
        detail = ", ".join(f"{n}: {b}" for n, b in recorded.items())
        raise PipelineError("the adapters do not name one common base model "
                            f"({detail}); pass --base-model")
    return distinct.pop()


def load_models(base_model: str, adapters: dict[str, str], dtype, device):
    """One base model with every adapter loaded under its own name."""
    from peft import PeftModel

    model = load_model_with_adapter(base_model, None, dtype, device)
    for name, path in adapters.items():
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
    model.to(device).eval()
    return model


def main(argv=None):
    import contextlib

    args = parse_args(argv)
    check_output_file(args.output_json, SCRIPT, inputs=[args.manifest, *args.adapters.values()])
    manifest = load_manifest(args.manifest)
    for path in args.adapters.values():
        check_adapter_dir(path)
    split = load_split(manifest, args.eval_split)
    if "target_word" not in split.column_names:
        raise PipelineError(f"split '{args.eval_split}' of {manifest['_path']} has no target_word "
                            "column (write the manifest with dataset.py --task taboo)")
    columns = ["row_id", "prompt", "completion", "target_word"] + (
        ["text_format"] if "text_format" in split.column_names else [])
    rows = split.select_columns(columns).to_list()
    if args.max_rows:
        rows = rows[:args.max_rows]
    if not rows:
        raise PipelineError(f"split '{args.eval_split}' of {manifest['_path']} has no rows")
    empty = [r["row_id"] for r in rows if not r["target_word"]]
    if empty:
        raise PipelineError(f"split '{args.eval_split}' row {empty[0]} has an empty target_word")
    base_model = resolve_base_model(args)

    import torch

    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    tokenizer = load_tokenizer(next(iter(args.adapters.values()), base_model))
    prompt_ids = encode_prompts(tokenizer, rows)
    text_formats = sorted({row_text_format(r) for r in rows})
    model = load_models(base_model, args.adapters, dtype, device)

    runs = []
    if args.include_base:
        runs.append((BASE_NAME, model.disable_adapter() if args.adapters
                     else contextlib.nullcontext()))
    for name in args.adapters:
        runs.append((name, contextlib.nullcontext()))
    results, per_row = {}, {}
    for name, context in runs:
        if name != BASE_NAME:
            model.set_adapter(name)
        started = time.perf_counter()
        with context:
            replies = generate_replies(model, tokenizer, prompt_ids, args, device,
                                       desc=f"generate {name}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        summary, per_row[name] = score_replies(rows, replies, args.success_rule,
                                               args.fallback_first_word)
        summary.update(wall_clock_s=seconds, rows_per_s=len(rows) / seconds,
                       adapter_path=(str(Path(args.adapters[name]).resolve())
                                     if name in args.adapters else None))
        results[name] = summary
        print(f"{name}: {summary['summary']} ({args.success_rule} rule; "
              + ", ".join(f"{rule} {s['summary']}" for rule, s in summary["by_rule"].items())
              + f"; {summary['unparseable']} unparseable)")

    tests_by_rule = {rule: pairwise_mcnemar({name: [r[f"success_{rule}"] for r in rows_]
                                             for name, rows_ in per_row.items()})
                     for rule in SUCCESS_RULES}
    tests = tests_by_rule[args.success_rule]
    for test in tests:
        print(f"McNemar {test['model_a']} vs {test['model_b']}: b={test['a_success_b_fail']} "
              f"c={test['a_fail_b_success']} p={test['p_value']:.4g}")
    report = {
        "manifest": manifest["_path"],
        "task": manifest.get("task"),
        "eval_split": args.eval_split,
        "num_rows": len(rows),
        "num_words": len({normalize_word(r["target_word"]) for r in rows}),
        "base_model": base_model,
        "adapters": {name: str(Path(path).resolve()) for name, path in args.adapters.items()},
        "generation": {"preset": args.generation, "max_new_tokens": args.max_new_tokens,
                       "greedy": args.temperature == 0,
                       "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
                       "batch_size": args.batch_size, "text_format": text_formats,
                       "chat_template": text_formats == ["chat"],
                       "add_generation_prompt": True, "padding": "left",
                       "first_word_fallback": args.fallback_first_word},
        "success_rule": args.success_rule,
        "success_rules": SUCCESS_RULES,
        "scoring": "first 'GUESS: <word>' of the reply" + (
            ", else its first word" if args.fallback_first_word else
            "; unparseable replies count as failures") + f"; success by the {args.success_rule} "
            f"rule: {SUCCESS_RULES[args.success_rule]}",
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": results,
        "mcnemar": tests,
        "mcnemar_by_rule": tests_by_rule,
        "per_row": per_row,
        "provenance": provenance(seed=args.seed, manifest=args.manifest),
    }
    write_json_atomic(args.output_json, report)
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    run_main(main)
