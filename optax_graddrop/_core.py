"""Gradient Sign Dropout (GradDrop): purity, keep functions, masks, combine.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.

For per-task gradients ``g_1..g_T`` of one scalar:

* purity ``P = 1/2 (1 + sum_i g_i / (sum_i |g_i| + eps))``            (eq. 1)
* masks ``M_i = [f(P) > U] [g_i > 0] + [f(P) <= U] [g_i < 0]``        (eq. 2)
* output ``sum_i (l_i + (1 - l_i) M_i) g_i``, ``l_i`` the leak        (eq. 3)

with ``U ~ Uniform[0, 1)`` per scalar and ``f`` a monotone keep function.

Every function here works on whole leaves at once and never builds a
``[T, ...]`` temporary: the task axis is unrolled into sums of slices, which
XLA fuses into one pass over the input.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_graddrop import _random
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


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _task_slices(task_grad: jax.Array) -> list[jax.Array]:
  # Slices along the task axis fuse into one elementwise loop; a reduction
  # over axis 0 is many times slower on XLA:CPU.
  dtype = _compute_dtype(task_grad.dtype)
  return [task_grad[i].astype(dtype) for i in range(task_grad.shape[0])]


def _total(terms: Sequence[jax.Array]) -> jax.Array:
  return functools.reduce(operator.add, terms)


def _sign_sums(slices: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Sums of the positive and of the negative task entries."""
  positive = _total([jnp.maximum(s, 0) for s in slices])
  negative = _total([jnp.minimum(s, 0) for s in slices])
  return positive, negative


def _purity_from_sums(positive: jax.Array, negative: jax.Array, eps: float) -> jax.Array:
  return 0.5 * (1.0 + (positive + negative) / (positive - negative + eps))


