"""Small multitask problems that run offline, for examples and benchmarks.

* :func:`~optax_graddrop.problems.two_objective_losses`: the two-objective landscape in R^2 of CAGrad
  (Liu et al., 2021) and Nash-MTL, with its Pareto set
  (:func:`~optax_graddrop.problems.two_objective_pareto_set`) and the usual starting points.
* :func:`~optax_graddrop.problems.multi_minimum_losses`: two 1-D losses with one joint minimum (at 0)
  and different local minima elsewhere, the setting of the GradDrop paper's
  argument that sign dropout only settles where every task is at a minimum.
* :func:`~optax_graddrop.problems.multidigits`: MultiMNIST-style pairs of overlapping handwritten
  digits (Sener & Koltun, 2018), built from scikit-learn's bundled
  ``load_digits``; two 10-class tasks.
* :func:`~optax_graddrop.problems.digit_transfer`: the same pairs with a
  target task labelled on a few images (transfer learning, the setting of
  GradDrop's leak).
* :func:`~optax_graddrop.problems.digit_attributes`: many binary attributes of the same digits (the
  CelebA setting of the GradDrop paper), see :data:`~optax_graddrop.problems.DIGIT_ATTRIBUTES`.

The landscapes are pure JAX functions. The digit problems need
scikit-learn (``pip install "optax_graddrop[bench]"``); they load its bundled
data, never download anything, and are deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "DIGIT_ATTRIBUTES",
  "TWO_OBJECTIVE_STARTS",
  "MultitaskData",
  "TransferData",
  "digit_attributes",
  "digit_transfer",
  "multi_minimum_losses",
  "multidigits",
  "two_objective_losses",
  "two_objective_pareto_set",
]

#: The starting points of CAGrad's experiment (Liu et al., 2021, Fig. 1).
TWO_OBJECTIVE_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))

_LOG_FLOOR = 5e-6


def two_objective_losses(x: jax.Array) -> jax.Array:
  """The two losses of CAGrad's toy landscape at ``x = (x1, x2)``.

  ::

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6)) + 6
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(x2 / 2), 0),  c2 = max(tanh(-x2 / 2), 0)
    L1 = f1 c1 + g1 c2,  L2 = f2 c1 + g2 c2

  The upper half plane holds two narrow log valleys that trap the plain
  sum; the Pareto set is a curve near ``x2 = -8.36`` for ``x1`` in
  ``[-7, 7]`` (see :func:`~optax_graddrop.problems.two_objective_pareto_set`), and the mean loss is
  smallest at its middle.

  Args:
    x: shape ``(2,)``.

  Returns:
    ``(L1, L2)``, shape ``(2,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_graddrop.problems import two_objective_losses
    >>> two_objective_losses(jnp.array([0.0, -8.3551])).round(2)
    Array([-15.09, -15.09], dtype=float32)

  References:
    Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  x = jnp.asarray(x)
  if x.shape != (2,):
    raise ValueError(f"`x` must have shape (2,); got {x.shape}.")
  x1, x2 = x[0], x[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), _LOG_FLOOR)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), _LOG_FLOOR)) + 6
  g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c1 = jnp.maximum(jnp.tanh(x2 / 2), 0)
  c2 = jnp.maximum(jnp.tanh(-x2 / 2), 0)
  return jnp.stack([f1 * c1 + g1 * c2, f2 * c1 + g2 * c2])


