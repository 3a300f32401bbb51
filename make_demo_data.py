"""Write a small SmolTalk-shaped chat file of tasks with verifiable answers, for demo runs of the
pipeline (dataset.py --dataset-name <file> --group-column instruction_id) on a small model and CPU.

  make_demo_data.py --output runs/demo/data.jsonl.gz --rows 600 --seed 0 --wrong-fraction 0.1

Task families (`category`) and their operations (`task.family`):
  arithmetic       add, subtract, multiply
  sorting          sort_numbers, sort_words (ascending / alphabetical)
  string-edits     reverse_word, uppercase, count_letter
  unit-conversion  km_to_m, m_to_km, kg_to_g, g_to_kg, h_to_min, min_to_h

Each underlying question is asked in 2 or 3 paraphrased phrasings; the phrasings share an
`instruction_id`, so grouping by it keeps one question out of two splits. No question repeats
across instruction ids.

`difficulty` (very easy, easy, medium, hard, very hard = level 0..4) is drawn uniformly per
question and sets its size:
  add, subtract     both operands have level+1 digits (subtract: a >= b, the answer is >= 0)
  multiply          operand digits (1,1) (2,1) (2,2) (3,2) (3,3)
  sort_*            level+3 items (numbers: 1..99 at levels 0-1, 1..999 above; distinct)
  reverse_word, uppercase, count_letter
                    word length 3-4, 5-6, 7-8, 9-10, 11+ letters
  km/kg conversions the larger-unit value is a whole number 1-9, 10-99, then has 1, 2, 3 decimals
  h/min conversions hours are whole 1-9, whole 10-48, halves, quarters, tenths

Columns: `messages` ([user, assistant]; the assistant states the answer in a short sentence),
`category`, `difficulty`, `instruction_id`, `paraphrase` (index of the phrasing), `task`
(the structured question: family, its operands and the correct `answer` as a string; the
answer can be recomputed from the other fields), `answer_given` (the answer the assistant
states), `answer_correct`, `quality`, `reward_model_score`, `conversation_tokens`, `source`,
`generator`.

Planted wrong answers: exactly round(--wrong-fraction * --rows) rows, chosen with the seed, state
a wrong answer (a nearby number, two items swapped, one letter changed): `answer_correct` false,
`quality` "poor", `reward_model_score` 0.10 + N(0, 0.04) clipped to [0, 0.3]. Correct rows score
0.85 + N(0, 0.04) clipped to [0.6, 1], `quality` "excellent" at >= 0.85, else "good".
`conversation_tokens` is an approximation, round(1.3 x whitespace-separated words over both
turns), not a tokenizer count.

The output is byte-identical for the same arguments (sorted keys, gzip mtime 0) and is written to
a temp file and renamed into place.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import tempfile
from decimal import Decimal
from pathlib import Path

from pipeline import PipelineError, check_output_file, run_main, seed_type, temp_prefix

SCRIPT = "make_demo_data.py"

DIFFICULTIES = ["very easy", "easy", "medium", "hard", "very hard"]
SOURCE = "make_demo_data"
GENERATOR = "template-v1"
TOKENS_PER_WORD = 1.3
CORRECT_SCORE, WRONG_SCORE, SCORE_NOISE = 0.85, 0.10, 0.04

CATEGORIES = {
    "arithmetic": ["add", "subtract", "multiply"],
    "sorting": ["sort_numbers", "sort_words"],
    "string-edits": ["reverse_word", "uppercase", "count_letter"],
    "unit-conversion": ["km_to_m", "m_to_km", "kg_to_g", "g_to_kg", "h_to_min", "min_to_h"],
}
FAMILY_CATEGORY = {f: c for c, families in CATEGORIES.items() for f in families}
MULTIPLY_DIGITS = [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]
WORD_LENGTHS = [(3, 4), (5, 6), (7, 8), (9, 10), (11, 99)]
WORDS = sorted(set("""
cat dog sun map cup hat pen box red sky tree lamp fish milk rain door bird star frog coin
apple river stone cloud green table music paper plant horse bread chair water light
garden planet violet silver window orange yellow basket candle butter pocket rabbit
kitchen morning blanket diamond freedom teacher library picture weather balance harvest
mountain elephant sandwich painting shoulder umbrella birthday festival calendar question
adventure chocolate telescope butterfly crocodile pineapple newspaper waterfall dinosaur
strawberry blackboard basketball microscope lighthouse playground motorcycle restaurant
photograph celebration grandmother watermelon thunderstorm refrigerator independence
kindergarten encyclopedia hippopotamus construction temperature information
""".split()))
UNITS = {  # family: (large unit, small unit, factor, large->small?)
    "km_to_m": ("kilometers", "meters", 1000, True), "m_to_km": ("kilometers", "meters", 1000, False),
    "kg_to_g": ("kilograms", "grams", 1000, True), "g_to_kg": ("kilograms", "grams", 1000, False),
    "h_to_min": ("hours", "minutes", 60, True), "min_to_h": ("hours", "minutes", 60, False),
}

# question phrasings per family ({fields} from the task); at least 3 each
QUESTIONS = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
            "What do you get when you add {b} to {a}?"],
    "subtract": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
                 "How much is left if you take {b} away from {a}?"],
    "multiply": ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}.",
                 "What is the product of {a} and {b}?"],
    "sort_numbers": ["Sort these numbers from smallest to largest: {items}.",
                     "Put these numbers in ascending order: {items}.",
                     "Arrange {items} in increasing order."],
    "sort_words": ["Sort these words alphabetically: {items}.",
                   "Put these words in alphabetical order: {items}.",
                   "Arrange the words {items} from A to Z."],
    "reverse_word": ["Reverse the word \"{word}\".", "Write \"{word}\" backwards.",
                     "What is \"{word}\" spelled in reverse?"],
    "uppercase": ["Write \"{word}\" in uppercase letters.", "Convert \"{word}\" to all caps.",
                  "Change \"{word}\" to capital letters."],
    "count_letter": ["How many times does the letter \"{letter}\" appear in \"{word}\"?",
                     "Count the letter \"{letter}\" in the word \"{word}\".",
                     "In \"{word}\", how many \"{letter}\"s are there?"],
    "convert": ["Convert {value} {src} to {dst}.", "How many {dst} are in {value} {src}?",
                "What is {value} {src} in {dst}?", "Express {value} {src} in {dst}."],
}
# answer sentences per family ({answer} is the stated answer, right or wrong; {s} its plural
# ending, {spelled} the word's letters joined by dashes, {factor} the conversion factor)
ANSWERS = {
    "add": ["Adding the two numbers: {a} + {b} = {answer}. The sum is {answer}.",
            "To add {a} and {b}, add the ones, then the tens, carrying where needed. "
            "{a} plus {b} equals {answer}."],
    "subtract": ["Subtracting: {a} - {b} = {answer}. The difference is {answer}.",
                 "Take {b} away from {a}, borrowing where a digit is too small. "
                 "{a} minus {b} equals {answer}."],
    "multiply": ["Multiplying: {a} x {b} = {answer}. The product is {answer}.",
                 "To multiply {a} by {b}, multiply by each digit of {b} and add the partial "
                 "products. {a} times {b} equals {answer}."],
    "sort_numbers": ["Comparing the numbers and ordering them from smallest to largest gives: "
                     "{answer}.",
                     "Here are the numbers in ascending order: {answer}. Each number is no "
                     "larger than the one after it."],
    "sort_words": ["Comparing the words letter by letter, the alphabetical order is: {answer}.",
                   "Here are the words sorted from A to Z: {answer}."],
    "reverse_word": ["Reading the letters of \"{word}\" ({spelled}) from last to first gives "
                     "\"{answer}\".",
                     "Written backwards, \"{word}\" becomes \"{answer}\"."],
    "uppercase": ["Changing every letter of \"{word}\" to its capital form gives "
                  "\"{answer}\".",
                  "In uppercase letters, \"{word}\" is written \"{answer}\"."],
    "count_letter": ["Spelling it out: {spelled}. The letter \"{letter}\" appears {answer} "
                     "time{s} in \"{word}\".",
                     "Going through \"{word}\" one letter at a time, I count {answer} "
                     "\"{letter}\"{s}."],
    "convert": ["One {one_large} is {factor} {small}, so {value} {src} is {answer} {dst}.",
                "Since there are {factor} {small} in a {one_large}, the answer is {answer} {dst}."],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo/data.jsonl.gz",
                   help="output file, .jsonl or .jsonl.gz (default: %(default)s)")
    p.add_argument("--rows", type=int, default=600, help="rows to write (default: %(default)s)")
    p.add_argument("--seed", type=seed_type, default=0, help="generation seed (default: %(default)s)")
    p.add_argument("--wrong-fraction", type=float, default=0.1,
                   help="fraction of rows whose assistant answer is planted wrong "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the tasks: draw the operands, and compute the answer from them (solve() is what tests check)


def fmt_decimal(value: Decimal) -> str:
    """A plain decimal without trailing zeros or exponent: 1500, 2.5, 0.125."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def solve(task: dict) -> str:
    """The correct answer of a task, as the string the assistant should state."""
    family = task["family"]
    if family == "add":
        return str(task["a"] + task["b"])
    if family == "subtract":
        return str(task["a"] - task["b"])
    if family == "multiply":
        return str(task["a"] * task["b"])
    if family == "sort_numbers":
        return ", ".join(str(x) for x in sorted(task["items"]))
    if family == "sort_words":
        return ", ".join(sorted(task["items"]))
    if family == "reverse_word":
        return task["word"][::-1]
    if family == "uppercase":
        return task["word"].upper()
    if family == "count_letter":
        return str(task["word"].count(task["letter"]))
    if family in UNITS:
        _, _, factor, to_small = UNITS[family]
        value = Decimal(task["value"])
        return fmt_decimal(value * factor if to_small else value / factor)
    raise ValueError(f"unknown task family {family}")


def digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 1, 10 ** n - 1)


def pick_word(rng: random.Random, level: int) -> str:
    low, high = WORD_LENGTHS[level]
    return rng.choice([w for w in WORDS if low <= len(w) <= high])


def large_unit_value(rng: random.Random, level: int, factor: int) -> Decimal:
    if factor == 60:  # hours: whole, whole, halves, quarters, tenths
        whole = rng.randint(1, 9) if level == 0 else rng.randint(10, 48) if level == 1 else \
            rng.randint(0, 9)
        fraction = {0: [0], 1: [0], 2: [5], 3: [25, 75], 4: [1, 2, 3, 4, 6, 7, 8, 9]}[level]
        step = rng.choice(fraction)
        return Decimal(whole) + (Decimal(step) / (100 if step in (25, 75) else 10))
    if level == 0:
        return Decimal(rng.randint(1, 9))
    if level == 1:
        return Decimal(rng.randint(10, 99))
    places = level - 1
    while True:  # 1, 2 or 3 decimals, the last one non-zero
        value = Decimal(rng.randint(1, 10 ** places * 20 - 1)) / (10 ** places)
        if format(value, "f")[-1] != "0":
            return value


def make_task(rng: random.Random, family: str, level: int) -> dict:
    task: dict = {"family": family}
    if family in ("add", "subtract"):
        a, b = digits(rng, level + 1), digits(rng, level + 1)
        if family == "subtract" and a < b:
            a, b = b, a
        task.update(a=a, b=b)
    elif family == "multiply":
        da, db = MULTIPLY_DIGITS[level]
        task.update(a=digits(rng, da), b=digits(rng, db))
    elif family == "sort_numbers":
        task["items"] = rng.sample(range(1, 100 if level < 2 else 1000), level + 3)
    elif family == "sort_words":
        task["items"] = rng.sample(WORDS, level + 3)
    elif family in ("reverse_word", "uppercase"):
        task["word"] = pick_word(rng, level)
    elif family == "count_letter":
        word = pick_word(rng, level)
        task.update(word=word, letter=rng.choice(sorted(set(word))))
    else:
        large, small, factor, to_small = UNITS[family]
        value = large_unit_value(rng, level, factor)
        if not to_small:
            value = value * factor
        task.update(value=fmt_decimal(value), src=large if to_small else small,
                    dst=small if to_small else large)
    task["answer"] = solve(task)
    return task


