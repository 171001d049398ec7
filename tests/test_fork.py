"""Tests of fork and graddrop_activation (activation-level GradDrop)."""

import math

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

T = 3
# A gradient sums over the inputs (6), the features (16), the batch (32) and
# the tasks; the tests that compare two ways to form it pin full float32.
TERMS = 6 + 16 + 32 + T


def _model():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "trunk": jax.random.normal(keys[0], (6, 16)) / 3,
    "heads": jax.random.normal(keys[1], (T, 16)),
  }
  x = jax.random.normal(keys[2], (32, 6))
  y = jax.random.normal(keys[3], (T, 32))
  return params, x, y


def _trunk(trunk, x):
  return jax.nn.relu(x @ trunk) + 0.1 * jnp.tanh(x @ trunk)


def _head_loss(task, head, features, y):
  return jnp.mean((features @ head - y[task]) ** 2)


def _loss(params, x, y, key, **options):
  branches = ogd.fork(_trunk(params["trunk"], x), key, T, **options)
  return sum(_head_loss(i, params["heads"][i], b, y) for i, b in enumerate(branches))


def _plain_loss(params, x, y):
  features = _trunk(params["trunk"], x)
  return sum(_head_loss(i, params["heads"][i], features, y) for i in range(T))


def test_forward_is_the_identity():
  features = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 4))}
  branches = ogd.fork(features, jax.random.key(0), 4)
  assert len(branches) == 4
  for branch in branches:
    chex.assert_trees_all_equal(branch, features)


@pytest.mark.parametrize("name, values", [("scale", (0.1, 3.0)), ("eps", (0.0, 1e3))])
def test_scale_and_eps_may_be_traced(name, values):
  # A schedule (jit) or a sweep (vmap) of them, as graddrop allows.
  features = jax.random.normal(jax.random.key(0), (16, 32))
  key = jax.random.key(1)

  def grad(value):
    def loss(x):
      a, b = ogd.fork(x, key, 2, **{name: value})
      return jnp.sum(a**2) - jnp.sum(3.0 * b)

    return jax.grad(loss)(features)

  expected = jnp.stack([grad(value) for value in values])
  tolerances.assert_sums_close(jax.vmap(grad)(jnp.array(values)), expected, terms=2)
  tolerances.assert_sums_close(jax.jit(grad)(values[1]), expected[1], terms=2)
  assert not jnp.array_equal(expected[0], expected[1])


@pytest.mark.parametrize("options", [{"leak": 1.0}, {"leak": [1.0, 1.0, 1.0], "keep": "random"}])
@jax.default_matmul_precision("highest")
def test_full_leak_gives_the_plain_gradient(options):
  params, x, y = _model()
  grads = jax.grad(_loss)(params, x, y, jax.random.key(1), **options)
  tolerances.assert_sums_close(grads, jax.grad(_plain_loss)(params, x, y), terms=TERMS)


def test_one_task_gives_the_plain_gradient():
  params, x, y = _model()

  def one_task(params, key):
    (features,) = ogd.fork(_trunk(params["trunk"], x), key, 1)
    return _head_loss(0, params["heads"][0], features, y)

  expected = jax.grad(lambda p: _head_loss(0, p["heads"][0], _trunk(p["trunk"], x), y))(params)
  chex.assert_trees_all_equal(jax.grad(one_task)(params, jax.random.key(2)), expected)


@pytest.mark.parametrize("marginalize", ["sign", "value", None])
@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
@jax.default_matmul_precision("highest")
def test_one_backward_pass_equals_the_explicit_computation(marginalize, leak):
  params, x, y = _model()
  key = jax.random.key(3)
  options = {"marginalize": marginalize, "leak": leak, "preserve_norm": marginalize == "value"}
  grads = jax.jit(jax.grad(lambda p: _loss(p, x, y, key, **options)))(params)

  # The explicit way: per-task cotangents of A, GradDrop, then the trunk's VJP.
  features, trunk_vjp = jax.vjp(lambda w: _trunk(w, x), params["trunk"])
  cotangents = [
    jax.grad(lambda a, i=i: _head_loss(i, params["heads"][i], a, y))(features) for i in range(T)
  ]
  combined = ogd.graddrop_activation(features, cotangents, key, **options)
  (trunk_grad,) = trunk_vjp(combined)
  tolerances.assert_sums_close(grads["trunk"], trunk_grad, terms=TERMS)
  head_grads = jax.grad(lambda h: sum(_head_loss(i, h[i], features, y) for i in range(T)))(
    params["heads"]
  )
  tolerances.assert_sums_close(grads["heads"], head_grads, terms=TERMS)


