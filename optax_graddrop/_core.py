"""Gradient Sign Dropout (GradDrop): what is computed, from per-element sums.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.

For per-task gradients ``g_1..g_T`` of one scalar:

* purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``                    (eq. 1)
* masks ``M_i = [f(P) > U] [g_i > 0] + [f(P) <= U] [g_i < 0]``        (eq. 2)
* output ``sum_i (l_i + (1 - l_i) M_i) g_i``, ``l_i`` the leak        (eq. 3)

with ``U ~ Uniform[0, 1)`` per scalar and ``f`` a monotone keep function.

Eqs. 1-3 touch the task gradients only through per-element sums over tasks
(``_sums.TaskSums``), so this module computes everything from those sums:
purity, the sign each scalar keeps, eq. 3, ``preserve_norm`` and the
diagnostics, elementwise and the same on every backend. How the sums are
formed (the backend's schedule, ``_sums``), where the uniforms come from
(``_random``) and how leaves are grouped into passes (``_layout``) are kept
apart; every entry point (``graddrop``, the streaming
``graddrop_value_and_grad``, ``fork``'s backward pass) builds the sums its
own way and finishes here.

Derivatives: the masks are piecewise constant in the gradients, so
``d out / d g_i = l_i + (1 - l_i) M_i`` (times the rescaling and its own
derivative with ``preserve_norm``). At a conflict, an entry that is exactly
zero is a kink whose one-sided derivatives are those of the two signs;
there the derivative is their mean, ``l_i + (1 - l_i) / 2`` (JAX's
convention for ``max`` and ``min`` at a tie).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_graddrop import _fusion
from optax_graddrop import _layout
from optax_graddrop import _random
from optax_graddrop import _static
from optax_graddrop import _sums
from optax_graddrop import _validation

KeepFn = Callable[[jax.Array], jax.Array]
Keep = Literal["linear", "sigmoid", "random"] | KeepFn


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
    ValueError: for an unknown name, a ``scale`` that is not finite, or a
      concrete ``scale`` other than 1 given with ``"random"`` or a callable.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import keep_fn
    >>> keep_fn("linear", scale=0.5)(jnp.array([0.0, 0.5, 1.0]))
    Array([0.25, 0.5 , 0.75], dtype=float32)
  """
  concrete_scale = _validation.check_scalar(scale, "scale")
  if concrete_scale is not None and not np.isfinite(concrete_scale):
    raise ValueError(f"`scale` must be finite; got {scale}.")
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


def _purity(positive: jax.Array, negative: jax.Array, eps: Any) -> jax.Array:
  """Eq. 1 from the sums: ``1/2 (1 + (S+ + S-) / (S+ - S- + eps))``.

  With ``eps = 0`` it depends only on ratios of the gradients, so scaling
  them all by a power of two leaves it bit for bit unchanged. An all-zero
  entry has purity 1/2.
  """
  denominator = positive - negative + eps
  ratio = (positive + negative) / jnp.where(denominator > 0, denominator, 1)
  return 0.5 * (1.0 + ratio)


class SignChoice(NamedTuple):
  """Which sign each scalar keeps."""

  conflict: jax.Array  # both signs present (and finite): a sign is picked
  choose_positive: jax.Array  # [f(P) > U]


def choose_signs(sums: _sums.TaskSums, bits: jax.Array, fn: KeepFn, eps: Any) -> SignChoice:
  """Eq. 2's decision, from the sums and 16-bit uniforms ``U = bits / 2**16``."""
  purity = _purity(sums.positive, sums.negative, eps)
  prob = _keep_probability(fn, purity).astype(purity.dtype)
  # U = bits / 2**16 < f  <=>  bits < 2**16 f, exact in float.
  choose_positive = bits.astype(purity.dtype) < prob * _random.SCALE
  # Where all signs agree there is nothing to pick: the whole sum passes
  # (P is 0 or 1 there; keep functions with f(1) < 1 must not drop it).
  # A non-finite entry makes P NaN, which would drop a sign at random.
  conflict = (sums.positive > 0) & (sums.negative < 0) & jnp.isfinite(sums.positive - sums.negative)
  return SignChoice(conflict, choose_positive)


def _combine(sums: _sums.TaskSums, choice: SignChoice) -> tuple[jax.Array, jax.Array]:
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


def _drop_code(sums: _sums.TaskSums, choice: SignChoice, dtype: Any) -> jax.Array:
  """Per element: 0 without a conflict, else 1 + the number of dropped entries."""
  assert sums.num_positive is not None and sums.num_negative is not None
  dropped = jnp.where(choice.choose_positive, sums.num_negative, sums.num_positive)
  return jnp.where(choice.conflict, dropped.astype(dtype) + 1, 0).astype(dtype)


