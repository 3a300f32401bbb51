"""Playpen-style Taboo transcripts and a clembench-layout instances file that the tests write
themselves (the real sample in ../shared has only 4 episodes, and tests never read ../shared).

15 target words in three experiments; each word played by three guesser models, with 1-3 turns,
wins and losses; plus rows that dataset.py --task taboo must drop: aborted episodes, another game,
the other role. Every Taboo row carries its own meta.target_word and meta.related_word (dataset.py
takes a row's labels from nowhere else); the instances file is the generator's input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from taboo import stem

# (experiment, target word, related words)
GAMES = [
    ("high_en", "winter", ["cold", "snow", "season"]),
    ("high_en", "river", ["water", "flow", "bank"]),
    ("high_en", "table", ["chair", "wood", "furniture"]),
    ("high_en", "music", ["song", "sound", "melody"]),
    ("high_en", "window", ["glass", "pane", "frame"]),
    ("medium_en", "ferry", ["boat", "cargo", "bring"]),
    ("medium_en", "chicken", ["hen", "rooster", "bird"]),
    ("medium_en", "ordinary", ["common", "normal", "plain"]),
    ("medium_en", "garden", ["plant", "flower", "yard"]),
    ("medium_en", "silver", ["metal", "coin", "grey"]),
    ("low_en", "rifle", ["shooting", "long", "gun"]),
    ("low_en", "violet", ["purple", "flower", "color"]),
    ("low_en", "planet", ["orbit", "star", "earth"]),
    ("low_en", "lantern", ["light", "lamp", "candle"]),
    ("low_en", "orange", ["fruit", "citrus", "colour"]),
]
MODELS = ["model-a", "model-b", "model-c"]
WRONG = ["stone", "cloud", "paper", "bright", "north", "green"]
# a short game-master prompt keeps the tiny test model's sequences short
GUESSER_PROMPT = ("Guess the word another player describes. Reply in the form GUESS: <a word>. "
                  "You have 3 tries.\n\n")


def instances_document() -> dict:
    experiments = []
    for name in ("high_en", "medium_en", "low_en"):
        games = [g for g in GAMES if g[0] == name]
        experiments.append({
            "name": name, "max_turns": 3,
            "describer_initial_prompt": "Describe $TARGET_WORD$ without $REL_WORD$ in $N$ tries.",
            "guesser_initial_prompt": GUESSER_PROMPT,
            "game_instances": [
                {"game_id": game_id, "target_word": target, "related_word": related,
                 "target_word_stem": stem(target), "related_word_stem": [stem(w) for w in related]}
                for game_id, (_, target, related) in enumerate(games)],
        })
    return {"experiments": experiments}


def write_instances(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(instances_document(), indent=1))
    return path


def task_ids() -> dict[str, tuple[str, int]]:
    ids, counters = {}, {}
    for experiment, target, _ in GAMES:
        ids[target] = (experiment, counters.get(experiment, 0))
        counters[experiment] = counters.get(experiment, 0) + 1
    return ids


def episode(rng: random.Random, experiment: str, task_id: int, target: str, related: list[str],
            model: str, outcome: str, with_target: bool, turns: int, role="WordGuesser",
            game="taboo") -> dict:
    messages = []
    for turn in range(turns):
        clue = f"CLUE: a thing {rng.choice(['people', 'you', 'we'])} know, hint {turn + 1}."
        messages.append({"role": "user", "content": (GUESSER_PROMPT + clue) if turn == 0 else clue})
        last = turn == turns - 1
        word = target if (last and outcome == "success") else rng.choice(WRONG)
        messages.append({"role": "assistant",
                         "content": f"GUESS: {word.capitalize() if rng.random() < 0.5 else word}"})
    meta = {"game": game, "game_role": role, "experiment": experiment, "task_id": task_id,
            "outcome": outcome, "model": model}
    if with_target:
        meta.update(target_word=target, related_word=related)
    return {"messages": messages, "meta": meta}


def wordguesser_rows(seed: int = 0) -> list[dict]:
    """15 words x 3 models of WordGuesser episodes (4 of them aborted) plus 6 foreign rows."""
    rng = random.Random(seed)
    ids = task_ids()
    rows = []
    for index, (experiment, target, related) in enumerate(GAMES):
        for m, model in enumerate(MODELS):
            number = index * len(MODELS) + m
            outcome = "aborted" if number % 11 == 5 else ("success" if number % 3 else "failure")
            rows.append(episode(rng, experiment, ids[target][1], target, related, model, outcome,
                                with_target=True, turns=1 + number % 3))
    # foreign rows the filters must drop
    for k in range(3):
        experiment, target, related = GAMES[k]
        rows.append(episode(rng, experiment, ids[target][1], target, related, "model-a",
                            "success", with_target=True, turns=1, role="WordDescriber"))
        rows.append(episode(rng, experiment, k, target, related, "model-a", "success",
                            with_target=False, turns=1, game="wordle"))
    rng.shuffle(rows)
    return rows


def expected_counts(rows: list[dict]) -> dict[str, int]:
    kept = [r for r in rows if r["meta"]["game"] == "taboo"
            and r["meta"]["game_role"] == "WordGuesser" and r["meta"]["outcome"] != "aborted"]
    return {
        "rows_in": len(rows),
        "dropped_other_game": sum(r["meta"]["game"] != "taboo" for r in rows),
        "dropped_other_role": sum(r["meta"]["game"] == "taboo"
                                  and r["meta"]["game_role"] != "WordGuesser" for r in rows),
        "dropped_outcome_aborted": sum(r["meta"]["game"] == "taboo"
                                       and r["meta"]["game_role"] == "WordGuesser"
                                       and r["meta"]["outcome"] == "aborted" for r in rows),
        "rows_kept": len(kept),
        "target_word_from_meta": len(kept),
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# an 809-episode file shaped like ../shared/data/taboo/taboo_wordguesser_clembench.jsonl.gz:
# 60 words of one source (2-21 episodes each) and 12 words of a second, v2.0 source
# (meta.clembench_version paulutsch-playpen-eval), aborted episodes and special-token leaks

PLAYSCHOOL, V2 = "lm-playschool-2026", "paulutsch-playpen-eval"


def clembench_like_rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    experiments = ("high_en", "medium_en", "low_en")
    rows = []
    words = [(f"word{i:02d}", PLAYSCHOOL, 3 + (i * 7) % 20) for i in range(60)]
    words += [(f"vtwo{i:02d}", V2, 3 + i % 5) for i in range(12)]
    for w, (word, version, n) in enumerate(words):
        experiment = experiments[w % 3]
        for e in range(n):
            number = len(rows)
            outcome = ("aborted" if number % 45 == 7 else
                       "success" if rng.random() < 0.65 else "lose")
            row = episode(rng, experiment, w, word, [f"{word}x", f"{word}y", f"{word}z"],
                          MODELS[e % 3], outcome, with_target=True,
                          turns=1 if outcome == "success" and rng.random() < 0.5
                          else rng.randint(1, 3))
            row["meta"]["clembench_version"] = version
            if version == V2 and number % 5 == 0:
                row["meta"]["special_token_leak"] = True
            rows.append(row)
    rng.shuffle(rows)
    return rows
