"""What the tests need from JAX across the supported versions (see pyproject)."""

import jax


def enable_x64():
  """A context with 64-bit types enabled (``jax.enable_x64`` from JAX 0.8)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as experimental_enable_x64

  return experimental_enable_x64()
