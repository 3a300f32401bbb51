"""Play new Taboo games between a Describer model and Guesser models behind an OpenAI-compatible
chat-completions API (OpenRouter by default) and write training-ready Word Guesser rows.

  export OPENROUTER_API_KEY=...        # or put OPENROUTER_API_KEY=... in ./.env
  generate_synthetic_openrouter.py --output-dir runs/taboo_synth \
      --describer-model openai/gpt-4o-mini \
      --guesser-models meta-llama/llama-3.1-8b-instruct qwen/qwen-2.5-7b-instruct \
      --games-per-guesser 60 --seed 42

A game: the Describer gets the target word and its related (taboo) words and gives a clue; the
Guesser answers `GUESS: <word>`; after a wrong guess the Describer sees it and clues again, for up
to --max-turns guesses. The game is won when a guess equals the target or shares its English
Snowball stem (clembench's rule). Prompts are the clembench templates from --templates-dir
(a built-in copy is used when the files are not there). Targets and related words come from the
clembench instances file (--instances) or a --word-list.

Every clue is checked before the Guesser sees it: no target or related word, no word with the
same stem, no derivational variant (wintery, winterize), on word boundaries, case-insensitively.
A clue that breaks the rules, or an empty one, is sent back to the Describer with the reason, at
most --describer-repairs times; a Guesser reply without a usable guess (empty, or the prompt's
placeholder echoed) likewise, at most --guesser-repairs times. A game whose repairs run out is
recorded as aborted, with the reason.

HTTP errors, timeouts and 429 rate limits are retried --max-retries times with exponential
backoff (--backoff-base * 2^attempt, or the server's Retry-After); a game whose requests still
fail is recorded as aborted with the error and the run goes on. A rejected key (401/403) stops the
run, since every later request would fail the same way, and so does a redirect (3xx): it is never
followed, to another host or the same one, so the request and the key in it go to --api-base and
nowhere else; the error names where the redirect pointed, for a corrected --api-base.

Outputs in --output-dir:
  games.jsonl             one record per finished game (both conversations, every raw reply,
                          repairs, errors), appended and fsynced game by game
  rows_wordguesser.jsonl  the Guesser's side of every game with at least one guess, in the
                          playpen format `dataset.py --task taboo` reads: messages + meta (game,
                          game_role, experiment, task_id, outcome, model, target_word,
                          related_word, ...)
  summary.json            success rate, mean turns (over games with at least one guess),
                          repairs, failures, retries, per guesser, provenance
  config.json             the settings a resumed run must share
  hf_dataset/             with --save-hf-dataset: rows_wordguesser as a datasets folder
rows_wordguesser.jsonl and summary.json are rewritten atomically from games.jsonl every
--checkpoint-every games and at the end.

Games are keyed by (guesser model, game index); game i of every guesser plays the i-th instance of
a seeded shuffle. A killed run restarted with the same arguments drops a torn last line of
games.jsonl and plays only the games it lacks: none lost, none twice.

The API key is read from the environment (--api-key-env, default OPENROUTER_API_KEY) or from a
.env file in the working directory; it is never written to any output or log: every error text
and every game record has the key, and any piece of 6 or more of its characters, replaced by ***
before it is cut to length or written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from pipeline import (OUTPUT_STAMP, PipelineError, check_output_dir, provenance, publish_dir,
                      run_main, seed_type, stamp_output, staging_dir, write_json_atomic,
                      write_jsonl_atomic)
from taboo import DEFAULT_INSTANCES, clue_violations, load_instances, parse_guess, same_word

SCRIPT = "generate_synthetic_openrouter.py"

DEFAULT_API_BASE = "https://openrouter.ai/api/v1"
DEFAULT_TEMPLATES_DIR = "../shared/data/taboo/"
GAMES_FILE, ROWS_FILE, SUMMARY_FILE, CONFIG_FILE = (
    "games.jsonl", "rows_wordguesser.jsonl", "summary.json", "config.json")
# HTTP statuses worth another try: timeouts, conflicts, rate limits, server trouble
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# an error body or message is cut to this many characters, after the key is taken out of it
ERROR_TEXT_CHARS = 200
# any run of this many characters of the key counts as the key (a server's echo cut short, or
# a hint like "sk-or-v1-abc...xyz"): shorter pieces are not enough to matter
KEY_PIECE_CHARS = 6

# clembench Taboo v2.0 templates, used when --templates-dir lacks the files
BUILTIN_DESCRIBER = """You are playing a collaborative word guessing game in which you have to \
describe a target word for another player to guess.

