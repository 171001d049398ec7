"""Baseline aggregators over stacked per-task gradients, for comparisons.

Each takes a pytree whose leaves carry a leading task axis ``T`` (like
:func:`graddrop`) and returns the pytree without it. PCGrad and MGDA use
inner products over the WHOLE pytree (all leaves jointly), as the original
methods do over the flattened shared parameters; both work on the ``T x T``
Gram matrix, so their cost beyond the Gram matrix does not grow with the
number of parameters.

The traced program does not grow with ``T`` either: the Gram matrix is
matrix products, PCGrad's projections a ``vmap`` over the tasks of a
``scan`` over the other tasks, MGDA's solver a ``while_loop``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from optax.experimental import aggregating

from optax_graddrop import _chunks
from optax_graddrop import _graddrop
from optax_graddrop import _layout
from optax_graddrop import _sums
from optax_graddrop import _transform
from optax_graddrop import _validation

# Inner products are float32 sums whatever the backend's default for matrix
# products (TF32 on recent GPUs, which would be wrong in the 4th digit).
_HIGHEST = jax.lax.Precision.HIGHEST
# On XLA:CPU, up to this many tasks have all their T (T + 1) / 2 inner
# products formed in one fused pass over the gradients; more are multiplied
# in column chunks of about _CHUNK_ENTRIES entries (T x columns, 2 MiB of
# float32) that stay in cache, between _CHUNK_COLUMNS columns. One product
# over a whole [T, N] stack is several times slower there (measured).
_PAIRED_TASKS = 5
_CHUNK_ENTRIES = 2**19
_CHUNK_COLUMNS = (2**10, 2**16)


def _inner_products(rows: jax.Array, dtype: Any) -> jax.Array:
  """``rows @ rows.T`` over all axes but the first, in ``dtype``, unsharded."""
  axes = tuple(range(1, rows.ndim))
  sharding = None
  if _layout.explicitly_sharded(rows):
    # Contracting sharded axes needs the result's sharding: every device gets
    # the whole (small) matrix.
    sharding = jax.typeof(rows).sharding.update(spec=jax.sharding.PartitionSpec())
  return jax.lax.dot_general(
    rows,
    rows,
    ((axes, axes), ((), ())),
    precision=_HIGHEST,
    preferred_element_type=dtype,
    out_sharding=sharding,
  )


def _paired_inner_products(rows: jax.Array, dtype: Any) -> jax.Array:
  """:func:`_inner_products` of a few tasks: sums of their elementwise
  products, all in one pass over ``rows``."""
  num_tasks = rows.shape[0]
  flat = rows.reshape(num_tasks, -1)
  pairs = [(i, j) for i in range(num_tasks) for j in range(i, num_tasks)]
  products = [flat[i].astype(dtype) * flat[j].astype(dtype) for i, j in pairs]
  inner = dict(zip(pairs, _sums.sum_all(products, dtype)))
  tasks = range(num_tasks)
  return jnp.stack([jnp.stack([inner[min(i, j), max(i, j)] for j in tasks]) for i in tasks])


def _chunked_inner_products(rows: jax.Array, dtype: Any) -> jax.Array:
  """:func:`_inner_products` summed over column chunks that fit in cache."""
  num_tasks = rows.shape[0]
  flat = rows.reshape(num_tasks, -1)
  low, high = _CHUNK_COLUMNS
  columns = min(max(low, _CHUNK_ENTRIES // num_tasks), high)
  if flat.shape[1] <= columns:
    return _inner_products(flat, dtype)

  def add_chunk(gram: jax.Array, start: Any, size: int, in_loop: bool) -> jax.Array:
    del in_loop
    return gram + _inner_products(jax.lax.dynamic_slice_in_dim(flat, start, size, axis=1), dtype)

  zeros = jnp.zeros((num_tasks, num_tasks), dtype)
  return _chunks.over_chunks(zeros, flat.shape[1], columns, add_chunk)


def _cpu_inner_products(rows: jax.Array, dtype: Any) -> jax.Array:
  """XLA:CPU's schedule for :func:`_inner_products` (see ``_PAIRED_TASKS``)."""
  if _layout.explicitly_sharded(rows):
    return _inner_products(rows, dtype)  # each device's part, then a sum
  if rows.shape[0] <= _PAIRED_TASKS:
    return _paired_inner_products(rows, dtype)
  return _chunked_inner_products(rows, dtype)


