"""Per-element sums over tasks, and how each backend schedules them.

Eqs. 1-3 touch the task gradients only through per-element sums over tasks
(:class:`TaskSums`). What those sums are is fixed here once; how they are
formed depends on the backend, chosen inside the traced function with
``jax.lax.platform_dependent`` so that one jitted program serves every
backend:

* XLA:CPU has no multi-output fusion and reduces a leading axis slowly. The
  CPU schedule (:func:`add_slices`) unrolls the task axis into a sum of
  slices that XLA fuses into one loop over the input, up to ``BLOCK`` tasks at
  a time; beyond that a ``fori_loop`` adds a block per iteration (the carry
  computed in one pass, see ``_fusion``), so the program does not grow with
  ``T``. Tasks are added in task order.
* XLA:GPU and XLA:TPU fuse sibling reductions over the task axis into one
  multi-output pass and launch one kernel per loop iteration. The fused
  schedule (:func:`add_reductions`) writes every sum as ``jnp.sum(..., axis=0)``
  (the counts as one packed float reduction), for any ``T``. The reduction
  order is the compiler's (a tree), not task order.

Both schedules compute the same sums; they differ only in the order of the
floating-point additions, so they agree within rounding, and exactly when the
terms sum exactly (e.g. small integers). Each is a plain function, so the
tests call both on any backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_graddrop import _chunks
from optax_graddrop import _fusion

# Tasks unrolled into one fused pass on CPU; more are added a block at a time.
BLOCK = 32
# Elements per partial sum in reductions over whole arrays.
_SUM_BLOCK = 1024
# The fused schedule counts positive and negative entries in one float32 sum
# of ``[g > 0] + K [g < 0]`` (``K = T + 1``), exact while ``T (T + 1) < 2**24``.
_PACKED_COUNT_LIMIT = 2**24


class TaskSums(NamedTuple):
  """Per-element sums over tasks: all that eqs. 1-3 need.

  ``G_i`` is the signal whose sign GradDrop looks at and ``g_i`` the
  gradient it combines; they are the same array except at the activation
  level, where ``G_i`` is summed over the batch.

  Attributes:
    positive: ``S+ = sum_i max(G_i, 0)``.
    negative: ``S- = sum_i min(G_i, 0)``.
    kept_positive: ``W+``, the sum of ``(1 - l_i) g_i`` over the tasks whose
      signal is positive; ``None`` when it equals ``positive`` (the signals
      are the gradients and there is no per-task leak).
    kept_negative: ``W-``, likewise over the negative signals.
    passed: what passes whatever sign is kept (``l_i g_i``, and ``g_i`` where
      ``G_i`` is zero or not finite); ``None`` when the signals are the
      gradients, where it is ``(S+ - W+) + (S- - W-)``.
    num_positive: ``N+``, the number of positive signals (for diagnostics).
    num_negative: ``N-``, the number of negative signals.
  """

  positive: jax.Array
  negative: jax.Array
  kept_positive: jax.Array | None = None
  kept_negative: jax.Array | None = None
  passed: jax.Array | None = None
  num_positive: jax.Array | None = None
  num_negative: jax.Array | None = None


def compute_dtype(dtype: Any) -> Any:
  """The dtype sums are formed in: float32, or float64 for float64 input."""
  return jnp.promote_types(dtype, jnp.float32)


def count_dtype(num_tasks: int) -> Any:
  """Unsigned type for per-element counts of tasks, and of tasks + 1."""
  if num_tasks < 2**8 - 1:
    return jnp.uint8
  if num_tasks < 2**16 - 1:
    return jnp.uint16
  return jnp.uint32


def zeros(
  signal_like: jax.Array,
  grad_like: jax.Array,
  dtype: Any,
  *,
  per_task_leak: bool,
  separate_signals: bool = False,
  counts: Any = None,
) -> TaskSums:
  """The sums over no task, with the fields that the options need.

  Args:
    signal_like: an array shaped like one task's signal.
    grad_like: an array shaped like one task's gradient.
    dtype: the dtype of the sums.
    per_task_leak: whether the leak differs between tasks (``W+``, ``W-``).
    separate_signals: whether signals differ from gradients (``passed``).
    counts: the dtype of the counts ``N+``, ``N-``; ``None`` for no counts.

  Returns:
    Zero sums, shaped (and, under explicit sharding, sharded) like the
    arguments.
  """
  signal_zeros = jnp.zeros_like(signal_like, dtype)
  grad_zeros = jnp.zeros_like(grad_like, dtype)
  kept = grad_zeros if per_task_leak or separate_signals else None
  num = None if counts is None else jnp.zeros_like(signal_like, counts)
  return TaskSums(
    positive=signal_zeros,
    negative=signal_zeros,
    kept_positive=kept,
    kept_negative=kept,
    passed=grad_zeros if separate_signals else None,
    num_positive=num,
    num_negative=num,
  )


def add_task(
  sums: TaskSums, grad: jax.Array, signal: jax.Array | None, leak: jax.Array | None
) -> TaskSums:
  """Adds one task's gradient (and signal, when it differs) to the sums."""
  sign_of = grad if signal is None else signal
  positive, negative = jnp.maximum(sign_of, 0), jnp.minimum(sign_of, 0)
  kept_positive, kept_negative, passed = sums.kept_positive, sums.kept_negative, sums.passed
  if signal is None and kept_positive is not None:
    assert leak is not None and kept_negative is not None
    kept_positive = kept_positive + (1 - leak) * positive
    kept_negative = kept_negative + (1 - leak) * negative
  elif signal is not None:
    assert kept_positive is not None and kept_negative is not None and passed is not None
    kept = grad if leak is None else (1 - leak) * grad
    kept_positive = kept_positive + jnp.where(signal > 0, kept, 0)
    kept_negative = kept_negative + jnp.where(signal < 0, kept, 0)
    signed = (signal > 0) | (signal < 0)
    passed = passed + jnp.where(signed, 0 if leak is None else leak * grad, grad)
  num_positive, num_negative = sums.num_positive, sums.num_negative
  if num_positive is not None and num_negative is not None:
    num_positive = num_positive + (sign_of > 0).astype(num_positive.dtype)
    num_negative = num_negative + (sign_of < 0).astype(num_negative.dtype)
  return TaskSums(
    positive=sums.positive + positive,
    negative=sums.negative + negative,
    kept_positive=kept_positive,
    kept_negative=kept_negative,
    passed=passed,
    num_positive=num_positive,
    num_negative=num_negative,
  )


