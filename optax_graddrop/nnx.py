"""GradDrop as a Flax NNX layer.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from optax_graddrop import nnx as ogd_nnx
  >>> layer = ogd_nnx.GradDrop(2, rngs=nnx.Rngs(graddrop=0))
  >>> left, right = layer(jnp.ones((4, 3)))
  >>> left.shape
  (4, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from optax_graddrop import _core
from optax_graddrop import _fork
from optax_graddrop import _validation

__all__ = ["GradDrop", "Stats"]


class Stats(nnx.Variable):
  """The :class:`~optax_graddrop.GradDropStats` of a GradDrop layer, as a probe.

  A layer built with ``track_stats=True`` holds one. Its value is passed to
  :func:`optax_graddrop.fork` as ``stats_probe`` and never read, so
  differentiating the loss with respect to the ``Stats`` variables (e.g.
  ``nnx.DiffState(0, (nnx.Param, Stats))``) gives each layer's statistics of
  the step as their gradients; ``nnx.update`` the model with them to keep the
  latest ones in the layers. Not an ``nnx.Param``: optimizers leave it alone.
  """


def _get(variable: nnx.Variable) -> Any:
  # Flax 0.12.0 reads a Variable's value as `.value`; later versions
  # deprecate that for `get_value()`.
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


class GradDrop(nnx.Module):
  """Splits a shared representation into ``num_tasks`` branches with GradDrop.

  The forward pass returns ``num_tasks`` references to its input; the
  backward pass combines the branches' cotangents with GradDrop
  (:func:`optax_graddrop.fork`), one backward pass in all. Like
  ``nnx.Dropout``, it draws a fresh key from the ``graddrop`` rng stream on
  every call that is not ``deterministic``; deterministic calls are the plain
  identity (and their backward pass the plain sum).

  Diagnostics: with ``track_stats=True`` the layer holds a :class:`Stats`
  variable, ``layer.stats``. Differentiate the loss with respect to it as well
  as the parameters and its gradient is the call's
  :class:`~optax_graddrop.GradDropStats` (see :func:`optax_graddrop.fork`);
  a deterministic call reports ``conflict_fraction=0`` and
  ``kept_fraction=1`` (no sign picked, nothing dropped; the conflicts are not
  measured). A layer called several times in one step reports the sum.

  Args:
    num_tasks: the number of branches ``T``.
    leak: as for :func:`optax_graddrop.fork`: a scalar or one value per task
      (a tuple, list, NumPy or JAX array). A concrete leak is stored as
      Python floats, a static hyperparameter like ``nnx.Dropout``'s rate; a
      leak traced at construction is stored as data.
    scale, eps: as for :func:`optax_graddrop.fork`: Python or NumPy/JAX
      scalars, stored as the leak is.
    keep, marginalize, preserve_norm: as for :func:`optax_graddrop.fork`.
    batch_axes: as for :func:`optax_graddrop.fork`: every axis the next layer
      shares its weights across, e.g. ``(0, 1)`` for ``[B, L, D]`` sequences
      and ``(0, 1, 2)`` for ``[B, H, W, C]`` maps.
    deterministic: if True, no GradDrop (and no key needed). Like
      ``nnx.Dropout``'s flag, ``model.train()`` sets it to False and
      ``model.eval()`` to True.
    track_stats: hold a :class:`Stats` probe (see above). Off by default:
      no probe, no extra state, no extra work.
    rng_collection: the rng stream to draw keys from.
    rngs: an ``nnx.Rngs`` with that stream (without it, ``nnx.Rngs`` falls
      back to its ``default`` stream), or an ``nnx.RngStream``. Inside
      ``nnx.scan`` the layer needs one key per step: see "Inside scans" in
      the usage guide.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from optax_graddrop import nnx as ogd_nnx
    >>> layer = ogd_nnx.GradDrop(2, track_stats=True, rngs=nnx.Rngs(graddrop=0))
    >>> def loss(layer, features):
    ...   a, b = layer(features)
    ...   return jnp.sum(a) - jnp.sum(b)  # the two tasks disagree everywhere
    >>> wrt = nnx.DiffState(0, ogd_nnx.Stats)  # with nnx.Param too in training
    >>> grads = nnx.grad(loss, argnums=wrt)(layer, jnp.ones((4, 3)))
    >>> float(grads["stats"].get_value().conflict_fraction)
    1.0
  """

  def __init__(
    self,
    num_tasks: int,
    *,
    leak: Any = 0.0,
    keep: _core.Keep = "linear",
    scale: float = 1.0,
    eps: float = 0.0,
    marginalize: _fork.Marginalize = "sign",
    batch_axes: int | Sequence[int] = (0,),
    preserve_norm: bool = False,
    deterministic: bool = False,
    track_stats: bool = False,
    rng_collection: str = "graddrop",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    num_tasks = _validation.check_num_tasks(num_tasks)
    _validation.check_leak(leak, num_tasks)
    _validation.check_flags(deterministic=deterministic, track_stats=track_stats)
    _core.keep_fn(keep, scale)
    self.num_tasks = num_tasks
    self.leak = _hyperparameter(leak)
    self.scale = _hyperparameter(scale)
    self.eps = _hyperparameter(eps)
    self.options: dict[str, Any] = dict(
      keep=keep,
      marginalize=marginalize,
      batch_axes=_fork.check_batch_axes(batch_axes),
      preserve_norm=preserve_norm,
    )
    self.deterministic = deterministic
    self.stats = Stats(_fork.stats_probe()) if track_stats else None
    self.rng_collection = rng_collection
    if isinstance(rngs, nnx.Rngs):
      self.rngs = rngs[rng_collection].fork()
    elif isinstance(rngs, nnx.RngStream):
      self.rngs = rngs.fork()
    elif rngs is None:
      self.rngs = nnx.data(None)
    else:
      raise TypeError(f"`rngs` must be an nnx.Rngs, nnx.RngStream or None; got {type(rngs)}.")

  def __call__(
    self,
    features: Any,
    *,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
  ) -> tuple[Any, ...]:
    """Returns ``num_tasks`` branches of ``features``.

    Args:
      features: the shared activation (array or pytree of arrays).
      deterministic: overrides the constructor's flag for this call.
      rngs: overrides the constructor's rngs for this call (a key works too).

    Returns:
      A tuple of ``num_tasks`` pytrees equal to ``features``.
    """
    if deterministic is None:
      deterministic = self.deterministic
    _validation.check_flags(deterministic=deterministic)
    probe = None if self.stats is None else _get(self.stats)
    if deterministic:
      if probe is not None:
        features = _fork.without_graddrop(features, probe)
      return (features,) * self.num_tasks
    source = rngs if rngs is not None else self.rngs
    if isinstance(source, nnx.Rngs):
      key = source[self.rng_collection]()
    elif isinstance(source, nnx.RngStream):
      key = source()
    elif source is None:
      raise ValueError(
        "GradDrop is not deterministic but has no rngs: pass "
        f"rngs=nnx.Rngs({self.rng_collection}=seed) to the constructor or the call."
      )
    else:
      key = source
    return _fork.fork(
      features,
      key,
      self.num_tasks,
      leak=self.leak,
      scale=self.scale,
      eps=self.eps,
      stats_probe=probe,
      **self.options,
    )


def _hyperparameter(value: Any) -> Any:
  """``leak``, ``scale`` or ``eps`` as the layer keeps it.

  Flax keeps non-array attributes static and arrays as state: a concrete
  value is a hyperparameter, kept static as Python floats (a tuple for one
  per task) like ``nnx.Dropout``'s rate; a traced one is data.
  """
  if isinstance(value, jax.core.Tracer):
    return nnx.data(value)
  if isinstance(value, (list, tuple, np.ndarray, np.generic, jax.Array)):
    values = np.asarray(value, np.float64).tolist()
    return tuple(values) if isinstance(values, list) else values
  return value