Rules:
(a) You have to reply in the form: CLUE: <some text>. Guesses from the other player will start \
with GUESS.
(b) You cannot use the target word itself, parts or morphological variants of it in your \
description.
(c) In addition, the same rules apply for related words which are provided below.

End conditions:
(i) If you use the target word or a related word in your description, then you lose.
(ii) If the other player can guess the target word in $N$ tries, you both win.

Let us start.

This is the target word that you need to describe and that the other player needs to guess:

$TARGET_WORD$

Related words are:

$REL_WORD$

Important: You are under time pressure, give short descriptions that are to the point!"""
BUILTIN_GUESSER = """You are playing a collaborative word guessing game in which you have to \
guess a target word that another player describes to you.

You can make one guess at each trial. You win when you guess the target word. You lose when you \
cannot guess it in $N$ tries.

After each trial you will get a new hint from the other player which starts with CLUE.

Make your guesses by just saying the word using the following form: GUESS: <a word>

Let us start.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True,
                   help="games.jsonl, rows_wordguesser.jsonl, summary.json go here; an existing "
                        "folder of the same settings is resumed")
    p.add_argument("--describer-model", required=True, help="model id of the Describer")
    p.add_argument("--guesser-models", nargs="+", required=True,
                   help="model ids of the Guessers; each plays --games-per-guesser games")
    p.add_argument("--games-per-guesser", type=int, default=20,
                   help="games per Guesser model (default: 20)")
    p.add_argument("--max-turns", type=int, default=3,
                   help="guesses per game, the Describer clues before each (default: 3)")
    p.add_argument("--seed", type=seed_type, default=42,
                   help="order of the target words; also sent as the request seed "
                        "(default: 42)")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="rewrite rows_wordguesser.jsonl and summary.json every N games "
                        "(default: 10; games.jsonl is appended after every game)")
    p.add_argument("--save-hf-dataset", action="store_true",
                   help="also save the rows as a datasets.save_to_disk folder, hf_dataset/")
    words = p.add_mutually_exclusive_group()
    words.add_argument("--instances", default=None,
                       help="clembench Taboo instances file: targets, related words, experiments "
                            f"(default: {DEFAULT_INSTANCES})")
    words.add_argument("--word-list", default=None,
                       help="instead of --instances: a .json/.jsonl of objects with target_word "
                            "and related_word (optional experiment), a JSON {bucket: [words]}, "
                            "or a text file of lines 'target,related1,related2,...'")
    p.add_argument("--templates-dir", default=DEFAULT_TEMPLATES_DIR,
                   help="folder with initial_describer.template and initial_guesser.template "
                        "(default: %(default)s; built-in copies when absent)")
    p.add_argument("--api-base", default=DEFAULT_API_BASE,
                   help="OpenAI-compatible API root; POSTs go to <api-base>/chat/completions "
                        "and never follow a redirect (default: %(default)s)")
    p.add_argument("--api-key-env", default="OPENROUTER_API_KEY",
                   help="environment variable (or .env entry) holding the API key "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of both players (default: 0.7)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max tokens of one reply (default: 256)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one HTTP request may take (default: 60)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries of a failed request before the game is given up (default: 5)")
    p.add_argument("--backoff-base", type=float, default=1.0,
                   help="first retry waits this many seconds, doubling after (default: 1.0)")
    p.add_argument("--max-backoff", type=float, default=60.0,
                   help="cap on one wait, Retry-After included (default: 60)")
    p.add_argument("--describer-repairs", type=int, default=2,
                   help="times an invalid or empty clue is sent back (default: 2)")
    p.add_argument("--guesser-repairs", type=int, default=2,
                   help="times a reply without a usable guess is sent back (default: 2)")
    p.add_argument("--retry-errors", action="store_true",
                   help="on resume, replay the games that ended in an API error")
    args = p.parse_args(argv)
    for name in ("games_per_guesser", "max_turns", "checkpoint_every", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_retries", "describer_repairs", "guesser_repairs"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.timeout <= 0 or args.backoff_base < 0:
        p.error("--timeout must be positive and --backoff-base >= 0")
    if len(set(args.guesser_models)) != len(args.guesser_models):
        p.error("--guesser-models names a model twice")
    return args


# ---------------------------------------------------------------------------------------------
# the API key: environment first, then ./.env; kept out of every output


def read_dotenv(path: Path) -> dict[str, str]:
    values = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def api_key(env_name: str) -> str:
    key = os.environ.get(env_name) or read_dotenv(Path.cwd() / ".env").get(env_name)
    if not key:
        raise PipelineError(f"no API key: set the environment variable {env_name} or put "
                            f"{env_name}=... in ./.env (--api-key-env names another variable)")
    return key


# ---------------------------------------------------------------------------------------------
# HTTP: one chat completion, retried


class ApiError(Exception):
    """A request that failed for good (after its retries); the game is given up."""


class StopRun(Exception):
    """The API refused the key or redirected the request; every further request would too."""


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are refused rather than followed without the key: urllib copies every header,
    Authorization included, onto the redirected request, whatever host it names, and turns a
    301/302/303 POST into a GET without the body, which no chat API answers. An API that moved is
    a wrong --api-base, fixed once by the user, so the 3xx comes back as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ChatClient:
    def __init__(self, args, key: str):
        self.url = args.api_base.rstrip("/") + "/chat/completions"
        self.key = key
        self.args = args
        self.opener = urllib.request.build_opener(RefuseRedirects)
        self.retries = 0       # counted over the whole run, and per game by the caller
        self.slept_s = 0.0

    def redact(self, text: str, limit: int | None = None) -> str:
        """The text without the key or any KEY_PIECE_CHARS-long piece of it, then cut to limit:
        cutting first could leave part of the key at the cut, where no replace finds it."""
        return redact_key(text, self.key)[:limit]

    def redact_record(self, value):
        """A game record with every string in it redacted (replies, error texts, messages)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_record(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact_record(v) for k, v in value.items()}
        return value

    def complete(self, model: str, messages: list[dict], seed: int) -> str:
        """The reply's text ('' when the model sent none). Raises ApiError or StopRun."""
        body = json.dumps({"model": model, "messages": messages, "seed": seed,
                           "temperature": self.args.temperature,
                           "max_tokens": self.args.max_tokens}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}",
                   "X-Title": "attribution-selection taboo generator"}
        last_error = "no attempt made"
        for attempt in range(self.args.max_retries + 1):
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers,
                                                 method="POST")
                with self.opener.open(request, timeout=self.args.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return self._content(payload)
            except urllib.error.HTTPError as err:
                detail = self._error_body(err)
                if 300 <= err.code < 400:
                    location = err.headers.get("Location") if err.headers else None
                    target = urllib.parse.urljoin(self.url, location) if location else None
                    where = (f"to {self.redact(target, ERROR_TEXT_CHARS)}" if target
                             else "without a Location")
                    raise StopRun(f"the API at {self.url} redirected the request {where} (HTTP "
                                  f"{err.code}); redirects are not followed, the key would go "
                                  "with them: set --api-base to the address that answers")
                if err.code in (401, 403):
                    raise StopRun(f"the API at {self.url} refused the key (HTTP {err.code}"
                                  f"{': ' + detail if detail else ''})")
                last_error = f"HTTP {err.code}{': ' + detail if detail else ''}"
                if err.code not in RETRY_STATUSES:
                    raise ApiError(self.redact(last_error))
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (TimeoutError, socket.timeout):
                last_error = f"timed out after {self.args.timeout:g} s"
            except urllib.error.URLError as err:
                reason = err.reason
                last_error = (f"timed out after {self.args.timeout:g} s"
                              if isinstance(reason, (TimeoutError, socket.timeout))
                              else f"connection failed: {reason}")
            except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
                # connection reset mid-body, invalid JSON, a reply without choices
                last_error = f"bad response: {type(err).__name__}: {err}"
            if attempt == self.args.max_retries:
                break
            self.retries += 1
            self._sleep(attempt, retry_after)
        raise ApiError(self.redact(f"{last_error} (gave up after {self.args.max_retries} "
                                   "retries)"))

    def _content(self, payload: dict) -> str:
        if "error" in payload and "choices" not in payload:
            raise ValueError(f"API error: {self.redact(str(payload['error']), ERROR_TEXT_CHARS)}")
        content = payload["choices"][0]["message"].get("content")
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return (content or "").strip()

    def _error_body(self, err: urllib.error.HTTPError) -> str:
        try:
            text = err.read().decode("utf-8", "replace")
        except Exception:  # the body is only decoration for the message
            text = ""
        return self.redact(" ".join(text.split()), ERROR_TEXT_CHARS)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.args.backoff_base * 2 ** attempt
        if retry_after is not None:
            try:
                delay = float(retry_after)
            except ValueError:
                pass  # an HTTP date: keep the exponential delay
        delay = max(0.0, min(delay, self.args.max_backoff))
        self.slept_s += delay
        time.sleep(delay)


def redact_key(text: str, key: str) -> str:
    """text with the key and every piece of it at least KEY_PIECE_CHARS long replaced by ***."""
    if not key:
        return text
    text = text.replace(key, "***")
    if len(key) < KEY_PIECE_CHARS:
        return text
    pieces = {key[i:i + KEY_PIECE_CHARS] for i in range(len(key) - KEY_PIECE_CHARS + 1)}
    hidden = [False] * len(text)
    for i in range(len(text) - KEY_PIECE_CHARS + 1):
        if text[i:i + KEY_PIECE_CHARS] in pieces:
            hidden[i:i + KEY_PIECE_CHARS] = [True] * KEY_PIECE_CHARS
    if not any(hidden):
        return text
    out, i = [], 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# words and prompts


def load_word_source(args) -> tuple[list[dict], str]:
    """[{experiment, task_id, target_word, related_word}] and a description of the source."""
    if args.word_list:
        return read_word_list(Path(args.word_list)), str(Path(args.word_list).resolve())
    path = Path(args.instances or DEFAULT_INSTANCES)
    games = [{"experiment": i["experiment"], "task_id": i["game_id"],
              "target_word": i["target_word"], "related_word": i["related_word"]}
             for i in load_instances(path).values()]
    return games, str(path.resolve())


def read_word_list(path: Path) -> list[dict]:
    if not path.is_file():
        raise PipelineError(f"word list {path} does not exist")
    text = path.read_text()
    entries: list = []
    try:
        if path.name.endswith(".jsonl"):
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif path.name.endswith(".json"):
            data = json.loads(text)
            if isinstance(data, dict) and "experiments" in data:
                return [{"experiment": i["experiment"], "task_id": i["game_id"],
                         "target_word": i["target_word"], "related_word": i["related_word"]}
                        for i in load_instances(path).values()]
            if isinstance(data, dict):  # {bucket: [word or object]}
                entries = [dict(e, experiment=e.get("experiment", bucket))
                           if isinstance(e, dict) else {"target_word": e, "experiment": bucket}
                           for bucket, items in data.items() for e in items]
            else:
                entries = data
        else:
            for line in text.splitlines():
                parts = [w.strip() for w in line.split(",") if w.strip()]
                if parts and not parts[0].startswith("#"):
                    entries.append({"target_word": parts[0], "related_word": parts[1:]})
    except json.JSONDecodeError as err:
        raise PipelineError(f"word list {path}: line {err.lineno} is not valid JSON ({err.msg})")
    games, counters = [], Counter()
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"target_word": entry}
        if not isinstance(entry, dict) or not str(entry.get("target_word", "")).strip():
            raise PipelineError(f"word list {path}: entry {index} has no target_word")
        related = entry.get("related_word", entry.get("related_words", [])) or []
        experiment = str(entry.get("experiment", "wordlist"))
        task_id = entry.get("task_id", entry.get("game_id", counters[experiment]))
        counters[experiment] += 1
        games.append({"experiment": experiment, "task_id": int(task_id),
                      "target_word": str(entry["target_word"]).strip(),
                      "related_word": [related] if isinstance(related, str) else
                      [str(w) for w in related]})
    if not games:
        raise PipelineError(f"word list {path} holds no words")
    return games