def test_without_marginalisation_it_is_graddrop_of_the_stacked_cotangents():
  features = jax.random.normal(jax.random.key(0), (8, 5))
  cotangents = list(jax.random.normal(jax.random.key(1), (T, 8, 5)))
  key = jax.random.key(2)
  chex.assert_trees_all_equal(
    ogd.graddrop_activation(features, cotangents, key, marginalize=None),
    ogd.graddrop(jnp.stack(cotangents), key),
  )


@pytest.mark.parametrize("marginalize", ["sign", "value"])
def test_each_column_gets_the_sum_of_one_sign_set(marginalize):
  features = jax.random.normal(jax.random.key(0), (16, 200))
  cotangents = jax.random.normal(jax.random.key(1), (4, 16, 200))
  out = ogd.graddrop_activation(
    features, list(cotangents), jax.random.key(2), marginalize=marginalize
  )
  factor = jnp.sign(features) if marginalize == "sign" else features
  signal = jnp.sum(factor * cotangents, axis=1)  # [T, columns]
  positive_set = jnp.sum(jnp.where((signal >= 0)[:, None, :], cotangents, 0), 0)
  negative_set = jnp.sum(jnp.where((signal <= 0)[:, None, :], cotangents, 0), 0)
  is_positive = jnp.all(jnp.isclose(out, positive_set, atol=1e-5), axis=0)
  is_negative = jnp.all(jnp.isclose(out, negative_set, atol=1e-5), axis=0)
  assert jnp.all(is_positive | is_negative)
  conflict = jnp.any(signal > 0, 0) & jnp.any(signal < 0, 0)
  assert jnp.any(is_positive & conflict) and jnp.any(is_negative & conflict)


@pytest.mark.parametrize(("keep", "expected"), [("linear", 5 / 7), ("random", 0.5)])
def test_positive_set_is_kept_with_probability_f_of_purity(keep, expected):
  # Signals (2, -1, 0.5) per column after marginalising a batch of 2 with A > 0.
  columns = 100_000
  features = jnp.ones((2, columns))
  per_task = jnp.array([2.0, -1.0, 0.5])[:, None, None] / 2
  cotangents = list(jnp.broadcast_to(per_task, (3, 2, columns)))
  out = ogd.graddrop_activation(features, cotangents, jax.random.key(5), keep=keep)
  assert jnp.all((out == 1.25) | (out == -0.5))
  freq = float(jnp.mean(out[0] == 1.25))
  sigma = math.sqrt(expected * (1 - expected) / columns)
  assert abs(freq - expected) <= 6 * sigma + 2**-16


@jax.default_matmul_precision("highest")
def test_jit_and_eager_agree_and_keys_matter():
  params, x, y = _model()
  grad_fn = jax.grad(_loss)
  eager = grad_fn(params, x, y, jax.random.key(4))
  # Same masks; the model's own float ops may fuse differently under jit.
  jitted = jax.jit(grad_fn)(params, x, y, jax.random.key(4))
  tolerances.assert_sums_close(eager, jitted, terms=TERMS)
  other = grad_fn(params, x, y, jax.random.key(5))
  assert not jnp.array_equal(eager["trunk"], other["trunk"])


@jax.default_matmul_precision("highest")
def test_unused_heads_contribute_zero():
  params, x, y = _model()
  key = jax.random.key(6)

  def two_of_three(params):
    branches = ogd.fork(_trunk(params["trunk"], x), key, T)
    return sum(_head_loss(i, params["heads"][i], branches[i], y) for i in range(2))

  grads = jax.grad(two_of_three)(params)
  assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))
  features = _trunk(params["trunk"], x)
  cotangents = [
    jax.grad(lambda a, i=i: _head_loss(i, params["heads"][i], a, y))(features) for i in range(2)
  ]
  combined = ogd.graddrop_activation(features, [*cotangents, jnp.zeros_like(features)], key)
  (expected,) = jax.vjp(lambda w: _trunk(w, x), params["trunk"])[1](combined)
  tolerances.assert_sums_close(grads["trunk"], expected, terms=TERMS)


