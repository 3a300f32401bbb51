"""Taboo game material shared by dataset.py (--task taboo), eval_words.py and
generate_synthetic_openrouter.py: the clembench instances file, the English Snowball stemmer, the
guess parser and the clue rule check.

One stemmer and one parser for all three, so that "the guess was right" and "the clue broke the
rules" mean the same thing when data is made, when it is split and when a model is scored.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from pipeline import PipelineError

DEFAULT_INSTANCES = "../shared/data/taboo/instances.json"
FREQUENCY_LEVELS = ("high", "medium", "low")


# ---------------------------------------------------------------------------------------------
# the clembench Taboo instances file (v2.0 layout):
#   {"experiments": [{"name": "high_en", "max_turns": 3, "describer_initial_prompt": ...,
#                     "guesser_initial_prompt": ..., "game_instances": [{"game_id": 0,
#                     "target_word": "winter", "related_word": [...], "target_word_stem": ...,
#                     "related_word_stem": [...]}, ...]}, ...]}


def load_instances(path: str | Path) -> dict[tuple[str, int], dict]:
    """{(experiment name, game_id): instance} with the experiment's name and max_turns added.

    Transcripts name a game by (experiment, task_id); task_id is the instance's game_id."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"Taboo instances file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"Taboo instances file {path} is not valid JSON ({err})")
    experiments = data.get("experiments") if isinstance(data, dict) else None
    if not isinstance(experiments, list) or not experiments:
        raise PipelineError(f"Taboo instances file {path} has no 'experiments' list "
                            "(expected the clembench instances.json layout)")
    instances = {}
    for e_index, experiment in enumerate(experiments):
        name = experiment.get("name") if isinstance(experiment, dict) else None
        games = experiment.get("game_instances") if isinstance(experiment, dict) else None
        if not name or not isinstance(games, list):
            raise PipelineError(f"Taboo instances file {path}: experiment {e_index} lacks "
                                "'name' or 'game_instances'")
        for g_index, game in enumerate(games):
            if not isinstance(game, dict) or "game_id" not in game or not game.get("target_word"):
                raise PipelineError(f"Taboo instances file {path}: experiment '{name}' game "
                                    f"{g_index} lacks 'game_id' or 'target_word'")
            related = game.get("related_word") or []
            if isinstance(related, str):
                related = [related]
            instances[(str(name), int(game["game_id"]))] = {
                "experiment": str(name),
                "game_id": int(game["game_id"]),
                "target_word": str(game["target_word"]),
                "related_word": [str(w) for w in related],
                "target_word_stem": game.get("target_word_stem"),
                "related_word_stem": game.get("related_word_stem"),
                "max_turns": experiment.get("max_turns"),
            }
    return instances


# The outcomes an episode ends with: clembench's success / lose / aborted and the generator's
# failure (generate_synthetic_openrouter.py). Read without regard to case ("Success" is a win);
# any other value is refused where it is read, since it would silently score as a loss.
OUTCOMES = ("success", "lose", "failure", "aborted")


def normalize_outcome(value) -> str | None:
    """One of OUTCOMES for a string naming it in any case, else None."""
    if not isinstance(value, str):
        return None
    outcome = value.strip().lower()
    return outcome if outcome in OUTCOMES else None


def frequency_level(experiment: str | None) -> str | None:
    """'high_en' -> 'high'. clembench's Taboo experiments are named by the frequency band their
    target words come from; any other experiment name is returned unchanged."""
    if experiment is None:
        return None
    head = str(experiment).split("_", 1)[0]
    return head if head in FREQUENCY_LEVELS else str(experiment)


# ---------------------------------------------------------------------------------------------
# words


