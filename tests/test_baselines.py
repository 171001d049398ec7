"""Tests of the baseline aggregators (sum, mean, PCGrad, MGDA)."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax_compat import enable_x64

import optax_graddrop as ogd
from optax_graddrop import _baselines


def _tree(task_vectors, dtype=jnp.float32):
  """Splits [T, N >= 5] vectors into a two-leaf pytree with a leading task axis."""
  v = jnp.asarray(task_vectors, dtype)
  return {"w": v[:, :4].reshape(-1, 2, 2), "b": v[:, 4:]}


def _flat(tree):
  return np.concatenate([np.asarray(tree["w"]).ravel(), np.asarray(tree["b"]).ravel()])


# Jitted once for the tests that check values (test_jit_and_eager_agree runs both).
_pcgrad, _mgda, _mgda_weights = jax.jit(ogd.pcgrad), jax.jit(ogd.mgda), jax.jit(ogd.mgda_weights)


def _pcgrad_terms(num_tasks, size=7):
  """Sums behind a PCGrad output of ``size``-vectors: up to T - 1 projections, each
  on a ``size``-term inner product over a ``size``-term squared norm, then the sum
  over tasks."""
  return (num_tasks - 1) * (size + size) + num_tasks


def test_pcgrad_two_task_closed_form_on_a_pytree():
  g1 = np.array([1.0, 2.0, -1.0, 0.5, 0.0, 3.0, -2.0])
  g2 = np.array([-2.0, 0.5, 1.0, -1.0, 1.0, -1.0, 0.5])
  assert g1 @ g2 < 0
  expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g2 @ g1) / (g1 @ g1) * g1)
  out = ogd.pcgrad(_tree([g1, g2]), jax.random.key(0))
  tolerances.assert_sums_close(_flat(out), expected, terms=_pcgrad_terms(2))


def test_pcgrad_leaves_agreeing_gradients_unchanged():
  g = np.abs(np.random.default_rng(0).normal(size=(4, 7)))
  out = ogd.pcgrad(_tree(g), jax.random.key(0))
  tolerances.assert_sums_close(_flat(out), g.sum(0), terms=4)


def _orders(key, num_tasks):
  """PCGrad's documented orders: the other tasks of each task ranked by 32-bit draws."""
  draws = np.asarray(jax.random.bits(key, (num_tasks, num_tasks - 1), jnp.uint32))
  others = [np.array([j for j in range(num_tasks) if j != i]) for i in range(num_tasks)]
  return [others[i][np.argsort(draws[i], kind="stable")] for i in range(num_tasks)]


def _reference_pcgrad(g, orders):
  """PCGrad on flattened float64 vectors; also the smallest |cos| met (distance to a kink)."""
  projected, margin = [], np.inf
  for i in range(len(g)):
    v = g[i].copy()
    for j in orders[i]:
      dot = v @ g[j]
      margin = min(margin, abs(dot) / (np.linalg.norm(v) * np.linalg.norm(g[j])))
      if dot < 0:
        v = v - dot / (g[j] @ g[j]) * g[j]
    projected.append(v)
  return np.sum(projected, 0), margin


@pytest.mark.parametrize(("num_tasks", "seed"), [(2, 0), (3, 0), (50, 0)])
def test_pcgrad_matches_the_sequential_projection(num_tasks, seed):
  size = 16
  g = np.random.default_rng(seed).normal(size=(num_tasks, size))
  key = jax.random.key(3)
  expected, margin = _reference_pcgrad(g, _orders(key, num_tasks))
  # No conflict decision within rounding of a kink: each inner product is a sum
  # of `size` products, less up to T - 1 earlier projections.
  assert margin > tolerances.summation_rtol(jnp.float32, size + num_tasks)
  out = _pcgrad(_tree(g), key)
  tolerances.assert_sums_close(_flat(out), expected, terms=_pcgrad_terms(num_tasks, size))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_projection_orders_are_the_documented_stream(impl):
  key = jax.random.key(3, impl=impl)
  orders = _baselines._projection_orders(key, 5)
  np.testing.assert_array_equal(orders, np.stack(_orders(key, 5)))
  np.testing.assert_array_equal(
    jax.jit(_baselines._projection_orders, static_argnums=1)(key, 5), orders
  )
  with enable_x64():  # where jax.random.bits would default to 64 bits
    np.testing.assert_array_equal(_baselines._projection_orders(key, 5), orders)