def test_pytree_features_draw_per_leaf():
  features = {"a": jax.random.normal(jax.random.key(0), (4, 50)), "b": jnp.ones((4, 50))}
  key = jax.random.key(1)

  def loss(features):
    first, second = ogd.fork(features, key, 2)
    return jnp.sum(first["a"] * first["b"]) - jnp.sum(second["a"] ** 2) + jnp.sum(second["b"])

  grads = jax.grad(loss)(features)
  explicit = ogd.graddrop_activation(
    features,
    [
      jax.grad(lambda f: jnp.sum(f["a"] * f["b"]))(features),
      jax.grad(lambda f: -jnp.sum(f["a"] ** 2) + jnp.sum(f["b"]))(features),
    ],
    key,
  )
  tolerances.assert_sums_close(grads, explicit, terms=2)


def test_nan_cotangents_stay_visible():
  features = jnp.ones((4, 3))
  cotangents = [jnp.ones((4, 3)), -jnp.ones((4, 3)).at[1, 2].set(jnp.nan)]
  out = ogd.graddrop_activation(features, cotangents, jax.random.key(0))
  assert jnp.isnan(out[1, 2]) and jnp.all(jnp.isfinite(out[:, :2]))


@pytest.mark.parametrize(
  ("args", "options", "error", "match"),
  [
    ((jnp.ones((2, 3)), 0), {}, ValueError, "`num_tasks` must be an int >= 1"),
    ((jnp.ones((2, 3)), 2.0), {}, ValueError, "`num_tasks`"),
    ((jnp.ones((2, 3)), 2), {"batch_axes": (2,)}, ValueError, "`batch_axes`.*out of range"),
    ((jnp.ones((2, 3)), 2), {"batch_axes": (0, -2)}, ValueError, "repeats"),
    ((jnp.ones((2, 3), jnp.int32), 2), {}, TypeError, "floating-point features"),
    ((jnp.ones((2, 3)), 2), {"marginalize": "mean"}, ValueError, "`marginalize`"),
    ((jnp.ones((2, 3)), 2), {"leak": [0.5]}, ValueError, "`leak`"),
    ((jnp.ones((2, 3)), 2), {"keep": "nope"}, ValueError, "Unknown `keep`"),
    ((jnp.ones((2, 3)), 2), {"stats_probe": (0.0, 0.0)}, TypeError, "GradDropStats"),
    (
      (jnp.ones((2, 3)), 2),
      {"stats_probe": ogd.GradDropStats(jnp.zeros(2), 0.0)},
      TypeError,
      r"`stats_probe.conflict_fraction` must be a float scalar; got shape \(2,\)",
    ),
    (
      (jnp.ones((2, 3)), 2),
      {"stats_probe": ogd.GradDropStats(0.0, 0)},
      TypeError,
      "`stats_probe.kept_fraction` must be a float scalar",
    ),
  ],
)
def test_fork_rejects_bad_input(args, options, error, match):
  features, num_tasks = args
  with pytest.raises(error, match=match):
    ogd.fork(features, jax.random.key(0), num_tasks, **options)


def test_fork_rejects_a_bad_key():
  with pytest.raises(TypeError, match="`key` must be a PRNG key"):
    ogd.fork(jnp.ones((2, 3)), 0, 2)


def test_several_batch_axes_share_one_mask():
  features = jax.random.normal(jax.random.key(0), (3, 4, 50))
  cotangents = jax.random.normal(jax.random.key(1), (2, 3, 4, 50))
  out = ogd.graddrop_activation(features, list(cotangents), jax.random.key(2), batch_axes=(0, 1))
  signal = jnp.sum(jnp.sign(features) * cotangents, axis=(1, 2), keepdims=True)  # [T, 1, 1, 50]
  positive_set = jnp.sum(jnp.where(signal >= 0, cotangents, 0), 0)
  negative_set = jnp.sum(jnp.where(signal <= 0, cotangents, 0), 0)
  per_column = lambda same: jnp.all(same, axis=(0, 1))  # noqa: E731
  assert jnp.all(per_column(out == positive_set) | per_column(out == negative_set))


def test_jitted_fork_step_compiles_once_over_keys_and_data():
  params, x, y = _model()
  traces = 0

  def step(params, x, y, key):
    nonlocal traces
    traces += 1
    grads = jax.grad(_loss)(params, x, y, key)
    return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads)

  jitted = jax.jit(step)
  key = jax.random.key(0)
  for i in range(100):
    key, step_key = jax.random.split(key)
    params = jitted(params, x + 0.01 * i, y, step_key)
  assert traces == 1


