"""Tests of the per-element sums over tasks and of every backend's schedule.

The CPU schedule (slices in task order) and the fused one (reductions over
the task axis, used on GPU and TPU) are plain functions: both are tested here
on the CPU, directly and through ``graddrop`` with the schedule swapped in.
"""

import chex
import graddrop_oracle
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

import optax_graddrop as ogd
from optax_graddrop import _random
from optax_graddrop import _sums

SCHEDULES = {"slices (CPU)": _sums.add_slices, "reductions (GPU, TPU)": _sums.add_reductions}


def _reference(g: np.ndarray, leak: np.ndarray | None) -> dict[str, np.ndarray]:
  g = np.asarray(g, np.float64)
  weight = 1.0 if leak is None else (1.0 - leak)[:, None]
  return {
    "positive": np.maximum(g, 0).sum(0),
    "negative": np.minimum(g, 0).sum(0),
    "kept_positive": (weight * np.maximum(g, 0)).sum(0),
    "kept_negative": (weight * np.minimum(g, 0)).sum(0),
    "num_positive": (g > 0).sum(0),
    "num_negative": (g < 0).sum(0),
  }


def _sums_of(add, rows, leak, num_tasks):
  dtype = _sums.compute_dtype(rows.dtype)
  zeros = _sums.zeros(
    rows[0], rows[0], dtype, per_task_leak=leak is not None, counts=_sums.count_dtype(num_tasks)
  )
  return add(zeros, rows, leak)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_tasks", [1, 3, 40])
