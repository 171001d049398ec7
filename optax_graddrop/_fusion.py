"""Materialising several elementwise results of one expression in one pass.

GradDrop's outputs (the combined gradient, the per-element drop counts,
the running sums over tasks) are elementwise functions of the same task
gradients, and reading those gradients is most of the cost. XLA:GPU and
XLA:TPU compute such siblings in one multi-output fusion. XLA:CPU has no
multi-output fusion: every output becomes its own loop that reads all the
inputs again, and a result with several consumers (Adam's two moments and
its update) is recomputed in each of them.

On CPU, :func:`materialize` therefore routes the values through a variadic
``reduce`` over an extra axis of size 2 whose second entry is the additive
identity: XLA emits one loop for a reduce, whatever the number of outputs,
never fuses a reduce into its consumers, and ``x + (-0.0)`` is ``x``
exactly (NaN, Inf and the sign of zero included). (An
``optimization_barrier`` is not enough there: it is expanded before fusion,
and XLA:CPU then recomputed GradDrop inside each of Adam's updates.)
Elsewhere it is an ``optimization_barrier``. Either way the values are
unchanged, and :func:`materialize` is the identity under every
transformation: a ``custom_jvp`` passes tangents through (a bitcast to
unsigned integers, and a reduce over integers, would otherwise have a zero
derivative), which transposes to passing cotangents through, and ``vmap``
batches the primal computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _as_unsigned(array: jax.Array) -> jax.Array:
  if jnp.issubdtype(array.dtype, jnp.unsignedinteger):
    return array
  unsigned = jnp.dtype(f"uint{8 * array.dtype.itemsize}")
  return jax.lax.bitcast_convert_type(array, unsigned)


def _additive_identity(dtype: jnp.dtype) -> jax.Array:
  # -0.0 + x == x for every float x (+0.0 would turn -0.0 into +0.0).
  return jnp.array(-0.0 if jnp.issubdtype(dtype, jnp.floating) else 0, dtype)


def _one_reduce(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  # A single float operand would make a plain sum, which XLA:CPU hands to a
  # library kernel that first materialises the padded input; viewed as
  # unsigned integers it stays one XLA loop (with the view back fused into
  # it). Several operands stay one loop as they are.
  single = len(arrays) == 1
  views = tuple(_as_unsigned(a) if single else a for a in arrays)
  identities = tuple(_additive_identity(v.dtype) for v in views)
  # The size-2 axis goes last: measured slightly faster than first.
  padded = tuple(jnp.stack([v, jnp.full_like(v, i)], axis=-1) for v, i in zip(views, identities))
  sums = jax.lax.reduce(
    padded, identities, lambda x, y: tuple(a + b for a, b in zip(x, y)), dimensions=(views[0].ndim,)
  )
  return tuple(
    s if s.dtype == a.dtype else jax.lax.bitcast_convert_type(s, a.dtype)
    for s, a in zip(sums, arrays)
  )


def _barrier(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jax.lax.optimization_barrier(arrays))


@jax.custom_jvp
def _materialize(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jax.lax.platform_dependent(*arrays, cpu=_one_reduce, default=_barrier))


@_materialize.defjvp
def _materialize_jvp(
  primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  # The value is unchanged, so the derivative is the identity.
  return _materialize(*primals), tangents


def materialize(arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """Computes ``arrays`` (same shape) in one pass and keeps them in memory.

  Args:
    arrays: elementwise results of the same shape, usually of one fused
      expression over the same inputs.

  Returns:
    The same values, materialised: their consumers read them instead of
    recomputing them.
  """
  return _materialize(*arrays)
