"""Tests of per_task_value_and_grad."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import pytest
import tolerances

import optax_graddrop as ogd
from optax_graddrop import _per_task


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


def _conv_net(num_tasks=3):
  """Two NHWC convolutions and linear heads: (params, x, per-task losses)."""
  keys = jax.random.split(jax.random.key(1), 4)
  params = {
    "c1": jax.random.normal(keys[0], (3, 3, 2, 3)) / 4,
    "c2": jax.random.normal(keys[1], (3, 3, 3, 4)) / 4,
    "heads": jax.random.normal(keys[2], (4, num_tasks)),
  }
  x = jax.random.normal(keys[3], (2, 6, 6, 2))

  def task_losses(params, x):
    for name, stride in (("c1", 2), ("c2", 1)):
      x = jnp.tanh(
        jax.lax.conv_general_dilated(
          x, params[name], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
      )
    return jnp.mean((x.mean(axis=(1, 2)) @ params["heads"]) ** 2, axis=0)

  return params, x, task_losses


@functools.partial(jax.jit, static_argnums=0)
def _one_grad_per_task(task_losses, params, x):
  """The gradients of each task's loss, from its own backward pass, stacked."""
  num_tasks = jax.eval_shape(task_losses, params, x).shape[0]
  grads = [jax.grad(lambda p, i=i: task_losses(p, x)[i])(params) for i in range(num_tasks)]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads)


# A kernel gradient sums over the batch and the positions (2 x 6 x 6), an
# input gradient over the window and the channels (3 x 3 x 4).
CONV_TERMS = 2 * 6 * 6 + 3 * 3 * 4 + 4


@pytest.mark.parametrize("chunk_size", [None, 2])
@jax.default_matmul_precision("highest")
def test_conv_net_runs_fast_convolutions_in_one_loop_on_cpu(chunk_size):
  # XLA:CPU runs only NHWC/HWIO convolutions with its fast kernel, and leaves
  # those of a loop body as JAX's backward pass wrote them.
  params, x, task_losses = _conv_net()
  params, x = jax.device_put((params, x), jax.devices("cpu")[0])
  fn = ogd.per_task_value_and_grad(task_losses, chunk_size=chunk_size)
  compiled = jax.jit(fn).lower(params, x).compile()
  hlo = compiled.as_text()
  labels = re.findall(r" convolution\(.*dim_labels=(\S+?),", hlo)
  assert len(labels) == 2 + 2 * 3  # the forward; three per backward pass (loop body, last task)
  assert set(labels) == {"b01f_01io->b01f"}
  assert hlo.count(" while(") == 1
  _, task_grads = compiled(params, x)
  expected = _one_grad_per_task(task_losses, params, x)
  tolerances.assert_sums_close(task_grads, expected, terms=CONV_TERMS)


@jax.default_matmul_precision("highest")
def test_conv_net_without_jit():
  params, x, task_losses = _conv_net()
  _, task_grads = ogd.per_task_value_and_grad(task_losses, chunk_size=1)(params, x)
  expected = _one_grad_per_task(task_losses, params, x)
  tolerances.assert_sums_close(task_grads, expected, terms=CONV_TERMS)


@jax.default_matmul_precision("highest")
def test_cpu_schedule_agrees_with_the_batched_one():
  # The batched schedule (GPU, TPU) runs on a CPU-only CI only through here:
  # chunks of 2 of the 3 tasks, one vmapped chunk in the loop, one task after.
  params, x, task_losses = _conv_net()

  @functools.partial(jax.jit, static_argnums=1)
  def task_grads(params, one_at_a_time):
    losses, grad_of, _ = _per_task.task_vjp(task_losses, 0, False, (params, x), {})
    stack = jax.tree.map(lambda p: jnp.zeros((3, *p.shape), p.dtype), params)
    return _per_task._fold(
      grad_of, 3, losses.dtype, 2, stack, _per_task._put, one_at_a_time=one_at_a_time
    )

  tolerances.assert_sums_close(task_grads(params, True), task_grads(params, False), CONV_TERMS)


@jax.default_matmul_precision("highest")
def test_under_vmap_and_grad():
  params, x = _params()
  xs = jnp.stack([x, -x])
  fn = ogd.per_task_value_and_grad(_task_losses, chunk_size=2)
  _, batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(params, xs)
  expected = jax.vmap(_one_grad_per_task, in_axes=(None, None, 0))(_task_losses, params, xs)
  tolerances.assert_sums_close(batched, expected, terms=TERMS)

  def squared_norm(task_grads_fn, params):
    return sum(jnp.sum(g**2) for g in jax.tree.leaves(task_grads_fn(params, x)))

  second = jax.jit(jax.grad(functools.partial(squared_norm, lambda p, x: fn(p, x)[1])))(params)
  reference = jax.jit(jax.grad(functools.partial(squared_norm, jax.jacrev(_task_losses))))(params)
  tolerances.assert_sums_close(second, reference, terms=2 * TERMS)


@pytest.mark.parametrize("leaf", [3, jnp.tanh], ids=["int", "function"])
@pytest.mark.parametrize("make", [ogd.per_task_value_and_grad, ogd.graddrop_value_and_grad])
def test_non_float_leaves_are_named_with_what_to_pass(make, leaf):
  # An Equinox module holds ints and functions (its activation) as leaves.
  model = {"w": jnp.ones(3), "extra": leaf}

  def losses(m):
    return jnp.stack([jnp.sum(m["w"]), jnp.sum(m["w"] ** 2)])

  fun = make(losses, jax.random.key(0)) if make is ogd.graddrop_value_and_grad else make(losses)
  with pytest.raises(
    TypeError,
    match=r"`args\[0\]\['extra'\]` (has dtype int32|is <.*tanh.*>, not an array); .*eqx\.partition",
  ):
    fun(model)


def test_a_non_float_argument_among_argnums_is_named_by_its_position():
  def losses(w, ids, scale):
    return jnp.stack([jnp.sum(w[ids]) * scale, jnp.sum(w**2)])

  fun = ogd.per_task_value_and_grad(losses, argnums=(0, 1))
  with pytest.raises(TypeError, match=r"`args\[1\]` has dtype int32; .*not in `argnums`"):
    fun(jnp.ones(3), jnp.array([0, 2]), 2.0)