def load_templates(folder: str) -> tuple[str, str, str]:
    folder = Path(folder)
    describer, guesser = folder / "initial_describer.template", folder / "initial_guesser.template"
    if describer.is_file() and guesser.is_file():
        return describer.read_text(), guesser.read_text(), str(folder.resolve())
    return BUILTIN_DESCRIBER, BUILTIN_GUESSER, "built-in (clembench Taboo v2.0)"


def describer_prompt(template: str, game: dict, max_turns: int) -> str:
    related = "\n".join(f"- {w}" for w in game["related_word"]) or "(none)"
    return (template.replace("$TARGET_WORD$", game["target_word"])
            .replace("$REL_WORD$", related).replace("$N$", str(max_turns)))


def guesser_prompt(template: str, max_turns: int) -> str:
    return template.replace("$N$", str(max_turns))


_CLUE_MARKER = re.compile(r"(?<![^\W_])[*_]{0,3}clue[*_]{0,3}\s*[:：]\s*[*_]{0,3}", re.IGNORECASE)
_PLACEHOLDER_CLUES = {"<some text>", "some text", "...", "<clue>"}


def extract_clue(reply: str) -> str:
    """The text after the first 'CLUE:' (the whole reply without one), on one line: this is
    exactly what the Guesser will see, so this is what the rules are checked on."""
    match = _CLUE_MARKER.search(reply)
    text = reply[match.end():] if match else reply
    return " ".join(text.split()).strip().strip("\"'*_").strip()


