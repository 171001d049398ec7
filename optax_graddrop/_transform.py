"""Optax forms of the aggregators: stacked per-task updates in, one update out.

One factory, :func:`aggregator_transform`, turns any aggregation function
over stacked per-task updates into an ``optax.experimental.aggregating.
Aggregator``; :func:`graddrop_transform` and the baselines' transforms are
built with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from optax_graddrop import _core
from optax_graddrop import _graddrop
from optax_graddrop import _validation

# (task_updates, key) -> (updates, stats); also takes `mask=` when the transform has one.
AggregateFn = Callable[..., tuple[Any, Any]]


class AggregatorState(NamedTuple):
  """State of the transforms made by :func:`aggregator_transform`.

  Attributes:
    count: number of updates so far (int32).
    rng_key: the raw data (``jax.random.key_data``, ``uint32``) of the key of
      the next update, ``None`` for deterministic aggregators. Every update
      splits it and uses a fresh subkey, so no random number is ever reused.
      Raw data keeps the state plain arrays, which every checkpointer
      (orbax, ``flax.serialization``) stores.
    stats: the aggregator's diagnostics of the latest update, for logging
      (e.g. :class:`GradDropStats`); their initial value before the first.
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  rng_key: jax.Array | None
  stats: Any


def aggregator_transform(
  aggregate: AggregateFn,
  key: jax.Array | int | None = None,
  initial_stats: Any = (),
  *,
  mask: Any = None,
) -> aggregating.Aggregator:
  """Makes an Optax aggregator from a function over stacked per-task updates.

  The returned transformation's ``update`` takes updates whose leaves carry a
  leading task axis ``T`` (e.g. from :func:`per_task_value_and_grad`) and
  returns ``aggregate(task_updates, step_key)``, shaped like the parameters.
  It must therefore come first in ``optax.chain(...)``, before the optimizer,
  or serve as the aggregator of ``optax.experimental.aggregating.process``.
  When ``params`` are passed to ``update`` (``nnx.Optimizer`` and
  ``TrainState.apply_gradients`` pass them; ``optax.chain`` forwards what it
  gets), every leaf of the updates must be ``[T, *param.shape]``; anything
  else (a plain gradient, tasks on another axis) raises a ``ValueError``
  naming the leaf. Without ``params`` that check cannot run: a plain gradient
  whose leaves share one leading size (a one-leaf model, layers stacked by a
  scan) is taken as a stack of that many tasks, so pass them.

  Args:
    aggregate: ``(task_updates, key) -> (updates, stats)``; ``key`` is a fresh
      subkey every step, or ``None`` when ``key`` below is ``None``.
    key: a PRNG key or int seed for randomised aggregators; ``None`` for
      deterministic ones.
    initial_stats: the ``stats`` of the state before the first update; must
      have the structure of what ``aggregate`` returns.
    mask: as in ``optax.masked``, a pytree of bools shaped like the
      parameters (or a prefix of it), or a callable returning one from the
      parameters (from the updates' task-0 slice when ``update`` gets no
      ``params``). When given, ``aggregate`` is called with it resolved to a
      pytree of Python bools as a ``mask`` keyword; ``None``: no mask.

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` whose state is an
    :class:`AggregatorState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from optax_graddrop import aggregator_transform
    >>> mean = aggregator_transform(lambda g, key: (g.mean(0), ()))
    >>> tx = optax.chain(mean, optax.sgd(0.1))
    >>> updates, state = tx.update(jnp.array([[1.0, 2.0], [3.0, 4.0]]), tx.init(jnp.zeros(2)))
    >>> updates
    Array([-0.2, -0.3], dtype=float32)
  """
  initial_key = None if key is None else _validation.check_key(key, allow_seed=True)
  impl = None if initial_key is None else jax.random.key_impl(initial_key)

  def init_fn(params: optax.Params) -> AggregatorState:
    del params
    # Fresh buffers on every call, as optax's own states: a step that donates
    # one state must not delete the arrays of another (or of a later init).
    key_data = None if initial_key is None else jnp.array(jax.random.key_data(initial_key))
    return AggregatorState(
      count=jnp.zeros([], jnp.int32),
      rng_key=key_data,
      stats=jax.tree.map(jnp.array, initial_stats),
    )

  def update_fn(
    task_updates: optax.Updates,
    state: AggregatorState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, AggregatorState]:
    del extra_args
    _validation.check_not_masked(task_updates)
    _validation.check_not_wrapped()
    if params is not None:
      _validation.check_stacked_like_params(task_updates, params)
    if state.rng_key is None:
      next_key, step_key = None, None
    else:
      next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng_key, impl=impl))
      next_key = jax.random.key_data(next_key)
    if mask is None:
      updates, stats = aggregate(task_updates, step_key)
    else:
      like = _graddrop.first_task(task_updates) if params is None else params
      selected = _validation.mask_leaves(mask, like)
      mask_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), selected)
      updates, stats = aggregate(task_updates, step_key, mask=mask_tree)
    new_state = AggregatorState(
      count=optax.safe_increment(state.count), rng_key=next_key, stats=stats
    )
    return updates, new_state

  return aggregating.Aggregator(init_fn, update_fn)


