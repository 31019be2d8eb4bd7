"""The token inspector's panel: its components, its handler (the ``/inspect`` endpoint) and its events.

Click a point of the uploaded image, of a merge overlay or of the inspector's own picture (Gradio's
``select`` event; ``SelectData.index`` is in pixels of the picture as shown) → the point in model-input
pixels goes to two hidden numbers, then ``/inspect`` draws the patch's CLAP window and merge group, its
similarity maps at the CLAP and GBM layers, its attention baseline beside ALGM, and the readout.
``/inspect`` takes (model, image, label, τ local, τ global, window, GBM layer, proportional attention,
x, y) with ``(x, y)`` in pixels of the model input (the frame of every picture the app returns); every input
after the image is optional (the page's opening setting, the point at the centre).
``/purity`` (the same inputs without the point) answers merge purity and error attribution for the image
(:mod:`.purity`); ``/animate`` (the same inputs) writes the τ animation (:mod:`.animation`); ``/layer_flow`` plots
tokens and GFLOPs per encoder layer (:mod:`.flow`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import gradio as gr
import numpy as np

from . import inspector
from . import flow as flow_view
from . import purity as purity_view
from .animation import tau_animation
from .gpu import forward_budget, gpu, image_pixels

__all__ = ["InspectorPanel"]

logger = logging.getLogger(__name__)

HINT = "Click a point of the image (or of a merge map) to inspect its patch."


class InspectorPanel:
    """Builds the inspector's components where it is created (inside a ``gr.Blocks``); :meth:`wire` connects
    them once the app's inputs exist. ``handlers``: the app's :class:`~.ui.Handlers` (sessions, pictures)."""

    def __init__(self, handlers: Any, height: int = 380) -> None:
        self.handlers = handlers
        with gr.Accordion("Token inspector: click a patch", open=True):
            gr.Markdown("Click any point of the image, of the CLAP/GBM maps or of the picture below. Outlined: the "
                        "patch (red), its CLAP window (yellow) and its final merge group (cyan, the rest dimmed). "
                        "The similarity maps show how alike its token is to every patch's token where CLAP and GBM "
                        "compare them (inside the white line a token is above τ); the attention maps show where it "
                        "looks in the last encoder layer, without and with merging. Merge purity (below): which merged "
                        "groups mix classes (label map, else the baseline prediction) and how many of the pixels "
                        "merging changed lie in them.")
            with gr.Row(equal_height=True):
                self.picture = gr.Image(label="Inspected patch, its CLAP window and merge group", format="png",
                                        height=height, interactive=False, elem_id="inspector-image")
                self.readout = gr.Markdown(HINT, elem_id="inspector-readout")
            with gr.Row():
                self.similarity = gr.Plot(label="Similarity to the clicked token", elem_id="inspector-similarity")
                self.attention = gr.Plot(label="Attention of the clicked patch", elem_id="inspector-attention")
            with gr.Row(equal_height=True):
                self.purity_picture = gr.Image(label="Merge purity: final groups that mix classes (red), pure merged "
                                                     "groups (green)", format="png", height=height, interactive=False,
                                               elem_id="purity-image")
                self.purity_readout = gr.Markdown(elem_id="purity-readout")
            self.purity_json = gr.JSON(label="Merge purity (JSON)", visible=False)
            with gr.Row():
                self.flow_button = gr.Button("Tokens and GFLOPs per layer (baseline, ALGM, ToMe)", scale=0)
                self.flow_plot = gr.Plot(label="Layer by layer", elem_id="flow-plot")
            with gr.Row():
                self.animate_button = gr.Button("Export the τ animation (GIF, and MP4 where the codec exists)", scale=0)
                self.animation_files = gr.File(label="τ animation: merge groups and segmentation as τ falls "
                                                     "(the τ curve's values, both stages)", file_count="multiple",
                                               elem_id="animation-files")
            self.x = gr.Number(None, label="x (model-input pixels)", visible=False, elem_id="inspector-x")
            self.y = gr.Number(None, label="y (model-input pixels)", visible=False, elem_id="inspector-y")
            self.readout_json = gr.JSON(label="Inspector readout (JSON)", visible=False)
        self.outputs = [self.picture, self.similarity, self.attention, self.readout, self.readout_json]

    def inspect(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
                global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
                prop_attn: bool = False, x: float | None = None, y: float | None = None):
        """-> (outlined picture, similarity figure, attention figure, readout Markdown, readout dict). Settings of
        None: the page's opening ones (:meth:`~.ui.Handlers.settings`); a point of None: the model input's centre."""
        if not image:
            raise gr.Error("upload an image (or pick an example) first")
        session = self._session(model, image, label)
        height, width = session.image.shape[:2]
        x, y = (width - 1) / 2 if x is None else x, (height - 1) / 2 if y is None else y
        try:
            view = inspector.inspect(session, self.handlers.settings(local_tau, global_tau, window, global_layer, prop_attn),
                                     x, y)
        except ValueError as error:  # ImageError is one
            logger.info("inspect refused: %s", error)
            raise gr.Error(str(error)) from error
        return (self.handlers.pictures.save(view.picture), view.similarity, view.attention,
                inspector.readout_markdown(view.readout), view.readout)

    def purity(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
               global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
               prop_attn: bool = False):
        """-> (map of mixed and pure merged groups, purity readout Markdown, purity summary dict)."""
        if not image:
            return None, "", None
        session = self._session(model, image, label)
        try:
            picture, summary = purity_view.purity(
                session, self.handlers.settings(local_tau, global_tau, window, global_layer, prop_attn))
        except ValueError as error:
            logger.info("purity refused: %s", error)
            raise gr.Error(str(error)) from error
        return self.handlers.pictures.save(picture), purity_view.purity_markdown(summary), summary

    def animate(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
                global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
                prop_attn: bool = False) -> list[str]:
        """-> paths of the τ animation (GIF, MP4 where OpenCV has the codec) over the τ curve's values."""
        if not image:
            raise gr.Error("upload an image (or pick an example) first")
        session = self._session(model, image, label)
        try:
            paths = tau_animation(session, self.handlers.settings(local_tau, global_tau, window, global_layer, prop_attn),
                                  self.handlers.thresholds, self.handlers.exports.new())
        except ValueError as error:
            logger.info("animation refused: %s", error)
            raise gr.Error(str(error)) from error
        return [str(path) for path in paths]

    def flow(self, model: str, image: str | None, label: str | None = None, local_tau: float | None = None,
             global_tau: float | None = None, window: int | None = None, global_layer: int | None = None,
             prop_attn: bool = False):
        """-> tokens and GFLOPs per encoder layer: baseline, ALGM at the setting, ToMe ending at ALGM's tokens."""
        if not image:
            raise gr.Error("upload an image (or pick an example) first")
        session = self._session(model, image, label)
        try:
            result = flow_view.flow(session, self.handlers.settings(local_tau, global_tau, window, global_layer, prop_attn))
        except ValueError as error:
            logger.info("layer flow refused: %s", error)
            raise gr.Error(str(error)) from error
        return flow_view.flow_figure(result)

    def refresh(self, *args: Any):
        """After a new setting: inspect the same point again; nothing to do before the first click."""
        *rest, x, y = args
        if not rest[1] or x is None or y is None:
            return (gr.skip(),) * len(self.outputs)
        return self.inspect(*args)

    def _session(self, model: str, image: str, label: str | None):
        try:
            return self.handlers._session(model, image, label)
        except ValueError as error:  # ImageError is one
            raise gr.Error(str(error)) from error

    def _point_on_upload(self, model: str, image: str | None, label: str | None, event: gr.SelectData):
        """A click on the uploaded image (its own pixels) -> the point in model-input pixels."""
        if not image:
            return gr.skip(), gr.skip()
        session = self._session(model, image, label)
        return inspector.to_model_frame(*event.index, session.original_shape, session.image.shape[:2])

    def _point_on_picture(self, shown: np.ndarray | None, model: str, image: str | None, label: str | None,
                          event: gr.SelectData):
        """A click on a picture the app drew (model input, maybe enlarged for display) -> model-input pixels."""
        if not image or shown is None:
            return gr.skip(), gr.skip()
        session = self._session(model, image, label)
        return inspector.to_model_frame(*event.index, np.asarray(shown).shape[:2], session.image.shape[:2])

    def wire(self, inputs: Sequence[gr.components.Component], upload: gr.Image, pictures: Sequence[gr.Image],
             triggers: Sequence[Any], new_image: Any, new_image_inputs: Sequence[Any], work: dict[str, Any]) -> None:
        """Connect the events. ``inputs``: (model, image, label, τ local, τ global, window, GBM layer,
        proportional attention); ``upload``: the image input; ``pictures``: overlays in the model-input frame
        (the inspector's own picture is added); ``triggers``: events after which the same point is inspected
        again; ``new_image``: the event that analyses a new image and settles its label map (the purity
        follows it, not the image's change, which would pair the new image with the previous label map), and
        ``new_image_inputs`` the values it analysed, in ``inputs``' order; ``work``: the queue settings of model work."""
        model, image, label = inputs[:3]
        on_gpu: Callable[[Callable], Callable] = gpu(lambda model, image, *rest: forward_budget(2, image_pixels(image)))
        point = [self.x, self.y]
        clicks = [upload.select(self._point_on_upload, [model, image, label], point, api_visibility="private")]
        for picture in [*pictures, self.picture]:
            clicks.append(picture.select(self._point_on_picture, [picture, model, image, label], point,
                                         api_visibility="private"))
        for index, click in enumerate(clicks):
            names = {"api_name": "inspect"} if index == 0 else {"api_visibility": "private"}
            click.then(on_gpu(self.inspect), [*inputs, *point], self.outputs, **names, **work)
        image.change(lambda: (None, None, None, None, None, HINT, None), None, [*point, *self.outputs],
                     api_visibility="private")
        gr.on(list(triggers), on_gpu(self.refresh), [*inputs, *point], self.outputs, api_visibility="private",
              trigger_mode="always_last", **work)
        animate_gpu = gpu(lambda model, image, *rest: forward_budget(len(self.handlers.thresholds), image_pixels(image)))
        flow_gpu = gpu(lambda model, image, *rest: forward_budget(3, image_pixels(image)))
        self.flow_button.click(flow_gpu(self.flow), list(inputs), [self.flow_plot], api_name="layer_flow", **work)
        self.animate_button.click(animate_gpu(self.animate), list(inputs), [self.animation_files], api_name="animate",
                                  **work)
        purity_outputs = [self.purity_picture, self.purity_readout, self.purity_json]
        gr.on(list(triggers), on_gpu(self.purity), list(inputs), purity_outputs, api_name="purity",
              trigger_mode="always_last", **work)
        new_image.success(on_gpu(self.purity), list(new_image_inputs), purity_outputs, api_visibility="private", **work)