def clue_problems(clue: str, game: dict) -> list[str]:
    if not clue or clue.lower() in _PLACEHOLDER_CLUES:
        return ["the clue is empty"]
    if _CLUE_MARKER.search(clue) or re.search(r"\bguess\s*:", clue, re.IGNORECASE):
        return ["give exactly one clue, without further CLUE: or GUESS: parts"]
    return clue_violations(clue, game["target_word"], game["related_word"])


# ---------------------------------------------------------------------------------------------
# one game


def game_key(model: str, index: int) -> str:
    return f"{model}#{index:05d}"


def request_seed(seed: int, key: str, role: str, turn: int, attempt: int) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{role}|{turn}|{attempt}".encode()).hexdigest()
    return int(digest[:8], 16)


def play_game(client: ChatClient, templates, game: dict, guesser: str, index: int,
              args) -> dict:
    key = game_key(guesser, index)
    record = {
        "game_key": key, "guesser_model": guesser, "game_index": index,
        "describer_model": args.describer_model, "experiment": game["experiment"],
        "task_id": game["task_id"], "target_word": game["target_word"],
        "related_word": game["related_word"], "max_turns": args.max_turns,
        "outcome": None, "abort_reason": None, "error": None, "turns": 0, "clues": [],
        "guesses": [], "describer_repairs": 0, "guesser_repairs": 0, "http_retries": 0,
        "events": [],
    }
    describer_messages = [{"role": "user", "content": describer_prompt(templates[0], game,
                                                                       args.max_turns)}]
    guesser_messages: list[dict] = []
    retries_before = client.retries
    started = time.perf_counter()
    try:
        for turn in range(1, args.max_turns + 1):
            clue, repair = None, []
            for attempt in range(args.describer_repairs + 1):
                reply = client.complete(args.describer_model, describer_messages + repair,
                                        request_seed(args.seed, key, "d", turn, attempt))
                candidate = extract_clue(reply)
                problems = clue_problems(candidate, game)
                record["events"].append({"role": "describer", "turn": turn, "attempt": attempt,
                                         "reply": reply, "problems": problems})
                if not problems:
                    clue = candidate
                    describer_messages.append({"role": "assistant", "content": reply})
                    break
                if attempt < args.describer_repairs:
                    record["describer_repairs"] += 1
                repair = [{"role": "assistant", "content": reply},
                          {"role": "user", "content":
                           f"Your clue is not valid: {'; '.join(problems)}. Reply with a new "
                           "clue in the form CLUE: <some text>, without the target word, the "
                           "related words or any form or part of them."}]
            if clue is None:
                record.update(outcome="aborted", abort_reason="describer_repairs_exhausted")
                break
            record["clues"].append(clue)
            clue_text = f"CLUE: {clue}"
            guesser_messages.append({"role": "user", "content": (
                guesser_prompt(templates[1], args.max_turns) + "\n\n" + clue_text
                if turn == 1 else clue_text)})

            guess, repair = None, []
            for attempt in range(args.guesser_repairs + 1):
                reply = client.complete(guesser, guesser_messages + repair,
                                        request_seed(args.seed, key, "g", turn, attempt))
                guess = parse_guess(reply)
                record["events"].append({"role": "guesser", "turn": turn, "attempt": attempt,
                                         "reply": reply, "guess": guess})
                if guess is not None:
                    guesser_messages.append({"role": "assistant", "content": reply})
                    break
                if attempt < args.guesser_repairs:
                    record["guesser_repairs"] += 1
                repair = [{"role": "assistant", "content": reply},
                          {"role": "user", "content":
                           "Your reply has no guess. Reply only in the form GUESS: <a word>, "
                           "with your one-word guess in place of <a word>."}]
            if guess is None:
                record.update(outcome="aborted", abort_reason="guesser_repairs_exhausted")
                break
            record["guesses"].append(guess)
            record["turns"] = turn
            if same_word(guess, game["target_word"]):
                record["outcome"] = "success"
                break
            describer_messages.append({"role": "user", "content": f"GUESS: {guess}"})
        else:
            record["outcome"] = "failure"
    except ApiError as err:
        record.update(outcome="aborted", abort_reason="api_error", error=str(err))
    record["http_retries"] = client.retries - retries_before
    record["describer_messages"] = describer_messages
    record["guesser_messages"] = guesser_messages
    record["elapsed_s"] = round(time.perf_counter() - started, 3)
    return record


