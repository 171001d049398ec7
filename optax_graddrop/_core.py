"""Gradient Sign Dropout (GradDrop): purity, keep functions, masks, combine.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.

For per-task gradients ``g_1..g_T`` of one scalar:

* purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``                    (eq. 1)
* masks ``M_i = [f(P) > U] [g_i > 0] + [f(P) <= U] [g_i < 0]``        (eq. 2)
* output ``sum_i (l_i + (1 - l_i) M_i) g_i``, ``l_i`` the leak        (eq. 3)

with ``U ~ Uniform[0, 1)`` per scalar and ``f`` a monotone keep function.

Eqs. 1-3 touch the task gradients only through per-element sums over tasks
(:class:`_TaskSums`): the sums of the positive and of the negative entries,
the same weighted by ``1 - l_i`` when the leak differs between tasks, and,
for diagnostics, the counts of positive and negative entries. Every entry
point builds those sums and finishes from them with :func:`_finish`:
:func:`graddrop` from a stacked ``[T, ...]`` gradient, the streaming
``graddrop_value_and_grad`` from per-task backward passes, ``fork`` from the
cotangents of a shared activation. The sums are accumulated one task after
the other, in task order, so every path gives the same bits. Up to
``_BLOCK`` tasks are unrolled into one elementwise expression, which XLA
fuses into a single pass over the input (a reduction over the task axis is
many times slower on XLA:CPU); beyond that a loop adds one block of tasks at
a time, so the compile time does not grow with ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout
from jax.experimental.layout import with_layout_constraint

from optax_graddrop import _chunks
from optax_graddrop import _fusion
from optax_graddrop import _random
from optax_graddrop import _validation

KeepFn = Callable[[jax.Array], jax.Array]
Keep = Literal["linear", "sigmoid", "random"] | KeepFn

# Tasks unrolled into one fused pass; more are added a block at a time.
_BLOCK = 32
# Elements per partial sum in reductions over whole arrays.
_SUM_BLOCK = 1024


class GradDropStats(NamedTuple):
  """Diagnostics of one GradDrop call, summed over all leaves.

  Attributes:
    conflict_fraction: fraction of scalars whose task gradients have both
      signs (where GradDrop has to pick one).
    kept_fraction: mean of the masks ``M_i`` over all ``T x N`` task-gradient
      entries (zero entries, and entries at non-finite scalars, count as
      kept), as the official implementation's ``average_grad_mask``. 1 when
      all signs agree.
  """

  conflict_fraction: jax.Array
  kept_fraction: jax.Array


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _count_dtype(num_tasks: int) -> Any:
  """Unsigned type for per-element counts of tasks, and of tasks + 1."""
  if num_tasks < 2**8 - 1:
    return jnp.uint8
  if num_tasks < 2**16 - 1:
    return jnp.uint16
  return jnp.uint32


def _explicitly_sharded(array: Any) -> bool:
  """Whether ``array``'s type carries a sharding (a mesh with Explicit axes).

  Such arrays keep their shapes here: under explicit sharding a reshape that
  merges a sharded dimension needs an output sharding, and GradDrop has no
  reason to pick one.
  """
  spec = getattr(getattr(jax.typeof(array), "sharding", None), "spec", None)
  return spec is not None and any(axis is not None for axis in spec)


def _work_shape(array: Any, skip: int = 0) -> tuple[int, ...]:
  """The shape GradDrop computes in: that of the uniforms (see
  ``_random.bits_shape``), or the array's own under explicit sharding."""
  shape = tuple(jnp.shape(array))[skip:]
  return shape if _explicitly_sharded(array) else _random.bits_shape(math.prod(shape))


class _TaskSums(NamedTuple):
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


