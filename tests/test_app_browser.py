"""End to end in a real headless Chromium: upload an image, release the τ slider, see everything change."""

import os
import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (install it with `apt-get install -y chromium`)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from algm_viz.app.models import ModelRegistry  # noqa: E402
from algm_viz.app.session import SessionCache  # noqa: E402
from algm_viz.app.ui import EXAMPLES_DIR, Handlers, build_demo  # noqa: E402

TINY = dict(num_classes=5, depth=6, embed_dim=64, num_heads=2, decoder="linear", patch_size=8, image_size=64)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    registry = ModelRegistry(device="cpu", default_short_side=128, untrained=TINY, include_bundled=False)
    handlers = Handlers(registry, SessionCache(max_side=256), thresholds=(0.6, 0.8, 1.0))
    demo = build_demo(handlers).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _state(page) -> dict:
    """What the user sees: readout text, overlay sources, the τ marker of the plot."""
    return {
        "readout": page.inner_text("#readout"),
        "local": page.get_attribute("#local-overlay img", "src"),
        "global": page.get_attribute("#global-overlay img", "src"),
        "plot": page.inner_text("#curve-plot"),
    }


def test_upload_then_release_tau_updates_overlays_readout_and_plot(url, tmp_path):
    image = EXAMPLES_DIR / "coffee.png"
    if not image.is_file():
        pytest.skip(f"example image {image} is missing")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url, timeout=TIMEOUT_MS)
        page.locator("#input-image input[type=file]").set_input_files(str(image))
        page.wait_for_function("document.querySelector('#readout').innerText.includes('Tokens')", timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#curve-plot').innerText.includes('τ =')", timeout=TIMEOUT_MS)
        before = _state(page)
        assert before["local"] and before["global"], "both merge overlays are shown"
        page.screenshot(path=str(tmp_path / "before.png"), full_page=True)

        slider = page.locator("#tau-local input[type=range]")
        box = slider.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
        page.wait_for_function(
            "([text, plot]) => document.querySelector('#readout').innerText !== text"
            " && document.querySelector('#curve-plot').innerText !== plot",
            arg=[before["readout"], before["plot"]], timeout=TIMEOUT_MS)
        page.wait_for_function(
            "src => document.querySelector('#local-overlay img').getAttribute('src') !== src",
            arg=before["local"], timeout=TIMEOUT_MS)
        after = _state(page)
        page.screenshot(path=str(tmp_path / "after.png"), full_page=True)
        page.locator("#prop-attn input[type=checkbox]").check()
        page.wait_for_function("document.querySelector('#readout').innerText.includes('proportional attention')",
                               timeout=TIMEOUT_MS)
        browser.close()
    assert after["readout"] != before["readout"] and "Tokens" in after["readout"]
    assert after["local"] != before["local"] and after["global"] != before["global"]
    assert after["plot"] != before["plot"]
    if os.environ.get("ALGM_VIZ_SCREENSHOTS"):
        folder = Path(os.environ["ALGM_VIZ_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("before.png", "after.png"):
            (folder / name).write_bytes((tmp_path / name).read_bytes())
