"""Tests of loss weighting: static weights, uncertainty weighting, GradNorm."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances

import optax_graddrop as ogd


def test_weight_tasks_equals_weighting_the_losses():
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}

  def task_losses(p):
    return jnp.stack([jnp.sum(p["w"] ** 2) + p["b"], jnp.sum(jnp.sin(p["w"])) * p["b"]])

  weights = jnp.array([0.3, 2.0])
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
  _, weighted_grads = ogd.per_task_value_and_grad(lambda p: weights * task_losses(p))(params)
  tolerances.assert_sums_close(ogd.weight_tasks(task_grads, weights), weighted_grads, terms=3)
  # Composes with any aggregator in one line.
  out = ogd.graddrop(ogd.weight_tasks(task_grads, weights), jax.random.key(0), leak=1.0)
  tolerances.assert_sums_close(out, jax.tree.map(lambda g: g.sum(0), weighted_grads), terms=3)
  with pytest.raises(ValueError, match=r"`weights` must have shape \(2,\)"):
    ogd.weight_tasks(task_grads, jnp.ones(3))


def test_uncertainty_weighting_learns_the_task_noise():
  # Two regressions of the same signal with noise std 0.1 and 1.0: the
  # log-variances should approach log(0.01) and log(1), and the noisy task
  # should end up with the smaller weight exp(-s).
  kx, k1, k2 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2048, 4))
  signal = x @ jnp.array([1.0, -2.0, 0.5, 0.0])
  targets = jnp.stack(
    [signal + 0.1 * jax.random.normal(k1, (2048,)), signal + jax.random.normal(k2, (2048,))]
  )
  params = {"w": jnp.zeros((2, 4)), "log_var": jnp.zeros(2)}

  def weighted_losses(p):
    mse = jnp.mean((p["w"] @ x.T - targets) ** 2, axis=1)
    return ogd.uncertainty_weighted_losses(mse, p["log_var"])

  tx = optax.chain(ogd.graddrop_transform(0), optax.adam(3e-2))
  state = tx.init(params)

  @jax.jit
  def step(p, state):
    _, task_grads = ogd.per_task_value_and_grad(weighted_losses)(p)
    updates, state = tx.update(task_grads, state, p)
    return optax.apply_updates(p, updates), state

  for _ in range(1500):
    params, state = step(params, state)
  np.testing.assert_allclose(params["log_var"], jnp.log(jnp.array([0.01, 1.0])), atol=0.25)
  weights = jnp.exp(-params["log_var"])
  assert weights[0] > 20 * weights[1]


def test_gradnorm_equalises_weighted_gradient_norms():
  # Two tasks whose losses differ in scale by 10x: their gradient norms at
  # the shared layer do too. With alpha = 0, GradNorm drives w_i |grad_i| to
  # be equal.
  x = jax.random.normal(jax.random.key(0), (256, 6))
  y = jnp.tanh(x @ jax.random.normal(jax.random.key(1), (6, 2)))
  params = {
    "shared": 0.3 * jax.random.normal(jax.random.key(2), (6, 8)),
    "heads": jnp.ones((2, 8)) / 8,
  }

  def task_losses(p):
    preds = jnp.tanh(x @ p["shared"]) @ p["heads"].T
    return jnp.array([1.0, 10.0]) * jnp.mean((preds - y) ** 2, axis=0)

  gn = ogd.gradnorm(2, alpha=0.0)
  gn_state = gn.init()
  tx = optax.chain(ogd.mean_transform(), optax.sgd(1e-3))
  opt_state = tx.init(params)

  @jax.jit
  def step(p, opt_state, gn_state):
    losses, task_grads = ogd.per_task_value_and_grad(task_losses)(p)
    weighted = ogd.weight_tasks(task_grads, gn_state.weights)
    gn_state = gn.update(gn_state, losses, task_grads["shared"])
    updates, opt_state = tx.update(weighted, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, gn_state, task_grads["shared"]

  for _ in range(400):
    params, opt_state, gn_state, shared_grads = step(params, opt_state, gn_state)
  norms = jnp.linalg.norm(shared_grads.reshape(2, -1), axis=1)
  assert norms[1] > 5 * norms[0]  # unweighted: very different
  weighted_norms = gn_state.weights * norms
  assert 0.8 < float(weighted_norms[0] / weighted_norms[1]) < 1.25, weighted_norms
  np.testing.assert_allclose(gn_state.weights.sum(), 2.0, rtol=1e-5)
  assert int(gn_state.count) == 400


def test_gradnorm_alpha_favours_the_slower_task():
  # With equal gradient norms but task 1 far from its start (ratio 1) and task
  # 2 already trained down (ratio 0.1), alpha > 0 gives task 1 more weight.
  gn = ogd.gradnorm(2, alpha=1.0)
  state = gn.init()
  grads = jnp.ones((2, 5))
  state = gn.update(state, jnp.array([1.0, 1.0]), grads)
  for _ in range(100):
    state = gn.update(state, jnp.array([1.0, 0.1]), grads)
  assert state.weights[0] > 1.5 * state.weights[1]


def test_weighting_rejects_bad_shapes():
  with pytest.raises(ValueError, match="both have shape"):
    ogd.uncertainty_weighted_losses(jnp.ones(2), jnp.ones(3))
  with pytest.raises(ValueError, match="`num_tasks`"):
    ogd.gradnorm(0)
  gn = ogd.gradnorm(2)
  with pytest.raises(ValueError, match="built for 2 tasks"):
    gn.update(gn.init(), jnp.ones(3), jnp.ones((3, 4)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_weighting_rejects_weights_and_losses_that_are_not_real(jit):
  maybe_jit = jax.jit if jit else (lambda f: f)
  weight_tasks = maybe_jit(ogd.weight_tasks)
  uncertainty = maybe_jit(ogd.uncertainty_weighted_losses)
  grads = jnp.ones((2, 3))
  # A complex weight's imaginary part was dropped, and bools taken as 0 and 1.
  for weights in (jnp.array([1 + 1j, 2j]), jnp.array([True, False])):
    with pytest.raises(TypeError, match=r"`weights` must hold real numbers .* got dtype"):
      weight_tasks(grads, weights)
  with pytest.raises(TypeError, match=r"`losses` must hold real numbers .* complex64"):
    uncertainty(jnp.array([1 + 1j, 2.0]), jnp.zeros(2))
  with pytest.raises(TypeError, match=r"`log_variances` must hold real numbers .* complex64"):
    uncertainty(jnp.ones(2), jnp.array([0j, 1.0]))
  gn = ogd.gradnorm(2)
  with pytest.raises(TypeError, match=r"`losses` must hold real numbers .* complex64"):
    maybe_jit(gn.update)(gn.init(), jnp.array([1 + 1j, 2.0]), grads)
  # Real weights and losses, ints included, work as before.
  chex.assert_trees_all_equal(
    weight_tasks(grads, jnp.array([1, 3])), grads * jnp.array([[1.0], [3.0]])
  )
  chex.assert_trees_all_close(
    uncertainty(jnp.array([1, 4]), jnp.zeros(2, jnp.int32)), jnp.array([1.0, 4.0])
  )


def _gradnorm_reference(weights, ratios, grad_norms, alpha, learning_rate):
  """One GradNorm step with SGD on the weights, from the paper's formula."""
  inverse_rates = ratios / ratios.mean()
  weighted_norms = weights * grad_norms
  target = weighted_norms.mean() * inverse_rates**alpha
  new = np.maximum(weights - learning_rate * np.sign(weighted_norms - target) * grad_norms, 1e-6)
  return new * len(new) / new.sum()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradnorm_records_a_task_initial_loss_at_its_first_positive_loss(jit):
  # Task 0's loss is 0 at the first update (e.g. a masked loss without labels in
  # the batch): 0/0 made every weight NaN forever. Its ratio is now 1 until its
  # loss is positive, and that loss is its L_0(0).
  alpha, learning_rate = 1.5, 0.1
  gn = ogd.gradnorm(2, alpha=alpha, optimizer=optax.sgd(learning_rate))
  update = jax.jit(gn.update) if jit else gn.update
  grads = {"w": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
  grad_norms = np.linalg.norm(np.asarray(grads["w"]), axis=1)
  state = gn.init()
  steps = [
    ([0.0, 1.0], [1.0, 1.0], [0.0, 1.0]),  # losses, ratios, initial losses after the step
    ([0.5, 1.0], [1.0, 1.0], [0.5, 1.0]),
    ([0.4, 0.9], [0.8, 0.9], [0.5, 1.0]),  # the paper's formula from here on
    ([0.3, 0.8], [0.6, 0.8], [0.5, 1.0]),
  ]
  for losses, ratios, initial in steps:
    expected = _gradnorm_reference(
      np.asarray(state.weights, np.float64), np.array(ratios), grad_norms, alpha, learning_rate
    )
    state = update(state, jnp.array(losses), grads)
    chex.assert_tree_all_finite(state)
    chex.assert_trees_all_close(state.weights, expected.astype(np.float32), rtol=1e-6)
    chex.assert_trees_all_equal(state.initial_losses, jnp.array(initial))
  # Every loss trained down to 0: equal rates, finite weights.
  expected = _gradnorm_reference(
    np.asarray(state.weights, np.float64), np.ones(2), grad_norms, alpha, learning_rate
  )
  state = update(state, jnp.zeros(2), grads)
  chex.assert_tree_all_finite(state)
  chex.assert_trees_all_close(state.weights, expected.astype(np.float32), rtol=1e-6)