@settings(max_examples=25, deadline=None)
@given(strategies.problems(), st.integers(0, 2**31 - 1), st.booleans())
def test_backward_without_marginalisation_agrees_with_the_numpy_oracle(problem, seed, jit):
  key = jax.random.key(seed)
  stacked = problem.as_dtype()
  features = jax.tree.map(lambda g: jnp.ones(g.shape[1:], g.dtype), stacked)
  cotangents = [jax.tree.map(lambda g, i=i: g[i], stacked) for i in range(problem.num_tasks)]

  def run(features, cotangents, key):
    return ogd.graddrop_activation(
      features, cotangents, key, marginalize=None, return_stats=True, **problem.options()
    )

  out, stats = (jax.jit(run) if jit else run)(features, cotangents, key)
  strategies.assert_graddrop_matches_oracle(out, problem, key, stats)


@pytest.mark.parametrize("marginalize", ["sign", "value", None])
@pytest.mark.parametrize(
  ("dtype", "k"),
  [(jnp.float32, -40), (jnp.float32, 30), (jnp.bfloat16, -40), (jnp.float16, -3), (jnp.float16, 2)],
)
def test_scaling_the_cotangents_scales_the_result_exactly(marginalize, dtype, k):
  # Magnitudes in [1/2, 2] and a scale that keeps every value (and, for
  # float16, every sum) a normal number of the dtype.
  keys = jax.random.split(jax.random.key(0), 8)

  def draw(key_pair):
    magnitude = jax.random.uniform(key_pair[0], (16, 8), minval=0.5, maxval=2.0)
    return (magnitude * jnp.where(jax.random.bernoulli(key_pair[1], shape=(16, 8)), 1, -1)).astype(
      dtype
    )

  features = draw(keys[:2])
  cotangents = [draw(keys[i : i + 2]) for i in (2, 4, 6)]
  options = {"marginalize": marginalize, "leak": [0.0, 0.5, 0.25], "preserve_norm": True}
  out = ogd.graddrop_activation(features, cotangents, keys[0], **options)
  scale = jnp.asarray(2.0**k, dtype)
  scaled = ogd.graddrop_activation(features, [c * scale for c in cotangents], keys[0], **options)
  np.testing.assert_array_equal(scaled, out * scale)


def test_layers_are_scale_invariant():
  from flax import nnx

  layer = ogd.nnx.GradDrop(3, rngs=nnx.Rngs(graddrop=0))
  features = jax.random.normal(jax.random.key(1), (8, 4))
  weights = jax.random.normal(jax.random.key(2), (3, 8, 4))

  def loss(features, layer, scale):
    branches = layer(features)
    return scale * sum(jnp.sum(w * b) for w, b in zip(weights, branches))

  grads = []
  for scale in (1.0, 2.0**-20):
    # The same key for both calls: a fresh copy of the layer's rng stream.
    grads.append(nnx.grad(loss)(features, nnx.clone(layer), scale))
  np.testing.assert_array_equal(grads[1], grads[0] * 2.0**-20)


# Diagnostics: the probe's gradient is the statistics of fork's backward pass. They
# are exact counts divided in float32, compared as sums of one term.


def _pytree_features():
  keys = jax.random.split(jax.random.key(0), 2)
  return {
    "a": jax.random.normal(keys[0], (8, 5)),
    "b": jax.random.normal(keys[1], (6,)).astype(jnp.bfloat16),
  }


def _pytree_task_loss(task, features):
  return jnp.sum(jnp.sin((task + 1) * features["a"] + task)) + jnp.sum(
    jnp.cos((task - 1) * features["b"]).astype(jnp.float32)
  )


def test_stats_without_marginalisation_are_those_of_graddrop_of_the_stacked_cotangents():
  features = _pytree_features()
  key = jax.random.key(7)
  options = {"leak": [0.0, 0.5, 1.0], "keep": "sigmoid", "scale": 2.0}

  def loss(features, probe):
    branches = ogd.fork(features, key, T, marginalize=None, stats_probe=probe, **options)
    return sum(_pytree_task_loss(i, b) for i, b in enumerate(branches))

  grads, stats = jax.jit(jax.grad(loss, argnums=(0, 1)))(features, ogd.stats_probe())
  cotangents = [jax.grad(lambda f, i=i: _pytree_task_loss(i, f))(features) for i in range(T)]
  stacked = jax.tree.map(lambda *c: jnp.stack(c), *cotangents)
  _, expected = jax.jit(lambda g: ogd.graddrop(g, key, return_stats=True, **options))(stacked)
  tolerances.assert_sums_close(stats, expected, terms=1)
  assert expected.conflict_fraction > 0 and expected.kept_fraction < 1  # something to count
  _, activation_stats = jax.jit(
    lambda f, c: ogd.graddrop_activation(f, c, key, marginalize=None, return_stats=True, **options)
  )(features, cotangents)
  tolerances.assert_sums_close(activation_stats, expected, terms=1)
  # Two programs: XLA may fuse the model's own float ops differently.
  tolerances.assert_sums_close(grads, jax.jit(jax.grad(loss))(features, None), terms=T)