def accumulate(
  sums: TaskSums,
  grads: Sequence[jax.Array] | jax.Array,
  leak: jax.Array | None,
  signals: Sequence[jax.Array] | None = None,
) -> TaskSums:
  """Adds tasks ``0..k-1`` of ``grads`` (and ``signals``) in task order, unrolled.

  Args:
    sums: the sums so far.
    grads: ``k`` task gradients in the sums' dtype (a sequence, or an array
      with a leading axis of ``k``).
    leak: the ``k`` tasks' leaks, or ``None`` for no leak.
    signals: ``k`` signals, or ``None`` when they are the gradients.

  Returns:
    The sums with the ``k`` tasks added.
  """
  if leak is not None:
    leak = leak.astype(sums.positive.dtype)
  for task in range(len(grads)):
    sums = add_task(
      sums,
      grads[task],
      None if signals is None else signals[task],
      None if leak is None else leak[task],
    )
  return sums


def materialized(sums: TaskSums) -> TaskSums:
  """All fields computed in one pass over the added tasks (a loop carry)."""
  present = [field for field in sums if field is not None]
  values = iter(_fusion.materialize(present))
  return jax.tree.map(lambda _: next(values), sums)


def _task_slices(rows: jax.Array, start: Any, size: int, dtype: Any) -> list[jax.Array]:
  """Task slices ``start..start+size-1`` of a stacked array, in ``dtype``.

  Each slice is indexed on its own: XLA:CPU fuses such a slice into the loop
  that reads it, where it copied a slice of several tasks first.
  """
  return [
    jax.lax.dynamic_index_in_dim(rows, start + task, keepdims=False).astype(dtype)
    for task in range(size)
  ]


def add_slices(sums: TaskSums, rows: jax.Array, leak: jax.Array | None) -> TaskSums:
  """The CPU schedule: adds the task slices of ``rows`` in order.

  Up to :data:`BLOCK` tasks are one fused expression; more are added a block
  per ``fori_loop`` iteration, the last block left unevaluated so that XLA
  fuses it with whatever reads the sums.

  Args:
    sums: the sums so far.
    rows: ``[k, ...]`` task gradients (any float dtype).
    leak: the ``k`` tasks' leaks, or ``None``.

  Returns:
    The sums with the ``k`` tasks added, in task order.
  """
  dtype = sums.positive.dtype

  def add_block(acc: TaskSums, start: Any, size: int, in_loop: bool) -> TaskSums:
    block_leak = None if leak is None else jax.lax.dynamic_slice_in_dim(leak, start, size)
    acc = accumulate(acc, _task_slices(rows, start, size, dtype), block_leak)
    # A loop carry is in memory anyway: have all its fields computed in one pass.
    return materialized(acc) if in_loop else acc

  return _chunks.over_chunks(sums, rows.shape[0], BLOCK, add_block)


