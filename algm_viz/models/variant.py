"""``variant.yml`` read as untrusted input: a bounded safe YAML reader and the checks a network passes
before anything is allocated for it.

* :func:`read_variant` reads at most :data:`MAX_VARIANT_BYTES`, refuses anchors/aliases (YAML bombs),
  deep nesting and every explicit tag but the standard ones and ``!!python/tuple`` (read as a list: the
  official training script writes ``variant.yml`` with ``yaml.dump``, which tags tuples so), and never
  echoes more than :data:`EXCERPT_CHARS` characters of the document in an error.
* :meth:`NetSpec.from_net_kwargs` checks every dimension of ``net_kwargs`` against :class:`ModelLimits`
  and the backbone name against timm's registry (plain names only: no ``hf-hub:``, ``local-dir:``, paths
  or URLs).
* :func:`check_budget` refuses a network whose estimated parameters (:func:`estimate_parameters`) or
  activation memory (:func:`estimate_activation_bytes`) exceed the limits; :func:`check_state_shapes`
  compares the dimensions with a loaded state dict.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import yaml

from .segmenter import DECODERS, NORMALIZATION

__all__ = [
    "CheckpointError",
    "MAX_VARIANT_BYTES",
    "EXCERPT_CHARS",
    "ModelLimits",
    "NetSpec",
    "VariantLoader",
    "read_variant",
    "parse_variant",
    "estimate_parameters",
    "estimate_activation_bytes",
    "check_budget",
    "check_state_shapes",
    "check_backbone",
]

#: Largest ``variant.yml`` accepted (the official ones are about 1 KB; calibration statistics of every
#: layer of a 24-layer model add about 3 KB).
MAX_VARIANT_BYTES = 16 * 1024
#: Deepest nesting of mappings/sequences accepted (the official format nests 3 levels).
MAX_NESTING = 16
#: Most characters of user content an error message repeats.
EXCERPT_CHARS = 60

_CORE = "tag:yaml.org,2002:"
TUPLE_TAG = _CORE + "python/tuple"
_ALLOWED_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null", "seq", "map")} | {TUPLE_TAG}
#: A plain timm registry name, optionally with a pretrained tag: ``vit_base_patch16_384.augreg_in21k``.
_TIMM_NAME = re.compile(r"[a-z0-9_]{1,100}(\.[a-z0-9_]{1,100})?")
#: timm modules whose models are plain ViTs (``VisionTransformer``).
_VIT_MODULES = ("vision_transformer", "deit")
_FLOAT_BYTES = 4


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, too large, or does not fit the network it describes."""


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (user content in error messages)."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class VariantLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader (libyaml's C parser where installed) that reads ``!!python/tuple`` as a list."""


VariantLoader.add_constructor(TUPLE_TAG, lambda loader, node: loader.construct_sequence(node, deep=True))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, without the document's text (``str(error)`` quotes the offending line)."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{where}: {excerpt(getattr(error, 'problem', None) or type(error).__name__)}"


