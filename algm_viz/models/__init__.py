"""Segmentation models that ALGM runs on."""

from .checkpoint import KNOWN_MODELS, CheckpointError, fetch_checkpoint, load_segmenter, save_segmenter
from .decoders import AttentionToMask, SETRNaive, SETRProgressive
from .segmenter import DECODERS, LinearDecoder, MaskTransformer, Segmenter, create_segmenter, set_pos_embed_interpolation

__all__ = [
    "DECODERS",
    "AttentionToMask",
    "SETRNaive",
    "SETRProgressive",
    "KNOWN_MODELS",
    "CheckpointError",
    "LinearDecoder",
    "MaskTransformer",
    "Segmenter",
    "create_segmenter",
    "fetch_checkpoint",
    "load_segmenter",
    "save_segmenter",
    "set_pos_embed_interpolation",
]
