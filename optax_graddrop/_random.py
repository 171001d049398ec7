"""Per-element 16-bit uniforms, derived from one key per pytree leaf.

GradDrop compares one uniform U per element with a keep probability. Random
bits dominate its cost, so each uniform is a 16-bit integer ``b`` with
``U = b / 2**16``: one threefry call yields four of them, where
``jax.random.uniform`` spends one call per element. The keep decision
``U < f`` then holds with probability ``ceil(2**16 f) / 2**16``, which is
within ``2**-16`` of ``f`` and exact at ``f = 0`` and ``f = 1``.
"""

from __future__ import annotations

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


def _halves(words: jax.Array) -> list[jax.Array]:
  return [words & _LOW, words >> BITS]


def _threefry_words(key: jax.Array, count: int) -> list[jax.Array]:
  # Both 32-bit outputs of each threefry call are used (jax.random.bits XORs
  # them into one word), on the counter layout of jax.random's partitionable
  # threefry, so the stream does not depend on how the array is sharded.
  k1, k2 = jax.random.key_data(key)
  high = jnp.zeros((count,), jnp.uint32)
  low = jax.lax.iota(jnp.uint32, count)
  return list(threefry2x32_p.bind(k1, k2, high, low))


def uniform_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Uniform integers in ``[0, 2**16)``, one per element of ``shape``.

  Args:
    key: a typed PRNG key of shape ``()``.
    shape: the shape of the result.

  Returns:
    A ``uint32`` array of ``shape`` with i.i.d. values uniform on
    ``{0, ..., 2**16 - 1}``.
  """
  size = 1
  for dim in shape:
    size *= dim
  if jax.random.key_impl(key) == "threefry2x32":
    words = _threefry_words(key, -(-size // 4))
  else:
    words = [jax.random.bits(key, (-(-size // 2),), jnp.uint32)]
  halves = [half for word in words for half in _halves(word)]
  return jnp.concatenate(halves)[:size].reshape(shape)
