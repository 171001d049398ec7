"""Parameter-level GradDrop without the ``[T, ...]`` stack: streaming over tasks.

Eqs. 1-3 need only per-element sums over tasks, so the
per-task gradients can be added to running sums as the backward passes
produce them, ``chunk_size`` tasks at a time, and GradDrop finished from the
sums: ``O(params)`` memory whatever the number of tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_graddrop import _core
from optax_graddrop import _layout
from optax_graddrop import _per_task
from optax_graddrop import _row_major
from optax_graddrop import _sums
from optax_graddrop import _validation


def graddrop_value_and_grad(
  fun: Callable[..., Any],
  key: jax.Array,
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
  chunk_size: int | None = None,
  leak: Any = 0.0,
  keep: _core.Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
  preserve_norm: bool = False,
  return_stats: bool = False,
  mask: Any = None,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad``, with GradDrop combining the task gradients.

  ``fun`` returns a vector of ``T`` task losses. The returned function
  computes them with one forward pass, runs the per-task backward passes
  ``chunk_size`` tasks per batched pass in a loop (on CPU, a model with
  convolutions one task per pass, see :func:`per_task_value_and_grad`),
  adds each task's gradient to per-element running sums (the
  sums of its positive and negative entries, and their counts), and
  finishes GradDrop (paper eqs. 1-3) from the sums::

    P   = 1/2 (1 + sum_i g_i / sum_i |g_i|)
    M_i = [f(P) > U] [g_i > 0] + [f(P) <= U] [g_i < 0]
    out = sum_i (l_i + (1 - l_i) M_i) g_i

  It never builds the ``[T, ...]`` stack of :func:`per_task_value_and_grad`:
  with ``chunk_size=1`` its memory is that of one backward pass plus
  parameter-sized running sums (two, four with a leak, which the loop over
  tasks may hold twice), whatever ``T`` (on CPU, a model with convolutions
  needs more, also whatever ``T``: 1.7x a plain backward pass on the
  benchmark conv net; see the scale guide's "What ``chunk_size`` costs").
  With the same key and options,
  the result equals ``graddrop`` of the stacked per-task gradients
  (statistics included): exactly when the per-task gradients are, within
  float rounding otherwise, for every ``chunk_size``.

  Call it inside the training step with that step's key, as you would
  ``jax.value_and_grad``.

  Args:
    fun: function whose output is a 1-D float vector of the ``T`` task losses
      (or ``(losses, aux)`` with ``has_aux``).
    key: a PRNG key for this call; use a fresh one every step.
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    chunk_size: the most tasks per backward pass, which bounds memory to
      ``chunk_size`` copies of the backward intermediates; ``None`` for no
      bound (one batched pass over all tasks).
    leak: as for :func:`graddrop`.
    keep: as for :func:`graddrop`.
    scale: as for :func:`graddrop`.
    eps: as for :func:`graddrop`.
    preserve_norm: as for :func:`graddrop`.
    return_stats: also return :class:`GradDropStats`.
    mask: as for :func:`graddrop`, matched to the differentiated argument(s)
      by key path; leaves where it is False get the plain sum of their task
      gradients (and do not count in the diagnostics).

  Returns:
    A function with ``fun``'s signature returning ``(losses, grads)``,
    ``((losses, aux), grads)`` with ``has_aux``, and ``stats`` appended with
    ``return_stats``. ``grads`` is shaped like the differentiated argument(s)
    (a tuple of them when ``argnums`` is a sequence).

  Raises:
    ValueError, TypeError: for options that do not fit the above, or a
      ``fun`` that does not return a 1-D float vector.
    TypeError: a differentiated leaf that is not a real float array (e.g. an
      NNX model's rng key); the message says what to pass.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_graddrop as ogd
    >>> def task_losses(w):
    ...   return jnp.stack([jnp.sum((w - 1.0) ** 2), jnp.sum((w + 1.0) ** 2)])
    >>> step = ogd.graddrop_value_and_grad(task_losses, jax.random.key(0), chunk_size=1)
    >>> losses, grads = step(jnp.array([2.0, 0.0]))
    >>> grads  # entry 0: both tasks agree, their sum; entry 1: one sign (-2 or 2) kept
    Array([8., 2.], dtype=float32)

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  key = _validation.check_key(key)
  chunk_size = _per_task.check_chunk_size(chunk_size)
  _validation.check_eps(eps)
  _validation.check_flags(preserve_norm=preserve_norm, return_stats=return_stats)
  fn = _core.keep_fn(keep, scale)

  def value_and_graddrop(*args: Any, **kwargs: Any) -> Any:
    losses, grad_of, aux = _per_task.task_vjp(fun, argnums, has_aux, args, kwargs)
    num_tasks = losses.shape[0]
    leak_per_task = _validation.check_leak(leak, num_tasks)
    primal = _per_task.differentiated(args, argnums)
    selected = _validation.mask_leaves(mask, primal)
    leaves, treedef = jax.tree_util.tree_flatten(primal)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    for i in _per_task.argnum_tuple(argnums):
      _validation.check_concrete_shapes(args[i], name=f"args[{i}]")
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    segments, total_calls = _layout.plan(
      shapes,
      [_sums.compute_dtype(dtype) for dtype in dtypes],
      [_layout.explicitly_sharded(leaf) for leaf in leaves],
      selected,
    )
    count_dtype = _sums.count_dtype(num_tasks) if return_stats else None

    def add_chunk(acc: Any, grads: Any, start: Any, size: int, in_loop: bool) -> Any:
      sums, plain = acc
      rows = [_row_major.row_major(g) for g in jax.tree_util.tree_leaves(grads)]
      chunk_leak = (
        None if leak_per_task is None else jax.lax.dynamic_slice_in_dim(leak_per_task, start, size)
      )
      sums = _core.segment_sums(segments, rows, chunk_leak, count_dtype, sums)
      # Leaves outside the mask: the plain sum of their task gradients.
      plain = {i: _sums.add_weighted(p, rows[i]) for i, p in plain.items()}
      if in_loop:
        # A loop carry is in memory anyway: have all its fields computed in one pass.
        sums = [_sums.materialized(s) for s in sums]
      return sums, plain

    init = [
      _sums.zeros(
        zeros,
        zeros,
        zeros.dtype,
        per_task_leak=leak_per_task is not None,
        counts=count_dtype,
      )
      for zeros in _segment_zeros(segments, leaves)
    ]
    plain = {
      i: jnp.zeros(shapes[i], _sums.compute_dtype(dtypes[i]))
      for i, chosen in enumerate(selected)
      if not chosen
    }
    sums, plain = _per_task.fold_task_grads(
      grad_of, num_tasks, losses.dtype, chunk_size, (init, plain), add_chunk
    )
    outputs, stats = _core.finish_tree(
      segments,
      sums,
      total_calls,
      key,
      shapes,
      dtypes,
      num_tasks,
      fn,
      eps,
      preserve_norm=preserve_norm,
      return_stats=return_stats,
      plain={i: p.astype(dtypes[i]) for i, p in plain.items()},
    )
    grads = jax.tree_util.tree_unflatten(treedef, outputs)
    value = (losses, aux) if has_aux else losses
    return (value, grads, stats) if return_stats else (value, grads)

  return value_and_graddrop


def _segment_zeros(segments: Sequence[_layout.Segment], leaves: Sequence[Any]) -> list[jax.Array]:
  """Zeros shaped (and, for an explicitly sharded leaf, sharded) like each
  segment, in its compute dtype."""
  zeros = []
  for segment in segments:
    members = [leaves[i] for i in segment.leaves]
    dtype = _sums.compute_dtype(jnp.result_type(*members))
    if segment.sharded:
      zeros.append(jnp.zeros_like(members[0], dtype))
    else:
      zeros.append(jnp.zeros(segment.shape, dtype))
  return zeros