def two_objective_pareto_set(num_points: int = 1001) -> np.ndarray:
  """Points on the Pareto set of :func:`~optax_graddrop.problems.two_objective_losses`, in order.

  For a weight ``w`` in ``[0, 1]`` the minimiser of ``w L1 + (1 - w) L2``
  lies in the lower half plane (``c1 = 0``), at ``x1 = 7 (2 w - 1)``, the
  weighted centre of the quadratics, where the weighted loss is
  ``h(x2) = (19.6 w (1 - w) + 0.01 (x2 + 8)^2 - 20) tanh(-x2 / 2)``; its
  minimiser ``x2`` is found by golden-section search in float64 (the
  minimum is too flat for float32). ``w`` over ``[0, 1]`` traces the whole
  set: ``x2`` is -8.4345 at the ends and -8.3551 in the middle (CAGrad
  quotes ``x2 ~ -8.3552``).

  Args:
    num_points: how many evenly spaced weights ``w``.

  Returns:
    A float64 NumPy array of shape ``(num_points, 2)``.

  Example:
    >>> from optax_graddrop.problems import two_objective_pareto_set
    >>> two_objective_pareto_set(3).round(4)
    array([[-7.    , -8.4345],
           [ 0.    , -8.3551],
           [ 7.    , -8.4345]])
  """
  w = np.linspace(0.0, 1.0, num_points)
  offset = 19.6 * w * (1 - w) - 20

  def weighted_loss(x2: np.ndarray) -> np.ndarray:
    return (offset + 0.01 * (x2 + 8) ** 2) * np.tanh(-x2 / 2)

  ratio = (np.sqrt(5.0) - 1) / 2
  low, high = np.full_like(w, -10.0), np.full_like(w, -6.0)
  for _ in range(80):
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    keep_left = weighted_loss(left) < weighted_loss(right)
    low, high = np.where(keep_left, low, left), np.where(keep_left, right, high)
  return np.stack([7.0 * (2 * w - 1), (low + high) / 2], axis=1)


def multi_minimum_losses(x: jax.Array) -> jax.Array:
  """Two 1-D losses whose only common minimum is ``x = 0``.

  ::

    L1 = x^2 / 20 + 1 - cos(2 x),   L2 = x^2 / 20 + (1 - cos(pi x)) / 2

  Both are a shallow bowl plus ripples of incommensurate periods (pi and
  2), so each has local minima where the other does not (the nearest pair,
  near 6, is 0.25 apart), and their sum has local minima where the two
  gradients cancel. Both are at a minimum together only at ``x = 0``.

  Args:
    x: a scalar.

  Returns:
    ``(L1, L2)``, shape ``(2,)``.

  Example:
    >>> from optax_graddrop.problems import multi_minimum_losses
    >>> multi_minimum_losses(0.0)
    Array([0., 0.], dtype=float32)
  """
  x = jnp.asarray(x, dtype=jnp.result_type(float))
  if x.ndim != 0:
    raise ValueError(f"`x` must be a scalar; got shape {x.shape}.")
  bowl = x**2 / 20
  return jnp.stack([bowl + 1 - jnp.cos(2 * x), bowl + (1 - jnp.cos(jnp.pi * x)) / 2])


class MultitaskData(NamedTuple):
  """A multitask classification data set split into train and test.

  Attributes:
    train_images: float32 ``[N, H, W, 1]`` in ``[0, 1]``.
    train_labels: int32 ``[N, T]``, one column per task.
    test_images: float32 ``[M, H, W, 1]``.
    test_labels: int32 ``[M, T]``.
    task_names: ``T`` names.
    num_classes: classes per task.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  task_names: tuple[str, ...]
  num_classes: int


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as err:
    raise ImportError(
      "The digit problems need scikit-learn: pip install 'optax_graddrop[bench]'."
    ) from err
  digits = load_digits()
  return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


def _split_indices(num: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1); got {test_fraction}.")
  order = np.random.default_rng(seed).permutation(num)
  num_test = round(num * test_fraction)
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def _overlay_pairs(
  images: np.ndarray, labels: np.ndarray, num: int, offset: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``num`` overlaid pairs: images, labels ``[num, 2]``, the top-left digits' indices."""
  first, second = rng.integers(0, len(images), size=(2, num))
  size = images.shape[1]
  canvas = np.zeros((num, size + offset, size + offset), np.float32)
  canvas[:, :size, :size] = images[first]
  bottom_right = canvas[:, offset:, offset:]
  np.maximum(bottom_right, images[second], out=bottom_right)
  return canvas[..., None], np.stack([labels[first], labels[second]], axis=1), first