def graddrop_transform(
  key: jax.Array | int,
  *,
  leak: Any = 0.0,
  keep: _core.Keep = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
  preserve_norm: bool = False,
  track_stats: bool = True,
  mask: Any = None,
) -> aggregating.Aggregator:
  """GradDrop as an Optax aggregator: stacked per-task updates in, one out.

  Its ``update`` takes updates whose leaves carry a leading task axis ``T``
  (e.g. from :func:`per_task_value_and_grad`) and returns
  :func:`graddrop` of them, shaped like the parameters. It must therefore
  come first in ``optax.chain(...)``, before the optimizer, or serve as the
  aggregator of ``optax.experimental.aggregating.process``.

  The math is that of :func:`graddrop` (paper eqs. 1-3); see there for the
  options.

  Args:
    key: a PRNG key or an int seed.
    leak: as for :func:`graddrop`.
    keep: as for :func:`graddrop`.
    scale: as for :func:`graddrop`.
    eps: as for :func:`graddrop`.
    preserve_norm: as for :func:`graddrop`.
    track_stats: record :class:`GradDropStats` in the state at every update.
      The counts come from the same pass over the updates as GradDrop, so
      they cost little (see ``benchmarks/speed.py``); with ``False`` the
      state's stats stay at their initial values (no conflict, everything
      kept).
    mask: where to apply GradDrop, as in ``optax.masked``: a pytree of bools
      shaped like the parameters (or a prefix of it), or a callable returning
      one from the parameters. Leaves where it is False get the plain sum of
      their task updates (e.g. GradDrop on the shared trunk only).

  Hyperparameters: ``optax.inject_hyperparams(graddrop_transform)(key=0,
  leak=0.5)`` works without static arguments; ``leak``, ``scale`` and
  ``eps`` may then be scheduled or changed in ``state.hyperparams`` between
  steps (they are checked for shape when traced, for range when concrete).
  A callable ``keep`` or ``mask`` must be named in ``static_args`` (optax
  takes every callable for a schedule).

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` (a
    ``GradientTransformationExtraArgs``) whose state is an
    :class:`AggregatorState` with :class:`GradDropStats` as ``stats``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_graddrop as ogd
    >>> def task_losses(w):
    ...   return jnp.stack([jnp.sum((w - 1.0) ** 2), jnp.sum((w + 1.0) ** 2)])
    >>> tx = optax.chain(ogd.graddrop_transform(0), optax.adam(0.1))
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> losses, task_grads = ogd.per_task_value_and_grad(task_losses)(w)
    >>> task_grads.shape
    (2, 3)
    >>> updates, state = tx.update(task_grads, state, w)
    >>> updates.shape
    (3,)

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  options = dict(leak=leak, keep=keep, scale=scale, eps=eps, preserve_norm=preserve_norm)
  # Fail at construction, not at the first update inside jit.
  key = _validation.check_key(key, allow_seed=True)
  _core.keep_fn(keep, scale)
  _validation.check_eps(eps)
  _validation.check_flags(preserve_norm=preserve_norm, track_stats=track_stats)
  initial_stats = _core.GradDropStats(
    conflict_fraction=jnp.zeros([], jnp.float32), kept_fraction=jnp.ones([], jnp.float32)
  )

  def aggregate(task_updates: Any, key: Any, mask: Any = None) -> tuple[Any, _core.GradDropStats]:
    if track_stats:
      return _graddrop.graddrop(task_updates, key, return_stats=True, mask=mask, **options)
    return _graddrop.graddrop(task_updates, key, mask=mask, **options), initial_stats

  return aggregator_transform(aggregate, key, initial_stats, mask=mask)
