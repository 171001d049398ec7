"""Every bad input to the public API gets an error that names the problem.

None of these reaches XLA: all are raised at trace time, eagerly or under jit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from flax import nnx

import optax_graddrop as ogd

KEY = jax.random.key(0)
GOOD = {"w": jnp.ones((2, 3)), "b": jnp.ones((2,))}


@pytest.mark.parametrize(
  ("task_grads", "key", "options", "error", "match"),
  [
    (
      {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))},
      KEY,
      {},
      ValueError,
      r"share the leading task axis.*\['b'\]`: 3.*\['w'\]`: 2",
    ),
    (jnp.ones((0, 3)), KEY, {}, ValueError, "task axis of size 0"),
    ({"w": jnp.ones((2, 3)), "s": jnp.float32(1.0)}, KEY, {}, ValueError, r"\['s'\]` is a scalar"),
    (jnp.ones((2, 3), jnp.int32), KEY, {}, TypeError, "dtype int32.*floating-point"),
    (jnp.ones((2, 3), bool), KEY, {}, TypeError, "dtype bool"),
    (jnp.ones((2, 3), jnp.complex64), KEY, {}, TypeError, "dtype complex64"),
    ({}, KEY, {}, ValueError, "no array leaves"),
    (GOOD, KEY, {"leak": 1.5}, ValueError, r"`leak` must lie in \[0, 1\]"),
    (GOOD, KEY, {"leak": -0.1}, ValueError, r"`leak` must lie in \[0, 1\]"),
    (GOOD, KEY, {"leak": [0.1, 0.2, 0.3]}, ValueError, r"shape \(2,\).*got shape \(3,\)"),
    (GOOD, KEY, {"leak": "none"}, TypeError, "`leak` must be a real number"),
    (GOOD, KEY, {"leak": True}, TypeError, "`leak` must be a real number"),
    (GOOD, KEY, {"leak": np.array([0.1, 0.2j])}, TypeError, "`leak` must hold real"),
    (GOOD, KEY, {"keep": "cosine"}, ValueError, "Unknown `keep`='cosine'"),
    (GOOD, KEY, {"keep": "random", "scale": 2.0}, ValueError, "`scale` only applies"),
    (GOOD, KEY, {"keep": lambda p: jnp.sum(p)}, ValueError, "keep` function must map"),
    (GOOD, KEY, {"eps": -1.0}, ValueError, "`eps` must be >= 0"),
    (GOOD, 0, {}, TypeError, "`key` must be a PRNG key.*got int"),
    (GOOD, jnp.zeros(3, jnp.uint32), {}, TypeError, r"shape \(3,\)"),
    (GOOD, jnp.zeros(2, jnp.float32), {}, TypeError, "dtype float32"),
    (GOOD, jax.random.split(KEY, 2), {}, TypeError, "single PRNG key"),
    (GOOD, KEY, {"scale": float("nan")}, ValueError, "`scale` must be finite"),
    (GOOD, KEY, {"preserve_norm": "no"}, TypeError, "`preserve_norm` must be a bool"),
    (GOOD, KEY, {"return_stats": 1}, TypeError, "`return_stats` must be a bool"),
    (jnp.ones((2, 3), jnp.float8_e4m3fn), KEY, {}, TypeError, "dtype float8_e4m3fn"),
  ],
)
def test_graddrop_rejects_bad_input(task_grads, key, options, error, match):
  with pytest.raises(error, match=match):
    ogd.graddrop(task_grads, key, **options)


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="share the leading task axis"):
    jax.jit(ogd.graddrop)({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, KEY)
  with pytest.raises(ValueError, match="leak"):
    jax.jit(lambda g, k: ogd.graddrop(g, k, leak=[0.5, 2.0]))(GOOD, KEY)


@pytest.mark.parametrize("spec", ["3, n", "t, 5"])
def test_symbolic_shapes_are_named_when_exporting(spec):
  # jax.export's shape polymorphism: the layout of the uniforms needs sizes.
  symbolic = jax.ShapeDtypeStruct(jax.export.symbolic_shape(spec), jnp.float32)
  with pytest.raises(ValueError, match=r"`task_grads` has the symbolic shape .*concrete shapes"):
    jax.export.export(jax.jit(ogd.graddrop))(symbolic, jax.random.key(0))
  losses = lambda w: jnp.stack([w.sum(), (w**2).sum()])  # noqa: E731
  streamed = ogd.graddrop_value_and_grad(losses, jax.random.key(0))
  params = jax.ShapeDtypeStruct(jax.export.symbolic_shape("n"), jnp.float32)
  with pytest.raises(ValueError, match=r"`args\[0\]` has the symbolic shape \(n,\)"):
    jax.export.export(jax.jit(streamed))(params)


@pytest.mark.parametrize("fn", [ogd.sum_tasks, ogd.mean_tasks, ogd.mgda, ogd.sign_purity])
def test_functions_without_uniforms_export_with_symbolic_shapes(fn):
  exported = jax.export.export(jax.jit(fn))(
    jax.ShapeDtypeStruct(jax.export.symbolic_shape("3, n"), jnp.float32)
  )
  task_grads = jax.random.normal(jax.random.key(0), (3, 10))
  np.testing.assert_array_equal(exported.call(task_grads), jax.jit(fn)(task_grads))


def test_traced_leak_is_accepted_with_the_right_shape():
  out = jax.jit(lambda g, k, leak: ogd.graddrop(g, k, leak=leak))(GOOD, KEY, jnp.array([0.0, 1.0]))
  assert out["w"].shape == (3,)
  with pytest.raises(ValueError, match="shape"):
    jax.jit(lambda g, k, leak: ogd.graddrop(g, k, leak=leak))(GOOD, KEY, jnp.ones(3))


@pytest.mark.parametrize(
  ("factory", "error", "match"),
  [
    (lambda: ogd.graddrop_transform("seed"), TypeError, "`key` must be.*int seed"),
    (lambda: ogd.graddrop_transform(1.5), TypeError, "got float"),
    (lambda: ogd.graddrop_transform(0, keep="nope"), ValueError, "Unknown `keep`"),
    (lambda: ogd.per_task_value_and_grad(jnp.sum, chunk_size=0), ValueError, "chunk_size"),
    (lambda: ogd.graddrop_transform(2**70), ValueError, "must fit in int64"),
    (lambda: ogd.graddrop_transform(0, track_stats="yes"), TypeError, "`track_stats` must be"),
    (
      lambda: ogd.graddrop_value_and_grad(jnp.sum, KEY, preserve_norm=None),
      TypeError,
      "`preserve_norm` must be a bool",
    ),
  ],
)
def test_factories_reject_bad_options(factory, error, match):
  with pytest.raises(error, match=match):
    factory()


def test_transform_reports_bad_updates_by_name():
  tx = ogd.graddrop_transform(0)
  state = tx.init(GOOD["w"][0])
  with pytest.raises(ValueError, match=r"task_grads.*share the leading task axis"):
    tx.update({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}, state)


@pytest.mark.parametrize(
  ("fun", "match"),
  [
    (lambda w: jnp.sum(w), r"1-D float vector.*shape \(\)"),
    (lambda w: jnp.ones((2, 2)) * w.sum(), r"shape \(2, 2\)"),
    (lambda w: w[:0], "0 task losses"),
    (lambda w: (w.sum(), w[0]), r"got a tuple \(stack the losses with jnp.stack; for a \(losses"),
    (lambda w: [w.sum(), w[0]], "got a list"),
    (lambda w: {"a": w.sum()}, r"got a dict \(stack the losses with jnp.stack\)"),
  ],
)
def test_per_task_rejects_non_vector_losses(fun, match):
  with pytest.raises(ValueError, match=match):
    ogd.per_task_value_and_grad(fun)(jnp.ones(3))
  with pytest.raises(ValueError, match=match):
    ogd.graddrop_value_and_grad(fun, KEY)(jnp.ones(3))


def test_per_task_rejects_argnums_out_of_range():
  with pytest.raises(ValueError, match="argnums"):
    ogd.per_task_value_and_grad(lambda w: w, argnums=2)(jnp.ones(3))


FORK_CASES = [
  ({"num_tasks": 0}, ValueError, "`num_tasks` must be an int >= 1"),
  ({"num_tasks": True}, ValueError, "`num_tasks`"),
  ({"batch_axes": (3,)}, ValueError, r"`batch_axes` \(3,\) is out of range"),
  ({"batch_axes": (0, 0)}, ValueError, "repeats an axis"),
  ({"batch_axes": ("0",)}, TypeError, "`batch_axes` must be an int or a tuple of ints"),
  ({"marginalize": "median"}, ValueError, "`marginalize` must be"),
  ({"features": jnp.ones((4, 3), jnp.int32)}, TypeError, "floating-point features"),
  ({"features": {}}, ValueError, "`features` has no array leaves"),
  ({"leak": [0.1, 0.2, 0.3]}, ValueError, "`leak`"),
  ({"leak": 2.0}, ValueError, r"\[0, 1\]"),
  ({"key": 3}, TypeError, "`key` must be a PRNG key"),
  ({"keep": "fair"}, ValueError, "Unknown `keep`"),
  ({"eps": -1.0}, ValueError, "`eps` must be >= 0"),
  ({"preserve_norm": "no"}, TypeError, "`preserve_norm` must be a bool"),
]


@pytest.mark.parametrize(("changes", "error", "match"), FORK_CASES)
def test_fork_and_layers_reject_bad_input(changes, error, match):
  args = {"features": jnp.ones((4, 3)), "key": KEY, "num_tasks": 2} | changes
  with pytest.raises(error, match=match):
    ogd.fork(args.pop("features"), args.pop("key"), args.pop("num_tasks"), **args)


def test_graddrop_activation_rejects_mismatched_cotangents():
  with pytest.raises(ValueError, match=r"`task_cotangents\[1\]` has structure"):
    ogd.graddrop_activation({"a": jnp.ones(3)}, [{"a": jnp.ones(3)}, jnp.ones(3)], KEY)
  with pytest.raises(ValueError, match="`task_cotangents` is empty"):
    ogd.graddrop_activation(jnp.ones(3), [], KEY)


def test_the_layer_modules_export_their_layers_only():
  assert ogd.nnx.__all__ == ["GradDrop", "Stats"] and ogd.linen.__all__ == ["GradDrop"]
  for module in (ogd.nnx, ogd.linen):
    assert all(hasattr(module, name) for name in module.__all__)


@pytest.mark.parametrize(
  "cotangent",
  [jnp.ones((4, 4)), jnp.ones(3), jnp.ones((1, 1)), jnp.ones((4, 3), jnp.float16)],
  ids=["other shape", "broadcastable row", "broadcastable scalar", "other dtype"],
)
def test_graddrop_activation_rejects_cotangents_of_other_shapes_or_dtypes(cotangent):
  with pytest.raises(ValueError, match=r"`task_cotangents\[1\]` has a leaf of shape"):
    ogd.graddrop_activation(jnp.ones((4, 3)), [jnp.ones((4, 3)), cotangent], KEY)


def test_baselines_and_weighting_reject_bad_input():
  with pytest.raises(TypeError, match="dtype int32"):
    ogd.mgda(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="task axis of size 0"):
    ogd.pcgrad(jnp.ones((0, 3)), KEY)
  with pytest.raises(TypeError, match="`key`"):
    ogd.pcgrad_transform("seed")
  with pytest.raises(ValueError, match="`weights` must have shape"):
    ogd.weight_tasks(GOOD, jnp.ones(3))


@pytest.mark.parametrize(("value", "expected"), [(2.0, 3.0), (-1.0, -2.0)])
def test_keep_values_outside_unit_interval_act_as_0_or_1(value, expected):
  # Decided: no error (f is traced, its values unknown at trace time); a
  # uniform in [0, 1) is never below 0 nor at or above 1, so f is clipped.
  task_grads = jnp.broadcast_to(jnp.array([3.0, -2.0])[:, None], (2, 1000))
  out = ogd.graddrop(task_grads, KEY, keep=lambda p: jnp.full_like(p, value))
  assert jnp.all(out == expected)


PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}


@pytest.mark.parametrize(
  ("updates", "match"),
  [
    (
      {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))},
      r"`updates\['b'\]` has shape \(4,\); expected \[T, \*param.shape\] = \(T, 4\).*plain gradient",
    ),
    (
      {"w": jnp.ones((3, 2, 4)), "b": jnp.ones((2, 4))},
      r"`updates\['w'\]` has shape \(3, 2, 4\); expected \[T, \*param.shape\] = \(T, 3, 4\)",
    ),
    (
      {"w": jnp.ones((2, 3, 5)), "b": jnp.ones((2, 4))},
      r"`updates\['w'\]` has shape \(2, 3, 5\).*parameter's shape \(3, 4\)",
    ),
    ({"w": jnp.ones((2, 3, 4))}, "must have the structure of the parameters"),
  ],
)
@pytest.mark.parametrize(
  "transform", [lambda: ogd.graddrop_transform(0), ogd.sum_transform, ogd.mgda_transform]
)
def test_transforms_check_updates_against_params(updates, match, transform):
  tx = transform()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=match):
    tx.update(updates, state, PARAMS)
  with pytest.raises(ValueError, match=match):
    jax.jit(tx.update)(updates, state, PARAMS)


def test_adam_after_graddrop_sees_the_error_not_a_broadcast():
  tx = optax.chain(ogd.graddrop_transform(0), optax.adam(1e-3))
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="plain gradient"):
    tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)


@pytest.mark.parametrize(
  ("mask", "error", "match"),
  [
    ({"w": True}, ValueError, r"`mask` has no entry for the parameter at \['b'\]"),
    ({"w": 1.0, "b": True}, TypeError, "Every leaf of `mask` must be a bool"),
    (lambda p: {"w": jnp.ones(3, bool), "b": True}, TypeError, "shape \\(3,\\).*whole leaves"),
    (
      {"w": (nnx.Param, nnx.BatchStat), "b": True},
      TypeError,
      "must be a bool; `mask\\['w'\\]\\[0\\]` is <class",
    ),
    (
      lambda p: jax.tree.map(lambda _: False, p),
      ValueError,
      r"returned False for every parameter.*key paths it was given: \['b'\], \['w'\]",
    ),
    (nnx.Param, TypeError, "a class or an NNX filter"),
    (nnx.PathContains("w"), TypeError, "a class or an NNX filter"),
  ],
)
def test_bad_masks_are_named(mask, error, match):
  with pytest.raises(error, match=match):
    ogd.graddrop(GOOD, KEY, mask=mask)
  with pytest.raises(error, match=match):
    ogd.graddrop_value_and_grad(lambda p: jnp.stack([p["w"].sum(), -p["b"].sum()]), KEY, mask=mask)(
      jax.tree.map(lambda g: g[0], GOOD)
    )
  for tx in (ogd.graddrop_transform(0, mask=mask), ogd.pcgrad_transform(0, mask=mask)):
    with pytest.raises(error, match=match):
      tx.update(GOOD, tx.init(jax.tree.map(lambda g: g[0], GOOD)))


def test_a_callable_mask_sees_the_paths_of_an_nnx_state_of_variables():
  # Leaves of an nnx.State of Variables sit under `.value`: a mask testing the
  # last path entry selects nothing, which is an error, not the plain sum.
  _, params = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  task_grads = jax.tree.map(lambda p: jnp.stack([p, -p]), params)

  def last_entry_is_kernel(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].name == "kernel", params)

  with pytest.raises(ValueError, match=r"\['bias'\]\.value, \['kernel'\]\.value"):
    ogd.graddrop(task_grads, KEY, mask=last_entry_is_kernel)
  with pytest.raises(TypeError, match="known when tracing; `mask` is traced"):
    jax.jit(lambda m: ogd.graddrop(task_grads, KEY, mask=m))(True)

  def has_kernel(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(entry, "key", None) == "kernel" for entry in path), params
    )

  chex.assert_trees_all_equal(
    ogd.graddrop(task_grads, KEY, mask=has_kernel),
    ogd.graddrop(task_grads, KEY, mask={"kernel": True, "bias": False}),
  )


def test_a_callable_keep_injected_as_a_schedule_gets_a_hint():
  tx = optax.inject_hyperparams(ogd.graddrop_transform)(key=0, keep=lambda p: p)
  with pytest.raises(ValueError, match="static_args"):
    tx.init(jnp.zeros(3))


STACKED = {"w": jnp.array([[1.0, -2.0, 3.0], [-1.0, 1.0, 1.0]]), "b": jnp.array([[1.0, -1.0]] * 2)}
SHAPES = {"w": jnp.zeros(3), "b": jnp.zeros(2)}


@pytest.mark.parametrize(
  ("wrap", "match"),
  [
    (
      lambda tx: optax.masked(tx, {"w": True, "b": False}),
      "optax.masked wraps it.*Use the aggregator's `mask` option",
    ),
    (lambda tx: optax.masked(tx, lambda p: {"w": False, "b": False}), "optax.masked wraps it"),
    (
      lambda tx: optax.MultiSteps(optax.chain(tx, optax.sgd(1.0)), 2),
      r"optax.MultiSteps wraps the aggregator.*optax_graddrop.multi_steps\(inner",
    ),
    (lambda tx: optax.flatten(tx), r"optax.flatten wraps the aggregator.*optax.chain\(aggregator"),
    (
      lambda tx: optax.apply_if_finite(optax.chain(tx, optax.sgd(1.0)), 3),
      r"optax.apply_if_finite wraps the aggregator.*Put it after",
    ),
    (lambda tx: optax.chain(ogd.sum_transform(), tx), "put the aggregator first in the chain"),
  ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_optax_wrappers_around_an_aggregator_are_named(wrap, match, jit):
  tx = wrap(ogd.graddrop_transform(0))
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=match):
    update(STACKED, tx.init(SHAPES), SHAPES)


def test_optax_flatten_around_an_aggregator_is_named_without_params_too():
  tx = optax.flatten(ogd.graddrop_transform(0))
  with pytest.raises(ValueError, match=r"optax\.flatten wraps the aggregator"):
    tx.update(STACKED, tx.init(SHAPES))


@pytest.mark.parametrize(
  "make",
  [
    lambda: ogd.nnx.GradDrop(2, deterministic="no", rngs=nnx.Rngs(graddrop=0)),
    lambda: ogd.nnx.GradDrop(2, track_stats="no", rngs=nnx.Rngs(graddrop=0)),
    lambda: ogd.nnx.GradDrop(2, rngs=nnx.Rngs(graddrop=0))(jnp.ones((4, 3)), deterministic="no"),
    lambda: ogd.linen.GradDrop(2, deterministic="no").init(KEY, jnp.ones((4, 3))),
    lambda: ogd.linen.GradDrop(2, track_stats="no").init(KEY, jnp.ones((4, 3))),
  ],
)
def test_layers_reject_flags_that_are_not_bools(make):
  # "no" is truthy: it would silently turn GradDrop off (deterministic).
  with pytest.raises(TypeError, match="must be a bool; got 'no'"):
    make()


def test_partition_with_an_aggregator_in_every_part_is_not_an_error():
  tx = optax.partition(
    {"a": ogd.graddrop_transform(0), "b": ogd.pcgrad_transform(1)}, {"w": "a", "b": "b"}
  )
  updates, _ = tx.update(STACKED, tx.init(SHAPES), SHAPES)
  keys = [jax.random.split(jax.random.key(seed))[1] for seed in (0, 1)]
  assert updates["w"].shape == (3,)
  np.testing.assert_array_equal(updates["w"], ogd.graddrop(STACKED["w"], keys[0]))
  # The same projections and sums, however XLA fuses them.
  tolerances.assert_sums_close(updates["b"], ogd.pcgrad(STACKED["b"], keys[1]), terms=2 + 2)


def test_numpy_integers_are_accepted_where_ints_are():
  def task_losses(w):
    return jnp.stack([jnp.sum(w**2), jnp.sum(w)])

  w = jnp.ones(3)
  for chunk_size in (np.int64(1), np.int32(2)):
    np.testing.assert_array_equal(
      ogd.per_task_value_and_grad(task_losses, chunk_size=chunk_size)(w)[1],
      ogd.per_task_value_and_grad(task_losses, chunk_size=int(chunk_size))(w)[1],
    )
    ogd.graddrop_value_and_grad(task_losses, KEY, chunk_size=chunk_size)(w)
  inner = optax.chain(ogd.sum_transform(), optax.sgd(1.0))
  for every_k in (np.int32(2), 2):
    tx = ogd.multi_steps(inner, every_k_schedule=every_k, num_tasks=2)
    state = tx.init(w)
    first, state = tx.update(jnp.ones((2, 3)), state, w)
    second, _ = tx.update(jnp.ones((2, 3)), state, w)
    np.testing.assert_array_equal(first, jnp.zeros(3))  # accumulating
    np.testing.assert_array_equal(second, jnp.full(3, -2.0))  # applied
  features = jnp.ones((2, 3, 4))
  chex.assert_trees_all_equal(
    ogd.fork(features, KEY, np.int64(2), batch_axes=np.arange(2)),
    ogd.fork(features, KEY, 2, batch_axes=(0, 1)),
  )
  layer = ogd.nnx.GradDrop(np.int32(2), batch_axes=np.arange(2), rngs=nnx.Rngs(graddrop=0))
  assert layer.num_tasks == 2 and layer.options["batch_axes"] == (0, 1)
  assert ogd.gradnorm(np.int64(2)).init().weights.shape == (2,)
  ogd.mgda(STACKED, num_iterations=np.int64(3))
  generator_axes = (axis for axis in (0, 1))
  chex.assert_trees_all_equal(
    ogd.fork(features, KEY, 2, batch_axes=generator_axes),
    ogd.fork(features, KEY, 2, batch_axes=(0, 1)),
  )
  losses, grads = ogd.per_task_value_and_grad(lambda w: np.ones(2, np.float32))(w)
  chex.assert_trees_all_equal((losses, grads), (jnp.ones(2), jnp.zeros((2, 3))))
