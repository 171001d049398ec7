"""Tests of per_task_value_and_grad."""

import chex
import jax
import jax.numpy as jnp
import pytest

import optax_graddrop as ogd


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "w": jax.random.normal(keys[0], (4, 3)),
    "b": jax.random.normal(keys[1], (3,)),
  }, jax.random.normal(keys[2], (8, 4))


def _task_losses(params, x):
  y = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1) ** 2), jnp.mean(y[:, 2])])


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("jit", [False, True])
def test_matches_one_grad_per_task(chunk_size, jit):
  params, x = _params()
  fn = ogd.per_task_value_and_grad(_task_losses, chunk_size=chunk_size)
  losses, task_grads = (jax.jit(fn) if jit else fn)(params, x)
  chex.assert_trees_all_close(losses, _task_losses(params, x), rtol=1e-6)
  for task in range(3):
    expected = jax.grad(lambda p, i=task: _task_losses(p, x)[i])(params)
    chex.assert_trees_all_close(
      jax.tree.map(lambda g, i=task: g[i], task_grads), expected, rtol=1e-5
    )
  chex.assert_trees_all_close(task_grads, jax.jacrev(_task_losses)(params, x), rtol=1e-5)


def test_argnums_tuple_and_aux():
  params, x = _params()

  def with_aux(params, x):
    losses = _task_losses(params, x)
    return losses, {"total": losses.sum()}

  fn = ogd.per_task_value_and_grad(with_aux, argnums=(0, 1), has_aux=True)
  (losses, aux), (param_grads, x_grads) = fn(params, x)
  chex.assert_trees_all_close(aux["total"], losses.sum())
  chex.assert_shape(param_grads["w"], (3, 4, 3))
  chex.assert_shape(x_grads, (3, 8, 4))
  chex.assert_trees_all_close(x_grads, jax.jacrev(_task_losses, argnums=1)(params, x), rtol=1e-5)


def test_feeds_graddrop_directly():
  params, x = _params()
  _, task_grads = ogd.per_task_value_and_grad(_task_losses)(params, x)
  combined = ogd.graddrop(task_grads, jax.random.key(0), leak=1.0)
  summed = jax.grad(lambda p: _task_losses(p, x).sum())(params)
  chex.assert_trees_all_close(combined, summed, rtol=1e-5, atol=1e-6)
