"""Tests of the Flax NNX GradDrop layer, including a jitted training loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from flax import nnx

import optax_graddrop as ogd
from optax_graddrop import nnx as ogd_nnx

NUM_TASKS = 3


class MultiTask(nnx.Module):
  """Shared trunk, GradDrop at the shared representation, one head per task."""

  def __init__(self, *, rngs: nnx.Rngs, **graddrop_options):
    self.trunk = nnx.Linear(8, 32, rngs=rngs)
    self.graddrop = ogd_nnx.GradDrop(NUM_TASKS, rngs=rngs, **graddrop_options)
    self.heads = nnx.List([nnx.Linear(32, 1, rngs=rngs) for _ in range(NUM_TASKS)])

  def __call__(self, x):
    shared = nnx.relu(self.trunk(x))
    branches = self.graddrop(shared)
    return jnp.concatenate([head(b) for head, b in zip(self.heads, branches)], axis=-1)


def _data():
  x = jax.random.normal(jax.random.key(0), (128, 8))
  w = jax.random.normal(jax.random.key(1), (8, NUM_TASKS))
  return x, jnp.tanh(x @ w) * jnp.array([1.0, -1.0, 0.5])


def _loss(model, x, y):
  return jnp.sum(jnp.mean((model(x) - y) ** 2, axis=0))


def test_nnx_training_loop_with_optax():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  initial = _loss(model, x, y)
  for _ in range(200):
    loss = train_step(model, optimizer, x, y)
  assert loss < 0.3 * initial, (initial, loss)


def test_each_call_draws_a_fresh_key():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1))
  first = nnx.grad(_loss)(model, x, y)
  second = nnx.grad(_loss)(model, x, y)
  assert not jnp.array_equal(first["trunk"]["kernel"][...], second["trunk"]["kernel"][...])
  # Heads are downstream of GradDrop: their gradients do not change.
  chex.assert_trees_all_close(first["heads"], second["heads"])


@jax.default_matmul_precision("highest")
def test_deterministic_gives_the_plain_gradient():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), deterministic=True)
  grads = nnx.grad(_loss)(model, x, y)
  plain = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), leak=1.0)
  # Sums over the inputs (8), the features (32), the batch (128), the tasks (3).
  expected = nnx.state(nnx.grad(_loss)(plain, x, y))
  tolerances.assert_sums_close(nnx.state(grads), expected, terms=8 + 32 + 128 + NUM_TASKS)
  # The call flag overrides the constructor's.
  layer = ogd_nnx.GradDrop(2)
  chex.assert_trees_all_equal(layer(jnp.ones(3), deterministic=True), (jnp.ones(3),) * 2)


def test_matches_fork_with_the_drawn_key():
  features = jax.random.normal(jax.random.key(0), (4, 6))
  layer = ogd_nnx.GradDrop(2, rngs=nnx.Rngs(graddrop=3))
  expected_key = nnx.Rngs(graddrop=3)["graddrop"].fork()()

  def loss(split, f):
    a, b = split(f)
    return jnp.sum(a * jnp.arange(6.0)) - jnp.sum(b**2)

  via_layer = nnx.grad(loss, argnums=1)(layer, features)
  via_fork = jax.grad(loss, argnums=1)(lambda f: ogd.fork(f, expected_key, 2), features)
  chex.assert_trees_all_equal(via_layer, via_fork)


def test_key_or_rngs_at_call_time():
  layer = ogd_nnx.GradDrop(2)
  with pytest.raises(ValueError, match="no rngs"):
    layer(jnp.ones((2, 3)))
  assert len(layer(jnp.ones((2, 3)), rngs=jax.random.key(0))) == 2
  assert len(layer(jnp.ones((2, 3)), rngs=nnx.Rngs(graddrop=0))) == 2
  with pytest.raises(TypeError, match="rngs"):
    ogd_nnx.GradDrop(2, rngs=0)


def _three_branch_loss(split, features):
  a, b, c = split(features)
  return jnp.sum(a * jnp.arange(6.0)) - jnp.sum(b**2) + jnp.sum(jnp.cos(c))


@pytest.mark.parametrize("leak", [jnp.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0])])
def test_leak_as_an_array_under_nnx_jit_and_split_merge(leak):
  features = jax.random.normal(jax.random.key(0), (4, 6))
  keys = nnx.Rngs(graddrop=3)["graddrop"].fork()
  first_key, second_key = keys(), keys()

  def expected(key, leak):
    return jax.grad(_three_branch_loss, argnums=1)(
      lambda f: ogd.fork(f, key, 3, leak=leak), features
    )

  grad_fn = nnx.grad(_three_branch_loss, argnums=1)
  layer = ogd_nnx.GradDrop(3, leak=leak, rngs=nnx.Rngs(graddrop=3))
  # The combined cotangent sums the three tasks' in both.
  tolerances.assert_sums_close(grad_fn(layer, features), expected(first_key, leak), terms=3)
  tolerances.assert_sums_close(
    nnx.jit(grad_fn)(layer, features), expected(second_key, leak), terms=3
  )
  # The leak is used: the third task's cotangent always passes.
  assert not jnp.allclose(expected(first_key, leak), expected(first_key, 0.0))

  graphdef, state = nnx.split(ogd_nnx.GradDrop(3, leak=leak, rngs=nnx.Rngs(graddrop=3)))

  @jax.jit
  def functional_step(state, features):
    layer = nnx.merge(graphdef, state)
    return grad_fn(layer, features), nnx.state(layer)

  grads, state = functional_step(state, features)
  tolerances.assert_sums_close(grads, expected(first_key, leak), terms=3)
  grads, _ = functional_step(state, features)
  tolerances.assert_sums_close(grads, expected(second_key, leak), terms=3)


@pytest.mark.parametrize(
  "option", [{"scale": jnp.float32(0.5)}, {"scale": np.array(3.0)}, {"eps": np.array(1e-3)}]
)
def test_scale_and_eps_as_arrays_equal_python_floats(option):
  features = jax.random.normal(jax.random.key(0), (4, 6))
  grad_fn = nnx.jit(nnx.grad(_three_branch_loss, argnums=1))
  as_float = {name: float(value) for name, value in option.items()}
  layers = [ogd_nnx.GradDrop(3, rngs=nnx.Rngs(graddrop=3), **o) for o in (option, as_float)]
  chex.assert_trees_all_equal(*(grad_fn(layer, features) for layer in layers))


def test_leak_traced_at_construction_and_checked_when_concrete():
  features = jax.random.normal(jax.random.key(0), (4, 6))
  key = nnx.Rngs(graddrop=3)["graddrop"].fork()()

  @jax.jit
  def build_and_grad(leak):
    layer = ogd_nnx.GradDrop(3, leak=leak, rngs=nnx.Rngs(graddrop=3))
    return nnx.grad(_three_branch_loss, argnums=1)(layer, features)

  leak = jnp.array([0.0, 0.5, 1.0])
  expected = jax.grad(_three_branch_loss, argnums=1)(
    lambda f: ogd.fork(f, key, 3, leak=leak), features
  )
  tolerances.assert_sums_close(build_and_grad(leak), expected, terms=3)
  with pytest.raises(ValueError, match=r"`leak` must be a scalar or have shape \(3,\)"):
    ogd_nnx.GradDrop(3, leak=jnp.zeros(2))
  with pytest.raises(ValueError, match=r"`leak` must lie in \[0, 1\]"):
    ogd_nnx.GradDrop(3, leak=np.array([0.0, 2.0, 0.0]))


class DropoutNet(nnx.Module):
  """A model with rng state: dropout between the trunk and the task heads."""

  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(8, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.heads = nnx.Linear(16, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    return self.heads(self.dropout(nnx.relu(self.trunk(x))))


@pytest.mark.parametrize(
  "value_and_grad",
  [ogd.per_task_value_and_grad, lambda fn: ogd.graddrop_value_and_grad(fn, jax.random.key(0))],
  ids=["per_task_value_and_grad", "graddrop_value_and_grad"],
)
def test_a_module_with_rng_state_gets_a_clear_error(value_and_grad):
  # jax.vjp would give its key and counter float0 cotangents and silently
  # freeze its dropout stream.
  def task_losses(model):
    return jnp.mean(model(jnp.ones((2, 8))) ** 2, axis=0)

  with pytest.raises(TypeError, match=r"`args\[0\]\.dropout\.rngs\..*nnx.split\(model, nnx.Param"):
    value_and_grad(task_losses)(DropoutNet(nnx.Rngs(0)))


def _parameter_level_step(value_and_grad):
  """The recipe of docs/guide/usage.md, 'NNX models with rng state'."""

  @nnx.jit
  def train_step(model, optimizer, x, y, key):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_losses(params, rest):
      model = nnx.merge(graphdef, params, rest, copy=True)
      losses = jnp.mean((model(x) - y) ** 2, axis=0)
      return losses, nnx.state(model, nnx.Not(nnx.Param))  # the advanced rng state

    (losses, rest), grads = value_and_grad(task_losses, key)(params, rest)
    nnx.update(model, rest)
    optimizer.update(model, grads)
    return losses

  return train_step


@pytest.mark.parametrize("level", ["streaming", "stacked"])
def test_parameter_level_recipe_advances_the_dropout_stream(level):
  x, y = _data()
  if level == "streaming":
    tx = optax.sgd(0.0)  # frozen parameters: only the dropout masks change the losses

    def value_and_grad(fn, key):
      return ogd.graddrop_value_and_grad(fn, key, has_aux=True, chunk_size=1)
  else:
    tx = optax.chain(ogd.graddrop_transform(0), optax.sgd(0.0))

    def value_and_grad(fn, key):
      del key  # the transform keeps its own
      return ogd.per_task_value_and_grad(fn, has_aux=True)

  model = DropoutNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = _parameter_level_step(value_and_grad)
  counts = [int(model.dropout.rngs.count[...])]
  losses = []
  for step in range(2):
    losses.append(train_step(model, optimizer, x, y, jax.random.key(step)))
    counts.append(int(model.dropout.rngs.count[...]))
  assert counts == [counts[0], counts[0] + 1, counts[0] + 2]
  # Same parameters and data: different losses mean different dropout masks.
  assert not jnp.allclose(losses[0], losses[1])
  assert int(optimizer.step[...]) == 2


def test_streaming_names_what_to_pass_for_a_module_with_rng_state():
  from optax_graddrop import _validation

  model = DropoutNet(nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"`args\[0\]\.dropout\.rngs\..*nnx.split\(model, nnx.Param"):
    _validation.check_differentiable(model)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  _validation.check_differentiable(params)


def _trunk_grad(model, x, y):
  return nnx.grad(_loss)(model, x, y)["trunk"]["kernel"][...]


def test_a_checkpoint_needs_the_rng_state_or_the_masks_replay():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1))
  first = _trunk_grad(model, x, y)
  # Snapshots, as a checkpointer stores them (nnx.state shares the variables).
  everything = jax.tree.map(jnp.copy, nnx.state(model))
  weights_only = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  second = _trunk_grad(model, x, y)
  assert not jnp.array_equal(first, second)

  def resumed(saved):  # a restart builds the model as the run did, then restores
    model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1))
    nnx.update(model, saved)
    return _trunk_grad(model, x, y)

  np.testing.assert_array_equal(resumed(everything), second)
  np.testing.assert_array_equal(resumed(weights_only), first)  # the stream restarted


@jax.default_matmul_precision("highest")
def test_a_sum_baseline_with_a_leak_of_one_survives_train_and_eval():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), deterministic=True)
  plain = nnx.grad(_loss)(model, x, y)
  model.train()  # sets deterministic=False on every layer: now GradDrop
  trunk = lambda grads: grads["trunk"]["kernel"][...]  # noqa: E731
  assert not jnp.allclose(trunk(nnx.grad(_loss)(model, x, y)), trunk(plain), rtol=1e-3)
  baseline = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), leak=1.0)
  for mode in (baseline.train, baseline.eval):
    mode()
    # Sums over the inputs (8), the features (32), the batch (128), the tasks (3).
    tolerances.assert_sums_close(
      nnx.state(nnx.grad(_loss)(baseline, x, y)), nnx.state(plain), terms=8 + 32 + 128 + 3
    )


# Diagnostics: the layer's Stats variable is a probe whose gradient is the statistics.
STATS_WRT = nnx.DiffState(0, (nnx.Param, ogd_nnx.Stats))
# The gradients sum over the inputs (8), the features (32), the batch (128), the tasks.
GRAD_TERMS = 8 + 32 + 128 + NUM_TASKS


@nnx.jit
def _expected_stats(model, x, y, key):
  """The statistics of GradDrop of the heads' cotangents of the shared features."""
  features = nnx.relu(model.trunk(x))

  def task_loss(task, features):
    return jnp.mean((model.heads[task](features)[:, 0] - y[:, task]) ** 2)

  cotangents = [jax.grad(task_loss, argnums=1)(i, features) for i in range(NUM_TASKS)]
  return ogd.graddrop_activation(features, cotangents, key, return_stats=True)[1]


