"""Baseline aggregators over stacked per-task gradients, for comparisons.

Each takes a pytree whose leaves carry a leading task axis ``T`` (like
:func:`graddrop`) and returns the pytree without it. PCGrad and MGDA use
inner products over the WHOLE pytree (all leaves jointly), as the original
methods do over the flattened shared parameters; both work on the ``T x T``
Gram matrix, so their cost beyond the Gram matrix does not grow with the
number of parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from optax.experimental import aggregating

from optax_graddrop import _graddrop
from optax_graddrop import _layout
from optax_graddrop import _sums
from optax_graddrop import _transform
from optax_graddrop import _validation

# Inner products computed per pass over the task gradients: more would not
# fit in registers (measured on XLA:CPU).
_PRODUCTS_PER_PASS = 16


def _gram(task_grads: Any) -> jax.Array:
  """``G[i, j] = <g_i, g_j>`` over all leaves, in float32 or wider.

  Computed as fused sums of elementwise products (``_PRODUCTS_PER_PASS``
  per pass over the gradients); XLA:CPU's matrix product ``g @ g.T`` of a
  ``[T, N]`` stack is many times slower.
  """
  leaves = jax.tree.leaves(task_grads)
  num_tasks = leaves[0].shape[0]
  rows = [g if _layout.explicitly_sharded(g) else g.reshape(num_tasks, -1) for g in leaves]
  dtype = _sums.compute_dtype(jnp.result_type(*leaves))
  pairs = [(i, j) for i in range(num_tasks) for j in range(i, num_tasks)]
  inner: dict[tuple[int, int], jax.Array] = {}
  for start in range(0, len(pairs), _PRODUCTS_PER_PASS):
    group = pairs[start : start + _PRODUCTS_PER_PASS]
    for r in rows:
      products = [r[i].astype(dtype) * r[j].astype(dtype) for i, j in group]
      for pair, total in zip(group, _sums.sum_all(products, dtype, sharded=_layout.explicitly_sharded(r))):
        inner[pair] = inner[pair] + total if pair in inner else total
  return jnp.stack(
    [jnp.stack([inner[min(i, j), max(i, j)] for j in range(num_tasks)]) for i in range(num_tasks)]
  )


def _weighted_sum(task_grads: Any, weights: jax.Array | None = None) -> Any:
  """``sum_i w_i g_i`` per leaf (``w = 1`` by default), in the leaf's dtype."""
  return jax.tree.map(lambda g: _sums.weighted_sum(g, weights), task_grads)


def _combine_masked(task_grads: Any, mask: Any, weights_of: Any) -> Any:
  """``sum_i w_i g_i`` on the leaves ``mask`` selects, ``w = weights_of(Gram)``
  from their inner products; the plain sum on the others."""
  selected = _validation.mask_leaves(mask, _graddrop.first_task(task_grads))
  leaves, treedef = jax.tree_util.tree_flatten(task_grads)
  chosen = [leaf for leaf, keep in zip(leaves, selected) if keep]
  weights = weights_of(_gram(chosen)) if chosen else None
  return jax.tree_util.tree_unflatten(
    treedef,
    [_sums.weighted_sum(leaf, weights if keep else None) for leaf, keep in zip(leaves, selected)],
  )


def sum_tasks(task_grads: Any) -> Any:
  """The plain sum ``sum_i g_i``: the gradient of the summed loss.

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]``.

  Returns:
    The pytree of sums, without the task axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import sum_tasks
    >>> sum_tasks(jnp.array([[1.0, 2.0], [3.0, -4.0]]))
    Array([ 4., -2.], dtype=float32)
  """
  _validation.check_task_grads(task_grads)
  return _weighted_sum(task_grads)


def mean_tasks(task_grads: Any) -> Any:
  """The mean ``1/T sum_i g_i``: the gradient of the mean loss (see :func:`sum_tasks`).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import mean_tasks
    >>> mean_tasks(jnp.array([[1.0, 2.0], [3.0, -4.0]]))
    Array([ 2., -1.], dtype=float32)
  """
  num_tasks = _validation.check_task_grads(task_grads)
  return _weighted_sum(task_grads, jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))


def pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad's result as weights on the original task gradients.

  Every projected ``g_i'`` is a linear combination ``sum_k A[i, k] g_k`` of
  the originals, so PCGrad runs on the Gram matrix alone: projecting ``g_i'``
  off a conflicting ``g_j`` subtracts ``(<g_i', g_j> / |g_j|^2) e_j`` from
  ``A[i]``. The output ``sum_i g_i'`` is ``sum_k w_k g_k`` with ``w = 1^T A``.

  Args:
    gram: the ``T x T`` Gram matrix of the task gradients.
    key: draws, for every task, a random order of the other tasks.

  Returns:
    The weights ``w`` of shape ``(T,)``.
  """
  num_tasks = gram.shape[0]
  keys = jax.random.split(key, num_tasks)
  coefficients = jnp.eye(num_tasks, dtype=gram.dtype)
  for i in range(num_tasks):
    others = jnp.array([j for j in range(num_tasks) if j != i], jnp.int32)
    order = jax.random.permutation(keys[i], others) if num_tasks > 1 else others
    row = coefficients[i]
    for step in range(num_tasks - 1):
      j = order[step]
      dot = row @ gram[:, j]
      norm_sq = gram[j, j]
      # Project only on a real conflict with a non-zero gradient.
      factor = jnp.where((dot < 0) & (norm_sq > 0), dot / jnp.where(norm_sq > 0, norm_sq, 1), 0)
      row = row - factor * jax.nn.one_hot(j, num_tasks, dtype=gram.dtype)
    coefficients = coefficients.at[i].set(row)
  return coefficients.sum(0)


def pcgrad(task_grads: Any, key: jax.Array, *, mask: Any = None) -> Any:
  """PCGrad (Yu et al., 2020): project away conflicting components, then sum.

  For each task ``i``, in a random order of the other tasks ``j`` (drawn from
  ``key``), ``g_i' <- g_i' - (<g_i', g_j> / |g_j|^2) g_j`` whenever
  ``<g_i', g_j> < 0``; the result is ``sum_i g_i'``. Inner products are
  over the whole pytree. Gradients without conflicts pass unchanged (their
  sum).

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]``.
    key: a PRNG key for the projection orders.
    mask: as for :func:`graddrop`: PCGrad on the leaves where it is True
      (inner products over those alone), the plain sum on the others.

  Returns:
    The combined gradient, without the task axis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import pcgrad
    >>> pcgrad(jnp.array([[1.0, 0.0], [-1.0, 1.0]]), jax.random.key(0))
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  _validation.check_task_grads(task_grads)
  key = _validation.check_key(key)
  return _combine_masked(task_grads, mask, lambda gram: pcgrad_weights(gram, key))


def mgda_weights(gram: jax.Array, num_iterations: int = 100) -> jax.Array:
  """Weights of the minimum-norm point of the convex hull of the gradients.

  Minimises ``w^T G w`` over the simplex: the closed form for two tasks;
  otherwise Frank-Wolfe with exact line search (Sener & Koltun 2018's
  solver) from the best pair of tasks.

  Args:
    gram: the ``T x T`` Gram matrix of the task gradients.
    num_iterations: Frank-Wolfe iterations for ``T > 2``.

  Returns:
    The weights ``w`` of shape ``(T,)``, non-negative and summing to 1.
  """
  num_tasks = gram.shape[0]

  def segment_min(aa: Any, ab: Any, bb: Any) -> tuple[Any, Any]:
    """``gamma`` minimising ``|gamma a + (1 - gamma) b|^2`` from the inner
    products ``aa = <a, a>``, ``ab``, ``bb``; and that squared norm."""
    denominator = aa - 2 * ab + bb
    gamma = jnp.clip((bb - ab) / jnp.where(denominator > 0, denominator, 1), 0, 1)
    gamma = jnp.where(denominator > 0, gamma, jnp.where(aa < bb, 1.0, 0.0))
    return gamma, gamma**2 * aa + 2 * gamma * (1 - gamma) * ab + (1 - gamma) ** 2 * bb

  if num_tasks == 1:
    return jnp.ones((1,), gram.dtype)
  pairs = [(i, j) for i in range(num_tasks) for j in range(i + 1, num_tasks)]
  best = None
  for i, j in pairs:
    gamma, norm_sq = segment_min(gram[i, i], gram[i, j], gram[j, j])
    weights = jnp.zeros(num_tasks, gram.dtype).at[i].set(gamma).at[j].set(1 - gamma)
    if best is None:
      best = (weights, norm_sq)
    else:
      better = norm_sq < best[1]
      best = (jnp.where(better, weights, best[0]), jnp.where(better, norm_sq, best[1]))
  assert best is not None
  if num_tasks == 2:
    return best[0]

  def frank_wolfe_step(_: int, weights: jax.Array) -> jax.Array:
    grad = gram @ weights  # <g_t, v> for v = sum_k w_k g_k
    vertex = jnp.argmin(grad)
    vv, tv, tt = weights @ grad, grad[vertex], gram[vertex, vertex]
    gamma, _ = segment_min(tt, tv, vv)
    return (1 - gamma) * weights + gamma * jax.nn.one_hot(vertex, num_tasks, dtype=gram.dtype)

  return jax.lax.fori_loop(0, num_iterations, frank_wolfe_step, best[0])


def mgda(task_grads: Any, num_iterations: int = 100, *, mask: Any = None) -> Any:
  """MGDA (Sener & Koltun, 2018): the minimum-norm convex combination.

  Returns ``sum_i w_i g_i`` with ``w`` on the simplex minimising its norm
  (whole-pytree inner products). Convention: the result is NOT rescaled; its
  weights sum to 1, so it is on the scale of the mean gradient, not of the
  sum (multiply by ``T`` to compare step sizes with the plain sum; Adam is
  insensitive to the scale).

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]``.
    num_iterations: Frank-Wolfe iterations when ``T > 2``.
    mask: as for :func:`graddrop`: MGDA on the leaves where it is True
      (inner products over those alone), the plain sum on the others.

  Returns:
    The combined gradient, without the task axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import mgda
    >>> mgda(jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    Array([0.5, 0.5], dtype=float32)

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """
  _validation.check_task_grads(task_grads)
  return _combine_masked(task_grads, mask, lambda gram: mgda_weights(gram, num_iterations))


def pcgrad_transform(key: jax.Array | int, *, mask: Any = None) -> aggregating.Aggregator:
  """:func:`pcgrad` as an Optax aggregator (first in ``optax.chain``).

  Args:
    key: a PRNG key or int seed for the projection orders.
    mask: as for :func:`graddrop_transform`.

  Returns:
    An ``optax.experimental.aggregating.Aggregator``.
  """
  key = _validation.check_key(key, allow_seed=True)

  def aggregate(task_grads: Any, step_key: jax.Array, mask: Any = None) -> tuple[Any, tuple]:
    return pcgrad(task_grads, step_key, mask=mask), ()

  return _transform.aggregator_transform(aggregate, key, mask=mask)


def mgda_transform(num_iterations: int = 100, *, mask: Any = None) -> aggregating.Aggregator:
  """:func:`mgda` as an Optax aggregator (first in ``optax.chain``).

  Args:
    num_iterations: Frank-Wolfe iterations when ``T > 2``.
    mask: as for :func:`graddrop_transform`.

  Returns:
    An ``optax.experimental.aggregating.Aggregator``.
  """

  def aggregate(task_grads: Any, _: Any, mask: Any = None) -> tuple[Any, tuple]:
    return mgda(task_grads, num_iterations, mask=mask), ()

  return _transform.aggregator_transform(aggregate, mask=mask)


def sum_transform() -> aggregating.Aggregator:
  """:func:`sum_tasks` as an Optax aggregator: the plain-sum baseline.

  Returns:
    An ``optax.experimental.aggregating.Aggregator``.
  """
  return _transform.aggregator_transform(lambda g, _: (sum_tasks(g), ()))


def mean_transform() -> aggregating.Aggregator:
  """:func:`mean_tasks` as an Optax aggregator: the mean-loss baseline.

  Returns:
    An ``optax.experimental.aggregating.Aggregator``.
  """
  return _transform.aggregator_transform(lambda g, _: (mean_tasks(g), ()))