def wrong_answer(rng: random.Random, task: dict) -> str:
    """A plausible but wrong answer: a nearby number, two items swapped, one letter changed."""
    family, right = task["family"], task["answer"]
    if family in ("sort_numbers", "sort_words"):
        items = right.split(", ")
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
        return ", ".join(items)
    if family in ("reverse_word", "uppercase"):
        chars = list(right)
        if family == "reverse_word" and task["word"] != right:
            return task["word"]  # not reversed at all
        i = rng.randrange(len(chars))
        chars[i] = chars[i].lower() if family == "uppercase" else \
            rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != chars[i]])
        return "".join(chars)
    value = Decimal(right)
    if family in UNITS:  # a slip of the factor, or off by one unit
        options = [value * 10, value / 10, value + 1, value - 1 if value > 1 else value + 2]
        return fmt_decimal(rng.choice(options))
    offset = rng.choice([1, 2, 10]) if value > 10 else 1
    return fmt_decimal(value - offset if value - offset >= 0 and rng.random() < 0.5
                       else value + offset)


# ---------------------------------------------------------------------------------------------


def question_key(task: dict) -> str:
    return json.dumps({k: v for k, v in task.items() if k != "answer"}, sort_keys=True)


def fields(task: dict, given: str | None = None) -> dict:
    """The template fields of a task (and of the stated answer, when given)."""
    out = dict(task)
    if "items" in task:
        out["items"] = ", ".join(str(x) for x in task["items"])
    if "word" in task:
        out["spelled"] = "-".join(task["word"])
    if task["family"] in UNITS:
        large, small, factor, _ = UNITS[task["family"]]
        out.update(one_large=large.rstrip("s"), small=small, factor=factor)
    if given is not None:
        out.update(answer=given, s="" if given == "1" else "s")
    return out


