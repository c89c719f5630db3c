"""The stage-1 network, objective and train step written once more in PyTorch.

A twin of `twostage_jax.models.segmentation.SegmentationNet` and `losses.ssim_l2_loss`,
so benchmarks/train_step.py can time the JAX step against the framework the
papers' code uses, on the same machine, with the same shapes. Torch is a
benchmark-only dependency (not in requirements.txt); this module imports it.

The twin computes the same function as the JAX model: layer for layer the
same convolutions, train-mode BatchNorm (biased batch variance), 2x2 max
pools, bilinear 2x upsampling with half-pixel centres (`align_corners=False`
matches `jax.image.resize`'s edge handling when upsampling) and dm-pix's SSIM
with zero "same" padding and its variance clipping. `load_flax_params`
copies a Flax parameter tree in, for checking that claim.
"""

from collections.abc import Mapping

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SegmentationNet(nn.Module):
  """Image (B, 3, H, W) to a one-channel anomaly map (B, H, W).

  Holds its layers in creation order, so conv i is Flax's `Conv_i` and norm i
  its `BatchNorm_i`.
  """

  def __init__(self, width: int, bn_momentum: float, bn_epsilon: float):
    super().__init__()
    w = width
    channels = [(3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w),
                (4 * w, 4 * w), (4 * w, 4 * w), (4 * w, 2 * w),
                (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, w)]
    self.convs = nn.ModuleList(
        [nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in channels]
        + [nn.Conv2d(w, 1, 3, padding=1)])
    # Flax's momentum is the decay of the running average; torch's is 1 - it.
    self.norms = nn.ModuleList(
        [nn.BatchNorm2d(o, eps=bn_epsilon, momentum=1.0 - bn_momentum) for _, o in channels])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    layer = iter(zip(self.convs, self.norms))

    def conv_bn_relu(y):
      conv, norm = next(layer)
      return F.relu(norm(conv(y)))

    def upsample(y):
      return F.interpolate(y, scale_factor=2, mode='bilinear', align_corners=False)

    for stage in range(3):
      x = conv_bn_relu(conv_bn_relu(x))
      if stage < 2:
        x = F.max_pool2d(x, 2)
    x = upsample(x)
    for _ in range(3):
      x = conv_bn_relu(x)
    x = upsample(x)
    for _ in range(3):
      x = conv_bn_relu(x)
    return self.convs[-1](x)[:, 0]


def load_flax_params(model: SegmentationNet, params: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Copies the JAX model's parameters (HWIO kernels) into the twin (OIHW)."""
  with torch.no_grad():
    for i, conv in enumerate(model.convs):
      layer = params[f'Conv_{i}']
      conv.weight.copy_(torch.from_numpy(np.array(layer['kernel']).transpose(3, 2, 0, 1).copy()))
      if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(np.array(layer['bias'])))
    for i, norm in enumerate(model.norms):
      norm.weight.copy_(torch.from_numpy(np.array(params[f'BatchNorm_{i}']['scale'])))
      norm.bias.copy_(torch.from_numpy(np.array(params[f'BatchNorm_{i}']['bias'])))


def _gaussian_taps(window: int, sigma: float) -> torch.Tensor:
  offsets = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
  taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
  return taps / taps.sum()


def ssim_l2_loss(prediction: torch.Tensor, target: torch.Tensor, window: int, sigma: float,
                 k1: float, k2: float, ssim_weight: float, l2_weight: float) -> torch.Tensor:
  """l2_weight * MSE + ssim_weight * (1 - mean SSIM) of (B, H, W) maps, in float32.

  The five local moments are blurred together as channels of one separable,
  depthwise Gaussian convolution with zero padding.
  """
  a = prediction.float()[:, None]
  b = target.float()[:, None]
  taps = _gaussian_taps(window, sigma).to(a.device)
  moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
  pad = window // 2
  moments = F.conv2d(moments, taps.view(1, 1, window, 1).expand(5, 1, window, 1).contiguous(),
                     padding=(pad, 0), groups=5)
  moments = F.conv2d(moments, taps.view(1, 1, 1, window).expand(5, 1, 1, window).contiguous(),
                     padding=(0, pad), groups=5)
  mu0, mu1, m00, m11, m01 = moments.unbind(1)
  mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
  # dm-pix's clipping of the variances and covariance.
  epsilon = float(np.finfo(np.float32).eps) ** 2
  sigma00 = torch.clamp(m00 - mu00, min=epsilon)
  sigma11 = torch.clamp(m11 - mu11, min=epsilon)
  sigma01 = m01 - mu01
  sigma01 = torch.sign(sigma01) * torch.minimum(torch.sqrt(sigma00 * sigma11), sigma01.abs())
  c1, c2 = k1 ** 2, k2 ** 2
  ssim = ((2 * mu01 + c1) * (2 * sigma01 + c2)) / ((mu00 + mu11 + c1) * (sigma00 + sigma11 + c2))
  l2 = torch.mean((a - b) ** 2)
  return l2_weight * l2 + ssim_weight * (1.0 - ssim.mean())


class TrainStep:
  """Forward, objective, backward and Adam update of the twin, as in train.train_step.

  Args:
    model: the twin, already on its device (and memory format).
    loss_config: the config's `loss` section.
    learning_rate: Adam's step size.
    autocast_dtype: compute dtype of the network under autocast; None runs it
      in float32. The objective always runs in float32.
  """

  def __init__(self, model: SegmentationNet, loss_config: ml_collections.ConfigDict,
               learning_rate: float,
               autocast_dtype: torch.dtype | None):
    self.model = model
    self._loss_config = loss_config
    self._autocast_dtype = autocast_dtype
    device = next(model.parameters()).device
    self._device_type = device.type
    # Fused Adam is torch's fastest implementation on CPU and CUDA.
    self.optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)

  def loss(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The objective of a forward pass in train mode."""
    with torch.autocast(self._device_type, dtype=self._autocast_dtype,
                        enabled=self._autocast_dtype is not None):
      prediction = self.model(image)
    c = self._loss_config
    return ssim_l2_loss(prediction, mask, c.ssim_window, c.ssim_sigma, c.ssim_k1, c.ssim_k2,
                        c.ssim_weight, c.l2_weight)

  def backward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward and backward, leaving the gradients in the parameters' `.grad`."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(image, mask)
    loss.backward()
    return loss

  def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = self.backward(image, mask)
    self.optimizer.step()
    return loss
