"""Per-element 16-bit uniforms, derived from one key per pytree leaf.

GradDrop compares one uniform U per element with a keep probability. Random
bits dominate its cost, so each uniform is a 16-bit integer ``b`` with
``U = b / 2**16``: one threefry call yields four of them, where
``jax.random.uniform`` spends one call per element. The keep decision
``U < f`` then holds with probability ``ceil(2**16 f) / 2**16``, which is
within ``2**-16`` of ``f`` and exact at ``f = 0`` and ``f = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

BITS = 16
SCALE = float(2**BITS)
_LOW = jnp.uint32(2**BITS - 1)


def leaf_keys(key: jax.Array, num_leaves: int) -> list[jax.Array]:
  """One independent key per leaf: ``fold_in(key, leaf_index)``."""
  return [jax.random.fold_in(key, i) for i in range(num_leaves)]


def _threefry_words(key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  # Both 32-bit outputs of each threefry call (jax.random.bits XORs them into
  # one word), on jax.random's partitionable counter layout, so the stream
  # does not depend on how the array is sharded.
  k1, k2 = jax.random.key_data(key)
  high = jnp.zeros((count,), jnp.uint32)
  low = jax.lax.iota(jnp.uint32, count)
  first, second = threefry2x32_p.bind(k1, k2, high, low)
  return first, second


def uniform_bits(key: jax.Array, shape: Sequence[int], *, materialize: bool = False) -> jax.Array:
  """Uniform integers in ``[0, 2**16)``, one per element of ``shape``.

  With a threefry key and a size divisible by 4, four elements share one
  threefry call (its two 32-bit words, halved). By default flat element
  ``r m + c`` (``m`` = size / 4, ``r < 4``) takes half ``r`` of call ``c``,
  picked with selects, which XLA fuses into the consumer's loop. A consumer
  that broadcasts the bits (activation-level GradDrop, over the batch) would
  then recompute threefry per broadcast element; ``materialize=True``
  concatenates the four halves instead (flat element ``r m + c`` takes half
  ``r`` of call ``c`` too, so the values are the same), which XLA computes
  once. (Conversely, a concatenation fused into a large elementwise loop made
  that loop several times slower.) Other sizes take one threefry call per
  element, and other key implementations (e.g. ``"rbg"``)
  ``jax.random.bits``.

  Args:
    key: a typed PRNG key of shape ``()``.
    shape: the shape of the result.
    materialize: build the bits so that XLA computes them once even when
      the consumer broadcasts them.

  Returns:
    A ``uint32`` array of ``shape`` with i.i.d. values uniform on
    ``{0, ..., 2**16 - 1}``.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  if jax.random.key_impl(key) != "threefry2x32":
    return jax.random.bits(key, shape, jnp.uint16).astype(jnp.uint32)
  if size % 4:
    first, _ = _threefry_words(key, size)
    return (first & _LOW).reshape(shape)
  count = size // 4
  first, second = _threefry_words(key, count)
  if materialize:
    halves = [first & _LOW, first >> BITS, second & _LOW, second >> BITS]
    return jnp.concatenate(halves).reshape(shape)
  half = jax.lax.broadcasted_iota(jnp.uint32, (4, count), 0)
  words = jnp.where(half < 2, first[None], second[None])
  return ((words >> (BITS * (half % 2))) & _LOW).reshape(shape)