@nnx.jit
def _grads_and_stats(model, x, y):
  grads = nnx.grad(_loss, argnums=STATS_WRT)(model, x, y)
  grads, stats = nnx.split_state(grads, nnx.Param, ogd_nnx.Stats)
  return grads, stats["graddrop"]["stats"].get_value()


_plain_grads = nnx.jit(nnx.grad(_loss))


@jax.default_matmul_precision("highest")
def test_stats_in_an_nnx_training_step():
  x, y = _data()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(_loss, argnums=STATS_WRT)(model, x, y)
    grads, stats = nnx.split_state(grads, nnx.Param, ogd_nnx.Stats)
    optimizer.update(model, grads)
    nnx.update(model, stats)  # the layer keeps its latest statistics
    return grads

  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), track_stats=True)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  keys = nnx.Rngs(graddrop=1)["graddrop"].fork()  # the layer's stream
  for _ in range(3):
    expected = _expected_stats(model, x, y, keys())
    without_stats = _plain_grads(nnx.clone(model), x, y)  # a copy of the rng state: same key
    grads = train_step(model, optimizer, x, y)
    tolerances.assert_sums_close(model.graddrop.stats.get_value(), expected, terms=1)
    assert expected.conflict_fraction > 0 and expected.kept_fraction < 1
    # Differentiating the Stats does not change the parameters' gradients.
    tolerances.assert_sums_close(grads, nnx.state(without_stats), terms=GRAD_TERMS)
  assert int(optimizer.step[...]) == 3
  # Not differentiated, the Stats are not computed and keep their value.
  kept = model.graddrop.stats.get_value()
  _plain_grads(model, x, y)
  chex.assert_trees_all_equal(model.graddrop.stats.get_value(), kept)


