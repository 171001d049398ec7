"""Tests of the Flax Linen GradDrop layer."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances

import optax_graddrop as ogd
from optax_graddrop import linen as ogd_linen

NUM_TASKS = 2


class MultiTask(nn.Module):
  leak: float = 0.0
  track_stats: bool = False

  @nn.compact
  def __call__(self, x, deterministic=False):
    shared = nn.relu(nn.Dense(32)(x))
    graddrop = ogd_linen.GradDrop(NUM_TASKS, leak=self.leak, track_stats=self.track_stats)
    branches = graddrop(shared, deterministic=deterministic)
    return jnp.concatenate([nn.Dense(1)(b) for b in branches], axis=-1)


def _data():
  x = jax.random.normal(jax.random.key(0), (128, 8))
  w = jax.random.normal(jax.random.key(1), (8, NUM_TASKS))
  return x, jnp.tanh(x @ w) * jnp.array([1.0, -1.0])


def test_linen_training_loop_under_jit():
  x, y = _data()
  model = MultiTask()
  params = model.init(jax.random.key(2), x, deterministic=True)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params, key):
    preds = model.apply(params, x, rngs={"graddrop": key})
    return jnp.sum(jnp.mean((preds - y) ** 2, axis=0))

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  initial = loss_fn(params, jax.random.key(0))
  key = jax.random.key(3)
  for _ in range(200):
    key, step_key = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, step_key)
  assert loss < 0.3 * initial, (initial, loss)


@jax.default_matmul_precision("highest")
def test_deterministic_and_full_leak_give_the_plain_gradient():
  x, y = _data()
  model = MultiTask()
  params = model.init(jax.random.key(2), x, deterministic=True)

  def loss_fn(params, model, **kwargs):
    return jnp.sum((model.apply(params, x, **kwargs) - y) ** 2)

  deterministic = jax.grad(loss_fn)(params, model, deterministic=True)
  leaked = jax.grad(loss_fn)(params, MultiTask(leak=1.0), rngs={"graddrop": jax.random.key(0)})
  # Sums over the inputs (8), the features (32), the batch (128), the tasks.
  tolerances.assert_sums_close(deterministic, leaked, terms=8 + 32 + 128 + NUM_TASKS)


def test_uses_the_graddrop_rng_stream():
  features = jax.random.normal(jax.random.key(0), (4, 64))
  layer = ogd_linen.GradDrop(2)
  key = jax.random.key(7)

  def loss(f, branch_fn):
    a, b = branch_fn(f)
    return jnp.sum(a * jnp.sin(jnp.arange(64.0))) - jnp.sum(b**2)

  def grad_with(stream_key):
    return jax.grad(loss)(features, lambda f: layer.apply({}, f, rngs={"graddrop": stream_key}))

  chex.assert_trees_all_equal(grad_with(key), jax.jit(grad_with)(key))
  assert not jnp.array_equal(grad_with(key), grad_with(jax.random.key(8)))
  # The two branches' cotangents conflict, so GradDrop changes the gradient.
  plain = jax.grad(loss)(features, lambda f: (f, f))
  assert not jnp.array_equal(grad_with(key), plain)


@pytest.mark.parametrize("leak", [jnp.array([0.0, 1.0]), np.array([0.0, 1.0])])
def test_leak_as_an_array_under_jit(leak):
  features = jax.random.normal(jax.random.key(0), (4, 6))

  def loss(f, branch_fn):
    a, b = branch_fn(f)
    return jnp.sum(a * jnp.arange(6.0)) - jnp.sum(b**2)

  def grad_with(leak):
    layer = ogd_linen.GradDrop(2, leak=leak)
    branches = lambda f: layer.apply({}, f, rngs={"graddrop": jax.random.key(7)})  # noqa: E731
    return jax.grad(loss)(features, branches)

  via_array = jax.jit(lambda: grad_with(leak))()
  tolerances.assert_sums_close(via_array, grad_with((0.0, 1.0)), terms=2)
  assert not jnp.allclose(via_array, grad_with(0.0))


# Diagnostics: the "perturbations" collection's `stats` is a probe whose gradient is
# the statistics.


class _DrawnKey(ogd_linen.GradDrop):
  """Returns the key that GradDrop draws in the same place."""

  @nn.compact
  def __call__(self, features, deterministic=None):
    del features, deterministic
    return self.make_rng(self.rng_collection)


def test_stats_match_graddrop_activation_with_the_drawn_key():
  features = jax.random.normal(jax.random.key(0), (8, 16))
  weights = jax.random.normal(jax.random.key(1), (NUM_TASKS, 16))
  layer = ogd_linen.GradDrop(NUM_TASKS, track_stats=True)
  variables = layer.init(jax.random.key(2), features, deterministic=True)
  chex.assert_trees_all_equal(variables["perturbations"]["stats"], ogd.stats_probe())
  key = jax.random.key(3)

  def task_loss(task, branch):
    return jnp.sum(jnp.tanh(branch * weights[task]))

  def loss(perturbations, features):
    branches = layer.apply({"perturbations": perturbations}, features, rngs={"graddrop": key})
    return sum(task_loss(i, b) for i, b in enumerate(branches))

  stats, grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["perturbations"], features)
  drawn = _DrawnKey(NUM_TASKS).apply({}, features, rngs={"graddrop": key})
  cotangents = [jax.grad(task_loss, argnums=1)(i, features) for i in range(NUM_TASKS)]
  combined, expected = jax.jit(lambda f, c, k: ogd.graddrop_activation(f, c, k, return_stats=True))(
    features, cotangents, drawn
  )
  tolerances.assert_sums_close(stats["stats"], expected, terms=1)
  assert expected.conflict_fraction > 0 and expected.kept_fraction < 1
  tolerances.assert_sums_close(grads, combined, terms=NUM_TASKS)


def test_stats_in_a_jitted_linen_step_and_only_with_the_collection():
  x, y = _data()
  model = MultiTask(track_stats=True)
  variables = model.init(jax.random.key(2), x, deterministic=True)
  params, perturbations = variables["params"], variables["perturbations"]

  def loss_fn(variables, key, deterministic=False):
    preds = model.apply(variables, x, deterministic=deterministic, rngs={"graddrop": key})
    return jnp.sum(jnp.mean((preds - y) ** 2, axis=0))

  @jax.jit
  def step(params, perturbations, key):
    def loss(params, perturbations):
      return loss_fn({"params": params, "perturbations": perturbations}, key)

    (grads, stats) = jax.grad(loss, argnums=(0, 1))(params, perturbations)
    return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), grads, stats

  plain_grad = jax.jit(jax.grad(lambda params, key: loss_fn({"params": params}, key)))
  key = jax.random.key(4)
  for _ in range(3):
    key, step_key = jax.random.split(key)
    new_params, grads, stats = step(params, perturbations, step_key)
    # Without the collection: no probe, and the same gradients (the same masks).
    # Sums over the inputs (8), the features (32), the batch (128), the tasks.
    tolerances.assert_sums_close(
      grads, plain_grad(params, step_key), terms=8 + 32 + 128 + NUM_TASKS
    )
    stats = stats["GradDrop_0"]["stats"]
    assert 0 < stats.conflict_fraction < 1 and 0 < stats.kept_fraction < 1
    params = new_params
  # Deterministic calls report that nothing was dropped.
  stats = jax.grad(loss_fn)(
    {"params": params, "perturbations": perturbations}, key, deterministic=True
  )["perturbations"]
  chex.assert_trees_all_equal(
    stats["GradDrop_0"]["stats"], ogd.GradDropStats(jnp.float32(0), jnp.float32(1))
  )


# docs/guide/usage.md, "Inside scans and per-example maps". The tasks' cotangents
# are +1 and -1 on every feature of a GradDrop layer's input: GradDrop keeps one
# task per feature, so the input's gradient is the sign of the task kept (summed
# over the batch), every call conflicts everywhere and keeps one task of two.
BATCH, FEATURES, STEPS = 2, 32, 3


class _Block(nn.Module):
  """A layer of a stack whose GradDrop mask is read off its parameter's gradient."""

  @nn.compact
  def __call__(self, h, _):
    p = self.param("p", nn.initializers.normal(1.0), (FEATURES,))
    a, b = ogd_linen.GradDrop(2, track_stats=True)(jnp.broadcast_to(p, h.shape))
    return h + a - b, None


