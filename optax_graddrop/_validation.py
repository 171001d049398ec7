"""Input checks shared by every public entry point.

All checks run at trace time on shapes and dtypes, so they cost nothing inside
``jax.jit``. Values (e.g. the leak) are checked only when they are concrete.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_graddrop import _layout


def check_key(key: Any, *, allow_seed: bool = False, name: str = "key") -> jax.Array:
  """Returns ``key`` as a typed PRNG key array of shape ``()``.

  Args:
    key: a typed key (``jax.random.key``), a legacy raw ``uint32`` key
      (``jax.random.PRNGKey``), or, when ``allow_seed``, an integer seed: a
      Python or NumPy integer, or an integer array of shape ``()`` (as
      ``optax.inject_hyperparams`` passes it, possibly traced).
    allow_seed: whether an integer seed is accepted.
    name: the argument's name, for error messages.

  Returns:
    A typed key array of shape ``()``.

  Raises:
    TypeError: for anything that is not a single PRNG key (or seed).
  """
  if allow_seed and is_int(key):
    if not -(2**63) <= int(key) < 2**63:
      raise ValueError(f"An int seed for `{name}` must fit in int64; got {key}.")
    return jax.random.key(int(key))
  expected = "a PRNG key from jax.random.key(seed) or jax.random.PRNGKey(seed)"
  if allow_seed:
    expected += ", or an int seed"
  if not isinstance(key, (jax.Array, np.ndarray)):
    raise TypeError(f"`{name}` must be {expected}; got {type(key).__name__}.")
  key = jnp.asarray(key)
  if allow_seed and key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
    return jax.random.key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise TypeError(
        f"`{name}` must be a single PRNG key (shape ()); got a key array of "
        f"shape {key.shape}. Use jax.vmap to map over several keys."
      )
    return key
  raw_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
  if key.dtype == np.uint32 and key.shape == raw_shape:
    return jax.random.wrap_key_data(key)
  raise TypeError(
    f"`{name}` must be {expected}; got an array of dtype {key.dtype} and shape "
    f"{key.shape} (a legacy raw key is uint32 with shape {raw_shape})."
  )


def check_real(dtype: Any, name: str) -> None:
  """Checks that ``dtype`` holds real numbers (a float or an integer type).

  Raises:
    TypeError: for bool, complex or other non-real dtypes (whose imaginary
      parts a cast would drop without a word).
  """
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"`{name}` must hold real numbers (a float or int array); got dtype {dtype}.")


def real_array(value: Any, name: str) -> jax.Array:
  """``value`` as an array, checked with :func:`check_real`."""
  array = jnp.asarray(value)
  check_real(array.dtype, name)
  return array


def check_flags(**flags: Any) -> None:
  """Checks that on/off options are bools (a string such as ``"no"`` is truthy).

  Raises:
    TypeError: naming the first option that is not a Python or NumPy bool.
  """
  for name, value in flags.items():
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"`{name}` must be a bool; got {value!r} of type {type(value).__name__}.")


def is_int(value: Any) -> bool:
  """Whether ``value`` is a Python or NumPy integer (not a bool)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_num_tasks(num_tasks: Any) -> int:
  """Checks a task count given as an argument (``fork``, ``gradnorm``); returns a Python int."""
  if not is_int(num_tasks) or num_tasks < 1:
    raise ValueError(f"`num_tasks` must be an int >= 1; got {num_tasks!r}.")
  return int(num_tasks)


def _concrete(value: Any) -> Any:
  """``value`` as a NumPy value, or ``None`` when it is traced."""
  return None if isinstance(value, jax.core.Tracer) else np.asarray(value)


def check_scalar(value: Any, name: str) -> Any:
  """Checks that an option is a real scalar; returns its concrete value or ``None``.

  Raises:
    TypeError: if it is not a real number (or a real array of shape ``()``).
  """
  if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
    raise TypeError(f"`{name}` must be a real number; got {type(value).__name__}.")
  shape, dtype = np.shape(value), jnp.result_type(value)  # type: ignore[arg-type]
  if shape != () or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"`{name}` must be a real scalar; got shape {shape} and dtype {dtype}.")
  return _concrete(value)


def check_eps(eps: Any) -> None:
  """Checks the purity's ``eps``, which must keep the denominator positive.

  A traced ``eps`` (e.g. from ``optax.inject_hyperparams``) is checked for
  shape only.
  """
  value = check_scalar(eps, "eps")
  if value is not None and not value >= 0:
    raise ValueError(f"`eps` must be >= 0; got {eps}.")


