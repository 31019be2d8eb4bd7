"""End to end in a real headless Chromium: the page opens with results, an upload and a τ release change
everything, a model that fails to load leaves the page usable, and at 400 px nothing overlaps."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from conftest import BROWSER_TIMEOUT_MS as TIMEOUT_MS, CHROMIUM, CHROMIUM_ARGS as ARGS, free_port, tiny_registry  # noqa: E402

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (install it with `apt-get install -y chromium`)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from algm_viz.app.session import SessionCache  # noqa: E402
from algm_viz.serving import VIEW_PICTURES_SHOWN  # noqa: E402
from algm_viz.app.ui import APP_CSS, EXAMPLES_DIR, Handlers, build_demo  # noqa: E402
from algm_viz.models import KNOWN_MODELS  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # an official checkpoint whose download is refused at once
        patch.setenv("ALGM_VIZ_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setitem(KNOWN_MODELS, "seg_tiny_mask", {**KNOWN_MODELS["seg_tiny_mask"], "url": "http://127.0.0.1:9/seg_tiny_mask"})
        registry = tiny_registry(128)
        handlers = Handlers(registry, SessionCache(max_side=256), thresholds=(0.6, 0.8, 1.0))
        demo = build_demo(handlers).queue()
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=APP_CSS)
        yield f"http://127.0.0.1:{port}/"
        demo.close()


def _has(selector: str, text: str) -> str:
    """A wait_for_function body: the element's text contains ``text`` (the element may not exist yet)."""
    return f"(document.querySelector({selector!r})?.innerText || '').includes({text!r})"


def _readout(page) -> str:
    """The readout from its first line on (without the progress timer Gradio shows above it while busy)."""
    text = page.inner_text("#readout")
    return text[text.index("Tokens"):]


def _browser(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


def test_page_opens_with_results_of_the_first_street_example(url):
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url, timeout=TIMEOUT_MS)  # no upload, no click
        page.wait_for_function(_has("#readout", "Tokens"), timeout=TIMEOUT_MS)
        page.wait_for_function(VIEW_PICTURES_SHOWN, timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#curve-plot", "τ global varied"), timeout=TIMEOUT_MS)
        readout = page.inner_text("#readout")
        sources = {name: page.get_attribute(f"#{name} img", "src") for name in ("local-overlay", "global-overlay",
                                                                               "mean-colors", "ground-truth")}
        browser.close()
    assert "mIoU vs label" in readout, "the example comes with its label map"
    assert "median and quartiles of" in readout, "the latency says how it was measured"
    assert all(sources.values()), f"every view is shown: {sources}"


def test_a_model_that_fails_to_load_leaves_the_page_usable(url):
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url, timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#readout", "Tokens"), timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#curve-plot", "τ global varied"), timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # the label map's own change event
        before = _readout(page)
        dropdown = page.get_by_label("Model", exact=True)
        shown = dropdown.input_value()
        dropdown.click()
        page.get_by_role("option", name="seg_tiny_mask", exact=False).first.click()
        page.wait_for_function("document.body.innerText.includes('offline: cannot reach 127.0.0.1')", timeout=TIMEOUT_MS)
        page.wait_for_function("v => document.querySelector('input[aria-label=\"Model\"]')?.value === v", arg=shown,
                               timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # anything the failure might still trigger
        toasts = page.locator(".toast-body").count()
        texts = {name: page.inner_text(f"#{name}") for name in ("tau-local", "tau-global", "curve-plot", "readout")}
        errors = {name: text[:80] for name, text in texts.items() if "Error" in text}
        assert _readout(page) == before, "the previous results stay"
        slider = page.locator("#tau-local input[type=range]")
        box = slider.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)
        page.wait_for_function("text => !document.querySelector('#readout').innerText.endsWith(text)", arg=before,
                               timeout=TIMEOUT_MS)
        browser.close()
    assert toasts == 1, f"one toast, not {toasts}"
    assert not errors, f"no control turns into an error box: {errors}"


#: What must not overlap at 400 px: the controls and the panels.
NARROW_IDS = ["input-image", "tau-local", "tau-global", "prop-attn", "readout", "local-overlay", "global-overlay",
              "mean-colors", "segmentation", "legend", "disagreement", "ground-truth", "curve-plot"]


def test_at_400_px_the_page_is_one_column_without_overlaps(url):
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 400, "height": 900})
        page.goto(url, timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#readout", "Tokens"), timeout=TIMEOUT_MS)
        for name in NARROW_IDS:  # as a reader scrolls down: the pictures below the fold load (lazily)
            page.locator(f"#{name}").scroll_into_view_if_needed(timeout=TIMEOUT_MS)
        page.wait_for_function(VIEW_PICTURES_SHOWN, timeout=TIMEOUT_MS)  # the layout with its pictures
        boxes = {name: page.locator(f"#{name}").bounding_box() for name in NARROW_IDS}
        buttons = [b for b in (page.locator(f"button:visible >> nth={i}").bounding_box()
                               for i in range(page.locator("button:visible").count())) if b and b["width"] > 0]
        width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
    assert width <= 400, f"the page scrolls sideways ({width} px)"
    assert all(boxes.values()), {k: v for k, v in boxes.items() if not v}

    def overlap(a, b, tolerance=1.0):
        return (min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]) > tolerance
                and min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]) > tolerance)

    names = list(boxes)
    clashes = [(p, q) for i, p in enumerate(names) for q in names[i + 1:] if overlap(boxes[p], boxes[q])]
    assert not clashes, f"overlapping at 400 px: {clashes}"
    for name, box in boxes.items():
        assert box["x"] >= -1 and box["x"] + box["width"] <= 401, f"{name} leaves the screen: {box}"
    for name in ("tau-local", "tau-global", "prop-attn"):  # labels and controls do not run into buttons
        hits = [b for b in buttons if overlap(b, boxes[name]) and not _inside(b, boxes[name])]
        assert not hits, f"a button overlaps {name}: {hits}"