def test_pcgrad_is_deterministic_given_the_key_and_the_order_matters():
  g = _tree(np.random.default_rng(1).normal(size=(4, 7)))
  chex.assert_trees_all_equal(_pcgrad(g, jax.random.key(0)), _pcgrad(g, jax.random.key(0)))
  outs = {tuple(_flat(_pcgrad(g, jax.random.key(k))).round(5)) for k in range(8)}
  assert len(outs) > 1


def test_mgda_two_task_closed_form_on_a_pytree():
  rng = np.random.default_rng(2)
  for _ in range(5):
    g1, g2 = rng.normal(size=(2, 7))
    alpha = np.clip(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1)
    out = _mgda(_tree([g1, g2]))
    np.testing.assert_allclose(_flat(out), alpha * g1 + (1 - alpha) * g2, rtol=1e-4, atol=1e-5)


def test_mgda_meets_the_min_norm_optimality_conditions_at_50_tasks():
  num_tasks, size = 50, 64
  rng = np.random.default_rng(0)
  for g in (
    rng.normal(size=(num_tasks, size)),
    rng.normal(size=(num_tasks, size)) + rng.normal(size=size),
  ):
    d = _flat(_mgda(_tree(g))).astype(np.float64)
    # d is the minimum-norm point of the hull iff <g_i, d> >= |d|^2 for every i. The
    # solver stops within T ulps of max_i sum_k |G_ik| w_k <= max |g_i|^2; d sums T
    # terms, its inner products `size`.
    slack = tolerances.summation_rtol(jnp.float32, num_tasks + size) * np.max(np.sum(g**2, 1))
    assert np.all(g @ d >= d @ d - slack), (g @ d - d @ d).min() / slack


def _exact_min_norm_weights(gram):
  """The minimum-norm weights by trying every set of tasks with non-zero weight."""
  best = None
  for count in range(1, len(gram) + 1):
    for tasks in map(list, itertools.combinations(range(len(gram)), count)):
      kkt = np.block([[gram[np.ix_(tasks, tasks)], np.ones((count, 1))], [np.ones((1, count)), 0]])
      weights = np.zeros(len(gram))
      weights[tasks] = np.linalg.lstsq(kkt, np.eye(count + 1)[-1], rcond=None)[0][:count]
      if np.all(weights >= 0) and (best is None or weights @ gram @ weights < best @ gram @ best):
        best = weights
  return best


@pytest.mark.parametrize("seed", [0, 1])
def test_mgda_matches_an_exact_float64_solver_at_3_tasks(seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(3, 7)) + rng.normal(size=7) * seed  # seed 1: a common direction
  weights = _exact_min_norm_weights(g @ g.T)
  tolerances.assert_sums_close(_flat(_mgda(_tree(g))), weights @ g, terms=3 + 7)


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_mgda_has_minimal_norm_among_convex_combinations(num_tasks, seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(num_tasks, 7)) + rng.normal(size=7)  # often a common direction
  expected = _exact_min_norm_weights(g @ g.T) @ g
  d = _flat(_mgda(_tree(g))).astype(np.float64)
  # The solver stops within T ulps of max |g_i|^2 (at most) of the optimum's squared norm.
  slack = tolerances.summation_rtol(jnp.float32, num_tasks + 7) * np.max(np.sum(g**2, 1))
  assert d @ d <= expected @ expected + slack
  weights = np.asarray(_mgda_weights(jnp.asarray(g @ g.T, jnp.float32)))
  assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-5


@pytest.mark.parametrize("num_tasks", [3, 600])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_every_gram_schedule_equals_the_inner_products(num_tasks, dtype):
  """One product (GPU, TPU), and CPU's paired sums (few tasks) and chunked
  products (more, here over several chunks of columns)."""
  size = 2 * _baselines._CHUNK_COLUMNS[1] + 7 if num_tasks < 8 else 2500
  g = jax.random.normal(jax.random.key(num_tasks), (num_tasks, size), dtype)
  expected = np.asarray(g, np.float64) @ np.asarray(g, np.float64).T
  schedules = [_baselines._inner_products, _baselines._chunked_inner_products]
  if num_tasks <= _baselines._PAIRED_TASKS:
    schedules.append(_baselines._paired_inner_products)
  for schedule in schedules:
    gram = jax.jit(schedule, static_argnums=1)(g, jnp.float32)
    assert gram.dtype == jnp.float32
    tolerances.assert_sums_close(gram, expected, terms=size, accumulate=jnp.float32)
  with enable_x64():
    g64 = jnp.asarray(g, jnp.float64)
    assert _baselines._gram({"a": g64[:, :5], "b": g64[:, 5:]}).dtype == jnp.float64


