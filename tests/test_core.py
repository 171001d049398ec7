"""Tests of graddrop(): exact properties, statistics, transformations, dtypes."""

import math

import chex
import graddrop_oracle
import jax
import jax.numpy as jnp
import jax_compat
import numpy as np
import pytest
import strategies
import tolerances
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_graddrop as ogd
from optax_graddrop import _sums

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _plain_sum(task_grads):
  return jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32), 0).astype(g.dtype), task_grads)


def _run(jit, fn, *args):
  return jax.jit(fn)(*args) if jit else fn(*args)


@st.composite
def task_stacks(draw, signs="any"):
  """A [T, ...] stack of finite values in one of the supported dtypes."""
  num_tasks = draw(st.integers(1, 5))
  shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=5))
  dtype = draw(st.sampled_from(DTYPES))
  values = draw(
    hnp.arrays(
      np.float32,
      (num_tasks, *shape),
      elements=st.floats(-100, 100, width=32).filter(lambda v: v == 0 or abs(v) > 1e-3),
    )
  )
  if signs == "agree":
    column_sign = np.where(draw(hnp.arrays(np.bool_, shape)), 1.0, -1.0)
    values = np.abs(values) * column_sign
  return jnp.asarray(values, dtype)


@settings(max_examples=25, deadline=None)
@given(task_stacks(signs="agree"), st.sampled_from(["linear", "sigmoid", "random"]))
def test_agreeing_signs_give_the_plain_sum(task_grads, keep):
  out = ogd.graddrop(task_grads, jax.random.key(0), keep=keep)
  tolerances.assert_sums_close(out, _plain_sum(task_grads), terms=task_grads.shape[0])
  assert out.dtype == task_grads.dtype


@settings(max_examples=25, deadline=None)
@given(task_stacks())
def test_full_leak_gives_the_plain_sum(task_grads):
  out = ogd.graddrop(task_grads, jax.random.key(1), leak=1.0)
  tolerances.assert_sums_close(out, _plain_sum(task_grads), terms=task_grads.shape[0])


@settings(max_examples=25, deadline=None)
@given(task_stacks())
def test_each_output_is_the_sum_of_one_sign(task_grads):
  out = np.asarray(ogd.graddrop(task_grads, jax.random.key(2)), np.float32)
  g = np.asarray(task_grads, np.float32)
  positive = np.asarray(np.where(g > 0, g, 0).sum(0).astype(task_grads.dtype), np.float32)
  negative = np.asarray(np.where(g < 0, g, 0).sum(0).astype(task_grads.dtype), np.float32)
  tol = 1e-2 * (np.abs(g).sum(0) + 1e-3)
  assert np.all((np.abs(out - positive) <= tol) | (np.abs(out - negative) <= tol))


@settings(max_examples=15, deadline=None)
@given(task_stacks())
def test_a_single_task_passes_through(task_grads):
  single = task_grads[:1]
  chex.assert_trees_all_equal(ogd.graddrop(single, jax.random.key(3)), single[0])


def test_zeros_stay_exactly_zero():
  task_grads = {"a": jnp.zeros((3, 4, 5)), "b": jnp.zeros((2, 7), jnp.bfloat16)[:, :]}
  task_grads["b"] = jnp.zeros((3, 7), jnp.bfloat16)
  out = ogd.graddrop(task_grads, jax.random.key(0), preserve_norm=True)
  chex.assert_trees_all_equal(out, jax.tree.map(lambda g: jnp.zeros_like(g[0]), task_grads))


@pytest.mark.parametrize("leak", [0.0, 0.3, [0.0, 0.5, 1.0]])
def test_preserve_norm_gives_the_plain_sum_norm(leak):
  task_grads = {
    "w": jax.random.normal(jax.random.key(0), (3, 64, 32)),
    "b": jax.random.normal(jax.random.key(1), (3, 32)),
  }
  out = ogd.graddrop(task_grads, jax.random.key(2), leak=leak, preserve_norm=True)
  # Each norm sums up to 64 * 32 squares of sums of 3 tasks.
  rtol = tolerances.summation_rtol(jnp.float32, 3 + 64 * 32)
  for name in task_grads:
    np.testing.assert_allclose(
      jnp.linalg.norm(out[name]), jnp.linalg.norm(task_grads[name].sum(0)), rtol=rtol
    )
  unnormed = ogd.graddrop(task_grads, jax.random.key(2), leak=leak)
  # Rescaling keeps the direction.
  cos = jnp.vdot(out["w"], unnormed["w"]) / (
    jnp.linalg.norm(out["w"]) * jnp.linalg.norm(unnormed["w"])
  )
  np.testing.assert_allclose(cos, 1.0, rtol=rtol)


