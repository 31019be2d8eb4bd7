"""The page opens on the first street example with its results as the outputs' initial values (no request
for them), and the load that sets the example's image does not analyse it a second time."""

from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from conftest import tiny_registry  # noqa: E402

from algm_viz.app.files import PictureFiles  # noqa: E402
from algm_viz.app.session import SessionCache  # noqa: E402
from algm_viz.app.ui import VIEW_NAMES, Handlers, build_demo  # noqa: E402


@pytest.fixture(scope="module")
def opened():
    handlers = Handlers(tiny_registry(), SessionCache(max_side=128), thresholds=(0.7, 1.0), with_gflops=False)
    demo = build_demo(handlers)
    return handlers, demo


def _component(demo: gr.Blocks, elem_id: str) -> gr.components.Component:
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def _new_image_handler(demo: gr.Blocks):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "analyze_new_image")


def _opening_values(handlers: Handlers) -> list:
    model, image, label = handlers.opening_key
    opening = handlers.opening()
    return [model, image, label, opening.local_threshold, opening.global_threshold, opening.window,
            opening.global_layer, False, False]


def test_the_page_config_holds_the_opening_results(opened):
    handlers, demo = opened
    assert handlers.opening_key is not None and handlers.opening_key[0] == "untrained"
    readout = _component(demo, "readout").value
    assert "Tokens" in readout and "mIoU vs label" in readout, readout[:200]
    for elem_id in ("local-overlay", "global-overlay", "mean-colors", "ground-truth", "legend", "disagreement"):
        assert _component(demo, elem_id).value, f"{elem_id} has no initial picture"
    fresh = handlers.analyze(*handlers.opening_key)  # the same request later: the same readout
    assert fresh[VIEW_NAMES.index("readout")] == readout


def test_the_loaded_opening_image_is_not_analysed_again(opened):
    handlers, demo = opened
    handler = _new_image_handler(demo)
    values = _opening_values(handlers)
    skipped = handler(*values, True)
    views = 1 + len(VIEW_NAMES)  # the label map, then the view
    assert all(output == gr.skip() for output in skipped[:views]) and skipped[views] is False
    assert skipped[views + 1:] == tuple(values[1:3]), "what follows is of the opening image and label map"


@pytest.mark.parametrize("change", ["setting", "already-replaced"])
def test_any_other_new_image_request_is_analysed(opened, change):
    handlers, demo = opened
    handler = _new_image_handler(demo)
    values = _opening_values(handlers)
    shown = True
    if change == "setting":
        values[3] = 0.5  # the user moved τ local before the load's change arrived
    else:
        shown = False  # the page has shown other results since
    outputs = handler(*values, shown)
    assert outputs[1 + len(VIEW_NAMES)] is False
    readout = outputs[1 + VIEW_NAMES.index("readout")]
    assert isinstance(readout, str) and "Tokens" in readout
    assert outputs[-2:] == (values[1], outputs[0]), "the image and the label map (kept: it fits) analysed"


def test_what_follows_a_new_image_takes_the_image_and_label_map_analysed(opened):
    """The page sets a visitor's image (and the events that read the inputs see it) before its change event
    drops the previous label map: the curve, balance and purity after that event take what it analysed."""
    _, demo = opened
    label = next(block for block in demo.blocks.values() if isinstance(block, gr.File) and "label map" in (block.label or ""))
    index, new_image = next((i, f) for i, f in enumerate(demo.fns.values())
                            if getattr(f.fn, "__name__", "") == "analyze_new_image")
    analysed = new_image.outputs[-2:]
    assert all(isinstance(block, gr.State) for block in analysed)
    fns = list(demo.fns.values())
    after, frontier = set(), {index}
    while frontier:  # the chain from it, step after step
        frontier = {i for i, f in enumerate(fns) if f.trigger_after in frontier} - after
        after |= frontier
    following = [fns[i] for i in after]
    names = {getattr(f.fn, "__name__", "") for f in following}
    assert {"curve", "balance", "purity"} <= names, names
    for dependency in following:
        assert dependency.inputs[1:3] == analysed and label not in dependency.inputs


def test_without_prerun_the_page_has_no_initial_results():
    handlers = Handlers(tiny_registry(), SessionCache(max_side=128), thresholds=(0.7, 1.0), with_gflops=False)
    demo = build_demo(handlers, prerun=False)
    assert handlers.opening_key is None
    assert not _component(demo, "readout").value
    handler = _new_image_handler(demo)
    model = handlers.registry.default_key()
    assert handler(model, None, None, None, None, None, None, False, False, False)[1 + len(VIEW_NAMES)] is False



def test_the_opening_pictures_outlive_the_picture_pruning():
    handlers = Handlers(tiny_registry(), SessionCache(max_side=128), thresholds=(0.7, 1.0), with_gflops=False)
    handlers.pictures = PictureFiles(max_files=1)  # every new picture removes the one before
    demo = build_demo(handlers)
    pictures = [_component(demo, elem_id).value["path"] for elem_id in ("local-overlay", "legend", "ground-truth")]
    pictures += [side["path"] for side in _component(demo, "segmentation").value]
    later = handlers.analyze(*handlers.opening_key, 0.5)
    assert not Path(later[0]).exists(), "the pruning removes later pictures"
    assert all(Path(path).is_file() for path in pictures), "what the page opens on stays"