@pytest.mark.parametrize(
  ("marginalize", "batch_axes", "jit"),
  [("sign", (0,), False), ("sign", (0, 1), True), ("value", (0, 1), True)],
)
def test_stats_of_marginalised_signals_count_the_signals_elements(marginalize, batch_axes, jit):
  keys = jax.random.split(jax.random.key(1), 2)
  features = jax.random.normal(keys[0], (4, 3, 50))
  weights = jax.random.normal(keys[1], (T, 3, 50))
  key = jax.random.key(8)

  def task_loss(task, features):
    return jnp.sum(jnp.tanh(features * weights[task]))

  def loss(features, probe):
    branches = ogd.fork(
      features, key, T, marginalize=marginalize, batch_axes=batch_axes, stats_probe=probe
    )
    return sum(task_loss(i, b) for i, b in enumerate(branches))

  maybe_jit = jax.jit if jit else lambda fn: fn
  grads, stats = maybe_jit(jax.grad(loss, argnums=(0, 1)))(features, ogd.stats_probe())

  cotangents = jnp.stack([jax.grad(task_loss, argnums=1)(i, features) for i in range(T)])
  factor = jnp.sign(features) if marginalize == "sign" else features
  axes = tuple(a + 1 for a in batch_axes)
  signals = jnp.sum(factor * cotangents, axis=axes, keepdims=True)  # [T, 1, (1 or 3), 50]
  masks = np.asarray(jax.jit(ogd.sign_masks)(signals, key))
  g = np.asarray(signals)
  conflicts = np.any(g > 0, axis=0) & np.any(g < 0, axis=0)
  expected = ogd.GradDropStats(conflicts.mean(), masks.mean())
  assert masks.size == T * (150 if batch_axes == (0,) else 50)  # one per signal element
  assert expected.conflict_fraction > 0 and expected.kept_fraction < 1
  tolerances.assert_sums_close(stats, expected, terms=1)
  # The probe does not change the combined cotangent.
  without_probe = maybe_jit(jax.grad(loss))(features, None)
  if jit:  # two programs: XLA may fuse the model's own float ops differently
    tolerances.assert_sums_close(grads, without_probe, terms=T)
  else:  # the same operations, one by one
    chex.assert_trees_all_equal(grads, without_probe)


