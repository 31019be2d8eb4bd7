"""Count the FLOPs of a forward pass, attention included, on any device, and get them for every forward of a
merging model without counting each one.

``torch.utils.flop_counter`` counts matrix products (including GPU SDPA kernels) but has no formula
for the CPU flash-attention kernel; we register one. Figures follow the convention of the ALGM and
Segmenter papers (fvcore): one multiply-add = one FLOP, i.e. half of ``FlopCounterMode``'s count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import flop_counter

from .patch import algm_state, lengths_forced

__all__ = ["count_flops", "count_gflops", "stage_lengths", "TokenCountFlops"]


def _register_cpu_sdpa() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """``FlopCounterMode``'s count of ``model(*inputs)`` (2 per multiply-add), summed over the batch.

    Runs outside inference mode (under ``no_grad``, on copies of the inputs): in inference mode the counter
    sees composite ops (``linear``, ``dropout``, ``layer_norm``) undecomposed and decomposes each in Python,
    which made a counted forward cost about twice a plain one instead of a quarter more."""
    with torch.inference_mode(False), torch.no_grad():
        inputs = tuple(x.clone() for x in inputs)
        with flop_counter.FlopCounterMode(display=False) as counter:
            model(*inputs)
    return int(counter.get_total_flops())


def count_gflops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOPs (multiply-adds, in 1e9) of ``model(*inputs)``, summed over the batch (:func:`count_flops`)."""
    return count_flops(model, *inputs) / 2e9


#: ``((stage name, padded output length), ...)``: what the merges of one forward left, in order.
Lengths = tuple[tuple[str, int], ...]


def stage_lengths(model: nn.Module) -> Lengths:
    """The padded output length (patch tokens) of every token-reducing stage, then every key/value stage, of
    ``model``'s last forward; ``()`` without merging."""
    state = algm_state(model)
    record = state.record if state is not None else None
    if record is None:
        return ()
    return tuple((name, int(merge.num_out)) for name, _, merge in [*record.stages, *record.kv_stages])


# Offsets from the base lengths at which a law of one or two stages is measured: enough points for its features.
_DESIGN = {
    1: [(0,), (-1,), (-2,), (-3,)],
    2: [(0, 0), (-1, 0), (-2, 0), (-3, 0), (0, -1), (0, -2), (0, -3), (-1, -1)],
}


def _features(lengths: tuple[int, ...], base: tuple[int, ...]) -> np.ndarray:
    """``1, u_s, u_s², t_s mod 2`` per stage and ``u_1·u_2`` (``u = t - base``), float64."""
    offsets = [t - b for t, b in zip(lengths, base)]
    row = [1.0]
    for t, u in zip(lengths, offsets):
        row += [u, u * u, t % 2]
    if len(offsets) == 2:
        row.append(offsets[0] * offsets[1])
    return np.array(row, dtype=np.float64)


@dataclass
class _ShapeFlops:
    """What is known of the FLOPs of one input shape (batch included): counts per length vector, a fitted law."""

    counts: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    law: Callable[[tuple[int, ...]], int] | None = None
    fitted: bool = False  # a law was tried (kept or not)
    inexact: bool = False  # equal lengths gave different counts: count every forward

    def known(self, lengths: tuple[int, ...]) -> int | None:
        if self.inexact:
            return None
        seen = self.counts.get(lengths, [])
        if len(seen) >= 2:
            return seen[0]
        return self.law(lengths) if self.law is not None else None

    def add(self, lengths: tuple[int, ...], flops: int) -> None:
        seen = self.counts.setdefault(lengths, [])
        seen.append(flops)
        if len(set(seen)) > 1:
            self.inexact, self.law = True, None

    def observations(self) -> int:
        return sum(len(seen) for seen in self.counts.values())


