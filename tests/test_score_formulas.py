"""score.py's score formulas on the tiny model: every normalisation x score mode x
preconditioning x loss reduction (x damping rule) computed from bergson's per-row gradient indices
equals the formula written out by hand on brute-force autograd gradients; the damping rules on a
hand-made H; what a cosine does to the loss reduction; --gradients-from and --scores-only."""

import json

import numpy as np
import pytest
import torch

from conftest import run_script
from helpers import (MAX_LEN, SCORE_RUN_SIZES, assert_bergson_sees_finetune_ids, copy_run,
                     lora_gradients)

N_TRAIN, N_QUERY, _ = SCORE_RUN_SIZES
COMMON = ("--max-length", MAX_LEN, "--token-batch-size", 512, "--projection-dim", 0,
          "--subset-k", 6, "--precision", "fp32")
# the second bergson run: every non-default choice at once
SUM_RUN = ("--loss-reduction", "sum", "--score-normalization", "bergson", "--score-mode",
           "nearest", "--preconditioning-mode", "mixed", "--mixing-coefficient", 0.7,
           "--damping-rule", "mean_eig", "--damping", 0.2)
NORMALIZATIONS = ("none", "seed", "bergson")
COMBOS = [(loss, norm, mode, pre, rule)
          for loss in ("sum", "mean") for norm in NORMALIZATIONS for mode in ("mean", "nearest")
          for pre in ("none", "query", "mixed")
          for rule in (("mean_abs_entry",) if pre == "none" else ("mean_abs_entry", "mean_eig"))]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The formulas run on tiny matrices in this process: a second thread only adds spin-waits
    (10x slower on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, score_run):
    """One bergson pass per loss reduction, gradients kept: the default (seed) run with the mean
    loss and SUM_RUN with the summed loss."""
    run_dir = copy_run(score_run, tmp_path_factory.mktemp("formulas") / "run")
    common = ["--manifest", run_dir / "manifest.json", "--adapter-path",
              run_dir / "base_adapter", *COMMON, "--keep-gradients"]
    run_script("score.py", *common, "--output-dir", run_dir / "mean")
    run_script("score.py", *common, *SUM_RUN, "--output-dir", run_dir / "sum")
    return run_dir, {"mean": run_dir / "mean", "sum": run_dir / "sum"}


@pytest.fixture(scope="module")
def autograd(runs):
    """{loss reduction: (train, query)} per-row autograd gradients, float64, per LoRA weight."""
    run_dir, _ = runs
    return {loss: (lora_gradients(run_dir, "score_pool", loss),
                   lora_gradients(run_dir, "attr_query", loss)) for loss in ("sum", "mean")}


def bergson_arrays(out):
    from score import load_index

    query, sizes = load_index(out / "bergson" / "query_index")
    train, train_sizes = load_index(out / "bergson" / "train_index")
    assert sizes == train_sizes
    return query, train, sizes


def by_hand(train, query, normalization, mode, preconditioning, rule, damping=0.1, c=0.99):
    """The formulas of score.py's docstring, written out on {module: [rows, d]} float64
    gradients with plain linear algebra (no bergson)."""
    modules = list(train)
    cat = lambda grads: torch.cat([grads[m] for m in modules], dim=1)  # noqa: E731
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    if preconditioning == "none":
        side = {m: torch.eye(train[m].shape[1], dtype=torch.float64) for m in modules}
    else:
        side = {}
        for m in modules:
            h = query[m].T @ query[m] / len(query[m])
            if preconditioning == "mixed":
                h = c * h + (1 - c) * train[m].T @ train[m] / len(train[m])
            lam = damping * (h.abs().mean() if rule == "mean_abs_entry"
                             else torch.linalg.eigvalsh(h).mean())
            if normalization == "bergson":  # (H + lam I)^-1/2
                w, v = torch.linalg.eigh(h)
                side[m] = v @ torch.diag((w.clamp_min(0) + lam) ** -0.5) @ v.T
            else:  # (H + lam I)^-1
                side[m] = torch.linalg.inv(h + lam * torch.eye(len(h), dtype=h.dtype))
    g, q = cat(train), cat(query)
    pq = cat({m: query[m] @ side[m] for m in modules})  # every matrix here is symmetric
    if normalization == "none":
        per_query = g @ pq.T
        return per_query.mean(1) if mode == "mean" else per_query.max(1).values
    if normalization == "seed":
        if mode == "mean":
            qbar = unit(q).mean(0, keepdim=True)
            direction = unit(cat({m: qbar[:, o:o + len(side[m])] @ side[m]
                                  for m, o in zip(modules, offsets(side, modules))}))
            return (unit(g) @ direction.T)[:, 0]
        return (unit(g) @ unit(pq).T).max(1).values
    rg = cat({m: train[m] @ side[m] for m in modules})
    cosines = unit(rg) @ unit(pq).T
    return cosines.mean(1) if mode == "mean" else cosines.max(1).values


