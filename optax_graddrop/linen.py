"""GradDrop as a Flax Linen layer.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from optax_graddrop import linen as ogd_linen
  >>> layer = ogd_linen.GradDrop(2)
  >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)), deterministic=True)
  >>> branches = layer.apply(
  ...     variables, jnp.ones((4, 3)), rngs={"graddrop": jax.random.key(1)})
  >>> len(branches)
  2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from optax_graddrop import _core
from optax_graddrop import _fork
from optax_graddrop import _validation

__all__ = ["GradDrop"]


class GradDrop(nn.Module):
  """Splits a shared representation into ``num_tasks`` branches with GradDrop.

  The Linen counterpart of :class:`optax_graddrop.nnx.GradDrop`: forward, the
  branches are references to the input; backward, their cotangents are
  combined with GradDrop (:func:`optax_graddrop.fork`). Draws its key with
  ``self.make_rng("graddrop")``, so pass ``rngs={"graddrop": key}`` to
  ``apply``; ``deterministic`` calls need no key and are the plain identity.

  Diagnostics, the way ``nn.Module.perturb`` gives intermediate gradients:
  with ``track_stats=True``, ``init`` adds a zero
  :class:`~optax_graddrop.GradDropStats`, ``stats``, to the layer's
  ``"perturbations"`` collection. Pass that collection to ``apply`` and
  differentiate with respect to it as well: its gradient is the call's
  statistics (see :func:`optax_graddrop.fork`); a deterministic call reports
  ``conflict_fraction=0`` and ``kept_fraction=1`` (no sign picked, nothing
  dropped). Without the collection in ``apply``'s variables the layer
  computes no statistics.

  Attributes:
    num_tasks: the number of branches ``T``.
    leak, keep, scale, eps, marginalize, preserve_norm: as for
      :func:`optax_graddrop.fork`.
    batch_axes: as for :func:`optax_graddrop.fork`: every axis the next layer
      shares its weights across, e.g. ``(0, 1)`` for ``[B, L, D]`` sequences
      and ``(0, 1, 2)`` for ``[B, H, W, C]`` maps.
    deterministic: default for the call's ``deterministic``.
    track_stats: create the ``stats`` probe at ``init`` (see above).
    rng_collection: the rng stream to draw keys from. Inside ``nn.scan``,
      split it (``split_rngs``) and put ``"perturbations"`` in
      ``variable_axes`` for the statistics: see "Inside scans" in the usage
      guide.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_graddrop import linen as ogd_linen
    >>> layer = ogd_linen.GradDrop(2, track_stats=True)
    >>> features = jnp.ones((4, 3))
    >>> perturbations = layer.init(
    ...     jax.random.key(0), features, deterministic=True)["perturbations"]
    >>> def loss(perturbations, key):
    ...   a, b = layer.apply(
    ...       {"perturbations": perturbations}, features, rngs={"graddrop": key})
    ...   return jnp.sum(a) - jnp.sum(b)  # the two tasks disagree everywhere
    >>> grads = jax.grad(loss)(perturbations, jax.random.key(1))
    >>> float(grads["stats"].conflict_fraction)
    1.0
  """

  num_tasks: int
  leak: Any = 0.0
  keep: _core.Keep = "linear"
  scale: float = 1.0
  eps: float = 0.0
  marginalize: _fork.Marginalize = "sign"
  batch_axes: int | Sequence[int] = (0,)
  preserve_norm: bool = False
  deterministic: bool = False
  track_stats: bool = False
  rng_collection: str = "graddrop"

  @nn.compact
  def __call__(self, features: Any, deterministic: bool | None = None) -> tuple[Any, ...]:
    """Returns ``num_tasks`` branches of ``features``.

    Args:
      features: the shared activation (array or pytree of arrays).
      deterministic: if True, no GradDrop; overrides the attribute.

    Returns:
      A tuple of ``num_tasks`` pytrees equal to ``features``.
    """
    if deterministic is None:
      deterministic = self.deterministic
    _validation.check_flags(deterministic=deterministic, track_stats=self.track_stats)
    probe = None
    # As nn.Module.perturb: created by init, used when apply is given it.
    if self.track_stats and (
      self.is_mutable_collection("perturbations") or self.has_variable("perturbations", "stats")
    ):
      probe = self.variable("perturbations", "stats", _fork.stats_probe).value
    if deterministic:
      if probe is not None:
        features = _fork.without_graddrop(features, probe)
      return (features,) * self.num_tasks
    return _fork.fork(
      features,
      self.make_rng(self.rng_collection),
      self.num_tasks,
      leak=self.leak,
      keep=self.keep,
      scale=self.scale,
      eps=self.eps,
      marginalize=self.marginalize,
      batch_axes=self.batch_axes,
      preserve_norm=self.preserve_norm,
      stats_probe=probe,
    )
