"""What every pipeline step shares: manifest I/O, the one tokenization function, model loading,
provenance and atomic writes.

The rule this module exists for: the token ids bergson scores are exactly the ids finetune.py
trains on. Both get them from `tokenize_example` / `tokenize_split` below, nowhere else.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

IGNORE_INDEX = -100
MANIFEST_SCHEMA_VERSION = 1
SPLIT_COLUMNS = [
    "row_id", "prompt", "completion", "source_split", "group_id", "category", "difficulty",
    "quality", "reward_model_score", "conversation_tokens",
]
TRACKED_LIBRARIES = [
    "torch", "transformers", "peft", "trl", "datasets", "bergson", "sae-lens", "scikit-learn",
    "numpy", "accelerate",
]
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class PipelineError(Exception):
    """A problem with the user's input; scripts print it as one line and exit non-zero."""


def add_alias(parser, old_flag: str, dest: str) -> None:
    """An old spelling of a renamed flag: still accepted, no longer shown in --help."""
    import argparse

    # the alias parses exactly like the flag it stands for (same type, choices, nargs)
    canonical = next(a for a in parser._actions if a.dest == dest and a.option_strings)
    parser.add_argument(old_flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                        type=canonical.type, choices=canonical.choices, nargs=canonical.nargs)


def seed_type(text: str) -> int:
    """argparse type of a --seed: numpy's generators take only seeds >= 0."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed must be >= 0, got {value}")
    return value


# what the machine, not the code, can make a write fail with: said in one line, not a traceback
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def run_main(main) -> None:
    """Run a script's main(), turning PipelineError (and a write refused by the machine: no
    permission, a full or read-only disk) into a one-line message and exit code 2."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; nothing was published (outputs are "
              "staged and renamed only when complete)", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# provenance and atomic writes


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def code_fingerprint() -> str:
    """sha256 over the repository's scripts and recipes as they are on disk (top-level *.py,
    recipes/*.toml, device/*.sh): what ran, even where the git metadata is not the working tree's
    (the GPU machine's copy kept an older .git than the files it ran; results/2026-12-02-verdict.md).
    `git ls-files` would miss that, so the files themselves are hashed."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), *here.glob("recipes/*.toml"), *here.glob("device/*.sh")]):
        digest.update(path.relative_to(here).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(seed: int | None = None, manifest: str | Path | None = None) -> dict:
    return {
        "argv": [Path(sys.argv[0]).name] + sys.argv[1:],
        "cwd": os.getcwd(),
        "git_commit": git_commit(),
        "code_sha256": code_fingerprint(),
        "library_versions": library_versions(),
        "hostname": platform.node(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "manifest": str(Path(manifest).resolve()) if manifest else None,
    }


def temp_prefix(final: str | Path) -> str:
    """`.<name>.<pid>@<host>.`, the start of a temp file or staging folder's name beside final:
    the name records its writer, so the runner's sweep of temp left by killed runs can tell a
    live writer's (a training started by hand into the run dir) from a dead one's."""
    return f".{Path(final).name}.{os.getpid()}@{platform.node()}."


def temp_writer(name: str) -> tuple[int, str] | None:
    """(pid, host) from a temp_prefix name (`.<name>.<pid>@<host>.<random>.tmp`; dataset.py's
    staging names have the same tail), None for a name that records no writer."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    # the last `.<pid>@`: the final name before it may hold dots; the random part has none
    head, sep, rest = name[:-len(".tmp")].rpartition("@")
    pid = head.rpartition(".")[2]
    host = rest.rpartition(".")[0]
    return (int(pid), host) if sep and pid.isdigit() and host else None


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str | Path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def staging_dir(final: str | Path) -> Path:
    """A fresh sibling temp directory; `publish_dir` renames it onto `final` when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))


def publish_dir(staged: Path, final: str | Path) -> None:
    final = Path(final)
    os.chmod(staged, 0o755)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)


# An output folder carries this stamp naming the script that wrote it: --overwrite replaces only a
# folder the same script wrote, never someone else's run folder or the checkout.
OUTPUT_STAMP = ".written_by.json"


def refuse_working_directory(path: str | Path, flag: str) -> Path:
    """An output that is the working directory (a checkout, say) or a folder above it would be
    written into, or replaced, along with everything else there. Returns the resolved path."""
    resolved = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise PipelineError(f"{flag} {path} is the working directory or a folder above it; "
                            "name a place of its own")
    return resolved


def check_output_place(path: str | Path, flag: str, inputs=(), containers=()) -> Path:
    """The rules every output, file or folder, obeys (check_output_dir and check_output_file call
    this first; dataset.py's --run-dir the first of them): never the working directory or a
    folder above it; never one of the command's inputs, a folder holding one, or a place inside
    an input folder (an adapter, a score folder); `containers` are inputs an output may sit
    inside (the run folder report.py reads and writes its report into) but never be or hold."""
    path = Path(path)
    resolved = refuse_working_directory(path, flag)
    for item, may_contain in [*((i, False) for i in inputs), *((c, True) for c in containers)]:
        if item is None:
            continue
        source = Path(item).resolve()
        if source == resolved:
            raise PipelineError(f"{flag} {path} is the input {item}; writing it would replace "
                                "that input: name another place")
        if resolved in source.parents:
            raise PipelineError(f"{flag} {path} holds the input {item}; replacing it would delete "
                                "that input: name another folder")
        if not may_contain and source.is_dir() and source in resolved.parents:
            raise PipelineError(f"{flag} {path} lies inside the input {item}; writing there "
                                "would change that input: name a place outside it")
    return path


def check_writable(path: Path, flag: str, folder: bool) -> None:
    """The nearest existing folder at or above the output place (above it, for a file) must be
    writable."""
    places = [path.resolve(), *path.resolve().parents] if folder else path.resolve().parents
    parent = next((p for p in places if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{flag} {path} cannot be written ({parent} is not a writable "
                            "folder)")


def check_output_dir(path: str | Path, overwrite: bool, script: str, inputs=(),
                     flag: str = "--output-dir", containers=(), add_to: bool = False) -> Path:
    """Refuse, before any work, an output folder that would destroy something: what
    check_output_place refuses, a file, a folder another script (or a person) wrote, and a
    non-empty folder without --overwrite; also a place that cannot be written. add_to: the script
    adds files to the folder rather than replacing it (sae_analysis.py, one NPZ per SAE): its own
    earlier folder is fine without --overwrite, and it stamps the folder itself."""
    path = check_output_place(path, flag, inputs, containers)
    if path.exists() and not path.is_dir():
        raise PipelineError(f"{flag} {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        writer = output_writer(path)
        if not overwrite and not (add_to and writer == script):
            if overwrite is None:   # the script has no --overwrite
                raise PipelineError(f"{flag} {path} is not empty and was not written by "
                                    f"{script}: name another folder")
            raise PipelineError(f"{flag} {path} exists and is not empty "
                                "(pass --overwrite to replace it)")
        if writer != script:
            raise PipelineError(f"{flag} {path} was not written by {script} "
                                f"({'written by ' + writer if writer else 'no ' + OUTPUT_STAMP}); "
                                "name another folder, or delete it yourself if it should go")
    check_writable(path, flag, folder=True)
    return path


def check_output_file(path: str | Path, script: str, flag: str = "--output-json", inputs=(),
                      overwrite: bool | None = None) -> Path:
    """Refuse, before any work, an output file that would destroy something: what
    check_output_place refuses, a folder, a file in a folder another script wrote, and an existing
    file this script did not write (its JSON provenance names another script, or it has none);
    with overwrite=False (a script with an --overwrite flag, not passed) any existing file. The
    file itself is replaced atomically at the end."""
    path = check_output_place(path, flag, inputs)
    if path.is_dir():
        raise PipelineError(f"{flag} {path} is a folder; name a file")
    owner = stamped_owner(path.parent)
    if owner is not None and owner[1] != script:
        raise PipelineError(f"{flag} {path} lies in {owner[0]}, a folder {owner[1]} "
                            "wrote: name a place outside it")
    if path.exists():
        if overwrite is False:
            raise PipelineError(f"{flag} {path} already exists (pass --overwrite to replace it)")
        writer = file_writer(path)
        if writer != script and not (overwrite and writer is None):
            raise PipelineError(f"{flag} {path} exists and was not written by {script} "
                                f"({'written by ' + writer if writer else 'no provenance'}); "
                                "name another file, or delete it yourself if it should go")
    check_writable(path, flag, folder=False)
    return path


def file_writer(path: str | Path) -> str | None:
    """The script a JSON output file's provenance names (argv[0]), or None."""
    try:
        with open(path) as f:
            head = f.read(1)
            if head != "{":
                return None
            data = json.loads(head + f.read())
        return Path(data["provenance"]["argv"][0]).name
    except (OSError, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        return None


def stamped_owner(path: str | Path) -> tuple[Path, str] | None:
    """(folder, script) of the nearest folder at or above path whose stamp names its writer."""
    resolved = Path(path).resolve()
    for folder in [resolved, *resolved.parents]:
        writer = output_writer(folder)
        if writer:
            return folder, writer
    return None


def output_writer(path: str | Path) -> str | None:
    """The script named by a folder's stamp, or None."""
    try:
        return json.loads((Path(path) / OUTPUT_STAMP).read_text()).get("script")
    except (OSError, ValueError, AttributeError):
        return None


def stamp_output(folder: str | Path, script: str) -> None:
    """Mark a (staged) output folder as written by script, for check_output_dir's --overwrite."""
    (Path(folder) / OUTPUT_STAMP).write_text(json.dumps({"script": script}) + "\n")


@contextlib.contextmanager
def staged_output(final: str | Path, script: str):
    """Yield a fresh sibling temp folder; on success stamp it and rename it onto final (replacing
    what was there), on any failure or interrupt remove it, so no half-written output stays."""
    staged = staging_dir(final)
    try:
        yield staged
        stamp_output(staged, script)
        publish_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from path (every JSON file the scripts read is one): another shape, bad JSON
    or a missing file is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{what} {path} is not valid JSON (line {err.lineno}: {err.msg})")
    except UnicodeDecodeError:
        raise PipelineError(f"{what} {path} is not a text file")
    if not isinstance(data, dict):
        raise PipelineError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """Rows of a JSON-lines file; a bad line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():  # a trailing blank line is fine
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PipelineError(f"{what} {path} line {line_number} is not JSON: {err.msg}")
    return rows


# ---------------------------------------------------------------------------------------------
# manifests: runs/<run>/manifest.json, split paths relative to the manifest's folder


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest = read_json(path, "manifest")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise PipelineError(f"manifest {path} has no 'splits' mapping")
    for name, entry in splits.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise PipelineError(f"manifest {path}: split '{name}' has no 'path' string")
        split_dir = resolve_split_path(path, entry)
        if not split_dir.exists():
            raise PipelineError(f"manifest {path}: split '{name}' points to {split_dir}, "
                                "which does not exist")
    manifest["_path"] = str(path.resolve())
    return manifest


def resolve_split_path(manifest_path: str | Path, entry: dict) -> Path:
    split_path = Path(entry["path"])
    if not split_path.is_absolute():
        split_path = Path(manifest_path).resolve().parent / split_path
    return split_path


def load_split(manifest: dict, name: str):
    from datasets import load_from_disk

    if name not in manifest["splits"]:
        raise PipelineError(f"manifest {manifest['_path']} has no split '{name}' "
                            f"(it has: {', '.join(manifest['splits'])})")
    split_dir = resolve_split_path(manifest["_path"], manifest["splits"][name])
    try:
        dataset = load_from_disk(str(split_dir))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise PipelineError(f"split '{name}' at {split_dir} cannot be read: {err}")
    missing = [c for c in ("row_id", "prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise PipelineError(f"split '{name}' at {split_dir} lacks column(s) {', '.join(missing)}")
    return dataset


def relative_to(path: str | Path, base_dir: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(base_dir).resolve())


# ---------------------------------------------------------------------------------------------
# the one tokenization function


def prompt_messages(prompt) -> list[dict]:
    """Prompts are stored as chat messages; a bare string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


TEXT_FORMATS = ("chat", "flat")  # a split's `text_format` column; no column = chat


def flat_turn(message: dict) -> str:
    return f"{message['role'].upper()}: {message['content']}"


def render_prompt(tokenizer, prompt, text_format: str = "chat") -> str:
    """The text a model continues from: the chat template with the generation prompt, or (flat,
    the seed project's Taboo format) every turn as `ROLE: content`, turns joined by blank lines,
    ending in the `ASSISTANT:` cue of the turn to come. eval_words.py generates from this text,
    so generation sees the prompt that training masked."""
    messages = prompt_messages(prompt)
    if text_format == "flat":
        return "\n\n".join([flat_turn(m) for m in messages] + ["ASSISTANT:"])
    if text_format != "chat":
        raise PipelineError(f"text_format {text_format!r}: expected one of "
                            f"{', '.join(TEXT_FORMATS)} (the split's text_format column, written "
                            "by dataset.py --text-format)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt_and_completion(tokenizer, prompt, completion: str,
                                 text_format: str = "chat") -> tuple[str, str]:
    """Split the rendering of prompt+completion into the prompt part (ending in the generation
    prompt) and the completion part. chat: the assistant's text and its end-of-turn marker from the
    chat template; flat: " " + the text + the tokenizer's eos token (as TRL ends a plain-text
    completion), so the model learns to stop after its guess."""
    prompt_text = render_prompt(tokenizer, prompt, text_format)
    if text_format == "flat":
        return prompt_text, " " + completion + (tokenizer.eos_token or "")
    messages = prompt_messages(prompt)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise PipelineError("the tokenizer's chat template does not render the prompt as a prefix "
                            "of prompt+completion, so the completion cannot be isolated")
    return prompt_text, full_text[len(prompt_text):]


def tokenize_example(tokenizer, prompt, completion: str, max_length: int,
                     text_format: str = "chat") -> dict:
    """input_ids = prompt ids + completion ids, truncated on the right to max_length;
    labels = -100 over the prompt, the ids themselves over the completion.

    Prompt and completion are tokenized separately so the boundary never shifts with merges across
    it; special tokens come only from the rendered text (chat template, or the flat format's eos),
    never added twice. text_format: the row's (dataset.py decides it once per run)."""
    prompt_text, completion_text = render_prompt_and_completion(tokenizer, prompt, completion,
                                                                text_format)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "num_tokens": len(input_ids),
        "num_supervised_tokens": sum(1 for x in labels if x != IGNORE_INDEX),
        "truncated": len(prompt_ids) + len(completion_ids) > max_length,
    }


def row_text_format(row: dict) -> str:
    """The rendering a row asks for: its text_format column (dataset.py), chat without one."""
    return row.get("text_format") or "chat"


def tokenize_split(dataset, tokenizer, max_length: int, desc: str = "tokenize"):
    """Adds input_ids/labels/num_tokens/num_supervised_tokens/truncated to every row."""
    def tokenize_row(row):
        return tokenize_example(tokenizer, row["prompt"], row["completion"], max_length,
                                row_text_format(row))

    return dataset.map(tokenize_row, desc=desc, load_from_cache_file=False)


# ---------------------------------------------------------------------------------------------
# models


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"adapter directory {path} does not exist")
    if not (path / "adapter_config.json").is_file():
        raise PipelineError(f"adapter directory {path} has no adapter_config.json")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise PipelineError(f"adapter directory {path} has no adapter weights "
                            f"({' or '.join(ADAPTER_WEIGHT_FILES)})")
    return path