def offsets(side, modules):
    out, start = [], 0
    for m in modules:
        out.append(start)
        start += len(side[m])
    return out


def assert_close(got, expected):
    expected = expected.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("loss, normalization, mode, preconditioning, rule", COMBOS)
def test_scores_equal_the_formula_on_autograd_gradients(runs, autograd, loss, normalization,
                                                        mode, preconditioning, rule):
    from score import attribution_scores

    query, train, sizes = bergson_arrays(runs[1][loss])
    got, info = attribution_scores(query, train, sizes, normalization=normalization,
                                   score_mode=mode, preconditioning=preconditioning,
                                   mixing_coefficient=0.99, damping_rule=rule, damping=0.1,
                                   chunk_rows=7)  # several chunks, one short
    train_grads, query_grads = autograd[loss]
    assert_close(got, by_hand(train_grads, query_grads, normalization, mode, preconditioning,
                              rule))
    assert info["n_query_used"] == N_QUERY
    if preconditioning != "none":
        assert info["damping_used"]["modules"] == len(sizes)
    if preconditioning == "mixed":
        assert info["n_pool_rows_in_hessian"] == N_TRAIN


def test_runs_write_the_formula_and_record_their_settings(runs, autograd):
    """End to end: score.py's own train_scores.jsonl for the default run and SUM_RUN."""
    for loss, flags in (("mean", ("seed", "mean", "query", "mean_abs_entry", 0.1, 0.99)),
                        ("sum", ("bergson", "nearest", "mixed", "mean_eig", 0.2, 0.7))):
        out = runs[1][loss]
        normalization, mode, preconditioning, rule, damping, c = flags
        rows = [json.loads(line) for line in (out / "train_scores.jsonl").open()]
        expected = by_hand(*autograd[loss], normalization, mode, preconditioning, rule,
                           damping=damping, c=c)
        assert_close(np.array([r["score"] for r in rows]), expected)
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["score_normalization"], summary["score_mode"],
                summary["preconditioning_mode"], summary["damping_rule"], summary["damping"],
                summary["mixing_coefficient"], summary["loss_reduction"]) == (
            normalization, mode, preconditioning, rule, damping, c, loss)
        used = summary["damping_used"]
        assert used["modules"] == 28 and 0 < used["min"] <= used["median"] <= used["max"]
        assert summary["score_formula"] and summary["train_fingerprint"].startswith("sha256:")
        diagnostics = summary["length_diagnostics"]
        assert diagnostics["n_rows"] == N_TRAIN
        assert set(diagnostics["mean_score_by_category"]) == {"math", "coding", "editing",
                                                               "advice"}
        for key in ("spearman_supervised_tokens", "spearman_total_tokens",
                    "spearman_reward_model_score"):
            assert -1 <= diagnostics[key] <= 1
        top = diagnostics["top_k_supervised_tokens"]
        supervised = np.array([r["num_supervised_tokens"] for r in rows])
        top_rows = sorted(rows, key=lambda r: r["rank"])[:6]
        assert top["k"] == 6 and top["top_k"] == sum(r["num_supervised_tokens"] for r in top_rows)
        assert top["pool_mean_x_k"] == pytest.approx(supervised.mean() * 6)
        # --keep-gradients: both indices and the Hessian the scores used, in bergson's format
        assert {p.name for p in (out / "bergson").iterdir()} == {"query_index", "train_index",
                                                                 "hessian"}


def test_kept_hessian_is_bergsons_autocorrelation_hessian(runs):
    """The query Hessian score.py takes from the gradient index equals the one bergson's own
    autocorrelation fit (a second pass over the query split) gives."""
    from bergson.config.config import DataConfig, DistributedConfig, HessianConfig, IndexConfig
    from bergson.gradients import GradientProcessor
    from bergson.hessians.hessian_approximations import approximate_hessians

    run_dir, outs = runs
    out = outs["mean"]
    cfg = IndexConfig(run_path=str(run_dir / "bergson_hessian"),
                      model=str(run_dir / "base_adapter"),
                      data=DataConfig(dataset=str(out / "bergson_data" / "query")),
                      precision="fp32", projection_dim=0, token_batch_size=512,
                      loss_reduction="mean", force_math_sdp=True,
                      distributed=DistributedConfig(nproc_per_node=1))
    with pytest.warns(UserWarning, match="projection_dim=0"):
        approximate_hessians(cfg, HessianConfig(method="autocorrelation"))
    theirs = GradientProcessor.load(run_dir / "bergson_hessian").hessians
    ours = GradientProcessor.load(out / "bergson" / "hessian").hessians
    assert set(theirs) == set(ours)
    for m in ours:
        torch.testing.assert_close(ours[m], theirs[m].to(ours[m].dtype), rtol=1e-4,
                                   atol=1e-6 * float(theirs[m].abs().max()))