def check_concrete_shapes(tree: Any, *, name: str) -> None:
  """Raises for a symbolic dimension (``jax.export``'s shape polymorphism).

  GradDrop plans each leaf's place in the stream of uniforms, and the
  schedule of the sums over tasks, from the leaves' sizes.

  Args:
    tree: a pytree of arrays.
    name: its name, for error messages.

  Raises:
    ValueError: naming the first leaf with a symbolic dimension.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(leaf)
    if not all(isinstance(size, (int, np.integer)) for size in shape):
      raise ValueError(
        f"`{name}{jax.tree_util.keystr(path)}` has the symbolic shape {shape}; "
        "GradDrop needs concrete shapes (each leaf's place in the stream of uniforms "
        "and the schedule of the sums over tasks are planned from the sizes). Export "
        "with concrete shapes (a symbolic batch dimension in `fork` is fine)."
      )


def check_task_grads(task_grads: Any, *, name: str = "task_grads") -> int:
  """Checks that every leaf is a real float array with the same task axis.

  Args:
    task_grads: a pytree of per-task gradients, leaves of shape ``[T, ...]``.
    name: the argument's name, for error messages.

  Returns:
    The number of tasks ``T``.

  Raises:
    ValueError: if there are no leaves, a leaf is rank 0, the task axes differ
      or ``T == 0``.
    TypeError: if a leaf is not a real floating-point array.
  """
  leaves = jax.tree_util.tree_leaves_with_path(task_grads)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves; nothing to combine.")
  sizes: dict[int, str] = {}
  for path, leaf in leaves:
    where = f"`{name}{jax.tree_util.keystr(path)}`"
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 16:
      raise TypeError(
        f"{where} has dtype {dtype}; the aggregators need real floating-point "
        "gradients (float16, bfloat16, float32 or float64)."
      )
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
        f"{where} is a scalar (shape ()); every leaf needs a leading task "
        "axis of size T, e.g. shape (T,) for a per-task scalar."
      )
    task_axis = _layout.sharding_spec(leaf)[:1]
    if task_axis and task_axis[0] is not None:
      raise ValueError(
        f"{where} is sharded over its task axis (mesh axis {task_axis[0]!r}) with "
        "Explicit mesh axes, where the tasks cannot be indexed one by one; shard "
        "the parameter axes instead (P(None, ...)), or use Auto mesh axes."
      )
    sizes.setdefault(shape[0], where)
  if len(sizes) > 1:
    found = ", ".join(f"{where}: {size}" for size, where in sizes.items())
    raise ValueError(
      f"All leaves of `{name}` must share the leading task axis; found different sizes ({found})."
    )
  (num_tasks,) = sizes
  if num_tasks == 0:
    raise ValueError(f"`{name}` has a task axis of size 0; need at least one task.")
  return num_tasks


def check_differentiable(primal: Any, *, name: str = "args[0]") -> None:
  """Checks that every leaf of a differentiated argument is a real float array.

  Like ``jax.value_and_grad``, a function that differentiates every leaf of
  its argument needs float leaves. A Flax NNX module with rng state (e.g.
  ``nnx.Dropout``) also holds keys and counters, whose updates would be lost:
  its random streams would not advance. The error says what to pass instead.

  Args:
    primal: the differentiated argument (or a tuple of them).
    name: its name, for error messages.

  Raises:
    TypeError: naming the first leaf that is not a real float array.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(primal):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None and isinstance(leaf, (bool, int, float, complex)):
      dtype = jnp.result_type(leaf)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      continue
    what = f"is {leaf!r}, not an array" if dtype is None else f"has dtype {dtype}"
    raise TypeError(
      f"`{name}{jax.tree_util.keystr(path)}` {what}; every leaf of a "
      "differentiated argument must be a real float array (as for "
      "jax.value_and_grad): pass such leaves (e.g. integer ids) in an argument "
      "not in `argnums`. For an Equinox module, differentiate "
      "`params, static = eqx.partition(model, eqx.is_inexact_array)` and rebuild "
      "the model with `eqx.combine(params, static)` in the loss function. "
      "For a Flax NNX model with rng state or counters, "
      "differentiate its parameters only and pass the rest as another argument: "
      "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`, with the loss "
      "function merging a copy, `nnx.merge(graphdef, params, rest, copy=True)`, and "
      "returning `(losses, nnx.state(model, nnx.Not(nnx.Param)))` with "
      "`has_aux=True`, so that `nnx.update(model, new_rest)` advances its random "
      "streams (docs/guide/usage.md, 'NNX models with rng state')."
    )


