"""Tests of graddrop_transform, the Optax form."""

import dataclasses
import functools
import operator
from typing import Any

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tolerances
from optax.experimental import aggregating

import optax_graddrop as ogd


def _problem():
  """Two regression tasks on a shared linear trunk, with one conflicting target."""
  kx, kw, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (64, 5))
  w_true = jax.random.normal(kw, (5,))
  targets = jnp.stack([x @ w_true, -0.5 * (x @ w_true) + 1.0])
  params = {
    "trunk": 0.1 * jax.random.normal(kp, (5, 8)),
    "heads": jnp.zeros((2, 8)),
    "bias": jnp.zeros((2,)),
  }

  def task_losses(params):
    features = jnp.tanh(x @ params["trunk"])
    preds = features @ params["heads"].T + params["bias"]
    return jnp.mean((preds.T - targets) ** 2, axis=1)

  return params, task_losses


def _step_fn(tx, task_losses):
  def step(params, state):
    losses, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    updates, state = tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state, losses

  return step


@pytest.mark.parametrize(
  "options", [{}, {"keep": "sigmoid", "preserve_norm": True}, {"leak": [0.0, 1.0]}]
)
def test_chain_with_adam_trains_both_tasks(options):
  params, task_losses = _problem()
  tx = optax.chain(ogd.graddrop_transform(0, **options), optax.adam(1e-2))
  state = tx.init(params)
  step = jax.jit(_step_fn(tx, task_losses))
  initial = task_losses(params)
  for _ in range(300):
    params, state, _ = step(params, state)
  final = task_losses(params)
  assert jnp.all(final < 0.25 * initial), (initial, final)
  graddrop_state = state[0]
  assert int(graddrop_state.count) == 300
  assert 0.0 <= float(graddrop_state.stats.conflict_fraction) <= 1.0
  assert 0.5 <= float(graddrop_state.stats.kept_fraction) <= 1.0


@pytest.mark.parametrize("jit", [False, True])
def test_update_is_graddrop_with_a_fresh_subkey(jit):
  task_grads = {"w": jax.random.normal(jax.random.key(1), (3, 50))}
  key = jax.random.key(9)
  tx = ogd.graddrop_transform(key, leak=0.2)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init({"w": jnp.zeros(50)})
  expected_key = key
  outputs = []
  for step in range(3):
    updates, state = update(task_grads, state)
    expected_key, step_key = jax.random.split(expected_key)
    # Same masks; with a leak, XLA may fuse the weighted sums into FMAs under
    # jit, so the last bit may differ.
    tolerances.assert_sums_close(updates, ogd.graddrop(task_grads, step_key, leak=0.2), terms=3)
    np.testing.assert_array_equal(state.rng_key, jax.random.key_data(expected_key))
    assert int(state.count) == step + 1
    outputs.append(updates["w"])
  assert not jnp.array_equal(outputs[0], outputs[1])


def test_int_seed_equals_key():
  task_grads = jax.random.normal(jax.random.key(1), (2, 20))
  a, b = ogd.graddrop_transform(3), ogd.graddrop_transform(jax.random.key(3))
  chex.assert_trees_all_equal(
    a.update(task_grads, a.init(None))[0], b.update(task_grads, b.init(None))[0]
  )


def test_track_stats_off_keeps_initial_stats():
  tx = ogd.graddrop_transform(0, track_stats=False)
  state = tx.init(None)
  _, new_state = tx.update(jax.random.normal(jax.random.key(1), (2, 100)), state)
  chex.assert_trees_all_equal(new_state.stats, state.stats)


@pytest.mark.parametrize(
  "aggregator",
  [
    lambda: ogd.graddrop_transform(0),
    lambda: ogd.graddrop_transform(0, track_stats=False, preserve_norm=True),
    lambda: ogd.pcgrad_transform(0),
    lambda: ogd.mgda_transform(),
    lambda: ogd.sum_transform(),
    lambda: ogd.mean_transform(),
  ],
)
def test_jitted_step_compiles_once(aggregator):
  params, task_losses = _problem()
  tx = optax.chain(aggregator(), optax.sgd(1e-2))
  traces = 0
  inner = _step_fn(tx, task_losses)

  def counted(params, state):
    nonlocal traces
    traces += 1
    return inner(params, state)

  step = jax.jit(counted)
  state = tx.init(params)
  for _ in range(100):
    params, state, _ = step(params, state)
  assert traces == 1
  assert step._cache_size() == 1


