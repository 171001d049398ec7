"""optax_graddrop: Gradient Sign Dropout (GradDrop) for JAX and Optax.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.
"""

from optax_graddrop import linen
from optax_graddrop import nnx
from optax_graddrop._core import GradDropStats
from optax_graddrop._core import Keep
from optax_graddrop._core import KeepFn
from optax_graddrop._core import graddrop
from optax_graddrop._core import keep_fn
from optax_graddrop._core import sign_masks
from optax_graddrop._core import sign_purity
from optax_graddrop._fork import fork
from optax_graddrop._fork import graddrop_activation
from optax_graddrop._per_task import per_task_value_and_grad
from optax_graddrop._transform import GradDropState
from optax_graddrop._transform import graddrop_transform

__version__ = "0.1.0"

__all__ = [
  "GradDropState",
  "GradDropStats",
  "Keep",
  "KeepFn",
  "fork",
  "graddrop",
  "graddrop_activation",
  "graddrop_transform",
  "keep_fn",
  "linen",
  "nnx",
  "per_task_value_and_grad",
  "sign_masks",
  "sign_purity",
]