@jax.jit
def _gram(task_grads: Any) -> jax.Array:
  """``G[i, j] = <g_i, g_j>`` over all leaves, in float32 or wider.

  One matrix product per leaf; on CPU, sums of elementwise products for a
  few tasks and a loop of products over column chunks for more
  (:func:`_cpu_inner_products`). Each schedule is a plain function of the
  leaves, so tests call each on any backend.
  """
  leaves = jax.tree.leaves(task_grads)
  dtype = _sums.compute_dtype(jnp.result_type(*leaves))

  def gram_of(product: Any) -> Any:
    return lambda *leaves: sum(product(leaf, dtype) for leaf in leaves)

  return jax.lax.platform_dependent(
    *leaves, cpu=gram_of(_cpu_inner_products), default=gram_of(_inner_products)
  )


def _weighted_sum(task_grads: Any, weights: Any = None) -> Any:
  """``sum_i w_i g_i`` per leaf (``w = 1`` by default), in the leaf's dtype
  (the sums cast ``w`` to the leaf's compute dtype)."""
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


def _check_gram(gram: Any) -> int:
  """Checks a Gram matrix argument (:func:`pcgrad_weights`, :func:`mgda_weights`).

  Shapes and dtypes only, so it costs nothing under ``jax.jit``.

  Returns:
    The number of tasks ``T``.

  Raises:
    TypeError: if ``gram`` is not an array of a real floating-point dtype.
    ValueError: if it is not a square 2-D matrix, or is ``0 x 0``.
  """
  if not isinstance(gram, (jax.Array, np.ndarray)):
    raise TypeError(
      f"`gram` must be a T x T array of the tasks' inner products; got {type(gram).__name__}."
    )
  if not jnp.issubdtype(gram.dtype, jnp.floating):
    raise TypeError(
      "`gram` must have a real floating-point dtype (e.g. float32, as from the "
      f"inner products of float gradients); got dtype {gram.dtype}."
    )
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
      f"`gram` must be a square T x T matrix (2-D, one row and column per task); "
      f"got shape {gram.shape}."
    )
  if gram.shape[0] == 0:
    raise ValueError("`gram` has shape (0, 0); need at least one task.")
  return gram.shape[0]


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
  # 1/T in float64, rounded once to each leaf's compute dtype (exactly the
  # float32 1/T for float32 leaves: double rounding is harmless for division).
  return _weighted_sum(task_grads, np.full((num_tasks,), 1.0 / num_tasks))


def _projection_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """``orders[i]``: the tasks other than ``i``, in the order PCGrad projects
  task ``i``'s gradient off them; ``int32 [T, T - 1]``.

  Row ``i`` ranks the other tasks (in increasing order) by the draws
  ``jax.random.bits(key, (T, T - 1), jnp.uint32)[i]``: a uniformly random
  permutation (equal draws, about ``T^3 / 2^33`` pairs of them over all
  rows, keep the increasing order). One draw for all rows compiles about
  twice as fast as one ``jax.random.permutation`` per row; drawn flat, which
  gives the same values, faster still.
  """
  # uint32 whatever jax_enable_x64 says (the default would follow it).
  draws = jax.random.bits(key, (num_tasks * (num_tasks - 1),), jnp.uint32)
  draws = draws.reshape(num_tasks, num_tasks - 1)
  ranks = jnp.argsort(draws, axis=1, stable=True).astype(jnp.int32)
  # Position k among the others of task i is task k, or k + 1 from i on.
  return ranks + (ranks >= jnp.arange(num_tasks, dtype=jnp.int32)[:, None])


def pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  """PCGrad's result as weights on the original task gradients.

  Every projected ``g_i'`` is a linear combination ``g_i - sum_j c[i, j] g_j``
  of the originals, so PCGrad runs on the Gram matrix alone: projecting
  ``g_i'`` off a conflicting ``g_j`` sets ``c[i, j] = <g_i', g_j> / |g_j|^2``
  and subtracts ``c[i, j] G[j]`` from the inner products ``<g_i', g_k>``.
  The output ``sum_i g_i'`` is ``sum_k w_k g_k`` with ``w_k = 1 - sum_i
  c[i, k]``. The tasks are projected in parallel (a ``vmap``), each over the
  others in sequence (a ``scan``), so the program does not grow with ``T``;
  the work is ``O(T^3)``.

  Orders: task ``i`` meets the others ranked by the draws
  ``jax.random.bits(key, (T, T - 1), jnp.uint32)[i]`` (the others in
  increasing order, sorted by the draws): a uniformly random order per task,
  a function of ``key`` alone, the same with and without ``jax.jit`` or 64-bit
  types.

  Derivatives are those of this computation: where no inner product is zero
  or on the edge of a conflict, the weights are a smooth function of the
  Gram matrix and ``jax.grad`` and ``jax.jvp`` differentiate it.

  Args:
    gram: the ``T x T`` Gram matrix of the task gradients, a real float array.
    key: a PRNG key (``jax.random.key`` or a legacy ``jax.random.PRNGKey``);
      draws, for every task, a random order of the other tasks.

  Returns:
    The weights ``w`` of shape ``(T,)``, in ``gram``'s dtype.

  Raises:
    TypeError: if ``key`` is not a single PRNG key, or ``gram`` is not an
      array of a real floating-point dtype.
    ValueError: if ``gram`` is not a square 2-D matrix of at least one task.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import pcgrad_weights
    >>> pcgrad_weights(jnp.array([[1.0, -1.0], [-1.0, 2.0]]), jax.random.key(0))
    Array([2. , 1.5], dtype=float32)
  """
  _check_gram(gram)
  key = _validation.check_key(key)
  # Jitted: called eagerly, its scan would be traced and compiled every call.
  return _pcgrad_weights(gram, key)


@jax.jit
def _pcgrad_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  num_tasks = gram.shape[0]
  if num_tasks == 1:
    return jnp.ones((1,), gram.dtype)
  orders = _projection_orders(key, num_tasks)
  norms = jnp.diagonal(gram)
  tasks = jnp.arange(num_tasks)

  def project(inner: jax.Array, order: jax.Array) -> jax.Array:
    """``c[i]`` of one task ``i``, from its inner products ``inner = G[i]``."""

    def off(
      carry: tuple[jax.Array, jax.Array], other: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], None]:
      inner, coefficients = carry
      dot, norm_sq = inner[other], norms[other]
      # Project only on a real conflict with a non-zero gradient.
      conflict = (dot < 0) & (norm_sq > 0)
      factor = jnp.where(conflict, dot / jnp.where(conflict, norm_sq, 1), 0)
      return (inner - factor * gram[other], jnp.where(tasks == other, factor, coefficients)), None

    return jax.lax.scan(off, (inner, jnp.zeros_like(inner)), order)[0][1]

  return 1 - jax.vmap(project)(gram, orders).sum(0)


