"""Tests of multi_steps: gradient accumulation for chains that start with an aggregator."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances

import optax_graddrop as ogd

T, BATCH, MICRO = 3, 48, 4


def _problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "trunk": jax.random.normal(keys[0], (5, 8)) / 2,
    "heads": jax.random.normal(keys[1], (8, T)),
  }
  x = jax.random.normal(keys[2], (BATCH, 5))
  y = jax.random.normal(keys[3], (BATCH, T))

  def task_losses(params, x, y):  # a mean over the batch
    return jnp.mean((jnp.tanh(x @ params["trunk"]) @ params["heads"] - y) ** 2, axis=0)

  return params, x, y, task_losses


def _inner():
  return optax.chain(ogd.graddrop_transform(7, leak=0.25), optax.adam(1e-2))


@pytest.mark.parametrize("jit", [False, True])
@jax.default_matmul_precision("highest")  # the two batch shapes take other matmul paths
def test_accumulated_micro_batches_make_the_whole_batch_update(jit):
  params, x, y, task_losses = _problem()
  whole, accumulated = _inner(), ogd.multi_steps(_inner(), every_k_schedule=MICRO, num_tasks=T)
  whole_state, acc_state = whole.init(params), accumulated.init(params)
  whole_params, acc_params = params, params
  update = jax.jit(accumulated.update) if jit else accumulated.update
  per_task = jax.jit(ogd.per_task_value_and_grad(task_losses))
  for _ in range(2):
    _, task_grads = per_task(whole_params, x, y)
    updates, whole_state = whole.update(task_grads, whole_state, whole_params)
    whole_params = optax.apply_updates(whole_params, updates)
    for micro_x, micro_y in zip(jnp.split(x, MICRO), jnp.split(y, MICRO)):
      _, task_grads = per_task(acc_params, micro_x, micro_y)
      updates, acc_state = update(task_grads, acc_state, acc_params)
      acc_params = optax.apply_updates(acc_params, updates)
    # Same GradDrop key and the whole batch's per-task gradients: same step.
    # Sums over the inputs, the features, the batch and the tasks; Adam's
    # normalised step carries their relative error, not more.
    tolerances.assert_sums_close(acc_params, whole_params, terms=5 + 8 + BATCH + T)
    np.testing.assert_array_equal(acc_state.inner_state[0].rng_key, whole_state[0].rng_key)
  assert int(acc_state.gradient_step) == 2 and int(acc_state.mini_step) == 0


def test_skipped_micro_batches_return_zeros_and_keep_the_key():
  params, x, y, task_losses = _problem()
  tx = ogd.multi_steps(_inner(), every_k_schedule=3, num_tasks=T)
  state = tx.init(params)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params, x, y)
  initial_key = state.inner_state[0].rng_key
  for mini_step in (1, 2):
    updates, state = tx.update(task_grads, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_array_equal(state.inner_state[0].rng_key, initial_key)
    assert int(state.mini_step) == mini_step
  updates, state = tx.update(task_grads, state, params)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
  assert not np.array_equal(state.inner_state[0].rng_key, initial_key)
  chex.assert_trees_all_equal(state.acc_task_updates, jax.tree.map(jnp.zeros_like, task_grads))


def test_every_k_schedule_can_change():
  params, x, y, task_losses = _problem()
  tx = ogd.multi_steps(
    _inner(), every_k_schedule=lambda step: jnp.where(step < 1, 1, 2), num_tasks=T
  )
  state = tx.init(params)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params, x, y)
  applied = []
  for _ in range(5):
    updates, state = tx.update(task_grads, state, params)
    applied.append(any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates)))
  assert applied == [True, False, True, False, True]


def test_graddrop_per_micro_batch_is_a_different_method():
  # MultiSteps after the aggregator picks signs from each micro-batch.
  params, x, y, task_losses = _problem()
  per_micro = optax.chain(
    ogd.graddrop_transform(7, leak=0.25),
    optax.MultiSteps(optax.adam(1e-2), MICRO).gradient_transformation(),
  )
  whole = ogd.multi_steps(_inner(), every_k_schedule=MICRO, num_tasks=T)
  results = []
  for tx in (per_micro, whole):
    state, p = tx.init(params), params
    for micro_x, micro_y in zip(jnp.split(x, MICRO), jnp.split(y, MICRO)):
      _, task_grads = ogd.per_task_value_and_grad(task_losses)(p, micro_x, micro_y)
      updates, state = tx.update(task_grads, state, p)
      p = optax.apply_updates(p, updates)
    results.append(p)
  assert not np.allclose(results[0]["trunk"], results[1]["trunk"], rtol=1e-4)


def test_rejects_the_wrong_number_of_tasks():
  params, x, y, task_losses = _problem()
  tx = ogd.multi_steps(_inner(), every_k_schedule=2, num_tasks=T + 1)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params, x, y)
  with pytest.raises(ValueError, match="have 3 tasks; `multi_steps` was made for 4"):
    tx.update(task_grads, tx.init(params), params)
  with pytest.raises(ValueError, match="`num_tasks`"):
    ogd.multi_steps(_inner(), every_k_schedule=2, num_tasks=0)


@pytest.mark.parametrize("every_k", [0, -1, 2.0, True])
def test_rejects_an_every_k_that_is_not_a_positive_int(every_k):
  with pytest.raises(ValueError, match="`every_k_schedule` must be an int >= 1"):
    ogd.multi_steps(_inner(), every_k_schedule=every_k, num_tasks=T)


def test_rejects_an_inner_without_an_aggregator():
  # optax.sgd alone keeps the task axis; optax.apply_updates would broadcast it.
  tx = ogd.multi_steps(optax.sgd(1.0), every_k_schedule=2, num_tasks=T)
  params = {"w": jnp.zeros(4)}
  with pytest.raises(ValueError, match=r"`inner` returned updates\['w'\] of shape \(3, 4\)"):
    tx.update({"w": jnp.ones((T, 4))}, tx.init(params), params)
