"""The compare panel's layer slider: each compared method's merge map after encoder layer L (``/layer_maps``).

``/layer_maps`` takes (model, image, label, methods, merge map A, merge map B, layer; all but the model and the
image optional, the compare panel's opening values) and returns the picture: maps A and B at their values (map B
of ``method:match`` at map A's GFLOPs), then every other checked method at the middle value of its knob. The forwards
(one per method) are cached per image and methods, so moving the slider only redraws.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import gradio as gr

from ..evaluation.compare import DEFAULT_MAPS, resolve_specs
from ..layer_maps import LayerMaps, layer_maps, layer_picture, representative_specs
from .gpu import forward_budget, gpu, image_pixels
from .session import LRU

__all__ = ["COMPARE_METHODS", "FIRST_LAYER", "LayerMapsPanel"]

logger = logging.getLogger(__name__)

#: The compare panel's opening methods (also the ``/compare`` and ``/layer_maps`` default).
COMPARE_METHODS = ("algm", "tome", "pool2d", "grid", "kv_grid", "cts")
#: The layer the slider opens on (and ``/layer_maps``' default).
FIRST_LAYER = 1


class LayerMapsPanel:
    """The slider and the picture, built where it is created (inside the compare accordion); :meth:`wire`
    connects them. ``handlers``: the app's :class:`~.ui.Handlers`; ``depth``: the slider's last layer."""

    def __init__(self, handlers: Any, depth: int) -> None:
        self.handlers = handlers
        self._maps: LRU[LayerMaps] = LRU(8)
        with gr.Row():
            self.layer = gr.Slider(1, depth, value=FIRST_LAYER, step=1, label="After encoder layer L", elem_id="layer-slider",
                                   info="which patches share a token once layer L has run, for each method "
                                        "(A and B at their values, the other checked methods at their middle value)")
            self.button = gr.Button("Merge maps after layer L", scale=0)
        self.picture = gr.Image(label="Merge groups after layer L (one colour per token of several patches)",
                                format="png", interactive=False, elem_id="layer-maps")

    def show(self, model: str, image: str | None, label: str | None = None, methods: Sequence[str] = COMPARE_METHODS,
             map_a: str = DEFAULT_MAPS[0], map_b: str = DEFAULT_MAPS[1], layer: float = FIRST_LAYER) -> str:
        """-> path of the picture of every method's merge groups after ``layer``."""
        specs = self.handlers.check_compare(image, methods, map_a, map_b)
        try:
            session = self.handlers._session(model, image, label)
        except ValueError as error:  # ImageError is one
            raise gr.Error(str(error)) from error
        entry = session.entry
        if not isinstance(layer, (int, float)) or layer != int(layer) or not 1 <= layer <= entry.depth:
            raise gr.Error(f"the layer must be a whole number in 1..{entry.depth}, got {str(layer)[:20]}")
        key = (entry.key, hashlib.sha1(session.image.tobytes()).hexdigest(), session.image.shape, tuple(methods),
               tuple(specs))

        def compute() -> LayerMaps:
            with self.handlers.gate.interactive(), entry.lock, entry.precision():
                chosen = resolve_specs(entry.model, session.image, specs, short_side=entry.short_side)
                return layer_maps(entry.model, session.image, representative_specs(list(methods), chosen),
                                  short_side=entry.short_side)

        try:
            maps = self._maps.get(key, compute)
        except ValueError as error:
            logger.info("layer maps refused: %s", error)
            raise gr.Error(str(error)) from error
        return self.handlers.pictures.save(layer_picture(maps, int(layer)))

    def wire(self, inputs: Sequence[gr.components.Component], work: dict[str, Any]) -> None:
        """``inputs``: (model, image, label, methods, merge map A, merge map B) of the compare panel."""
        on_gpu = gpu(lambda model, image, label, methods, *rest: forward_budget(len(methods or ()) + 2,
                                                                                image_pixels(image)))
        gr.on([self.button.click, self.layer.release], on_gpu(self.show), [*inputs, self.layer], [self.picture],
              api_name="layer_maps", trigger_mode="always_last", **work)
