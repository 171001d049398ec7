"""Per-task loss weighting that composes with any aggregator.

Weighting a task's loss by ``w_i`` weights its gradient by ``w_i``, so every
method here ends in weighted per-task losses or gradients that any aggregator
(:func:`graddrop`, :func:`pcgrad`, ``fork``, the plain sum...) takes as is:

    ogd.graddrop(ogd.weight_tasks(task_grads, weights), key)
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_graddrop import _validation


def weight_tasks(task_grads: Any, weights: jax.Array) -> Any:
  """Scales task ``i``'s slice of every leaf by ``weights[i]``.

  The gradients of the weighted losses ``w_i L_i``, from the gradients of the
  ``L_i``.

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]``.
    weights: real numbers (float or int), shape ``(T,)``.

  Returns:
    The weighted pytree, same shapes and dtypes.

  Raises:
    ValueError: if ``weights`` does not have shape ``(T,)``.
    TypeError: if ``weights`` is not real (bool or complex, say).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import weight_tasks
    >>> weight_tasks(jnp.ones((2, 3)), jnp.array([0.5, 2.0]))
    Array([[0.5, 0.5, 0.5],
           [2. , 2. , 2. ]], dtype=float32)
  """
  num_tasks = _validation.check_task_grads(task_grads)
  if jnp.shape(weights) != (num_tasks,):
    raise ValueError(
      f"`weights` must have shape ({num_tasks},), one per task; got {jnp.shape(weights)}."
    )
  weights = _validation.real_array(weights, "weights")

  def scale(g: jax.Array) -> jax.Array:
    w = weights.reshape((num_tasks,) + (1,) * (g.ndim - 1))
    return (g * w).astype(g.dtype)

  return jax.tree.map(scale, task_grads)


def uncertainty_weighted_losses(losses: jax.Array, log_variances: jax.Array) -> jax.Array:
  """Uncertainty weighting (Kendall et al., 2018): ``L_i exp(-s_i) + s_i``.

  ``s_i = log sigma_i^2`` is a learnable per-task parameter trained with the
  model: a noisier task (larger loss at the optimum) gets a larger ``s_i``
  and so a smaller weight ``exp(-s_i)``; for a fixed ``L_i`` the optimum is
  ``s_i = log L_i``. Returns the vector of weighted task losses, for
  :func:`per_task_value_and_grad` (then any aggregator) or for a sum
  through ``fork``.

  Args:
    losses: real numbers, shape ``(T,)``.
    log_variances: the parameters ``s``, real numbers of shape ``(T,)``
      (initialise at 0).

  Returns:
    The weighted losses, shape ``(T,)``.

  Raises:
    ValueError: if the two do not both have shape ``(T,)``.
    TypeError: if either is not real (bool or complex, say).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import uncertainty_weighted_losses
    >>> uncertainty_weighted_losses(jnp.array([1.0, 4.0]), jnp.log(jnp.array([1.0, 4.0])))
    Array([1.       , 2.3862944], dtype=float32)

  References:
    Kendall, Gal & Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
  """
  losses = _validation.real_array(losses, "losses")
  log_variances = _validation.real_array(log_variances, "log_variances")
  if losses.ndim != 1 or log_variances.shape != losses.shape:
    raise ValueError(
      "`losses` and `log_variances` must both have shape (T,); got "
      f"{losses.shape} and {log_variances.shape}."
    )
  return losses * jnp.exp(-log_variances) + log_variances


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    weights: the task weights ``w``, shape ``(T,)``, summing to ``T``.
    initial_losses: ``L_i(0)``, each task's first positive loss; 0 for a
      task that has not had one yet.
    count: number of updates so far.
    optimizer_state: the state of the optimizer of the weights.
  """

  weights: jax.Array
  initial_losses: jax.Array
  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  optimizer_state: optax.OptState


class GradNorm(NamedTuple):
  """GradNorm's ``init`` and ``update``; see :func:`gradnorm`."""

  init: Any
  update: Any


