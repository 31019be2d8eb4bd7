"""Segmenter (Strudel et al., ICCV 2021): a timm plain-ViT encoder and a linear or mask-transformer decoder
(or a SETR / SegViT-ATM decoder from :mod:`algm_viz.models.decoders`).

Parameter names follow the official Segmenter code, so its checkpoints load without renaming
(see :mod:`algm_viz.models.checkpoint`). With ALGM applied, unmerging happens where the paper puts it:
before a linear or SETR decoder, after the mask transformer and ATM (which run on the merged tokens).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _compat  # noqa: F401  (before timm)
import timm
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from ..patch import algm_state, merging_restored, remove_algm
from ..timing import engine_range
from .decoders import AttentionToMask, SETRNaive, SETRProgressive
from .description import ModelInfo

__all__ = [
    "Segmenter", "MaskTransformer", "LinearDecoder", "OfficialPosEmbedViT", "create_segmenter",
    "set_pos_embed_interpolation", "NORMALIZATION", "DECODERS", "POS_EMBED_INTERPOLATIONS",
]

#: Decoder names accepted by :func:`create_segmenter`.
DECODERS = ("linear", "mask_transformer", "setr_naive", "setr_pup", "atm")

#: How a position embedding laid out for one patch grid is resized to another: ``"bicubic"`` (timm's,
#: antialiased; the default) or ``"bilinear"`` (the official Segmenter code's, no antialiasing).
POS_EMBED_INTERPOLATIONS = ("bicubic", "bilinear")

NORMALIZATION = {
    "vit": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "deit": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}


class OfficialPosEmbedViT(VisionTransformer):
    """timm's ``VisionTransformer`` (with ``dynamic_img_size``) resizing its position embedding as the
    official Segmenter code does: bilinear, ``align_corners=False``, no antialiasing (timm: bicubic,
    antialiased). The same weights, the same forward otherwise."""

    def _pos_embed(self, x: Tensor) -> Tensor:
        """``[B, h, w, C]`` patch embeddings -> ``[B, prefix + h*w, C]`` with prefix tokens and positions."""
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        batch, height, width, channels = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=(height, width), old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            interpolation="bilinear", antialias=False,
        )
        x = x.reshape(batch, -1, channels)
        prefix = [token.expand(batch, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        x = torch.cat([*prefix, x + pos_embed], dim=1) if self.no_embed_class else torch.cat([*prefix, x], dim=1) + pos_embed
        return self.pos_drop(x)


class LinearDecoder(nn.Module):
    """Per-patch linear classifier. Runs on unmerged tokens."""

    unmerge_before = True

    def __init__(self, num_classes: int, d_encoder: int) -> None:
        super().__init__()
        self.head = nn.Linear(d_encoder, num_classes)

    def forward(
        self, tokens: Tensor, key_bias: Optional[Tensor] = None, *, grid: Optional[tuple[int, int]] = None
    ) -> Tensor:
        """``[B, T, C]`` -> ``[B, T, num_classes]`` (``key_bias`` and ``grid`` unused)."""
        return self.head(tokens)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: class embeddings attend jointly with the patch tokens, and the
    masks are scalar products of normalised patch and class embeddings. Runs on merged tokens."""

    unmerge_before = False

    def __init__(
        self,
        num_classes: int,
        d_encoder: int,
        n_layers: int = 2,
        n_heads: Optional[int] = None,
        d_model: Optional[int] = None,
        d_ff: Optional[int] = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        d_model = d_model or d_encoder
        n_heads = n_heads or max(1, d_model // 64)
        d_ff = d_ff or 4 * d_model
        self.num_classes = num_classes
        self.scale = d_model**-0.5
        self.proj_dec = nn.Linear(d_encoder, d_model)
        rates = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio=d_ff / d_model, qkv_bias=True, proj_drop=dropout,
                  drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates
        )
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, d_model) * 0.02)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(
        self, tokens: Tensor, key_bias: Optional[Tensor] = None, *, grid: Optional[tuple[int, int]] = None
    ) -> Tensor:
        """``[B, T, C]`` tokens (``key_bias`` ``[B, 1, 1, T]`` for merged/padded ones; ``grid`` unused)
        -> ``[B, T, K]``."""
        x = self.proj_dec(tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        if key_bias is not None:
            key_bias = F.pad(key_bias, (0, self.num_classes))
        for block in self.blocks:
            x = block(x, attn_mask=key_bias)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, : -self.num_classes] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, -self.num_classes :] @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class Segmenter(nn.Module):
    """``model(images)``: ``[B, 3, H, W]`` normalised images -> ``[B, num_classes, H, W]`` logits.

    Images of any size are zero-padded to a multiple of the patch size and the logits cropped back.
    ``info`` (:class:`~.description.ModelInfo`) describes it: class names, colours, input size, calibrated τ.
    """

    unmerge_in_encoder = False  # ALGM: this model unmerges itself, around its decoder

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int, normalization: str = "vit") -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.normalization = normalization
        self.info = ModelInfo.untrained(num_classes)  # loaders replace it with what they know

    @property
    def pos_embed_interpolation(self) -> str:
        """``"bilinear"`` (the official Segmenter code's resize) or ``"bicubic"`` (timm's); see
        :func:`set_pos_embed_interpolation`."""
        return "bilinear" if isinstance(self.encoder, OfficialPosEmbedViT) else "bicubic"

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        stats = NORMALIZATION[self.normalization]
        return stats["mean"], stats["std"]

    def decoder_logits(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, K, h, w]`` logits at the decoder's resolution, before upsampling (the
        patch grid of the zero-padded image for token decoders; a dense decoder's own resolution).

        The decoder is called as ``decoder(tokens, key_bias, grid=(h, w))`` and returns per-token scores
        ``[B, T, K]`` or, only if it has ``unmerge_before = True``, a dense map ``[B, K, h', w']``.
        """
        height, width = images.shape[-2:]
        p = self.patch_size
        padded = F.pad(images, (0, -width % p, 0, -height % p))
        grid = (padded.shape[-2] // p, padded.shape[-1] // p)
        tokens = self.encoder.forward_features(padded)[:, self.encoder.num_prefix_tokens :]
        state = algm_state(self.encoder)
        restored = state is None or state.record is None or state.record.restored  # by the encoder already
        final = None if restored else state.record.final
        key_bias = None
        if final is not None and self.decoder.unmerge_before:
            tokens, final = final.unmerge(tokens), None
        elif final is not None:
            key_bias = state.attn_bias[..., self.encoder.num_prefix_tokens :] if state.attn_bias is not None else None
        scores = self.decoder(tokens, key_bias, grid=grid)  # [B, T, K] or [B, K, h, w]
        if scores.dim() == 4:
            if not self.decoder.unmerge_before:
                raise RuntimeError("a decoder that runs on merged tokens must return [B, T, K] scores, not a map")
            return scores
        if final is not None:
            with engine_range("unmerge"):
                scores = final.unmerge(scores)
        # Contiguous NCHW: bilinear upsampling of the channels-last view is ~3x slower on CPU.
        return scores.transpose(1, 2).reshape(scores.shape[0], self.num_classes, *grid).contiguous()

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, K, H, W]``: :meth:`decoder_logits` upsampled bilinearly to the
        padded image and cropped back."""
        height, width = images.shape[-2:]
        p = self.patch_size
        masks = self.decoder_logits(images)
        padded_size = (height + (-height % p), width + (-width % p))
        if masks.shape[-2:] != padded_size:
            masks = F.interpolate(masks, size=padded_size, mode="bilinear", align_corners=False)
        return masks[..., :height, :width]