class _Cell(nn.Module):
  """A cell reused over time steps; its GradDrop mask shows in the inputs' gradient."""

  @nn.compact
  def __call__(self, h, x):
    bias = self.param("bias", nn.initializers.zeros, (FEATURES,))
    a, b = ogd_linen.GradDrop(2, track_stats=True)(x + bias)
    return h + a - b, None


def test_a_layer_stack_in_nn_scan_gets_its_own_weights_masks_and_stats():
  stack = nn.scan(
    _Block,
    length=STEPS,
    variable_axes={"params": 0, "perturbations": 0},
    split_rngs={"params": True, "graddrop": True},
  )()
  h = jnp.zeros((BATCH, FEATURES))
  variables = stack.init({"params": jax.random.key(0), "graddrop": jax.random.key(1)}, h, None)
  assert (
    len(jnp.unique(variables["params"]["p"], axis=0)) == STEPS
  )  # each layer's own initial weights

  def grads(variables, key):
    loss = lambda v: jnp.sum(stack.apply(v, h, None, rngs={"graddrop": key})[0])  # noqa: E731
    return jax.grad(loss)(variables)

  first = jax.jit(grads)(variables, jax.random.key(2))
  chex.assert_trees_all_equal(grads(variables, jax.random.key(2)), first)
  p_grad = first["params"]["p"]
  chex.assert_trees_all_equal(jnp.abs(p_grad), jnp.full((STEPS, FEATURES), float(BATCH)))
  assert len(jnp.unique(jnp.sign(p_grad), axis=0)) == STEPS  # a mask per layer
  chex.assert_trees_all_equal(
    first["perturbations"]["GradDrop_0"]["stats"],
    ogd.GradDropStats(jnp.ones(STEPS), jnp.full(STEPS, 0.5)),
  )


