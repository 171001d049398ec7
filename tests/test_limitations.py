"""The advice of docs/guide/limitations.md works as written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from flax import nnx
from test_sharding import _on_8_cpu_devices

import optax_graddrop as ogd


def _loss(w, key, **options):
  a, b = ogd.fork(jnp.tanh(w), key, 2, **options)
  return jnp.sum(a**2) - jnp.sum(b)


def test_forward_mode_through_fork_raises():
  w, key = jnp.ones(3), jax.random.key(0)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda w: _loss(w, key), (w,), (jnp.ones(3),))


def test_hessian_of_fork_equals_reverse_over_reverse():
  # Forward-over-reverse differentiates fork's backward rule, as
  # reverse-over-reverse does.
  w, v, key = jnp.linspace(-1.0, 1.0, 3), jnp.arange(3.0), jax.random.key(0)
  hessian = jax.hessian(_loss)(w, key)
  hvp = jax.grad(lambda w: jnp.vdot(jax.grad(_loss)(w, key), v))(w)
  tolerances.assert_sums_close(hessian @ v, hvp, terms=2 + 3)


def test_reverse_over_reverse_gives_hessian_vector_products():
  # With a leak of 1, fork's backward pass is the plain sum, so the HVP is
  # that of the plain loss, which forward mode can compute.
  w, v, key = jnp.linspace(-1.0, 1.0, 3), jnp.arange(3.0), jax.random.key(0)
  hvp = jax.grad(lambda w: jnp.vdot(jax.grad(_loss)(w, key, leak=1.0), v))(w)

  def plain(w):
    features = jnp.tanh(w)
    return jnp.sum(features**2) - jnp.sum(features)

  expected = jax.jvp(jax.grad(plain), (w,), (v,))[1]
  tolerances.assert_sums_close(hvp, expected, terms=2 + 3)  # the tasks, the vdot


def test_deterministic_layers_allow_forward_mode():
  layer = ogd.nnx.GradDrop(2, deterministic=True, rngs=nnx.Rngs(graddrop=0))
  x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

  def model(x):
    a, b = layer(x)
    return jnp.sum(a**2) - jnp.sum(b)

  _, tangent = jax.jvp(model, (x,), (jnp.ones_like(x),))
  tolerances.assert_sums_close(tangent, jnp.sum(2 * x - 1), terms=2 + x.size)


def test_fork_under_a_per_example_vmap_decides_per_example():
  # Two tasks that disagree on every feature: batched, each feature keeps one
  # task's cotangent over the whole batch; per example, every feature of an
  # example keeps the same task's.
  features = jax.random.uniform(jax.random.key(0), (16, 8)) + 0.1
  key = jax.random.key(1)

  def heads(a, b):
    return jnp.sum(2.0 * a) - jnp.sum(3.0 * b)

  def batched(x):
    return heads(*ogd.fork(x, key, 2))

  def per_example(x):
    return jnp.sum(jax.vmap(lambda row: heads(*ogd.fork(row, key, 2)))(x))

  g = jax.grad(batched)(features)
  assert bool(((g == 2.0).all(0) | (g == -3.0).all(0)).all())  # one task per feature
  g = jax.grad(per_example)(features)
  assert bool(((g == 2.0).all(1) | (g == -3.0).all(1)).all())  # one task per example
  # The advice: fork the batched features, map the heads.
  mapped_heads = lambda x: jnp.sum(jax.vmap(heads)(*ogd.fork(x, key, 2)))  # noqa: E731
  assert bool((jax.grad(mapped_heads)(features) == jax.grad(batched)(features)).all())


_SHARD_MAP = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_graddrop as ogd

mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
block = jax.random.normal(jax.random.key(1), (3, 64))
task_grads = jnp.tile(block, (1, 8))  # eight equal blocks of 64 parameters
key = jax.random.key(0)

def sharded(fn):
  specs = dict(mesh=mesh, in_specs=(P(None, "x"), P()), out_specs=P("x"))
  return jax.jit(jax.shard_map(fn, **specs))(task_grads, key)

def blocks(out):
  return np.asarray(out).reshape(8, 64)

def distinct(out):
  return len({row.tobytes() for row in blocks(out)})

per_shard = sharded(ogd.graddrop)
folded = sharded(lambda g, k: ogd.graddrop(g, jax.random.fold_in(k, jax.lax.axis_index("x"))))
unsharded = ogd.graddrop(task_grads, key)
spread = jax.device_put(task_grads, NamedSharding(mesh, P(None, "x")))
print(distinct(per_shard), distinct(folded), distinct(unsharded))
print(np.array_equal(jax.jit(ogd.graddrop)(spread, key), unsharded))
"""


def test_inside_shard_map_each_shard_draws_like_a_call_of_its_own():
  # jax.shard_map runs the function on each block as if alone: with one key,
  # every shard draws the same uniforms (as jax.random does there), so equal
  # blocks get equal masks. Folding the shard index into the key draws
  # independent masks; jit over sharded arrays equals the unsharded call.
  result = _on_8_cpu_devices(["-c", _SHARD_MAP])
  assert result.returncode == 0, result.stderr
  counts, jit_equals_unsharded = result.stdout.split("\n")[:2]
  assert counts.split() == ["1", "8", "8"]
  assert jit_equals_unsharded == "True"


def test_sums_of_one_sign_beyond_the_range_give_inf_or_nan():
  both = jnp.array([[3e38], [-3e38], [3e38], [-3e38]])  # both sums overflow
  positive = jnp.array([[3e38], [-3e38], [3e38]])  # the positive sum overflows
  for task_grads, expected in ((both, jnp.nan), (positive, jnp.inf)):
    assert bool(jnp.isfinite(ogd.sum_tasks(task_grads)).all())
    out, stats = ogd.graddrop(task_grads, jax.random.key(0), return_stats=True)
    np.testing.assert_array_equal(out, jnp.array([expected]))
    assert float(stats.conflict_fraction) == 0.0  # not counted as a conflict


def test_statistics_count_finite_entries_only():
  task_grads = jnp.full((3, 5), jnp.nan)
  out, stats = ogd.graddrop(task_grads, jax.random.key(0), return_stats=True)
  assert bool(jnp.isnan(out).all())
  assert (float(stats.conflict_fraction), float(stats.kept_fraction)) == (0.0, 1.0)
