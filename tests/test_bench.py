"""FLOP counting, timing helpers and the `algm-viz bench` command."""

from __future__ import annotations

import json
import time

import pytest
import torch

from algm_viz.cli import main
from algm_viz.flops import count_gflops
from algm_viz.models import create_segmenter
from algm_viz.models.bundled import save_bundled
from algm_viz.evaluation.bench import engine_ms, engine_share
from algm_viz.patch import apply_algm, remove_algm
from algm_viz.timing import engine_clock, engine_range, time_call

import timm.layers


@pytest.mark.parametrize("fused", [True, False])
def test_attention_flops_are_counted_on_cpu(fused):
    tokens, dim, heads = 50, 32, 4
    attention = timm.layers.Attention(dim, num_heads=heads, qkv_bias=True).eval()
    attention.fused_attn = fused
    macs = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * tokens * dim  # qkv, proj, QK^T and AV
    assert count_gflops(attention, torch.randn(1, tokens, dim)) * 1e9 == pytest.approx(macs)


def test_flops_are_the_same_counted_inside_inference_mode_on_inference_tensors():
    tokens, dim = 50, 32
    block = timm.models.vision_transformer.Block(dim, num_heads=4).eval()
    macs = tokens * dim * 3 * dim + tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * 4 * dim
    plain = count_gflops(block, torch.randn(1, tokens, dim))
    with torch.inference_mode():
        inside = count_gflops(block, torch.randn(1, tokens, dim))  # an inference tensor, as the sweep passes
    assert plain * 1e9 == pytest.approx(macs) and inside == plain


def test_time_call_reports_ordered_quantiles():
    calls = []
    timing = time_call(lambda: calls.append(1), "cpu", repeats=5, warmup=2)
    assert len(calls) == 7
    assert timing.p25 <= timing.median <= timing.p75 and timing.repeats == 5
    with pytest.raises(ValueError):
        time_call(lambda: None, "cpu", repeats=0)


def test_engine_clock_adds_up_the_wall_time_of_each_engine_range():
    with engine_range("unmerge"):  # no clock: nothing is kept
        pass
    with engine_clock() as seconds:
        with engine_range("unmerge"):
            time.sleep(0.02)
        with engine_range("unmerge"):
            time.sleep(0.01)
        with engine_range("local_merge"):
            pass
    with engine_range("unmerge"):  # the clock has stopped
        time.sleep(0.02)
    assert set(seconds) == {"unmerge", "local_merge"}
    assert 0.03 <= seconds["unmerge"] < 0.05 and seconds["local_merge"] < seconds["unmerge"]


def test_engine_ms_is_the_time_of_the_merging_model_s_engine_ranges():
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, image_size=64, depth=6, embed_dim=64, num_heads=2).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert engine_ms(model, images) == 0.0  # no merging, no engine
        apply_algm(model, local_threshold=0.0, global_threshold=0.0)
        with engine_clock() as seconds:
            model(images)
        share = engine_share(model, [images, images[..., :64]], repeats=1)
        remove_algm(model)
    assert {"clap_merge", "gbm_merge", "unmerge"} <= set(seconds) and all(s > 0 for s in seconds.values())
    assert share["engine_ms"] > 0 and 0 < share["engine_fraction"] < 1 and share["engine_ms"] < share["forward_ms"]


def test_bench_command_prints_side_by_side_rows(capsys):
    code = main([
        "bench", "--backbone", "vit_tiny_patch16_384", "--num-classes", "3", "--size", "64", "96",
        "--batch", "2", "--repeats", "1", "--warmup", "0", "--taus", "0.0", "1.0", "--compare-batch-min",
    ])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["tau"]): r for r in report["results"]}
    baseline, merged, unmerged = rows[("baseline", None)], rows[("algm", 0.0)], rows[("algm", 1.0)]
    assert report["size"] == [64, 96] and baseline["tokens"]["patches"] == 24
    assert merged["tokens"]["global"] < merged["tokens"]["local"] < 24
    assert merged["gflops"] < baseline["gflops"] < unmerged["gflops"]  # τ = 1 still pays for the similarities
    assert unmerged["gflops"] == pytest.approx(baseline["gflops"], rel=1e-3)
    assert merged["gflops_ratio"] == pytest.approx(baseline["gflops"] / merged["gflops"])
    assert merged["engine_ms"] > 0 and 0 < merged["engine_fraction"] < 1
    assert 0 < merged["network_ms_median"] and merged["network_speedup"] > 0
    assert ("algm-batch-min", 0.0) in rows and "adaptive_throughput_vs_this" in rows[("algm-batch-min", 0.0)]


def test_bench_auto_runs_the_models_calibrated_pair(capsys, tmp_path):
    model = create_segmenter("vit_tiny_patch16_384", num_classes=3, image_size=64, depth=6, embed_dim=64, num_heads=2)
    save_bundled(model, tmp_path / "m", config={"backbone": "vit_tiny_patch16_384", "num_classes": 3, "image_size": 64,
                                                "depth": 6, "embed_dim": 64, "num_heads": 2},
                 class_names=["a", "b", "c"], colors=[[0, 0, 0]] * 3, thresholds={"local": 0.25, "global": -0.5}, input_size=64)
    code = main(["bench", "--model", str(tmp_path / "m"), "--size", "60", "90", "--repeats", "1", "--warmup", "0",
                 "--taus", "auto", "0.5"])
    assert code == 0
    rows = {r["tau"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows[None]["thresholds"] is None
    assert rows["auto"]["thresholds"] == [0.25, -0.5] and rows[0.5]["thresholds"] == [0.5, 0.5]
    assert rows[None]["tokens"]["patches"] == rows["auto"]["tokens"]["patches"] == 24
    assert rows["auto"]["tokens"]["global"] < rows["auto"]["tokens"]["local"]
    with pytest.raises(SystemExit):
        main(["bench", "--taus", "often"])


def test_bench_keeps_stderr_quiet(capfd):
    """The profiler's native profiler_start/profiler_stop lines (written to file descriptor 2) are not shown."""
    assert main(["bench", "--backbone", "vit_tiny_patch16_384", "--num-classes", "3", "--size", "32", "--repeats", "1",
                 "--warmup", "0", "--taus", "0.9"]) == 0
    captured = capfd.readouterr()
    assert "profiler_" not in captured.err and "USDT" not in captured.err, captured.err
    assert json.loads(captured.out)["results"][1]["engine_ms"] > 0
