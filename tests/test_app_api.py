"""The app as an API: a real server on 127.0.0.1 driven through ``gradio_client``."""

import functools
import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from algm_viz.app.session import SessionCache  # noqa: E402
from algm_viz.app.ui import Handlers, build_demo, opening_settings  # noqa: E402

from conftest import free_port, tiny_registry  # noqa: E402

CLIENTS = 10
#: The endpoints that analyse an image (or a clip): every input after it is optional.
ANALYSIS_ENDPOINTS = ("/analyze", "/curve", "/balance", "/export", "/compare", "/inspect", "/purity", "/animate",
                      "/layer_flow", "/layer_maps", "/video")


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((60, 90, 3), np.uint8)
    image[: 20 + seed * 3] = rng.integers(0, 255, 3)
    image[40:, : 10 + seed * 5] = rng.integers(0, 255, 3)
    return np.clip(image + rng.integers(0, 25, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    registry = tiny_registry()
    handlers = Handlers(registry, SessionCache(capacity=16, max_side=128), thresholds=(0.7, 1.0), with_gflops=False)
    demo = build_demo(handlers).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    folder = tmp_path_factory.mktemp("api_images")
    images = []
    for seed in range(CLIENTS):
        path = folder / f"scene{seed}.png"
        cv2.imwrite(str(path), scene(seed))
        images.append(str(path))
    yield f"http://127.0.0.1:{port}/", images, folder
    demo.close()


def analyze(url: str, image: str, tau: float, window: int, prop_attn: bool = False) -> dict:
    client = Client(url, verbose=False)
    result = client.predict("untrained", handle_file(image), None, tau, tau, window, 5, prop_attn, api_name="/analyze")
    return result[6]


def test_named_endpoints(server):
    url, _, _ = server
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/analyze", "/curve", "/balance", "/select_model", "/load_checkpoint", "/export"} <= set(endpoints)
    for name in ("/analyze", "/curve", "/compare", "/inspect"):  # the label map: optional, no sample PDF
        label = next(p for p in endpoints[name]["parameters"] if "label map" in p["label"])
        assert label["example_input"] is None and label["python_type"]["description"].startswith("optional"), name


def test_ten_concurrent_clients_get_their_own_answers(server):
    url, images, _ = server
    jobs = [(images[i], (0.65, 0.75, 0.85, 0.95)[i % 4], 2 + i % 2, i % 3 == 0) for i in range(CLIENTS)]
    alone = [analyze(url, *job) for job in jobs]
    with ThreadPoolExecutor(CLIENTS) as pool:
        together = list(pool.map(lambda job: analyze(url, *job), jobs))
    keys = ("tokens", "thresholds", "window", "proportional_attention", "agreement_miou", "image_size")
    for job, a, b in zip(jobs, alone, together):
        assert {k: b[k] for k in keys} == {k: a[k] for k in keys}, f"mixed-up answer for {job}"
        assert a["thresholds"]["local"] == job[1] and a["window"] == job[2] and a["proportional_attention"] == job[3]
    assert len({str(r["tokens"]) for r in alone}) > 1, "the jobs differ, so must the answers"


def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(server):
    url, images, folder = server
    client = Client(url, verbose=False)
    text = folder / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(Exception, match="not an image"):
        client.predict("untrained", handle_file(str(text)), None, 0.9, 0.9, 2, 5, api_name="/analyze")
    with pytest.raises(Exception, match=r"local_threshold must be in \[0.0, 1.0\], got 1.5"):
        client.predict("untrained", handle_file(images[0]), None, 1.5, 0.9, 2, 5, api_name="/analyze")
    with pytest.raises(Exception, match="layer"):  # beyond this model's depth: the model says so
        client.predict("untrained", handle_file(images[0]), None, 0.9, 0.9, 2, 99, api_name="/analyze")
    with pytest.raises(Exception, match="unknown model"):
        client.predict("nope", handle_file(images[0]), None, 0.9, 0.9, 2, 5, api_name="/analyze")
    assert analyze(url, images[0], 0.9, 2)["tokens"]["patches"] > 0


def test_curve_endpoint_returns_a_plot(server):
    url, images, _ = server
    client = Client(url, verbose=False)
    plot, dataset = client.predict("untrained", handle_file(images[1]), None, 0.7, 0.7, 2, 5, api_name="/curve")
    assert plot["type"] == "plotly" and "agreement (mIoU %)" in plot["plot"] and "τ global varied" in plot["plot"]
    assert dataset is None


def test_nan_through_the_http_api_is_refused_clearly(server):
    """gradio_client cannot send NaN (strict JSON), a raw HTTP client can."""
    httpx = pytest.importorskip("httpx")
    url, images, _ = server
    with open(images[0], "rb") as handle:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": handle}).json()[0]
    image = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    body = '{"data": ["untrained", %s, null, NaN, 0.9, 2, 5, false, false]}' % json.dumps(image)
    event = httpx.post(f"{url}gradio_api/call/analyze", content=body, headers={"Content-Type": "application/json"}).json()
    stream = httpx.get(f"{url}gradio_api/call/analyze/{event['event_id']}", timeout=60).text
    assert "event: error" in stream and "local_threshold" in stream


def assert_optional_after_the_image(endpoints: dict) -> None:
    """The image (or clip) is required; the label map and every later input has a default."""
    for name in ANALYSIS_ENDPOINTS:
        params = endpoints[name]["parameters"]
        assert params[1]["parameter_name"] in ("image", "video") and not params[1]["parameter_has_default"], name
        required = [p["parameter_name"] for p in params[2:] if not p["parameter_has_default"]]
        assert not required, f"{name}: {required} have no default"


def test_every_input_after_the_image_is_optional_with_the_pages_opening_values(server):
    url, _, _ = server
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert_optional_after_the_image(endpoints)
    opening = opening_settings(tiny_registry().get("untrained"))
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoints["/analyze"]["parameters"]}
    assert defaults == {"model": "untrained", "image": None, "label": None, "local_tau": opening.local_threshold,
                        "global_tau": opening.global_threshold, "window": opening.window,
                        "global_layer": opening.global_layer, "prop_attn": False, "official": False}
    compare = {p["parameter_name"]: p["parameter_default"] for p in endpoints["/compare"]["parameters"]}
    assert compare["map_b"] == "tome:match" and compare["label"] is None


def test_defaults_reach_the_api_through_zero_gpu_wrappers(monkeypatch):
    """``spaces.GPU`` wraps each handler with ``functools.wraps``: Gradio reads the defaults through ``__wrapped__``."""

    def fake_gpu(duration):
        def wrap(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
            return wrapper
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    handlers = Handlers(tiny_registry(), thresholds=(0.7, 1.0), with_gflops=False)
    demo = build_demo(handlers, prerun=False)
    analyze = next(f for f in demo.fns.values() if f.api_name == "analyze")
    assert analyze.fn.__wrapped__ == handlers.analyze  # the wrapper is what Gradio holds
    assert_optional_after_the_image(demo.get_api_info()["named_endpoints"])


def test_analyze_with_only_the_model_and_the_image(server):
    url, images, _ = server
    readout = Client(url, verbose=False).predict("untrained", handle_file(images[2]), api_name="/analyze")[6]
    opening = opening_settings(tiny_registry().get("untrained"))
    assert readout["thresholds"] == {"local": opening.local_threshold, "global": opening.global_threshold}
    assert readout["window"] == opening.window and readout["proportional_attention"] is False
    handlers = Handlers(tiny_registry(), SessionCache(capacity=2, max_side=128), with_gflops=False)
    direct = handlers.analyze("untrained", images[2])[6]  # in process: None = the same opening setting
    assert {k: direct[k] for k in ("thresholds", "window", "tokens")} == {k: readout[k] for k in ("thresholds", "window", "tokens")}


def test_sliders_leave_the_bounds_to_the_model_a_request_names():
    from algm_viz.app.components import NumberSlider

    layer = NumberSlider(1, 12, value=5, step=1, label="GBM layer")  # the opening model's depth
    tau = NumberSlider(0.5, 1.0, value=0.95, step=0.005, label="τ local")  # the opening model's calibration
    assert layer.preprocess(20) == 20, "layer 20 of a 24-layer model a request names"
    assert tau.preprocess(0.3) == 0.3, "a τ below the opening model's slider"
    with pytest.raises(Exception, match="GBM layer must be a number"):
        layer.preprocess("5")