def check_leak(leak: Any, num_tasks: int) -> jax.Array | None:
  """Checks the leak ratio and returns it as an array of shape (T,).

  Args:
    leak: a scalar or a length-``num_tasks`` array of values in ``[0, 1]``.
    num_tasks: the number of tasks ``T``.

  Returns:
    ``None`` when the leak is concretely zero for every task (the fast path),
    else a float array of shape ``(num_tasks,)``: float64 when JAX has it
    enabled (concrete values) or as traced, which the sums cast to their
    dtype.

  Raises:
    TypeError: if the leak is not a real number or array of them.
    ValueError: if it has the wrong shape or, when concrete, a value outside
      ``[0, 1]``.
  """
  if isinstance(leak, bool) or not (
    isinstance(leak, (numbers.Real, np.ndarray, jax.Array, list, tuple))
  ):
    raise TypeError(
      f"`leak` must be a real number or an array of {num_tasks} of them; got {type(leak).__name__}."
    )
  if isinstance(leak, (list, tuple)):
    leak = np.asarray(leak)
  dtype = jnp.result_type(leak)
  check_real(dtype, "leak")
  shape = jnp.shape(leak)
  if shape not in ((), (num_tasks,)):
    raise ValueError(
      f"`leak` must be a scalar or have shape ({num_tasks},), one value per "
      f"task; got shape {shape}."
    )
  if isinstance(leak, jax.core.Tracer):
    # Traced values cannot be inspected; the caller vouches for the range.
    floating = leak if jnp.issubdtype(dtype, jnp.floating) else jnp.asarray(leak, jnp.float32)
    return jnp.broadcast_to(floating, (num_tasks,))
  values = np.asarray(leak, dtype=np.float64)
  if not np.all((values >= 0.0) & (values <= 1.0)):
    raise ValueError(f"`leak` must lie in [0, 1] for every task; got {values.tolist()}.")
  if not np.any(values):
    return None
  # Float64 where JAX has it, so that float64 gradients get the exact leak;
  # the sums cast it to their dtype.
  return jnp.broadcast_to(jnp.asarray(values), (num_tasks,))


def check_stacked_like_params(task_updates: Any, params: Any, *, name: str = "updates") -> None:
  """Checks that every leaf of ``task_updates`` is ``[T, *param.shape]``.

  Args:
    task_updates: per-task updates, stacked on a leading task axis.
    params: the parameters they update.
    name: the argument's name, for error messages.

  Raises:
    ValueError: if the structures differ, or a leaf is not its parameter's
      shape behind one leading task axis (a plain unstacked gradient, tasks
      stacked on another axis, other trailing dimensions).
  """
  update_leaves, update_def = jax.tree_util.tree_flatten_with_path(task_updates)
  param_leaves, param_def = jax.tree_util.tree_flatten(params)
  if update_def != param_def:  # type: ignore[operator]  # PyTreeDef has no stubs
    raise ValueError(
      f"`{name}` must have the structure of the parameters, with every leaf "
      f"stacked on a leading task axis; got structure {update_def} for "
      f"parameters of structure {param_def}."
    )
  for (path, update), param in zip(update_leaves, param_leaves):
    shape, param_shape = tuple(jnp.shape(update)), tuple(jnp.shape(param))
    if len(shape) == len(param_shape) + 1 and shape[1:] == param_shape:
      continue
    expected = "(T, " + ", ".join(map(str, param_shape)) + ")" if param_shape else "(T,)"
    if shape == param_shape and _called_from_optax("MultiSteps.update"):
      hint = (
        " optax.MultiSteps wraps the aggregator: it accumulates in the parameters' "
        "shape and hands the aggregator that accumulator, not the per-task "
        "gradients. Use optax_graddrop.multi_steps(inner, every_k_schedule, "
        "num_tasks), which accumulates the stacked per-task gradients."
      )
    elif shape == param_shape:
      hint = (
        " It has the parameter's own shape: pass per-task gradients stacked on a "
        "leading axis (e.g. from per_task_value_and_grad), not a plain gradient, "
        "and put the aggregator first in the chain (a transform before it that "
        "removes the task axis, such as another aggregator, gives this error too)."
      )
    elif (
      len(shape) == len(param_shape) == 1
      and shape[0] > param_shape[0] > 0
      and shape[0] % param_shape[0] == 0
    ):
      hint = (
        f" It holds {shape[0] // param_shape[0]} times the parameter's entries in one "
        "vector: a wrapper such as optax.flatten raveled the task axis into the "
        "parameters'. Wrap the transforms after the aggregator instead, e.g. "
        "optax.chain(aggregator, optax.flatten(optax.adam(1e-3)))."
      )
    else:
      hint = ""
    raise ValueError(
      f"`{name}{jax.tree_util.keystr(path)}` has shape {shape}; expected "
      f"[T, *param.shape] = {expected}, the parameter's shape {param_shape} "
      f"behind a leading axis of T tasks.{hint}"
    )


