"""Model surgery: put ALGM into a timm plain ViT (or a model that holds one) and take it out again.

``apply_algm`` swaps the ``__class__`` of the ViT and of its blocks for subclasses that share one
:class:`ALGMState`. CLAP runs in block ``local_layer`` and GBM in block ``global_layer`` (1-based, as in
the paper), between attention and MLP, on the tokens after the attention residual. Prefix tokens
(class/register tokens) are never merged. After a forward, ``state.record`` says what was merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor, nn

from .merging import Merge, global_merge, local_merge

__all__ = ["ALGMConfig", "ALGMState", "MergeRecord", "apply_algm", "remove_algm", "algm_state", "find_vit"]

# τ defaults of the authors' code (CLAP with 2×2 windows), keyed by ViT width: Ti, S, B, L.
AUTHOR_DEFAULT_THRESHOLDS = {192: 0.90, 384: 0.88, 768: 0.94, 1024: 0.95}


@dataclass(frozen=True)
class ALGMConfig:
    """Where and how ALGM merges. A layer of None switches that stage off."""

    local_layer: Optional[int] = 1
    global_layer: Optional[int] = 5
    window: tuple[int, int] = (2, 2)
    local_threshold: float = 0.9
    global_threshold: float = 0.9
    prop_attn: bool = False
    batch_min: bool = False

    def __post_init__(self) -> None:
        for key in ("local_threshold", "global_threshold"):
            value = float(getattr(self, key))
            if math.isnan(value):
                raise ValueError(f"{key} is NaN; use a number (τ >= 1 merges nothing)")
            object.__setattr__(self, key, value)
        window = (self.window, self.window) if isinstance(self.window, int) else tuple(int(w) for w in self.window)
        if len(window) != 2 or min(window) <= 0:
            raise ValueError(f"window must be two positive ints, got {self.window}")
        object.__setattr__(self, "window", window)


@dataclass
class MergeRecord:
    """What one forward merged, per image, for visualization and statistics.

    Attributes:
        grid: ``(H, W)`` patch grid.
        stages: ``(name, layer, merge)`` in order; ``"local"`` merges act on the ``H*W`` patches,
            later ones on the previous stage's outputs.
    """

    grid: tuple[int, int]
    stages: list[tuple[str, int, Merge]] = field(default_factory=list)

    def stage(self, name: str) -> Merge | None:
        return next((m for n, _, m in self.stages if n == name), None)

    @property
    def final(self) -> Merge | None:
        """Patches -> final tokens, all stages composed (None when nothing ran)."""
        total = None
        for _, _, merge in self.stages:
            total = merge if total is None else total.then(merge)
        return total

    def token_counts(self) -> dict[str, Tensor]:
        """``{"patches": [B], "<stage>": [B], ...}`` real tokens per image after each stage."""
        batch = self.stages[0][2].counts.shape[0] if self.stages else 0
        counts = {"patches": torch.full((batch,), self.grid[0] * self.grid[1], dtype=torch.long)}
        counts.update({name: merge.counts.cpu() for name, _, merge in self.stages})
        return counts


class ALGMState:
    """Shared by a patched ViT and its blocks: the config and the running token bookkeeping."""

    def __init__(self, config: ALGMConfig, num_prefix_tokens: int, unmerge_output: bool = True) -> None:
        self.config = config
        self.num_prefix_tokens = num_prefix_tokens
        self.unmerge_output = unmerge_output
        self.record: MergeRecord | None = None
        self.size: Tensor | None = None  # [B, T, 1] patches per token (prefix included), None = all 1
        self.attn_bias: Tensor | None = None  # [B, 1, 1, T] additive attention bias, None = no bias

    def begin(self, grid: tuple[int, int]) -> None:
        self.record = MergeRecord(grid=(int(grid[0]), int(grid[1])))
        self.size = None
        self.attn_bias = None

    def merge_in_layer(self, layer: int, x: Tensor) -> Tensor:
        """Apply the merges configured for 1-based ``layer`` to ``x`` ``[B, T, C]``."""
        cfg = self.config
        for name, stage_layer in (("local", cfg.local_layer), ("global", cfg.global_layer)):
            if stage_layer == layer:
                x = self._merge(name, layer, x)
        return x

    def _merge(self, name: str, layer: int, x: Tensor) -> Tensor:
        cfg, prefix = self.config, self.num_prefix_tokens
        patches = x[:, prefix:]
        patch_size = None if self.size is None else self.size[:, prefix:]
        with torch.profiler.record_function(f"algm.{name}_merge"):
            if name == "local":
                if self.record.stages:
                    raise RuntimeError("CLAP needs the full patch grid: put local_layer before global_layer")
                merge = local_merge(patches, self.record.grid, cfg.window, cfg.local_threshold, batch_min=cfg.batch_min)
            else:
                merge = global_merge(patches, cfg.global_threshold, patch_size, batch_min=cfg.batch_min)
            patches, patch_size = merge.merge(patches, patch_size)
            x = torch.cat([x[:, :prefix], patches], dim=1)
            ones = patch_size.new_ones(x.shape[0], prefix, 1)
            self.size = torch.cat([ones, patch_size], dim=1)
            self.attn_bias = self.key_bias(self.size, x.dtype)
        self.record.stages.append((name, layer, merge))
        return x

    def key_bias(self, size: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """``[B, 1, 1, T]`` additive key bias: ``log(size)`` if ``prop_attn``, ``-inf`` on padding."""
        if size is None:
            return None
        size = size[..., 0]
        padded = size <= 0
        has_padding = bool(padded.any())
        if not (self.config.prop_attn or has_padding):
            return None
        bias = size.clamp_min(1).log() if self.config.prop_attn else torch.zeros_like(size)
        if has_padding:
            bias = bias.masked_fill(padded, float("-inf"))
        return bias.to(dtype)[:, None, None, :]

    def unmerge(self, tokens: Tensor) -> Tensor:
        """``[B, prefix + N', C]`` -> ``[B, prefix + H*W, C]``."""
        final = self.record.final if self.record is not None else None
        if final is None:
            return tokens
        prefix = self.num_prefix_tokens
        with torch.profiler.record_function("algm.unmerge"):
            return torch.cat([tokens[:, :prefix], final.unmerge(tokens[:, prefix:])], dim=1)


class ALGMBlock(nn.Module):
    """Mixin for a timm ``Block``: attention, ALGM merging, MLP."""

    _algm_state: ALGMState
    _algm_layer: int

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        state = self._algm_state
        bias = state.attn_bias
        if attn_mask is not None:
            bias = attn_mask if bias is None else bias + attn_mask
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias, is_causal=is_causal)))
        x = state.merge_in_layer(self._algm_layer, x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ALGMVisionTransformer(nn.Module):
    """Mixin for a timm ``VisionTransformer``: resets the state per forward, unmerges on request."""

    _algm_state: ALGMState

    def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._algm_state.begin(self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        tokens = super().forward_features(x, *args, **kwargs)
        return self._algm_state.unmerge(tokens) if self._algm_state.unmerge_output else tokens


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
    """The ALGM state of ``model`` (or of its encoder), None if ALGM is not applied."""
    try:
        return getattr(find_vit(model), "_algm_state", None)
    except TypeError:
        return None


def apply_algm(
    model: nn.Module,
    local_layer: Optional[int] = 1,
    global_layer: Optional[int] = 5,
    window: tuple[int, int] | int = (2, 2),
    local_threshold: Optional[float] = None,
    global_threshold: Optional[float] = None,
    *,
    prop_attn: bool = False,
    batch_min: bool = False,
) -> nn.Module:
    """Patch ``model`` (a timm ``VisionTransformer`` or a model with one as ``encoder``) in place.

    Thresholds left as None take the model's calibrated values (``model.algm_thresholds``, a dict with
    ``"local"``/``"global"``) where it has them, else the authors' defaults for the ViT's width.
    Applying again replaces the configuration. Returns ``model``.
    """
    vit = find_vit(model)
    depth = len(vit.blocks)
    for name, layer in (("local_layer", local_layer), ("global_layer", global_layer)):
        if layer is not None and not 1 <= layer <= depth:
            raise ValueError(f"{name}={layer} is outside the ViT's layers 1..{depth}")
    if local_layer is not None and global_layer is not None and global_layer < local_layer:
        raise ValueError("global_layer must not come before local_layer (CLAP needs the full grid)")
    for block in vit.blocks:
        missing = [a for a in _BLOCK_ATTRS if not hasattr(block, a)]
        if missing:
            raise TypeError(f"{type(block).__name__} is not a timm pre-norm Block (missing {missing})")
    calibrated = getattr(model, "algm_thresholds", None) or {}
    fallback = AUTHOR_DEFAULT_THRESHOLDS.get(vit.embed_dim, 0.9) if hasattr(vit, "embed_dim") else 0.9
    config = ALGMConfig(
        local_layer=local_layer,
        global_layer=global_layer,
        window=window,
        local_threshold=local_threshold if local_threshold is not None else calibrated.get("local", fallback),
        global_threshold=global_threshold if global_threshold is not None else calibrated.get("global", fallback),
        prop_attn=prop_attn,
        batch_min=batch_min,
    )
    unmerge_output = getattr(model, "unmerge_in_encoder", True) if model is not vit else True
    state = ALGMState(config, getattr(vit, "num_prefix_tokens", 1), unmerge_output=unmerge_output)
    vit._algm_state = state
    if not isinstance(vit, ALGMVisionTransformer):
        _swap_class(vit, ALGMVisionTransformer)
    for i, block in enumerate(vit.blocks):
        if not isinstance(block, ALGMBlock):
            _swap_class(block, ALGMBlock)
        block._algm_state = state
        block._algm_layer = i + 1
    return model


def set_thresholds(model: nn.Module, local_threshold: float | None = None, global_threshold: float | None = None) -> None:
    """Change τ of a patched model without re-patching (None keeps a value)."""
    state = algm_state(model)
    if state is None:
        raise RuntimeError("ALGM is not applied to this model")
    changes = {"local_threshold": local_threshold, "global_threshold": global_threshold}
    changes = {key: value for key, value in changes.items() if value is not None}
    state.config = replace(state.config, **changes)


def remove_algm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_algm` in place (a no-op on an unpatched model). Returns ``model``."""
    vit = find_vit(model)
    for module in (vit, *vit.blocks):
        base = getattr(type(module), "_algm_base", None)
        if base is not None:
            module.__class__ = base
        for attr in ("_algm_state", "_algm_layer"):
            module.__dict__.pop(attr, None)
    return model