@pytest.mark.parametrize("scale", [2.0**-70, 1e-20, 1e19, 1e30])
def test_preserve_norm_holds_across_the_float32_range(scale):
  # Squared as they are, these values overflow or underflow float32.
  task_grads = jnp.array([[1.0, 2.0, -1.0, 3.0], [-2.0, 1.0, 1.0, 1.0]])
  key = jax.random.key(0)
  expected = ogd.graddrop(task_grads, key, preserve_norm=True) * scale
  out = ogd.graddrop(task_grads * scale, key, preserve_norm=True)
  # Two norms of four squares of sums of two tasks, and the scaling.
  np.testing.assert_allclose(out, expected, rtol=tolerances.summation_rtol(jnp.float32, 2 + 4 + 2))


def test_leak_per_task_matches_the_formula():
  # out = sum_i (l_i + (1 - l_i) M_i) g_i, with the masks sign_masks returns.
  task_grads = jax.random.normal(jax.random.key(0), (3, 1000))
  key = jax.random.key(1)
  leak = jnp.array([0.0, 0.25, 1.0])
  masks = ogd.sign_masks(task_grads, key)
  expected = jnp.sum((leak[:, None] + (1 - leak[:, None]) * masks) * task_grads, 0)
  tolerances.assert_sums_close(ogd.graddrop(task_grads, key, leak=leak), expected, terms=3)
  tolerances.assert_sums_close(
    ogd.graddrop(task_grads, key), jnp.sum(masks * task_grads, 0), terms=3
  )


@pytest.mark.parametrize("leak", [0.1, [0.1, 0.2, 0.3]])
def test_float64_gradients_get_the_leak_in_float64(leak):
  with jax_compat.enable_x64():
    task_grads = jax.random.normal(jax.random.key(0), (3, 50), jnp.float64)
    key = jax.random.key(1)
    masks = ogd.sign_masks(task_grads, key)
    per_task = jnp.broadcast_to(jnp.asarray(leak, jnp.float64), (3,))[:, None]
    expected = jnp.sum((per_task + (1 - per_task) * masks) * task_grads, 0)
    out = ogd.graddrop(task_grads, key, leak=leak)
    tolerances.assert_sums_close(out, expected, terms=3)
    # The derivative in a traced float64 leak, against central differences.
    total = lambda value: ogd.graddrop(task_grads, key, leak=value).sum()  # noqa: E731
    step = 1e-6
    difference = (total(0.3 + step) - total(0.3 - step)) / (2 * step)
    np.testing.assert_allclose(jax.grad(total)(jnp.float64(0.3)), difference, rtol=1e-8)


def test_sign_masks_keep_exactly_one_sign_per_scalar():
  task_grads = jax.random.normal(jax.random.key(0), (4, 5000))
  masks = ogd.sign_masks(task_grads, jax.random.key(1))
  kept_signs = jnp.where(masks, jnp.sign(task_grads), 0)
  assert not jnp.any((kept_signs > 0).any(0) & (kept_signs < 0).any(0))
  # The kept sign is never empty where the scalar has any non-zero entry.
  assert jnp.all((kept_signs != 0).any(0))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("preserve_norm", [False, True])
def test_non_finite_values_stay_visible(bad, jit, preserve_norm):
  task_grads = jax.random.normal(jax.random.key(0), (3, 100))
  task_grads = task_grads.at[1, 17].set(bad).at[0, 17].set(-5.0).at[2, 17].set(2.0)
  task_grads = task_grads.at[0, 40].set(bad)
  for key in range(5):
    out = _run(
      jit,
      lambda g, k: ogd.graddrop(g, k, preserve_norm=preserve_norm),
      task_grads,
      jax.random.key(key),
    )
    assert not jnp.isfinite(out[17]) and not jnp.isfinite(out[40])
    if not preserve_norm:
      assert jnp.isnan(out[17]) == jnp.isnan(bad)
      assert jnp.isfinite(out).sum() == 98


