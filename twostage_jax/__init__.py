"""twostage-jax: anomaly segmentation from defect-free images.

`from twostage_jax import Detector` gives the Python API (inference/detector.py). It
is loaded on first use: the input pipeline's worker processes import this
package and must not import JAX with it.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name == 'Detector':
    from twostage_jax.inference.detector import Detector  # pylint: disable=import-outside-toplevel
    return Detector
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