def pick_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(precision: str, device):
    """bf16 on GPU, fp32 on CPU unless told otherwise."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# ---------------------------------------------------------------------------------------------
# data parallelism: one process per GPU under torchrun


def init_distributed(requested_device: str = "auto"):
    """(rank, world_size, device). Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1) the
    process joins the group: NCCL with GPU LOCAL_RANK, or gloo on the CPU (how the tests run the
    multi-process paths). Started plainly: (0, 1, the --device it was given)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested_device)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise PipelineError(f"--device {requested_device} under torchrun: each process takes "
                                "GPU LOCAL_RANK; pass --device auto or cuda")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def shard_indices(lengths: list[int], rank: int, world: int) -> list[int]:
    """This process's rows: dealt out in descending length order, so every process gets about
    the same number of tokens; sorted back into row order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return sorted(order[rank::world])


def gather_to_first(obj, rank: int, world: int):
    """[rank 0's obj, rank 1's obj, ...] on rank 0; None on the others."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def sum_over_processes(values, device):
    """Element-wise sum of a list of numbers over all processes (float64); unchanged alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    buffer = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return buffer.tolist()


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load a tokenizer from {name_or_path}: "
                            f"{str(err).splitlines()[0]}")
    if tokenizer.chat_template is None:
        raise PipelineError(f"tokenizer at {name_or_path} has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# With PyTorch's cuDNN SDPA backend allowed, Qwen2.5-Coder-0.5B's training loss turned NaN at
# step 69 of the base adapter on the H200 (2026-12-02; SDPA with cuDNN off and eager trained the
# same steps to equal losses), and cuDNN attention costs ~1.9 ms of CPU per call when the shapes
# change every batch. So "sdpa" is SDPA without cuDNN; SDPA_CUDNN keeps PyTorch's own choice.
SDPA_CUDNN = "sdpa_cudnn"


def set_attention(attn_implementation: str | None) -> str | None:
    """The transformers attn_implementation for ours; sets the process's SDPA backends."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(attn_implementation == SDPA_CUDNN)
    return "sdpa" if attn_implementation == SDPA_CUDNN else attn_implementation


