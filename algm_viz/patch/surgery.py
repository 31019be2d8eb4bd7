"""Model surgery: put merge stages into a timm plain ViT (or a model that holds one), switch them off for a
while, and take them out.

:func:`apply_merging` swaps the ``__class__`` of the ViT and of its blocks for subclasses that share one
:class:`~algm_viz.patch.state.ALGMState`; :func:`remove_algm` swaps them back. Prefix tokens
(class/register tokens) are never merged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Optional, Sequence

from torch import Tensor, nn

from ..attention import attend, project_qkv
from .stages import ALGMConfig, MergePlan, MergeStage, SharePolicy
from .state import ALGMState

__all__ = [
    "algm_state",
    "apply_merging",
    "apply_plan",
    "find_vit",
    "lengths_forced",
    "merging_disabled",
    "merging_restored",
    "remove_algm",
]


def _attention_with_keys(attn: nn.Module, x: Tensor, bias: Tensor | None, state: ALGMState, layer: int) -> tuple[Tensor, Tensor]:
    """A timm ``Attention`` forward that also returns the keys (mean over heads, ``[B, T, d]``) and
    applies the layer's key/value-only merges. x: ``[B, T, C]`` (normalised block input)."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = project_qkv(attn, x)
    keys = k.mean(1)
    if state.stages_at(layer, kv_only=True):
        # The merged keys' bias (log size, MASKED_BIAS on padding) replaces the token-level one.
        k, v, bias = state.merge_keys_values(layer, x, keys, k, v)
    out = attn.norm(attend(attn, q, k, v, bias).transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), keys


class ALGMBlock(nn.Module):
    """Mixin for a timm ``Block``: (token sharing), attention, merging, MLP."""

    _algm_state: ALGMState
    _algm_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        state, layer = self._algm_state, self._algm_layer
        x = state.merge_in_layer(layer, x, before_attention=True)
        bias = state.attn_bias
        if attn_mask is not None:
            bias = attn_mask if bias is None else bias + attn_mask
        keys = None
        if state.needs_keys(layer) or state.stages_at(layer, kv_only=True):
            attended, keys = _attention_with_keys(self.attn, self.norm1(x), bias, state, layer)
        else:
            attended = self.attn(self.norm1(x), attn_mask=bias, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(attended))
        x = state.merge_in_layer(layer, x, keys)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ALGMVisionTransformer(nn.Module):
    """Mixin for a timm ``VisionTransformer``: resets the state per forward, unmerges on request."""

    _algm_state: ALGMState

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        state = self._algm_state
        state.begin(self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])), x, tuple(self.patch_embed.patch_size))
        try:
            tokens = super().forward_features(x, *args, **kwargs)
        finally:
            state.end()
        final = state.record.final
        if final is None or not (state.unmerge_output or getattr(final, "restore_in_encoder", False)):
            return tokens
        state.record.restored = True
        return state.unmerge(tokens)


_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_subclasses: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    base = module.__class__
    key = (mixin, base)
    if key not in _subclasses:
        _subclasses[key] = type(f"ALGM{base.__name__}", (mixin, base), {"_algm_base": base})
    module.__class__ = _subclasses[key]


def find_vit(model: nn.Module) -> nn.Module:
    """The plain ViT inside ``model``: ``model`` itself, or its ``encoder``."""
    for candidate in (model, getattr(model, "encoder", None)):
        if candidate is not None and hasattr(candidate, "blocks") and hasattr(candidate, "patch_embed"):
            return candidate
    raise TypeError(f"{type(model).__name__} is not a timm plain ViT and has no plain-ViT `encoder`")


def algm_state(model: nn.Module) -> ALGMState | None:
    """The merging state of ``model`` (or of its encoder), None if no merging is applied."""
    try:
        return getattr(find_vit(model), "_algm_state", None)
    except TypeError:
        return None