def create_segmenter(
    backbone: str = "vit_tiny_patch16_384",
    decoder: str = "mask_transformer",
    num_classes: int = 150,
    *,
    image_size: int | tuple[int, int] = 512,
    normalization: str = "vit",
    decoder_layers: int = 2,
    drop_path_rate: float = 0.0,
    dropout: float = 0.0,
    layer_norm_eps: Optional[float] = None,
    pretrained: bool = False,
    pos_embed_interpolation: str = "bicubic",
    **encoder_kwargs,
) -> Segmenter:
    """Build a Segmenter on the timm plain ViT ``backbone``.

    Args:
        decoder: one of :data:`DECODERS`: ``"linear"``, ``"mask_transformer"``, ``"setr_naive"``,
            ``"setr_pup"`` (SETR's naive / progressive-upsampling heads, see :mod:`.decoders`) or ``"atm"``
            (SegViT's attention-to-mask decoder).
        decoder_layers: layers of the mask transformer or ATM decoder; the linear and SETR decoders ignore it.
        dropout: dropout rate of the decoder (all but the linear one).
        image_size: the size the position embedding is laid out for; other sizes are interpolated.
        normalization: ``"vit"`` (mean = std = 0.5) or ``"deit"`` (ImageNet statistics).
        layer_norm_eps: LayerNorm epsilon of the encoder (the official Segmenter uses 1e-5; timm 1e-6).
        pos_embed_interpolation: one of :data:`POS_EMBED_INTERPOLATIONS` (see :func:`set_pos_embed_interpolation`).
        encoder_kwargs: passed to ``timm.create_model`` (e.g. ``depth``, ``embed_dim``, ``num_heads``).
    """
    if normalization not in NORMALIZATION:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATION)}, got {normalization!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}; got {decoder!r}")
    if layer_norm_eps is not None:
        encoder_kwargs["norm_layer"] = partial(nn.LayerNorm, eps=layer_norm_eps)
    encoder = timm.create_model(
        backbone,
        pretrained=pretrained,
        num_classes=0,
        img_size=image_size,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **encoder_kwargs,
    )
    if getattr(encoder, "num_prefix_tokens", None) is None or not hasattr(encoder, "blocks"):
        raise ValueError(f"{backbone} is not a plain ViT")
    d_encoder = encoder.embed_dim
    if decoder == "linear":
        head: nn.Module = LinearDecoder(num_classes, d_encoder)
    elif decoder == "mask_transformer":
        head = MaskTransformer(num_classes, d_encoder, n_layers=decoder_layers, dropout=dropout)
    elif decoder == "setr_naive":
        head = SETRNaive(num_classes, d_encoder, dropout=dropout)
    elif decoder == "setr_pup":
        patch_size = int(encoder.patch_embed.patch_size[0])
        head = SETRProgressive(num_classes, d_encoder, patch_size=patch_size, dropout=dropout)
    else:  # "atm"
        head = AttentionToMask(num_classes, d_encoder, n_layers=decoder_layers, dropout=dropout)
    model = Segmenter(encoder, head, num_classes, normalization)
    return set_pos_embed_interpolation(model, pos_embed_interpolation)


def set_pos_embed_interpolation(model: Segmenter, interpolation: str) -> Segmenter:
    """Resize ``model``'s position embedding to other input sizes with ``interpolation`` (in place).

    ``"bilinear"`` is the official Segmenter (and ALGM) code's resize: use it to reproduce the official
    code's logits with an official checkpoint at another size than it was trained for (the logits can
    differ by ~0.1 between the two). ``"bicubic"`` is timm's (antialiased), the default and what the
    bundled model was trained with. At the size the embedding is laid out for, both are the identity.
    Token merging applied to ``model`` stays applied. Returns ``model``.
    """
    if interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {', '.join(POS_EMBED_INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    with merging_restored(model):
        remove_algm(model)
        if type(model.encoder) not in (VisionTransformer, OfficialPosEmbedViT):
            if interpolation == "bicubic":
                return model
            raise ValueError(f"the bilinear resize needs a timm VisionTransformer, not {type(model.encoder).__name__}")
        model.encoder.__class__ = OfficialPosEmbedViT if interpolation == "bilinear" else VisionTransformer
    return model