@jax.default_matmul_precision("highest")
def test_deterministic_layers_report_that_nothing_was_dropped():
  x, y = _data()
  model = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), track_stats=True, deterministic=True)
  grads, stats = _grads_and_stats(model, x, y)
  chex.assert_trees_all_equal(stats, ogd.GradDropStats(jnp.float32(0), jnp.float32(1)))
  plain = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), deterministic=True)
  plain_grads = nnx.state(_plain_grads(plain, x, y))
  tolerances.assert_sums_close(grads, plain_grads, terms=GRAD_TERMS)
  # A baseline with leak=1 keeps the plain sum and reports the masks it would apply.
  leaked = MultiTask(rngs=nnx.Rngs(params=0, graddrop=1), track_stats=True, leak=1.0)
  grads, stats = _grads_and_stats(leaked, x, y)
  key = nnx.Rngs(graddrop=1)["graddrop"].fork()()
  tolerances.assert_sums_close(stats, _expected_stats(plain, x, y, key), terms=1)
  tolerances.assert_sums_close(grads, plain_grads, terms=GRAD_TERMS)


# docs/guide/usage.md, "Inside scans and per-example maps".


class _ScannedCell(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.cell = nnx.GRUCell(3, 8, rngs=rngs)
    self.split = ogd_nnx.GradDrop(2, track_stats=True, rngs=rngs)

  def __call__(self, carry, x):
    carry, h = self.cell(carry, x)
    return carry, jnp.stack(self.split(h))


@pytest.mark.parametrize("split_rngs", [False, True])
def test_a_cell_in_nnx_scan_redraws_its_signs_only_with_split_rngs_and_sums_its_stats(split_rngs):
  steps = 5
  # An odd batch: every feature's summed signals are nonzero, and of opposite
  # signs for the two tasks below.
  x = jax.random.normal(jax.random.key(0), (3, steps, 3))

  def loss(cell):
    if split_rngs:
      state_axes = nnx.StateAxes({nnx.RngState: 0, ...: None})
      scan = nnx.scan(in_axes=(nnx.Carry, state_axes, 1), out_axes=(nnx.Carry, 2))
      run = nnx.split_rngs(splits=steps, only="graddrop")(scan(lambda c, m, x: m(c, x)))
    else:
      run = nnx.scan(in_axes=(nnx.Carry, None, 1), out_axes=(nnx.Carry, 2))(lambda c, m, x: m(c, x))
    _, hs = run(jnp.zeros((3, 8)), cell, x)  # [T, B, L, H]
    return jnp.sum(hs[0]) - jnp.sum(hs[1])  # the tasks disagree on every feature

  cell = _ScannedCell(nnx.Rngs(params=0, graddrop=1))
  grad_fn = nnx.grad(loss, argnums=STATS_WRT)
  (first, stats), (second, _) = (
    nnx.split_state(grad_fn(cell), nnx.Param, ogd_nnx.Stats) for _ in range(2)
  )
  differ = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), first, second)
  assert any(jax.tree.leaves(differ)) == split_rngs
  # One probe for every step: each step conflicts everywhere and keeps one
  # task of two, so the statistics are the sums (1, 0.5) * steps.
  chex.assert_trees_all_equal(
    stats["split"]["stats"].get_value(),
    ogd.GradDropStats(jnp.float32(steps), jnp.float32(steps / 2)),
  )


