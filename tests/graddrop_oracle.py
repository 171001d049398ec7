"""GradDrop in plain NumPy, eqs. 1-3 of the paper as written: the tests' oracle.

Chen et al., NeurIPS 2020, https://arxiv.org/abs/2010.06808, with the
library's documented conventions: where the task gradients of a scalar do
not have both signs (or one is not finite) every mask is 1, and a zero
entry is kept. Its uniforms follow the library's documented stream
(``optax_graddrop._random``), computed here independently: the leaves take
consecutive positions, each starting at a multiple of 4, and position ``p``
is half ``p mod 4`` of JAX's own ``threefry2x32`` primitive at counter
``(0, p div 4)`` (the low and high halves of the first word, then of the
second); other key implementations take ``jax.random.bits``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

KEEP_FUNCTIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
  "linear": lambda purity, scale: 0.5 + scale * (purity - 0.5),
  "sigmoid": lambda purity, scale: 1.0 / (1.0 + np.exp(-4.0 * scale * (purity - 0.5))),
  "random": lambda purity, scale: np.full_like(purity, 0.5),
}


def uniforms(key: jax.Array, shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """``U`` of every leaf (shapes without the task axis), from the one stream."""
  sizes = [math.prod(shape) for shape in shapes]
  calls = [-(-size // 4) for size in sizes]
  total = sum(calls)
  if jax.random.key_impl(key) == "threefry2x32":
    counters = np.arange(total, dtype=np.uint32)
    key_words = np.asarray(jax.random.key_data(key))
    words = threefry2x32_p.bind(
      *(jnp.full(total, w, jnp.uint32) for w in key_words),
      jnp.zeros(total, jnp.uint32),
      jnp.asarray(counters),
    )
    first, second = (np.asarray(w, np.uint64) for w in words)
    stream = np.stack([first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16], 1).reshape(-1)
  else:
    stream = np.asarray(jax.random.bits(key, (4 * total,), jnp.uint16), np.uint64)
  result, start = [], 0
  for shape, size, count in zip(shapes, sizes, calls):
    result.append(stream[4 * start : 4 * start + size].reshape(shape) / 2**16)
    start += count
  return result


def masks_leaf(
  task_grad: np.ndarray, u: np.ndarray, keep: Callable[[np.ndarray], np.ndarray], eps: float = 0.0
) -> np.ndarray:
  """Eqs. 1-2 for one leaf ``[T, ...]``: the masks ``M_i``, in float64."""
  g = np.asarray(task_grad, np.float64)
  total, magnitude = g.sum(0), np.abs(g).sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.where(magnitude + eps > 0, total / (magnitude + eps), 0.0)
  purity = 0.5 * (1.0 + ratio)  # eq. 1
  keep_positive = keep(purity) > u  # [f(P) > U]
  conflict = (g > 0).any(0) & (g < 0).any(0) & np.isfinite(g).all(0)
  return np.where(conflict, np.where(keep_positive, g >= 0, g <= 0), True)  # eq. 2


def _keep_function(keep: str | Callable[[np.ndarray], np.ndarray], scale: float):
  return keep if callable(keep) else (lambda purity: KEEP_FUNCTIONS[keep](purity, scale))


def masks(
  leaves: Sequence[np.ndarray],
  key: jax.Array,
  keep: str | Callable[[np.ndarray], np.ndarray] = "linear",
  scale: float = 1.0,
  eps: float = 0.0,
) -> list[np.ndarray]:
  """The masks of every leaf ``[T, ...]``."""
  fn = _keep_function(keep, scale)
  return [
    masks_leaf(leaf, u, fn, eps)
    for leaf, u in zip(leaves, uniforms(key, [leaf.shape[1:] for leaf in leaves]))
  ]


def graddrop(
  leaves: Sequence[np.ndarray],
  key: jax.Array,
  keep: str | Callable[[np.ndarray], np.ndarray] = "linear",
  scale: float = 1.0,
  leak: float | Sequence[float] = 0.0,
  eps: float = 0.0,
) -> list[np.ndarray]:
  """Eq. 3 for every leaf ``[T, ...]``: ``sum_i (l_i + (1 - l_i) M_i) g_i``."""
  num_tasks = leaves[0].shape[0]
  leak = np.broadcast_to(np.asarray(leak, np.float64), (num_tasks,))
  outputs = []
  for leaf, leaf_masks in zip(leaves, masks(leaves, key, keep, scale, eps)):
    g = np.asarray(leaf, np.float64)
    rate = leak.reshape((-1,) + (1,) * (g.ndim - 1))
    outputs.append(((rate + (1.0 - rate) * leaf_masks) * g).sum(0))
  return outputs


def stats(leaves: Sequence[np.ndarray], key: jax.Array, **options) -> tuple[float, float]:
  """``(conflict_fraction, kept_fraction)``: the diagnostics, from the masks."""
  leaf_masks = masks(leaves, key, **options)
  conflicts = sum(
    int(((g > 0).any(0) & (g < 0).any(0) & np.isfinite(g).all(0)).sum()) for g in leaves
  )
  num_scalars = sum(math.prod(g.shape[1:]) for g in leaves)
  num_entries = sum(g.size for g in leaves)
  kept = sum(int(m.sum()) for m in leaf_masks)
  return conflicts / max(num_scalars, 1), kept / max(num_entries, 1)
