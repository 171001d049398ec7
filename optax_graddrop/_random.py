"""Per-element 16-bit uniforms: one stream for a whole pytree, from one key.

GradDrop compares one uniform U per element with a keep probability. Random
bits dominate its cost, so each uniform is a 16-bit integer ``b`` with
``U = b / 2**16``: one threefry call yields four of them, where
``jax.random.uniform`` spends one call per element. The keep decision
``U < f`` then holds with probability ``ceil(2**16 f) / 2**16``, which is
within ``2**-16`` of ``f`` and exact at ``f = 0`` and ``f = 1``.

The stream. The leaves of a pytree take consecutive positions of one stream
of 16-bit values, in leaf order, each leaf starting at a multiple of 4
(:func:`call_offsets`). With a threefry key, position ``p`` is half
``p mod 4`` of ``threefry2x32(key, (0, p div 4))``: the low and high halves of
its first output word, then of its second. So element ``j`` (row-major) of a
leaf whose stream starts at call ``c`` takes half ``j mod 4`` of call
``c + j div 4``: it depends only on the key, the sizes of the leaves before
it and ``j``, never on how the arrays are sharded, fused, bucketed or on the
backend. Other key implementations (e.g. ``"rbg"``) draw the same positions
from ``jax.random.bits(key, (4 C,), uint16)``, ``C`` the stream's calls.

The generator is Threefry-2x32 with 20 rounds (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011), the one behind
``jax.random``. ``jax.random``'s own lowering of it on XLA:CPU is a rolled
loop of five iterations whose state round-trips through memory between
iterations and is not vectorised; written as one straight elementwise
expression (:func:`threefry2x32`) the same function is one vectorised loop,
about 8x faster there. Its values are those of
``jax.extend.random.threefry2x32_p`` (tested).

How the words are computed is the backend's choice: on CPU all of a tree's
words come from one materialised pass (each word feeds four elements, and a
fused consumer would otherwise hash it four times); on GPU and TPU they stay
an expression that XLA fuses into the consumer, where each element hashes
its own call: arithmetic that is cheap there, and no round trip through
memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_graddrop import _fusion

BITS = 16
SCALE = float(2**BITS)
HALVES = 4  # 16-bit uniforms per threefry call
_LOW = np.uint32(2**BITS - 1)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)
# The words of a stream are computed for a multiple of this many calls.
_ALIGN_CALLS = 64

# (first call, number of calls) of each piece of a segment, in order.
CallRanges = Sequence[tuple[int, int]]
# The pieces of a segment -> the two words of each of their calls, in order.
WordsFn = Callable[[CallRanges], tuple[jax.Array, jax.Array]]
# Segments of more pieces than one read their words through a constant table
# of call indices while it stays this small; larger ones slice each piece.
_MAX_TABLE_CALLS = 2**16


def num_calls(size: int) -> int:
  """Threefry calls that ``size`` uniforms take: ``ceil(size / 4)``."""
  return -(-size // HALVES)


def call_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
  """Where each leaf's uniforms start in the stream, in calls; and the total."""
  offsets, total = [], 0
  for size in sizes:
    offsets.append(total)
    total += num_calls(size)
  return offsets, total


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  return (x << np.uint32(distance)) | (x >> np.uint32(32 - distance))