def test_a_cell_in_nn_scan_draws_a_mask_and_reports_stats_per_step():
  cell = nn.scan(
    _Cell,
    variable_broadcast="params",
    variable_axes={"perturbations": 0},
    split_rngs={"params": False, "graddrop": True},
  )()
  h, xs = jnp.zeros((BATCH, FEATURES)), jnp.ones((STEPS, BATCH, FEATURES))
  variables = cell.init({"params": jax.random.key(0), "graddrop": jax.random.key(1)}, h, xs)
  chex.assert_shape(variables["params"]["bias"], (FEATURES,))  # shared by the steps

  @jax.jit
  def grads(variables, xs, key):
    loss = lambda v, xs: jnp.sum(cell.apply(v, h, xs, rngs={"graddrop": key})[0])  # noqa: E731
    return jax.grad(loss, argnums=(0, 1))(variables, xs)

  variable_grads, xs_grad = grads(variables, xs, jax.random.key(2))
  chex.assert_trees_all_equal(jnp.abs(xs_grad), jnp.ones_like(xs))
  assert len(jnp.unique(jnp.sign(xs_grad[:, 0]), axis=0)) == STEPS  # a mask per step
  chex.assert_trees_all_equal(
    variable_grads["perturbations"]["GradDrop_0"]["stats"],
    ogd.GradDropStats(jnp.ones(STEPS), jnp.full(STEPS, 0.5)),
  )
