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


def test_sharded_training_over_8_devices_matches_one_device():
  # A fresh interpreter: the device count is fixed when jax starts.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "sharded_training.py"), "--steps", "10"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "8 devices" in result.stdout
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