def test_opposite_infinities_give_nan():
  task_grads = jnp.array([[jnp.inf], [-jnp.inf]])
  assert jnp.isnan(ogd.graddrop(task_grads, jax.random.key(0))[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_keeps_the_input_dtype(dtype):
  task_grads = {"w": jax.random.normal(jax.random.key(0), (4, 3, 2), dtype)}
  out = ogd.graddrop(task_grads, jax.random.key(1), leak=0.2, preserve_norm=True)
  assert out["w"].dtype == dtype


def test_bf16_picks_the_same_signs_as_float32():
  # Purity is computed in float32, so the choice equals that of the upcast input.
  task_grads = jax.random.normal(jax.random.key(0), (3, 4096), jnp.bfloat16)
  key = jax.random.key(5)
  out_bf16 = ogd.graddrop(task_grads, key)
  out_f32 = ogd.graddrop(task_grads.astype(jnp.float32), key)
  chex.assert_trees_all_equal(out_bf16, out_f32.astype(jnp.bfloat16))


def test_float64_input_stays_float64():
  with jax_compat.enable_x64():
    task_grads = jax.random.normal(jax.random.key(0), (3, 50), jnp.float64)
    out = ogd.graddrop(task_grads, jax.random.key(1))
    assert out.dtype == jnp.float64
    assert ogd.sign_purity(task_grads).dtype == jnp.float64


@pytest.mark.parametrize("keep", ["linear", "sigmoid", "random"])
@pytest.mark.parametrize("leak", [0.0, [0.1, 0.0, 1.0]])
def test_jit_and_eager_agree(keep, leak):
  task_grads = {
    "conv": jax.random.normal(jax.random.key(0), (3, 3, 3, 8, 16)),
    "bias": jax.random.normal(jax.random.key(1), (3, 16), jnp.bfloat16),
  }
  key = jax.random.key(42)

  def fn(g, k):
    return ogd.graddrop(g, k, keep=keep, leak=leak, return_stats=True)

  (eager, eager_stats), (jitted, jitted_stats) = fn(task_grads, key), jax.jit(fn)(task_grads, key)
  if leak == 0.0:
    chex.assert_trees_all_equal(eager, jitted)
  else:
    # Same masks, but XLA may fuse the leak's multiply-adds under jit.
    tolerances.assert_sums_close(eager, jitted, terms=3)
  # The diagnostics are ratios of exact counts; the division may round apart.
  chex.assert_trees_all_close(eager_stats, jitted_stats, rtol=1e-6)


def test_legacy_and_typed_keys_agree():
  task_grads = jax.random.normal(jax.random.key(0), (2, 300))
  chex.assert_trees_all_equal(
    ogd.graddrop(task_grads, jax.random.PRNGKey(7)),
    ogd.graddrop(task_grads, jax.random.key(7)),
  )


def test_different_keys_differ_and_leaves_are_independent():
  same = jax.random.normal(jax.random.key(0), (2, 20000))
  out = ogd.graddrop({"a": same, "b": same}, jax.random.key(1))
  picks_a, picks_b = (
    out["a"] == jnp.maximum(same, 0).sum(0),
    out["b"] == jnp.maximum(same, 0).sum(0),
  )
  conflict = (same > 0).any(0) & (same < 0).any(0)
  agreement = jnp.mean(picks_a[conflict] == picks_b[conflict])
  # Independent picks with keep probability p agree with probability
  # p^2 + (1-p)^2 < 1; identical streams would agree always.
  assert agreement < 0.8
  other = ogd.graddrop({"a": same, "b": same}, jax.random.key(2))
  assert not jnp.array_equal(out["a"], other["a"])


def test_vmap_over_independent_problems():
  task_grads = jax.random.normal(jax.random.key(0), (6, 3, 40))
  keys = jax.random.split(jax.random.key(1), 6)
  batched = jax.vmap(lambda g, k: ogd.graddrop(g, k, leak=0.1))(task_grads, keys)
  one_by_one = jnp.stack([ogd.graddrop(g, k, leak=0.1) for g, k in zip(task_grads, keys)])
  chex.assert_trees_all_equal(batched, one_by_one)
  jitted = jax.jit(jax.vmap(ogd.graddrop))(task_grads, keys)
  chex.assert_trees_all_equal(jitted, jax.vmap(ogd.graddrop)(task_grads, keys))


def test_stats_count_conflicts_and_kept_entries():
  task_grads = jnp.array([[1.0, 2.0, -1.0, 0.0], [3.0, -1.0, -2.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
  _, stats = ogd.graddrop(task_grads, jax.random.key(0), return_stats=True)
  np.testing.assert_allclose(stats.conflict_fraction, 1 / 4)
  masks = ogd.sign_masks(task_grads, jax.random.key(0))
  np.testing.assert_allclose(stats.kept_fraction, jnp.mean(masks))
  # Column 1 keeps either the two positives or the one negative: 11 or 10 of 12.
  assert np.isclose(stats.kept_fraction, 11 / 12) or np.isclose(stats.kept_fraction, 10 / 12)


def test_stats_on_random_tasks_follow_the_expected_rates():
  task_grads = jax.random.normal(jax.random.key(0), (2, 200_000))
  _, stats = ogd.graddrop(task_grads, jax.random.key(1), return_stats=True)
  # Two independent symmetric tasks disagree in sign half the time, and a
  # conflicting scalar drops exactly one of its two entries.
  n = task_grads.shape[1]
  bound = 6 * math.sqrt(0.25 / n)
  assert abs(float(stats.conflict_fraction) - 0.5) < bound
  np.testing.assert_allclose(stats.kept_fraction, 1 - float(stats.conflict_fraction) / 2, rtol=1e-6)


# --- Statistical checks of the keep probability -------------------------------

# Three tasks (2, -1, 0.5): P = 1/2 (1 + 1.5 / 3.5) = 5/7.
_PURITY = 5 / 7


@pytest.mark.parametrize(
  ("keep", "scale", "expected"),
  [
    ("linear", 1.0, _PURITY),
    ("linear", 0.5, 0.5 + 0.5 * (_PURITY - 0.5)),
    ("linear", 3.0, 1.0),  # 0.5 + 3 (P - 0.5) > 1 acts as 1
    ("sigmoid", 1.0, 1 / (1 + math.exp(-4 * (_PURITY - 0.5)))),
    ("sigmoid", 2.5, 1 / (1 + math.exp(-10 * (_PURITY - 0.5)))),
    ("random", 1.0, 0.5),
    (lambda p: p**2, 1.0, _PURITY**2),
  ],
)
def test_positive_set_is_kept_with_probability_f_of_purity(keep, scale, expected):
  n = 400_000
  task_grads = jnp.broadcast_to(jnp.array([2.0, -1.0, 0.5])[:, None], (3, n))
  np.testing.assert_allclose(ogd.sign_purity(task_grads)[0], _PURITY, rtol=1e-6)
  out = ogd.graddrop(task_grads, jax.random.key(11), keep=keep, scale=scale)
  assert jnp.all((out == 2.5) | (out == -1.0))
  freq = float(jnp.mean(out == 2.5))
  # Binomial standard error; 6 sigma, plus the 2**-16 resolution of U.
  sigma = math.sqrt(max(expected * (1 - expected), 1e-12) / n)
  assert abs(freq - expected) <= 6 * sigma + 2**-16, (freq, expected)


def test_monte_carlo_mean_matches_the_closed_form_expectation():
  # E[out] = sum_i g_i ([g_i > 0] f(P) + [g_i < 0] (1 - f(P))) at conflicts.
  num_keys, num_scalars = 4000, 48
  task_grads = jax.random.normal(jax.random.key(3), (4, num_scalars))
  g = np.asarray(task_grads, np.float64)
  positive, negative = np.where(g > 0, g, 0).sum(0), np.where(g < 0, g, 0).sum(0)
  purity = 0.5 * (1 + (positive + negative) / (positive - negative))
  expected = positive * purity + negative * (1 - purity)
  std = np.sqrt(purity * (1 - purity)) * (positive - negative)

  keys = jax.random.split(jax.random.key(4), num_keys)
  samples = jax.jit(jax.vmap(ogd.graddrop, in_axes=(None, 0)))(task_grads, keys)
  mean = np.asarray(samples, np.float64).mean(0)
  bound = 5.5 * std / math.sqrt(num_keys) + 2**-16 * (positive - negative) + 1e-5
  assert np.all(np.abs(mean - expected) <= bound), np.max(np.abs(mean - expected) / bound)


# --- Against the NumPy oracle (tests/graddrop_oracle.py) -------------------------


@settings(max_examples=25, deadline=None)
@given(strategies.problems(), st.integers(0, 2**31 - 1), st.booleans())
def test_graddrop_agrees_with_the_numpy_oracle(problem, seed, jit):
  key = jax.random.key(seed)

  def run(task_grads, key):
    return ogd.graddrop(task_grads, key, return_stats=True, **problem.options())

  out, stats = (jax.jit(run) if jit else run)(problem.as_dtype(), key)
  strategies.assert_graddrop_matches_oracle(out, problem, key, stats)


@settings(max_examples=15, deadline=None)
@given(strategies.problems(max_tasks=3), st.integers(0, 2**31 - 1))
def test_sign_masks_agree_with_the_numpy_oracle(problem, seed):
  key = jax.random.key(seed)
  options = {"keep": problem.keep, "scale": problem.scale}
  masks = ogd.sign_masks(problem.as_dtype(), key, **options)
  for got, want in zip(
    jax.tree.leaves(masks), graddrop_oracle.masks(problem.leaves(), key, **options)
  ):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_many_tasks_loop_gives_the_unrolled_result(monkeypatch, leak):
  # Beyond 32 tasks the sums are added a block at a time in a loop; the
  # order of the additions, hence every bit of the output, is unchanged.
  task_grads = jax.random.normal(jax.random.key(0), (70, 333))
  key = jax.random.key(1)

  def run(g, k):
    return ogd.graddrop(g, k, leak=leak, return_stats=True)

  looped = jax.jit(run)(task_grads, key)
  monkeypatch.setattr(_sums, "BLOCK", 1000)
  unrolled = jax.jit(run)(task_grads, key)
  chex.assert_trees_all_equal(looped, unrolled)
  expected = graddrop_oracle.graddrop([np.asarray(task_grads)], key, leak=leak)
  tolerances.assert_sums_close(looped[0], expected[0], terms=70)


# --- Scale invariance: the same decisions whatever the gradients' scale ----------

_NORMAL_RANGE = {  # (smallest normal, largest finite) of each dtype
  jnp.float16: (2.0**-14, 65504.0),
  jnp.bfloat16: (2.0**-126, 3.3e38),
  jnp.float32: (2.0**-126, 3.4e38),
  jnp.float64: (2.0**-1022, 1.7e308),
}


def _scales(draw, values, outputs, dtype, leak=0.0):
  """A power of two keeping every input, product with the leak and output
  normal in ``dtype``, and the float32 arithmetic on them clear of
  subnormals (XLA:CPU flushes subnormal results to zero)."""
  tiny, huge = _NORMAL_RANGE[dtype]
  nonzero = np.abs(np.concatenate([v.ravel() for v in values + outputs]))
  nonzero = nonzero[nonzero > 0]
  if not nonzero.size:  # all zero: any scale
    return draw(st.integers(-10, 10))
  leaks = np.atleast_1d(np.asarray(leak, np.float64))
  factors = np.concatenate([leaks, 1.0 - leaks, [1.0]])  # l_i g_i and (1 - l_i) g_i
  smallest = nonzero.min() * factors[factors > 0].min()
  largest = max(float(np.abs(v).sum(0).max()) for v in values)  # bounds every sum
  # The sums are formed in float32: a rounding residue of a value is down to
  # 2**-24 of it, and must not fall below float32's smallest normal.
  float32_tiny = _NORMAL_RANGE[jnp.float32][0] * 2.0**24
  low = max(math.log2(tiny / smallest), math.log2(float32_tiny / smallest))
  high = math.log2(huge / largest) - 1
  return draw(st.integers(math.ceil(low), math.floor(high)))


@settings(max_examples=12, deadline=None)
@given(strategies.problems(), st.integers(0, 2**31 - 1), st.booleans(), st.data())
def test_scaling_by_a_power_of_two_scales_the_output_exactly(problem, seed, preserve_norm, data):
  key = jax.random.key(seed)
  options = problem.options() | {"preserve_norm": preserve_norm}
  task_grads = problem.as_dtype()
  out, stats = ogd.graddrop(task_grads, key, return_stats=True, **options)
  k = _scales(
    data.draw,
    problem.leaves(),
    [np.asarray(o, np.float64) for o in jax.tree.leaves(out)],
    problem.dtype,
    problem.leak,
  )
  scaled = jax.tree.map(lambda g: g * jnp.asarray(2.0**k, g.dtype), task_grads)
  scaled_out, scaled_stats = ogd.graddrop(scaled, key, return_stats=True, **options)
  expected = jax.tree.map(lambda o: o * jnp.asarray(2.0**k, o.dtype), out)
  chex.assert_trees_all_equal(scaled_out, expected)
  chex.assert_trees_all_equal(scaled_stats, stats)
  masks_options = {"keep": problem.keep, "scale": problem.scale}
  chex.assert_trees_all_equal(
    ogd.sign_masks(scaled, key, **masks_options), ogd.sign_masks(task_grads, key, **masks_options)
  )
  chex.assert_trees_all_equal(
    jax.tree.map(ogd.sign_purity, scaled), jax.tree.map(ogd.sign_purity, task_grads)
  )


@pytest.mark.parametrize("k", [-1000, -300, -40, 0, 40, 300, 1000])
def test_float64_scales_exactly_over_its_range(k):
  with jax_compat.enable_x64():
    task_grads = jax.random.normal(jax.random.key(0), (4, 2000), jnp.float64)
    key = jax.random.key(1)
    out = ogd.graddrop(task_grads, key, leak=[0.0, 0.5, 0.25, 1.0], keep="sigmoid")
    scaled = ogd.graddrop(task_grads * 2.0**k, key, leak=[0.0, 0.5, 0.25, 1.0], keep="sigmoid")
    np.testing.assert_array_equal(scaled, out * 2.0**k)
    assert scaled.dtype == jnp.float64


@pytest.mark.parametrize("scale", [1e-4, 1e-6, 1e-8, 1e-10])
def test_masks_do_not_change_with_the_scale_and_lingvo_eps_does(scale):
  # The measurement: a [3, 100000] standard-normal stack, same key.
  task_grads = jax.random.normal(jax.random.key(0), (3, 100_000))
  key = jax.random.key(1)
  masks = ogd.sign_masks(task_grads, key)
  np.testing.assert_array_equal(ogd.sign_masks(task_grads * scale, key), masks)
  # lingvo's absolute epsilon, kept as an option, pulls P towards 1/2 for
  # small gradients, and so changes the masks.
  changed = jnp.mean(ogd.sign_masks(task_grads * scale, key, eps=1e-7) != masks)
  if scale <= 1e-8:
    assert changed > 0.05


def test_all_zero_entries_have_purity_one_half_and_stay_zero():
  task_grads = jnp.zeros((3, 5)).at[:, 0].set(jnp.array([1.0, -1.0, 2.0]))
  purity = ogd.sign_purity(task_grads)
  np.testing.assert_array_equal(purity[1:], 0.5)
  out = ogd.graddrop(task_grads, jax.random.key(0), leak=0.5, preserve_norm=True)
  np.testing.assert_array_equal(out[1:], 0.0)
  np.testing.assert_array_equal(ogd.sign_purity(jnp.zeros((2, 3)), eps=1e-7), 0.5)


def _calls(jaxpr, name):
  """The inner jaxprs of every nested call to the jitted function ``name``."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == name:
      found.append(eqn.params["jaxpr"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _calls(sub.jaxpr, name)
  return found


def test_leaves_of_one_shape_are_traced_once():
  # Tracing and lowering cost time per segment; a model's many leaves of one
  # shape share one trace of the sums and of eqs. 2-3.
  task_grads = {f"w{i}": jnp.ones((3, 64, 256)) for i in range(5)}
  task_grads["other"] = jnp.ones((3, 256, 128))
  jaxpr = jax.make_jaxpr(lambda g: ogd.graddrop(g, jax.random.key(0), return_stats=True))(
    task_grads
  )
  for name in ("add_slices", "add_reductions", "_finish_once"):
    calls = _calls(jaxpr.jaxpr, name)
    assert len(calls) == 6, name
    assert len({id(c) for c in calls}) == 2, name


@pytest.mark.parametrize("size", [4, 1000, 3_000_001])
@pytest.mark.parametrize("jit", [False, True])
def test_stats_are_exact_fractions_of_exact_counts(size, jit):
  # Every scalar conflicts and one of the two tasks is dropped at each:
  # exactly 1 and 1/2, with a small leaf beside the large one too.
  ones = jnp.ones(size)
  task_grads = {
    "w": jnp.stack([ones, -ones]),
    "b": jnp.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]]),
  }
  run = lambda g: ogd.graddrop(g, jax.random.key(0), return_stats=True)[1]  # noqa: E731
  stats = (jax.jit(run) if jit else run)(task_grads)
  assert float(stats.conflict_fraction) == 1.0
  assert float(stats.kept_fraction) == 0.5


def test_stats_under_vmap_are_the_correctly_rounded_fractions():
  # 9 conflicts out of 10: float32(9 / 10), not 9 times a rounded 1 / 10 (XLA
  # rewrites a division by a scalar broadcast over the batch).
  sign = jnp.array([1.0] * 9 + [0.0])
  task_grads = jnp.stack([sign, -sign, jnp.ones(10)])
  keys = jax.random.split(jax.random.key(0), 2)
  stats = jax.jit(jax.vmap(lambda k: ogd.graddrop(task_grads, k, return_stats=True)[1]))(keys)
  np.testing.assert_array_equal(stats.conflict_fraction, np.full(2, np.float32(0.9)))


class _UnhashableKeep:
  """A keep function with state, unhashable as a dataclass with ``eq`` is."""

  __hash__ = None  # type: ignore[assignment]

  def __init__(self, slope):
    self.slope = slope

  def __eq__(self, other):
    return isinstance(other, _UnhashableKeep) and self.slope == other.slope

  def __call__(self, purity):
    return 0.5 + self.slope * (purity - 0.5)


@pytest.mark.parametrize("jit", [False, True])
def test_an_unhashable_keep_callable_works_as_its_function(jit):
  task_grads = jax.random.normal(jax.random.key(0), (3, 1000))
  key = jax.random.key(1)
  keep = _UnhashableKeep(0.5)
  run = lambda g: (ogd.graddrop(g, key, keep=keep), ogd.sign_masks(g, key, keep=keep))  # noqa: E731
  out, masks = (jax.jit(run) if jit else run)(task_grads)
  chex.assert_trees_all_equal(out, ogd.graddrop(task_grads, key, keep="linear", scale=0.5))
  chex.assert_trees_all_equal(masks, ogd.sign_masks(task_grads, key, keep="linear", scale=0.5))


@pytest.mark.parametrize("jit", [False, True])
def test_a_task_with_a_zero_gradient_changes_nothing(jit):
  # docs/guide/usage.md, "Tasks with missing labels": a task without labels
  # in a batch contributes a zero gradient, and the output is unchanged.
  task_grads = {"w": jax.random.normal(jax.random.key(1), (3, 40)), "b": jnp.arange(-3.0, 3.0)}
  task_grads["b"] = jnp.stack([task_grads["b"], -task_grads["b"], task_grads["b"] ** 2])
  with_zero = jax.tree.map(lambda g: jnp.concatenate([g, jnp.zeros_like(g[:1])]), task_grads)
  run = jax.jit(ogd.graddrop) if jit else ogd.graddrop
  for seed in range(5):
    key = jax.random.key(seed)
    chex.assert_trees_all_equal(run(with_zero, key), run(task_grads, key))