def _count_drops(codes: Sequence[tuple[jax.Array, bool]]) -> tuple[jax.Array, jax.Array]:
  """``(conflicts, dropped entries)`` over every segment, as exact uint32 counts.

  The codes of unsharded segments are reduced together: one reduction
  instead of one per segment (each costs XLA a compilation), for a copy of
  one byte per element.
  """
  parts = [(code, True) for code, sharded in codes if sharded]
  flat = [code.reshape(-1) for code, sharded in codes if not sharded]
  if flat:
    parts.append((jnp.concatenate(flat) if len(flat) > 1 else flat[0], False))
  conflicts, total = jnp.zeros([], jnp.uint32), jnp.zeros([], jnp.uint32)
  for part, sharded in parts:
    part_total, part_conflicts = _sums.sum_all([part, part > 0], jnp.uint32, sharded=sharded)
    conflicts, total = conflicts + part_conflicts, total + part_total
  return conflicts, total - conflicts


def rescale_to_norm(combined: jax.Array, target: jax.Array, sharded: bool) -> jax.Array:
  """``combined * ||target|| / ||combined||`` (a zero ``combined`` stays zero).

  Each norm is taken of the array divided by its largest magnitude: squared
  as they are, entries beyond about ``1e19`` overflow float32 and entries
  below about ``1e-19`` underflow (XLA:CPU flushes them to zero), which made
  the result NaN or zero for gradients well within range.
  """
  # The norms do not depend on the divisors, so neither does the derivative.
  peaks = _sums.max_all([jnp.abs(combined), jnp.abs(target)], combined.dtype, sharded=sharded)
  peak, target_peak = (jax.lax.stop_gradient(jnp.where(p > 0, p, 1.0)) for p in peaks)
  norm_sq, target_norm_sq = _sums.sum_all(
    [jnp.square(combined / peak), jnp.square(target / target_peak)],
    combined.dtype,
    sharded=sharded,
  )
  ratio = (target_peak / peak) * (
    jnp.sqrt(target_norm_sq) / jnp.sqrt(jnp.where(norm_sq > 0, norm_sq, 1.0))
  )
  return combined * ratio


class Finished(NamedTuple):
  """A segment's results, computed in one pass and kept in memory."""

  combined: jax.Array  # eq. 3
  plain: jax.Array | None  # the plain sum, for preserve_norm
  code: jax.Array | None  # drop codes, for the diagnostics


def finish(
  sums: _sums.TaskSums,
  bits: jax.Array,
  fn: KeepFn,
  eps: Any,
  *,
  out_dtype: Any,
  preserve_norm: bool,
  count_dtype: Any = None,
  materialize: bool = True,
) -> Finished:
  """Eqs. 2-3 and the drop codes of one segment, from its sums.

  Args:
    sums: the segment's sums over all tasks.
    bits: 16-bit uniforms shaped like ``sums.positive``.
    fn: the keep function.
    eps: as for :func:`graddrop`.
    out_dtype: the dtype of ``combined`` (the compute dtype with
      ``preserve_norm``, which rescales it first).
    preserve_norm: also return the plain sum.
    count_dtype: return drop codes in this dtype (``None``: no codes).
    materialize: compute the results in one pass and keep them in memory
      (see ``_fusion``), so that their consumers do not recompute GradDrop.

  Returns:
    The segment's :class:`Finished`.
  """
  choice = choose_signs(sums, bits, fn, eps)
  combined, plain = _combine(sums, choice)
  outputs = [combined if preserve_norm else combined.astype(out_dtype)]
  if preserve_norm:
    outputs.append(plain)
  if count_dtype is not None:
    outputs.append(_drop_code(sums, choice, count_dtype))
  values = list(_fusion.materialize(outputs)) if materialize else outputs
  return Finished(
    combined=values[0],
    plain=values[1] if preserve_norm else None,
    code=values[-1] if count_dtype is not None else None,
  )


@functools.partial(
  jax.jit, static_argnames=("fn", "out_dtype", "preserve_norm", "count_dtype", "materialize")
)
def _finish_once(
  sums: _sums.TaskSums, bits: jax.Array, fn: _static.Static, eps: Any, **options: Any
) -> Finished:
  """:func:`finish`, jitted: a model's segments of one shape are traced and
  lowered once (XLA inlines the calls, so the compiled program is the same)."""
  return finish(sums, bits, fn.value, eps, **options)


def stats_from_codes(
  codes: Sequence[tuple[jax.Array, bool]], num_scalars: int, num_tasks: int
) -> GradDropStats:
  """:class:`GradDropStats` from drop codes (see :func:`finish`).

  Args:
    codes: ``(code, sharded)`` of every segment.
    num_scalars: the elements GradDrop decided on, over all segments.
    num_tasks: ``T``.
  """
  conflicts, dropped = (count.astype(jnp.float32) for count in _count_drops(codes))
  return GradDropStats(
    conflict_fraction=_ratio(conflicts, max(num_scalars, 1)),
    kept_fraction=1.0 - _ratio(dropped, max(num_scalars * num_tasks, 1)),
  )


