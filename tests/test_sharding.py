"""Sharded training equals single-device training; the RNG ignores sharding."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import pytest

import optax_graddrop as ogd

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_sharded_training_over_8_devices_matches_one_device(axis_types):
  script = str(ROOT / "examples" / "sharded_training.py")
  result = _on_8_cpu_devices([script, "--steps", "10", "--axis-types", axis_types])
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"8 devices (cpu), {axis_types} axes" in result.stdout
  assert "fork, data parallel" in result.stdout
  assert "graddrop_transform, model parallel" in result.stdout


@pytest.mark.parametrize("partitionable", [True, False])
def test_uniforms_do_not_depend_on_the_threefry_partitionable_flag(partitionable):
  task_grads = {
    "a": jax.random.normal(jax.random.key(0), (3, 33, 7)),
    "b": jax.random.normal(jax.random.key(1), (3, 5)),
  }
  reference = ogd.graddrop(task_grads, jax.random.key(2))
  previous = jax.config.jax_threefry_partitionable
  try:
    jax.config.update("jax_threefry_partitionable", partitionable)
    chex.assert_trees_all_equal(ogd.graddrop(task_grads, jax.random.key(2)), reference)
  finally:
    jax.config.update("jax_threefry_partitionable", previous)


_MESH_CHECKS = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, PartitionSpec as P
import optax_graddrop as ogd
sys.path.insert(0, sys.argv[1])  # the tests' folder
import tolerances

task_grads = jax.random.normal(jax.random.key(0), (3, 16, 64))
key = jax.random.key(1)
expected, expected_stats = ogd.graddrop(task_grads, key, return_stats=True)
expected_leak = ogd.graddrop(task_grads, key, leak=0.25)
large_grads = jax.random.normal(jax.random.key(5), (3, 128, 256))
large_expected, large_stats = ogd.graddrop(large_grads, key, return_stats=True)
expected_update = -ogd.graddrop(task_grads, jax.random.split(jax.random.key(0))[1])
params = {"w": jnp.zeros((16, 64))}
x = jax.random.normal(jax.random.key(2), (32, 16))
w_stream = jax.random.normal(jax.random.key(3), (16, 64)) / 4
weights = jax.random.normal(jax.random.key(4), (3, 64))
def task_losses(p):
  features = jnp.tanh(x @ p["w"])
  return jnp.stack([jnp.mean((features * weights[i]) ** 2) for i in range(3)])
stream = ogd.graddrop_value_and_grad(task_losses, key, chunk_size=1)({"w": w_stream})[1]["w"]
for types in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(types,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(task_grads, jax.sharding.NamedSharding(mesh, P(None, None, "x")))
    out, stats = jax.jit(lambda g, k: ogd.graddrop(g, k, return_stats=True))(sharded, key)
    assert np.array_equal(np.asarray(out), np.asarray(expected)), types
    assert np.allclose(stats.kept_fraction, expected_stats.kept_fraction, rtol=1e-6), types
    # With a leak XLA may fuse the multiply-adds differently: the last bit.
    out = jax.jit(lambda g, k: ogd.graddrop(g, k, leak=0.25))(sharded, key)
    tolerances.assert_sums_close(out, expected_leak, terms=3)
    tx = optax.chain(ogd.graddrop_transform(0), optax.sgd(1.0))
    p = jax.device_put(params, jax.sharding.NamedSharding(mesh, P(None, "x")))
    updates, _ = jax.jit(tx.update)({"w": sharded}, tx.init(p), p)
    assert np.array_equal(np.asarray(updates["w"]), np.asarray(expected_update)), types
    # multi_steps: its skip branch's zeros are typed like the updates, sharding included.
    accumulated = ogd.multi_steps(tx, every_k_schedule=2, num_tasks=3)
    def two_micro_steps(p, g):
      state = accumulated.init(p)
      _, state = accumulated.update(g, state, p)
      return accumulated.update(g, state, p)[0]
    updates = jax.jit(two_micro_steps)(p, {"w": sharded})
    assert np.array_equal(np.asarray(updates["w"]), np.asarray(expected_update)), types
    w = jax.device_put({"w": w_stream}, jax.sharding.NamedSharding(mesh, P(None, "x")))
    streamed = jax.jit(ogd.graddrop_value_and_grad(task_losses, key, chunk_size=1))(w)[1]["w"]
    tolerances.assert_sums_close(streamed, stream, terms=16 + 32 + 3)  # x @ w, the batch, tasks
    # A large leaf sharded on an inner axis stays sharded: no gather of the
    # stack (only of the per-device counts), the output sharded like it.
    for spec in (P(None, "x", None), P(None, None, "x")):
      large = jax.device_put(large_grads, jax.sharding.NamedSharding(mesh, spec))
      run = jax.jit(lambda g, k: ogd.graddrop(g, k, return_stats=True))
      compiled = run.lower(large, key).compile()
      gathers = [l for l in compiled.as_text().splitlines() if "all-gather(" in l]
      assert not [l for l in gathers if "= f32[" in l], (types, spec, gathers)
      assert compiled.memory_analysis().temp_size_in_bytes < large_grads.nbytes / 2, (types, spec)
      out, stats = run(large, key)
      like_param = jax.sharding.NamedSharding(mesh, P(*spec[1:]))
      assert out.sharding.is_equivalent_to(like_param, out.ndim), (types, spec, out.sharding)
      assert np.array_equal(np.asarray(out), np.asarray(large_expected)), (types, spec)
      assert stats.conflict_fraction == large_stats.conflict_fraction, (types, spec)
    # Tasks sharded over devices: Auto axes work; Explicit ones cannot index
    # the task axis, and say so.
    by_task = jax.device_put(jnp.ones((8, 4, 4)), jax.sharding.NamedSharding(mesh, P("x")))
    for fn in (ogd.sum_tasks, lambda g: ogd.graddrop(g, key), ogd.mgda):
      if types == AxisType.Explicit:
        try:
          jax.jit(fn)(by_task)
          raise AssertionError("no error for a sharded task axis")
        except ValueError as error:
          assert "sharded over its task axis" in str(error), error
      else:
        assert np.array_equal(np.asarray(jax.jit(fn)(by_task)), np.asarray(fn(jnp.ones((8, 4, 4)))))
    print(types, "ok")
"""


def test_graddrop_transform_and_streaming_under_explicit_and_auto_meshes():
  result = _on_8_cpu_devices(["-c", _MESH_CHECKS, str(ROOT / "tests")])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Explicit ok" in result.stdout and "Auto ok" in result.stdout


def _on_8_cpu_devices(args: list[str]) -> subprocess.CompletedProcess:
  """Runs ``python *args`` in a fresh interpreter with 8 fake CPU devices (the
  device count is fixed when jax starts)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, check=False
  )
