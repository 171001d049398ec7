"""The offline multitask problems: landscapes, Pareto set, digit data."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import optax_graddrop as ogd
from optax_graddrop import problems


@pytest.mark.parametrize("jit", [False, True])
def test_two_objective_losses_at_known_points(jit):
  losses = jax.jit(problems.two_objective_losses) if jit else problems.two_objective_losses
  # On the Pareto set's middle both losses are equal (the landscape is
  # symmetric under x1 -> -x1 with the tasks swapped).
  middle = losses(jnp.array([0.0, -8.3551]))
  chex.assert_shape(middle, (2,))
  np.testing.assert_allclose(middle[0], middle[1], rtol=1e-6)
  swapped = losses(jnp.array([-3.0, -2.0]))[::-1]
  np.testing.assert_allclose(losses(jnp.array([3.0, -2.0])), swapped, rtol=1e-6)


def test_pareto_set_is_pareto_stationary():
  points = problems.two_objective_pareto_set(21)
  assert points.dtype == np.float64 and points.shape == (21, 2)
  np.testing.assert_allclose(points[[0, -1], 0], [-7.0, 7.0])
  assert np.all(np.diff(points[:, 0]) > 0)
  jacobians = jax.vmap(jax.jacrev(problems.two_objective_losses))(jnp.asarray(points, jnp.float32))
  # MGDA's min-norm combination of the two gradients vanishes on the set...
  min_norms = jax.vmap(lambda j: jnp.linalg.norm(ogd.mgda(j)))(jacobians)
  assert float(min_norms.max()) < 1e-3
  # ... and not at a point off it.
  off = jax.jacrev(problems.two_objective_losses)(jnp.array([0.0, -7.0]))
  assert float(jnp.linalg.norm(ogd.mgda(off))) > 0.01


def test_two_objective_losses_rejects_wrong_shape():
  with pytest.raises(ValueError, match=r"`x` must have shape \(2,\)"):
    problems.two_objective_losses(jnp.zeros(3))


def test_multi_minimum_losses_have_one_joint_minimum():
  xs = jnp.linspace(-10.0, 10.0, 20001)
  losses = jax.vmap(problems.multi_minimum_losses)(xs)
  grads = jax.vmap(jax.jacrev(problems.multi_minimum_losses))(xs)
  chex.assert_shape((losses, grads), (20001, 2))
  assert float(losses.min()) == 0.0
  # Both losses are (near) zero only around x = 0 ...
  joint = np.asarray(xs[jnp.all(losses < 1e-3, axis=1)])
  assert joint.size > 0 and np.all(np.abs(joint) < 0.05)

  # ... but each loss, and their sum, has local minima elsewhere.
  def local_minima(values):
    values = np.asarray(values)
    inner = (values[1:-1] < values[:-2]) & (values[1:-1] < values[2:])
    return np.asarray(xs[1:-1])[inner]

  for values in (losses[:, 0], losses[:, 1], losses.sum(1)):
    minima = local_minima(values)
    assert np.any(np.abs(minima) < 0.01) and np.sum(np.abs(minima) > 1.0) >= 4
  # No other place is a minimum of both.
  first, second = local_minima(losses[:, 0]), local_minima(losses[:, 1])
  gaps = np.abs(first[:, None] - second[None, :]).min(axis=1)
  assert np.sum(gaps < 0.2) == 1


def test_multi_minimum_losses_rejects_arrays():
  with pytest.raises(ValueError, match="`x` must be a scalar"):
    problems.multi_minimum_losses(jnp.zeros(2))


def test_overlay_takes_the_pixelwise_max_at_the_offset():
  images = np.stack([np.full((8, 8), 0.25, np.float32), np.eye(8, dtype=np.float32)])
  labels = np.array([3, 7], np.int32)
  rng = np.random.default_rng(0)
  canvas, pair_labels, first = problems._overlay_pairs(images, labels, 64, 2, rng)
  chex.assert_shape(canvas, (64, 10, 10, 1))
  np.testing.assert_array_equal(labels[first], pair_labels[:, 0])
  for sample, (first, second) in zip(canvas[..., 0], pair_labels):
    top_left, bottom_right = images[labels == first][0], images[labels == second][0]
    expected = np.zeros((10, 10), np.float32)
    expected[:8, :8] = top_left
    expected[2:, 2:] = np.maximum(expected[2:, 2:], bottom_right)
    np.testing.assert_array_equal(sample, expected)
  assert len({tuple(p) for p in pair_labels}) == 4


def test_multidigits_splits_the_source_digits():
  train_idx, test_idx = problems._split_indices(1797, 1 / 3, seed=0)
  assert len(np.intersect1d(train_idx, test_idx)) == 0
  assert len(train_idx) + len(test_idx) == 1797 and len(test_idx) == 599
  data = problems.multidigits(num_train=256, num_test=64)
  chex.assert_shape([data.train_images, data.test_images], (None, 10, 10, 1))
  chex.assert_shape([data.train_labels, data.test_labels], (None, 2))
  assert data.train_images.min() >= 0.0 and data.train_images.max() <= 1.0
  assert set(np.unique(data.train_labels)) == set(range(10))
  again = problems.multidigits(num_train=256, num_test=64)
  np.testing.assert_array_equal(data.train_images, again.train_images)
  other = problems.multidigits(num_train=256, num_test=64, seed=1)
  assert not np.array_equal(data.train_images, other.train_images)


def test_digit_attributes_follow_their_definitions():
  data = problems.digit_attributes()
  names = list(problems.DIGIT_ATTRIBUTES)
  assert len(names) >= 10 and data.task_names == tuple(names)
  labels = np.concatenate([data.train_labels, data.test_labels])
  assert labels.shape == (1797, len(names)) and set(np.unique(labels)) == {0, 1}
  # The split keeps the original order within each part; recover the classes.
  train_idx, test_idx = problems._split_indices(1797, 1 / 3, seed=0)
  classes = load_digits().target[np.concatenate([train_idx, test_idx])]
  np.testing.assert_array_equal(labels[:, names.index("even")], classes % 2 == 0)
  np.testing.assert_array_equal(labels[:, names.index("prime")], np.isin(classes, [2, 3, 5, 7]))
  for name in ("heavy_ink", "top_heavy", "left_heavy"):
    assert abs(labels[:, names.index(name)].mean() - 0.5) < 0.01


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [({"test_fraction": 1.0}, "`test_fraction`"), ({"offset": 9}, "`offset`")],
)
def test_multidigits_rejects_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    problems.multidigits(num_train=4, num_test=4, **kwargs)


def test_digit_transfer_adds_a_sparsely_labelled_target():
  transfer = problems.digit_transfer(num_target=50, num_train=512, num_test=128, seed=3)
  data = transfer.data
  assert data.task_names == ("left", "right", "left_heavy_ink")
  # The images and source labels are MultiDigits' own.
  plain = problems.multidigits(num_train=512, num_test=128, seed=3)
  np.testing.assert_array_equal(data.train_images, plain.train_images)
  np.testing.assert_array_equal(data.test_labels[:, :2], plain.test_labels)
  chex.assert_shape(transfer.target_labelled, (512,))
  assert transfer.target_labelled.dtype == bool and transfer.target_labelled.sum() == 50
  target = np.concatenate([data.train_labels[:, 2], data.test_labels[:, 2]])
  assert set(np.unique(target)) == {0, 1}
  # Related to the left digit but not implied by its class: some classes
  # have both answers.
  left = np.concatenate([data.train_labels[:, 0], data.test_labels[:, 0]])
  mixed = [c for c in range(10) if len(np.unique(target[left == c])) == 2]
  assert len(mixed) >= 5
  # The target is the top-left digit's heavy_ink attribute: redraw the pairs.
  digits = load_digits()
  ink = digits.images.sum(axis=(1, 2))
  heavy = (ink > np.median(ink)).astype(np.int32)
  train_idx, _ = problems._split_indices(1797, 1 / 3, seed=3)
  images, labels = problems._load_digits()
  rng = np.random.default_rng(3 + 1)
  _, _, first = problems._overlay_pairs(images[train_idx], labels[train_idx], 512, 2, rng)
  np.testing.assert_array_equal(data.train_labels[:, 2], heavy[train_idx][first])


def test_digit_transfer_rejects_bad_target_sizes():
  with pytest.raises(ValueError, match="`num_target`"):
    problems.digit_transfer(num_target=0, num_train=8, num_test=4)
  with pytest.raises(ValueError, match="`num_target`"):
    problems.digit_transfer(num_target=9, num_train=8, num_test=4)
  with pytest.raises(ValueError, match="`offset`"):
    problems.digit_transfer(num_target=4, num_train=8, num_test=4, offset=9)