def _count_equations(jaxpr):
  """Equations of a jaxpr and of every jaxpr inside it (loop bodies, branches)."""

  def inner(value):
    if isinstance(value, (tuple, list)):
      return [j for v in value for j in inner(v)]
    if hasattr(value, "eqns"):
      return [value]
    return [value.jaxpr] if hasattr(getattr(value, "jaxpr", None), "eqns") else []

  return sum(
    1 + sum(_count_equations(j) for v in eqn.params.values() for j in inner(v))
    for eqn in jaxpr.eqns
  )


def test_program_size_does_not_grow_with_the_number_of_tasks():
  def size(fn, num_tasks):
    task_grads = {"w": jnp.ones((num_tasks, 8, 4)), "b": jnp.ones((num_tasks, 3))}
    return _count_equations(jax.make_jaxpr(fn)(task_grads, jax.random.key(0)).jaxpr)

  pcgrad, mgda = ogd.pcgrad, lambda g, _: ogd.mgda(g)
  # The weighted sum at the end unrolls a bounded block of tasks; nothing else grows.
  weighted_sum = lambda g, _: ogd.mean_tasks(g)  # noqa: E731
  allowed = size(weighted_sum, 40) - size(weighted_sum, 10)
  for fn in (pcgrad, mgda):
    assert size(fn, 40) - size(fn, 10) <= allowed
  gram = lambda num_tasks: jnp.eye(num_tasks)  # noqa: E731
  for fn in (
    _baselines.pcgrad_weights,
    lambda g, _: ogd.mgda_weights(g),
    lambda g, _: _baselines._gram(g),
  ):
    counts = {
      _count_equations(jax.make_jaxpr(fn)(gram(t), jax.random.key(0)).jaxpr) for t in (10, 40)
    }
    assert len(counts) == 1, counts


def _distance_to_a_kink(g, aggregator):
  """How far (relatively) the decisions behind PCGrad's or MGDA's weights are from flipping."""
  if aggregator == "pcgrad":
    return _reference_pcgrad(g, _orders(jax.random.key(1), len(g)))[1]
  gram = g @ g.T
  weights = _exact_min_norm_weights(gram)
  products = gram @ weights - weights @ gram @ weights  # zero on tasks of non-zero weight
  inactive = products.min(initial=np.inf, where=weights == 0) / gram.max()
  return min(weights.min(initial=np.inf, where=weights > 0), inactive)


@pytest.mark.parametrize(("aggregator", "num_tasks", "seed"), [("pcgrad", 3, 3), ("mgda", 5, 0)])
def test_derivatives_equal_central_differences(aggregator, num_tasks, seed):
  """The weights are differentiated (MGDA's implicitly, at its optimum)."""
  key = jax.random.key(1)
  aggregate = {"pcgrad": lambda g: ogd.pcgrad(g, key), "mgda": ogd.mgda}[aggregator]
  weights = {
    "pcgrad": lambda g: ogd.pcgrad_weights(_baselines._gram(g), key),
    "mgda": lambda g: ogd.mgda_weights(_baselines._gram(g)),
  }[aggregator]
  with enable_x64():
    rng = np.random.default_rng(seed)
    # A common component: some pairs agree (PCGrad), one task has zero weight (MGDA).
    vectors = rng.normal(size=(num_tasks, 7)) + 0.3 * rng.normal(size=7)
    assert _distance_to_a_kink(vectors, aggregator) > 1e-3  # far beyond the steps below
    if aggregator == "mgda":
      assert np.sum(_exact_min_norm_weights(vectors @ vectors.T) == 0) == 1
    g = _tree(vectors, jnp.float64)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), g)
    cotangent = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape[1:])), g)

    @jax.jit  # one compilation for all four
    def derivatives(g, direction):
      loss = lambda g: optax.tree.vdot(cotangent, aggregate(g))  # noqa: E731
      shifted = lambda t: jax.tree.map(lambda x, v: x + t * v, g, direction)  # noqa: E731
      central = (loss(shifted(1e-5)) - loss(shifted(-1e-5))) / 2e-5
      backward = optax.tree.vdot(jax.grad(loss)(g), direction)
      forward = optax.tree.vdot(cotangent, jax.jvp(aggregate, (g,), (direction,))[1])
      constant = jax.tree.map(lambda v: jnp.tensordot(weights(g), v, 1), direction)
      return central, backward, forward, optax.tree.vdot(cotangent, constant)

    central, backward, forward, held_constant = derivatives(g, direction)
    np.testing.assert_allclose(backward, central, rtol=1e-7)
    np.testing.assert_allclose(forward, central, rtol=1e-7)
    assert abs(held_constant - central) > 1e-3 * abs(central)


