"""Gradient accumulation for aggregators: ``optax.MultiSteps`` on per-task updates.

``optax.MultiSteps`` keeps a parameter-shaped accumulator, so it cannot wrap a
chain that starts with an aggregator (whose input carries a task axis).
:func:`multi_steps` accumulates the stacked per-task updates instead and
hands their mean to the chain every ``k`` micro-batches: GradDrop then sees
the per-task gradients of the whole batch, as without accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_graddrop import _layout
from optax_graddrop import _validation


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: micro-batches accumulated since the last update.
    gradient_step: updates made so far.
    inner_state: the wrapped transformation's state.
    acc_task_updates: the mean of the stacked per-task updates accumulated
      since the last update, shaped ``[T, *param.shape]``.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_state: Any
  acc_task_updates: Any


def _sharding(shape: jax.ShapeDtypeStruct) -> Any:
  """The sharding ``shape``'s type carries (Explicit mesh axes), else ``None``."""
  return shape.sharding if _layout.explicitly_sharded(shape) else None


def multi_steps(
  inner: optax.GradientTransformation,
  every_k_schedule: int | Callable[[jax.Array], jax.Array],
  num_tasks: int,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates stacked per-task updates over ``k`` micro-batches, then applies ``inner``.

  ``inner`` starts with an aggregator (e.g. ``optax.chain(graddrop_transform
  (0), optax.adam(1e-3))``). Every call adds the micro-batch's per-task
  updates ``[T, *param.shape]`` to a running mean; every ``k``-th call hands
  that mean to ``inner`` and returns its update, the others return zeros and
  leave ``inner``'s state (GradDrop's key included) untouched. With equal
  micro-batches and a loss that averages over the batch, the mean of the
  micro-batches' per-task gradients is the whole batch's, so the update is
  that of GradDrop on the whole batch with the same key (up to float
  rounding).

  Memory: the accumulator holds ``T x`` the parameters. The other order,
  ``optax.chain(graddrop_transform(0), optax.MultiSteps(optax.adam(1e-3),
  k).gradient_transformation())``, accumulates the aggregated updates (1x
  the parameters) but applies GradDrop to every micro-batch on its own,
  which is a different method: the signs are picked from each micro-batch's
  gradients.

  Args:
    inner: the transformation to apply to the accumulated per-task updates.
    every_k_schedule: ``k``, an int or a function of the number of updates
      so far (as in ``optax.MultiSteps``).
    num_tasks: ``T``, the size of the updates' leading task axis.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`MultiStepsState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_graddrop as ogd
    >>> tx = ogd.multi_steps(
    ...   optax.chain(ogd.graddrop_transform(0), optax.sgd(0.1)), every_k_schedule=2, num_tasks=2
    ... )
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> task_grads = jnp.array([[1.0, 2.0, -1.0], [3.0, 1.0, -2.0]])
    >>> updates, state = tx.update(task_grads, state, params)  # accumulates
    >>> updates
    Array([0., 0., 0.], dtype=float32)
    >>> updates, state = tx.update(task_grads, state, params)  # applies
    >>> updates
    Array([-0.4, -0.3,  0.3], dtype=float32)
  """
  num_tasks = _validation.check_num_tasks(num_tasks)
  if not callable(every_k_schedule) and (
    not _validation.is_int(every_k_schedule) or every_k_schedule < 1
  ):
    raise ValueError(
      f"`every_k_schedule` must be an int >= 1 or a function of the step; got {every_k_schedule!r}."
    )
  every_k = every_k_schedule if callable(every_k_schedule) else (lambda _: int(every_k_schedule))

  def init_fn(params: optax.Params) -> MultiStepsState:
    acc = jax.tree.map(lambda p: jnp.zeros((num_tasks, *jnp.shape(p)), jnp.result_type(p)), params)
    return MultiStepsState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
      acc_task_updates=acc,
    )

  def update_fn(
    task_updates: optax.Updates,
    state: MultiStepsState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, MultiStepsState]:
    if params is not None:
      _validation.check_stacked_like_params(task_updates, params)
    num_found = _validation.check_task_grads(task_updates, name="updates")
    if num_found != num_tasks:
      raise ValueError(f"`updates` have {num_found} tasks; `multi_steps` was made for {num_tasks}.")
    count = state.mini_step + 1
    acc = jax.tree.map(
      lambda a, u: (a + (u.astype(a.dtype) - a) / count.astype(a.dtype)).astype(a.dtype),
      state.acc_task_updates,
      task_updates,
    )
    emit = count >= every_k(state.gradient_step)

    def apply(acc: Any, inner_state: Any) -> tuple[Any, Any]:
      return inner.update(acc, inner_state, params, **extra_args)

    shapes, _ = jax.eval_shape(apply, acc, state.inner_state)
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    for (path, task_update), shape in zip(
      jax.tree_util.tree_leaves_with_path(task_updates), flat_shapes
    ):
      if shape.shape != jnp.shape(task_update)[1:]:
        raise ValueError(
          f"`inner` returned updates{jax.tree_util.keystr(path)} of shape {shape.shape} for "
          f"per-task updates of shape {jnp.shape(task_update)}; `multi_steps` needs an "
          "`inner` that starts with an aggregator (e.g. graddrop_transform), which "
          "removes the task axis."
        )

    def skip(acc: Any, inner_state: Any) -> tuple[Any, Any]:
      # Typed like apply's updates, sharding included (Explicit mesh axes).
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, out_sharding=_sharding(s)), shapes)
      return zeros, inner_state

    updates, inner_state = jax.lax.cond(emit, apply, skip, acc, state.inner_state)
    new_state = MultiStepsState(
      mini_step=jnp.where(emit, 0, count),
      gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step), state.gradient_step),
      inner_state=inner_state,
      acc_task_updates=jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc),
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