def _counts(rows: jax.Array, dtype: Any, num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """``(N+, N-)`` over the task axis, as reductions."""
  if num_tasks * (num_tasks + 1) < _PACKED_COUNT_LIMIT:
    # One reduction instead of two; every partial sum is an exact integer.
    base = float(num_tasks + 1)
    packed = jnp.sum(
      jnp.where(rows > 0, 1.0, jnp.where(rows < 0, base, 0.0)).astype(jnp.float32), axis=0
    )
    num_negative = jnp.floor(packed / base)
    return (packed - base * num_negative).astype(dtype), num_negative.astype(dtype)
  return jnp.sum(rows > 0, axis=0, dtype=dtype), jnp.sum(rows < 0, axis=0, dtype=dtype)


def add_reductions(sums: TaskSums, rows: jax.Array, leak: jax.Array | None) -> TaskSums:
  """The fused schedule (GPU, TPU): every sum as a reduction over the task axis.

  Args:
    sums: the sums so far.
    rows: ``[k, ...]`` task gradients (any float dtype).
    leak: the ``k`` tasks' leaks, or ``None``.

  Returns:
    The sums with the ``k`` tasks added (summed in the compiler's order).
  """
  dtype = sums.positive.dtype
  g = rows.astype(dtype)
  positive, negative = jnp.maximum(g, 0), jnp.minimum(g, 0)
  kept_positive, kept_negative = sums.kept_positive, sums.kept_negative
  if kept_positive is not None and kept_negative is not None:
    assert leak is not None
    weight = (1 - leak.astype(dtype)).reshape((-1,) + (1,) * (g.ndim - 1))
    kept_positive = kept_positive + jnp.sum(weight * positive, axis=0)
    kept_negative = kept_negative + jnp.sum(weight * negative, axis=0)
  num_positive, num_negative = sums.num_positive, sums.num_negative
  if num_positive is not None and num_negative is not None:
    add_positive, add_negative = _counts(rows, num_positive.dtype, rows.shape[0])
    num_positive, num_negative = num_positive + add_positive, num_negative + add_negative
  return TaskSums(
    positive=sums.positive + jnp.sum(positive, axis=0),
    negative=sums.negative + jnp.sum(negative, axis=0),
    kept_positive=kept_positive,
    kept_negative=kept_negative,
    num_positive=num_positive,
    num_negative=num_negative,
  )


@functools.cache
def _traced_once(add: Callable[..., TaskSums]) -> Callable[..., TaskSums]:
  """``add`` jitted: a model's leaves of one shape are traced and lowered once
  (XLA inlines the calls, so the compiled program is the same)."""
  return jax.jit(add)


def add_tasks(sums: Sequence[TaskSums], rows: Sequence[jax.Array], leak: jax.Array | None) -> Any:
  """Adds ``[k, ...]`` task gradients to each of several sums, with the
  backend's schedule: :func:`add_slices` on CPU, :func:`add_reductions`
  elsewhere."""

  def schedule(add: Callable[..., TaskSums]) -> Callable[..., list[TaskSums]]:
    return lambda sums, rows, leak: [add(s, r, leak) for s, r in zip(sums, rows)]

  return jax.lax.platform_dependent(
    list(sums),
    list(rows),
    leak,
    cpu=schedule(_traced_once(add_slices)),
    default=schedule(_traced_once(add_reductions)),
  )


def _weighted_slices(total: jax.Array, rows: jax.Array, weights: jax.Array | None) -> jax.Array:
  """``total + sum_i w_i g_i``, slices added in task order (the CPU schedule)."""
  dtype = total.dtype

  def add_block(total: jax.Array, start: Any, size: int, in_loop: bool) -> jax.Array:
    del in_loop
    block = _task_slices(rows, start, size, dtype)
    block_weights = None if weights is None else jax.lax.dynamic_slice_in_dim(weights, start, size)
    for task in range(size):
      term = (
        block[task] if block_weights is None else block_weights[task].astype(dtype) * block[task]
      )
      total = total + term
    return total

  return _chunks.over_chunks(total, rows.shape[0], BLOCK, add_block)


def _weighted_reduction(total: jax.Array, rows: jax.Array, weights: jax.Array | None) -> jax.Array:
  """``total + sum_i w_i g_i``, one reduction over the task axis (the fused schedule)."""
  g = rows.astype(total.dtype)
  if weights is not None:
    g = weights.astype(total.dtype).reshape((-1,) + (1,) * (g.ndim - 1)) * g
  return total + jnp.sum(g, axis=0)


def add_weighted(total: jax.Array, rows: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``total + sum_i w_i g_i`` with the backend's schedule (see the module).

  On CPU the tasks are added to ``total`` one at a time in task order, so
  adding a stack in chunks gives the same bits as adding it at once.

  Args:
    total: the running sum, in the compute dtype.
    rows: ``[k, ...]`` task gradients.
    weights: ``(k,)`` weights, or ``None`` for ``w = 1``.
  """
  return jax.lax.platform_dependent(
    total, rows, weights, cpu=_weighted_slices, default=_weighted_reduction
  )


@jax.jit
def weighted_sum(rows: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``sum_i w_i g_i`` (``w = 1`` by default) over the leading task axis.

  Summed in the compute dtype with the backend's schedule, returned in the
  input's dtype and materialised once, however many consumers read it.
  Jitted, so that an eager call does not trace and compile its task loop
  every time.

  Args:
    rows: ``[T, ...]`` task gradients.
    weights: ``(T,)`` weights in any float dtype (cast to the compute
      dtype, so a float32 leaf is never summed in float64), or ``None``.

  Returns:
    The weighted sum, shaped ``rows.shape[1:]``.
  """
  total = add_weighted(jnp.zeros(rows.shape[1:], compute_dtype(rows.dtype)), rows, weights)
  (total,) = _fusion.materialize([total.astype(rows.dtype)])
  return total


def _add_tuples(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  return tuple(a + b for a, b in zip(x, y))


def _max_tuples(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  return tuple(jnp.maximum(a, b) for a, b in zip(x, y))


def sum_all(arrays: Sequence[jax.Array], dtype: Any, *, sharded: bool = False) -> tuple[Any, ...]:
  """Sums of every element of each array, all in one pass over them.

  One variadic reduce reads all the arrays (and the elementwise expressions
  that produce them) once. It sums blocks of ``_SUM_BLOCK`` elements first
  and then the blocks' sums, whose rounding error grows with the number of
  blocks rather than of elements.

  Args:
    arrays: arrays of one shape.
    dtype: the dtype of the sums.
    sharded: the arrays are explicitly sharded: each device sums its shard
      and the partial sums are then added up (no reshape).

  Returns:
    One scalar per array.
  """
  return _reduce_all(arrays, dtype, _add_tuples, sharded=sharded)


def max_all(arrays: Sequence[jax.Array], dtype: Any, *, sharded: bool = False) -> tuple[Any, ...]:
  """The largest element of each non-negative array (NaN if any is NaN), in
  one pass over them, as :func:`sum_all`; ``0`` for an empty array."""
  return _reduce_all(arrays, dtype, _max_tuples, sharded=sharded)


def _reduce_all(
  arrays: Sequence[jax.Array],
  dtype: Any,
  combine: Callable[[tuple[jax.Array, ...], tuple[jax.Array, ...]], tuple[jax.Array, ...]],
  *,
  sharded: bool,
) -> tuple[Any, ...]:
  """Every element of each array combined by ``combine`` (identity ``0``)."""
  zeros_ = (jnp.zeros((), dtype),) * len(arrays)
  if sharded:
    every_axis = tuple(range(jnp.ndim(arrays[0])))
    return tuple(
      jax.lax.reduce(tuple(a.astype(dtype) for a in arrays), zeros_, combine, every_axis)
    )
  flat = [a.reshape(-1).astype(dtype) for a in arrays]
  size = flat[0].shape[0]
  totals = zeros_
  blocks = size // _SUM_BLOCK
  if blocks:
    main = tuple(f[: blocks * _SUM_BLOCK].reshape(blocks, _SUM_BLOCK) for f in flat)
    block_totals = jax.lax.reduce(main, zeros_, combine, dimensions=(1,))
    totals = combine(totals, jax.lax.reduce(block_totals, zeros_, combine, dimensions=(0,)))
  if size % _SUM_BLOCK:
    tails = tuple(f[blocks * _SUM_BLOCK :] for f in flat)
    totals = combine(totals, jax.lax.reduce(tails, zeros_, combine, dimensions=(0,)))
  return totals