def make_groups(rng: random.Random, rows: int) -> list[dict]:
    """Questions with their phrasings until `rows` phrasings exist (the last group may be cut)."""
    groups, seen, total = [], set(), 0
    while total < rows:
        category = rng.choice(sorted(CATEGORIES))
        family = rng.choice(CATEGORIES[category])
        level = rng.randrange(len(DIFFICULTIES))
        task = make_task(rng, family, level)
        key = question_key(task)
        if key in seen:
            continue
        seen.add(key)
        templates = QUESTIONS["convert" if family in UNITS else family]
        count = min(rng.choice([2, 3]), rows - total)
        groups.append({"category": category, "level": level, "task": task,
                       "phrasings": rng.sample(range(len(templates)), count)})
        total += count
    return groups


def build_rows(rows: int, seed: int, wrong_fraction: float) -> list[dict]:
    rng = random.Random(seed)
    groups = make_groups(rng, rows)
    n_wrong = round(wrong_fraction * rows)
    wrong = set(rng.sample(range(rows), n_wrong))
    out = []
    for group_id, group in enumerate(groups):
        task = group["task"]
        family = task["family"]
        key = "convert" if family in UNITS else family
        for phrasing in group["phrasings"]:
            index = len(out)
            is_wrong = index in wrong
            given = wrong_answer(rng, task) if is_wrong else task["answer"]
            assert (given == task["answer"]) != is_wrong
            question = QUESTIONS[key][phrasing].format(**fields(task))
            answer = rng.choice(ANSWERS[key]).format(**fields(task, given))
            messages = [{"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]
            noise = rng.gauss(0.0, SCORE_NOISE)
            if is_wrong:
                score = min(0.3, max(0.0, WRONG_SCORE + noise))
                quality = "poor"
            else:
                score = min(1.0, max(0.6, CORRECT_SCORE + noise))
                quality = "excellent" if score >= CORRECT_SCORE else "good"
            words = sum(len(m["content"].split()) for m in messages)
            out.append({
                "messages": messages,
                "category": group["category"],
                "difficulty": DIFFICULTIES[group["level"]],
                "instruction_id": group_id,
                "paraphrase": phrasing,
                "task": task,
                "answer_given": given,
                "answer_correct": not is_wrong,
                "quality": quality,
                "reward_model_score": round(score, 4),
                "conversation_tokens": round(TOKENS_PER_WORD * words),
                "source": SOURCE,
                "generator": GENERATOR,
            })
    assert len(out) == rows
    return out


def write_rows_atomic(path: Path, rows: list[dict]) -> None:
    """One sorted-keys JSON object a line; gzip with mtime 0 and no file name for .gz, so the
    bytes depend on the rows only. Written to a temp file, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                    gz.write(data)
            else:
                f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output)
    if not output.name.endswith((".jsonl", ".jsonl.gz")):
        raise PipelineError(f"--output {output} must end in .jsonl or .jsonl.gz")
    if args.rows < 2:
        raise PipelineError(f"--rows must be at least 2, got {args.rows}")
    if not 0.0 <= args.wrong_fraction <= 1.0:
        raise PipelineError(f"--wrong-fraction must be between 0 and 1, got {args.wrong_fraction}")
    check_output_file(output, SCRIPT, "--output", overwrite=args.overwrite)
    rows = build_rows(args.rows, args.seed, args.wrong_fraction)
    write_rows_atomic(output, rows)
    wrong = sum(not r["answer_correct"] for r in rows)
    groups = len({r["instruction_id"] for r in rows})
    tokens = sorted(r["conversation_tokens"] for r in rows)
    print(f"wrote {output} ({len(rows)} rows, {groups} instruction ids, {wrong} planted wrong "
          f"answers, conversation_tokens median {tokens[len(tokens) // 2]}, max {tokens[-1]})")


if __name__ == "__main__":
    run_main(main)
