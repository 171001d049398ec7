"""Per-element 16-bit uniforms, derived from one key per pytree leaf.

GradDrop compares one uniform U per element with a keep probability. Random
bits dominate its cost, so each uniform is a 16-bit integer ``b`` with
``U = b / 2**16``: one threefry call yields four of them, where
``jax.random.uniform`` spends one call per element. The keep decision
``U < f`` then holds with probability ``ceil(2**16 f) / 2**16``, which is
within ``2**-16`` of ``f`` and exact at ``f = 0`` and ``f = 1``.

The generator is Threefry-2x32 with 20 rounds (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011), the one behind
``jax.random``, evaluated on global element counters, so the stream does not
depend on how an array is sharded. ``jax.random``'s own lowering of it on
XLA:CPU is a rolled loop of five iterations whose state round-trips through
memory between iterations and is not vectorised; written as one straight
elementwise expression (:func:`threefry2x32`) the same function is one
vectorised loop, about 8x faster there. Its values are those of
``jax.extend.random.threefry2x32_p`` (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_graddrop import _fusion

BITS = 16
SCALE = float(2**BITS)
_LOW = np.uint32(2**BITS - 1)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def leaf_keys(key: jax.Array, num_leaves: int) -> list[jax.Array]:
  """One independent key per leaf: ``fold_in(key, leaf_index)``."""
  return [jax.random.fold_in(key, i) for i in range(num_leaves)]


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(
  key: tuple[jax.Array, jax.Array], counts: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block function (20 rounds) as one elementwise expression.

  Args:
    key: the two 32-bit words of the key, ``uint32`` scalars.
    counts: the two 32-bit words of each counter, ``uint32`` arrays.

  Returns:
    The two 32-bit output words of each counter.
  """
  schedule = (key[0], key[1], key[0] ^ key[1] ^ _KEY_PARITY)
  x0, x1 = counts[0] + schedule[0], counts[1] + schedule[1]
  for block in range(5):
    for distance in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, distance) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _threefry_words(key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  # Both 32-bit outputs of each call (jax.random.bits XORs them into one
  # word), on jax.random's partitionable counter layout. They are kept in
  # memory: fused into a consumer that reads each word four times, the hash
  # would be computed four times.
  key_words = jax.random.key_data(key)
  counts = (jnp.zeros((count,), jnp.uint32), jax.lax.iota(jnp.uint32, count))
  first, second = _fusion.materialize(threefry2x32((key_words[0], key_words[1]), counts))
  return first, second


def bits_shape(size: int) -> tuple[int, ...]:
  """The shape in which ``size`` uniforms are cheapest to consume: ``(4, size / 4)``.

  Row ``r`` of it holds half ``r`` of the threefry calls, so a loop over it
  reads each call's words contiguously, with no division by ``size / 4``
  per element (which keeps XLA:CPU's loop vectorised). Sizes not divisible
  by 4 stay flat.
  """
  return (4, size // 4) if size % 4 == 0 and size else (size,)


def uniform_bits(key: jax.Array, shape: Sequence[int], *, materialize: bool = False) -> jax.Array:
  """Uniform integers in ``[0, 2**16)``, one per element of ``shape``.

  With a threefry key and a size divisible by 4, four elements share one
  threefry call (its two 32-bit words, halved): flat element ``r m + c``
  (``m`` = size / 4, ``r < 4``) takes half ``r`` of call ``c``. By default
  the halves are picked with selects, which XLA fuses into the consumer's
  loop (cheapest when ``shape`` is :func:`bits_shape`). A consumer that
  broadcasts the bits (activation-level GradDrop, over the batch) would then
  redo the selects per broadcast element; ``materialize=True`` concatenates
  the four halves instead (same values), which XLA computes once. Other
  sizes take one threefry call per element, and other key implementations
  (e.g. ``"rbg"``) ``jax.random.bits``.

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
