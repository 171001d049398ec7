"""GradDrop as an Optax gradient transformation (an aggregator)."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from optax_graddrop import _core
from optax_graddrop import _validation


class GradDropState(NamedTuple):
  """State of :func:`graddrop_transform`.

  Attributes:
    count: number of updates so far (int32).
    rng_key: the key of the next update; every update splits it and uses a
      fresh subkey, so no uniform is ever reused.
    stats: :class:`GradDropStats` of the latest update, for logging (no
      conflict and everything kept before the first update, or always with
      ``track_stats=False``).
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
  rng_key: jax.Array
  stats: _core.GradDropStats


def graddrop_transform(
  key: jax.Array | int,
  *,
  leak: Any = 0.0,
  keep: _core.Keep = "linear",
  scale: float = 1.0,
  eps: float = 1e-7,
  preserve_norm: bool = False,
  track_stats: bool = True,
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
      Counting costs about as much as GradDrop itself (see
      ``benchmarks/speed.py``); with ``False`` the state's stats stay at their
      initial values.

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` (a
    ``GradientTransformationExtraArgs``) whose state is a
    :class:`GradDropState`.

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
  initial_key = _validation.check_key(key, allow_seed=True)
  options = dict(leak=leak, keep=keep, scale=scale, eps=eps, preserve_norm=preserve_norm)
  # Fail at construction, not at the first update inside jit.
  _core.keep_fn(keep, scale)

  def init_fn(params: optax.Params) -> GradDropState:
    del params
    return GradDropState(
      count=jnp.zeros([], jnp.int32),
      rng_key=initial_key,
      stats=_core.GradDropStats(
        conflict_fraction=jnp.zeros([], jnp.float32),
        kept_fraction=jnp.ones([], jnp.float32),
      ),
    )

  def update_fn(
    task_updates: optax.Updates,
    state: GradDropState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, GradDropState]:
    del params, extra_args
    next_key, step_key = jax.random.split(state.rng_key)
    if track_stats:
      updates, stats = _core.graddrop(task_updates, step_key, return_stats=True, **options)
    else:
      updates, stats = _core.graddrop(task_updates, step_key, **options), state.stats
    new_state = GradDropState(
      count=optax.safe_increment(state.count), rng_key=next_key, stats=stats
    )
    return updates, new_state

  return aggregating.Aggregator(init_fn, update_fn)