def weight_load_errors() -> tuple:
    """What loading a model or adapter raises for a missing, unreadable or truncated file."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


def load_base_model(name_or_path: str, dtype, device, attn_implementation: str | None = "sdpa"):
    from transformers import AutoModelForCausalLM

    attn_implementation = set_attention(attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except weight_load_errors() as err:
        raise PipelineError(f"cannot load model {name_or_path}: {str(err).splitlines()[0]}")
    return model.to(device)


def load_model_with_adapter(base_model: str, adapter_path: str | None, dtype, device,
                            trainable: bool = False, attn_implementation: str | None = "sdpa"):
    """The base model, with a saved LoRA adapter on top when adapter_path is given."""
    from peft import PeftModel

    model = load_base_model(base_model, dtype, device, attn_implementation)
    if adapter_path is None:
        return model
    check_adapter_dir(adapter_path)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)
    except weight_load_errors() as err:
        raise PipelineError(f"cannot load the adapter in {adapter_path}: "
                            f"{str(err).splitlines()[0]}")
    return model.to(device)


def base_model_of_adapter(adapter_path: str | Path) -> str | None:
    config = read_json(Path(adapter_path) / "adapter_config.json", "adapter config")
    return config.get("base_model_name_or_path")


DEFAULT_BASE_MODEL = "google/gemma-3-1b-it"  # the seed project's model


def resolve_base_model(base_model: str | None, adapter_path: str | Path | None = None) -> str:
    """--base-model, else the base model recorded in the adapter, else the default. A local
    path that does not exist is reported as such (transformers would call it a bad repo id)."""
    name = (base_model or (base_model_of_adapter(adapter_path) if adapter_path else None)
            or DEFAULT_BASE_MODEL)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise PipelineError(f"base model folder {name} does not exist")
    return name


# ---------------------------------------------------------------------------------------------
# batching


def length_sorted_batches(lengths: list[int], max_rows: int, max_tokens: int | None = None):
    """Batches of row indices in descending length order: little padding, and the longest batch
    first so an out-of-memory shows up at once. A batch holds at most max_rows rows and, if given,
    at most max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        too_many_tokens = max_tokens is not None and longest * (len(current) + 1) > max_tokens
        if current and (len(current) >= max_rows or too_many_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: list[dict], pad_token_id: int, device):
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return input_ids.to(device), labels.to(device), attention_mask.to(device)