def _cost(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis  # older jax: one per program
  return analysis["flops"], analysis["bytes accessed"]


def test_a_probe_that_is_not_differentiated_costs_nothing():
  params, x, y = _model()
  key = jax.random.key(3)

  def loss(params, probe):
    branches = ogd.fork(_trunk(params["trunk"], x), key, T, stats_probe=probe)
    return sum(_head_loss(i, params["heads"][i], b, y) for i, b in enumerate(branches))

  plain = _cost(lambda p: jax.grad(loss)(p, None), params)
  unused = _cost(lambda p: jax.grad(loss)(p, ogd.stats_probe()), params)
  used = _cost(lambda p: jax.grad(loss, argnums=(0, 1))(p, ogd.stats_probe()), params)
  assert unused == plain
  assert used[0] > plain[0]  # the measure sees the statistics when they are computed


def _seed_loss(features, probe, key):
  branches = ogd.fork(features, key, T, stats_probe=probe)
  return sum(jnp.sum(jnp.sin((i + 1) * b + i)) for i, b in enumerate(branches))


def test_stats_under_vmap_are_each_seeds_own_and_a_shared_probe_gets_their_sum():
  features = jax.random.normal(jax.random.key(0), (8, 40))
  keys = jax.random.split(jax.random.key(9), 3)

  @jax.jit
  def stats_of(key):
    return jax.grad(_seed_loss, argnums=1)(features, ogd.stats_probe(), key)

  batched = jax.jit(jax.vmap(stats_of))(keys)
  alone = [stats_of(key) for key in keys]
  for seed, expected in enumerate(alone):
    tolerances.assert_sums_close(jax.tree.map(lambda s, i=seed: s[i], batched), expected, terms=1)
  assert len({float(s.kept_fraction) for s in alone}) > 1  # the seeds draw their own masks

  def summed_loss(probe):
    return jnp.sum(jax.vmap(lambda key: _seed_loss(features, probe, key))(keys))

  shared = jax.jit(jax.grad(summed_loss))(ogd.stats_probe())
  total = jax.tree.map(lambda *s: sum(s), *alone)
  tolerances.assert_sums_close(shared, total, terms=len(keys))  # fractions added


def test_stats_from_a_scanned_training_loop_match_the_step_by_step_loop():
  params, x, y = _model()

  def step(params, key):
    def loss(params, probe):
      branches = ogd.fork(_trunk(params["trunk"], x), key, T, stats_probe=probe)
      return sum(_head_loss(i, params["heads"][i], b, y) for i, b in enumerate(branches))

    grads, stats = jax.grad(loss, argnums=(0, 1))(params, ogd.stats_probe())
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats

  keys = jax.random.split(jax.random.key(10), 4)
  _, scanned = jax.jit(lambda p, k: jax.lax.scan(step, p, k))(params, keys)
  jitted_step = jax.jit(step)
  for index, key in enumerate(keys):
    params, stats = jitted_step(params, key)
    tolerances.assert_sums_close(jax.tree.map(lambda s, i=index: s[i], scanned), stats, terms=1)


_SHARDED_STATS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_graddrop as ogd

features = jax.random.normal(jax.random.key(0), (16, 32))
weights = jax.random.normal(jax.random.key(1), (3, 32))
key = jax.random.key(2)

def grads_and_stats(features):
  def loss(features, probe):
    branches = ogd.fork(features, key, 3, stats_probe=probe)
    return sum(jnp.sum(jnp.tanh(b * w)) for b, w in zip(branches, weights))
  return jax.grad(loss, argnums=(0, 1))(features, ogd.stats_probe())

_, expected = jax.jit(grads_and_stats)(features)
for types in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(types,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(features, NamedSharding(mesh, P("data")))  # data parallel
    _, stats = jax.jit(grads_and_stats)(sharded)
  for got, want in zip(stats, expected):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  print(types, "ok")
"""


def test_stats_with_the_batch_sharded_over_8_devices_match_one_device():
  from test_sharding import _on_8_cpu_devices

  result = _on_8_cpu_devices(["-c", _SHARDED_STATS])
  assert result.returncode == 0, result.stdout + result.stderr
  assert "Explicit ok" in result.stdout and "Auto ok" in result.stdout


@pytest.mark.parametrize("batch_axes", [(0,), ()])
def test_exports_with_a_symbolic_batch_dimension(batch_axes):
  # One exported step for every batch size, equal to the jitted step.
  features_in = jax.random.normal(jax.random.key(2), (6, 3))
  w = jax.random.normal(jax.random.key(3), (3, 4))
  key = jax.random.key(0)

  def loss(w, x, key):
    a, b = ogd.fork(jnp.tanh(x @ w), key, 2, batch_axes=batch_axes)
    return jnp.sum(a**2) - jnp.sum(b * jnp.arange(4.0))

  step = jax.jit(jax.grad(loss))
  (batch,) = jax.export.symbolic_shape("b")
  symbolic = jax.ShapeDtypeStruct((batch, 3), jnp.float32)
  exported = jax.export.export(step)(w, symbolic, key)
  for size in (6, 2):
    x = features_in[:size]
    np.testing.assert_array_equal(exported.call(w, x, key), step(w, x, key))


def test_a_zero_summed_signal_passes_with_derivative_one():
  # docs/guide/semantics.md: at the activation level a task whose summed
  # signal is exactly zero passes its cotangent (derivative 1), where
  # graddrop's tie convention gives the mean of the one-sided derivatives.
  key = jax.random.key(0)
  cotangents = jnp.array([[0.0], [1.0], [-3.0]])  # task 0 zero, tasks 1 and 2 disagree
  features = jnp.ones((1, 1))

  def activation(c):
    return ogd.graddrop_activation(features, [c[0:1], c[1:2], c[2:3]], key)

  assert float(jax.jacrev(activation)(cotangents)[0, 0, 0, 0]) == 1.0
  assert float(jax.jacrev(lambda c: ogd.graddrop(c, key))(cotangents)[0, 0, 0]) == 0.5
