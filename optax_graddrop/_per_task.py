"""Per-task losses and gradients from a function returning a loss vector."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_graddrop import _chunks
from optax_graddrop import _cpu_conv
from optax_graddrop import _layout
from optax_graddrop import _validation


def _loss_vector(losses: Any, has_aux: bool) -> jax.Array:
  if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(losses)):
    # jnp.asarray would stack a tuple, but its VJP wants a tuple of cotangents.
    pair = isinstance(losses, (tuple, list)) and not has_aux
    hint = "; for a (losses, aux) pair, pass has_aux=True" if pair else ""
    raise ValueError(
      "The loss function must return a 1-D float vector of task losses, one per task; "
      f"got a {type(losses).__name__} (stack the losses with jnp.stack{hint})."
    )
  losses = jnp.asarray(losses)
  if losses.ndim != 1 or not jnp.issubdtype(losses.dtype, jnp.floating):
    raise ValueError(
      "The loss function must return a 1-D float vector of task losses, one "
      f"per task; got shape {losses.shape} and dtype {losses.dtype}."
    )
  if losses.shape[0] == 0:
    raise ValueError("The loss function returned 0 task losses; need at least one.")
  return losses


def check_chunk_size(chunk_size: Any) -> int | None:
  """Checks the number of tasks per backward pass; returns it as a Python int."""
  if chunk_size is not None and (not _validation.is_int(chunk_size) or chunk_size < 1):
    raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}.")
  return None if chunk_size is None else int(chunk_size)


def argnum_tuple(argnums: int | Sequence[int]) -> tuple[int, ...]:
  """The differentiated positions, as a tuple."""
  return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def differentiated(args: Sequence[Any], argnums: int | Sequence[int]) -> Any:
  """The differentiated argument (a tuple of them when ``argnums`` is a sequence)."""
  return args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)


def task_vjp(
  fun: Callable[..., Any],
  argnums: int | Sequence[int],
  has_aux: bool,
  args: Sequence[Any],
  kwargs: dict[str, Any],
) -> tuple[jax.Array, Callable[[jax.Array], Any], Any]:
  """One forward pass of ``fun`` and its VJP with respect to ``argnums``.

  Args:
    fun: returns a 1-D vector of task losses (or ``(losses, aux)``).
    argnums: the positional argument(s) to differentiate.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    args: the positional arguments.
    kwargs: the keyword arguments.

  Returns:
    ``(losses, vjp_fn, aux)``: ``vjp_fn`` maps a cotangent of the losses to
    the gradient of the differentiated argument (a tuple of them when
    ``argnums`` is a sequence); ``aux`` is ``None`` without ``has_aux``.

  Raises:
    ValueError: if ``argnums`` names a missing argument or ``fun`` does not
      return a non-empty 1-D float vector.
    TypeError: if a differentiated leaf is not a real float array.
  """
  positions = argnum_tuple(argnums)
  for i in positions:
    if not -len(args) <= i < len(args):
      raise ValueError(
        f"`argnums` names positional argument {i}, but the function was "
        f"called with {len(args)} positional arguments."
      )
  # jax.vjp gives non-float leaves float0 cotangents: an NNX model's rng
  # state would be silently frozen (and a function leaf fails inside JAX).
  for i in positions:
    _validation.check_differentiable(args[i], name=f"args[{i}]")

  def fun_of_diff_args(*diff_args: Any) -> Any:
    full_args = list(args)
    for i, arg in zip(positions, diff_args):
      full_args[i] = arg
    return fun(*full_args, **kwargs)

  diff_args = [args[i] for i in positions]
  if has_aux:
    losses, vjp_fn, aux = jax.vjp(fun_of_diff_args, *diff_args, has_aux=True)
  else:
    (losses, vjp_fn), aux = jax.vjp(fun_of_diff_args, *diff_args), None

  def grad_of(cotangent: jax.Array) -> Any:
    grads = vjp_fn(cotangent)
    return grads[0] if isinstance(argnums, int) else grads

  return _loss_vector(losses, has_aux), grad_of, aux


def task_cotangents(num_tasks: int, start: Any, size: int, dtype: Any) -> jax.Array:
  """One-hot cotangents ``[size, T]`` selecting tasks ``start..start+size-1``."""
  tasks = start + jax.lax.iota(jnp.int32, size)
  return (tasks[:, None] == jax.lax.iota(jnp.int32, num_tasks)[None, :]).astype(dtype)


def fold_task_grads(
  grad_of: Callable[[jax.Array], Any],
  num_tasks: int,
  dtype: Any,
  chunk_size: int | None,
  init: Any,
  add_grads: Callable[[Any, Any, Any, int, bool], Any],
) -> Any:
  """Folds ``add_grads`` over the per-task gradients, in task order.

  The backward passes are scheduled per backend, chosen when the computation
  is lowered (``jax.lax.platform_dependent``):

  - on CPU, when the backward pass has convolutions, one task per backward
    pass, in a loop, with the convolutions in XLA:CPU's fast layout
    (:mod:`._cpu_conv`): a conv net's batched passes ran 2.5-3x slower than
    the same passes one at a time;
  - otherwise (any other model on CPU, every model elsewhere), ``chunk_size``
    tasks per batched (``vmap``) backward pass, all ``T`` for ``None``, in a
    loop over chunks: a transformer's passes ran 2.4x slower one at a time
    in a loop than batched on CPU (an XLA:CPU loop body runs on one thread).

  Either way at most ``chunk_size`` backward passes are live at once, and
  the compile time does not grow with ``T``.

  Args:
    grad_of: maps a cotangent ``[T]`` of the losses to a gradient pytree.
    num_tasks: ``T``.
    dtype: the losses' dtype.
    chunk_size: the most tasks per backward pass; ``None`` for no bound.
    init: the accumulator before the first task.
    add_grads: ``(acc, grads, start, size, in_loop) -> acc`` adds the
      gradients of tasks ``start..start+size-1``, stacked on a leading axis
      of ``size``; ``start`` is traced when ``in_loop``.

  Returns:
    The accumulator after all tasks.
  """

  def fold(one_at_a_time: bool) -> Callable[[Any], Any]:
    return lambda acc: _fold(
      grad_of, num_tasks, dtype, chunk_size, acc, add_grads, one_at_a_time=one_at_a_time
    )

  convolutions = _cpu_conv.has_convolutions(grad_of, jnp.zeros(num_tasks, dtype))
  return jax.lax.platform_dependent(init, cpu=fold(convolutions), default=fold(False))


def _fold(
  grad_of: Callable[[jax.Array], Any],
  num_tasks: int,
  dtype: Any,
  chunk_size: int | None,
  init: Any,
  add_grads: Callable[[Any, Any, Any, int, bool], Any],
  *,
  one_at_a_time: bool,
) -> Any:
  """:func:`fold_task_grads` with the CPU schedule (``one_at_a_time``) or the other."""
  if one_at_a_time:
    size, single = 1, _cpu_conv.canonical_convolutions(grad_of)
  else:
    size, single = num_tasks if chunk_size is None else min(chunk_size, num_tasks), grad_of

  def add_chunk(acc: Any, start: Any, chunk: int, in_loop: bool) -> Any:
    cotangents = task_cotangents(num_tasks, start, chunk, dtype)
    if chunk == 1:
      grads = jax.tree.map(lambda g: g[None], single(cotangents[0]))
    else:
      grads = jax.vmap(single)(cotangents)
    return add_grads(acc, grads, start, chunk, in_loop)

  return _chunks.over_chunks(init, num_tasks, size, add_chunk)


def per_task_value_and_grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
  chunk_size: int | None = None,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad``, for a function returning T task losses.

  The returned function computes ``losses = fun(*args)`` once and the
  gradient of every ``losses[i]`` with one batched backward pass (a ``vmap``
  of the VJP over the one-hot cotangents, i.e. ``jax.jacrev``), giving
  gradients stacked on a leading task axis: the input of :func:`graddrop`
  and :func:`graddrop_transform`.

  Memory: the result holds ``T x`` the size of the differentiated arguments,
  and a batched backward pass of ``T`` tasks keeps ``T`` copies of the
  backward intermediates at once. ``chunk_size`` bounds the latter to
  ``chunk_size`` copies, at the price of ``T / chunk_size`` sequential passes.
  The schedule: ``chunk_size`` tasks per batched pass, all of them for
  ``None``; except on CPU for a model with convolutions, whose passes run
  one task at a time whatever ``chunk_size`` (batched, they cost 2.5-3x). :func:`graddrop_value_and_grad` gives GradDrop's result
  without the ``[T, ...]`` stack at all, and when the shared part of a model
  feeds task heads through one representation, ``fork`` at that activation
  needs no per-task gradients.

  Args:
    fun: function whose output is a 1-D float vector of the ``T`` task losses
      (or ``(losses, aux)`` with ``has_aux``).
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``fun`` returns ``(losses, aux)``.
    chunk_size: the most tasks per backward pass; ``None`` for no bound.

  Returns:
    A function with ``fun``'s signature returning ``(losses, task_grads)``,
    or ``((losses, aux), task_grads)`` with ``has_aux``. ``task_grads`` is
    shaped like the differentiated argument(s) with a leading axis ``T``
    (a tuple of them when ``argnums`` is a sequence).

  Raises:
    ValueError: if ``argnums`` names a missing argument or ``fun`` does not
      return a non-empty 1-D float vector.
    TypeError: a differentiated leaf that is not a real float array (e.g. an
      NNX model's rng key or counter); the message says what to pass.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop import per_task_value_and_grad
    >>> def task_losses(w):
    ...   return jnp.stack([jnp.sum(w ** 2), jnp.sum(w)])
    >>> losses, task_grads = per_task_value_and_grad(task_losses)(jnp.ones(2))
    >>> task_grads
    Array([[2., 2.],
           [1., 1.]], dtype=float32)
  """
  chunk_size = check_chunk_size(chunk_size)

  def value_and_task_grads(*args: Any, **kwargs: Any) -> Any:
    losses, grad_of, aux = task_vjp(fun, argnums, has_aux, args, kwargs)
    primal = differentiated(args, argnums)
    num_tasks = losses.shape[0]
    shapes = jax.eval_shape(grad_of, jnp.zeros(num_tasks, losses.dtype))
    stack = jax.tree.map(lambda s, p: _zero_rows(num_tasks, s, p), shapes, primal)
    task_grads = fold_task_grads(grad_of, num_tasks, losses.dtype, chunk_size, stack, _put)
    value = (losses, aux) if has_aux else losses
    return value, task_grads

  return value_and_task_grads


def _zero_rows(num_tasks: int, shape: jax.ShapeDtypeStruct, primal: Any) -> jax.Array:
  """Zeros ``[T, *shape]`` for the gradients of ``primal``, sharded like it
  when it is explicitly sharded (the rows are written with its gradients'
  sharding)."""
  if not _layout.explicitly_sharded(primal):
    return jnp.zeros((num_tasks, *shape.shape), shape.dtype)
  zeros = jnp.zeros_like(primal, shape.dtype)
  return jnp.broadcast_to(zeros[None], (num_tasks, *shape.shape))


def _put(stack: Any, grads: Any, start: Any, size: int, in_loop: bool) -> Any:
  """Writes the gradients of tasks ``start..start+size-1`` into the stack."""
  del size, in_loop
  return jax.tree.map(
    lambda rows, g: jax.lax.dynamic_update_slice_in_dim(rows, g, start, 0), stack, grads
  )