def token_nll_sums(model, input_ids, labels, attention_mask):
    """Per-row sum of next-token NLL over supervised positions, and the count of those positions.

    Logits are computed only at positions some row supervises (`logits_to_keep` with an index
    tensor), so prompt positions never pay the vocabulary-sized projection; the NLL is taken in
    fp32 so bf16 models don't lose precision in the sum."""
    import torch
    import torch.nn.functional as F

    target_labels = labels[:, 1:]
    keep = (target_labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        zeros = torch.zeros(labels.shape[0], device=labels.device)
        return zeros, zeros.to(torch.long)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=keep).logits
    targets = target_labels[:, keep]
    # (tokens, vocab) rows: with the vocabulary on dim 1 of a 3-d tensor CUDA takes a slow
    # strided log-softmax kernel (benchmarks/NOTES.md has the profile)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    mask = targets != IGNORE_INDEX
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# selections: continuation manifests (score.py, the SAE predictor, rank-window ablations)


def write_selection_manifest(parent: dict, output_path: str | Path, subsets: dict, selection: dict,
                             carry_splits=("eval", "attr_query")) -> Path:
    """A manifest of the main schema whose splits are the given subsets (datasets.Dataset, saved
    under <manifest folder>/data/<name>) plus the parent's carry_splits, pointed to in place.
    Subset folders are staged and renamed; the manifest is written last, so a failure leaves no
    manifest pointing at half-written data."""
    output_path = Path(output_path)
    base_dir = output_path.parent
    entries = {}
    for name, dataset in subsets.items():
        final = base_dir / "data" / name
        staged = staging_dir(final)
        dataset.save_to_disk(str(staged))
        publish_dir(staged, final)
        entries[name] = {"path": relative_to(final, base_dir), "num_rows": len(dataset)}
    for name in carry_splits:
        if name in parent["splits"]:
            source = resolve_split_path(parent["_path"], parent["splits"][name])
            entries[name] = {"path": relative_to(source, base_dir),
                             "num_rows": parent["splits"][name]["num_rows"]}
    manifest = {key: value for key, value in parent.items()
                if key not in ("splits", "provenance", "_path", "checks", "split_notes", "kind")}
    manifest.update({"kind": "continuation", "parent_manifest": parent["_path"],
                     "splits": entries, "selection": selection,
                     "provenance": provenance(seed=selection.get("seed"),
                                              manifest=parent["_path"])})
    write_json_atomic(output_path, manifest)
    return output_path


def split_fingerprint(dataset) -> str:
    """sha256 over row_id, prompt and completion of every row, in order: two splits with the same
    ids but other text (a clean pool and its corrupted twin) get different fingerprints."""
    import hashlib

    digest = hashlib.sha256()
    rows = dataset.select_columns(["row_id", "prompt", "completion"])
    for batch in rows.iter(batch_size=1024):
        for row in zip(batch["row_id"], batch["prompt"], batch["completion"]):
            # one JSON array per row, keys sorted: unambiguous and independent of dict order
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return "sha256:" + digest.hexdigest()
