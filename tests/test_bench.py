"""benchmarks/bench.py's own arithmetic, on made-up step records (its GPU figures live in
results/, never in tests): configurations parsed and refused, the second-half tokens/s of a
finetune configuration, ratios to the floor and to the best configuration, failed
configurations reported and left out of the ratios."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import bench  # noqa: E402


def test_variants_parse_and_bad_ones_are_refused(capsys):
    args = bench.parse_args(["--manifest", "m.json", "--finetune-variant",
                             "a=--preset fast --batch-size 4", "--finetune-variant", "b=",
                             "--score-variant", "default="])
    assert args.finetune_variants == {"a": ["--preset", "fast", "--batch-size", "4"], "b": []}
    assert args.profile_variant == "a"  # the first configuration by default
    defaults = bench.parse_args(["--manifest", "m.json"])
    assert list(defaults.finetune_variants)[0] == "fast"
    assert list(defaults.score_variants)[0] == "default"
    for argv, words in [(["--finetune-variant", "no_equals_sign"], ["NAME=FLAGS"]),
                        (["--finetune-variant", "a=", "--finetune-variant", "a=--seed 1"],
                         ["a given twice"]),
                        (["--finetune-variant", "a=", "--profile-variant", "b"],
                         ["--profile-variant b", "a"])]:
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(["--manifest", "m.json", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


def metrics(elapsed, tokens, rows=8):
    curve = [{"step": i + 1, "loss": 2.0 - 0.1 * i, "rows": rows, "elapsed_s": e,
              "tokens_so_far": t} for i, (e, t) in enumerate(zip(elapsed, tokens))]
    return {"loss_curve": curve, "train_wall_clock_s": elapsed[-1], "tokens_seen": tokens[-1],
            "peak_gpu_memory_gib": 1.5, "optimizer_steps": len(curve),
            "rows_seen": rows * len(curve), "micro_batches_per_step": 1,
            "final_train_loss": curve[-1]["loss"]}


def test_finetune_row_second_half_and_ratios():
    # 4 steps: the first slow (warm-up), then 1000 tokens a second
    slow = bench.finetune_row("slow", metrics([5.0, 6.0, 7.0, 8.0], [1000, 2000, 3000, 4000]))
    assert slow["second_half_tokens_per_second"] == pytest.approx(2000 / 2.0)
    assert slow["rows_per_step"] == 8 and slow["optimizer_steps"] == 4
    fast = bench.finetune_row("fast", metrics([1.0, 2.0], [2000, 4000]))
    failed = bench.failed_row("finetune.py train (training loop)", "broken",
                              bench.PipelineError("bench step finetune_broken failed (exit 2)"))
    rows = [slow, fast, failed]
    bench.fill_ratios(rows, floor_seconds=1.0, tokens=8000, n_params=10**6, flop_per_token=4,
                      peak_tflops=1.0)
    assert slow["tokens_per_second"] == pytest.approx(500.0)
    assert fast["tokens_per_second"] == pytest.approx(2000.0)
    assert slow["ratio_to_floor"] == pytest.approx(500 / 8000)
    assert slow["ratio_to_best_config"] == pytest.approx(0.25)
    assert fast["ratio_to_best_config"] == pytest.approx(1.0)
    assert slow["mfu"] == pytest.approx(4 * 10**6 * 4000 / 8.0 / 1e12)
    assert "tokens_per_second" not in failed
    result = {"device": "cpu", "rows": 10, "tokens": 8000, "supervised_tokens": 5000,
              "floor_batch_tokens": 8192, "peak_tflops": 1.0,
              "table": [dict(slow, max_step_loss_gap_to_first=0.0),
                        dict(fast, max_step_loss_gap_to_first=None), failed]}
    text = bench.markdown(result, 10**6)
    assert "| finetune.py train (training loop) | slow | 8.0 | 500 | 1,000 | 8,000 | 0.06 | 0.25" in text
    assert "Failed: finetune.py train (training loop) broken: bench step finetune_broken" in text
    assert "| broken |" not in text


def test_gpu_memory_peak_is_the_drop_in_free_memory_of_the_visible_gpu(monkeypatch):
    import time

    import run_experiment

    free = {"0": iter([9000] + [9000] * 2 + [7000] * 2 + [8500] * 100),
            "3": iter([50000] * 200)}
    monkeypatch.setattr(run_experiment, "gpu_free_mib",
                        lambda: {index: next(values) for index, values in free.items()})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    with bench.GpuMemoryPeak(True, interval=0.01) as memory:
        time.sleep(0.2)
    assert memory.peak_gib == pytest.approx(2000 / 1024)
    with bench.GpuMemoryPeak(False) as off:
        pass
    assert off.peak_gib is None