def multidigits(
  num_train: int = 10_000,
  num_test: int = 2_000,
  *,
  offset: int = 2,
  test_fraction: float = 1 / 3,
  seed: int = 0,
) -> MultitaskData:
  """Two overlapping digits per image; task ``i`` classifies digit ``i``.

  Sener & Koltun's MultiMNIST construction, scaled to scikit-learn's 8x8
  digits: each image puts one digit at the top-left of a
  ``(8 + offset)``-square canvas and another at the bottom-right, the
  overlap taking the pixelwise maximum (MultiMNIST: 28x28 digits on a 36x36
  canvas, offset 6). Task ``"left"`` classifies the top-left digit,
  ``"right"`` the bottom-right one. The source digits are split once into
  train and test (no digit image appears in both), then pairs are drawn
  from each split.

  Args:
    num_train: training pairs.
    num_test: test pairs.
    offset: the shift of the second digit, in pixels (0 to 8).
    test_fraction: the share of the 1,797 source digits kept for test pairs.
    seed: fixes the split and the pairs.

  Returns:
    A :class:`MultitaskData` with two 10-class tasks.

  Example:
    >>> from optax_graddrop.problems import multidigits
    >>> data = multidigits(num_train=8, num_test=4)
    >>> data.train_images.shape, data.train_labels.shape, data.task_names
    ((8, 10, 10, 1), (8, 2), ('left', 'right'))
  """
  rng = np.random.default_rng(seed + 1)
  pairs = _digit_pairs(num_train, num_test, offset, test_fraction, seed, rng)
  return MultitaskData(*pairs, task_names=("left", "right"), num_classes=10)


