"""Activation-level GradDrop in one backward pass: ``fork``.

``fork(features, key, T)`` hands each of ``T`` task heads its own reference
to a shared representation ``A``. One ordinary ``jax.grad`` of the summed
loss then delivers the ``T`` per-task cotangents of ``A`` to ``fork``'s
backward rule (a ``jax.custom_vjp``), which applies GradDrop to them and
passes one combined cotangent into the trunk: the cost of the plain sum,
where parameter-level GradDrop needs ``T`` backward passes.

Its diagnostics exist only in that backward pass, so ``fork`` hands them out
the way Flax's ``perturb`` hands out intermediate gradients: through an extra
zero-valued input, the *stats probe*, whose cotangent the backward rule sets
to the step's :class:`GradDropStats`. The gradient of the loss with respect to
the probe is then the statistics, under every transformation that
differentiates it; a probe that is not differentiated (or absent) costs
nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_graddrop import _core
from optax_graddrop import _fusion
from optax_graddrop import _layout
from optax_graddrop import _random
from optax_graddrop import _sums
from optax_graddrop import _validation

Marginalize = Literal["sign", "value"] | None


def check_batch_axes(batch_axes: Any) -> tuple[int, ...]:
  """Checks ``batch_axes`` (an int or ints, Python or NumPy); returns a tuple of ints."""
  if _validation.is_int(batch_axes):
    return (int(batch_axes),)
  # A tuple first: a generator would be used up by the check.
  axes = tuple(batch_axes) if np.iterable(batch_axes) else None
  if axes is None or not all(_validation.is_int(a) for a in axes):
    raise TypeError(f"`batch_axes` must be an int or a tuple of ints; got {batch_axes!r}.")
  return tuple(int(a) for a in axes)


def _check_options(
  features: Any, num_tasks: Any, marginalize: Any, batch_axes: Any
) -> tuple[int, tuple[int, ...]]:
  """Checks the options shared by ``fork`` and ``graddrop_activation``; returns them as ints."""
  num_tasks = _validation.check_num_tasks(num_tasks)
  if marginalize not in ("sign", "value", None):
    raise ValueError(f"`marginalize` must be 'sign', 'value' or None; got {marginalize!r}.")
  batch_axes = check_batch_axes(batch_axes)
  leaves = jax.tree_util.tree_leaves_with_path(features)
  if not leaves:
    raise ValueError("`features` has no array leaves.")
  for path, leaf in leaves:
    where = f"`features{jax.tree_util.keystr(path)}`"
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{where} has dtype {dtype}; `fork` needs floating-point features.")
    ndim = jnp.ndim(leaf)
    if marginalize is not None:
      for axis in batch_axes:
        if not -ndim <= axis < ndim:
          raise ValueError(
            f"`batch_axes` {tuple(batch_axes)} is out of range for {where} of shape "
            f"{jnp.shape(leaf)}."
          )
      if len({a % ndim for a in batch_axes}) != len(batch_axes):
        raise ValueError(f"`batch_axes` {tuple(batch_axes)} repeats an axis of {where}.")
  return num_tasks, batch_axes


def _signal(
  features: jax.Array, cotangent: jax.Array, marginalize: str, batch_axes: Sequence[int]
) -> jax.Array:
  """The per-task signal whose sign GradDrop looks at (batch-marginalised)."""
  axes = tuple(a % features.ndim for a in batch_axes)
  # The weight gradient of the next layer is input x cotangent, so the sign
  # of the input decides the sign each task pushes on the weights.
  factor = jnp.sign(features) if marginalize == "sign" else features
  return jnp.sum(factor.astype(cotangent.dtype) * cotangent, axis=axes, keepdims=True)


def graddrop_activation(
  features: Any,
  task_cotangents: Sequence[Any],
  key: jax.Array,
  *,
  leak: Any = 0.0,
  keep: _core.Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
  marginalize: Marginalize = "sign",
  batch_axes: int | Sequence[int] = (0,),
  preserve_norm: bool = False,
  return_stats: bool = False,
) -> Any:
  """GradDrop of per-task cotangents of a shared activation (``fork``'s backward).

  With ``A`` the features and ``g_i`` the cotangent from task ``i``:

  1. signal ``G_i = sum_batch(sign(A) g_i)`` (``marginalize="sign"``, the
     official implementation's default), ``sum_batch(A g_i)`` (``"value"``)
     or ``g_i`` (``None``);
  2. purity ``P`` and the keep decision from the ``G_i`` (eqs. 1-2), one
     uniform per element of ``G``;
  3. masks ``M_i`` broadcast back over the batch axes, and
     ``out = sum_i (l_i + (1 - l_i) M_i) g_i`` (eq. 3).

  A task whose signal is exactly zero at an element keeps its (then
  sign-less) cotangent there. The leaves' uniforms are one stream drawn from
  ``key``, one per element of the signals, as in :func:`graddrop`; with
  ``marginalize=None`` the result equals ``graddrop`` of the stacked
  cotangents.

  Diagnostics (``return_stats``) count the elements of the signals ``G_i``,
  where GradDrop decides: ``conflict_fraction`` is the fraction of signal
  elements whose ``T`` signals have both signs, ``kept_fraction`` the mean of
  the masks ``M_i`` over the ``T x`` signal elements (a zero signal counts as
  kept), as :func:`graddrop` of the stacked signals reports them with the
  same key. With ``marginalize=None`` the signals are the cotangents, so the
  statistics are those of ``graddrop`` of the stacked cotangents. Otherwise
  each signal element stands for all the batch elements it was summed over:
  for ``[B, D]`` features and ``batch_axes=(0,)`` there are ``D`` of them, one
  per feature, and a dropped task counts once per feature, not once per
  example.

  Args:
    features: the shared activation ``A``: an array or a pytree of them.
    task_cotangents: ``T`` pytrees like ``features``.
    key: a PRNG key.
    leak: as for :func:`graddrop`.
    keep: as for :func:`graddrop`.
    scale: as for :func:`graddrop`.
    eps: as for :func:`graddrop`.
    marginalize: ``"sign"``, ``"value"`` or ``None``; see above.
    batch_axes: the axes of every leaf summed over in step 1 (an int, or a
      sequence of Python or NumPy ints); unused with ``marginalize=None``,
      where every element decides on its own.
    preserve_norm: rescale each leaf of the result to the norm of the plain
      sum ``sum_i g_i`` (batch included).
    return_stats: also return :class:`GradDropStats` over all leaves' signals.

  Returns:
    The combined cotangent, a pytree like ``features``; with
    ``return_stats``, a tuple ``(combined, stats)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import graddrop_activation
    >>> features = jnp.ones((2, 3))
    >>> cotangents = [jnp.ones((2, 3)), -2.0 * jnp.ones((2, 3))]
    >>> out, stats = graddrop_activation(
    ...     features, cotangents, jax.random.key(0), return_stats=True)
    >>> out.shape
    (2, 3)
    >>> float(stats.conflict_fraction)  # every feature: the tasks disagree
    1.0
  """
  if not task_cotangents:
    raise ValueError("`task_cotangents` is empty; pass one cotangent per task (at least one).")
  num_tasks, batch_axes = _check_options(features, len(task_cotangents), marginalize, batch_axes)
  key = _validation.check_key(key)
  leak_per_task = _validation.check_leak(leak, num_tasks)
  _validation.check_eps(eps)
  _validation.check_flags(preserve_norm=preserve_norm, return_stats=return_stats)
  fn = _core.keep_fn(keep, scale)
  count_dtype = _sums.count_dtype(num_tasks) if return_stats else None
  leaves, treedef = jax.tree_util.tree_flatten(features)
  cotangent_leaves = []
  for task, cotangent in enumerate(task_cotangents):
    leaves_i, treedef_i = jax.tree_util.tree_flatten(cotangent)
    if treedef_i != treedef:  # type: ignore[operator]  # PyTreeDef has no stubs
      raise ValueError(
        f"`task_cotangents[{task}]` has structure {treedef_i}; expected that of "
        f"`features`, {treedef}."
      )
    for leaf, cotangent_leaf in zip(leaves, leaves_i):
      expected = (jnp.shape(leaf), jnp.result_type(leaf))
      got = (jnp.shape(cotangent_leaf), jnp.result_type(cotangent_leaf))
      if got != expected:
        raise ValueError(
          f"`task_cotangents[{task}]` has a leaf of shape {got[0]} and dtype "
          f"{got[1]} where `features` has shape {expected[0]} and dtype "
          f"{expected[1]}; each task's cotangent has the features' shapes and "
          "dtypes (nothing is broadcast or cast)."
        )
    cotangent_leaves.append(leaves_i)
  signal_leaves = []
  for index, leaf in enumerate(leaves):
    dtype = _sums.compute_dtype(jnp.result_type(leaf))
    grads = [c[index].astype(dtype) for c in cotangent_leaves]
    signals = None
    if marginalize is not None:
      signals = [_signal(leaf, g, marginalize, batch_axes) for g in grads]
    signal_leaves.append((grads, signals))
  # The leaves' uniforms are one stream over the signals, as in graddrop.
  signal_shapes = [jnp.shape(g[0] if s is None else s[0]) for g, s in signal_leaves]
  offsets, total_calls = _random.call_offsets([math.prod(shape) for shape in signal_shapes])
  all_bits = _random.tree_bits(
    key,
    total_calls,
    [
      ([(offset, _random.num_calls(math.prod(shape)))], math.prod(shape))
      for offset, shape in zip(offsets, signal_shapes)
    ],
  )
  combined, codes = [], []
  for leaf, (grads, signals), shape, bits in zip(leaves, signal_leaves, signal_shapes, all_bits):
    dtype = grads[0].dtype
    init = _sums.zeros(
      grads[0] if signals is None else signals[0],
      grads[0],
      dtype,
      per_task_leak=leak_per_task is not None,
      separate_signals=signals is not None,
      counts=count_dtype,
    )
    sums = _sums.accumulate(init, grads, leak_per_task, signals)
    bits = bits.reshape(shape)
    if signals is not None:
      # Broadcast over the batch: have the uniforms computed once, not per
      # batch element.
      (bits,) = _fusion.materialize([bits])
    done = _core.finish(
      sums,
      bits,
      fn,
      eps,
      out_dtype=jnp.result_type(leaf),
      preserve_norm=preserve_norm,
      count_dtype=count_dtype,
      materialize=False,
    )
    if done.code is not None:
      codes.append((done.code, _layout.explicitly_sharded(done.code)))
    out = done.combined
    if done.plain is not None:
      sharded = _layout.explicitly_sharded(out)
      out = _core.rescale_to_norm(out, done.plain, sharded).astype(jnp.result_type(leaf))
    combined.append(out)
  result = jax.tree_util.tree_unflatten(treedef, combined)
  if not return_stats:
    return result
  num_signals = sum(math.prod(shape) for shape in signal_shapes)
  return result, _core.stats_from_codes(codes, num_signals, num_tasks)


def fork(
  features: Any,
  key: jax.Array,
  num_tasks: int,
  *,
  leak: Any = 0.0,
  keep: _core.Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
  marginalize: Marginalize = "sign",
  batch_axes: int | Sequence[int] = (0,),
  preserve_norm: bool = False,
  stats_probe: _core.GradDropStats | None = None,
) -> tuple[Any, ...]:
  """Splits a shared activation into ``num_tasks`` branches with GradDrop.

  Forward: returns ``num_tasks`` references to ``features`` (no copies).
  Backward: the ``num_tasks`` cotangents that one ``jax.grad`` of the
  summed task losses brings back are combined by
  :func:`graddrop_activation` into one cotangent for the trunk. A head that
  does not use its branch contributes a zero cotangent. ``key`` is not
  differentiated.

  Put it where the paper does: on the last shared representation, just
  before the task heads. Parameter-level GradDrop (:func:`graddrop` on
  per-task parameter gradients) picks signs per weight exactly, at the cost
  of ``T`` backward passes; ``fork`` costs one.

  Diagnostics: the statistics exist only in the backward pass, so they come
  out as a gradient, as Flax's ``perturb`` gives intermediate gradients.
  Pass ``stats_probe`` (:func:`stats_probe`, zeros) and differentiate the
  loss with respect to it as well: its gradient is the step's
  :class:`GradDropStats`, as ``graddrop_activation(..., return_stats=True)``
  computes them. Its value is never read, and the combined cotangent is the
  same with and without it. Like any gradient, a probe used by several forks
  (or several times, in a loop or under ``jax.vmap``) receives the sum of
  their statistics; give each fork its own probe to tell them apart. A probe
  that is passed but not differentiated costs nothing under ``jax.jit``.

  Args:
    features: the shared activation, an array or pytree of arrays.
    key: a PRNG key; use a fresh one every step.
    num_tasks: the number of branches ``T``.
    leak: as for :func:`graddrop`.
    keep: as for :func:`graddrop`.
    scale: as for :func:`graddrop`.
    eps: as for :func:`graddrop`.
    marginalize: as for :func:`graddrop_activation`.
    batch_axes: as for :func:`graddrop_activation`.
    preserve_norm: as for :func:`graddrop_activation`.
    stats_probe: ``None``, or a :class:`GradDropStats` of float scalars
      whose cotangent becomes the statistics (see above).

  Returns:
    A tuple of ``num_tasks`` pytrees equal to ``features``.

  Raises:
    TypeError: if ``stats_probe`` is not a ``GradDropStats`` of float scalars.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import fork, stats_probe
    >>> def loss(w, probe, x, key):
    ...   shared = jnp.tanh(x @ w)
    ...   a, b = fork(shared, key, 2, stats_probe=probe)
    ...   return jnp.sum(a) - jnp.sum(b ** 2)
    >>> grads, stats = jax.grad(loss, argnums=(0, 1))(
    ...     jnp.ones((3, 4)), stats_probe(), jnp.ones((5, 3)), jax.random.key(0))
    >>> grads.shape
    (3, 4)
    >>> float(stats.conflict_fraction)  # the two heads disagree on every feature
    1.0
  """
  num_tasks, batch_axes = _check_options(features, num_tasks, marginalize, batch_axes)
  key = _validation.check_key(key)
  leak_per_task = _validation.check_leak(leak, num_tasks)
  _validation.check_eps(eps)
  _validation.check_flags(preserve_norm=preserve_norm)
  _core.keep_fn(keep, scale)
  probe = None if stats_probe is None else _check_probe(stats_probe)
  options = _ForkOptions(num_tasks, keep, marginalize, batch_axes, preserve_norm)
  return _split(options, features, key, leak_per_task, scale, eps, probe)


def stats_probe() -> _core.GradDropStats:
  """A zero :class:`GradDropStats` whose gradient is ``fork``'s statistics.

  Pass it as ``fork(..., stats_probe=probe)`` and differentiate the loss
  with respect to it along with the parameters.

  Returns:
    ``GradDropStats`` of two float32 zeros.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_graddrop as ogd
    >>> def loss(features, probe):
    ...   a, b = ogd.fork(features, jax.random.key(0), 2, stats_probe=probe)
    ...   return jnp.sum(a) + jnp.sum(b)  # the two tasks agree
    >>> stats = jax.grad(loss, argnums=1)(jnp.ones((4, 3)), ogd.stats_probe())
    >>> float(stats.conflict_fraction), float(stats.kept_fraction)
    (0.0, 1.0)
  """
  zero = jnp.zeros((), jnp.float32)
  return _core.GradDropStats(zero, zero)


def _check_probe(probe: Any) -> _core.GradDropStats:
  if not isinstance(probe, _core.GradDropStats):
    raise TypeError(
      "`stats_probe` must be a GradDropStats of float scalars, such as "
      f"optax_graddrop.stats_probe(); got {type(probe).__name__}."
    )
  for name, value in zip(probe._fields, probe):
    dtype = jnp.result_type(value)
    if jnp.shape(value) != () or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`stats_probe.{name}` must be a float scalar; got shape {jnp.shape(value)} and "
        f"dtype {dtype}."
      )
  return _core.GradDropStats(*(jnp.asarray(value) for value in probe))


def _as_cotangent(stats: _core.GradDropStats, probe: _core.GradDropStats) -> _core.GradDropStats:
  """The statistics in the probe's dtypes, as its cotangent must be."""
  return _core.GradDropStats(*(s.astype(p.dtype) for s, p in zip(stats, probe)))


class _ForkOptions(NamedTuple):
  """The static options of ``fork`` (hashable, for ``nondiff_argnums``).

  ``leak``, ``scale`` and ``eps`` may be traced (a schedule, a sweep under
  ``vmap``), so they travel as arguments instead.
  """

  num_tasks: int
  keep: _core.Keep
  marginalize: Marginalize
  batch_axes: tuple[int, ...]
  preserve_norm: bool


_Residuals = tuple[Any, jax.Array, Any, Any, Any, _core.GradDropStats | None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _split(
  options: _ForkOptions,
  features: Any,
  key: jax.Array,
  leak: Any,
  scale: Any,
  eps: Any,
  probe: _core.GradDropStats | None,
) -> tuple[Any, ...]:
  del key, leak, scale, eps, probe
  return (features,) * options.num_tasks


def _split_fwd(
  options: _ForkOptions,
  features: Any,
  key: jax.Array,
  leak: Any,
  scale: Any,
  eps: Any,
  probe: _core.GradDropStats | None,
) -> tuple[tuple[Any, ...], _Residuals]:
  # The copies themselves, not a call of `_split`: under an outer derivative
  # (a meta-gradient, a Hessian-vector product) they are the identity, and a
  # call would apply GradDrop a second time, to the second-order cotangents.
  return (features,) * options.num_tasks, (features, key, leak, scale, eps, probe)


def _split_bwd(
  options: _ForkOptions, residuals: _Residuals, cotangents: tuple[Any, ...]
) -> tuple[Any, None, None, None, None, _core.GradDropStats | None]:
  features, key, leak, scale, eps, probe = residuals
  result = graddrop_activation(
    features,
    cotangents,
    key,
    leak=0.0 if leak is None else leak,
    keep=options.keep,
    scale=scale,
    eps=eps,
    marginalize=options.marginalize,
    batch_axes=options.batch_axes,
    preserve_norm=options.preserve_norm,
    return_stats=probe is not None,
  )
  # The key and the options are not differentiated; the probe's cotangent
  # is the statistics.
  if probe is None:
    return result, None, None, None, None, None
  combined, stats = result
  return combined, None, None, None, None, _as_cotangent(stats, probe)


_split.defvjp(_split_fwd, _split_bwd)


@jax.custom_vjp
def without_graddrop(features: Any, probe: _core.GradDropStats) -> Any:
  """The identity, whose backward pass reports that nothing was dropped.

  For a layer's deterministic calls: the cotangent passes unchanged, and the
  probe's cotangent is ``GradDropStats(conflict_fraction=0, kept_fraction=1)``
  (no sign picked, every entry kept).
  """
  del probe
  return features


def _without_graddrop_fwd(
  features: Any, probe: _core.GradDropStats
) -> tuple[Any, _core.GradDropStats]:
  return features, probe


def _without_graddrop_bwd(
  probe: _core.GradDropStats, cotangent: Any
) -> tuple[Any, _core.GradDropStats]:
  nothing_dropped = _core.GradDropStats(jnp.float32(0.0), jnp.float32(1.0))
  return cotangent, _as_cotangent(nothing_dropped, probe)


without_graddrop.defvjp(_without_graddrop_fwd, _without_graddrop_bwd)