@pytest.mark.parametrize("mode", ["mean", "nearest"])
def test_without_preconditioning_seed_ignores_the_loss_reduction(runs, mode):
    """A cosine ignores each row's scale: the mean loss's gradient is the summed loss's over the
    row's token count. The inner product does not."""
    from score import attribution_scores

    def scores(loss, normalization):
        query, train, sizes = bergson_arrays(runs[1][loss])
        return attribution_scores(query, train, sizes, normalization=normalization,
                                  score_mode=mode, preconditioning="none")[0]

    np.testing.assert_allclose(scores("sum", "seed"), scores("mean", "seed"), rtol=1e-5,
                               atol=1e-7)
    assert not np.allclose(scores("sum", "none"), scores("mean", "none"), rtol=0.05)
    ranks = lambda x: np.argsort(np.argsort(-x))  # noqa: E731
    assert (ranks(scores("sum", "none")) != ranks(scores("mean", "none"))).any()


@pytest.mark.parametrize("rule, lam", [("mean_abs_entry", 0.1 * 8 / 4),   # |2|+|-1|+|-1|+|4|
                                       ("mean_eig", 0.1 * 6 / 2)])          # trace 6, 2 dims
def test_damping_rules_on_a_hand_made_hessian(rule, lam):
    from score import damped_power

    h = torch.tensor([[2.0, -1.0], [-1.0, 4.0]])
    inverse, used = damped_power(h, -1.0, rule, 0.1)
    assert used == pytest.approx(lam)
    torch.testing.assert_close(inverse, torch.linalg.inv(h + lam * torch.eye(2)))
    root, used_again = damped_power(h, -0.5, rule, 0.1)
    assert used_again == pytest.approx(lam)
    torch.testing.assert_close(root @ root, inverse)
    torch.testing.assert_close(root, root.T)


def test_gradients_from_rescores_without_bergson(runs, tmp_path):
    """Another normalisation from the kept indices: no bergson pass, the same numbers as the
    formula function on them; --scores-only writes no subsets; mismatched settings are refused.
    score.py runs in this process here (no bergson, so no process of its own is needed)."""
    from pipeline import PipelineError
    from score import attribution_scores, main

    run_dir, outs = runs
    common = ["--manifest", run_dir / "manifest.json", "--adapter-path",
              run_dir / "base_adapter", *COMMON, "--gradients-from", outs["mean"]]
    score = lambda *args: main([str(a) for a in args])  # noqa: E731
    out = tmp_path / "rescored"
    score(*common, "--score-normalization", "bergson", "--score-mode", "nearest",
          "--scores-only", "--output-dir", out)
    query, train, sizes = bergson_arrays(outs["mean"])
    expected, _ = attribution_scores(query, train, sizes, normalization="bergson",
                                     score_mode="nearest", preconditioning="query")
    rows = [json.loads(line) for line in (out / "train_scores.jsonl").open()]
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-6)
    assert {p.name for p in out.iterdir()} == {"train_scores.jsonl", "summary.json",
                                               "bergson_data", ".written_by.json"}
    assert "in_top_k" not in rows[0] and sorted(r["rank"] for r in rows) == list(range(1, N_TRAIN + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradients_from"] == str(outs["mean"].resolve())
    assert "query_gradients" not in summary["stage_seconds"]
    assert summary["length_diagnostics"]["top_k_supervised_tokens"]["k"] == 6
    assert_bergson_sees_finetune_ids(run_dir, out)
    # a --scores-only folder is what --scores-from draws subsets from
    score("--manifest", run_dir / "manifest.json", "--scores-from", out, "--subset-k", 6,
          "--output-dir", tmp_path / "drawn")
    drawn = [json.loads(line) for line in (tmp_path / "drawn" / "train_scores.jsonl").open()]
    assert sum(r["in_top_k"] for r in drawn) == 6
    assert {r["row_id"] for r in drawn if r["in_top_k"]} == {
        r["row_id"] for r in rows if r["rank"] <= 6}
    # gradients of another loss reduction are not reused
    with pytest.raises(PipelineError, match="loss_reduction") as refused:
        score(*common, "--loss-reduction", "sum", "--output-dir", tmp_path / "bad")
    assert str(outs["mean"]) in str(refused.value) and str(tmp_path / "bad") in str(refused.value)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_bergson_sees_finetune_ids_in_every_mode(runs, loss):
    run_dir, outs = runs
    assert_bergson_sees_finetune_ids(run_dir, outs[loss])
