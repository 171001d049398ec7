"""Tests of graddrop_value_and_grad: GradDrop streamed over per-task backward passes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import strategies
import tolerances
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_graddrop as ogd
from optax_graddrop import _per_task


def _linear_losses(task_grads):
  """Losses whose per-task gradients are exactly ``task_grads`` (a stacked tree)."""

  def losses(params):
    per_leaf = jax.tree.map(
      lambda g, p: jnp.tensordot(g, p, axes=p.ndim).astype(jnp.float32), task_grads, params
    )
    return sum(jax.tree.leaves(per_leaf))

  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), task_grads)
  return losses, params


@settings(max_examples=25, deadline=None)
@given(
  strategies.problems(),
  st.integers(0, 2**31 - 1),
  st.sampled_from([None, 1, 2, 3, 5]),
  st.booleans(),
)
def test_agrees_with_the_numpy_oracle(problem, seed, chunk_size, jit):
  key = jax.random.key(seed)
  losses, params = _linear_losses(problem.as_dtype())
  fn = ogd.graddrop_value_and_grad(
    losses, key, chunk_size=chunk_size, return_stats=True, **problem.options()
  )
  _, grads, stats = (jax.jit(fn) if jit else fn)(params)
  strategies.assert_graddrop_matches_oracle(grads, problem, key, stats)


T = 7


def _model():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
    "trunk": jax.random.normal(keys[0], (5, 16)),
    "bias": jax.random.normal(keys[1], (16,)),
    "heads": jax.random.normal(keys[2], (16, T)),
  }
  x, y = jax.random.normal(keys[3], (32, 5)), jax.random.normal(keys[4], (32, T))

  def task_losses(params, x, y):
    features = jnp.tanh(x @ params["trunk"] + params["bias"])
    return jnp.mean((features @ params["heads"] - y) ** 2, axis=0)

  return params, x, y, task_losses


@pytest.mark.parametrize(
  ("chunk_size", "options"),
  [
    (None, {}),
    (1, {}),
    (2, {"leak": np.linspace(0.0, 1.0, T)}),
    (3, {"preserve_norm": True}),  # 3 does not divide T = 7
    (7, {"keep": "sigmoid", "leak": 0.3}),
    (10, {"leak": np.linspace(0.0, 1.0, T), "preserve_norm": True}),
  ],
)
@jax.default_matmul_precision("highest")  # both paths in float32, not TF32 on GPUs
def test_equals_graddrop_of_the_stacked_gradients(chunk_size, options):
  params, x, y, task_losses = _model()
  key = jax.random.key(1)
  losses, task_grads = ogd.per_task_value_and_grad(task_losses)(params, x, y)
  expected, expected_stats = ogd.graddrop(task_grads, key, return_stats=True, **options)
  fn = ogd.graddrop_value_and_grad(
    task_losses, key, chunk_size=chunk_size, return_stats=True, **options
  )
  for run in (fn, jax.jit(fn)):
    got_losses, grads, stats = run(params, x, y)
    # Sums over the input (5), the features (16) and the batch (32), then over
    # the tasks: a vmapped and a looped backward pass add them in other orders.
    tolerances.assert_sums_close(got_losses, losses, terms=5 + 16 + 32)
    tolerances.assert_sums_close(grads, expected, terms=5 + 16 + 32 + T)
    chex.assert_trees_all_close(stats, expected_stats, rtol=1e-6)


@jax.default_matmul_precision("highest")
def test_argnums_aux_and_return_structure():
  params, x, y, task_losses = _model()
  key = jax.random.key(2)

  def with_aux(params, x, y):
    losses = task_losses(params, x, y)
    return losses, {"total": losses.sum()}

  fn = ogd.graddrop_value_and_grad(with_aux, key, argnums=(0, 1), has_aux=True, chunk_size=2)
  (losses, aux), (param_grads, x_grads) = fn(params, x, y)
  tolerances.assert_sums_close(aux["total"], losses.sum(), terms=T)
  chex.assert_trees_all_equal_shapes(param_grads, params)
  chex.assert_shape(x_grads, x.shape)
  _, task_grads = ogd.per_task_value_and_grad(task_losses, argnums=(0, 1))(params, x, y)
  expected = ogd.graddrop(task_grads, key)
  tolerances.assert_sums_close((param_grads, x_grads), expected, terms=5 + 16 + 32 + T)

  (losses, aux), grads, stats = ogd.graddrop_value_and_grad(
    with_aux, key, has_aux=True, return_stats=True
  )(params, x, y)
  assert isinstance(stats, ogd.GradDropStats)
  chex.assert_trees_all_equal_shapes(grads, params)


@jax.default_matmul_precision("highest")
def test_one_task_is_the_plain_gradient():
  params, x, y, task_losses = _model()

  def first_task(params, x, y):
    return task_losses(params, x, y)[:1]

  _, grads = ogd.graddrop_value_and_grad(first_task, jax.random.key(0), chunk_size=1)(params, x, y)
  expected = jax.grad(lambda p: first_task(p, x, y)[0])(params)
  tolerances.assert_sums_close(grads, expected, terms=5 + 16 + 32)


def _scratch_bytes(num_tasks, chunk_size):
  """Compiled scratch memory of a step on a fixed trunk with ``num_tasks`` outputs."""
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "trunk": jax.random.normal(keys[0], (64, 256)),
    "heads": jax.random.normal(keys[1], (256, num_tasks)),
  }
  x, y = jax.random.normal(keys[2], (32, 64)), jnp.zeros((32, num_tasks))

  def task_losses(params):
    return jnp.mean((jnp.tanh(x @ params["trunk"]) @ params["heads"] - y) ** 2, axis=0)

  fn = ogd.graddrop_value_and_grad(task_losses, keys[3], chunk_size=chunk_size, return_stats=True)
  analysis = jax.jit(fn).lower(params).compile().memory_analysis()
  return analysis.temp_size_in_bytes


def test_memory_stays_flat_as_tasks_grow(monkeypatch):
  # One task per backward pass: running sums instead of a [T, ...] stack.
  assert _scratch_bytes(64, 1) < 2 * _scratch_bytes(4, 1)
  # All at once, the batched backward pass holds T gradients.
  assert _scratch_bytes(64, None) > 8 * _scratch_bytes(4, None)

  # The CPU schedule for models with convolutions runs one task per pass
  # whatever chunk_size.
  def one_at_a_time(grad_of, num_tasks, dtype, chunk_size, init, add_grads):
    return _per_task._fold(
      grad_of, num_tasks, dtype, chunk_size, init, add_grads, one_at_a_time=True
    )

  monkeypatch.setattr(_per_task, "fold_task_grads", one_at_a_time)
  for chunk_size in (1, None):
    assert _scratch_bytes(64, chunk_size) < 2 * _scratch_bytes(4, chunk_size)


def test_same_key_same_result_and_keys_matter():
  params, x, y, task_losses = _model()
  first = ogd.graddrop_value_and_grad(task_losses, jax.random.key(3))(params, x, y)[1]
  again = ogd.graddrop_value_and_grad(task_losses, jax.random.key(3))(params, x, y)[1]
  other = ogd.graddrop_value_and_grad(task_losses, jax.random.key(4))(params, x, y)[1]
  chex.assert_trees_all_equal(first, again)
  assert not jnp.array_equal(first["trunk"], other["trunk"])


@jax.default_matmul_precision("highest")
def test_works_with_a_flax_nnx_model():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(4, 8, rngs=rngs)
      self.heads = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.heads(nnx.relu(self.trunk(x)))

  model = Model(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jax.random.normal(jax.random.key(2), (16, 3))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def task_losses(params):
    return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2, axis=0)

  key = jax.random.key(3)
  _, grads = ogd.graddrop_value_and_grad(task_losses, key, chunk_size=1)(params)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
  # Sums over the input (4), the hidden units (8), the batch (16), the tasks (3).
  tolerances.assert_sums_close(grads, ogd.graddrop(task_grads, key), terms=4 + 8 + 16 + 3)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"chunk_size": 0}, ValueError, "`chunk_size` must be a positive int"),
    ({"chunk_size": 1.5}, ValueError, "`chunk_size`"),
    ({"key": 3}, TypeError, "`key` must be a PRNG key"),
    ({"keep": "fair"}, ValueError, "Unknown `keep`"),
    ({"eps": -1.0}, ValueError, "`eps` must be >= 0"),
  ],
)
def test_rejects_bad_options_at_construction(kwargs, error, match):
  args = {"key": jax.random.key(0)} | kwargs
  with pytest.raises(error, match=match):
    ogd.graddrop_value_and_grad(lambda w: w, args.pop("key"), **args)


def test_rejects_bad_losses_and_leak():
  with pytest.raises(ValueError, match="1-D float vector"):
    ogd.graddrop_value_and_grad(jnp.sum, jax.random.key(0))(jnp.ones(3))
  with pytest.raises(ValueError, match=r"`leak` must be a scalar or have shape \(3,\)"):
    ogd.graddrop_value_and_grad(lambda w: w**2, jax.random.key(0), leak=[0.5, 0.5])(jnp.ones(3))


@pytest.mark.parametrize("k", [-30, -8, 10])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_scaling_the_losses_scales_the_result_exactly(k, chunk_size):
  params, x, y, task_losses = _model()
  key = jax.random.key(5)
  options = {"chunk_size": chunk_size, "leak": np.linspace(0, 1, T), "return_stats": True}
  _, grads, stats = ogd.graddrop_value_and_grad(task_losses, key, **options)(params, x, y)
  _, scaled, scaled_stats = ogd.graddrop_value_and_grad(
    lambda *args: task_losses(*args) * 2.0**k, key, **options
  )(params, x, y)
  chex.assert_trees_all_equal(scaled, jax.tree.map(lambda g: g * 2.0**k, grads))
  chex.assert_trees_all_equal(scaled_stats, stats)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 8])
@pytest.mark.parametrize("mask", [{"a": False, "b": True}, {"a": True, "b": False}])
def test_with_a_mask_equals_graddrop_of_the_stack_exactly(chunk_size, mask):
  # Linear losses: the per-task gradients are exact, so the results must be too.
  coefficients = {
    "a": jax.random.normal(jax.random.key(30), (8, 40)) * 10,
    "b": jax.random.normal(jax.random.key(31), (8, 6, 5)),
  }

  def task_losses(params):
    return sum(
      jnp.sum(c * params[n], axis=tuple(range(1, c.ndim))) for n, c in coefficients.items()
    )

  params = {"a": jnp.ones(40), "b": jnp.ones((6, 5))}
  key = jax.random.key(32)
  expected = ogd.graddrop(coefficients, key, mask=mask)
  step = ogd.graddrop_value_and_grad(task_losses, key, chunk_size=chunk_size, mask=mask)
  chex.assert_trees_all_equal(step(params)[1], expected)


@jax.default_matmul_precision("highest")
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_mask_gives_the_plain_sum_outside_it(chunk_size):
  x = jax.random.normal(jax.random.key(20), (12, 5))
  targets = jax.random.normal(jax.random.key(21), (3, 12))

  def task_losses(params):
    features = jnp.tanh(x @ params["trunk"])
    return jnp.mean((features @ params["heads"] - targets.T) ** 2, axis=0)

  params = {
    "trunk": jax.random.normal(jax.random.key(22), (5, 7)),
    "heads": jax.random.normal(jax.random.key(23), (7, 3)),
  }
  mask = {"trunk": True, "heads": False}
  key = jax.random.key(24)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
  expected, expected_stats = ogd.graddrop(task_grads, key, mask=mask, return_stats=True)
  step = ogd.graddrop_value_and_grad(
    task_losses, key, chunk_size=chunk_size, mask=mask, return_stats=True
  )
  _, grads, stats = jax.jit(step)(params)
  tolerances.assert_sums_close(grads, expected, terms=12 + 5 + 7 + 3)
  tolerances.assert_sums_close(grads["heads"], task_grads["heads"].sum(0), terms=12 + 5 + 7 + 3)
  np.testing.assert_allclose(stats.conflict_fraction, expected_stats.conflict_fraction)