LAYERS, BATCH, FEATURES = 3, 2, 32


class _Block(nnx.Module):
  """A layer of a stack whose GradDrop mask is read off its parameter's gradient."""

  def __init__(self, rngs: nnx.Rngs):
    self.p = nnx.Param(jnp.ones(FEATURES))
    self.split = ogd_nnx.GradDrop(2, track_stats=True, rngs=rngs)

  def __call__(self, h, key=None):
    a, b = self.split(jnp.broadcast_to(self.p[...], h.shape), rngs=key)
    # The tasks' cotangents are +1 and -1 on every feature: GradDrop keeps one,
    # so p's gradient is +B or -B per feature, the sign of the task kept.
    return h + a - b


@nnx.split_rngs(splits=LAYERS)
@nnx.vmap(in_axes=(0,), out_axes=0)
def _make_blocks(rngs):
  return _Block(rngs)


def _stack_loss(blocks, keys=None):
  """The summed output of the scanned blocks; `keys`: call-time keys, one or one per layer."""
  key_axis = None if keys is None or keys.ndim == 0 else 0

  @nnx.scan(in_axes=(nnx.Carry, 0, key_axis), out_axes=nnx.Carry)
  def run(h, block, key):
    return block(h, key)

  return jnp.sum(run(jnp.zeros((BATCH, FEATURES)), blocks, keys))