def normalize_word(text: str) -> str:
    """Lower case, NFKC, curly apostrophes straightened, surrounding punctuation removed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201b", "'")
    return text.strip().strip(".,;:!?\"'`*_()[]{}<>«»“”").strip()


# The English Snowball ("Porter2") stemmer, written out here because clembench decides both
# "correct guess" and "clue uses a taboo word" with nltk's SnowballStemmer("english") and the
# stems in instances.json come from it. nltk is not a dependency of this project; tests check
# this implementation against nltk where nltk happens to be installed.

_VOWELS = frozenset("aeiouy")
_DOUBLES = ("bb", "dd", "ff", "gg", "mm", "nn", "pp", "rr", "tt")
_LI_ENDING = frozenset("cdeghkmnrt")
_EXCEPTIONS = {
    "skis": "ski", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "idly": "idl",
    "gently": "gentl", "ugly": "ugli", "early": "earli", "only": "onli", "singly": "singl",
    "sky": "sky", "news": "news", "howe": "howe", "atlas": "atlas", "cosmos": "cosmos",
    "bias": "bias", "andes": "andes",
}
# invariant after step 1a (their plurals/inflections reach these forms there)
_EXCEPTIONS_1A = {"inning", "outing", "canning", "herring", "earring", "proceed", "exceed",
                  "succeed"}
# (suffix, letters replaced, replacement, R2 when R2 is shorter than the replaced letters);
# None: a plain shortening, the regions are cut like the word. The first suffix (longest first)
# that ends the word decides the step, whether or not its condition then holds.
_STEP2 = [
    ("ization", 7, "ize", ""), ("ational", 7, "ate", "e"), ("fulness", 4, "", None),
    ("ousness", 7, "ous", ""), ("iveness", 7, "ive", "e"), ("tional", 2, "", None),
    ("biliti", 6, "ble", ""), ("lessli", 2, "", None), ("entli", 2, "", None),
    ("ation", 5, "ate", "e"), ("alism", 5, "al", ""), ("aliti", 5, "al", ""),
    ("ousli", 5, "ous", ""), ("iviti", 5, "ive", "e"), ("fulli", 2, "", None),
    ("enci", 1, "e", ""), ("anci", 1, "e", ""), ("abli", 1, "e", ""), ("izer", 4, "ize", ""),
    ("ator", 4, "ate", "e"), ("alli", 4, "al", ""), ("bli", 3, "ble", ""), ("ogi", 1, "", None),
    ("li", 2, "", None),
]
_STEP3 = [
    ("ational", 7, "ate", ""), ("tional", 2, "", None), ("alize", 3, "", None),
    ("icate", 5, "ic", ""), ("iciti", 5, "ic", ""), ("ative", 5, "", None), ("ical", 4, "ic", ""),
    ("ness", 4, "", None), ("ful", 3, "", None),
]
_STEP4 = ["ement", "ance", "ence", "able", "ible", "ment", "ant", "ent", "ism", "ate", "iti",
          "ous", "ive", "ize", "ion", "al", "er", "ic"]


class _Word:
    """The word and its regions R1 and R2, kept as strings (suffixes of the word) the way nltk
    keeps them. Where a replacement reaches in front of a region, nltk does not recompute the
    region but empties it (R2 after -ation/-iveness: "e"); matching nltk's stems needs the same
    bookkeeping, so this follows it rather than fixed region positions."""

    def __init__(self, word: str, r1: str, r2: str):
        self.word, self.r1, self.r2 = word, r1, r2

    def cut(self, n: int) -> None:
        self.replace(n, "", None)

    def replace(self, n: int, replacement: str, short_r2: str | None) -> None:
        self.word = self.word[:-n] + replacement
        if short_r2 is None:
            self.r1, self.r2 = self.r1[:-n] + replacement, self.r2[:-n] + replacement
        else:
            self.r1 = self.r1[:-n] + replacement if len(self.r1) >= n else ""
            self.r2 = self.r2[:-n] + replacement if len(self.r2) >= n else short_r2


def _r1r2(word: str) -> tuple[str, str]:
    for prefix in ("gener", "commun", "arsen"):
        if word.startswith(prefix):
            r1 = word[len(prefix):]
            break
    else:
        r1 = _region(word)
    return r1, _region(r1)


def _region(word: str) -> str:
    """The part after the first non-vowel that follows a vowel ('' if there is none)."""
    for i in range(1, len(word)):
        if word[i] not in _VOWELS and word[i - 1] in _VOWELS:
            return word[i + 1:]
    return ""


def _short_syllable_end(word: str) -> bool:
    if len(word) == 2:
        return word[0] in _VOWELS and word[1] not in _VOWELS
    return (len(word) >= 3 and word[-3] not in _VOWELS and word[-2] in _VOWELS
            and word[-1] not in _VOWELS and word[-1] not in "wxY")


def stem(word: str) -> str:
    """English Snowball stem of one word, as nltk's SnowballStemmer("english") gives it
    (independent -> independ, winters -> winter, guessing -> guess)."""
    word = normalize_word(word)
    if len(word) <= 2:
        return word
    if word in _EXCEPTIONS:
        return _EXCEPTIONS[word]
    if word.startswith("'"):
        word = word[1:]
    if word.startswith("y"):
        word = "Y" + word[1:]
    chars = list(word)
    for i in range(1, len(chars)):
        if chars[i] == "y" and chars[i - 1] in _VOWELS:
            chars[i] = "Y"
    w = _Word("".join(chars), *_r1r2("".join(chars)))

    # step 0: possessive apostrophes
    for suffix in ("'s'", "'s", "'"):
        if w.word.endswith(suffix):
            w.cut(len(suffix))
            break
    # step 1a: plural s
    if w.word.endswith("sses"):
        w.cut(2)
    elif w.word.endswith(("ied", "ies")):
        w.cut(2 if len(w.word) > 4 else 1)
    elif w.word.endswith(("us", "ss")):
        pass
    elif w.word.endswith("s") and any(c in _VOWELS for c in w.word[:-2]):
        w.cut(1)
    if w.word in _EXCEPTIONS_1A:
        return w.word
    # step 1b: -eed, -ed, -ing
    for suffix in ("eedly", "ingly", "edly", "eed", "ing", "ed"):
        if not w.word.endswith(suffix):
            continue
        if suffix in ("eed", "eedly"):
            if w.r1.endswith(suffix):
                w.replace(len(suffix), "ee", "")
        elif any(c in _VOWELS for c in w.word[: -len(suffix)]):
            w.cut(len(suffix))
            if w.word.endswith(("at", "bl", "iz")):
                w.word, w.r1 = w.word + "e", w.r1 + "e"
                if len(w.word) > 5 or len(w.r1) >= 3:
                    w.r2 += "e"
            elif w.word.endswith(_DOUBLES):
                w.cut(1)
            elif w.r1 == "" and _short_syllable_end(w.word):
                w.word += "e"
        break
    # step 1c: final y after a non-vowel that is not the first letter -> i
    if len(w.word) > 2 and w.word[-1] in "yY" and w.word[-2] not in _VOWELS:
        w.replace(1, "i", "")
    # step 2
    for suffix, n, replacement, short_r2 in _STEP2:
        if not w.word.endswith(suffix):
            continue
        if w.r1.endswith(suffix) and (suffix != "ogi" or w.word[-4] == "l") and (
                suffix != "li" or w.word[-3] in _LI_ENDING):
            w.replace(n, replacement, short_r2)
        break
    # step 3
    for suffix, n, replacement, short_r2 in _STEP3:
        if not w.word.endswith(suffix):
            continue
        if w.r1.endswith(suffix) and (suffix != "ative" or w.r2.endswith(suffix)):
            w.replace(n, replacement, short_r2)
        break
    # step 4
    for suffix in _STEP4:
        if not w.word.endswith(suffix):
            continue
        if w.r2.endswith(suffix) and (suffix != "ion" or w.word[-4:-3] in ("s", "t")):
            w.cut(len(suffix))
        break
    # step 5
    word = w.word
    if w.r2.endswith("l") and word[-2:] == "ll":
        word = word[:-1]
    elif w.r2.endswith("e"):
        word = word[:-1]
    elif w.r1.endswith("e") and len(word) >= 4 and not _short_syllable_end(word[:-1]):
        word = word[:-1]
    return word.replace("Y", "y")


def same_word(guess: str | None, target: str) -> bool:
    """clembench's rule: the guess is right when it equals the target or has the same stem
    (both lower-cased, surrounding punctuation ignored)."""
    if not guess:
        return False
    guess, target = normalize_word(guess), normalize_word(target)
    return bool(guess) and (guess == target or stem(guess) == stem(target))


# ---------------------------------------------------------------------------------------------
# the guesser's reply: "GUESS: <word>"

# GUESS, optionally in markdown emphasis, then a separator; "I guess it's..." is no guess
_GUESS_MARKER = re.compile(r"(?<![^\W_])[*_]{0,3}guess[*_]{0,3}\s*[:：=\-–—]\s*[*_]{0,3}",
                           re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
# echoes of the prompt's own placeholder are not guesses
PLACEHOLDER_GUESSES = {"a word", "word", "your guess", "guess", "your word", "the word",
                       "one word", "target word", "a guess"}


def parse_guess(reply: str | None) -> str | None:
    """The first guess in a reply, lower-cased; None when there is none.

    Tolerant of case, markdown emphasis, quotes, brackets and trailing punctuation
    ("**Guess:** 'Winter'." -> "winter"); strict about the GUESS marker itself, so a bare word or
    "I guess winter" is unparseable, as in clembench, and an echoed placeholder ("GUESS: <a word>")
    or an empty guess is no guess."""
    if not reply:
        return None
    match = _GUESS_MARKER.search(reply)
    if match is None:
        return None
    rest = reply[match.end():].split("\n", 1)[0]
    rest = unicodedata.normalize("NFKC", rest).strip().strip("\"'`*_<>[](){}«»“”‘’ ").strip()
    if not rest or normalize_word(rest) in PLACEHOLDER_GUESSES or rest.startswith("..."):
        return None
    word = _WORD.search(rest)
    if word is None:
        return None
    return normalize_word(word.group(0).replace("’", "'"))


def first_word(reply: str | None) -> str | None:
    """The reply's first word, lower-cased (the seed project's fallback for a reply without a
    GUESS marker); None for a reply without a word."""
    if not reply:
        return None
    word = _WORD.search(unicodedata.normalize("NFKC", reply))
    return normalize_word(word.group(0).replace("’", "'")) if word else None


def read_guess(reply: str | None, fallback_first_word: bool = False) -> tuple[str | None, str]:
    """(guess, how it was read: 'guess_marker', 'first_word' or 'none'). With
    fallback_first_word a reply without a parseable GUESS gives its first word (the seed's
    evaluation); without it such a reply has no guess (clembench's)."""
    guess = parse_guess(reply)
    if guess is not None:
        return guess, "guess_marker"
    if fallback_first_word:
        guess = first_word(reply)
        if guess is not None:
            return guess, "first_word"
    return None, "none"


SUCCESS_RULES = {
    "target": "the guess equals the target word or has its English Snowball stem (clembench)",
    "reference": "the guess equals the reference episode's final guess, the row's completion "
                 "(the seed project's rule; lower-cased, surrounding punctuation ignored, no "
                 "stemming)",
}


def success(rule: str, guess: str | None, target: str, reference_guess: str | None) -> bool:
    """One guess judged by one of SUCCESS_RULES."""
    if rule == "target":
        return same_word(guess, target)
    if rule == "reference":
        return bool(guess) and reference_guess is not None and \
            normalize_word(guess) == normalize_word(reference_guess)
    raise PipelineError(f"success rule {rule!r}: expected one of {', '.join(SUCCESS_RULES)}")


# ---------------------------------------------------------------------------------------------
# the describer's clue


def clue_tokens(clue: str) -> list[str]:
    text = unicodedata.normalize("NFKC", clue).lower().replace("’", "'")
    return _WORD.findall(text)


# Derivational endings the stemmer leaves alone ("wintery" stems to "winteri", not "winter");
# a clue word made of a taboo word (or its stem) plus one of these is a morphological variant.
_VARIANT_ENDINGS = (
    "y", "ie", "ies", "ier", "iest", "ily", "iness", "ish", "ism", "ist", "ists", "ize", "ized",
    "izes", "izing", "ise", "ised", "ises", "ising", "ful", "less", "ness", "er", "ers", "est",
    "ly", "like", "s", "es", "ed", "ing", "ings", "al", "ally", "ic", "ical", "ity", "ities",
    "ment", "ments", "able", "ible", "en", "ery", "hood", "ship", "wise", "ward", "wards",
)


def _is_variant(token: str, base: str) -> bool:
    if len(base) < 3 or not token.startswith(base) or token == base:
        return False
    rest = token[len(base):]
    if len(rest) > 1 and rest[0] == base[-1]:  # doubled consonant: sun -> sunny
        rest = rest[1:]
    return rest in _VARIANT_ENDINGS


def clue_violations(clue: str, target: str, related: list[str]) -> list[str]:
    """Why a clue breaks the Taboo rules (empty list: it doesn't).

    A clue may not contain the target or a related word, a word with the same Snowball stem
    (winter / winters), or the word plus a derivational ending (wintery, winterize), compared
    case-insensitively and on word boundaries only ("scold" does not contain "cold", "change"
    does not contain "chan"). Multi-word and hyphenated taboo words ("strong-minded") are also
    matched as phrases, and each of their parts is taboo on its own (the rules forbid parts)."""
    tokens = clue_tokens(clue)
    if not tokens:
        return ["the clue is empty"]
    words = set(tokens) | {p for token in tokens for p in re.split(r"[-']", token) if p}
    stems = {stem(w) for w in words}
    joined = " " + " ".join(p for token in tokens for p in re.split(r"[-']", token) if p) + " "
    problems = []
    for kind, taboo in [("target word", target)] + [("related word", w) for w in related]:
        taboo_norm = normalize_word(taboo)
        pieces = [p for p in re.split(r"[-'\s]+", taboo_norm) if p]
        if not pieces:
            continue
        forms = {taboo_norm, *(pieces if len(pieces) > 1 else [])}
        hit = (" " + " ".join(pieces) + " " in joined
               or any(f in words or stem(f) in stems for f in forms)
               or any(_is_variant(w, base) for w in words for f in forms
                      for base in (f, stem(f))))
        if hit:
            problems.append(f"it uses the {kind} '{taboo}' (or a form of it)")
    return problems