def test_sum_and_mean():
  g = _tree(np.random.default_rng(3).normal(size=(3, 7)))
  tolerances.assert_sums_close(ogd.sum_tasks(g), jax.tree.map(lambda x: x.sum(0), g), terms=3)
  tolerances.assert_sums_close(ogd.mean_tasks(g), jax.tree.map(lambda x: x.mean(0), g), terms=3)


@pytest.mark.parametrize(
  "fn", [lambda g: ogd.pcgrad(g, jax.random.key(0)), ogd.mgda, ogd.sum_tasks, ogd.mean_tasks]
)
def test_jit_and_eager_agree(fn):
  g = _tree(np.random.default_rng(4).normal(size=(4, 7)))
  # MGDA's weights come from a 7-term Gram matrix: as many sums as PCGrad's.
  tolerances.assert_sums_close(fn(g), jax.jit(fn)(g), terms=_pcgrad_terms(4))


@pytest.mark.parametrize(
  "aggregator",
  [
    lambda: ogd.pcgrad_transform(0),
    lambda: ogd.mgda_transform(),
    lambda: ogd.sum_transform(),
    lambda: ogd.mean_transform(),
    lambda: ogd.graddrop_transform(0, keep="random"),
  ],
)
def test_each_aggregator_trains_in_a_jitted_chain(aggregator):
  x = jax.random.normal(jax.random.key(0), (64, 5))
  targets = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1], -x[:, 2]])
  params = {
    "trunk": 0.3 * jax.random.normal(jax.random.key(1), (5, 16)),
    "heads": jnp.zeros((3, 16)),
  }

  def task_losses(params):
    features = jnp.tanh(x @ params["trunk"])
    return jnp.mean((features @ params["heads"].T - targets.T) ** 2, axis=0)

  tx = optax.chain(aggregator(), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    _, task_grads = ogd.per_task_value_and_grad(task_losses)(params)
    updates, state = tx.update(task_grads, state, params)
    return optax.apply_updates(params, updates), state

  initial = task_losses(params)
  for _ in range(200):
    params, state = step(params, state)
  assert jnp.all(task_losses(params) < 0.5 * initial)
  assert int(state[0].count) == 200


@pytest.mark.parametrize("fn", [ogd.mgda, ogd.sum_tasks, ogd.mean_tasks])
def test_bad_input_is_rejected(fn):
  with pytest.raises(ValueError, match="share the leading task axis"):
    fn({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})
  with pytest.raises(TypeError, match="`key`"):
    ogd.pcgrad(jnp.ones((2, 3)), 0)


@pytest.mark.parametrize("bad", [-1, 2.5, True, np.int64(2**40)])
def test_bad_num_iterations_is_rejected(bad):
  with pytest.raises(ValueError, match="`num_iterations`"):
    ogd.mgda(jnp.ones((3, 2)), bad)
  with pytest.raises(ValueError, match="`num_iterations`"):
    ogd.mgda_transform(bad)


_WEIGHTS_FNS = {
  "pcgrad_weights": lambda gram: ogd.pcgrad_weights(gram, jax.random.key(0)),
  "mgda_weights": ogd.mgda_weights,
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fn", list(_WEIGHTS_FNS.values()), ids=list(_WEIGHTS_FNS))
@pytest.mark.parametrize(
  ("gram", "error", "message"),
  [
    (np.ones((3, 2), np.float32), ValueError, r"`gram` must be a square .* got shape \(3, 2\)"),
    (np.ones((3,), np.float32), ValueError, r"`gram` must be a square .* got shape \(3,\)"),
    (np.zeros((0, 0), np.float32), ValueError, r"`gram` has shape \(0, 0\); need at least one"),
    (np.eye(3, dtype=np.int32), TypeError, "`gram` must have a real floating-point dtype.*int32"),
    (np.eye(3, dtype=bool), TypeError, "`gram` must have a real floating-point dtype.*bool"),
    (np.eye(2, dtype=np.complex64), TypeError, "`gram` must have a real floating-point"),
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "`gram` must be a T x T array .* got list"),
  ],
)
def test_weights_functions_reject_a_bad_gram(fn, jit, gram, error, message):
  with pytest.raises(error, match=message):
    (jax.jit(fn) if jit else fn)(gram)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("key", "message"),
  [
    (3, "`key` must be a PRNG key .* got int"),
    (np.array([0.0, 7.0], np.float32), "`key` must be a PRNG key .* dtype float32"),
    (jax.random.split(jax.random.key(0), 2), r"`key` must be a single PRNG key \(shape \(\)\)"),
  ],
)
def test_pcgrad_weights_rejects_a_bad_key(key, message, jit):
  gram = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
  if jit and isinstance(key, int):
    key = jnp.asarray(key)  # jit passes an int as an int32 array
    message = "`key` must be a PRNG key .* dtype int32"
  fn = jax.jit(ogd.pcgrad_weights) if jit else ogd.pcgrad_weights
  with pytest.raises(TypeError, match=message):
    fn(gram, key)
  # Legacy raw keys are keys; under vmap, each call sees one key.
  chex.assert_trees_all_equal(
    fn(gram, jax.random.PRNGKey(1)), ogd.pcgrad_weights(gram, jax.random.key(1))
  )
  keys = jax.random.split(jax.random.key(0), 2)
  chex.assert_shape(jax.vmap(ogd.pcgrad_weights, (None, 0))(gram, keys), (2, 2))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mean_weights_are_exact_in_each_leafs_compute_dtype(jit):
  rng = np.random.default_rng(5)
  with enable_x64():
    mean, transform = ogd.mean_tasks, ogd.mean_transform()
    if jit:
      mean = jax.jit(mean)
    update = jax.jit(transform.update) if jit else transform.update
    ones = jnp.ones((3, 4), jnp.float64)
    chex.assert_trees_all_equal(mean(ones), jnp.ones(4, jnp.float64))  # was 1.0000000298
    chex.assert_trees_all_equal(
      update(ones, transform.init(jnp.zeros(4)))[0], jnp.ones(4, jnp.float64)
    )
    # 7 tasks of float64 and, beside them, float32: each leaf weighted in its own
    # compute dtype, the float32 one by the float32 1/7 (never promoted to float64).
    g = {"f64": rng.normal(size=(7, 50)), "f32": rng.normal(size=(7, 6)).astype(np.float32)}
    out = mean(jax.tree.map(jnp.asarray, g))
    chex.assert_trees_all_equal_dtypes(
      out, {"f64": jnp.ones(1, jnp.float64), "f32": jnp.ones(1, jnp.float32)}
    )
    np.testing.assert_allclose(out["f64"], g["f64"].mean(0), rtol=4e-15, atol=0)
    w32 = np.float32(1 / 7)
    expected32 = np.zeros(6, np.float32)
    for task in range(7):
      expected32 = expected32 + w32 * g["f32"][task]
    tolerances.assert_sums_close(out["f32"], expected32, terms=7)