def _ratio(count: jax.Array, total: int) -> jax.Array:
  """``count / total``, correctly rounded (exact when it is representable).

  XLA turns a division by a constant, or by a scalar broadcast over a
  batch (under ``vmap``), into a product with its rounded reciprocal, which
  reported 3,000,004 conflicts out of 3,000,004 as 0.99999994. So the
  denominator is computed elementwise from the count, which the barrier
  hides (XLA keeps ``x * 0`` of floats, which is NaN for an infinite ``x``).
  """
  count = jax.lax.optimization_barrier(count)
  return count / (count * 0.0 + jnp.float32(total))


def finish_tree(
  segments: Sequence[_layout.Segment],
  segment_sums: Sequence[_sums.TaskSums],
  total_calls: int,
  key: jax.Array,
  shapes: Sequence[tuple[int, ...]],
  dtypes: Sequence[Any],
  num_tasks: int,
  fn: KeepFn,
  eps: Any,
  *,
  preserve_norm: bool,
  return_stats: bool,
  plain: Mapping[int, jax.Array] | None = None,
) -> tuple[list[jax.Array], GradDropStats | None]:
  """Finishes every leaf of a pytree from its segments' sums.

  Args:
    segments: the segments (``_layout.plan``).
    segment_sums: each segment's sums over all tasks, shaped like it.
    total_calls: the calls of the tree's stream of uniforms.
    key: the PRNG key.
    shapes: every leaf's shape, in leaf order.
    dtypes: every leaf's dtype.
    num_tasks: ``T``.
    fn: the keep function.
    eps: as for :func:`graddrop`.
    preserve_norm: rescale each leaf to the norm of its plain sum.
    return_stats: also compute :class:`GradDropStats`.
    plain: the result of each leaf in no segment (a masked-out leaf's plain
      sum), by leaf index.

  Returns:
    ``(outputs, stats)``: one array per leaf in leaf order, and the
    diagnostics over the leaves in segments (``None`` without
    ``return_stats``).
  """
  count_dtype = _sums.count_dtype(num_tasks) if return_stats else None
  outputs: dict[int, jax.Array] = dict(plain or {})
  codes = []
  for segment, sums, bits in zip(segments, segment_sums, _layout.bits(key, segments, total_calls)):
    leaf_dtypes = {jnp.dtype(dtypes[i]) for i in segment.leaves}
    out_dtype = leaf_dtypes.pop() if len(leaf_dtypes) == 1 else sums.positive.dtype
    done = _finish_once(
      sums,
      bits,
      _static.Static(fn),
      eps,
      out_dtype=out_dtype,
      preserve_norm=preserve_norm,
      count_dtype=count_dtype,
    )
    combined = _layout.split(segment, done.combined, shapes)
    if done.plain is not None:
      targets = _layout.split(segment, done.plain, shapes)
      combined = [rescale_to_norm(c, t, segment.sharded) for c, t in zip(combined, targets)]
    for index, value in zip(segment.leaves, combined):
      outputs[index] = value.astype(dtypes[index])
    if done.code is not None:
      codes.append((done.code, segment.sharded))
  if not return_stats:
    return [outputs[i] for i in range(len(shapes))], None
  num_scalars = sum(math.prod(shapes[i]) for s in segments for i in s.leaves)
  return [outputs[i] for i in range(len(shapes))], stats_from_codes(codes, num_scalars, num_tasks)


def segment_sums(
  segments: Sequence[_layout.Segment],
  leaves: Sequence[jax.Array],
  leak: jax.Array | None,
  count_dtype: Any,
  sums: Sequence[_sums.TaskSums] | None = None,
) -> list[_sums.TaskSums]:
  """Adds ``[k, ...]`` leaves to their segments' sums (from zero by default),
  with the backend's schedule."""
  dtypes = [_sums.compute_dtype(jnp.result_type(*(leaves[i] for i in s.leaves))) for s in segments]
  rows = [_layout.segment_rows(s, leaves, dtype) for s, dtype in zip(segments, dtypes)]
  if sums is None:
    sums = [
      _sums.zeros(r[0], r[0], dtype, per_task_leak=leak is not None, counts=count_dtype)
      for r, dtype in zip(rows, dtypes)
    ]
  return _sums.add_tasks(sums, rows, leak)


def sign_purity(task_grads: jax.Array, eps: float = 0.0) -> jax.Array:
  """Gradient positive sign purity, elementwise (eq. 1 of the paper).

  ``P = 1/2 (1 + sum_i g_i / (sum_i |g_i| + eps))``, in ``[0, 1]``: 1 where
  every task gradient is positive, 0 where every one is negative, 1/2 where
  all are zero (NaN where ``sum_i |g_i|`` overflows the dtype, as it does
  for non-finite gradients).

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
  sharded = _layout.explicitly_sharded(task_grads)
  rows = task_grads if sharded else task_grads.reshape(num_tasks, -1)
  dtype = _sums.compute_dtype(rows.dtype)
  (sums,) = _sums.add_tasks(
    [_sums.zeros(rows[0], rows[0], dtype, per_task_leak=False)], [rows], None
  )
  return _purity(sums.positive, sums.negative, eps).reshape(task_grads.shape[1:])