def apply_merging(
    model: nn.Module,
    stages: Sequence[MergeStage],
    *,
    prop_attn: bool = False,
    batch_min: bool = False,
    policy: SharePolicy | None = None,
    config: ALGMConfig | None = None,
) -> nn.Module:
    """Patch ``model`` (a timm ``VisionTransformer`` or a model with one as ``encoder``) in place to
    run ``stages``; ``policy`` scores the windows of token-sharing stages. Applying again replaces them.
    Returns ``model``."""
    vit = find_vit(model)
    depth = len(vit.blocks)
    for stage in stages:
        if not 1 <= stage.layer <= depth:
            raise ValueError(f"{stage.name}: layer {stage.layer} is outside the ViT's layers 1..{depth}")
    for block in vit.blocks:
        missing = [a for a in _BLOCK_ATTRS if not hasattr(block, a)]
        if missing:
            raise TypeError(f"{type(block).__name__} is not a timm pre-norm Block (missing {missing})")
    unmerge_output = getattr(model, "unmerge_in_encoder", True) if model is not vit else True
    state = ALGMState(
        stages, getattr(vit, "num_prefix_tokens", 1), prop_attn=prop_attn, batch_min=batch_min,
        unmerge_output=unmerge_output, config=config, policy=policy,
    )
    vit._algm_state = state
    if not isinstance(vit, ALGMVisionTransformer):
        _swap_class(vit, ALGMVisionTransformer)
    for i, block in enumerate(vit.blocks):
        if not isinstance(block, ALGMBlock):
            _swap_class(block, ALGMBlock)
        block._algm_state = state
        block._algm_layer = i + 1
    return model


def apply_plan(model: nn.Module, plan: MergePlan, *, policy: SharePolicy | None = None) -> nn.Module:
    """:func:`apply_merging` with the stages and options of ``plan``. Returns ``model``."""
    return apply_merging(model, plan.stages, prop_attn=plan.prop_attn, batch_min=plan.batch_min, policy=policy,
                         config=plan.config)


def remove_algm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_merging` in place (a no-op on an unpatched model)."""
    vit = find_vit(model)
    for module in (vit, *vit.blocks):
        base = getattr(type(module), "_algm_base", None)
        if base is not None:
            module.__class__ = base
        for attr in ("_algm_state", "_algm_layer"):
            module.__dict__.pop(attr, None)
    return model


@contextmanager
def merging_restored(model: nn.Module) -> Iterator[None]:
    """Within the block, merging may be applied, changed or removed freely; on exit ``model`` gets back
    the merging it had on entry (none, if it had none)."""
    saved = algm_state(model)
    try:
        yield
    finally:
        remove_algm(model)
        if saved is not None:
            apply_merging(model, saved.stages, prop_attn=saved.prop_attn, batch_min=saved.batch_min,
                          policy=saved.policy, config=saved.config)


@contextmanager
def merging_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` runs unmerged even if merging is applied; its stages are restored."""
    state = algm_state(model)
    if state is None:
        yield
        return
    stages = state.stages
    state.stages = ()
    try:
        yield
    finally:
        state.stages = stages


@contextmanager
def lengths_forced(model: nn.Module, lengths: Mapping[str, int]) -> Iterator[None]:
    """Within the block, each stage named in ``lengths`` still plans its merge (its work is done, e.g. for
    counting FLOPs) but then leaves exactly that many patch tokens per image (:func:`~algm_viz.merging.forced_length`);
    the record is the merging state's again on exit."""
    state = algm_state(model)
    if state is None:
        raise RuntimeError("no merging is applied to this model")
    unknown = set(lengths) - {stage.name for stage in state.stages}
    if unknown:
        raise ValueError(f"no stages named {sorted(unknown)}")
    saved, record = state.forced_lengths, state.record
    state.forced_lengths = dict(lengths)
    try:
        yield
    finally:
        state.forced_lengths, state.record = saved, record
