"""SAE step on the tiny model: sae_analysis.py (hook, pooling, NPZ), train_sae.py (a sae-lens SAE
trained on the residual stream) and train_bidir_classifier.py (ridge predictor of the attribution
rank, grouped evaluation, metadata validation, selection manifest), offline on the CPU."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

import tiny
from conftest import run_script

LAYER = 0  # hidden_states[L + 1] is the raw block output only below the last layer
D_SAE = 64
MAX_TOKENS = 256


def load(path):
    return json.loads(path.read_text())


def split_dir(run_dir, name):
    """A split's folder as the manifest records it (score_pool shares train_base's folder)."""
    return run_dir / load(run_dir / "manifest.json")["splits"][name]["path"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_run(run_dir, n_train=160, n_eval=20, n_query=20):
    """A manifest of the main schema written directly (not by dataset.py, so these tests pin only
    the manifest contract): rows of tiny.smoltalk_rows where the three rows of an instruction
    share one group_id, category and difficulty, so grouped splitting has real groups to keep."""
    from datasets import Dataset

    rows = []
    for i, source in enumerate(tiny.smoltalk_rows(n_train + n_eval + n_query, seed=11)):
        group = i // 3
        category = tiny.CATEGORIES[group % len(tiny.CATEGORIES)]
        difficulty = tiny.DIFFICULTIES[group % len(tiny.DIFFICULTIES)]
        rows.append({
            "row_id": f"train:{i}", "prompt": source["messages"][:-1],
            "completion": source["messages"][-1]["content"], "source_split": "train",
            "group_id": f"{category}::{difficulty}::train::g{group}", "category": category,
            "difficulty": difficulty, "quality": source["quality"],
            "reward_model_score": source["reward_model_score"],
            "conversation_tokens": source["conversation_tokens"]})
    # split on group boundaries (multiples of 3 rows) so no group is in two splits
    bounds = {"train_base": (0, n_train), "eval": (n_train, n_train + n_eval),
              "attr_query": (n_train + n_eval, n_train + n_eval + n_query)}
    splits = {}
    for name, (start, stop) in bounds.items():
        start, stop = 3 * math.ceil(start / 3), 3 * math.ceil(stop / 3)
        Dataset.from_list(rows[start:stop]).save_to_disk(str(run_dir / "data" / name))
        splits[name] = {"path": f"data/{name}", "num_rows": len(rows[start:stop])}
    splits["score_pool"] = dict(splits["train_base"])
    run_dir.joinpath("manifest.json").write_text(json.dumps(
        {"schema_version": 1, "task": "chat", "splits": splits, "provenance": {}}))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("sae") / "run")


@pytest.fixture(scope="module")
def model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenized(run_dir, tiny_model):
    from datasets import load_from_disk

    from pipeline import load_tokenizer, tokenize_example

    tokenizer = load_tokenizer(str(tiny_model))
    rows = load_from_disk(str(split_dir(run_dir, "score_pool"))).to_list()
    return {r["row_id"]: tokenize_example(tokenizer, r["prompt"], r["completion"], MAX_TOKENS)
            for r in rows}


def hidden_after_layer(model, input_ids):
    """The block output as transformers itself reports it (independent of the hook)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), output_hidden_states=True)
    return out.hidden_states[LAYER + 1][0]


