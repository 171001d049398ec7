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


class GradDrop(nn.Module):
  """Splits a shared representation into ``num_tasks`` branches with GradDrop.

  The Linen counterpart of :class:`optax_graddrop.nnx.GradDrop`: forward, the
  branches are references to the input; backward, their cotangents are
  combined with GradDrop (:func:`optax_graddrop.fork`). Draws its key with
  ``self.make_rng("graddrop")``, so pass ``rngs={"graddrop": key}`` to
  ``apply``; ``deterministic`` calls need no key and are the plain identity.

  Attributes:
    num_tasks: the number of branches ``T``.
    leak, keep, scale, eps, marginalize, preserve_norm: as for
      :func:`optax_graddrop.fork`.
    batch_axes: as for :func:`optax_graddrop.fork`: every axis the next layer
      shares its weights across, e.g. ``(0, 1)`` for ``[B, L, D]`` sequences
      and ``(0, 1, 2)`` for ``[B, H, W, C]`` maps.
    deterministic: default for the call's ``deterministic``.
    rng_collection: the rng stream to draw keys from.
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
    if deterministic:
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
    )
