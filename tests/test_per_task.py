"""Tests of per_task_value_and_grad."""

import chex
import jax
import jax.numpy as jnp
import pytest
import tolerances

import optax_graddrop as ogd


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "w": jax.random.normal(keys[0], (4, 3)),
    "b": jax.random.normal(keys[1], (3,)),
  }, jax.random.normal(keys[2], (8, 4))


# Each gradient sums over the inputs (4) and the batch (8); pinned to full
# float32 so that vmapped and per-task matmuls differ by their order alone.
TERMS = 4 + 8


def _task_losses(params, x):
  y = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1) ** 2), jnp.mean(y[:, 2])])


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("jit", [False, True])
@jax.default_matmul_precision("highest")
def test_matches_one_grad_per_task(chunk_size, jit):
  params, x = _params()
  fn = ogd.per_task_value_and_grad(_task_losses, chunk_size=chunk_size)
  losses, task_grads = (jax.jit(fn) if jit else fn)(params, x)
  tolerances.assert_sums_close(losses, _task_losses(params, x), terms=TERMS)
  for task in range(3):
    expected = jax.grad(lambda p, i=task: _task_losses(p, x)[i])(params)
    tolerances.assert_sums_close(
      jax.tree.map(lambda g, i=task: g[i], task_grads), expected, terms=TERMS
    )
  tolerances.assert_sums_close(task_grads, jax.jacrev(_task_losses)(params, x), terms=TERMS)


@jax.default_matmul_precision("highest")
def test_argnums_tuple_and_aux():
  params, x = _params()

  def with_aux(params, x):
    losses = _task_losses(params, x)
    return losses, {"total": losses.sum()}

  fn = ogd.per_task_value_and_grad(with_aux, argnums=(0, 1), has_aux=True)
  (losses, aux), (param_grads, x_grads) = fn(params, x)
  tolerances.assert_sums_close(aux["total"], losses.sum(), terms=3)
  chex.assert_shape(param_grads["w"], (3, 4, 3))
  chex.assert_shape(x_grads, (3, 8, 4))
  expected = jax.jacrev(_task_losses, argnums=1)(params, x)
  tolerances.assert_sums_close(x_grads, expected, terms=TERMS)


@jax.default_matmul_precision("highest")
def test_feeds_graddrop_directly():
  params, x = _params()
  _, task_grads = ogd.per_task_value_and_grad(_task_losses)(params, x)
  combined = ogd.graddrop(task_grads, jax.random.key(0), leak=1.0)
  summed = jax.grad(lambda p: _task_losses(p, x).sum())(params)
  tolerances.assert_sums_close(combined, summed, terms=TERMS + 3)
