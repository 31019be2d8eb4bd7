"""ALGM on a model: its τ defaults, its configuration from a call's arguments, applying it and changing τ."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional

from torch import nn

from ..merging import ONLINE
from .stages import ALGMConfig
from .surgery import algm_state, apply_plan, find_vit

__all__ = ["AUTHOR_DEFAULT_THRESHOLDS", "algm_config", "apply_algm", "default_thresholds", "set_thresholds"]

# τ defaults of the authors' code (CLAP with 2×2 windows), keyed by ViT width: Ti, S, B, L.
AUTHOR_DEFAULT_THRESHOLDS = {192: 0.90, 384: 0.88, 768: 0.94, 1024: 0.95}


def default_thresholds(model: nn.Module) -> dict[str, float]:
    """``{"local", "global"}``: the τ :func:`apply_algm` uses when given none, i.e. the model's calibrated
    ``model.info.thresholds`` where it has them, else the authors' defaults for the ViT's width."""
    from ..models.description import describe  # the models package imports this one

    calibrated = describe(model).thresholds or {}
    fallback = AUTHOR_DEFAULT_THRESHOLDS.get(getattr(find_vit(model), "embed_dim", 0), 0.9)
    return {stage: float(calibrated.get(stage, fallback)) for stage in ("local", "global")}


def algm_config(defaults: Mapping[str, float], **fields: Any) -> ALGMConfig:
    """The :class:`ALGMConfig` of ``fields`` (its field names); a threshold that is missing or None takes
    ``defaults["local"]`` / ``defaults["global"]``, GBM's the online rule when ``mode="official"``."""
    if fields.get("mode") == "official" and fields.get("global_threshold") is None:
        fields["global_threshold"] = ONLINE
    for stage in ("local", "global"):
        if fields.get(f"{stage}_threshold") is None:
            fields[f"{stage}_threshold"] = defaults[stage]
    return ALGMConfig(**fields)


def apply_algm(
    model: nn.Module,
    local_layer: Optional[int] = 1,
    global_layer: Optional[int] = 5,
    window: tuple[int, int] | int = (2, 2),
    local_threshold: Optional[float] = None,
    global_threshold: Optional[float | str] = None,
    *,
    prop_attn: bool = False,
    batch_min: bool = False,
    mode: Optional[str] = None,
) -> nn.Module:
    """Patch ``model`` in place with ALGM: CLAP in ``local_layer``, GBM in ``global_layer`` (1-based, as
    in the paper), between attention and MLP, on the tokens after the attention residual.

    Thresholds left as None take the model's calibrated values (``model.info.thresholds``, a dict with
    ``"local"``/``"global"``) where it has them, else the authors' defaults for the ViT's width.
    ``global_threshold="official"`` (:data:`ONLINE`) is the official code's online GBM threshold, set
    per image (per batch with ``batch_min=True``, as the official code) and recorded in
    ``state.record.thresholds()``; it implies ``mode="official"``. ``mode="official"`` runs CLAP and
    GBM as the official code does (``>=`` comparisons, its token order and A/B partition; see
    :mod:`algm_viz.merging`), with the online threshold unless ``global_threshold`` is a number;
    ``mode="paper"`` (the default otherwise) follows the paper. Applying again replaces the
    configuration. Returns ``model``.
    """
    config = algm_config(default_thresholds(model), local_layer=local_layer, global_layer=global_layer, window=window,
                         local_threshold=local_threshold, global_threshold=global_threshold, prop_attn=prop_attn,
                         batch_min=batch_min, mode=mode)
    return apply_plan(model, config.plan())


def set_thresholds(model: nn.Module, local_threshold: float | None = None,
                   global_threshold: float | str | None = None) -> None:
    """Change τ of an ALGM-patched model without re-patching (None keeps a value; ``global_threshold``
    may be :data:`ONLINE`, see :func:`apply_algm`)."""
    state = algm_state(model)
    if state is None or state.config is None:
        raise RuntimeError("ALGM is not applied to this model")
    changes = {"local_threshold": local_threshold, "global_threshold": global_threshold}
    state.config = replace(state.config, **{key: value for key, value in changes.items() if value is not None})
    state.stages = tuple(state.config.stages())