def _masks(p_grad):
  """[L, FEATURES] signs of the tasks kept, checking the gradient is +-B."""
  chex.assert_trees_all_equal(jnp.abs(p_grad), jnp.full((LAYERS, FEATURES), float(BATCH)))
  return jnp.sign(p_grad)


def test_a_layer_stack_in_nnx_scan_draws_a_mask_per_layer_and_step():
  blocks = _make_blocks(nnx.Rngs(graddrop=1))
  chex.assert_shape(blocks.split.rngs.key[...], (LAYERS,))  # a key stream per layer
  step = nnx.jit(nnx.grad(_stack_loss, argnums=STATS_WRT))
  first, second = step(blocks), step(blocks)
  masks = [_masks(grads["p"][...]) for grads in (first, second)]
  assert len(jnp.unique(masks[0], axis=0)) == LAYERS
  assert not jnp.array_equal(masks[0], masks[1])  # new masks every training step
  # One probe per layer: each conflicts everywhere and keeps one task of two.
  chex.assert_trees_all_equal(
    first["split"]["stats"].get_value(),
    ogd.GradDropStats(jnp.ones(LAYERS), jnp.full(LAYERS, 0.5)),
  )
  # The same seed gives the same masks, jitted or not.
  again = nnx.grad(_stack_loss, argnums=STATS_WRT)(_make_blocks(nnx.Rngs(graddrop=1)))
  chex.assert_trees_all_equal(nnx.state(again), nnx.state(first))


@pytest.mark.parametrize("split_over_layers", [False, True])
def test_a_call_time_key_in_a_layer_stack_must_be_split_over_the_layers(split_over_layers):
  graphdef, params, rest = nnx.split(_make_blocks(nnx.Rngs(graddrop=1)), nnx.Param, ...)

  def p_grad(seed_key):
    keys = jax.random.split(seed_key, LAYERS) if split_over_layers else seed_key
    loss = lambda params: _stack_loss(nnx.merge(graphdef, params, rest, copy=True), keys)  # noqa: E731
    return jax.grad(loss)(params)["p"][...]

  # Per-seed keys, as in a vmapped multi-seed run.
  per_seed = [_masks(g) for g in jax.jit(jax.vmap(p_grad))(jax.random.split(jax.random.key(5), 2))]
  assert [len(jnp.unique(m, axis=0)) for m in per_seed] == [LAYERS if split_over_layers else 1] * 2
  assert not jnp.array_equal(per_seed[0], per_seed[1])
