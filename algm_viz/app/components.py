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
    """``model`` (a Gradio file data model) whose validation of a request's input (Gradio passes the context
    ``validate_meta``) fails with a ``gr.Error`` naming ``what``; other validations (examples, which Gradio
    tries and catches) fail as before."""

    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        try:
            return pydantic.BaseModel.model_validate.__func__(cls, obj, *args, **kwargs)
        except pydantic.ValidationError:
            if not (kwargs.get("context") or {}).get("validate_meta"):
                raise
            raise gr.Error(f"{what} must be an uploaded file, got {_shown(obj)}") from None

    return type(model.__name__, (model,), {"model_validate": classmethod(model_validate), "__module__": model.__module__})


class NumberSlider(gr.Slider):
    """``gr.Slider`` that refuses a value that is not a number with a message naming the slider (NaN passes
    on to the handler, which names the setting). Its bounds are not checked here: they are the page's opening
    model's (an API call may name a deeper model, or one calibrated lower); the handler checks the value
    against the model the request names."""

    is_template = True

    def preprocess(self, payload: Any) -> float:
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise gr.Error(f"{self.label or 'a slider'} must be a number, got {_shown(payload)}")
        return gr.Number.round_to_precision(payload, self.precision)


#: How the API page describes a label-map input.
LABEL_MAP_API = ("optional (None: quality is the agreement with the baseline): a PNG of class ids, 255 = ignore, "
                 "the size of the image")


class LabelFile(gr.File):
    """``gr.File`` for a label map whose payload, when it is no file, gets a message naming the input.
    (No ``__init__`` of its own: the frontend's props come from ``gr.File``'s signature.)"""

    is_template = True

    @property
    def data_model(self) -> type[pydantic.BaseModel] | None:
        return self.__dict__.get("_checked_model")

    @data_model.setter
    def data_model(self, model: type[pydantic.BaseModel] | None) -> None:  # gr.File.__init__ sets it
        self.__dict__["_checked_model"] = checked_payload(model, "the label map") if model is not None else None

    def api_info_as_input(self) -> dict[str, Any]:
        """The API page says the label map is optional and what it holds."""
        return {**super().api_info_as_input(), "additional_description": LABEL_MAP_API}

    def example_payload(self) -> None:
        return None  # the API page's example: no label map (gr.File's own example is a PDF)

    def example_value(self) -> None:
        return None


class MethodChoices(gr.CheckboxGroup):
    """``gr.CheckboxGroup`` that refuses a payload that is not a list with a message naming the input."""

    is_template = True

    def preprocess(self, payload: Any) -> list[Any]:
        if not isinstance(payload, list):
            raise gr.Error(f"{self.label or 'the choices'} must be a list of names, got {_shown(payload)}")
        return super().preprocess(payload)
