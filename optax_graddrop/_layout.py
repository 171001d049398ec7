"""How a pytree's leaves are laid out for GradDrop: segments of one stream.

GradDrop is elementwise, so the leaves of a pytree can be computed in any
grouping. Every leaf takes its place in the one stream of uniforms
(``_random``), so the grouping never changes a result. Each group, a
*segment*, is computed by one fused pass:

* a large leaf is a segment on its own, read where it lies (flat, or in its
  own shape when it is or may be sharded: explicitly, or by XLA's
  partitioner when there are several devices);
* small leaves of one compute dtype share a segment: their task gradients are
  copied side by side into one ``[T, n]`` array, each leaf padded to a whole
  number of threefry calls (the padding is zero, so it never conflicts).

A fused pass costs XLA a compilation of its own (about 10-20 ms on a 2-core
CPU), so a model with hundreds of small leaves (biases, norms) would spend
seconds compiling them one by one; copying a small leaf costs less than its
compilation over many steps, while a large leaf is cheaper to compile once
than to copy every step. ``_SMALL_LEAF`` sits between the two (see
``benchmarks/speed.py``, section ``leaves``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_graddrop import _random

# Leaves with fewer elements than this share a segment with other small ones.
_SMALL_LEAF = 2**14


class Segment(NamedTuple):
  """Leaves computed together in one pass.

  Attributes:
    leaves: the indices of the leaves, in order.
    starts: each leaf's first element in the segment's flat axis.
    shape: the shape the segment is computed in: ``(size,)``, or the leaf's
      own shape for a leaf computed in it (see ``sharded``).
    calls: ``(first call, number of calls)`` of each leaf in the stream.
    sharded: whether the (single) leaf is computed in its own shape: it is
      explicitly sharded, or large and of several axes with several devices
      present (it may be sharded by XLA's partitioner).
  """

  leaves: tuple[int, ...]
  starts: tuple[int, ...]
  shape: tuple[int, ...]
  calls: tuple[tuple[int, int], ...]
  sharded: bool

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def sharding_spec(array: Any) -> tuple[Any, ...]:
  """The partition spec ``array``'s type carries (Explicit mesh axes), or ``()``."""
  spec = getattr(getattr(jax.typeof(array), "sharding", None), "spec", None)
  return tuple(spec) if spec is not None else ()


def explicitly_sharded(array: Any) -> bool:
  """Whether ``array``'s type carries a sharding (a mesh with Explicit axes).

  Such arrays keep their shapes: under explicit sharding a reshape that
  merges a sharded dimension needs an output sharding, and GradDrop has no
  reason to pick one.
  """
  return any(axis is not None for axis in sharding_spec(array))


def several_devices() -> bool:
  """Whether arrays may be sharded without their types saying so (Auto mesh
  axes): XLA's partitioner then gathers a sharded array onto every device to
  flatten it or to meet a layout constraint."""
  return jax.device_count() > 1


def plan(
  shapes: Sequence[tuple[int, ...]],
  dtypes: Sequence[Any],
  sharded: Sequence[bool],
  selected: Sequence[bool] | None = None,
) -> tuple[list[Segment], int]:
  """Groups the selected leaves into segments.

  Args:
    shapes: every leaf's shape (without the task axis), in leaf order.
    dtypes: every leaf's compute dtype; small leaves share a segment only
      with leaves of the same one.
    sharded: whether each leaf is explicitly sharded.
    selected: which leaves to place (all by default); the others keep their
      places in the stream but get no segment.

  Returns:
    ``(segments, total_calls)``: the segments, large leaves first in leaf
    order and then one per dtype of small leaves, and the calls of the whole
    stream.
  """
  sizes = [math.prod(shape) for shape in shapes]
  offsets, total_calls = _random.call_offsets(sizes)
  selected = [True] * len(shapes) if selected is None else selected
  segments: list[Segment] = []
  small: dict[Any, list[int]] = {}
  multi_device = several_devices()
  for index, (shape, dtype, size, is_sharded, chosen) in enumerate(
    zip(shapes, dtypes, sizes, sharded, selected)
  ):
    if not chosen:
      continue
    if is_sharded or size >= _SMALL_LEAF:
      calls = ((offsets[index], _random.num_calls(size)),)
      # Flattening a leaf that may be sharded would merge a sharded axis.
      in_own_shape = is_sharded or (multi_device and len(shape) > 1)
      own_shape = tuple(shape) if in_own_shape else (size,)
      segments.append(Segment((index,), (0,), own_shape, calls, in_own_shape))
    else:
      small.setdefault(jnp.dtype(dtype), []).append(index)
  for indices in small.values():
    if len(indices) == 1:
      (index,) = indices
      calls = ((offsets[index], _random.num_calls(sizes[index])),)
      segments.append(Segment((index,), (0,), (sizes[index],), calls, False))
      continue
    starts, calls_of, size = [], [], 0
    for index in indices:
      count = _random.num_calls(sizes[index])
      starts.append(size)
      calls_of.append((offsets[index], count))
      size += _random.HALVES * count
    segments.append(Segment(tuple(indices), tuple(starts), (size,), tuple(calls_of), False))
  return segments, total_calls


def segment_rows(segment: Segment, leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
  """The ``[k, *segment.shape]`` task gradients of a segment.

  Args:
    segment: the segment.
    leaves: every leaf ``[k, ...]`` (``k`` tasks), in leaf order.
    dtype: the compute dtype, for the copies of small leaves.

  Returns:
    A lone leaf reshaped (no copy), or the small leaves copied side by side
    in ``dtype`` with zero padding.
  """
  if len(segment.leaves) == 1:
    leaf = leaves[segment.leaves[0]]
    return leaf if segment.sharded else leaf.reshape(leaf.shape[0], segment.size)
  parts = []
  for index, (_, count) in zip(segment.leaves, segment.calls):
    leaf = leaves[index]
    flat = leaf.reshape(leaf.shape[0], -1).astype(dtype)
    parts.append(flat)
    # Zeros as operands of the concatenation rather than jnp.pad: XLA merges
    # equal blocks of zeros, where each pad would be a pass of its own.
    if padding := _random.HALVES * count - flat.shape[1]:
      parts.append(jnp.zeros((flat.shape[0], padding), dtype))
  return jnp.concatenate(parts, axis=1)


def split(segment: Segment, values: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[Any]:
  """Each leaf's part of a per-segment result, in the leaf's shape.

  Args:
    segment: the segment.
    values: an array of ``segment.shape``.
    shapes: every leaf's shape, in leaf order.

  Returns:
    One array per leaf of the segment, in the segment's order.
  """
  if len(segment.leaves) == 1:
    shape = shapes[segment.leaves[0]]
    return [values if segment.sharded else values.reshape(shape)]
  return [
    values[start : start + math.prod(shapes[index])].reshape(shapes[index])
    for index, start in zip(segment.leaves, segment.starts)
  ]


def bits(key: jax.Array, segments: Sequence[Segment], total_calls: int) -> list[jax.Array]:
  """The uniforms of every segment, shaped like it (see ``_random``)."""
  flat = _random.tree_bits(key, total_calls, [(s.calls, s.size) for s in segments])
  return [b.reshape(s.shape) for b, s in zip(flat, segments)]
