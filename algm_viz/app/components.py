"""Input components that answer a wrongly typed API value (``"abc"`` or ``null`` for τ, a number for a file)
with a message that names the input, where Gradio's own components answer with an empty error.

Each is rendered by the frontend component of its Gradio parent (``is_template``).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pydantic

__all__ = ["NumberSlider", "LabelFile", "MethodChoices", "checked_payload"]


def _shown(value: Any) -> str:
    """A short excerpt of a user value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_payload(model: type[pydantic.BaseModel], what: str) -> type[pydantic.BaseModel]:
    """``model`` (a Gradio file data model) whose validation failure is a ``gr.Error`` naming ``what``."""

    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        try:
            return pydantic.BaseModel.model_validate.__func__(cls, obj, *args, **kwargs)
        except pydantic.ValidationError:
            raise gr.Error(f"{what} must be an uploaded file, got {_shown(obj)}") from None

    return type(model.__name__, (model,), {"model_validate": classmethod(model_validate), "__module__": model.__module__})


class NumberSlider(gr.Slider):
    """``gr.Slider`` that refuses a value that is not a number with a message naming the slider (NaN passes
    on to the handler, which names the setting)."""

    is_template = True

    def preprocess(self, payload: Any) -> float:
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(f"{self.label or 'a slider'} must be a number, got {_shown(payload)}")
        return super().preprocess(payload)


class LabelFile(gr.File):
    """``gr.File`` (one file) whose payload, when it is no file, gets a message naming the input."""

    is_template = True

    def __init__(self, *args: Any, what: str = "the label map", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_model = checked_payload(self.data_model, what)


class MethodChoices(gr.CheckboxGroup):
    """``gr.CheckboxGroup`` that refuses a payload that is not a list with a message naming the input."""

    is_template = True

    def preprocess(self, payload: Any) -> list[Any]:
        if not isinstance(payload, list):
            raise gr.Error(f"{self.label or 'the choices'} must be a list of names, got {_shown(payload)}")
        return super().preprocess(payload)