def check_not_masked(task_updates: Any) -> None:
  """Checks that ``optax.masked`` does not hand the aggregator part of the updates.

  ``optax.masked`` replaces the masked-out leaves with ``optax.MaskedNode`` and
  returns them unchanged, so around an aggregator they would keep their task
  axis and be broadcast onto the parameters. ``optax.partition`` masks the
  same way but hands every leaf to one of its transforms, so there every part
  may start with an aggregator.

  Raises:
    ValueError: if ``task_updates`` has masked-out leaves outside
      ``optax.partition``.
  """
  is_masked = lambda node: isinstance(node, optax.MaskedNode)  # noqa: E731
  if not any(map(is_masked, jax.tree_util.tree_leaves(task_updates, is_leaf=is_masked))):
    return
  if _called_from_optax("partition.<locals>.update_fn"):
    return
  raise ValueError(
    "The aggregator got updates with masked-out leaves: optax.masked wraps it, "
    "and would return the masked-out leaves with their task axis, to be "
    "broadcast onto the parameters. Use the aggregator's `mask` option instead, "
    "e.g. graddrop_transform(key, mask={'trunk': True, 'heads': False}): the "
    "leaves where it is False get the plain sum of their task updates."
  )


# Optax wrappers that cannot wrap an aggregator, by their update's qualname,
# and why. The shapes cannot always tell (apply_if_finite's two branches
# differ only inside lax.cond; flatten without params), and JAX's or optax's
# own error then does not name the cause.
_BAD_WRAPPERS = {
  "apply_if_finite.<locals>.update": (
    "optax.apply_if_finite wraps the aggregator: a step it rejects would return "
    "the stacked per-task updates, not one update per parameter. Put it after "
    "the aggregator, e.g. optax.chain(graddrop_transform(key), "
    "optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5)): the "
    "aggregate of non-finite task updates is non-finite, so the step is skipped."
  ),
  "flatten.<locals>.update_fn": (
    "optax.flatten wraps the aggregator: it ravels the task axis into the "
    "parameters' entries. Wrap the transforms after the aggregator instead, e.g. "
    "optax.chain(aggregator, optax.flatten(optax.adam(1e-3)))."
  ),
}


def check_not_wrapped() -> None:
  """Checks that ``optax.apply_if_finite`` or ``optax.flatten`` does not wrap
  the aggregator.

  Raises:
    ValueError: naming the wrapper and where to put it instead.
  """
  for qualname, message in _BAD_WRAPPERS.items():
    if _called_from_optax(qualname):
      raise ValueError(message)


def _called_from_optax(qualname: str) -> bool:
  """Whether optax's function ``qualname`` is on the call stack.

  Tells how an optax wrapper called an aggregator, to name the wrapper in an
  error: the wrappers pass nothing that says so.
  """
  frame = inspect.currentframe()
  while frame is not None:
    module = frame.f_globals.get("__name__", "")
    if frame.f_code.co_qualname == qualname and module.startswith("optax."):
      return True
    frame = frame.f_back
  return False


def _entry_name(entry: Any) -> Any:
  """The key of one key-path entry, whatever the container (dict, attribute, index)."""
  for field in ("key", "name", "idx"):
    if hasattr(entry, field):
      return getattr(entry, field)
  return str(entry)


def _names(path: Any) -> tuple[Any, ...]:
  return tuple(_entry_name(entry) for entry in path)


def _is_bool(value: Any) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return True
  dtype = getattr(value, "dtype", None)
  return dtype is not None and not isinstance(value, jax.core.Tracer) and dtype == np.bool_