@pytest.mark.parametrize("with_leak", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_schedules_compute_the_sums(schedule, num_tasks, with_leak, jit):
  rows = jax.random.normal(jax.random.key(num_tasks), (num_tasks, 257))
  rows = rows.at[0, :5].set(0.0)
  leak = jnp.linspace(0.0, 0.5, num_tasks) if with_leak else None
  add = SCHEDULES[schedule]
  run = jax.jit(_sums_of, static_argnums=(0, 3)) if jit else _sums_of
  sums = run(add, rows, leak, num_tasks)
  expected = _reference(np.asarray(rows), None if leak is None else np.asarray(leak))
  fields = ["positive", "negative"] + (["kept_positive", "kept_negative"] if with_leak else [])
  tolerances.assert_sums_close(
    [getattr(sums, f) for f in fields], [expected[f] for f in fields], terms=num_tasks + 1
  )
  if not with_leak:
    assert sums.kept_positive is None and sums.kept_negative is None
  for field in ("num_positive", "num_negative"):
    np.testing.assert_array_equal(getattr(sums, field), expected[field])


def test_schedules_agree_exactly_when_the_sums_are_exact():
  # Small integers sum exactly in float32 in any order.
  rows = jax.random.randint(jax.random.key(0), (37, 1001), -8, 9).astype(jnp.float32)
  leak = jnp.full((37,), 0.5)
  slices, reductions = (_sums_of(add, rows, leak, 37) for add in SCHEDULES.values())
  chex.assert_trees_all_equal(slices, reductions)


@pytest.mark.parametrize("num_tasks", [300, 4100])
def test_counts_are_exact_at_many_tasks(num_tasks):
  # Beyond T (T + 1) = 2**24 the fused schedule counts with two reductions.
  rows = jax.random.normal(jax.random.key(1), (num_tasks, 3))
  rows = rows.at[: num_tasks // 2, 0].set(0.0)
  for add in SCHEDULES.values():
    sums = _sums_of(add, rows, None, num_tasks)
    np.testing.assert_array_equal(sums.num_positive, (np.asarray(rows) > 0).sum(0))
    np.testing.assert_array_equal(sums.num_negative, (np.asarray(rows) < 0).sum(0))


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_sum_schedules(weighted):
  rows = jax.random.normal(jax.random.key(2), (45, 130)).astype(jnp.bfloat16)
  weights = jnp.linspace(0.5, 1.5, 45) if weighted else None
  expected = np.asarray(rows, np.float64) * (
    1.0 if weights is None else np.asarray(weights)[:, None]
  )
  zeros = jnp.zeros(rows.shape[1:], _sums.compute_dtype(rows.dtype))
  for total in (
    _sums._weighted_slices(zeros, rows, weights),
    _sums._weighted_reduction(zeros, rows, weights),
  ):
    tolerances.assert_sums_close(total, expected.sum(0), terms=45)
  assert _sums.weighted_sum(rows, weights).dtype == jnp.bfloat16


def test_the_cpu_schedule_adds_in_task_order_whatever_the_chunks():
  # Streaming adds the tasks outside a mask chunk by chunk: the same bits.
  rows = jax.random.normal(jax.random.key(3), (45, 130))
  zeros = jnp.zeros(rows.shape[1:])
  at_once = _sums._weighted_slices(zeros, rows, None)
  in_chunks = zeros
  for start in range(0, 45, 7):
    in_chunks = _sums._weighted_slices(in_chunks, rows[start : start + 7], None)
  chex.assert_trees_all_equal(in_chunks, at_once)


_STREAM_WORDS = _random.stream_words


def _fused_words(key, low, high, materialize):
  del materialize
  return _STREAM_WORDS(key, low, high, materialize=False)


@pytest.fixture
def fused_schedule(monkeypatch):
  """The GPU/TPU schedule on this backend: reductions, words inline."""
  monkeypatch.setattr(_sums, "add_slices", _sums.add_reductions)
  monkeypatch.setattr(_random, "stream_words", _fused_words)


def _tree():
  return {
    "w": jax.random.normal(jax.random.key(3), (5, 64, 33)),
    "b": jax.random.normal(jax.random.key(4), (5, 7)),
    "s": jax.random.normal(jax.random.key(5), (5, 3)),
  }


@pytest.mark.parametrize("jit", [False, True])
def test_fused_schedule_matches_the_oracle(fused_schedule, jit):
  del fused_schedule
  tree = _tree()
  key = jax.random.key(6)
  leak = jnp.array([0.0, 0.5, 0.0, 0.25, 1.0])
  run = jax.jit(ogd.graddrop) if jit else ogd.graddrop
  out = run(tree, key, leak=leak)
  leaves = jax.tree.leaves(tree)
  expected = graddrop_oracle.graddrop([np.asarray(x) for x in leaves], key, leak=np.asarray(leak))
  tolerances.assert_sums_close(jax.tree.leaves(out), expected, terms=5)


def test_same_key_same_masks_on_every_schedule(monkeypatch):
  tree, key = _tree(), jax.random.key(7)
  on_cpu = ogd.sign_masks(tree, key)
  cpu_out = ogd.graddrop(tree, key)
  monkeypatch.setattr(_sums, "add_slices", _sums.add_reductions)
  monkeypatch.setattr(_random, "stream_words", _fused_words)
  chex.assert_trees_all_equal(ogd.sign_masks(tree, key), on_cpu)
  tolerances.assert_sums_close(ogd.graddrop(tree, key), cpu_out, terms=5)


def test_streaming_on_the_fused_schedule_equals_stacked(fused_schedule):
  del fused_schedule
  x = jax.random.normal(jax.random.key(8), (16, 6))
  targets = jax.random.normal(jax.random.key(9), (4, 16))

  def task_losses(params):
    out = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((out.sum(1) - targets) ** 2, axis=1)

  params = {"w": jax.random.normal(jax.random.key(10), (6, 5)), "b": jnp.zeros(5)}
  key = jax.random.key(11)
  _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
  stacked = ogd.graddrop(task_grads, key)
  for chunk_size in (None, 1, 3):
    _, streamed = ogd.graddrop_value_and_grad(task_losses, key, chunk_size=chunk_size)(params)
    tolerances.assert_sums_close(streamed, stacked, terms=16 + 6 + 4)