@pytest.mark.parametrize(
  "aggregator",
  [
    lambda: ogd.graddrop_transform(0),
    lambda: ogd.graddrop_transform(jax.random.key(0), track_stats=False),
    lambda: ogd.pcgrad_transform(0),
    lambda: ogd.mgda_transform(),
  ],
)
def test_a_donated_state_leaves_other_states_intact(aggregator):
  # Every init returns buffers of its own, so a step that donates one state
  # (a sweep, a reset, a second model on one transform) breaks no other.
  params, task_losses = _problem()
  tx = optax.chain(aggregator(), optax.sgd(1e-2))
  first, second = tx.init(params), tx.init(params)
  expected = jax.jit(_step_fn(tx, task_losses))(params, second)
  step = jax.jit(_step_fn(tx, task_losses), donate_argnums=(1,))
  step(params, first)
  for state in (second, tx.init(params)):
    chex.assert_trees_all_equal(step(params, state), expected)


def test_apply_if_finite_after_graddrop_skips_a_nan_step():
  # GradDrop keeps a NaN visible, so apply_if_finite on its output skips the
  # step. (It goes after the aggregator: before it, its zero "skip" update
  # would have the stacked task shape.)
  params, task_losses = _problem()
  tx = optax.chain(ogd.graddrop_transform(0), optax.apply_if_finite(optax.adam(1e-2), 5))
  state = tx.init(params)

  @jax.jit
  def step(params, state, poison):
    _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    task_grads["trunk"] = task_grads["trunk"].at[1, 0, 0].multiply(poison)
    updates, state = tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state, 1.0)
  skipped, skipped_state = step(params, state, jnp.nan)
  chex.assert_trees_all_equal(skipped, params)
  assert int(skipped_state[1].total_notfinite) == 1
  after, after_state = step(skipped, skipped_state, 1.0)
  assert not jnp.array_equal(after["trunk"], params["trunk"])
  assert bool(after_state[1].last_finite)


def test_aggregator_in_process():
  params, task_losses = _problem()
  tx = aggregating.process(optax.identity(), ogd.graddrop_transform(0), optax.adam(1e-2))
  assert isinstance(ogd.graddrop_transform(0), aggregating.Aggregator)
  state = tx.init(params)
  step = jax.jit(_step_fn(tx, task_losses))
  initial = task_losses(params)
  for _ in range(100):
    params, state, _ = step(params, state)
  assert jnp.all(task_losses(params) < initial)


def _orbax_roundtrip(tree, template, path):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "ckpt", tree)
  checkpointer.wait_until_finished()
  return checkpointer.restore(path / "ckpt", template)


def _flax_roundtrip(tree, template, path):
  del path
  return flax.serialization.from_bytes(template, flax.serialization.to_bytes(tree))


@pytest.mark.parametrize("roundtrip", [_orbax_roundtrip, _flax_roundtrip])
@pytest.mark.parametrize(
  "aggregator",
  [
    lambda: ogd.graddrop_transform(5, leak=0.1),
    lambda: ogd.graddrop_transform(jax.random.key(5, impl="rbg")),
    lambda: ogd.pcgrad_transform(5),
    lambda: ogd.mgda_transform(),
    lambda: ogd.mean_transform(),
  ],
)
def test_checkpoint_and_resume_continue_exactly(tmp_path, roundtrip, aggregator):
  params, task_losses = _problem()
  tx = optax.chain(aggregator(), optax.adam(1e-2))
  step = jax.jit(_step_fn(tx, task_losses))

  def run(params, state, steps):
    for _ in range(steps):
      params, state, _ = step(params, state)
    return params, state

  full = run(params, tx.init(params), 8)
  half = run(params, tx.init(params), 4)
  restored = roundtrip(half, (params, tx.init(params)), tmp_path)
  resumed = run(*restored, 4)
  chex.assert_trees_all_equal(resumed, full)
  assert int(resumed[1][0].count) == 8


