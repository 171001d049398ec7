"""optax_graddrop: Gradient Sign Dropout (GradDrop) for JAX and Optax.

Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020, https://arxiv.org/abs/2010.06808.
"""

from optax_graddrop import linen
from optax_graddrop import nnx
from optax_graddrop import problems
from optax_graddrop._accumulation import MultiStepsState
from optax_graddrop._accumulation import multi_steps
from optax_graddrop._baselines import mean_tasks
from optax_graddrop._baselines import mean_transform
from optax_graddrop._baselines import mgda
from optax_graddrop._baselines import mgda_transform
from optax_graddrop._baselines import mgda_weights
from optax_graddrop._baselines import pcgrad
from optax_graddrop._baselines import pcgrad_transform
from optax_graddrop._baselines import pcgrad_weights
from optax_graddrop._baselines import sum_tasks
from optax_graddrop._baselines import sum_transform
from optax_graddrop._core import GradDropStats
from optax_graddrop._core import Keep
from optax_graddrop._core import KeepFn
from optax_graddrop._core import keep_fn
from optax_graddrop._core import sign_purity
from optax_graddrop._fork import fork
from optax_graddrop._fork import graddrop_activation
from optax_graddrop._fork import stats_probe
from optax_graddrop._graddrop import graddrop
from optax_graddrop._graddrop import sign_masks
from optax_graddrop._per_task import per_task_value_and_grad
from optax_graddrop._streaming import graddrop_value_and_grad
from optax_graddrop._transform import AggregatorState
from optax_graddrop._transform import aggregator_transform
from optax_graddrop._transform import graddrop_transform
from optax_graddrop._weighting import GradNorm
from optax_graddrop._weighting import GradNormState
from optax_graddrop._weighting import gradnorm
from optax_graddrop._weighting import uncertainty_weighted_losses
from optax_graddrop._weighting import weight_tasks

__version__ = "0.1.0"

__all__ = [
  "AggregatorState",
  "GradDropStats",
  "GradNorm",
  "GradNormState",
  "Keep",
  "KeepFn",
  "MultiStepsState",
  "aggregator_transform",
  "fork",
  "graddrop",
  "graddrop_activation",
  "graddrop_transform",
  "graddrop_value_and_grad",
  "gradnorm",
  "keep_fn",
  "linen",
  "mean_tasks",
  "mean_transform",
  "mgda",
  "mgda_transform",
  "mgda_weights",
  "multi_steps",
  "nnx",
  "pcgrad",
  "pcgrad_transform",
  "pcgrad_weights",
  "per_task_value_and_grad",
  "problems",
  "sign_masks",
  "sign_purity",
  "stats_probe",
  "sum_tasks",
  "sum_transform",
  "uncertainty_weighted_losses",
  "weight_tasks",
]