def threefry2x32(
  key: tuple[jax.Array, jax.Array], counts: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block function (20 rounds) as one elementwise expression.

  Args:
    key: the two 32-bit words of the key, ``uint32`` scalars.
    counts: the two 32-bit words of each counter, ``uint32`` arrays.

  Returns:
    The two 32-bit output words of each counter.
  """
  schedule = (key[0], key[1], key[0] ^ key[1] ^ _KEY_PARITY)
  x0, x1 = counts[0] + schedule[0], counts[1] + schedule[1]
  for block in range(5):
    for distance in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, distance) ^ x0
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _words(key_words: jax.Array, calls: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both output words of the calls ``calls`` (``uint32``)."""
  return threefry2x32((key_words[0], key_words[1]), (jnp.zeros_like(calls), calls))


def stream_words(key: jax.Array, low: int, high: int, *, materialize: bool) -> WordsFn:
  """The words of calls ``low..high-1``, as one expression.

  Args:
    key: a threefry key.
    low: the first call.
    high: one past the last call.
    materialize: compute all the words once, in memory (CPU). Otherwise they
      stay an expression that XLA fuses into each consumer (GPU, TPU).

  Returns:
    ``pieces -> (first, second)``, the words of the calls of ``pieces``
    (``(first call, number of calls)`` each), concatenated in order.
  """
  key_words = jax.random.key_data(key)
  # XLA:CPU runs an elementwise loop whose length is not a multiple of the
  # vector width several times slower (measured 10x for 2,500,001 calls
  # against 2,500,000 or 2,500,008): hash a few unused calls instead.
  count = -(-(high - low) // _ALIGN_CALLS) * _ALIGN_CALLS
  first, second = _words(key_words, jnp.uint32(low) + jax.lax.iota(jnp.uint32, count))
  if materialize:
    first, second = _fusion.materialize([first, second])

  def words(pieces: CallRanges) -> tuple[jax.Array, jax.Array]:
    if len(pieces) == 1:
      ((start, num),) = pieces
      return first[start - low : start - low + num], second[start - low : start - low + num]
    table = np.concatenate([np.arange(start, start + num) for start, num in pieces])
    if materialize:
      # One gather: XLA:CPU does not fuse a concatenation, so slices of the
      # words would each be a pass (and a compilation) of their own.
      return first[table - low], second[table - low]
    return _words(key_words, jnp.asarray(table, jnp.uint32))

  return words


def _halves(first: jax.Array, second: jax.Array, size: int) -> jax.Array:
  """The first ``size`` uniforms of consecutive calls: four per call, in order."""
  half = jax.lax.broadcasted_iota(jnp.uint32, (first.shape[0], HALVES), 1)
  words = jnp.where(half < 2, first[:, None], second[:, None])
  bits = (words >> (BITS * (half % 2))) & _LOW
  return bits.reshape(-1)[:size]


def segment_bits(words: WordsFn, calls: CallRanges, size: int) -> jax.Array:
  """The uniforms of a segment: the calls of its pieces, concatenated.

  Args:
    words: where the words come from (:func:`stream_words`).
    calls: ``(first call, number of calls)`` of each piece, in order.
    size: the number of uniforms (at most four per call).

  Returns:
    A ``uint32`` array of shape ``(size,)`` with values in ``[0, 2**16)``.
  """
  # Leaves that follow each other in the stream are read as one range.
  merged: list[tuple[int, int]] = []
  for start, count in calls:
    if merged and merged[-1][0] + merged[-1][1] == start:
      merged[-1] = (merged[-1][0], merged[-1][1] + count)
    else:
      merged.append((start, count))
  if len(merged) == 1 or sum(count for _, count in merged) <= _MAX_TABLE_CALLS:
    first, second = words(merged)
  else:
    pieces = [words([piece]) for piece in merged]
    first = jnp.concatenate([f for f, _ in pieces])
    second = jnp.concatenate([s for _, s in pieces])
  return _halves(first, second, size)


def tree_bits(
  key: jax.Array, total_calls: int, segments: Sequence[tuple[CallRanges, int]]
) -> list[jax.Array]:
  """The uniforms of several segments of one stream.

  With a threefry key the words are computed as the backend prefers (once
  for the whole stream on CPU, inline elsewhere); other key implementations
  draw the stream from ``jax.random.bits``.

  Args:
    key: a typed PRNG key of shape ``()``.
    total_calls: the calls in the whole stream.
    segments: ``(calls, size)`` of each segment, as for :func:`segment_bits`.

  Returns:
    One flat ``uint32`` array per segment.
  """
  if jax.random.key_impl(key) != "threefry2x32":
    stream = jax.random.bits(key, (HALVES * total_calls,), jnp.uint16).astype(jnp.uint32)

    def from_stream(calls: CallRanges, size: int) -> jax.Array:
      parts = [stream[HALVES * start : HALVES * (start + count)] for start, count in calls]
      return (jnp.concatenate(parts) if len(parts) > 1 else parts[0])[:size]

    return [from_stream(calls, size) for calls, size in segments]

  def bits_of(words: WordsFn) -> list[jax.Array]:
    return [segment_bits(words, calls, size) for calls, size in segments]

  ranges = [(start, start + count) for calls, _ in segments for start, count in calls]
  low = min((r[0] for r in ranges), default=0)
  high = max((r[1] for r in ranges), default=0)
  return jax.lax.platform_dependent(
    key,
    cpu=lambda k: bits_of(stream_words(k, low, high, materialize=True)),
    default=lambda k: bits_of(stream_words(k, low, high, materialize=False)),
  )


def uniform_bits(key: jax.Array, shape: Sequence[int], start: int = 0) -> jax.Array:
  """Uniform integers in ``[0, 2**16)``: the stream's positions ``4 start``
  onwards, one per element of ``shape`` (row-major).

  Args:
    key: a typed PRNG key of shape ``()``.
    shape: the shape of the result.
    start: the call the uniforms start at (a leaf's :func:`call_offsets`).

  Returns:
    A ``uint32`` array of ``shape`` with i.i.d. values uniform on
    ``{0, ..., 2**16 - 1}``.
  """
  size = math.prod(shape)
  count = num_calls(size)
  (bits,) = tree_bits(key, start + count, [([(start, count)], size)])
  return bits.reshape(tuple(shape))