@pytest.mark.parametrize("roundtrip", [_orbax_roundtrip, _flax_roundtrip])
def test_gradnorm_state_checkpoints(tmp_path, roundtrip):
  gn = ogd.gradnorm(2)
  state = gn.update(gn.init(), jnp.array([1.0, 2.0]), jnp.ones((2, 3)))
  chex.assert_trees_all_equal(roundtrip(state, gn.init(), tmp_path), state)


def _mixed_precision_problem():
  """A small MLP whose per-task gradients are about 1e-8: too small for float16."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "trunk": jax.random.normal(keys[0], (8, 16)) / 3,
    "heads": jax.random.normal(keys[1], (16, 3)) / 4,
  }
  x = jax.random.normal(keys[2], (32, 8))
  y = jax.random.normal(keys[3], (32, 3))

  def task_losses(params, dtype, loss_scale):
    # Compute in `dtype`; the float32 losses, scaled, start the backward pass,
    # whose cotangents are cast back to `dtype` (the usual mixed precision).
    p = jax.tree.map(lambda w: w.astype(dtype), params)
    predictions = jnp.tanh(x.astype(dtype) @ p["trunk"]) @ p["heads"]
    losses = jnp.mean((predictions - y.astype(dtype)) ** 2, axis=0).astype(jnp.float32)
    return losses * (1e-8 * loss_scale)

  return params, task_losses


def _scaled_task_grads(params, task_losses, loss_scale):
  """float16 per-task gradients with dynamic loss scaling: halve until finite."""
  while True:
    _, grads = ogd.per_task_value_and_grad(task_losses)(params, jnp.float16, loss_scale)
    if all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)):
      return grads, loss_scale
    loss_scale /= 2


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize("eps", [0.0, 1e-7])
def test_float16_with_loss_scaling_makes_the_float32_decisions(eps):
  params, task_losses = _mixed_precision_problem()
  _, unscaled = ogd.per_task_value_and_grad(task_losses)(params, jnp.float16, 1.0)
  assert not np.any(_flat(unscaled)), "float16 without loss scaling underflows to 0"
  adam = optax.adam(1e-2)
  state = adam.init(params)
  loss_scale = 2.0**44  # too large at first: the first backward pass overflows
  agreement = []
  for step in range(6):
    key = jax.random.key(step)
    _, grads32 = ogd.per_task_value_and_grad(task_losses)(params, jnp.float32, 1.0)
    grads16, loss_scale = _scaled_task_grads(params, task_losses, loss_scale)
    masks32 = ogd.sign_masks(grads32, key, eps=eps)
    masks16 = ogd.sign_masks(grads16, key, eps=eps)
    agreement.append(np.mean(_flat(masks32) == _flat(masks16)))
    update32 = ogd.graddrop(grads32, key, eps=eps)
    update16 = jax.tree.map(lambda g, s=loss_scale: g / s, ogd.graddrop(grads16, key, eps=eps))
    if eps == 0.0:
      # Where the decisions agree, the unscaled update is the float32 one up
      # to float16's rounding in the backward pass: 2**-8 of the largest
      # sum_i |g_i| of the leaf.
      for u32, u16, g, m32, m16 in zip(
        *map(jax.tree.leaves, (update32, update16, grads32, masks32, masks16))
      ):
        same = np.all(np.asarray(m32 == m16), axis=0)
        bound = 2.0**-8 * np.abs(np.asarray(g)).sum(0).max()
        assert np.all(np.abs(np.asarray(u32 - u16))[same] <= bound)
    updates, state = adam.update(update32, state, params)
    params = optax.apply_updates(params, updates)
  assert 2.0**10 < loss_scale < 2.0**44
  if eps == 0.0:
    # float16's rounding flips a decision now and then (measured: 0-0.2% of
    # the masks per step); the loss scale does not.
    assert min(agreement) > 0.98, agreement
  else:
    # lingvo's absolute epsilon sees 1e-8 gradients as nearly zero and
    # picks signs almost at random there, unlike in the loss-scaled run
    # (measured: 81-92% of the masks agree).
    assert max(agreement) < 0.95, agreement


# --- Composition with optax's wrappers and Flax NNX -------------------------------


def _stacked_problem():
  params = {"trunk": jnp.zeros((5, 4)), "head": jnp.zeros((4,))}
  task_grads = {
    "trunk": jax.random.normal(jax.random.key(0), (3, 5, 4)),
    "head": jax.random.normal(jax.random.key(1), (3, 4)),
  }
  return params, task_grads


@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_as_written(jit):
  params, task_grads = _stacked_problem()
  tx = optax.inject_hyperparams(ogd.graddrop_transform)(key=0, leak=0.5)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  expected_key = jax.random.key(0)
  for leak in (0.5, 0.25, 1.0):
    state.hyperparams["leak"] = jnp.asarray(leak)
    updates, state = update(task_grads, state, params)
    expected_key, step_key = jax.random.split(expected_key)
    tolerances.assert_sums_close(updates, ogd.graddrop(task_grads, step_key, leak=leak), terms=3)


def test_inject_hyperparams_schedules_leak_scale_and_eps():
  params, task_grads = _stacked_problem()
  leak = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  scale = optax.linear_schedule(1.0, 0.5, transition_steps=4)
  eps = optax.linear_schedule(0.0, 1e-3, transition_steps=4)
  tx = optax.inject_hyperparams(ogd.graddrop_transform)(key=3, leak=leak, scale=scale, eps=eps)
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected_key = jax.random.key(3)
  for step in range(4):
    updates, state = update(task_grads, state, params)
    expected_key, step_key = jax.random.split(expected_key)
    expected = ogd.graddrop(
      task_grads, step_key, leak=float(leak(step)), scale=float(scale(step)), eps=float(eps(step))
    )
    tolerances.assert_sums_close(updates, expected, terms=3)
    np.testing.assert_allclose(state.hyperparams["leak"], leak(step), rtol=1e-6)


def test_inject_hyperparams_validates_concrete_values():
  params, _ = _stacked_problem()
  with pytest.raises(ValueError, match=r"`leak` must lie in \[0, 1\]"):
    tx = optax.inject_hyperparams(ogd.graddrop_transform)(key=0, leak=1.5)
    tx.update(_stacked_problem()[1], tx.init(params), params)
  with pytest.raises(ValueError, match="`eps` must be >= 0"):
    optax.inject_hyperparams(ogd.graddrop_transform)(key=0, eps=-1.0).init(params)


@pytest.mark.parametrize(
  "mask",
  [
    {"trunk": True, "head": False},
    lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
  ],
)
def test_mask_applies_graddrop_to_part_of_the_model(mask):
  params, task_grads = _stacked_problem()
  key = jax.random.key(4)
  out, stats = ogd.graddrop(task_grads, key, mask={"trunk": True, "head": False}, return_stats=True)
  full = ogd.graddrop(task_grads, key)
  # The masked-in leaf draws as it would without a mask; the other is summed.
  chex.assert_trees_all_equal(out["trunk"], full["trunk"])
  tolerances.assert_sums_close(out["head"], task_grads["head"].sum(0), terms=3)
  # The diagnostics count the masked-in leaf alone.
  trunk = task_grads["trunk"]
  np.testing.assert_allclose(
    stats.conflict_fraction, jnp.mean((trunk > 0).any(0) & (trunk < 0).any(0)), rtol=1e-6
  )
  np.testing.assert_allclose(
    stats.kept_fraction, jnp.mean(ogd.sign_masks(task_grads, key)["trunk"]), rtol=1e-6
  )
  tx = ogd.graddrop_transform(key, mask=mask)
  updates, _ = tx.update(task_grads, tx.init(params), params)
  _, step_key = jax.random.split(key)
  chex.assert_trees_all_equal(
    updates, ogd.graddrop(task_grads, step_key, mask={"trunk": True, "head": False})
  )


def test_mask_prefix_and_baselines():
  params, task_grads = _stacked_problem()
  key = jax.random.key(5)
  # A tree mask may select nothing (in a call over part of the model, under
  # optax.partition or nnx.Optimizer(wrt=...)): the plain sum there.
  heads = {"head": task_grads["head"]}
  for mask in ({"trunk": True, "head": False}, False):
    tx = ogd.graddrop_transform(key, mask=mask)
    for updates in (
      ogd.graddrop(heads, key, mask=mask),
      tx.update(heads, tx.init(None), {"head": params["head"]})[0],
    ):
      tolerances.assert_sums_close(updates["head"], task_grads["head"].sum(0), terms=3)
  for transform, function in (
    (ogd.pcgrad_transform(key, mask={"trunk": True, "head": False}), ogd.pcgrad),
    (ogd.mgda_transform(mask={"trunk": True, "head": False}), ogd.mgda),
  ):
    updates, _ = transform.update(task_grads, transform.init(params), params)
    tolerances.assert_sums_close(updates["head"], task_grads["head"].sum(0), terms=3)
    # The inner products are over the masked-in leaves alone (5 * 4 entries).
    terms = 5 * 4 + 3
    trunk_only = {"trunk": task_grads["trunk"]}
    expected = ogd.mgda(trunk_only) if function is ogd.mgda else None
    if expected is not None:
      tolerances.assert_sums_close(updates["trunk"], expected["trunk"], terms=terms)
    else:
      _, step_key = jax.random.split(key)
      expected = ogd.pcgrad(trunk_only, step_key)
      tolerances.assert_sums_close(updates["trunk"], expected["trunk"], terms=terms)


def _nnx_trunk_and_heads():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(4, 16, rngs=rngs)
      self.heads = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      return self.heads(nnx.relu(self.trunk(x)))

  return Model(nnx.Rngs(0))


@pytest.mark.parametrize(
  "mask",
  [
    {"trunk": True, "heads": False},  # a dict prefix of the nnx.State
    lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", p),
    "state",  # an nnx.State of bools, as jax.tree.map makes it
  ],
)
def test_masks_match_an_nnx_state(mask):
  from flax import nnx

  params = nnx.state(_nnx_trunk_and_heads(), nnx.Param)
  if mask == "state":
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "trunk", params)
  task_grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), (3, *p.shape)), params)
  pure = nnx.to_pure_dict(task_grads)
  key = jax.random.key(2)
  expected = ogd.graddrop(pure, key, mask={"trunk": True, "heads": False})
  tolerances.assert_sums_close(
    expected["heads"], jax.tree.map(lambda g: g.sum(0), pure["heads"]), terms=3
  )
  out = ogd.graddrop(task_grads, key, mask=mask)
  chex.assert_trees_all_equal(nnx.to_pure_dict(out), expected)
  tx = ogd.graddrop_transform(key, mask=mask)
  updates, _ = jax.jit(tx.update)(task_grads, tx.init(params), params)
  _, step_key = jax.random.split(key)
  expected = ogd.graddrop(pure, step_key, mask={"trunk": True, "heads": False})
  chex.assert_trees_all_equal(nnx.to_pure_dict(updates), expected)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["trunk", "head"], meta_fields=[])
@dataclasses.dataclass
class _CallableModel:
  """Like an Equinox module: a pytree that is also callable."""

  trunk: Any
  head: Any

  def __call__(self, x):
    return self.head @ jnp.tanh(self.trunk @ x)


@pytest.mark.parametrize("mask", ["prefix", "module", "paths"])
def test_masks_of_a_callable_pytree_model(mask):
  # A module of bools is a tree of bools, not a function to call, though it
  # is callable; every mask form resolves to one through the transforms.
  params, task_grads = _stacked_problem()
  params, task_grads = _CallableModel(**params), _CallableModel(**task_grads)
  masks = {
    "prefix": {"trunk": True, "head": False},
    "module": _CallableModel(trunk=True, head=False),
    "paths": lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[0].name == "trunk", p),
  }
  key = jax.random.key(6)
  _, step_key = jax.random.split(key)
  # The same leaves in the same order (the order of the stream of uniforms).
  as_list = [task_grads.trunk, task_grads.head]
  expected = ogd.graddrop(as_list, key, mask=[True, False])
  out = ogd.graddrop(task_grads, key, mask=masks[mask])
  chex.assert_trees_all_equal([out.trunk, out.head], expected)
  for transform, function in (
    (ogd.graddrop_transform(key, mask=masks[mask]), ogd.graddrop),
    (ogd.pcgrad_transform(key, mask=masks[mask]), ogd.pcgrad),
  ):
    updates, _ = jax.jit(transform.update)(task_grads, transform.init(params), params)
    expected = function(as_list, step_key, mask=[True, False])
    chex.assert_trees_all_equal([updates.trunk, updates.head], expected)


def _select(name, params):
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].name == name, params)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["flag"], meta_fields=[])
@dataclasses.dataclass
class _MaskWithSetting:
  """A mask function that is a pytree with a bool leaf of its own."""

  flag: bool

  def __call__(self, params):
    return _select("trunk" if self.flag else "head", params)


@pytest.mark.parametrize(
  "mask",
  [
    jax.tree_util.Partial(lambda p: _select("trunk", p)),  # no leaves
    jax.tree_util.Partial(_select, "trunk"),  # a string leaf
    _MaskWithSetting(True),  # bool leaves, not shaped like the parameters
  ],
  ids=["no-leaves", "string-leaf", "bool-setting"],
)
def test_callable_pytrees_not_shaped_like_the_parameters_are_mask_functions(mask):
  params, task_grads = _stacked_problem()
  params, task_grads = _CallableModel(**params), _CallableModel(**task_grads)
  key = jax.random.key(6)
  expected = ogd.graddrop([task_grads.trunk, task_grads.head], key, mask=[True, False])
  out = ogd.graddrop(task_grads, key, mask=mask)
  chex.assert_trees_all_equal([out.trunk, out.head], expected)
  transform = ogd.graddrop_transform(key, mask=mask)
  updates, _ = transform.update(task_grads, transform.init(params), params)
  _, step_key = jax.random.split(key)
  expected = ogd.graddrop([task_grads.trunk, task_grads.head], step_key, mask=[True, False])
  chex.assert_trees_all_equal([updates.trunk, updates.head], expected)


def test_flax_nnx_optimizer_with_graddrop_in_the_chain():
  from flax import nnx

  x = jax.random.normal(jax.random.key(0), (64, 4))
  y = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], axis=1)
  model = _nnx_trunk_and_heads()
  tx = optax.chain(ogd.graddrop_transform(0), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_losses(params):
      return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2, axis=0)

    losses, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    optimizer.update(model, task_grads)  # stacked per-task gradients in
    return losses

  first = train_step(model, optimizer)
  for _ in range(200):
    last = train_step(model, optimizer)
  assert jnp.all(last < 0.1 * first), (first, last)
  assert isinstance(optimizer.opt_state[0], ogd.AggregatorState)
  assert int(optimizer.opt_state[0].count) == 201


@pytest.mark.parametrize("seeds", [jnp.arange(3), jax.random.split(jax.random.key(0), 3)])
@jax.default_matmul_precision("highest")
def test_multi_seed_runs_under_vmap_build_the_transform_per_seed(seeds):
  params, task_losses = _problem()

  def run(seed):  # the transform is built inside the vmap, from this seed
    tx = optax.chain(ogd.graddrop_transform(seed), optax.adam(1e-2))
    step = _step_fn(tx, task_losses)

    def body(carry, _):
      params, state, _ = step(*carry)
      return (params, state), None

    (params_out, state), _ = jax.lax.scan(body, (params, tx.init(params)), length=3)
    return params_out, state[0].rng_key

  together = jax.jit(jax.vmap(run))(seeds)
  one_by_one = [jax.jit(run)(seed) for seed in seeds]
  for index, (params_out, key) in enumerate(one_by_one):
    np.testing.assert_array_equal(together[1][index], key)
    # Batched and single matmuls: sums over the inputs (5), features (8), batch (64), tasks (2).
    tolerances.assert_sums_close(
      jax.tree.map(operator.itemgetter(index), together[0]), params_out, terms=5 + 8 + 64 + 2
    )
  # Every seed has its own key stream.
  assert len({tuple(np.asarray(key).tolist()) for _, key in one_by_one}) == len(seeds)