def _check_events(text: str) -> None:
    """Refuse anchors, aliases, unknown tags and deep nesting from the event stream, before any object
    is built (an alias bomb only expands when its nodes are constructed)."""
    depth = 0
    for event in yaml.parse(text, Loader=VariantLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise CheckpointError("variant.yml uses YAML anchors or aliases (& or *), which are not accepted")
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in _ALLOWED_TAGS:
            shown = "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag
            raise CheckpointError(f"variant.yml uses the tag {excerpt(shown)}, which is not accepted "
                                  "(only standard YAML types and !!python/tuple)")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise CheckpointError(f"variant.yml nests deeper than {MAX_NESTING} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def parse_variant(data: bytes | str) -> dict[str, Any]:
    """The mapping in a ``variant.yml`` document (with a ``net_kwargs`` mapping), or :class:`CheckpointError`."""
    if len(data) > MAX_VARIANT_BYTES:
        raise CheckpointError(f"variant.yml is larger than {MAX_VARIANT_BYTES} bytes: not a Segmenter variant")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise CheckpointError("variant.yml is not UTF-8 text") from None
    try:
        _check_events(text)
        variant = yaml.load(text, Loader=VariantLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as error:
        raise CheckpointError(f"variant.yml is not valid YAML{_yaml_problem(error)}") from None
    except CheckpointError:
        raise
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise CheckpointError(f"variant.yml holds a value that cannot be read: {excerpt(str(error))}") from None
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise CheckpointError("variant.yml has no net_kwargs mapping")
    return variant


def read_variant(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`parse_variant` of the file ``path``, reading no more than :data:`MAX_VARIANT_BYTES` + 1 bytes."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_VARIANT_BYTES + 1)
    except OSError as error:
        raise CheckpointError(f"variant.yml could not be read: {error.strerror}") from None
    return parse_variant(data)


@dataclass(frozen=True)
class ModelLimits:
    """Bounds on what a ``variant.yml`` may ask for (inclusive ranges) and the memory budget.

    The defaults admit every official Segmenter (ViT-Ti … ViT-L at 640 px, 150 classes) with room to spare.
    ``max_activation_bytes`` is the estimated peak of one forward pass of one image (float32) at the variant's
    ``image_size``, or at ``run_size`` (H, W) where that is larger: the largest input a server runs any model
    at (the app resizes every image to its own input size, whatever the variant's ``image_size`` says).
    """

    depth: tuple[int, int] = (1, 48)
    width: tuple[int, int] = (8, 2048)
    heads: tuple[int, int] = (1, 64)
    patch: tuple[int, int] = (2, 64)
    image_side: tuple[int, int] = (16, 2048)
    classes: tuple[int, int] = (1, 1024)
    decoder_layers: tuple[int, int] = (1, 12)
    max_mlp_ratio: float = 8.0
    max_parameters: int = 400_000_000
    max_activation_bytes: int = 2 * 2**30
    run_size: tuple[int, int] | None = None


DEFAULT_LIMITS = ModelLimits()


def _refuse(reason: str) -> CheckpointError:
    return CheckpointError(f"variant.yml does not describe a supported Segmenter: {reason}")


def _whole(mapping: Mapping[str, Any], key: str, bounds: tuple[int, int], default: Any = None, label: str | None = None) -> int:
    value = mapping.get(key, default)
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = "nothing" if value is None else excerpt(value)
        raise _refuse(f"{label or key} must be a whole number in {low}..{high}, got {shown}")
    return value


def check_backbone(name: Any) -> str:
    """``name`` if it is a plain timm registry name of a ViT (optionally with a pretrained tag), else
    :class:`CheckpointError`: no ``hf-hub:`` or ``local-dir:`` names, paths or URLs reach timm."""
    import timm
    from timm.models import get_arch_name, is_model_in_modules

    if not isinstance(name, str) or not _TIMM_NAME.fullmatch(name):
        raise CheckpointError(f"backbone must be a plain timm model name (no hf-hub:, local-dir:, paths or URLs), "
                              f"got {excerpt(name)}")
    if not timm.is_model(name) or not is_model_in_modules(get_arch_name(name), _VIT_MODULES):
        raise CheckpointError(f"backbone {excerpt(name)} is not a timm plain ViT")
    return name


@dataclass(frozen=True)
class NetSpec:
    """The network a ``variant.yml`` describes, checked (sizes in pixels, ``image_size`` as (H, W))."""

    backbone: str
    decoder: str
    num_classes: int
    image_size: tuple[int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    d_ff: int
    decoder_layers: int
    normalization: str
    layer_norm_eps: float

    @classmethod
    def from_net_kwargs(cls, net: Mapping[str, Any], limits: ModelLimits = DEFAULT_LIMITS) -> "NetSpec":
        """Check ``net_kwargs`` against ``limits``; :class:`CheckpointError` naming the first bad field."""
        if net.get("distilled"):
            raise _refuse("distilled (DeiT) Segmenter variants are not supported")
        decoder = net.get("decoder", {})
        if not isinstance(decoder, dict):
            raise _refuse(f"decoder must be a mapping, got {excerpt(decoder)}")
        name = decoder.get("name", "mask_transformer")
        if name not in DECODERS:
            raise _refuse(f"decoder name must be one of {', '.join(DECODERS)}, got {excerpt(name)}")
        width = _whole(net, "d_model", limits.width)
        heads = _whole(net, "n_heads", limits.heads)
        if width % heads:
            raise _refuse(f"d_model {width} is not divisible by n_heads {heads}")
        patch = _whole(net, "patch_size", limits.patch)
        size = net.get("image_size")
        sides = list(size) if isinstance(size, (list, tuple)) and len(size) == 2 else [size, size]
        image_size = tuple(_whole({"image_size": side}, "image_size", limits.image_side) for side in sides)
        if min(image_size) < patch:
            raise _refuse(f"image_size {image_size} is smaller than patch_size {patch}")
        d_ff = _whole(net, "d_ff", (1, int(limits.max_mlp_ratio * width)), default=4 * width)
        eps = net.get("layer_norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 0.1:
            raise _refuse(f"layer_norm_eps must be a number in (0, 0.1], got {excerpt(eps)}")
        normalization = net.get("normalization", "vit")
        if normalization not in NORMALIZATION:
            raise _refuse(f"normalization must be one of {', '.join(NORMALIZATION)}, got {excerpt(normalization)}")
        try:
            backbone = check_backbone(net.get("backbone"))
        except CheckpointError as error:
            raise _refuse(str(error)) from None
        return cls(
            backbone=backbone,
            decoder=name,
            num_classes=_whole(net, "n_cls", limits.classes, default=decoder.get("n_cls")),
            image_size=image_size,  # type: ignore[arg-type]
            patch_size=patch,
            embed_dim=width,
            depth=_whole(net, "n_layers", limits.depth),
            num_heads=heads,
            d_ff=d_ff,
            decoder_layers=_whole(decoder, "n_layers", limits.decoder_layers, default=2, label="decoder n_layers"),
            normalization=normalization,
            layer_norm_eps=float(eps),
        )

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and row at ``image_size``."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~algm_viz.models.create_segmenter` (never pretrained)."""
        return {
            "backbone": self.backbone, "decoder": self.decoder, "num_classes": self.num_classes,
            "image_size": self.image_size, "normalization": self.normalization, "decoder_layers": self.decoder_layers,
            "layer_norm_eps": self.layer_norm_eps, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
            "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.d_ff / self.embed_dim,
            "pretrained": False,
        }


def _block_parameters(width: int, d_ff: int) -> int:
    """A pre-norm transformer block: two LayerNorms, qkv + projection, two-layer MLP."""
    return 4 * width + (3 * width * width + 3 * width) + (width * width + width) + (2 * width * d_ff + d_ff + width)


def _decoder_parameters(spec: NetSpec, channels: int = 256) -> int:
    """Parameters of the decoder heads of :mod:`algm_viz.models` (SETR heads with their default 256 channels)."""
    d, k = spec.embed_dim, spec.num_classes
    if spec.decoder == "linear":
        return d * k + k
    if spec.decoder == "mask_transformer":
        return (d * d + d) + spec.decoder_layers * _block_parameters(d, 4 * d) + k * d + 2 * d * d + 2 * d + 2 * k
    if spec.decoder == "atm":
        attention = 4 * d * d + 4 * d
        layer = 2 * attention + (2 * 4 * d * d + 5 * d) + 6 * d
        return (d * d + d) + 2 * d + k * d + spec.decoder_layers * layer + d + 1
    classifier = channels * k + k
    if spec.decoder == "setr_naive":
        return d * channels + 2 * channels + classifier
    return 9 * channels * (d + 3 * channels) + 4 * 2 * channels + classifier  # setr_pup: four 3×3 conv stages


def estimate_parameters(spec: NetSpec) -> int:
    """Parameters of the Segmenter ``spec`` describes (encoder exact, decoder as built here)."""
    d, p = spec.embed_dim, spec.patch_size
    tokens = 1 + spec.grid[0] * spec.grid[1]
    encoder = (3 * p * p * d + d) + d + tokens * d + spec.depth * _block_parameters(d, spec.d_ff) + 2 * d
    return encoder + _decoder_parameters(spec)


def estimate_activation_bytes(spec: NetSpec) -> int:
    """Estimated peak float32 activation memory of one forward pass at ``image_size`` (batch 1): the
    largest of an encoder layer (attention scores, MLP hidden, a few token copies) and the decoder
    (its attention over patches + class tokens, the class masks and the full-resolution logits)."""
    height, width = spec.image_size
    n = 1 + spec.grid[0] * spec.grid[1]
    d, k = spec.embed_dim, spec.num_classes
    encoder = spec.num_heads * n * n + n * spec.d_ff + 6 * n * d
    decoder_tokens = n + k if spec.decoder == "mask_transformer" else k
    heads = max(1, d // 64)
    decoder = heads * decoder_tokens * max(n, decoder_tokens) + 6 * decoder_tokens * d + 2 * n * k
    if spec.decoder.startswith("setr"):
        decoder = 2 * 256 * height * width
    logits = 2 * k * height * width  # upsampled logits and the interpolation's output
    return _FLOAT_BYTES * (3 * height * width + max(encoder, decoder) + logits)


def check_budget(spec: NetSpec, limits: ModelLimits = DEFAULT_LIMITS) -> None:
    """Refuse ``spec`` when its estimated parameters or activation memory (at the larger of its
    ``image_size`` and ``limits.run_size``) exceed ``limits``."""
    run = spec.image_size
    if limits.run_size is not None and limits.run_size[0] * limits.run_size[1] > run[0] * run[1]:
        run = limits.run_size
    parameters, activations = estimate_parameters(spec), estimate_activation_bytes(replace(spec, image_size=run))
    if parameters > limits.max_parameters or activations > limits.max_activation_bytes:
        height, width = run
        raise CheckpointError(
            f"variant.yml describes a network too large for this server: about {parameters / 1e6:,.0f} M "
            f"parameters (limit {limits.max_parameters / 1e6:,.0f} M) and {activations / 2**30:,.2f} GiB of "
            f"activations at {height}×{width} (limit {limits.max_activation_bytes / 2**30:,.2f} GiB)")


def _expected_shapes(spec: NetSpec) -> dict[str, tuple[int, ...]]:
    """State-dict entries whose shapes follow from the variant's dimensions (official names)."""
    d, k, p = spec.embed_dim, spec.num_classes, spec.patch_size
    shapes = {
        "encoder.patch_embed.proj.weight": (d, 3, p, p),
        "encoder.pos_embed": (1, 1 + spec.grid[0] * spec.grid[1], d),
        "encoder.cls_token": (1, 1, d),
    }
    for i in range(spec.depth):
        shapes[f"encoder.blocks.{i}.attn.qkv.weight"] = (3 * d, d)
        shapes[f"encoder.blocks.{i}.mlp.fc1.weight"] = (spec.d_ff, d)
    if spec.decoder == "linear":
        shapes["decoder.head.weight"] = (k, d)
    elif spec.decoder == "mask_transformer":
        shapes["decoder.cls_emb"] = (1, k, d)
        for i in range(spec.decoder_layers):
            shapes[f"decoder.blocks.{i}.attn.qkv.weight"] = (3 * d, d)
    return shapes


def _blocks(state: Mapping[str, Any], prefix: str) -> int:
    """How many ``<prefix>.<i>.`` blocks the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return 1 + max((int(m.group(1)) for key in state if (m := pattern.match(key))), default=-1)


def check_state_shapes(spec: NetSpec, state: Mapping[str, Any]) -> None:
    """Refuse a state dict whose tensors do not have the shapes ``spec`` implies (before building)."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint.pth holds a non-tensor entry {excerpt(key)}: not a state dict")
    layers = _blocks(state, "encoder.blocks")
    if layers != spec.depth:
        raise CheckpointError(f"checkpoint.pth does not fit variant.yml: {layers} encoder blocks, n_layers is {spec.depth}")
    if spec.decoder == "mask_transformer" and (found := _blocks(state, "decoder.blocks")) != spec.decoder_layers:
        raise CheckpointError(f"checkpoint.pth does not fit variant.yml: {found} decoder blocks, "
                              f"decoder n_layers is {spec.decoder_layers}")
    for key, shape in _expected_shapes(spec).items():
        if key not in state:
            raise CheckpointError(f"checkpoint.pth does not fit variant.yml: {key} is missing")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"checkpoint.pth does not fit variant.yml: {key} has shape "
                                  f"{tuple(state[key].shape)}, variant.yml implies {shape}")
