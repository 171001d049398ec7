"""GradDrop over stacked per-task gradients: :func:`graddrop` and :func:`sign_masks`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_graddrop import _core
from optax_graddrop import _layout
from optax_graddrop import _row_major
from optax_graddrop import _static
from optax_graddrop import _sums
from optax_graddrop import _validation
from optax_graddrop._core import Keep


def first_task(task_grads: Any) -> Any:
  """The task-0 slice of every leaf: a pytree shaped like the parameters."""
  return jax.tree.map(lambda g: jnp.asarray(g)[0], task_grads)


def _plan(leaves: list[jax.Array], selected: list[bool] | None = None) -> Any:
  return _layout.plan(
    [leaf.shape[1:] for leaf in leaves],
    [_sums.compute_dtype(leaf.dtype) for leaf in leaves],
    [_layout.explicitly_sharded(leaf) for leaf in leaves],
    selected,
  )


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

  Randomness: the uniforms of all leaves are one stream drawn from ``key``
  (leaf after leaf, see ``optax_graddrop._random``), so an element's ``U``
  depends only on the key, the sizes of the leaves before it and its index:
  the same key gives the same masks with and without ``jax.jit``, stacked
  or streamed (:func:`graddrop_value_and_grad`), sharded or not and on every
  backend (for threefry keys; see the semantics guide for ``rbg``). The sums
  over tasks are formed in task order on CPU and as reductions on GPU/TPU,
  so outputs agree across backends within float rounding (exactly when the
  sums are exact), and the masks agree except where ``P`` lies within
  rounding of a keep threshold. ``U`` has 16-bit resolution, so a sign is
  kept with probability within ``2**-16`` of ``f(P)`` (exact at ``f = 0``
  and ``f = 1``).

  Derivatives: ``d out / d g_i = l_i + (1 - l_i) M_i`` (the masks are
  piecewise constant), in reverse and forward mode.

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
      argument (see the table in ``docs/guide/errors.md``).

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
  _validation.check_concrete_shapes(task_grads, name="task_grads")
  key = _validation.check_key(key)
  leak_per_task = _validation.check_leak(leak, num_tasks)
  _validation.check_eps(eps)
  _validation.check_flags(preserve_norm=preserve_norm, return_stats=return_stats)
  _core.keep_fn(keep, scale)
  selected = tuple(_validation.mask_leaves(mask, first_task(task_grads)))
  return _graddrop(
    task_grads,
    key,
    leak_per_task,
    scale,
    eps,
    keep=_static.Static(keep),
    preserve_norm=preserve_norm,
    return_stats=return_stats,
    selected=selected,
  )


# Jitted (options static), so that an eager call does not dispatch GradDrop
# op by op, nor trace and compile its task loops, every time.
@functools.partial(jax.jit, static_argnames=("keep", "preserve_norm", "return_stats", "selected"))
def _graddrop(
  task_grads: Any,
  key: jax.Array,
  leak: jax.Array | None,
  scale: Any,
  eps: Any,
  *,
  keep: _static.Static,
  preserve_norm: bool,
  return_stats: bool,
  selected: tuple[bool, ...],
) -> Any:
  """:func:`graddrop` of checked arguments."""
  fn = _core.keep_fn(keep.value, scale)
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  leaves = [_row_major.row_major(leaf) for leaf in leaves]
  num_tasks = leaves[0].shape[0]
  segments, total_calls = _plan(leaves, list(selected))
  count_dtype = _sums.count_dtype(num_tasks) if return_stats else None
  sums = _core.segment_sums(segments, leaves, leak, count_dtype)
  plain = {
    index: _sums.weighted_sum(leaf) for index, leaf in enumerate(leaves) if not selected[index]
  }
  outputs, stats = _core.finish_tree(
    segments,
    sums,
    total_calls,
    key,
    [leaf.shape[1:] for leaf in leaves],
    [leaf.dtype for leaf in leaves],
    num_tasks,
    fn,
    eps,
    preserve_norm=preserve_norm,
    return_stats=return_stats,
    plain=plain,
  )
  combined = jax.tree_util.tree_unflatten(treedef, outputs)
  return (combined, stats) if return_stats else combined


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
  _validation.check_task_grads(task_grads)
  _validation.check_concrete_shapes(task_grads, name="task_grads")
  key = _validation.check_key(key)
  _validation.check_eps(eps)
  _core.keep_fn(keep, scale)
  return _sign_masks(task_grads, key, scale, eps, keep=_static.Static(keep))


@functools.partial(jax.jit, static_argnames=("keep",))
def _sign_masks(
  task_grads: Any, key: jax.Array, scale: Any, eps: Any, *, keep: _static.Static
) -> Any:
  """:func:`sign_masks` of checked arguments (jitted, as :func:`_graddrop`)."""
  fn = _core.keep_fn(keep.value, scale)
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  segments, total_calls = _plan(leaves)
  sums = _core.segment_sums(segments, leaves, None, None)
  shapes = [leaf.shape[1:] for leaf in leaves]
  masks: dict[int, jax.Array] = {}
  for segment, segment_sums, bits in zip(segments, sums, _layout.bits(key, segments, total_calls)):
    choice = _core.choose_signs(segment_sums, bits, fn, eps)
    conflicts = _layout.split(segment, choice.conflict, shapes)
    positives = _layout.split(segment, choice.choose_positive, shapes)
    for index, conflict, positive in zip(segment.leaves, conflicts, positives):
      keeps = jnp.where(positive, leaves[index] >= 0, leaves[index] <= 0)
      masks[index] = ~conflict | keeps
  return jax.tree_util.tree_unflatten(treedef, [masks[i] for i in range(len(leaves))])