def sign_purity(task_grads: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Gradient positive sign purity, elementwise (eq. 1 of the paper).

  ``P = 1/2 (1 + sum_i g_i / (sum_i |g_i| + eps))``, in ``[0, 1]``: 1 where
  every task gradient is positive, 0 where every one is negative.

  Args:
    task_grads: array of shape ``[T, ...]`` (task axis first).
    eps: keeps all-zero entries finite (their purity is 1/2).

  Returns:
    ``P`` of shape ``task_grads.shape[1:]``, in float32 (float64 for float64
    input).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import sign_purity
    >>> sign_purity(jnp.array([[1.0, 2.0], [3.0, -2.0]]))
    Array([1. , 0.5], dtype=float32)
  """
  _validation.check_task_grads(task_grads)
  return _purity_from_sums(*_sign_sums(_task_slices(jnp.asarray(task_grads))), eps)


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
  if callable(keep) or keep == "random":
    if scale != 1.0:
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
    "callable mapping purity to a keep probability."
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

  positive: jax.Array  # sum of the positive task entries
  negative: jax.Array  # sum of the negative task entries
  conflict: jax.Array  # both signs present (and finite): a sign is picked
  choose_positive: jax.Array  # [f(P) > U]


def _choose_signs(
  slices: Sequence[jax.Array],
  key: jax.Array,
  fn: KeepFn,
  eps: float,
  materialize_bits: bool = False,
) -> _SignChoice:
  positive, negative = _sign_sums(slices)
  purity = _purity_from_sums(positive, negative, eps)
  prob = _keep_probability(fn, purity).astype(purity.dtype)
  bits = _random.uniform_bits(key, purity.shape, materialize=materialize_bits)
  # U = bits / 2**16 < f  <=>  bits < 2**16 f, exact in float.
  choose_positive = bits.astype(purity.dtype) < prob * _random.SCALE
  # Where all signs agree there is nothing to pick: the whole sum passes
  # (P is 0 or 1 there; eps and keep functions with f(1) < 1 must not drop it).
  # A non-finite entry makes P NaN, which would drop a sign at random.
  conflict = (positive > 0) & (negative < 0) & jnp.isfinite(positive - negative)
  return _SignChoice(positive, negative, conflict, choose_positive)


class _LeafResult(NamedTuple):
  combined: jax.Array
  plain_sum: jax.Array
  conflicts: jax.Array
  dropped: jax.Array


def _graddrop_leaf(
  task_grad: jax.Array,
  key: jax.Array,
  leak: jax.Array | None,
  fn: KeepFn,
  eps: float,
  with_stats: bool,
) -> _LeafResult:
  slices = _task_slices(task_grad)
  choice = _choose_signs(slices, key, fn, eps)
  plain_sum = choice.positive + choice.negative
  if leak is None:
    kept_positive, kept_negative, leaked = choice.positive, choice.negative, None
  else:
    kept_positive, kept_negative = _sign_sums([(1 - rate) * s for rate, s in zip(leak, slices)])
    leaked = _total([rate * s for rate, s in zip(leak, slices)])
  combined = jnp.where(
    choice.conflict,
    jnp.where(choice.choose_positive, kept_positive, kept_negative),
    kept_positive + kept_negative,
  )
  if leaked is not None:
    combined = combined + leaked
  # Keep NaN/Inf visible: the plain sum wherever an entry is not finite.
  combined = jnp.where(jnp.isfinite(choice.positive - choice.negative), combined, plain_sum)

  if with_stats:
    num_dropped = _total(
      [jnp.where(choice.choose_positive, s < 0, s > 0).astype(jnp.int32) for s in slices]
    )
    dropped = jnp.sum(jnp.where(choice.conflict, num_dropped, 0))
    conflicts = jnp.sum(choice.conflict, dtype=jnp.int32)
  else:
    dropped = conflicts = jnp.zeros((), jnp.int32)
  return _LeafResult(combined, plain_sum, conflicts, dropped)


def _masks(choice: _SignChoice, signal: jax.Array) -> jax.Array:
  """``M_i`` for one task; a zero signal has no sign to drop and is kept."""
  return ~choice.conflict | jnp.where(choice.choose_positive, signal >= 0, signal <= 0)


def _combine_by_signal(
  grad_slices: Sequence[jax.Array],
  signal_slices: Sequence[jax.Array],
  key: jax.Array,
  leak: jax.Array | None,
  fn: KeepFn,
  eps: float,
) -> jax.Array:
  """Eq. 3 with the signs picked from ``signal_slices`` (e.g. batch-summed).

  The signals may have fewer elements than the gradients (reduced axes kept
  as size 1); their masks broadcast over the gradients.
  """
  # Marginalised signals are broadcast over the batch: have the bits computed
  # once rather than per batch element.
  broadcast = signal_slices[0].shape != grad_slices[0].shape
  choice = _choose_signs(signal_slices, key, fn, eps, materialize_bits=broadcast)
  terms = []
  for task, (grad, signal) in enumerate(zip(grad_slices, signal_slices)):
    dropped = jnp.zeros_like(grad) if leak is None else leak[task] * grad
    terms.append(jnp.where(_masks(choice, signal), grad, dropped))
  # A non-finite gradient makes its signal non-finite, hence no conflict
  # there: every mask is 1 and the NaN/Inf reaches the output.
  return _total(terms)


def _rescale_to_norm(combined: jax.Array, target: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(combined)))
  target_norm = jnp.sqrt(jnp.sum(jnp.square(target)))
  # A zero output stays zero (there is no direction to rescale).
  return combined * (target_norm / jnp.where(norm > 0, norm, 1.0))


def _stats(results: Sequence[_LeafResult], num_scalars: int, num_tasks: int) -> GradDropStats:
  conflicts = _total([r.conflicts.astype(jnp.float32) for r in results])
  dropped = _total([r.dropped.astype(jnp.float32) for r in results])
  return GradDropStats(
    conflict_fraction=conflicts / max(num_scalars, 1),
    kept_fraction=1.0 - dropped / max(num_scalars * num_tasks, 1),
  )


def graddrop(
  task_grads: Any,
  key: jax.Array,
  *,
  leak: Any = 0.0,
  keep: Keep = "linear",
  scale: float = 1.0,
  eps: float = 1e-7,
  preserve_norm: bool = False,
  return_stats: bool = False,
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

  Randomness: each leaf draws from ``fold_in(key, leaf_index)``; the same key
  gives the same masks with and without ``jax.jit`` and under ``jax.vmap``,
  and bit-identical outputs when ``leak`` is 0 (with a leak, XLA may fuse
  the weighted sums into FMAs under jit, which can change the last bit).
  ``U`` has 16-bit resolution, so a sign is kept with probability within
  ``2**-16`` of ``f(P)`` (exact at ``f = 0`` and ``f = 1``).

  Purity and sums are computed in float32 (float64 for float64 input); the
  output has the input's dtype.

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
    eps: added to ``sum_i |g_i|`` in ``P``.
    preserve_norm: rescale each output leaf to the norm of the plain sum
      ``sum_i g_i`` of that leaf, so GradDrop does not change the step size.
    return_stats: also return :class:`GradDropStats`.

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

  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  results = []
  for leaf, leaf_key in zip(leaves, _random.leaf_keys(key, len(leaves))):
    results.append(
      _graddrop_leaf(jnp.asarray(leaf), leaf_key, leak_per_task, fn, eps, return_stats)
    )

  outputs = []
  for leaf, result in zip(leaves, results):
    combined = result.combined
    if preserve_norm:
      combined = _rescale_to_norm(combined, result.plain_sum)
    outputs.append(combined.astype(jnp.result_type(leaf)))
  combined_tree = jax.tree_util.tree_unflatten(treedef, outputs)
  if not return_stats:
    return combined_tree
  num_scalars = sum(jnp.size(leaf) // num_tasks for leaf in leaves)
  return combined_tree, _stats(results, num_scalars, num_tasks)


def sign_masks(
  task_grads: Any,
  key: jax.Array,
  *,
  keep: Keep = "linear",
  scale: float = 1.0,
  eps: float = 1e-7,
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
  _validation.check_task_grads(task_grads)
  key = _validation.check_key(key)
  fn = keep_fn(keep, scale)
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  masks = []
  for leaf, leaf_key in zip(leaves, _random.leaf_keys(key, len(leaves))):
    slices = _task_slices(jnp.asarray(leaf))
    choice = _choose_signs(slices, leaf_key, fn, eps)
    masks.append(jnp.stack([_masks(choice, s) for s in slices]))
  return jax.tree_util.tree_unflatten(treedef, masks)