def _is_mask_fn(mask: Any, like: Any) -> bool:
  """Whether ``mask`` is a function to call rather than a tree of bools.

  An Equinox module is a pytree and also callable: a module of bools shaped
  like the parameters (what ``jax.tree.map`` over a model gives) is a tree
  of bools. Any other callable (a ``jax.tree_util.Partial``, a module with
  settings) is a function.
  """
  if not callable(mask):
    return False
  leaves = jax.tree_util.tree_leaves(mask)
  if not leaves or not all(map(_is_bool, leaves)):  # a plain function is its own leaf
    return True
  try:  # a prefix of the parameters' structure
    jax.tree.map(lambda *_: None, mask, like)
  except (ValueError, TypeError):
    return True
  return False


def mask_leaves(mask: Any, like: Any, *, name: str = "mask") -> list[bool]:
  """Resolves an ``optax.masked``-style mask to one bool per leaf of ``like``.

  The mask's entries are matched to the leaves by their key paths, not by the
  container types, so a nested dict selects parts of an ``nnx.State`` or a
  module (and an ``nnx.State`` of bools a dict of parameters). A mask leaf
  applies to every leaf of ``like`` whose path starts with its path; entries
  that match no leaf are ignored (e.g. a module without parameters).

  Args:
    mask: ``None`` (every leaf), a pytree of bools with the structure of
      ``like`` or a prefix of it, or a callable returning one from ``like``
      (e.g. from the key paths, with ``jax.tree_util.tree_map_with_path``).
      A callable pytree of bools shaped like (a prefix of) ``like`` (an
      Equinox module of bools) is a tree of bools.
    like: a pytree shaped like the parameters.
    name: the argument's name, for error messages.

  Returns:
    One Python bool per leaf of ``like``, in leaf order.

  Raises:
    ValueError: if a leaf of ``like`` has no entry in the mask, or a callable
      mask returns False for every leaf (the aggregator would apply nowhere:
      often a test of the last path entry, which is ``.value`` in an
      ``nnx.State`` of Variables). A tree of bools may select nothing in one
      call (a part of the model, under ``optax.partition``).
    TypeError: if a mask leaf is not a concrete bool, or ``mask`` is a class
      or an NNX filter.
  """
  leaves = jax.tree_util.tree_leaves_with_path(like)
  if mask is None:
    return [True] * len(leaves)
  if isinstance(mask, type) or type(mask).__module__.startswith("flax.nnx.filterlib"):
    raise TypeError(
      f"`{name}` must be a pytree of bools shaped like the parameters (or a prefix of "
      f"it), or a function returning one; got {mask!r}, a class or an NNX filter. Select "
      "leaves by their paths instead, e.g. {'trunk': True, 'heads': False}."
    )
  is_fn = _is_mask_fn(mask, like)
  if is_fn:
    mask = mask(like)
  entries = {}
  for path, value in jax.tree_util.tree_leaves_with_path(mask):
    where = f"`{name}{jax.tree_util.keystr(path)}`"
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
        f"Every leaf of `{name}` must be a concrete bool, known when tracing; {where} is traced."
      )
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape != ():
      raise TypeError(
        f"Every leaf of `{name}` must be a bool; {where} is an array of shape {value.shape}. "
        "A mask selects whole leaves: a leaf stacked over layers gets the aggregator in "
        "all its layers or in none."
      )
    if not _is_bool(value):
      raise TypeError(f"Every leaf of `{name}` must be a bool; {where} is {value!r}.")
    entries[_names(path)] = bool(value)
  if is_fn and leaves and entries and not any(entries.values()):
    seen = [jax.tree_util.keystr(path) for path, _ in leaves]
    raise ValueError(
      f"`{name}` returned False for every parameter, so the aggregator would apply "
      f"nowhere. The key paths it was given: {', '.join(seen[:4])}"
      f"{', ...' if len(seen) > 4 else ''}. (A part of the model that needs no "
      "GradDrop, e.g. under optax.partition, takes `sum_transform()` instead.)"
    )
  selected = []
  for path, _ in leaves:
    names = _names(path)
    prefixes = [names[:end] for end in range(len(names), -1, -1) if names[:end] in entries]
    if not prefixes:
      raise ValueError(
        f"`{name}` has no entry for the parameter at {jax.tree_util.keystr(path)}: "
        "it must be a pytree of bools with the structure of the parameters (or a "
        "prefix of it, e.g. {'trunk': True, 'heads': False}), or a callable "
        f"returning one; got {mask!r}."
      )
    selected.append(entries[prefixes[0]])
  return selected