class TokenCountFlops:
    """The FLOPs of each forward of ``model``, as :func:`count_flops` counts them, from its input shape and the
    lengths its merge stages left, counting only a few forwards per input shape.

    The counter counts matrix products, whose sizes depend on the data only through the padded length ``t_s``
    each stage leaves (attention and MLP of the blocks after it, the next stage's matching, a decoder on merged
    tokens). For one input shape, the count is therefore a function of the lengths. For the first ``verify``
    forwards of a shape it is counted; a length vector counted twice with the same result is known from then
    on (the baseline, every fixed-count method). For one or two stages (ALGM's CLAP and GBM) the function is
    then measured exactly on a blank image with the lengths forced (:func:`~algm_viz.patch.lengths_forced`,
    8 or 4 counted forwards) as the polynomial ``Σ_s (a_s t_s + b_s t_s² + c_s (t_s mod 2)) + d t_1 t_2 + e``
    (quadratic attention; a bipartite split of an odd length is uneven), and kept only if it reproduces every
    forward counted so far. Where a check fails, every forward of that shape is counted.

    Call it right after ``model(images)``; it leaves the model's merge record as that forward left it.
    """

    def __init__(self, model: nn.Module, verify: int = 4) -> None:
        if verify < 1:
            raise ValueError(f"verify must be >= 1, got {verify}")
        self.model, self.verify = model, verify
        self.counted = 0  # forwards counted so far, measurements of a law included
        self._shapes: dict[tuple[int, ...], _ShapeFlops] = {}

    def __call__(self, images: Tensor) -> int:
        """FLOPs (2 per multiply-add, summed over the batch) of the forward ``model(images)`` just run."""
        named = stage_lengths(self.model)
        lengths = tuple(length for _, length in named)
        shape = self._shapes.setdefault(tuple(images.shape), _ShapeFlops())
        flops = shape.known(lengths)
        if flops is not None:
            return flops
        flops = self._count(images)
        shape.add(lengths, flops)
        if not (shape.inexact or shape.fitted) and shape.observations() >= self.verify and self._has_law(named):
            shape.fitted = True
            law = self._measure_law(images, named)
            if law is not None and all(law(seen) == f for seen, fs in shape.counts.items() for f in fs):
                shape.law = law
        return flops

    def _has_law(self, named: Lengths) -> bool:
        state = algm_state(self.model)
        return state is not None and state.record is not None and not state.record.kv_stages and len(named) in _DESIGN

    def _count(self, images: Tensor, lengths: Mapping[str, int] | None = None) -> int:
        with self._record_kept():
            self.counted += 1
            if lengths is None:
                return count_flops(self.model, images)
            with lengths_forced(self.model, lengths):
                return count_flops(self.model, images)

    @contextmanager
    def _record_kept(self) -> Iterator[None]:
        state = algm_state(self.model)
        record = state.record if state is not None else None
        try:
            yield
        finally:
            if state is not None:
                state.record = record

    def _measure_law(self, images: Tensor, named: Lengths) -> Callable[[tuple[int, ...]], int] | None:
        """The polynomial of the class docstring, measured around the lengths ``named``; None where the lengths
        leave too few tokens to force the design's points."""
        names = [name for name, _ in named]
        base = [length for _, length in named]
        if len(base) == 2:
            base[1] = min(base[1], base[0] - 3)  # the second stage merges the first one's outputs
        if min(base) < 4:
            return None
        base_lengths = tuple(base)
        points = [tuple(b + u for b, u in zip(base_lengths, offsets)) for offsets in _DESIGN[len(base)]]
        blank = torch.zeros_like(images)
        try:
            measured = [self._count(blank, dict(zip(names, point))) for point in points]
        except ValueError:  # a forced length exceeded the tokens a stage got
            return None
        matrix = np.stack([_features(point, base_lengths) for point in points])
        coefficients = np.linalg.solve(matrix, np.array(measured, dtype=np.float64))
        return lambda lengths: int(round(float(_features(lengths, base_lengths) @ coefficients)))