@pytest.fixture(scope="module")
def random_sae(tmp_path_factory, model, tokenized):
    """A random JumpReLU SAE (the architecture of the default gemma-scope SAE) in sae-lens's
    on-disk format, scaled so a fair share of features fires on the tiny model's activations."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    ids = next(iter(tokenized.values()))["input_ids"]
    scale = hidden_after_layer(model, ids).norm(dim=-1).mean().item()
    torch.manual_seed(3)
    sae = JumpReLUSAE(JumpReLUSAEConfig(
        d_in=32, d_sae=D_SAE, metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post",
                                                   model_name="tiny")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, D_SAE) / scale)
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.01 * torch.randn(32))
        sae.threshold.copy_(1.5 * torch.rand(D_SAE))
    path = tmp_path_factory.mktemp("random_sae") / "jumprelu_random"
    sae.save_model(path)
    return path


@pytest.fixture(scope="module")
def features(run_dir, tiny_model, random_sae):
    out = run_dir / "sae_features"
    run_script("sae_analysis.py", "--manifest", run_dir / "manifest.json", "--model-name",
               tiny_model, "--sae-path", random_sae, "--output-dir", out, "--max-tokens",
               MAX_TOKENS, "--batch-size", 4)
    return out


def test_npz_shapes_stats_and_summary(features, tokenized):
    summary = load(features / "summary.json")
    npz = np.load(features / summary["npz"])
    n = len(tokenized)
    assert summary["npz"] == "jumprelu_random.npz"
    assert npz["feature_activation_mean"].shape == (n, D_SAE)
    assert npz["feature_activation_mean"].dtype == np.float32
    assert list(npz["stat_names"]) == summary["stat_names"]
    for name in summary["stat_names"]:
        assert npz[name].shape == (n,) and np.isfinite(npz[name]).all()
    assert set(npz["row_id"]) == set(tokenized)
    pooled = {r: tokenized[r]["num_supervised_tokens"] for r in tokenized}
    assert [int(x) for x in npz["n_tokens_pooled"]] == [pooled[r] for r in npz["row_id"]]
    assert summary["total_tokens"] == sum(pooled.values())
    assert summary["total_tokens_forwarded"] == sum(t["num_tokens"] for t in tokenized.values())
    # a non-trivial encoding: some but not all features fire per token
    assert 1 < summary["mean_l0"] < D_SAE - 1
    assert summary["dead_features"] == int((npz["feature_frequency"] == 0).sum())
    assert ((npz["frac_features_active"] > 0) & (npz["frac_features_active"] <= 1)).all()
    assert summary["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    assert summary["layer"] == LAYER and summary["d_sae"] == D_SAE
    assert summary["pooling"] == "completion" and summary["n_examples"] == n
    assert summary["sae_path"].endswith("jumprelu_random") and summary["sae_release"] is None
    assert summary["tokens_per_s"] > 0 and summary["wall_clock_s"] > 0
    assert summary["provenance"]["argv"][0] == "sae_analysis.py"


def test_hook_captures_block_output_and_stops(model, tokenized):
    import torch
    from peft import LoraConfig, get_peft_model

    from sae_analysis import decoder_layers, residual_after_layer

    ids = list(tokenized.values())[5]["input_ids"]
    expected = hidden_after_layer(model, ids)
    layers = decoder_layers(model)
    fired = []
    later = layers[LAYER + 1].register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            got = residual_after_layer(model, layers[LAYER], torch.tensor([ids]),
                                       torch.ones(1, len(ids), dtype=torch.long))
    finally:
        later.remove()
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert not fired, "the forward pass went on past the captured layer"
    # a LoRA-wrapped model: the layers are found through the PeftModel, same output
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        wrapped = residual_after_layer(peft_model, decoder_layers(peft_model)[LAYER],
                                       torch.tensor([ids]),
                                       torch.ones(1, len(ids), dtype=torch.long))
    assert torch.allclose(wrapped[0], expected, atol=1e-6)  # LoRA B starts at zero


def test_pooled_mean_matches_hand_computation(features, model, tokenized, random_sae):
    import torch
    from sae_lens import SAE

    from pipeline import IGNORE_INDEX

    npz = np.load(features / "jumprelu_random.npz")
    sae = SAE.load_from_disk(str(random_sae))
    index = {r: i for i, r in enumerate(npz["row_id"])}
    checked = 0
    for row_id in list(tokenized)[:: len(tokenized) // 4]:
        example = tokenized[row_id]
        hidden = hidden_after_layer(model, example["input_ids"])
        mask = torch.tensor(example["labels"]) != IGNORE_INDEX
        with torch.no_grad():
            acts = sae.encode(hidden[mask])
        i = index[row_id]
        np.testing.assert_allclose(npz["feature_activation_mean"][i], acts.mean(0).numpy(),
                                   rtol=1e-4, atol=1e-6)
        assert npz["mean_l0"][i] == pytest.approx((acts != 0).sum(-1).float().mean().item())
        assert npz["max_activation"][i] == pytest.approx(acts.max().item(), rel=1e-5)
        assert npz["frac_features_active"][i] == pytest.approx(
            (acts != 0).any(0).float().mean().item())
        checked += 1
    assert checked >= 4


def test_pool_all_and_layer_resolution(tmp_path, run_dir, tiny_model, random_sae, model,
                                       tokenized):
    """--pool all in-process (the subprocess run above covers the CLI), and the layer rules."""
    import torch
    from sae_lens import SAE

    import sae_analysis
    from pipeline import PipelineError

    sae_analysis.main(["--manifest", str(run_dir / "manifest.json"), "--model-name",
                       str(tiny_model), "--sae-path", str(random_sae), "--output-dir",
                       str(tmp_path), "--max-examples", "6", "--pool", "all", "--layer",
                       str(LAYER), "--max-tokens", str(MAX_TOKENS),
                       # tiny SAE chunks and odd batches: pooling must not depend on either
                       "--sae-chunk-tokens", "5", "--batch-size", "4"])
    npz = np.load(tmp_path / "jumprelu_random.npz")
    assert len(npz["row_id"]) == 6
    sae = SAE.load_from_disk(str(random_sae))
    example = tokenized[str(npz["row_id"][2])]
    assert npz["n_tokens_pooled"][2] == example["num_tokens"] - 1
    with torch.no_grad():
        acts = sae.encode(hidden_after_layer(model, example["input_ids"])[1:])
    np.testing.assert_allclose(npz["feature_activation_mean"][2], acts.mean(0).numpy(),
                               rtol=1e-4, atol=1e-6)
    assert load(tmp_path / "summary.json")["pooling"] == "all"

    assert sae_analysis.resolve_layer(sae, None, "x") == LAYER
    with pytest.raises(PipelineError, match="disagrees"):
        sae_analysis.resolve_layer(sae, LAYER + 1, "x")
    sae.cfg.metadata.hook_name = None
    with pytest.raises(PipelineError, match="pass --layer"):
        sae_analysis.resolve_layer(sae, None, "x")
    assert sae_analysis.resolve_layer(sae, 1, "x") == 1
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    with pytest.raises(PipelineError, match="hook_resid_post"):
        sae_analysis.resolve_layer(sae, None, "x")


# ---------------------------------------------------------------------------------------------
# train_sae.py


@pytest.fixture(scope="module")
def trained_sae(run_dir, tiny_model):
    out = run_dir / "local_sae"
    run_script("train_sae.py", "--manifest", run_dir / "manifest.json", "--model-name",
               tiny_model, "--layer", LAYER, "--d-sae", D_SAE, "--k", 8, "--steps", 250,
               "--batch-tokens", 256, "--lr", 3e-3, "--max-length", MAX_TOKENS,
               "--holdout-fraction", 0.15, "--output-dir", out)
    return out


def test_train_sae_loads_in_sae_lens_and_reconstructs(trained_sae, model, tokenized):
    import torch
    from sae_lens import SAE

    summary = load(trained_sae / "training_summary.json")
    sae = SAE.load_from_disk(str(trained_sae))
    assert sae.cfg.architecture() == "topk" and sae.cfg.d_sae == D_SAE and sae.cfg.d_in == 32
    assert sae.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert sae.cfg.normalize_activations == "none"  # the scaling factor is folded in
    assert summary["activation_normalization"]["scaling_factor"] > 0
    assert summary["reload_max_abs_diff"] < 1e-5
    heldout = summary["heldout"]
    assert 0.5 < heldout["explained_variance"] <= 1
    assert heldout["mean_l0"] == pytest.approx(8)
    assert 0 <= heldout["dead_features"] <= D_SAE
    assert summary["steps"] == 250 and len(summary["loss_curve"]) == 5
    assert summary["provenance"]["argv"][0] == "train_sae.py"

    # recompute the held-out numbers from transformers' hidden states and the loaded SAE
    held = [tokenized[r] for r in summary["heldout_row_ids"]]
    assert held and not set(summary["heldout_row_ids"]) - set(tokenized)
    x = torch.cat([hidden_after_layer(model, t["input_ids"])[1:] for t in held])
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    # the TopK definition by hand: rescaled pre-activations, k largest kept
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
    top = pre.topk(8, dim=-1)
    manual = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert torch.allclose(acts, manual, atol=1e-5)
    explained = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert heldout["tokens"] == x.shape[0]
    assert heldout["explained_variance"] == pytest.approx(explained.item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# train_bidir_classifier.py


def fabricate(run_dir, tmp_path, n_features=40, noise=0.2, drop=(3, 50)):
    """An NPZ of sparse non-negative feature means over the score_pool rows and score.py-style
    scores with a planted linear relation to log1p(features); rows in drop have no score."""
    from datasets import load_from_disk

    rows = load_from_disk(str(split_dir(run_dir, "score_pool"))).to_list()
    rng = np.random.default_rng(0)
    n = len(rows)
    means = (rng.exponential(1.0, (n, n_features)) * (rng.random((n, n_features)) < 0.4))
    means[:, -2:] = 0  # two dead features
    stats = {"n_tokens": rng.integers(20, 200, n).astype(np.float32),
             "mean_l0": rng.random(n).astype(np.float32)}
    signal = np.log1p(means) @ rng.normal(size=n_features)
    score = (signal - signal.mean()) / signal.std() + noise * rng.normal(size=n)
    score[list(drop)] = np.nan
    order = [i for i in np.argsort(-np.nan_to_num(score, nan=-np.inf)) if np.isfinite(score[i])]
    rank = {int(i): r for r, i in enumerate(order, start=1)}
    features = tmp_path / "features"
    features.mkdir()
    np.savez(features / "fake.npz", row_id=np.array([r["row_id"] for r in rows]),
             feature_activation_mean=means.astype(np.float32), stat_names=np.array(list(stats)),
             **stats)
    scores = tmp_path / "attribution"
    scores.mkdir()
    with open(scores / "train_scores.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"row_id": row["row_id"], "score": float(score[i]),
                                "rank": rank.get(i), "num_tokens": 10,
                                "num_supervised_tokens": 5}) + "\n")
    from pipeline import split_fingerprint

    pool = load_from_disk(str(split_dir(run_dir, "score_pool")))
    (scores / "summary.json").write_text(json.dumps(
        {"train_split": "score_pool", "query_split": "attr_query", "manifest": "x",
         "train_fingerprint": split_fingerprint(pool)}))
    return features, scores, rows


@pytest.fixture(scope="module")
def predictor(run_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    features, scores, rows = fabricate(run_dir, tmp)
    out = tmp / "sae_predictor"
    run_script("train_bidir_classifier.py", "--manifest", run_dir / "manifest.json",
               "--scores-from", scores, "--sae-dir", features, "--top-k", 24,
               "--output-root", out, "--write-selection", 16, "--seed", 5)
    return out, rows


def test_predictor_recovers_planted_relation(predictor):
    out, rows = predictor
    summary = load(out / "summary.json")
    assert summary["n_rows"] == len(rows) and summary["n_excluded_non_finite_score"] == 2
    assert summary["n_scored"] == len(rows) - 2
    assert summary["n_features_used"] == 38 and summary["n_dead_features_dropped"] == 2
    sae = summary["heldout"]["sae_predictor"]
    assert sae["spearman"] > 0.8 and sae["pearson"] > 0.8
    assert sae["top_k_precision"] > sae["top_k_precision_random_expectation"]
    assert sae["top_k_auc"] > 0.85
    n_test = summary["heldout"]["n_test"]
    assert sae["k"] == round(24 * n_test / summary["n_scored"])
    assert sae["alpha"] in summary["alpha_grid"]
    assert summary["out_of_fold"]["spearman"] > 0.8
    # the baselines carry no planted signal
    assert summary["heldout"]["baseline_reward_model_score_only"]["spearman"] < 0.5
    assert summary["heldout"]["baseline_sample_stats_only"]["spearman"] < 0.5
    assert summary["provenance"]["argv"][0] == "train_bidir_classifier.py"


def test_predictor_row_scores_and_grouped_folds(predictor, run_dir):
    from datasets import load_from_disk

    out, rows = predictor
    scored = read_jsonl(out / "row_scores.jsonl")
    assert [r["row_id"] for r in scored] == [r["row_id"] for r in rows]
    excluded = [r for r in scored if r["excluded"]]
    assert len(excluded) == 2
    assert all(r["predicted_score"] is None and r["fold"] is None and r["true_rank"] is None
               and r["refit_score"] is not None for r in excluded)
    included = [r for r in scored if not r["excluded"]]
    assert sorted(r["predicted_rank"] for r in included) == list(range(1, len(included) + 1))
    assert all(math.isfinite(r["predicted_score"]) for r in included)
    # grouped: a group_id sits in exactly one out-of-fold fold and on one side of the held-out
    # split, and groups really do have several rows here
    split = load_from_disk(str(split_dir(run_dir, "score_pool")))
    group_of = dict(zip(split["row_id"], split["group_id"]))
    folds, sides = {}, {}
    for r in included:
        assert r["group_id"] == group_of[r["row_id"]]
        folds.setdefault(r["group_id"], set()).add(r["fold"])
        sides.setdefault(r["group_id"], set()).add(r["heldout_test"])
    assert max(len([r for r in included if r["group_id"] == g]) for g in folds) > 1
    assert all(len(f) == 1 for f in folds.values())
    assert all(len(s) == 1 for s in sides.values())
    assert len({f for fs in folds.values() for f in fs}) == 5
    summary = load(out / "summary.json")
    assert summary["heldout"]["groups_in_both"] == 0
    assert summary["heldout"]["sae_predictor"]["alpha_selection"].startswith("GroupKFold")


def test_metadata_validation_outputs(predictor):
    out, _ = predictor
    validation = load(out / "metadata_validation.json")
    rho = validation["spearman_with_reward_model_score"]
    assert -1 <= rho["attribution_rank"] <= 1 and -1 <= rho["predicted_rank"] <= 1
    for column in ("difficulty", "quality", "category"):
        levels = validation["mean_rank_by"][column]
        assert sum(v["n"] for v in levels.values()) == validation["n_rows"]
    assert list(validation["mean_rank_by"]["difficulty"])[0] == "very easy"
    bars = validation["does_the_sae_see_more_than_the_reward_score"]["spearman_with_attribution"]
    assert {"sae_predictor", "baseline_reward_model_score_only",
            "sae_predictor_partial_reward_model_score"} <= set(bars)
    png = (out / "metadata_validation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_selection_manifest_trains_with_finetune(predictor, run_dir, tiny_model, tmp_path):
    from datasets import load_from_disk

    out, _ = predictor
    manifest_path = out / "selection" / "manifest.json"
    manifest = load(manifest_path)
    assert set(manifest["splits"]) == {"top_k", "matched_random_k", "eval", "attr_query"}
    assert manifest["kind"] == "continuation"
    selection = manifest["selection"]
    assert selection["method"] == "sae_predictor" and selection["k"] == 16
    assert selection["overlap_policy"] == "disjoint" and selection["prediction"] == "out_of_fold"
    top = load_from_disk(str(out / "selection" / manifest["splits"]["top_k"]["path"]))
    rand = load_from_disk(str(out / "selection" / manifest["splits"]["matched_random_k"]["path"]))
    assert len(top) == len(rand) == 16 and not set(top["row_id"]) & set(rand["row_id"])
    scored = [r for r in read_jsonl(out / "row_scores.jsonl") if not r["excluded"]]
    best = {r["row_id"] for r in scored if r["predicted_rank"] <= 16}
    assert set(top["row_id"]) == best
    assert set(rand["row_id"]) <= {r["row_id"] for r in scored}
    evaluation = load_from_disk(str(out / "selection" / manifest["splits"]["eval"]["path"]))
    assert evaluation["row_id"] == load_from_disk(str(split_dir(run_dir, "eval")))["row_id"]
    run_script("finetune.py", "train", "--preset", "fast", "--manifest", manifest_path,
               "--train-split", "top_k",
               "--eval-split", "none", "--base-model", tiny_model, "--output-dir",
               tmp_path / "adapter", "--max-steps", 2, "--batch-size", 4, "--max-length",
               MAX_TOKENS)
    metrics = load(tmp_path / "adapter" / "train_metrics.json")
    assert metrics["optimizer_steps"] == 2 and metrics["num_train_rows"] == 16


def write_scores(folder, rows, score, fingerprint=None):
    """score.py's train_scores.jsonl + summary.json for these rows: rank 1 = highest finite score,
    NaN written as null (unscored)."""
    order = [i for i in np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
             if np.isfinite(score[i])]
    rank = {int(i): r for r, i in enumerate(order, start=1)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_scores.jsonl").write_text("".join(json.dumps({
        "row_id": row["row_id"], "score": float(score[i]) if np.isfinite(score[i]) else None,
        "rank": rank.get(i), "num_tokens": 10 + i % 9, "num_supervised_tokens": 5 + i % 7}) + "\n"
        for i, row in enumerate(rows)))
    (folder / "summary.json").write_text(json.dumps(
        {"train_split": "score_pool", "query_split": "attr_query", "manifest": "x",
         **({"train_fingerprint": fingerprint} if fingerprint else {})}))
    return folder


def scores_of(folder):
    return np.array([np.nan if r["score"] is None else r["score"]
                     for r in read_jsonl(folder / "train_scores.jsonl")])


def test_out_of_fold_prediction_ignores_the_rows_own_target(predictor, run_dir, tmp_path):
    """The sae arm's score is the out-of-fold prediction: move one row's attribution score from
    the bottom to the top and its own prediction stays exactly the same (its folds' models never
    saw its target, not even through the other rows' rank percentiles), the folds stay the same,
    while rows of other folds, whose models did see it, move."""
    out, rows = predictor
    before = {r["row_id"]: r for r in read_jsonl(out / "row_scores.jsonl")}
    source = tmp_path / "moved"
    score = scores_of(Path(load(out / "summary.json")["score_run"]))
    victim = int(np.nanargmin(score))
    score[victim] = np.nanmax(score) + 5.0
    write_scores(source, rows, score)
    features = Path(load(out / "summary.json")["features"]).parent
    moved_out = tmp_path / "moved_predictor"
    run_script("train_bidir_classifier.py", "--manifest", run_dir / "manifest.json",
               "--scores-from", source, "--sae-dir", features, "--top-k", 24,
               "--output-root", moved_out, "--seed", 5)
    after = {r["row_id"]: r for r in read_jsonl(moved_out / "row_scores.jsonl")}
    row_id = rows[victim]["row_id"]
    assert before[row_id]["true_rank"] == len([r for r in before.values() if not r["excluded"]])
    assert after[row_id]["true_rank"] == 1
    # (approx only for BLAS summation order: a leak of the moved target is orders larger)
    assert after[row_id]["predicted_score"] == pytest.approx(before[row_id]["predicted_score"],
                                                             abs=1e-9)
    assert {r: e["fold"] for r, e in after.items()} == {r: e["fold"] for r, e in before.items()}
    fold = before[row_id]["fold"]
    same_fold = [r for r, e in before.items() if e["fold"] == fold]
    other_folds = [r for r, e in before.items() if e["fold"] not in (fold, None)]
    assert all(after[r]["predicted_score"] == pytest.approx(before[r]["predicted_score"], abs=1e-9)
               for r in same_fold)
    moved = [r for r in other_folds
             if abs(after[r]["predicted_score"] - before[r]["predicted_score"]) > 1e-6]
    assert len(moved) > len(other_folds) // 2


def test_sae_arm_is_the_top_k_of_the_out_of_fold_prediction(predictor, run_dir, tmp_path):
    """row_scores.jsonl round-trips through score.py --arms ...,sae --arm-scores sae=PATH: the
    sae arm is the k rows with the highest out-of-fold predicted_score among the rows with a
    finite attribution score."""
    from pipeline import load_manifest, load_split, split_fingerprint

    out, rows = predictor
    manifest = load_manifest(run_dir / "manifest.json")
    pool = load_split(manifest, "score_pool")
    summary = load(out / "summary.json")
    scores = write_scores(tmp_path / "scores", rows,
                          scores_of(Path(summary["score_run"])), split_fingerprint(pool))
    arms = tmp_path / "arms"
    run_script("score.py", "--manifest", run_dir / "manifest.json", "--scores-from", scores,
               "--arms", "attribution,sae", "--arm-scores", f"sae={out / 'row_scores.jsonl'}",
               "--subset-k", 12, "--seed", 1, "--output-dir", arms)
    picked = load_manifest(arms / "continuation_manifest.json")
    predicted = [r for r in read_jsonl(out / "row_scores.jsonl")
                 if r["predicted_score"] is not None]
    best = sorted(predicted, key=lambda r: -r["predicted_score"])[:12]
    assert sorted(load_split(picked, "sae")["row_id"]) == sorted(r["row_id"] for r in best)
    assert sorted(load_split(picked, "sae")["row_id"]) == sorted(
        r["row_id"] for r in predicted if r["predicted_rank"] <= 12)
    assert picked["selection"]["arm_scores"]["sae"] == str((out / "row_scores.jsonl").resolve())
    arm = load(arms / "summary.json")["arms"]["sae"]
    assert arm["rows"] == 12
    assert arm["mean_own_score"] == pytest.approx(np.mean([r["predicted_score"] for r in best]))
    assert sorted(load_split(picked, "attribution")["row_id"]) != \
        sorted(load_split(picked, "sae")["row_id"])   # the arm is not the attribution top-k


def test_both_poolings_on_the_tiny_model(features, run_dir, tiny_model, random_sae, tokenized,
                                         tmp_path):
    """sae_analysis.py --positions all and completion on the tiny model, a predictor fitted on
    each (the verdict's two predictors): the NPZ and the predictor record the pooling, the all
    pooling averages over every token but the first, both predictors score every pool row."""
    from datasets import load_from_disk

    all_dir = tmp_path / "sae_features_all"
    run_script("sae_analysis.py", "--manifest", run_dir / "manifest.json", "--base-model",
               tiny_model, "--sae-path", random_sae, "--output-dir", all_dir, "--max-length",
               MAX_TOKENS, "--batch-size", 4, "--positions", "all")
    npz = {"completion": np.load(features / "jumprelu_random.npz"),
           "all": np.load(all_dir / "jumprelu_random.npz")}
    assert {str(v["positions"]) for v in npz.values()} == {"completion", "all"}
    ids = [str(r) for r in npz["all"]["row_id"]]
    assert [int(x) for x in npz["all"]["n_tokens_pooled"]] == [
        tokenized[r]["num_tokens"] - 1 for r in ids]
    assert not np.allclose(npz["all"]["feature_activation_mean"],
                           npz["completion"]["feature_activation_mean"])
    # a target the features can carry: the completion's length, plus noise
    rows = load_from_disk(str(split_dir(run_dir, "score_pool"))).to_list()
    rng = np.random.default_rng(1)
    score = np.array([tokenized[r["row_id"]]["num_supervised_tokens"] for r in rows], float)
    scores = write_scores(tmp_path / "scores", rows, score + rng.normal(0, 3, len(rows)))
    for pooling, folder in (("completion", features), ("all", all_dir)):
        out = tmp_path / f"sae_predictor_{pooling}"
        run_script("train_bidir_classifier.py", "--manifest", run_dir / "manifest.json",
                   "--scores-from", scores, "--sae-dir", folder, "--top-k", 24,
                   "--output-root", out, "--seed", 3)
        summary = load(out / "summary.json")
        assert summary["pooling"] == pooling
        assert summary["out_of_fold"]["target"].startswith("rank percentile among each fold")
        assert -1 <= summary["out_of_fold"]["spearman"] <= 1
        assert -1 <= summary["length_diagnostics"]["spearman_supervised_tokens"] <= 1
        scored = read_jsonl(out / "row_scores.jsonl")
        assert [r["row_id"] for r in scored] == [r["row_id"] for r in rows]
        assert all(r["predicted_score"] is not None for r in scored)


def expect_error(*args, mentions=()):
    result = run_script("train_bidir_classifier.py", *args, expect_ok=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for word in mentions:
        assert str(word) in lines[0], lines[0]
    return lines[0]


def test_predictor_bad_inputs(run_dir, tmp_path):
    features, scores, _ = fabricate(run_dir, tmp_path)
    npz = features / "fake.npz"
    data = dict(np.load(npz))
    common = ["--manifest", run_dir / "manifest.json", "--score-run-path", scores,
              "--output-root", tmp_path / "out"]

    np.savez(npz, **{k: v for k, v in data.items() if k != "feature_activation_mean"})
    expect_error(*common, "--npz", npz, mentions=[npz, "feature_activation_mean",
                                                  "sae_analysis.py"])
    np.savez(npz, **{**data, "row_id": np.array([r + "x" if i == 7 else r
                                                 for i, r in enumerate(data["row_id"])])})
    expect_error(*common, "--npz", npz, mentions=[npz, scores / "train_scores.jsonl",
                                                  "1 only in the scores"])
    (features / "second.npz").write_bytes(npz.read_bytes())
    expect_error(*common, "--sae-dir", features, mentions=["2 .npz files", "--npz"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,flags", [
    ("sae_analysis.py", ["--manifest", "--split", "--output-dir", "--max-examples",
                         "--max-length", "--sae-id", "--sae-release", "--base-model",
                         "--sae-path", "--layer", "--adapter-path", "--batch-size", "--positions",
                         "--device", "--precision"]),
    ("train_sae.py", ["--manifest", "--split", "--base-model", "--adapter-path", "--positions",
                      "--layer", "--d-sae", "--k", "--l1-coefficient", "--steps", "--tokens",
                      "--lr", "--batch-tokens", "--max-length", "--seed", "--output-dir",
                      "--device", "--precision"]),
    ("train_bidir_classifier.py", ["--manifest", "--split", "--scores-from", "--sae-dir",
                                   "--npz", "--target-type", "--top-k", "--split-mode",
                                   "--test-fraction", "--seed", "--output-root",
                                   "--write-selection", "--allow-overlap", "--random-match"]),
])
def test_help_lists_flags(script, flags):
    out = run_script(script, "--help").stdout
    for flag in flags:
        assert flag in out, f"{script} --help lacks {flag}"
