"""Read the tokens of chosen encoder layers during a forward, without changing it.

One mechanism for every analysis that looks inside the encoder (calibration, similarity analysis,
attention balance): forward hooks on a timm ``Block``'s norms, removed when the block ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import Tensor, nn

__all__ = ["block_tokens", "MLP_INPUT", "ATTENTION_INPUT"]

#: The tokens entering ``norm2``: after the attention residual and after the layer's own merging
#: (CLAP/GBM run between attention and MLP), ``[B, T, C]`` with the prefix tokens first.
MLP_INPUT = "mlp_input"
#: ``norm1``'s output, the attention's input ``[B, T, C]`` (also where a block calls its attention
#: through another path than ``attn.forward``).
ATTENTION_INPUT = "attention_input"


@contextmanager
def block_tokens(vit: nn.Module, layers: Iterable[int], callback: Callable[[int, Tensor], None],
                 point: str = MLP_INPUT) -> Iterator[None]:
    """Within the block, every forward of ``vit`` calls ``callback(layer, tokens)`` for each 1-based
    ``layer`` in ``layers``, with the tokens at ``point`` (:data:`MLP_INPUT` or :data:`ATTENTION_INPUT`)."""
    if point not in (MLP_INPUT, ATTENTION_INPUT):
        raise ValueError(f"point must be {MLP_INPUT!r} or {ATTENTION_INPUT!r}, got {point!r}")
    handles = []
    try:
        for layer in dict.fromkeys(layers):
            block = vit.blocks[layer - 1]
            if point == MLP_INPUT:
                hook = lambda module, args, layer=layer: callback(layer, args[0])  # noqa: E731
                handles.append(block.norm2.register_forward_pre_hook(hook))
            else:
                hook = lambda module, args, output, layer=layer: callback(layer, output)  # noqa: E731
                handles.append(block.norm1.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