def _digit_pairs(
  num_train: int,
  num_test: int,
  offset: int,
  test_fraction: float,
  seed: int,
  rng: np.random.Generator,
  first_digit_task: _Attribute | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Train and test pairs: images and labels, plus ``first_digit_task`` of the top-left digit."""
  if not 0 <= offset <= 8:
    raise ValueError(f"`offset` must be in [0, 8]; got {offset}.")
  images, labels = _load_digits()
  train_idx, test_idx = _split_indices(len(images), test_fraction, seed)
  parts: list[np.ndarray] = []
  for idx, num in ((train_idx, num_train), (test_idx, num_test)):
    pair_images, pair_labels, first = _overlay_pairs(images[idx], labels[idx], num, offset, rng)
    if first_digit_task is not None:
      extra = first_digit_task(images, labels).astype(np.int32)[idx][first]
      pair_labels = np.concatenate([pair_labels, extra[:, None]], axis=1)
    parts += [pair_images, pair_labels]
  train_images, train_labels, test_images, test_labels = parts
  return train_images, train_labels, test_images, test_labels


class TransferData(NamedTuple):
  """Source tasks labelled everywhere, a target task labelled on a few images.

  Attributes:
    data: the images and every task's labels (sources first, the target
      last), as a :class:`MultitaskData`.
    target_labelled: bool ``[N]``: the training images whose target label
      may be used (the test labels are all known).
  """

  data: MultitaskData
  target_labelled: np.ndarray


def digit_transfer(
  num_target: int = 200,
  num_train: int = 10_000,
  num_test: int = 2_000,
  *,
  offset: int = 2,
  seed: int = 0,
) -> TransferData:
  """Transfer learning on MultiDigits: two source tasks, one target task with few labels.

  The images are those of :func:`~optax_graddrop.problems.multidigits`. The
  source tasks ``"left"`` and ``"right"`` classify the two digits, labelled on
  all ``num_train`` training images. The target task ``"left_heavy_ink"``
  asks whether the top-left digit was written with more ink than the median
  of the 1,797 digits (the ``"heavy_ink"`` attribute of
  :data:`~optax_graddrop.problems.DIGIT_ATTRIBUTES`): related to the sources
  (it is about the same digit) but not implied by them (every class has both
  answers). Its labels may be used on ``num_target`` training images only.

  Args:
    num_target: training images whose target label is known.
    num_train: training images (all labelled for the sources).
    num_test: test images.
    offset: as for :func:`~optax_graddrop.problems.multidigits`.
    seed: fixes the split, the pairs and which images have target labels.

  Returns:
    A :class:`TransferData`; its ``data`` has three tasks (labels of the
    target in ``{0, 1}``) and ``num_classes=10``, the most of any task.

  Example:
    >>> from optax_graddrop.problems import digit_transfer
    >>> transfer = digit_transfer(num_target=5, num_train=20, num_test=4)
    >>> transfer.data.task_names, int(transfer.target_labelled.sum())
    (('left', 'right', 'left_heavy_ink'), 5)
  """
  if not 0 < num_target <= num_train:
    raise ValueError(f"`num_target` must be in [1, num_train={num_train}]; got {num_target}.")
  rng = np.random.default_rng(seed + 1)
  heavy_ink = DIGIT_ATTRIBUTES["heavy_ink"][1]
  parts = _digit_pairs(num_train, num_test, offset, 1 / 3, seed, rng, heavy_ink)
  labelled = np.zeros(num_train, bool)
  labelled[rng.choice(num_train, size=num_target, replace=False)] = True
  data = MultitaskData(*parts, task_names=("left", "right", "left_heavy_ink"), num_classes=10)
  return TransferData(data, labelled)


# An attribute: (images [N, 8, 8], labels [N]) -> bool [N].
_Attribute = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _classes(*digits: int) -> _Attribute:
  return lambda images, labels: np.isin(labels, digits)


def _above_median(statistic: Callable[[np.ndarray], np.ndarray]) -> _Attribute:
  def attribute(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    del labels
    values = statistic(images)
    return values > np.median(values)

  return attribute


def _ink(images: np.ndarray) -> np.ndarray:
  return images.sum(axis=(1, 2))


def _top_minus_bottom(images: np.ndarray) -> np.ndarray:
  return images[:, :4].sum(axis=(1, 2)) - images[:, 4:].sum(axis=(1, 2))


def _left_minus_right(images: np.ndarray) -> np.ndarray:
  return images[:, :, :4].sum(axis=(1, 2)) - images[:, :, 4:].sum(axis=(1, 2))


#: The binary tasks of :func:`~optax_graddrop.problems.digit_attributes`: name -> (description,
#: attribute). Nine depend on the class only; three on the handwriting itself
#: (true above the median over all 1,797 digits: for 49.3-49.5% of them, as
#: the digits at the median count as false).
DIGIT_ATTRIBUTES: dict[str, tuple[str, _Attribute]] = {
  "even": ("0, 2, 4, 6, 8", _classes(0, 2, 4, 6, 8)),
  "greater_than_4": ("5 to 9", _classes(5, 6, 7, 8, 9)),
  "prime": ("2, 3, 5, 7", _classes(2, 3, 5, 7)),
  "closed_loop": ("0, 6, 8, 9: a closed loop", _classes(0, 6, 8, 9)),
  "multiple_of_3": ("0, 3, 6, 9", _classes(0, 3, 6, 9)),
  "square": ("0, 1, 4, 9", _classes(0, 1, 4, 9)),
  "fibonacci": ("0, 1, 2, 3, 5, 8", _classes(0, 1, 2, 3, 5, 8)),
  "straight_strokes": ("1, 4, 7: no curves", _classes(1, 4, 7)),
  "mirror_symmetric": ("0, 1, 3, 8: symmetric top to bottom", _classes(0, 1, 3, 8)),
  "heavy_ink": ("more ink than the median digit", _above_median(_ink)),
  "top_heavy": ("top half - bottom half ink above the median", _above_median(_top_minus_bottom)),
  "left_heavy": ("left half - right half ink above the median", _above_median(_left_minus_right)),
}


def digit_attributes(*, test_fraction: float = 1 / 3, seed: int = 0) -> MultitaskData:
  """The 8x8 digits with the 12 binary attributes of :data:`~optax_graddrop.problems.DIGIT_ATTRIBUTES`.

  A stand-in for CelebA's 40 binary attributes: many related binary tasks
  on one image. The 1,797 digits are split once into train and test.

  Args:
    test_fraction: the share of the digits kept for test.
    seed: fixes the split.

  Returns:
    A :class:`MultitaskData` with 12 two-class tasks (labels 0/1).

  Example:
    >>> from optax_graddrop.problems import digit_attributes
    >>> data = digit_attributes()
    >>> data.train_images.shape, data.train_labels.shape, data.task_names[:3]
    ((1198, 8, 8, 1), (1198, 12), ('even', 'greater_than_4', 'prime'))
  """
  images, labels = _load_digits()
  attributes = np.stack([fn(images, labels) for _, fn in DIGIT_ATTRIBUTES.values()], axis=1)
  train_idx, test_idx = _split_indices(len(images), test_fraction, seed)
  return MultitaskData(
    images[train_idx, ..., None],
    attributes[train_idx].astype(np.int32),
    images[test_idx, ..., None],
    attributes[test_idx].astype(np.int32),
    task_names=tuple(DIGIT_ATTRIBUTES),
    num_classes=2,
  )
