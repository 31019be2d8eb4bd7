"""The app benchmark (``algm-viz app-bench``): the library run on a tiny model, and the command's checks."""

from __future__ import annotations

from algm_viz.app.benchmark import run as benchmark_app
from algm_viz.cli import main
from test_app_session import scene, tiny_registry, write


def test_app_benchmark_times_first_request_curve_releases_and_balance(tmp_path):
    registry = tiny_registry()
    image = write(tmp_path, "scene.png", scene())
    result = benchmark_app(registry.default_key(), image, [0.9, 0.8, 0.95], 2, 5, api=False, device=None,
                           registry=registry)
    assert result["device"] == "cpu" and result["image"] == image
    assert min(result["first_request_s"], result["curve_s"], result["balance_s"]) > 0
    assert 0 < result["tau_release_s"]["median"] <= result["tau_release_s"]["max"]
    assert "api_tau_release_s" not in result
    assert result["readout"]["thresholds"] == {"local": 0.95, "global": 0.95}  # the readout of the last τ


def test_app_bench_command_refuses_a_missing_image(tmp_path):
    assert main(["app-bench", "--image", str(tmp_path / "missing.png")]) == 2