@pytest.mark.parametrize("num_tasks", [3, 33])  # 33: a loop over blocks of tasks on CPU
def test_weights_from_a_mixed_precision_gram_keep_float32_leaves_float32(num_tasks):
  rng = np.random.default_rng(6)
  g = {"f64": rng.normal(size=(num_tasks, 5)), "f32": rng.normal(size=(num_tasks, 3))}
  g["f32"] = g["f32"].astype(np.float32).astype(np.float64)  # exactly the float32 leaf
  with enable_x64():
    tree = {"f64": jnp.asarray(g["f64"]), "f32": jnp.asarray(g["f32"], jnp.float32)}
    # The Gram matrix of both leaves together is float64, and so are weights
    # from it (here its diagonal, for speed; PCGrad's and MGDA's likewise).
    weights = np.diagonal(g["f64"] @ g["f64"].T + g["f32"] @ g["f32"].T)
    out = _baselines._combine_masked(tree, None, jnp.diagonal)  # raised a TypeError
    chex.assert_trees_all_equal_dtypes(
      out, {"f64": jnp.ones(1, jnp.float64), "f32": jnp.ones(1, jnp.float32)}
    )
    np.testing.assert_allclose(out["f64"], weights @ g["f64"], rtol=1e-12)
    weights32, f32 = weights.astype(np.float32), tree["f32"]
    tolerances.assert_sums_close(out["f32"], weights32 @ np.asarray(f32), terms=2 * num_tasks)
    if num_tasks == 3:  # and through a public aggregator
      mgda = jax.jit(ogd.mgda)(tree)
      chex.assert_trees_all_equal_dtypes(mgda, out)
      chex.assert_tree_all_finite(mgda)
