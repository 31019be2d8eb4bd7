"""The token inspector in a real headless Chromium: click a patch, see its group outlined and the readout change;
and the ``/inspect``, ``/animate``, ``/purity`` and ``/layer_flow`` endpoints through ``gradio_client``."""

import json
import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from algm_viz.app.session import SessionCache  # noqa: E402
from algm_viz.app.ui import EXAMPLES_DIR, Handlers, build_demo  # noqa: E402

from conftest import BROWSER_TIMEOUT_MS as TIMEOUT_MS, CHROMIUM, CHROMIUM_ARGS as ARGS, free_port, tiny_registry  # noqa: E402

IMAGE = EXAMPLES_DIR / "coffee.png"


@pytest.fixture(scope="module")
def url():
    if not IMAGE.is_file():
        pytest.skip(f"example image {IMAGE} is missing")
    registry = tiny_registry(128)
    handlers = Handlers(registry, SessionCache(max_side=256), thresholds=(0.6, 1.0), with_gflops=False)
    demo = build_demo(handlers).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_inspect_endpoint_through_gradio_client(url):
    client_module = pytest.importorskip("gradio_client")
    client = client_module.Client(url, verbose=False)
    picture, similarity, attention, markdown, readout = client.predict(
        "untrained", client_module.handle_file(str(IMAGE)), None, 0.6, 0.6, 2, 3, False, 20, 30, api_name="/inspect")
    assert Path(picture).is_file() and "Merge group" in markdown
    assert readout["patch"]["row"] == 30 // 8 and readout["patch"]["col"] == 20 // 8
    assert readout["group"]["patches"] == len(readout["group"]["cells"]) >= 1
    assert len(readout["similarity"]["CLAP"]) == readout["grid"][0]
    files = client.predict("untrained", client_module.handle_file(str(IMAGE)), None, 0.6, 0.6, 2, 3, False,
                           api_name="/animate")
    assert any(str(f).endswith(".gif") for f in files)
    summary = client.predict("untrained", client_module.handle_file(str(IMAGE)), None, 0.6, 0.6, 2, 3, False,
                             api_name="/purity")[2]
    assert summary["classes_from"].startswith("baseline prediction") and "global" in summary["stages"]
    figure = client.predict("untrained", client_module.handle_file(str(IMAGE)), None, 0.6, 0.6, 2, 3, False,
                            api_name="/layer_flow")
    assert "GFLOPs" in json.dumps(figure)
    with pytest.raises(Exception, match="outside"):
        client.predict("untrained", client_module.handle_file(str(IMAGE)), None, 0.6, 0.6, 2, 3, False, 10_000, 3,
                       api_name="/inspect")


def _click(page, selector: str, fx: float, fy: float) -> None:
    """Click at fractions ``(fx, fy)`` of the picture as drawn inside its ``<img>`` box (object-fit: the
    picture may be letterboxed; Gradio reports no point for a click beside it)."""
    box = page.locator(selector).bounding_box()
    natural = page.evaluate(f"() => {{ const i = document.querySelector('{selector}'); return [i.naturalWidth, i.naturalHeight]; }}")
    scale = min(box["width"] / natural[0], box["height"] / natural[1])
    fit = page.evaluate(f"() => getComputedStyle(document.querySelector('{selector}')).objectFit")
    scale = min(scale, 1.0) if fit == "scale-down" else scale
    width, height = natural[0] * scale, natural[1] * scale
    left, top = box["x"] + (box["width"] - width) / 2, box["y"] + (box["height"] - height) / 2
    page.mouse.click(left + width * fx, top + height * fy)


def test_click_outlines_the_group_and_updates_the_readout(url, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (install it with `apt-get install -y chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        page.goto(url, timeout=TIMEOUT_MS)
        page.wait_for_selector("#input-image", timeout=TIMEOUT_MS)
        try:  # the app may show an example (with its label map) on load
            page.wait_for_selector("#input-image img", timeout=TIMEOUT_MS // 2)
        except sync_api.TimeoutError:
            page.locator("#input-image input[type=file]").set_input_files(str(IMAGE))
        page.wait_for_function("document.querySelector('#readout').innerText.includes('Tokens')", timeout=TIMEOUT_MS)
        assert "Click a point" in page.inner_text("#inspector-readout")
        _click(page, "#global-overlay img", 0.3, 0.3)
        page.wait_for_function("document.querySelector('#inspector-readout')?.innerText.includes('Merge group')",
                               timeout=TIMEOUT_MS)
        page.wait_for_selector("#inspector-image img", timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#inspector-similarity')?.innerText.includes('τ')",
                               timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#purity-readout')?.innerText.includes('Merge purity')",
                               timeout=TIMEOUT_MS)
        first = page.inner_text("#inspector-readout")
        first_picture = page.get_attribute("#inspector-image img", "src")
        page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)
        _click(page, "#local-overlay img", 0.8, 0.85)
        page.wait_for_function("text => (document.querySelector('#inspector-readout')?.innerText ?? text) !== text"
                               " && document.querySelector('#inspector-readout').innerText.includes('Merge group')",
                               arg=first, timeout=TIMEOUT_MS)
        page.wait_for_function("src => document.querySelector('#inspector-image img')?.getAttribute('src') !== src",
                               arg=first_picture, timeout=TIMEOUT_MS)
        second = page.inner_text("#inspector-readout")
        browser.close()
    rows = [tuple(map(int, re.search(r"row (\d+), col (\d+)", text).groups())) for text in (first, second)]
    assert rows[0] != rows[1], "the second click inspects another patch"
    assert rows[1][0] > rows[0][0] and rows[1][1] > rows[0][1], "the click position reaches the model frame"
    if os.environ.get("ALGM_VIZ_SCREENSHOTS"):
        folder = Path(os.environ["ALGM_VIZ_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "inspector.png").write_bytes((tmp_path / "inspector.png").read_bytes())