def pcgrad(task_grads: Any, key: jax.Array, *, mask: Any = None) -> Any:
  """PCGrad (Yu et al., 2020): project away conflicting components, then sum.

  For each task ``i``, in a random order of the other tasks ``j`` (drawn from
  ``key``), ``g_i' <- g_i' - (<g_i', g_j> / |g_j|^2) g_j`` whenever
  ``<g_i', g_j> < 0``; the result is ``sum_i g_i'``. Inner products are
  over the whole pytree. Gradients without conflicts pass unchanged (their
  sum). The result is ``sum_k w_k g_k`` with the weights of
  :func:`pcgrad_weights` (which says how the orders are drawn), computed
  from the Gram matrix of the task gradients.

  Derivatives: ``jax.grad`` and ``jax.jvp`` differentiate the weights too
  (the derivative of the whole computation, which is smooth wherever no
  inner product sits exactly on the edge of a conflict).

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


def _pairwise_frank_wolfe(gram: jax.Array, max_steps: int) -> jax.Array:
  """Minimises ``w^T G w`` over the simplex by pairwise Frank-Wolfe steps.

  From the shortest gradient, each step moves weight from the task with
  non-zero weight whose gradient has the largest inner product with ``d =
  sum_k w_k g_k`` to the task with the smallest, by exact line search; a
  step that empties a task sets its weight to exactly 0. It stops when the
  duality gap ``<d, d> - min_i <g_i, d>`` is within the rounding of those
  inner products (``T`` ulps of ``max_i sum_k |G_ik| w_k``), or after
  ``max_steps`` steps.
  """
  num_tasks = gram.shape[0]
  norms = jnp.diagonal(gram)
  tasks = jnp.arange(num_tasks)
  weights = (tasks == jnp.argmin(norms)).astype(gram.dtype)
  # Rows: G, for the inner products <g_i, d>; |G|, for their rounding.
  both = jnp.concatenate([gram, jnp.abs(gram)])
  ulps = num_tasks * jnp.finfo(gram.dtype).eps

  def inner(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    products, magnitudes = jnp.split(jnp.matmul(both, weights, precision=_HIGHEST), 2)
    return products, ulps * jnp.max(magnitudes)

  def not_done(state: tuple[Any, jax.Array, jax.Array, jax.Array]) -> jax.Array:
    step, weights, products, rounding = state
    return (step < max_steps) & (weights @ products - jnp.min(products) > rounding)

  def pairwise_step(
    state: tuple[Any, jax.Array, jax.Array, jax.Array],
  ) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    step, weights, products, _ = state
    toward = jnp.argmin(products)
    away = jnp.argmax(jnp.where(weights > 0, products, -jnp.inf))
    slope = products[toward] - products[away]
    curvature = norms[toward] - 2 * gram[toward, away] + norms[away]
    gamma = jnp.clip(-slope / jnp.where(curvature > 0, curvature, 1), 0, weights[away])
    gamma = jnp.where(curvature > 0, gamma, 0)
    # Emptying ``away`` leaves exactly 0 there: ``gamma`` is then its weight.
    moved = jnp.where(tasks == away, weights - gamma, weights)
    weights = jnp.where(tasks == toward, moved + gamma, moved)
    return step + 1, weights, *inner(weights)

  return jax.lax.while_loop(not_done, pairwise_step, (0, weights, *inner(weights)))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _min_norm_weights(gram: jax.Array, max_steps: int) -> jax.Array:
  num_tasks = gram.shape[0]
  if num_tasks == 1:
    return jnp.ones((1,), gram.dtype)
  if num_tasks == 2:
    # The closed form: gamma minimising |gamma g_0 + (1 - gamma) g_1|^2.
    aa, ab, bb = gram[0, 0], gram[0, 1], gram[1, 1]
    denominator = aa - 2 * ab + bb
    gamma = jnp.clip((bb - ab) / jnp.where(denominator > 0, denominator, 1), 0, 1)
    gamma = jnp.where(denominator > 0, gamma, jnp.where(aa < bb, 1.0, 0.0))
    return jnp.stack([gamma, 1 - gamma])
  return _pairwise_frank_wolfe(gram, max_steps)


@_min_norm_weights.defjvp
def _min_norm_weights_jvp(
  max_steps: int, primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """The derivative of the exact minimum-norm weights (not of the solver's steps).

  With ``S`` the tasks of non-zero weight, the optimum satisfies ``G_S w_S
  = lambda 1`` and ``sum w_S = 1``; differentiating gives ``G_S dw_S +
  (dG w)_S = dlambda 1``, ``sum dw_S = 0`` and ``dw = 0`` off ``S``. The
  system is solved with a pseudo-inverse, which also covers affinely
  dependent gradients (there the weights are not unique but ``d`` is).
  """
  (gram,), (gram_dot,) = primals, tangents
  weights = _min_norm_weights(gram, max_steps)
  # The weights do not change when G is scaled; scaling it to O(1) keeps the
  # pseudo-inverse's cutoff relative to G's own scale.
  scale = jnp.max(jnp.diagonal(gram))
  scale = jnp.where(scale > 0, scale, 1)
  active = weights > 0
  on = active.astype(gram.dtype)
  block = jnp.where(active[:, None] & active, gram / scale, 0) + jnp.diag(1 - on)
  kkt = jnp.block([[block, on[:, None]], [on[None, :], jnp.zeros((1, 1), gram.dtype)]])
  change = jnp.matmul(gram_dot + gram_dot.T, weights, precision=_HIGHEST) / (2 * scale)
  rhs = jnp.append(-on * change, 0)
  return weights, jnp.matmul(jnp.linalg.pinv(kkt), rhs, precision=_HIGHEST)[:-1]


def _check_num_iterations(num_iterations: Any) -> int | None:
  """Checks the Frank-Wolfe step bound; returns it as a Python int (or None)."""
  # The solver counts its steps in int32.
  if num_iterations is not None and (
    not _validation.is_int(num_iterations) or not 0 <= num_iterations < 2**31
  ):
    raise ValueError(
      f"`num_iterations` must be None or an int in [0, 2**31); got {num_iterations!r}."
    )
  return None if num_iterations is None else int(num_iterations)


def mgda_weights(gram: jax.Array, num_iterations: int | None = None) -> jax.Array:
  """Weights of the minimum-norm point of the convex hull of the gradients.

  Minimises ``w^T G w`` over the simplex: the closed form for two tasks;
  otherwise pairwise Frank-Wolfe steps with exact line search (Lacoste-Julien
  & Jaggi 2015; Sener & Koltun 2018 use plain Frank-Wolfe steps from the
  best pair of tasks, which converge slowly when many tasks share the
  optimum) from the shortest gradient, until the duality gap ``<d, d> -
  min_i <g_i, d>`` (``d = sum_k w_k g_k``) is within the rounding of those
  inner products, ``T`` ulps of ``max_i sum_k |G_ik| w_k``. The steps run in
  a ``while_loop``, so the program does not grow with ``T``; each costs
  ``O(T^2)``, and about ``4 T`` steps converged where all ``T`` tasks share
  the optimum.

  Derivatives (``jax.grad``, ``jax.jvp``) are those of the exact minimum-norm
  weights, from its optimality conditions on the tasks of non-zero weight
  (implicit differentiation), not of the solver's steps: the derivative of
  the result once the solver has converged, at any number of steps. Each
  costs a pseudo-inverse of size ``T + 1``. At a change of the set of tasks
  with non-zero weight the weights have a kink.

  Args:
    gram: the ``T x T`` Gram matrix of the task gradients (symmetric), a real
      float array.
    num_iterations: the most Frank-Wolfe steps for ``T > 2``; ``None`` (the
      default) allows ``max(100, 10 T)``.

  Returns:
    The weights ``w`` of shape ``(T,)``, non-negative and summing to 1, in
    ``gram``'s dtype.

  Raises:
    ValueError: if ``num_iterations`` is neither ``None`` nor an int in
      ``[0, 2**31)``, or ``gram`` is not a square 2-D matrix of at least one
      task.
    TypeError: if ``gram`` is not an array of a real floating-point dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import mgda_weights
    >>> weights = mgda_weights(jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    >>> weights.round(6)  # the solver stops within float32 rounding of 2/5, 2/5, 1/5
    Array([0.4, 0.4, 0.2], dtype=float32)

  References:
    Lacoste-Julien & Jaggi, `On the Global Linear Convergence of Frank-Wolfe
    Optimization Variants <https://arxiv.org/abs/1511.05932>`_, NeurIPS 2015.
  """
  num_iterations = _check_num_iterations(num_iterations)
  _check_gram(gram)
  # Jitted: called eagerly, its loops would be traced and compiled every call.
  return _mgda_weights(gram, num_iterations)


@functools.partial(jax.jit, static_argnums=1)
def _mgda_weights(gram: jax.Array, num_iterations: int | None) -> jax.Array:
  num_tasks = gram.shape[0]
  max_steps = max(100, 10 * num_tasks) if num_iterations is None else num_iterations
  return _min_norm_weights(gram, max_steps)


def mgda(task_grads: Any, num_iterations: int | None = None, *, mask: Any = None) -> Any:
  """MGDA (Sener & Koltun, 2018): the minimum-norm convex combination.

  Returns ``sum_i w_i g_i`` with ``w`` on the simplex minimising its norm
  (whole-pytree inner products), the weights of :func:`mgda_weights` (which
  describes the solver) on the Gram matrix of the task gradients.
  Convention: the result is NOT rescaled; its weights sum to 1, so it is on
  the scale of the mean gradient, not of the sum (multiply by ``T`` to
  compare step sizes with the plain sum; Adam is insensitive to the scale).

  Derivatives: ``jax.grad`` and ``jax.jvp`` differentiate the weights too,
  implicitly: the derivative of the exact minimum-norm point (see
  :func:`mgda_weights`), not of the solver's steps.

  Args:
    task_grads: a pytree whose leaves are float arrays ``[T, ...]``.
    num_iterations: the most Frank-Wolfe steps when ``T > 2``; ``None`` (the
      default) allows ``max(100, 10 T)``.
    mask: as for :func:`graddrop`: MGDA on the leaves where it is True
      (inner products over those alone), the plain sum on the others.

  Returns:
    The combined gradient, without the task axis.

  Raises:
    ValueError: if ``num_iterations`` is neither ``None`` nor an int in ``[0, 2**31)``.

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


def mgda_transform(
  num_iterations: int | None = None, *, mask: Any = None
) -> aggregating.Aggregator:
  """:func:`mgda` as an Optax aggregator (first in ``optax.chain``).

  Args:
    num_iterations: the most Frank-Wolfe steps when ``T > 2`` (see
      :func:`mgda`).
    mask: as for :func:`graddrop_transform`.

  Returns:
    An ``optax.experimental.aggregating.Aggregator``.

  Raises:
    ValueError: if ``num_iterations`` is neither ``None`` nor an int in ``[0, 2**31)``.
  """
  num_iterations = _check_num_iterations(num_iterations)

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
