"""Tests of the baseline aggregators (sum, mean, PCGrad, MGDA)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_graddrop as ogd


def _tree(task_vectors):
  """Splits [T, 7] vectors into a two-leaf pytree with a leading task axis."""
  v = jnp.asarray(task_vectors, jnp.float32)
  return {"w": v[:, :4].reshape(-1, 2, 2), "b": v[:, 4:]}


def _flat(tree):
  return np.concatenate([np.asarray(tree["w"]).ravel(), np.asarray(tree["b"]).ravel()])


def _pcgrad_terms(num_tasks):
  """Sums behind a PCGrad output of 7-vectors: up to T - 1 projections, each on a
  7-term inner product over a 7-term squared norm, then the sum over tasks."""
  return (num_tasks - 1) * (7 + 7) + num_tasks


def test_pcgrad_two_task_closed_form_on_a_pytree():
  g1 = np.array([1.0, 2.0, -1.0, 0.5, 0.0, 3.0, -2.0])
  g2 = np.array([-2.0, 0.5, 1.0, -1.0, 1.0, -1.0, 0.5])
  assert g1 @ g2 < 0
  expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
  out = ogd.pcgrad(_tree([g1, g2]), jax.random.key(0))
  tolerances.assert_sums_close(_flat(out), expected, terms=_pcgrad_terms(2))


def test_pcgrad_leaves_agreeing_gradients_unchanged():
  g = np.abs(np.random.default_rng(0).normal(size=(4, 7)))
  out = ogd.pcgrad(_tree(g), jax.random.key(0))
  tolerances.assert_sums_close(_flat(out), g.sum(0), terms=4)


def _reference_pcgrad(g, orders):
  projected = []
  for i in range(len(g)):
    v = g[i].copy()
    for j in orders[i]:
      dot = v @ g[j]
      if dot < 0:
        v = v - dot / (g[j] @ g[j]) * g[j]
    projected.append(v)
  return np.sum(projected, 0)


@pytest.mark.parametrize("num_tasks", [3, 5])
def test_pcgrad_matches_the_sequential_projection(num_tasks):
  g = np.random.default_rng(num_tasks).normal(size=(num_tasks, 7))
  key = jax.random.key(3)
  keys = jax.random.split(key, num_tasks)
  orders = [
    np.asarray(jax.random.permutation(keys[i], jnp.array([j for j in range(num_tasks) if j != i])))
    for i in range(num_tasks)
  ]
  out = ogd.pcgrad(_tree(g), key)
  expected = _reference_pcgrad(g, orders)
  tolerances.assert_sums_close(_flat(out), expected, terms=_pcgrad_terms(num_tasks))


def test_pcgrad_is_deterministic_given_the_key_and_the_order_matters():
  g = _tree(np.random.default_rng(1).normal(size=(4, 7)))
  chex.assert_trees_all_equal(ogd.pcgrad(g, jax.random.key(0)), ogd.pcgrad(g, jax.random.key(0)))
  outs = {tuple(_flat(ogd.pcgrad(g, jax.random.key(k))).round(5)) for k in range(8)}
  assert len(outs) > 1


def test_mgda_two_task_closed_form_on_a_pytree():
  rng = np.random.default_rng(2)
  for _ in range(5):
    g1, g2 = rng.normal(size=(2, 7))
    alpha = np.clip(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1)
    out = ogd.mgda(_tree([g1, g2]))
    np.testing.assert_allclose(_flat(out), alpha * g1 + (1 - alpha) * g2, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_mgda_has_minimal_norm_among_convex_combinations(num_tasks, seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(num_tasks, 7)) + rng.normal(size=7)  # often a common direction
  out_norm = np.linalg.norm(_flat(ogd.mgda(_tree(g))))
  combos = rng.dirichlet(np.ones(num_tasks), size=500)
  assert out_norm <= np.linalg.norm(combos @ g, axis=1).min() + 1e-4
  weights = np.asarray(ogd.mgda_weights(jnp.asarray(g @ g.T, jnp.float32)))
  assert np.all(weights >= -1e-6) and abs(weights.sum() - 1) < 1e-5


def test_sum_and_mean():
  g = _tree(np.random.default_rng(3).normal(size=(3, 7)))
  tolerances.assert_sums_close(ogd.sum_tasks(g), jax.tree.map(lambda x: x.sum(0), g), terms=3)
  tolerances.assert_sums_close(ogd.mean_tasks(g), jax.tree.map(lambda x: x.mean(0), g), terms=3)


@pytest.mark.parametrize(
  "fn", [lambda g: ogd.pcgrad(g, jax.random.key(0)), ogd.mgda, ogd.sum_tasks, ogd.mean_tasks]
)
def test_jit_and_eager_agree(fn):
  g = _tree(np.random.default_rng(4).normal(size=(4, 7)))
  # MGDA's weights come from a 7-term Gram matrix: as many sums as PCGrad's.
  tolerances.assert_sums_close(fn(g), jax.jit(fn)(g), terms=_pcgrad_terms(4))


@pytest.mark.parametrize(
  "aggregator",
  [
    lambda: ogd.pcgrad_transform(0),
    lambda: ogd.mgda_transform(),
    lambda: ogd.sum_transform(),
    lambda: ogd.mean_transform(),
    lambda: ogd.graddrop_transform(0, keep="random"),
  ],
)
def test_each_aggregator_trains_in_a_jitted_chain(aggregator):
  x = jax.random.normal(jax.random.key(0), (64, 5))
  targets = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1], -x[:, 2]])
  params = {
    "trunk": 0.3 * jax.random.normal(jax.random.key(1), (5, 16)),
    "heads": jnp.zeros((3, 16)),
  }

  def task_losses(params):
    features = jnp.tanh(x @ params["trunk"])
    return jnp.mean((features @ params["heads"].T - targets.T) ** 2, axis=0)

  tx = optax.chain(aggregator(), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    updates, state = tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  initial = task_losses(params)
  for _ in range(200):
    params, state = step(params, state)
  assert jnp.all(task_losses(params) < 0.5 * initial)
  assert int(state[0].count) == 200


@pytest.mark.parametrize("fn", [ogd.mgda, ogd.sum_tasks, ogd.mean_tasks])
def test_bad_input_is_rejected(fn):
  with pytest.raises(ValueError, match="share the leading task axis"):
    fn({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})
  with pytest.raises(TypeError, match="`key`"):
    ogd.pcgrad(jnp.ones((2, 3)), 0)