def _inside(inner: dict, outer: dict) -> bool:
    """``inner`` lies within ``outer`` (a control's own buttons, such as a slider's reset)."""
    return (inner["x"] >= outer["x"] - 1 and inner["y"] >= outer["y"] - 1
            and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 1
            and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 1)


def _settled_text(selector: str) -> str:
    """A JS expression: the element's text without the progress timer line Gradio shows while it is busy
    ("0.2s", "processing | 1.3s"), so a ticking timer does not read as new content."""
    return (f"(document.querySelector({selector!r})?.innerText || '').split('\\n')"
            ".filter(line => !/^[a-z |:/\\d.]*\\d+(\\.\\d+)?s$/.test(line.trim())).join('\\n').trim()")


def _state(page) -> dict:
    """What the user sees: readout text, overlay sources, the τ marker of the plot."""
    return {
        "readout": page.evaluate(_settled_text("#readout")),
        "local": page.get_attribute("#local-overlay img", "src"),
        "global": page.get_attribute("#global-overlay img", "src"),
        "plot": page.evaluate(_settled_text("#curve-plot")),
    }


def test_a_label_map_given_before_its_image_is_kept(url, tmp_path):
    """Label map first, then the image it belongs to: the map fits the new image and stays (only a map of
    another size, like the example's, is dropped)."""
    image = EXAMPLES_DIR / "coffee.png"
    if not image.is_file():
        pytest.skip(f"example image {image} is missing")
    height, width = cv2.imread(str(image)).shape[:2]
    label = tmp_path / "coffee_label.png"
    cv2.imwrite(str(label), (np.arange(height * width) % 5).astype(np.uint8).reshape(height, width))
    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url, timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#readout", "mIoU vs label"), timeout=TIMEOUT_MS)
        page.locator("#input-label button[aria-label=Clear]").click()  # the example's map off, as a visitor does
        page.wait_for_function("!" + _has("#readout", "mIoU vs label") + " && " + _has("#readout", "Tokens"),
                               timeout=TIMEOUT_MS)
        page.locator("#input-label input[type=file]").set_input_files(str(label))  # refused: not the example's size
        page.wait_for_timeout(1500)
        size = f"(({_settled_text('#readout')}).match(/\\d+×\\d+ input/) || [''])[0]"
        example_size = page.evaluate(size)
        page.locator("#input-image input[type=file]").set_input_files(str(image))
        page.wait_for_function(f"old => {size} && {size} !== old", arg=example_size, timeout=TIMEOUT_MS)  # the image's
        page.wait_for_function(_has("#curve-plot", "τ global varied"), timeout=TIMEOUT_MS)
        readout = page.evaluate(_settled_text("#readout"))
        browser.close()
    assert "mIoU vs label" in readout, readout


def test_upload_then_release_tau_updates_overlays_readout_and_plot(url, tmp_path):
    image = EXAMPLES_DIR / "coffee.png"
    if not image.is_file():
        pytest.skip(f"example image {image} is missing")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(url, wait_until="commit", timeout=TIMEOUT_MS)
        # an upload as soon as the page takes one, while the opening example and its events are still arriving
        page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=TIMEOUT_MS)
        page.locator("#input-image input[type=file]").set_input_files(str(image))
        # the example's label map belongs to another image: it is dropped, the new image analysed without it
        page.wait_for_function("!" + _has("#readout", "mIoU vs label") + " && " + _has("#readout", "Tokens"),
                               timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#curve-plot", "τ global varied"), timeout=TIMEOUT_MS)
        page.wait_for_function(_has("#purity-readout", "Merge purity"), timeout=TIMEOUT_MS)
        page.wait_for_timeout(1500)  # the attention balance, and any error of these events
        errors = [text for text in page.locator(".toast-body").all_inner_texts() if text.startswith("Error")]
        assert not errors, f"no request paired the new image with the example's label map: {errors}"
        assert page.locator("#input-image img").get_attribute("src").endswith("coffee.png"), "the upload stays"
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
            f"([text, plot]) => {_settled_text('#readout')} !== text && {_settled_text('#curve-plot')} !== plot",
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
