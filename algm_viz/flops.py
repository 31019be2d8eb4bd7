"""Count the FLOPs of a forward pass, attention included, on any device.

``torch.utils.flop_counter`` counts matrix products (including GPU SDPA kernels) but has no formula
for the CPU flash-attention kernel; we register one. Figures follow the convention of the ALGM and
Segmenter papers (fvcore): one multiply-add = one FLOP, i.e. half of ``FlopCounterMode``'s count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import flop_counter

__all__ = ["count_gflops"]


def _register_cpu_sdpa() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_gflops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOPs (multiply-adds, in 1e9) of ``model(*inputs)``, summed over the batch.

    Runs outside inference mode (under ``no_grad``, on copies of the inputs): in inference mode the counter
    sees composite ops (``linear``, ``dropout``, ``layer_norm``) undecomposed and decomposes each in Python,
    which made a counted forward cost about twice a plain one instead of a quarter more."""
    with torch.inference_mode(False), torch.no_grad():
        inputs = tuple(x.clone() for x in inputs)
        with flop_counter.FlopCounterMode(display=False) as counter:
            model(*inputs)
    return counter.get_total_flops() / 2e9