def gradnorm(
  num_tasks: int,
  alpha: float = 1.5,
  optimizer: optax.GradientTransformation | None = None,
) -> GradNorm:
  """GradNorm (Chen et al., 2018): weights that balance gradient norms.

  At a chosen shared layer ``W``, with ``G_i = w_i |grad_W L_i|`` and the
  relative inverse training rate ``r_i = (L_i / L_i(0)) / mean_j(L_j /
  L_j(0))``, GradNorm moves ``w`` down the gradient of

      sum_i | G_i - mean_j(G_j) r_i^alpha |      (the target held constant)

  and renormalises ``w`` to sum to ``T``. ``alpha`` sets how strongly tasks
  that train slower are pushed (0: equal weighted gradient norms).

  ``L_i(0)`` is task ``i``'s first positive loss, usually its loss at the
  first update. A task whose loss is not positive yet (e.g. 0: a masked
  loss over a batch without labels for it) has ``L_i / L_i(0) = 1`` until
  its loss is positive, and that loss becomes its ``L_i(0)``; where every
  ratio is 0 (all losses trained down to 0), every ``r_i`` is 1. So the
  weights stay finite. The losses are expected to be non-negative, as in
  the paper.

  Usage, with per-task gradients (``layer`` picks ``W``'s leaves)::

    weighted = ogd.weight_tasks(task_grads, gn_state.weights)  # this step
    gn_state = gn.update(gn_state, losses, layer(task_grads))  # next weights
    updates, opt_state = tx.update(weighted, opt_state, params)  # any aggregator

  Args:
    num_tasks: ``T``.
    alpha: the asymmetry ``alpha`` (the paper uses 0.12 to 3; 1.5 often).
    optimizer: updates the weights; default ``optax.adam(0.025)`` as in the
      paper.

  Returns:
    A :class:`GradNorm` with ``init() -> GradNormState`` and
    ``update(state, losses, layer_task_grads) -> GradNormState``, where
    ``layer_task_grads`` are the UNweighted per-task gradients of ``W``
    (a pytree with a leading task axis).

  Raises:
    ValueError: if ``num_tasks`` is not an int ``>= 1``; from ``update``, if
      the losses or layer gradients are not for ``num_tasks`` tasks.
    TypeError: from ``update``, if the losses are not real numbers or a
      layer gradient is not a real float array.

  References:
    Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
    ICML 2018.
  """
  num_tasks = _validation.check_num_tasks(num_tasks)
  weight_optimizer = optax.adam(0.025) if optimizer is None else optimizer

  def init() -> GradNormState:
    weights = jnp.ones((num_tasks,), jnp.float32)
    return GradNormState(
      weights=weights,
      initial_losses=jnp.zeros((num_tasks,), jnp.float32),
      count=jnp.zeros([], jnp.int32),
      optimizer_state=weight_optimizer.init(weights),
    )

  def update(state: GradNormState, losses: jax.Array, layer_task_grads: Any) -> GradNormState:
    found = _validation.check_task_grads(layer_task_grads, name="layer_task_grads")
    losses = _validation.real_array(losses, "losses").astype(jnp.float32)
    if found != num_tasks or losses.shape != (num_tasks,):
      raise ValueError(
        f"GradNorm was built for {num_tasks} tasks; got losses of shape {losses.shape} "
        f"and layer gradients for {found} tasks."
      )
    as_float32 = jax.tree.map(lambda g: g.astype(jnp.float32), layer_task_grads)
    grad_norms = jax.vmap(optax.tree.norm)(as_float32)
    # L_i(0) is the first positive loss (NaN is not recorded); until then the ratio is 1.
    recorded = state.initial_losses > 0
    initial = jnp.where(recorded, state.initial_losses, jnp.where(losses > 0, losses, 0))
    known = initial > 0
    ratios = jnp.where(known, losses / jnp.where(known, initial, 1), 1)
    mean_ratio = jnp.mean(ratios)
    trained = mean_ratio > 0  # else every loss is 0: equal rates
    inverse_rates = jnp.where(trained, ratios / jnp.where(trained, mean_ratio, 1), 1)
    weighted_norms = state.weights * grad_norms
    target = jax.lax.stop_gradient(jnp.mean(weighted_norms) * inverse_rates**alpha)
    # d/dw_i of sum_i |w_i n_i - target_i|.
    weight_grads = jnp.sign(weighted_norms - target) * grad_norms
    updates, optimizer_state = weight_optimizer.update(
      weight_grads, state.optimizer_state, state.weights
    )
    weights = jnp.maximum(optax.apply_updates(state.weights, updates), 1e-6)
    return GradNormState(
      weights=weights * num_tasks / jnp.sum(weights),
      initial_losses=initial,
      count=optax.safe_increment(state.count),
      optimizer_state=optimizer_state,
    )

  return GradNorm(init, update)