def _zero_sums(
  signal_like: jax.Array,
  grad_like: jax.Array,
  dtype: Any,
  *,
  per_task_leak: bool,
  separate_signals: bool,
  count_dtype: Any = None,
) -> _TaskSums:
  """The sums over no task, with the fields that the options need.

  They take the shapes (and, under explicit sharding, the shardings) of one
  task's signal and gradient.
  """
  zeros = jnp.zeros_like(signal_like, dtype)
  grad_zeros = jnp.zeros_like(grad_like, dtype)
  kept = grad_zeros if per_task_leak or separate_signals else None
  counts = None if count_dtype is None else jnp.zeros_like(signal_like, count_dtype)
  return _TaskSums(
    positive=zeros,
    negative=zeros,
    kept_positive=kept,
    kept_negative=kept,
    passed=grad_zeros if separate_signals else None,
    num_positive=counts,
    num_negative=counts,
  )


def _add_task(
  sums: _TaskSums, grad: jax.Array, signal: jax.Array | None, leak: jax.Array | None
) -> _TaskSums:
  """Adds one task's gradient (and signal) to the sums."""
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
  return _TaskSums(
    positive=sums.positive + positive,
    negative=sums.negative + negative,
    kept_positive=kept_positive,
    kept_negative=kept_negative,
    passed=passed,
    num_positive=num_positive,
    num_negative=num_negative,
  )


def _accumulate(
  sums: _TaskSums,
  grads: Sequence[jax.Array] | jax.Array,
  leak: jax.Array | None,
  signals: Sequence[jax.Array] | None = None,
) -> _TaskSums:
  """Adds tasks ``0..k-1`` of ``grads`` (and ``signals``) in order.

  Args:
    sums: the sums so far.
    grads: ``k`` task gradients in the sums' dtype (a sequence, or an array
      with a leading axis of ``k``).
    leak: the ``k`` tasks' leaks, or ``None`` for no leak.
    signals: ``k`` signals, or ``None`` when they are the gradients.

  Returns:
    The sums with the ``k`` tasks added.
  """
  for task in range(len(grads)):
    sums = _add_task(
      sums,
      grads[task],
      None if signals is None else signals[task],
      None if leak is None else leak[task],
    )
  return sums


def _materialize_sums(sums: _TaskSums) -> _TaskSums:
  """Computes all fields in one pass over the added tasks (a loop carry)."""
  present = [field for field in sums if field is not None]
  values = iter(_fusion.materialize(present))
  return jax.tree.map(lambda _: next(values), sums)


def _sums_in_chunks(
  init: list[_TaskSums],
  num_tasks: int,
  chunk_size: int,
  task_rows: Callable[[Any, int], list[Any]],
  leak: jax.Array | None,
) -> list[_TaskSums]:
  """The sums over all tasks, one per leaf, ``chunk_size`` tasks at a time.

  Args:
    init: the zero sums, one per leaf.
    num_tasks: ``T``.
    chunk_size: tasks per chunk, ``>= 1``.
    task_rows: ``(start, size) -> [rows of each leaf]``: for each leaf, the
      gradients of tasks ``start..start+size-1`` in the sums' dtype (a
      sequence, or an array with a leading axis of ``size``).
    leak: the per-task leaks ``(T,)``, or ``None``.

  Returns:
    The sums over all tasks, one per leaf.
  """

  def add_chunk(sums: list[_TaskSums], start: Any, size: int, in_loop: bool) -> list[_TaskSums]:
    rows = task_rows(start, size)
    chunk_leak = None if leak is None else jax.lax.dynamic_slice_in_dim(leak, start, size)
    sums = [_accumulate(s, r, chunk_leak) for s, r in zip(sums, rows)]
    # A loop carry is in memory anyway: have all its fields computed in one pass.
    return [_materialize_sums(s) for s in sums] if in_loop else sums

  return _chunks.over_chunks(init, num_tasks, chunk_size, add_chunk)


def _task_slices(rows: jax.Array, start: Any, size: int, dtype: Any) -> list[jax.Array]:
  """Task slices ``start..start+size-1`` of a stacked array, in ``dtype``.

  Each slice is indexed on its own: XLA:CPU fuses such a slice into the loop
  that reads it, where it copied a slice of several tasks first.
  """
  return [
    jax.lax.dynamic_index_in_dim(rows, start + task, keepdims=False).astype(dtype)
    for task in range(size)
  ]