# ---------------------------------------------------------------------------------------------
# games.jsonl: the append-only record the other outputs are derived from


def read_games(path: Path) -> dict[str, dict]:
    """{game_key: record}. A torn last line (the run was killed mid-write: no newline, or not
    JSON) is cut off the file, so its game is played again; damage anywhere else is an error."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    games, position, good_end = {}, 0, 0
    for number, line in enumerate(lines, start=1):
        position += len(line)
        if line.strip():
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and "game_key" in record
            except ValueError:
                ok = False
            if not ok or not line.endswith(b"\n"):
                if number == len(lines):
                    break
                raise PipelineError(f"{path}: line {number} is not a game record; the file is "
                                    "damaged beyond a torn last line")
            games[record["game_key"]] = record
        good_end = position
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        print(f"dropped a torn last line ({len(data) - good_end} bytes) of {path}")
    return games


def append_game(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# derived outputs


def wordguesser_rows(games: list[dict], source: str) -> list[dict]:
    rows = []
    for game in games:
        messages = game.get("guesser_messages") or []
        if not messages or messages[-1]["role"] != "assistant":
            continue
        rows.append({"messages": messages, "meta": {
            "game": "taboo", "game_role": "WordGuesser", "experiment": game["experiment"],
            "task_id": game["task_id"], "outcome": game["outcome"],
            "model": game["guesser_model"], "target_word": game["target_word"],
            "related_word": game["related_word"], "describer_model": game["describer_model"],
            "game_key": game["game_key"], "turns": game["turns"], "source": source}})
    return rows


def rate(successes: int, total: int) -> str:
    return f"{successes}/{total} = {successes / total:.4f}" if total else "0/0"


def summarize(games: list[dict]) -> dict:
    def block(subset):
        outcomes = Counter(g["outcome"] for g in subset)
        played = [g for g in subset if g["turns"] > 0]
        return {
            "games": len(subset),
            "successes": outcomes.get("success", 0),
            "success_rate": outcomes.get("success", 0) / len(subset) if subset else None,
            "summary": rate(outcomes.get("success", 0), len(subset)),
            "outcomes": dict(sorted(outcomes.items())),
            "mean_turns": sum(g["turns"] for g in played) / len(played) if played else None,
            "mean_turns_of_successes": (
                sum(g["turns"] for g in subset if g["outcome"] == "success")
                / outcomes["success"] if outcomes.get("success") else None),
            "describer_repairs": sum(g["describer_repairs"] for g in subset),
            "guesser_repairs": sum(g["guesser_repairs"] for g in subset),
            "describer_repairs_exhausted": sum(g["abort_reason"] == "describer_repairs_exhausted"
                                               for g in subset),
            "guesser_repairs_exhausted": sum(g["abort_reason"] == "guesser_repairs_exhausted"
                                             for g in subset),
            "api_errors": sum(g["abort_reason"] == "api_error" for g in subset),
            "http_retries": sum(g["http_retries"] for g in subset),
        }

    by_model: dict[str, list[dict]] = {}
    for game in games:
        by_model.setdefault(game["guesser_model"], []).append(game)
    return {**block(games), "per_guesser": {m: block(g) for m, g in by_model.items()}}


def write_outputs(out_dir: Path, games: dict[str, dict], args, run_info: dict,
                  final: bool) -> dict:
    ordered = sorted(games.values(), key=lambda g: (g["guesser_model"], g["game_index"]))
    rows = wordguesser_rows(ordered, "generate_synthetic_openrouter.py")
    write_jsonl_atomic(out_dir / ROWS_FILE, rows)
    summary = {
        **summarize(ordered),
        "rows_wordguesser": len(rows),
        "complete": final,
        "describer_model": args.describer_model,
        "guesser_models": args.guesser_models,
        "games_per_guesser": args.games_per_guesser,
        "max_turns": args.max_turns,
        "seed": args.seed,
        **run_info,
        "provenance": provenance(seed=args.seed),
    }
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    if final and args.save_hf_dataset:
        from datasets import Dataset

        final_dir = out_dir / "hf_dataset"
        staged = staging_dir(final_dir)
        Dataset.from_list(rows).save_to_disk(str(staged))
        publish_dir(staged, final_dir)
    return summary


def check_config(out_dir: Path, config: dict) -> None:
    """A resumed run must play the same games: same describer, seed, turns, words, prompts."""
    path = out_dir / CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        changed = [k for k in config if previous.get(k) != config[k]]
        if changed:
            raise PipelineError(f"{out_dir} holds games of other settings "
                                f"({', '.join(changed)} differ from {path}); use the same "
                                "arguments to resume, or another --output-dir")
    else:
        write_json_atomic(path, config)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    # a folder of games is this script's own (it resumes there); an earlier run's folder from
    # before the stamp is known by its config.json
    if (out_dir / CONFIG_FILE).is_file() and not (out_dir / OUTPUT_STAMP).exists():
        stamp_output(out_dir, SCRIPT)
    check_output_dir(out_dir, None, SCRIPT, add_to=True,
                     inputs=[args.instances, args.word_list, args.templates_dir])
    key = api_key(args.api_key_env)
    words, word_source = load_word_source(args)
    templates = load_templates(args.templates_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_output(out_dir, SCRIPT)
    config = {
        "describer_model": args.describer_model, "seed": args.seed, "max_turns": args.max_turns,
        "words_sha256": hashlib.sha256(json.dumps(words, sort_keys=True).encode()).hexdigest(),
        "templates_sha256": hashlib.sha256("\n".join(templates[:2]).encode()).hexdigest(),
    }
    check_config(out_dir, config)

    games_path = out_dir / GAMES_FILE
    games = read_games(games_path)
    if args.retry_errors:
        errored = [k for k, g in games.items() if g["abort_reason"] == "api_error"]
        if errored:
            for k in errored:
                del games[k]
            write_jsonl_atomic(games_path, games.values())
            print(f"replaying {len(errored)} game(s) that ended in an API error")
    order = list(range(len(words)))
    random.Random(args.seed).shuffle(order)
    todo = [(model, index) for model in args.guesser_models
            for index in range(args.games_per_guesser) if game_key(model, index) not in games]
    print(f"{len(games)} game(s) already in {games_path}, {len(todo)} to play "
          f"({len(words)} target words from {word_source})")

    client = ChatClient(args, key)
    run_info = {"api_base": args.api_base, "word_source": word_source,
                "templates": templates[2], "config": config}
    progress = tqdm(todo, desc="games", unit="game")
    played = 0
    try:
        for model, index in progress:
            game = words[order[index % len(words)]]
            try:
                record = client.redact_record(play_game(client, templates, game, model,
                                                        index, args))
            except StopRun as err:
                raise PipelineError(client.redact(str(err)))
            append_game(games_path, record)
            games[record["game_key"]] = record
            played += 1
            won = sum(g["outcome"] == "success" for g in games.values())
            progress.set_postfix(won=f"{won}/{len(games)}", retries=client.retries)
            if played % args.checkpoint_every == 0:
                write_outputs(out_dir, games, args, run_info, final=False)
    finally:
        progress.close()
    run_info["this_run"] = {"games_played": played, "http_retries": client.retries,
                            "backoff_slept_s": round(client.slept_s, 6)}
    summary = write_outputs(out_dir, games, args, run_info, final=True)
    print(f"{summary['games']} games: {summary['summary']} won, mean turns "
          f"{summary['mean_turns']}, {summary['describer_repairs']} clue repairs, "
          f"{summary['guesser_repairs']} guess repairs, {summary['api_errors']} API errors; "
          f"{summary['rows_wordguesser']} rows in {out_dir / ROWS_FILE}")


if __name__ == "__main__":
    run_main(main)
