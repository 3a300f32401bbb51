"""generate_synthetic_openrouter.py against a scripted chat-completions server on 127.0.0.1 that
the test runs itself: rule-breaking clues, empty guesses, 429 / 500 / timeouts, a rejected key,
a redirect (to a second server that must never see the key), a kill-and-resume, and the rows it
writes going through dataset.py --task taboo."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import taboo_fixture
from conftest import ROOT, run_script

KEY = "sk-test-NOT-A-REAL-KEY-0123456789"
SCRIPT = "generate_synthetic_openrouter.py"
# (target, related): faults and behaviours of the fake API are keyed by target word
WORDS = [
    ("apple", ["fruit", "tree", "red"]),      # first clue of every turn breaks the rules
    ("storm", ["rain", "wind", "thunder"]),   # first request: 429 with Retry-After: 0
    ("river", ["water", "flow", "bank"]),     # first request: 500
    ("cloud", ["sky", "white", "rain"]),      # first request: slower than --timeout
    ("stone", ["rock", "hard", "pebble"]),    # every request: 500 -> the game fails
    ("lamp", ["light", "bulb", "desk"]),      # every clue breaks the rules
    ("ocean", ["sea", "salt", "wave"]),       # guesser-empty never gives a usable guess
    ("garden", ["plant", "flower", "yard"]),
    ("violet", ["purple", "flower", "color"]),
    ("planet", ["orbit", "star", "earth"]),
    ("silver", ["metal", "coin", "grey"]),
    ("window", ["glass", "pane", "frame"]),
]
GUESSERS = ["guesser-good", "guesser-slow", "guesser-bad", "guesser-empty"]


class FakeApi:
    """Scripted replies. Clues are 'mystery item N'; the server remembers N -> target, so the
    guessers can answer right or wrong on purpose."""

    key = KEY

    def rejected(self, authorization):
        """The body of the 401 answer to a request without the right key."""
        return {"error": {"message": "invalid key"}}

    def __init__(self, block_after=None, max_requests=3000):
        self.lock = threading.Lock()
        self.requests = []
        self.served = Counter()
        self.clue_targets = {}
        self.faulted = set()
        self.block_after = block_after
        self.release = threading.Event()
        self.max_requests = max_requests

    def target_of_describer(self, messages):
        text = messages[0]["content"]
        match = re.search(r"needs to guess:\s+(\S+)", text) or re.search(r"Describe (\S+?)\.",
                                                                          text)
        return match.group(1)

    def reply(self, body):
        """(status, headers, payload or None, sleep seconds)."""
        model, messages = body["model"], body["messages"]
        with self.lock:
            self.requests.append(model)
            count = len(self.requests)
        if count > self.max_requests:
            return 500, {}, {"error": "too many requests in one test"}, 0
        if self.block_after is not None and count > self.block_after:
            self.release.wait(30)
            return 503, {}, {"error": "released"}, 0
        if model == "describer":
            target = self.target_of_describer(messages)
            repair = "not valid" in messages[-1]["content"]
            with self.lock:
                first = target not in self.faulted
                self.faulted.add(target)
            if target == "stone":
                return 500, {}, {"error": "stone always fails"}, 0
            if first and target == "storm":
                return 429, {"Retry-After": "0"}, {"error": "rate limited"}, 0
            if first and target == "river":
                return 500, {}, {"error": "boom"}, 0
            if first and target == "cloud":
                return 200, {}, None, 2.5
            if target == "lamp" or (target == "apple" and not repair):
                return 200, {}, self.completion(f"CLUE: It is a {target}, obviously."), 0
            with self.lock:
                number = len(self.clue_targets)
                self.clue_targets[number] = target
            return 200, {}, self.completion(f"CLUE: mystery item {number}"), 0
        clue_ids = re.findall(r"mystery item (\d+)", " ".join(
            m["content"] for m in messages if m["role"] == "user"))
        target = self.clue_targets[int(clue_ids[-1])]
        repair = "no guess" in messages[-1]["content"]
        # a repair request carries the rejected reply as one more assistant turn
        turn = 1 + sum(m["role"] == "assistant" for m in messages) - (1 if repair else 0)
        if model == "guesser-good":
            text = f"GUESS: {target.capitalize()}"
        elif model == "guesser-slow":
            text = "GUESS: pebble" if turn < 2 else f"**GUESS:** {target}."
        elif model == "guesser-bad":
            text = "GUESS: nothing"
        elif target == "ocean":
            text = "GUESS: <a word>"
        else:
            text = f"GUESS: {target}" if repair else ""
        return 200, {}, self.completion(text), 0

    @staticmethod
    def completion(text):
        return {"id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}]}


def serve(api: FakeApi):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self.send(404, {}, {"error": "no such path"})
            authorization = self.headers.get("Authorization", "")
            if authorization != f"Bearer {api.key}":
                return self.send(401, {}, api.rejected(authorization))
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            assert body["model"] and body["messages"]
            status, headers, payload, sleep = api.reply(body)
            api.served[status] += 1
            if sleep:
                time.sleep(sleep)
                api.served["slow"] += 1
                payload = api.completion("CLUE: too late")
            self.send(status, headers, payload)

        def send(self, status, headers, payload):
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test, killed generator)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def fake_api():
    servers = []

    def start(**kwargs):
        api = FakeApi(**kwargs)
        server, url = serve(api)
        servers.append((server, api))
        return api, url

    yield start
    for server, api in servers:
        api.release.set()
        server.shutdown()
        server.server_close()


def write_words(path: Path) -> Path:
    path.write_text("".join(json.dumps({"target_word": t, "related_word": r,
                                        "experiment": "high_en" if i % 2 else "low_en"}) + "\n"
                            for i, (t, r) in enumerate(WORDS)))
    return path


def write_templates(folder: Path) -> Path:
    folder.mkdir()
    (folder / "initial_describer.template").write_text(
        "Describe $TARGET_WORD$. Do not say:\n$REL_WORD$\nThe guesser has $N$ tries. "
        "Reply CLUE: <some text>.")
    (folder / "initial_guesser.template").write_text(
        "Guess the word in $N$ tries. Reply GUESS: <a word>.\n")
    return folder


def generator_args(url, out_dir, words, *extra, guessers=GUESSERS, games=len(WORDS)):
    return ["--output-dir", out_dir, "--describer-model", "describer", "--guesser-models",
            *guessers, "--games-per-guesser", games, "--word-list", words, "--api-base", url,
            "--timeout", 1, "--max-retries", 2, "--backoff-base", 0.01, "--seed", 3, *extra]


def env_with_key(key=KEY):
    # urllib would send even 127.0.0.1 through a configured proxy
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    env.pop("OPENROUTER_API_KEY", None)
    if key is not None:
        env["OPENROUTER_API_KEY"] = key
    return env


def run_generator(args, key=KEY, cwd=None, expect_ok=True):
    result = subprocess.run([sys.executable, str(ROOT / SCRIPT), *map(str, args)],
                            capture_output=True, text=True, env=env_with_key(key),
                            cwd=cwd or ROOT, timeout=120)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_key_nowhere(folder: Path, *texts):
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for text in texts:
        assert KEY not in text


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    api = FakeApi()
    server, url = serve(api)
    folder = tmp_path_factory.mktemp("generator")
    words = write_words(folder / "words.jsonl")
    templates = write_templates(folder / "templates")
    out = folder / "out"
    try:
        result = run_generator(generator_args(url, out, words, "--templates-dir", templates,
                                              "--checkpoint-every", 7, "--save-hf-dataset"))
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
    return {"api": api, "out": out, "result": result, "folder": folder}


def test_scripted_games_outcomes_repairs_and_errors(scripted_run):
    out, api = scripted_run["out"], scripted_run["api"]
    games = read_jsonl(out / "games.jsonl")
    assert len(games) == len(GUESSERS) * len(WORDS)
    assert len({g["game_key"] for g in games}) == len(games)
    by = {(g["guesser_model"], g["target_word"]): g for g in games}
    assert len(by) == len(games)          # every guesser plays every word once
    for guesser in GUESSERS:
        assert by[(guesser, "stone")]["abort_reason"] == "api_error"
        assert "HTTP 500" in by[(guesser, "stone")]["error"]
        assert by[(guesser, "lamp")]["abort_reason"] == "describer_repairs_exhausted"
        assert by[(guesser, "lamp")]["describer_repairs"] == 2
    for target, _ in WORDS:
        if target in ("stone", "lamp"):
            continue
        assert by[("guesser-good", target)]["outcome"] == "success"
        assert by[("guesser-good", target)]["turns"] == 1
        assert by[("guesser-slow", target)]["outcome"] == "success"
        assert by[("guesser-slow", target)]["turns"] == 2
        assert by[("guesser-bad", target)]["outcome"] == "failure"
        assert by[("guesser-bad", target)]["turns"] == 3
        empty = by[("guesser-empty", target)]
        if target == "ocean":
            assert empty["abort_reason"] == "guesser_repairs_exhausted"
            assert empty["guesser_repairs"] == 2
        else:
            assert empty["outcome"] == "success" and empty["guesser_repairs"] == 1
    # the apple describer is repaired once per turn and the clue the guesser saw is clean
    assert by[("guesser-bad", "apple")]["describer_repairs"] == 3
    for guesser in GUESSERS:
        for message in by[(guesser, "apple")]["guesser_messages"]:
            if message["role"] == "user":
                assert "apple" not in message["content"].lower()
    # describer prompt: the test's template, with the related words as a list
    prompt = by[("guesser-good", "garden")]["describer_messages"][0]["content"]
    assert prompt.startswith("Describe garden.") and "- plant\n- flower\n- yard" in prompt
    assert "3 tries" in prompt
    first = by[("guesser-good", "garden")]["guesser_messages"][0]["content"]
    assert first.startswith("Guess the word in 3 tries.") and first.endswith(
        "\n\nCLUE: " + by[("guesser-good", "garden")]["clues"][0])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["games"] == 48
    assert summary["successes"] == 29 and summary["summary"] == "29/48 = 0.6042"
    assert summary["outcomes"] == {"aborted": 9, "failure": 10, "success": 29}
    assert summary["mean_turns"] == pytest.approx(69 / 39)
    assert summary["describer_repairs"] == 8 + 7
    assert summary["describer_repairs_exhausted"] == 4
    assert summary["guesser_repairs"] == 9 + 2
    assert summary["guesser_repairs_exhausted"] == 1
    assert summary["api_errors"] == 4
    # stone: 4 games x 2 retries; storm (429), river (500), cloud (timeout): 1 each
    assert summary["http_retries"] == 8 + 3
    assert api.served[429] == 1 and api.served["slow"] == 1
    assert api.served[500] == 4 * 3 + 1
    # Retry-After: 0 was obeyed: only the exponential waits of the other retries were slept
    assert summary["this_run"]["backoff_slept_s"] == pytest.approx(4 * 0.03 + 0.01 + 0.01)
    per = summary["per_guesser"]
    assert per["guesser-good"]["summary"] == "10/12 = 0.8333"
    assert per["guesser-slow"]["mean_turns"] == 2
    assert summary["describer_model"] == "describer" and summary["seed"] == 3
    assert summary["templates"].endswith("templates")
    assert summary["rows_wordguesser"] == 39


def test_rows_are_playpen_shaped_and_key_never_written(scripted_run):
    out = scripted_run["out"]
    rows = read_jsonl(out / "rows_wordguesser.jsonl")
    assert len(rows) == 39
    for row in rows:
        meta = row["meta"]
        assert meta["game"] == "taboo" and meta["game_role"] == "WordGuesser"
        assert {"experiment", "task_id", "outcome", "model", "target_word",
                "related_word"} <= set(meta)
        assert row["messages"][-1]["role"] == "assistant"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * meta["turns"]
        assert meta["outcome"] in ("success", "failure")
    from datasets import load_from_disk

    assert len(load_from_disk(str(out / "hf_dataset"))) == 39
    result = scripted_run["result"]
    assert_key_nowhere(out, result.stdout, result.stderr)
    provenance = json.loads((out / "summary.json").read_text())["provenance"]
    assert KEY not in json.dumps(provenance)


def test_generated_rows_go_through_dataset_taboo(scripted_run, tmp_path):
    import dataset

    out = scripted_run["out"]
    sizes = ["--train-size", 20, "--query-size", 4, "--eval-size", 4, "--seed", 1]
    run_script("dataset.py", "--task", "taboo", "--run-dir", tmp_path / "run", "--dataset-name",
               out / "rows_wordguesser.jsonl", *sizes)
    # the --save-hf-dataset folder too (in-process: the subprocess start is the slow part)
    dataset.main(["--task", "taboo", "--run-dir", str(tmp_path / "run_hf"), "--dataset-name",
                  str(out / "hf_dataset"), *map(str, sizes)])
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text())
                 for name in ("run", "run_hf")]
    for manifest in manifests:
        assert manifest["filter_stats"]["total"]["rows_kept"] == 39
        assert manifest["filter_stats"]["total"]["target_word_from_meta"] == 39
        words = manifest["taboo"]["words_per_split"]
        assert not set(words["eval"]) & (set(words["train_base"]) | set(words["attr_query"]))
        assert not any(k.startswith("success_but") for k in manifest["filter_stats"]["total"])
    assert manifests[0]["taboo"]["words_per_split"] == manifests[1]["taboo"]["words_per_split"]


def test_kill_and_resume_loses_and_repeats_no_game(fake_api, tmp_path):
    api, url = fake_api(block_after=31)      # 2 requests a game: 15 games, then it hangs
    words = write_words(tmp_path / "words.jsonl")
    out = tmp_path / "out"
    args = generator_args(url, out, words, "--checkpoint-every", 5, "--templates-dir",
                          tmp_path / "no_templates", guessers=["guesser-good", "guesser-slow"],
                          games=10)
    # stone (api error) and lamp (describer gives up) also play; good 2 requests, slow 4
    process = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env_with_key(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(api.requests) <= 31 and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.05)
        assert len(api.requests) > 31, "the generator never reached the blocking request"
        time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    before = (out / "games.jsonl").read_bytes()
    games_before = read_jsonl(out / "games.jsonl")
    assert 0 < len(games_before) < 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["games"] == 5 * (len(games_before) // 5)
    # as if the kill had also cut a write in half
    with open(out / "games.jsonl", "ab") as f:
        f.write(b'{"game_key": "guesser-slow#00009", "outcome": "succ')

    api.block_after = None
    api.release.set()
    result = run_generator(args)
    assert "torn last line" in result.stdout
    assert f"{len(games_before)} game(s) already" in result.stdout
    after = (out / "games.jsonl").read_bytes()
    assert after.startswith(before)           # finished games kept byte for byte
    games = read_jsonl(out / "games.jsonl")
    keys = [g["game_key"] for g in games]
    expected = {f"{m}#{i:05d}" for m in ("guesser-good", "guesser-slow") for i in range(10)}
    assert len(keys) == len(set(keys)) == 20 and set(keys) == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["games"] == 20
    assert summary["this_run"]["games_played"] == 20 - len(games_before)
    outcomes = Counter(g["outcome"] for g in games)
    assert summary["outcomes"] == dict(sorted(outcomes.items()))
    assert summary["rows_wordguesser"] == len(read_jsonl(out / "rows_wordguesser.jsonl"))
    assert summary["templates"].startswith("built-in")
    # a third start finds nothing to do
    result = run_generator(args)
    assert "20 game(s) already" in result.stdout and "0 to play" in result.stdout
    assert (out / "games.jsonl").read_bytes() == after


def test_key_from_dotenv_rejected_key_and_changed_settings(fake_api, tmp_path):
    api, url = fake_api()
    words = write_words(tmp_path / "words.jsonl")
    args = generator_args(url, tmp_path / "out", words, guessers=["guesser-good"], games=2)
    # no environment variable: the key comes from ./.env
    (tmp_path / ".env").write_text(f"# test\nexport OPENROUTER_API_KEY='{KEY}'\n")
    result = run_generator(args, key=None, cwd=tmp_path)
    assert "2 games" in result.stdout
    assert_key_nowhere(tmp_path / "out", result.stdout, result.stderr)
    (tmp_path / ".env").unlink()

    # a rejected key stops the run with one line, exit 2, and no game recorded
    bad = run_generator(generator_args(url, tmp_path / "out2", words, guessers=["guesser-good"],
                                       games=2), key="sk-wrong", expect_ok=False)
    assert bad.returncode == 2
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "401" in errors[0] and "sk-wrong" not in bad.stderr
    assert not (tmp_path / "out2" / "games.jsonl").exists() or not (
        tmp_path / "out2" / "games.jsonl").read_text().strip()
    # no key at all
    none = run_generator(args, key=None, cwd=tmp_path, expect_ok=False)
    assert none.returncode == 2 and "OPENROUTER_API_KEY" in none.stderr
    # resuming with another seed would mix two runs' games
    changed = run_generator(args + ["--seed", 4], expect_ok=False)
    assert changed.returncode == 2 and "seed" in changed.stderr


class RedirectingApi(FakeApi):
    """Answers every request with a redirect to `location`."""

    def __init__(self, code, location):
        super().__init__()
        self.code, self.location = code, location

    def reply(self, body):
        with self.lock:
            self.requests.append(body["model"])
        return self.code, {"Location": self.location}, {"error": "moved"}, 0


def recording_server():
    """A second origin (another port of 127.0.0.1) that keeps the method and headers of every
    request it gets and answers each with a valid completion, as a real API elsewhere would."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            seen.append((self.command, self.path, dict(self.headers)))
            data = json.dumps(FakeApi.completion("CLUE: mystery item 0")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", seen


@pytest.mark.parametrize("code, elsewhere", [(301, True), (302, True), (303, True), (307, True),
                                             (308, True), (302, False)])
def test_redirect_is_refused_and_the_key_goes_nowhere_else(tmp_path, monkeypatch, code,
                                                           elsewhere):
    """A redirect stops the run with one error line naming where it pointed: the request, and the
    key in it, is never sent to that address, whichever host it names."""
    other, other_url, seen = recording_server()
    api = None
    try:
        location = f"{other_url}/v1/chat/completions" if elsewhere else "/v2/chat/completions"
        api = RedirectingApi(code, location)
        server, url = serve(api)
        try:
            for name, value in env_with_key().items():
                monkeypatch.setenv(name, value)
            words = write_words(tmp_path / "words.jsonl")
            out = tmp_path / "out"
            result = run_script(SCRIPT, *generator_args(url, out, words,
                                                        guessers=["guesser-good"], games=2),
                                expect_ok=False)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        other.shutdown()
        other.server_close()
    assert not [h for _, _, h in seen if "authorization" in {k.lower() for k in h}], seen
    assert seen == []                         # not even a request without the key
    assert api.requests == ["describer"]      # and no retry: every one would be redirected
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    target = location if elsewhere else url.removesuffix("/v1") + location
    assert len(errors) == 1 and f"HTTP {code}" in errors[0] and target in errors[0], errors
    # the game the redirect cut short is not recorded: a resume plays it
    assert not (out / "games.jsonl").exists() or not (out / "games.jsonl").read_text().strip()
    assert not (out / "summary.json").exists() and not (out / "rows_wordguesser.jsonl").exists()
    assert_key_nowhere(out, result.stdout, result.stderr)


def test_help_lists_flags():
    out = subprocess.run([sys.executable, str(ROOT / SCRIPT), "--help"], capture_output=True,
                         text=True, env=env_with_key(None)).stdout
    for flag in ("--output-dir", "--describer-model", "--guesser-models", "--games-per-guesser",
                 "--max-turns", "--seed", "--checkpoint-every", "--save-hf-dataset",
                 "--word-list", "--instances", "--templates-dir", "--api-base", "--api-key-env",
                 "--timeout", "--max-retries", "--backoff-base", "--describer-repairs",
                 "--guesser-repairs", "--retry-errors"):
        assert flag in out, flag


def test_instances_source_matches_dataset_layout(fake_api, tmp_path):
    """With the clembench instances file, experiments and task ids are the instances'."""
    api, url = fake_api()
    instances = taboo_fixture.write_instances(tmp_path / "instances.json")
    args = ["--output-dir", tmp_path / "out", "--describer-model", "describer",
            "--guesser-models", "guesser-good", "--games-per-guesser", 4, "--instances",
            instances, "--api-base", url, "--timeout", 5, "--templates-dir", tmp_path / "none"]
    run_generator(args)
    ids = taboo_fixture.task_ids()
    for row in read_jsonl(tmp_path / "out" / "rows_wordguesser.jsonl"):
        meta = row["meta"]
        assert (meta["experiment"], meta["task_id"]) == ids[meta["target_word"]]
        assert meta["outcome"] == "success"
        assert row["messages"][0]["content"].startswith("You are playing a collaborative word")


# ---------------------------------------------------------------------------------------------
# a server that echoes the key into its error texts, placed across the 200-character cut

# letters that no other output text holds, so any 6 of them in a row are a piece of the key
LEAK_KEY = "sk-leak-QzXvWpLmTrBnHgFdKsJwYcUa"


class LeakyApi(FakeApi):
    """apple: HTTP 500 (retried, then given up), storm: HTTP 400, river: HTTP 200 with an error
    payload, each with the key straddling the 200th character of the text the generator cuts;
    cloud: a clue that carries 12 characters of the key; a wrong key: a 401 that echoes it."""

    key = LEAK_KEY

    def reply(self, body):
        if body["model"] == "describer":
            target = self.target_of_describer(body["messages"])
            with self.lock:
                self.requests.append(body["model"])
            # '{"error": "' is 11 characters, "{'message': '" 13: the key starts at 190-193
            if target == "apple":
                return 500, {}, {"error": "x" * 179 + self.key + " tail"}, 0
            if target == "storm":
                return 400, {}, {"error": "x" * 181 + self.key + " tail"}, 0
            if target == "river":
                return 200, {}, {"error": {"message": "z" * 180 + self.key + " tail"}}, 0
            if target == "cloud":
                with self.lock:
                    number = len(self.clue_targets)
                    self.clue_targets[number] = target
                return 200, {}, self.completion(f"CLUE: mystery item {number} "
                                                f"{self.key[3:15]}"), 0
        return super().reply(body)

    def rejected(self, authorization):
        return {"error": {"message": "y" * 177 + authorization.removeprefix("Bearer ")}}


def key_pieces(key, n=6):
    return {key[i:i + n] for i in range(len(key) - n + 1)}


def assert_no_piece_of_key(key, folder, *texts):
    blobs = {str(p): p.read_bytes().decode("utf-8", "replace")
             for p in folder.rglob("*") if p.is_file()}
    blobs.update({f"text {i}": t for i, t in enumerate(texts)})
    assert blobs
    for piece in key_pieces(key):
        for where, blob in blobs.items():
            assert piece not in blob, f"{piece!r} of the key is in {where}"


def test_no_piece_of_the_key_reaches_outputs_or_logs(tmp_path):
    server, url = serve(LeakyApi())
    try:
        words = write_words(tmp_path / "words.jsonl")
        out = tmp_path / "out"
        result = run_generator(generator_args(url, out, words, guessers=["guesser-good"],
                                              games=len(WORDS)), key=LEAK_KEY)
        games = {g["target_word"]: g for g in read_jsonl(out / "games.jsonl")}
        # the leaks happened where the test put them, and were caught
        assert games["apple"]["abort_reason"] == "api_error"
        assert games["apple"]["error"].startswith("HTTP 500: ") and "***" in games["apple"]["error"]
        assert games["storm"]["error"].startswith("HTTP 400: ") and "***" in games["storm"]["error"]
        assert "API error" in games["river"]["error"] and "***" in games["river"]["error"]
        assert games["cloud"]["outcome"] == "success" and games["cloud"]["clues"][0].endswith(
            " ***")
        assert_no_piece_of_key(LEAK_KEY, out, result.stdout, result.stderr)
        # a rejected key echoed back at the cut: the one error line holds none of it either
        wrong = "sk-wrong-HqPzRtVxNmLkJgFdSaQwEr"
        rejected = run_generator(generator_args(url, tmp_path / "out2", words,
                                                guessers=["guesser-good"], games=2),
                                 key=wrong, expect_ok=False)
        assert rejected.returncode == 2 and "HTTP 401" in rejected.stderr
        assert_no_piece_of_key(wrong, tmp_path / "out2", rejected.stdout, rejected.stderr)
    finally:
        server.shutdown()
        server.server_close()


def test_redact_key_takes_out_every_piece():
    import generate_synthetic_openrouter as gen

    key = "sk-or-v1-0123456789abcdef"
    assert gen.redact_key(f"a {key} b", key) == "a *** b"
    assert gen.redact_key(f"cut here {key[:9]}", key) == "cut here ***"
    assert gen.redact_key(f"hint {key[:6]}...{key[-6:]} end", key) == "hint ***...*** end"
    assert gen.redact_key(f"short {key[:5]}", key) == f"short {key[:5]}"   # under 6: kept
    assert gen.redact_key("nothing here", key) == "nothing here"
    assert gen.redact_key("text", "") == "text"