def _task_sum(task_grad: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``sum_i w_i g_i`` (``w = 1`` by default) over the leading task axis.

  The baselines' summation: slices added in task order in the compute dtype,
  ``_BLOCK`` tasks per fused pass, never a reduction over the task axis. The
  result has the input's dtype and is materialised once, however many
  consumers read it.
  """
  num_tasks = task_grad.shape[0]
  rows = task_grad.reshape(num_tasks, *_work_shape(task_grad, skip=1))
  dtype = _compute_dtype(rows.dtype)

  def add_chunk(total: jax.Array, start: Any, size: int, in_loop: bool) -> jax.Array:
    del in_loop
    chunk = _task_slices(rows, start, size, dtype)
    chunk_weights = None if weights is None else jax.lax.dynamic_slice_in_dim(weights, start, size)
    for task in range(size):
      term = chunk[task] if chunk_weights is None else chunk_weights[task] * chunk[task]
      total = total + term
    return total

  total = _chunks.over_chunks(jnp.zeros(rows.shape[1:], dtype), num_tasks, _BLOCK, add_chunk)
  (total,) = _fusion.materialize([total.astype(task_grad.dtype)])
  return total.reshape(task_grad.shape[1:])


def _purity(positive: jax.Array, negative: jax.Array, eps: Any) -> jax.Array:
  """Eq. 1 from the sums: ``1/2 (1 + (S+ + S-) / (S+ - S- + eps))``.

  With ``eps = 0`` it depends only on ratios of the gradients, so scaling
  them all by a power of two leaves it bit for bit unchanged. An all-zero
  entry has purity 1/2.
  """
  denominator = positive - negative + eps
  ratio = (positive + negative) / jnp.where(denominator > 0, denominator, 1)
  return 0.5 * (1.0 + ratio)


def sign_purity(task_grads: jax.Array, eps: float = 0.0) -> jax.Array:
  """Gradient positive sign purity, elementwise (eq. 1 of the paper).

  ``P = 1/2 (1 + sum_i g_i / (sum_i |g_i| + eps))``, in ``[0, 1]``: 1 where
  every task gradient is positive, 0 where every one is negative, 1/2 where
  all are zero.

  Args:
    task_grads: array of shape ``[T, ...]`` (task axis first).
    eps: added to ``sum_i |g_i|``. The default 0 makes ``P`` depend only on
      the ratios of the gradients, so it does not change when they are all
      scaled; lingvo and LibMTL use ``1e-7``, which pulls ``P`` towards 1/2
      wherever ``sum_i |g_i|`` is not much larger than ``eps``.

  Returns:
    ``P`` of shape ``task_grads.shape[1:]``, in float32 (float64 for float64
    input).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import sign_purity
    >>> sign_purity(jnp.array([[1.0, 2.0, 0.0], [3.0, -2.0, 0.0]]))
    Array([1. , 0.5, 0.5], dtype=float32)
  """
  num_tasks = _validation.check_task_grads(task_grads)
  _validation.check_eps(eps)
  task_grads = jnp.asarray(task_grads)
  (sums,) = _stacked_sums([task_grads], num_tasks, None, with_counts=False)
  return _purity(sums.positive, sums.negative, eps).reshape(task_grads.shape[1:])


def keep_fn(keep: Keep = "linear", scale: float = 1.0) -> KeepFn:
  """The keep function ``f``: purity ``P`` to the probability of keeping ``+``.

  * ``"linear"`` (the paper's default): ``f(P) = 1/2 + scale (P - 1/2)``.
  * ``"sigmoid"``: ``f(P) = sigmoid(4 scale (P - 1/2))`` (slope ``scale`` at
    ``P = 1/2``, like the linear one).
  * ``"random"``: ``f(P) = 1/2``, a fair coin that ignores ``P`` (the paper's
    random-sign ablation).
  * a callable ``P -> f(P)``, returned as is.

  Values of ``f`` outside ``[0, 1]`` act as 0 or 1 (a uniform is never below
  0 nor at or above 1), so ``scale > 1`` steepens ``"linear"`` into a clipped
  ramp.

  Args:
    keep: one of the names above, or a callable.
    scale: the slope ``k``; only for ``"linear"`` and ``"sigmoid"``.

  Returns:
    A function from an array of purities to keep probabilities.

  Raises:
    ValueError: for an unknown name, or a ``scale`` given with ``"random"`` or
      a callable.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import keep_fn
    >>> keep_fn("linear", scale=0.5)(jnp.array([0.0, 0.5, 1.0]))
    Array([0.25, 0.5 , 0.75], dtype=float32)
  """
  concrete_scale = _validation.check_scalar(scale, "scale")
  if callable(keep) or keep == "random":
    # A traced scale (a hyperparameter) cannot be checked; it is unused here.
    if concrete_scale is not None and concrete_scale != 1.0:
      raise ValueError(
        f"`scale` only applies to keep='linear' or 'sigmoid'; got scale={scale} "
        f"with keep={keep!r}. Fold the scale into your keep function."
      )
    if callable(keep):
      return keep
    return lambda purity: jnp.full_like(purity, 0.5)
  if keep == "linear":
    return lambda purity: 0.5 + scale * (purity - 0.5)
  if keep == "sigmoid":
    return lambda purity: jax.nn.sigmoid(4.0 * scale * (purity - 0.5))
  raise ValueError(
    f"Unknown `keep`={keep!r}; expected 'linear', 'sigmoid', 'random' or a "
    "callable mapping purity to a keep probability (with "
    "optax.inject_hyperparams, name a callable `keep` in `static_args`, or "
    "optax takes it for a schedule)."
  )


def _keep_probability(fn: KeepFn, purity: jax.Array) -> jax.Array:
  prob = fn(purity)
  if jnp.shape(prob) != purity.shape or not jnp.issubdtype(jnp.result_type(prob), jnp.floating):
    raise ValueError(
      "The `keep` function must map a float array of purities to a float array "
      f"of the same shape; got shape {jnp.shape(prob)} and dtype "
      f"{jnp.result_type(prob)} for purities of shape {purity.shape}."
    )
  return prob


class _SignChoice(NamedTuple):
  """Which sign each scalar keeps."""

  conflict: jax.Array  # both signs present (and finite): a sign is picked
  choose_positive: jax.Array  # [f(P) > U]


def _choose_signs(sums: _TaskSums, bits: jax.Array, fn: KeepFn, eps: Any) -> _SignChoice:
  """Eq. 2's decision, from the sums and 16-bit uniforms ``U = bits / 2**16``."""
  purity = _purity(sums.positive, sums.negative, eps)
  prob = _keep_probability(fn, purity).astype(purity.dtype)
  # U = bits / 2**16 < f  <=>  bits < 2**16 f, exact in float.
  choose_positive = bits.astype(purity.dtype) < prob * _random.SCALE
  # Where all signs agree there is nothing to pick: the whole sum passes
  # (P is 0 or 1 there; keep functions with f(1) < 1 must not drop it).
  # A non-finite entry makes P NaN, which would drop a sign at random.
  conflict = (sums.positive > 0) & (sums.negative < 0) & jnp.isfinite(sums.positive - sums.negative)
  return _SignChoice(conflict, choose_positive)


def _combine(sums: _TaskSums, choice: _SignChoice) -> tuple[jax.Array, jax.Array]:
  """Eq. 3 from the sums: ``(output, plain sum)``.

  At a conflict the output is ``W+ + L`` or ``W- + L`` (``L`` what passes
  whatever the sign); elsewhere, and where an entry is not finite (so that
  NaN and Inf stay visible), the plain sum ``sum_i g_i``.
  """
  if sums.passed is None:
    plain = sums.positive + sums.negative
    if sums.kept_positive is None or sums.kept_negative is None:
      kept_positive, kept_negative, passed = sums.positive, sums.negative, None
    else:
      kept_positive, kept_negative = sums.kept_positive, sums.kept_negative
      passed = (sums.positive - kept_positive) + (sums.negative - kept_negative)
  else:
    assert sums.kept_positive is not None and sums.kept_negative is not None
    kept_positive, kept_negative, passed = sums.kept_positive, sums.kept_negative, sums.passed
    plain = (kept_positive + kept_negative) + passed
  chosen = jnp.where(choice.choose_positive, kept_positive, kept_negative)
  if passed is not None:
    chosen = chosen + passed
  return jnp.where(choice.conflict, chosen, plain), plain


def _drop_code(sums: _TaskSums, choice: _SignChoice, dtype: Any) -> jax.Array:
  """Per element: 0 without a conflict, else 1 + the number of dropped entries."""
  assert sums.num_positive is not None and sums.num_negative is not None
  dropped = jnp.where(choice.choose_positive, sums.num_negative, sums.num_positive)
  return jnp.where(choice.conflict, dropped.astype(dtype) + 1, 0).astype(dtype)


def _add_tuples(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  return tuple(a + b for a, b in zip(x, y))


def _sum_all(arrays: Sequence[jax.Array], dtype: Any) -> tuple[jax.Array, ...]:
  """Sums of every element of each array, all in one pass over them.

  One variadic reduce reads all the arrays (and the elementwise expressions
  that produce them) once. It sums blocks of ``_SUM_BLOCK`` elements first
  and then the blocks' sums, whose rounding error grows with the number of
  blocks rather than of elements.

  Args:
    arrays: arrays of one shape.
    dtype: the dtype of the sums.

  Returns:
    One scalar per array.
  """
  zeros = (jnp.zeros((), dtype),) * len(arrays)
  if any(_explicitly_sharded(a) for a in arrays):
    # Each device sums its shard; the partial sums are then added up.
    every_axis = tuple(range(jnp.ndim(arrays[0])))
    return tuple(
      jax.lax.reduce(tuple(a.astype(dtype) for a in arrays), zeros, _add_tuples, every_axis)
    )
  flat = [a.reshape(-1).astype(dtype) for a in arrays]
  size = flat[0].shape[0]
  totals = zeros
  blocks = size // _SUM_BLOCK
  if blocks:
    main = tuple(f[: blocks * _SUM_BLOCK].reshape(blocks, _SUM_BLOCK) for f in flat)
    block_sums = jax.lax.reduce(main, zeros, _add_tuples, dimensions=(1,))
    totals = _add_tuples(totals, jax.lax.reduce(block_sums, zeros, _add_tuples, dimensions=(0,)))
  if size % _SUM_BLOCK:
    tails = tuple(f[blocks * _SUM_BLOCK :] for f in flat)
    totals = _add_tuples(totals, jax.lax.reduce(tails, zeros, _add_tuples, dimensions=(0,)))
  return totals


def _count_drops(code: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(conflicts, dropped entries)`` of one leaf, as exact uint32 counts."""
  total, conflicts = _sum_all([code, code > 0], jnp.uint32)
  return conflicts, total - conflicts


def _rescale_to_norm(combined: jax.Array, target: jax.Array) -> jax.Array:
  norm_sq, target_norm_sq = _sum_all([jnp.square(combined), jnp.square(target)], combined.dtype)
  norm = jnp.sqrt(norm_sq)
  # A zero output stays zero (there is no direction to rescale).
  return combined * (jnp.sqrt(target_norm_sq) / jnp.where(norm > 0, norm, 1.0))


def _finish(
  sums: _TaskSums,
  bits: jax.Array,
  fn: KeepFn,
  eps: Any,
  *,
  out_dtype: Any,
  preserve_norm: bool,
  count_dtype: Any = None,
  materialize: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Eqs. 2-3 and the diagnostics of one leaf, from its sums.

  Args:
    sums: the leaf's sums over all tasks.
    bits: 16-bit uniforms shaped like ``sums.positive``.
    fn: the keep function.
    eps: as for :func:`graddrop`.
    out_dtype: the dtype of the result.
    preserve_norm: rescale to the norm of the plain sum.
    count_dtype: count dropped entries in this dtype (``None``: no counts).
    materialize: compute the output, the plain sum and the counts in one
      pass and keep them in memory (see ``_fusion``), so that consumers do
      not recompute GradDrop.

  Returns:
    ``(output, counts)``: counts are ``(conflicts, dropped)``, or ``None``.
  """
  choice = _choose_signs(sums, bits, fn, eps)
  combined, plain = _combine(sums, choice)
  outputs = [combined if preserve_norm else combined.astype(out_dtype)]
  if preserve_norm:
    outputs.append(plain)
  if count_dtype is not None:
    outputs.append(_drop_code(sums, choice, count_dtype))
  if materialize:
    outputs = list(_fusion.materialize(outputs))
  combined = outputs[0]
  if preserve_norm:
    combined = _rescale_to_norm(combined, outputs[1]).astype(out_dtype)
  counts = None if count_dtype is None else _count_drops(outputs[-1])
  return combined, counts


def _row_major(array: jax.Array) -> jax.Array:
  """``array`` in row-major layout: GradDrop reads every task slice in order.

  A batched (vmapped) backward pass can leave the per-task gradients in a
  transposed layout, which XLA:CPU would otherwise read with strides inside
  GradDrop's fused loop (measured 30x slower than one transposing copy).
  """
  if not isinstance(array, jax.core.Tracer):
    return array  # a concrete array already has its layout, row-major by default
  return with_layout_constraint(array, Layout(tuple(range(array.ndim))))


def _stacked_sums(
  leaves: Sequence[jax.Array], num_tasks: int, leak: jax.Array | None, *, with_counts: bool
) -> list[_TaskSums]:
  """The sums of stacked ``[T, ...]`` leaves, each shaped like its bits."""
  # Each leaf in the row-major [T, 4, n / 4] of its bits (_random.bits_shape).
  rows = [_row_major(leaf).reshape(num_tasks, *_work_shape(leaf, skip=1)) for leaf in leaves]
  dtypes = [_compute_dtype(r.dtype) for r in rows]
  count_dtype = _count_dtype(num_tasks) if with_counts else None
  init = [
    _zero_sums(
      r[0],
      r[0],
      dtype,
      per_task_leak=leak is not None,
      separate_signals=False,
      count_dtype=count_dtype,
    )
    for r, dtype in zip(rows, dtypes)
  ]

  def task_rows(start: Any, size: int) -> list[list[jax.Array]]:
    return [_task_slices(r, start, size, dtype) for r, dtype in zip(rows, dtypes)]

  return _sums_in_chunks(init, num_tasks, _BLOCK, task_rows, leak)


def _stats(
  counts: Sequence[tuple[jax.Array, jax.Array]], num_scalars: int, num_tasks: int
) -> GradDropStats:
  conflicts = jnp.sum(jnp.stack([c.astype(jnp.float32) for c, _ in counts]))
  dropped = jnp.sum(jnp.stack([d.astype(jnp.float32) for _, d in counts]))
  return GradDropStats(
    conflict_fraction=conflicts / max(num_scalars, 1),
    kept_fraction=1.0 - dropped / max(num_scalars * num_tasks, 1),
  )


def _finish_tree(
  sums: Sequence[_TaskSums],
  key: jax.Array,
  treedef: Any,
  shapes: Sequence[tuple[int, ...]],
  dtypes: Sequence[Any],
  num_tasks: int,
  fn: KeepFn,
  eps: Any,
  *,
  preserve_norm: bool,
  return_stats: bool,
  selected: Sequence[bool] | None = None,
) -> Any:
  """Finishes every leaf of a pytree from its sums (shared with streaming).

  Leaf ``i`` draws from ``fold_in(key, i)``; a leaf not ``selected`` gets the
  plain sum ``S+ + S-`` (and no diagnostics).
  """
  selected = [True] * len(sums) if selected is None else selected
  count_dtype = _count_dtype(num_tasks) if return_stats else None
  outputs, counts = [], []
  for leaf_sums, leaf_key, shape, dtype, chosen in zip(
    sums, _random.leaf_keys(key, len(sums)), shapes, dtypes, selected
  ):
    if not chosen:
      (plain,) = _fusion.materialize([(leaf_sums.positive + leaf_sums.negative).astype(dtype)])
      outputs.append(plain.reshape(shape))
      continue
    bits = _random.uniform_bits(leaf_key, leaf_sums.positive.shape)
    combined, leaf_counts = _finish(
      leaf_sums,
      bits,
      fn,
      eps,
      out_dtype=dtype,
      preserve_norm=preserve_norm,
      count_dtype=count_dtype,
      materialize=True,
    )
    outputs.append(combined.reshape(shape))
    if leaf_counts is not None:
      counts.append(leaf_counts)
  combined_tree = jax.tree_util.tree_unflatten(treedef, outputs)
  if not return_stats:
    return combined_tree
  num_scalars = sum(math.prod(shape) for shape, chosen in zip(shapes, selected) if chosen)
  return combined_tree, _stats(counts, num_scalars, num_tasks)


def _first_task(task_grads: Any) -> Any:
  """The task-0 slice of every leaf: a pytree shaped like the parameters."""
  return jax.tree.map(lambda g: jnp.asarray(g)[0], task_grads)


def graddrop(
  task_grads: Any,
  key: jax.Array,
  *,
  leak: Any = 0.0,
  keep: Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
  preserve_norm: bool = False,
  return_stats: bool = False,
  mask: Any = None,
) -> Any:
  """Combines per-task gradients with Gradient Sign Dropout.

  For every scalar, computes the sign purity ``P`` of the task gradients
  (eq. 1), keeps the positive ones with probability ``f(P)`` and otherwise
  the negative ones (eq. 2), and sums what is kept plus a leak of what is
  not (eq. 3)::

    P   = 1/2 (1 + sum_i g_i / (sum_i |g_i| + eps))
    M_i = [f(P) > U] [g_i > 0] + [f(P) <= U] [g_i < 0],   U ~ U[0, 1)
    out = sum_i (l_i + (1 - l_i) M_i) g_i

  Where all task gradients of a scalar share a sign (or are zero) there is
  nothing to pick and ``out`` is their plain sum, whatever ``f``. A NaN or
  Inf in any task gradient gives the plain sum there too, so it stays
  visible (e.g. to ``optax.apply_if_finite``).

  Scale invariance: with the default ``eps=0``, multiplying every task
  gradient by a power of two multiplies the output by it exactly, with the
  same masks (loss scaling, a mean instead of a sum over the batch, a common
  task weight do not change the method).

  Randomness: each leaf draws from ``fold_in(key, leaf_index)``; the same key
  gives the same masks with and without ``jax.jit`` and under ``jax.vmap``,
  and bit-identical outputs when ``leak`` is 0 (with a leak, XLA may fuse
  the weighted sums into FMAs under jit, which can change the last bit).
  ``U`` has 16-bit resolution, so a sign is kept with probability within
  ``2**-16`` of ``f(P)`` (exact at ``f = 0`` and ``f = 1``).

  Purity and sums are computed in float32 (float64 for float64 input); the
  output has the input's dtype. The output is materialised once, however
  many consumers read it.

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]`` with the
      same leading task axis ``T``.
    key: a PRNG key (``jax.random.key`` or legacy ``jax.random.PRNGKey``).
    leak: ``l_i`` in ``[0, 1]``, a scalar or one per task. ``l_i = 1`` passes
      task ``i`` through untouched (e.g. the target task in transfer
      learning).
    keep: the keep function ``f``: ``"linear"`` (default), ``"sigmoid"``,
      ``"random"`` (the fair-coin ablation) or a callable; see
      :func:`keep_fn`.
    scale: the slope ``k`` of ``"linear"`` and ``"sigmoid"``.
    eps: added to ``sum_i |g_i|`` in ``P``. The default 0 keeps GradDrop
      scale-invariant (all-zero entries have ``P = 1/2``); ``1e-7``
      reproduces lingvo and LibMTL, whose absolute epsilon pulls ``P``
      towards 1/2 for small gradients.
    preserve_norm: rescale each output leaf to the norm of the plain sum
      ``sum_i g_i`` of that leaf, so GradDrop does not change the step size.
    return_stats: also return :class:`GradDropStats`.
    mask: where to apply GradDrop, as in ``optax.masked``: a pytree of bools
      shaped like the parameters (or a prefix of it), or a callable returning
      one, called on the task-0 slice of ``task_grads``. Leaves where it is
      False get the plain sum ``sum_i g_i`` and do not count in the
      diagnostics; the others draw as they would without a mask. ``None``:
      every leaf.

  Returns:
    The combined gradients, a pytree like ``task_grads`` without the task
    axis; with ``return_stats``, a tuple ``(combined, stats)``.

  Raises:
    ValueError, TypeError: for inputs that do not fit the above, naming the
      argument (see the README's error table).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import graddrop
    >>> task_grads = {"w": jnp.array([[1.0, -2.0, 3.0], [2.0, 1.0, -1.0]])}
    >>> out = graddrop(task_grads, jax.random.key(0))
    >>> out["w"][0]  # both tasks positive: the plain sum
    Array(3., dtype=float32)
    >>> bool(out["w"][1] in (-2.0, 1.0))  # one sign kept
    True
  """
  num_tasks = _validation.check_task_grads(task_grads)
  key = _validation.check_key(key)
  leak_per_task = _validation.check_leak(leak, num_tasks)
  _validation.check_eps(eps)
  fn = keep_fn(keep, scale)

  selected = _validation.mask_leaves(mask, _first_task(task_grads))

  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  sums = _stacked_sums(leaves, num_tasks, leak_per_task, with_counts=return_stats)
  return _finish_tree(
    sums,
    key,
    treedef,
    [leaf.shape[1:] for leaf in leaves],
    [leaf.dtype for leaf in leaves],
    num_tasks,
    fn,
    eps,
    preserve_norm=preserve_norm,
    return_stats=return_stats,
    selected=selected,
  )


def sign_masks(
  task_grads: Any,
  key: jax.Array,
  *,
  keep: Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
) -> Any:
  """The masks ``M_i`` that :func:`graddrop` applies, for inspection.

  Same key and options as :func:`graddrop` give the masks it uses:
  ``graddrop(g, key) == sum_i M_i g_i`` (leak 0, finite ``g``). Unlike
  :func:`graddrop` this materialises a ``[T, ...]`` boolean per leaf, so use
  it to look at GradDrop, not to train with it. Zero entries get mask 1
  (keeping them changes nothing).

  Args:
    task_grads: as for :func:`graddrop`.
    key: as for :func:`graddrop`.
    keep: as for :func:`graddrop`.
    scale: as for :func:`graddrop`.
    eps: as for :func:`graddrop`.

  Returns:
    A pytree like ``task_grads`` of boolean masks of the same shapes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import sign_masks
    >>> masks = sign_masks(jnp.array([[1.0, 0.0], [2.0, -1.0]]), jax.random.key(0))
    >>> masks[:, 0]  # signs agree: both kept
    Array([ True,  True], dtype=bool)
  """
  num_tasks = _validation.check_task_grads(task_grads)
  key = _validation.check_key(key)
  _validation.check_eps(eps)
  fn = keep_fn(keep, scale)
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  sums = _stacked_sums(leaves, num_tasks, None, with_counts=False)
  masks = []
  for leaf, leaf_sums, leaf_key in zip(leaves, sums, _random.leaf_keys(key, len(leaves))):
    bits = _random.uniform_bits(leaf_key, leaf_sums.positive.shape)
    choice = _choose_signs(leaf_sums, bits, fn, eps)
    rows = leaf.reshape(num_tasks, *leaf_sums.positive.shape)
    keeps = jnp.where(choice.choose_positive, rows >= 0, rows <= 0)
    masks.append((~choice.conflict | keeps).reshape(leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, masks)
