"""Train-step time of the stage-1 network for a config, optionally against PyTorch.

  python benchmarks/train_step.py --config=configs/mvtec.py \
      --config.model.width=32 --config.image_size=128 [--compare-torch]

Times the jit-compiled, data-parallel step (network, SSIM + L2 objective,
gradient, Adam) on every visible device on synthetic batches (no input
pipeline), after warm-up. Prints the model FLOPs per image counted from the
layer shapes, XLA's own count of the forward pass, and the achieved FLOP/s.

--compare-torch times the PyTorch twin of the same network, objective and
Adam (benchmarks/torch_twin.py) in the same run: same width, batch, image
size and dtype, on CUDA when torch sees a GPU, else on the CPU. The two
steps are timed in interleaved rounds, so load from other jobs hits both
alike; medians are reported with the ratio JAX / torch.
--tf32 (the default) lets both frameworks convolve float32 in TF32 on a GPU
(XLA's default precision, torch's `allow_tf32`); --notf32 makes both full
float32. --json writes the figures to a file as well.
--breakdown also times the forward pass alone and forward + backward.
--check-equivalence copies the JAX parameters into the twin and reports how
far its map, loss and gradients are from the JAX model's.
"""

import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import machine

from twostage_jax import methods
from twostage_jax.runtime import parallel
from twostage_jax.training import train_state
from twostage_jax.training import train_step

config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds; medians over rounds are reported.')
_DTYPE = flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16'],
    "Compute dtype of the network (JAX: the model's `dtype`; torch: autocast). "
    'Parameters, optimizer state and the objective stay float32.')
_COMPARE_TORCH = flags.DEFINE_bool(
    'compare-torch', False, 'Also time the PyTorch twin of the step in the same run.')
_BREAKDOWN = flags.DEFINE_bool(
    'breakdown', False, 'Also time the forward pass alone and forward + backward.')
_CHECK = flags.DEFINE_bool(
    'check-equivalence', False,
    'Copy the JAX parameters into the torch twin and report the largest differences '
    '(float32, one batch).')
_CHANNELS_LAST = flags.DEFINE_bool(
    'torch-channels-last', True, 'Run the torch twin in the channels_last memory format.')
_XLA_OPTIONS = flags.DEFINE_multi_string(
    'xla-option', [],
    'key=value XLA compiler option for the JAX computations, e.g. '
    'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE (YNNPACK for '
    'reductions only, so XLA:CPU runs the convolutions with Eigen). Repeatable.')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak-tflops', None, "The device's peak TFLOP/s, to print model FLOP utilisation.")
_MEASURED_TFLOPS = flags.DEFINE_float(
    'measured-tflops', None,
    'A matrix-product rate measured on this kind of device, for a second utilisation figure.')
_TF32 = flags.DEFINE_bool(
    'tf32', True, 'float32 on a GPU: both frameworks convolve in TF32 (else full float32).')
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
FLAGS = flags.FLAGS

TORCH_MISSING = (
    '--compare-torch and --check-equivalence need PyTorch, a benchmark-only '
    'dependency (not in requirements.txt). Install it with\n'
    '  pip install torch --index-url https://download.pytorch.org/whl/cpu\n'
    'or, for a CUDA machine, the wheel for its CUDA version from https://pytorch.org.')


def forward_flops(width: int, height: int, breadth: int) -> int:
  """Forward FLOPs of SegmentationNet for one height x breadth image.

  Counts the convolutions only, each as 2 * H * W * Cin * Cout * k^2 (one
  multiply and one add per MAC, 'same' padding counted as full windows).
  BatchNorm, ReLU, pooling, upsampling and the objective are elementwise or
  nearly so and left out: together a few percent of the total.
  """
  w = width
  full = [(3, w), (w, w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, w), (w, 1)]
  half = [(w, 2 * w), (2 * w, 2 * w), (4 * w, 4 * w), (4 * w, 4 * w), (4 * w, 2 * w)]
  quarter = [(2 * w, 4 * w), (4 * w, 4 * w)]
  pixels = height * breadth
  macs = sum(
      pixels // scale * sum(9 * i * o for i, o in convs)
      for scale, convs in ((1, full), (4, half), (16, quarter)))
  return 2 * macs


def training_flops(width: int, height: int, breadth: int) -> int:
  """Training FLOPs per image: 3x the forward.

  The backward pass of a convolution computes the gradient with respect to
  its input and to its kernel, each as costly as the forward convolution
  (the first layer's input gradient is not needed; the convention ignores
  that).
  """
  return 3 * forward_flops(width, height, breadth)


def xla_forward_flops(model: nn.Module, variables: Any, image: jax.Array) -> float:
  """XLA's cost analysis of the compiled train-mode forward pass.

  On the CPU it counts every op. On GPUs the convolutions run as library
  (cuDNN) calls that the analysis does not count, so it is far below the
  count from the layer shapes there.
  """
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[0])
  analysis = compile_jax(forward, variables, image).cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis['flops'])


def compile_jax(fn: Any, *args: Any) -> Any:
  """`fn` (a jitted function) compiled for `args` with the --xla-option options."""
  options = {}
  for option in _XLA_OPTIONS.value:
    key, value = option.split('=', 1)
    options[key] = {'true': True, 'false': False}.get(value.lower(), value)
  return fn.lower(*args).compile(compiler_options=options or None)


def time_rounds(runners: dict[str, Callable[[int], None]], steps: int,
                rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each runner, one figure per round.

  A runner runs `steps` steps and returns when the device has finished
  them. Each runs twice first (compilation, autotuning, allocator warm-up);
  then every round runs each runner once in turn.
  """
  for run in runners.values():
    run(1)
    run(1)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      run(steps)
      times[name].append((time.perf_counter() - start) / steps)
  return times


def jax_runners(config: ml_collections.ConfigDict, model: nn.Module,
                batch_np: dict[str, np.ndarray],
                breakdown: bool) -> dict[str, Callable[[int], None]]:
  """The JAX train step as the trainer runs it, and optionally its parts."""
  mesh = parallel.make_mesh()
  batch = jax.device_put(batch_np, parallel.batch_sharded(mesh))
  state = train_state.create_train_state(methods.get(config.method), config,
                                         train_state.prng_key(0)).replace(
      apply_fn=model.apply)
  state = jax.device_put(state, parallel.replicated(mesh))
  objective = methods.get(config.method).objective(config, 1)
  key = train_state.prng_key(0)
  start = time.perf_counter()
  step = compile_jax(
      parallel.data_parallel(functools.partial(train_step.train_step, objective=objective), mesh),
      state, batch, key)
  print(f'JAX step compile: {time.perf_counter() - start:.1f} s')
  holder = {'state': state}

  def run_step(n):
    state = holder['state']
    for _ in range(n):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    holder['state'] = state

  runners = {}
  if breakdown:
    # One device's view without the data-parallel wrapper: BatchNorm needs
    # no named axis.
    local = model.clone(axis_name=None)
    single = jax.device_put(batch_np)

    def loss_fn(params, batch_stats):
      prediction, _ = local.apply({'params': params, 'batch_stats': batch_stats},
                                  single['image'], train=True, mutable=['batch_stats'])
      return objective(prediction, single)[0]

    # Copies: the step donates (and so deletes) the state's buffers.
    params, batch_stats = jax.tree.map(jnp.copy, (state.params, state.batch_stats))
    forward = compile_jax(jax.jit(loss_fn), params, batch_stats)
    backward = compile_jax(jax.jit(jax.grad(loss_fn)), params, batch_stats)

    def run(fn, n):
      for _ in range(n):
        out = fn(params, batch_stats)
      jax.block_until_ready(out)

    runners['jax forward'] = functools.partial(run, forward)
    runners['jax forward+backward'] = functools.partial(run, backward)
  runners['jax step'] = run_step
  return runners


def torch_runners(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray],
                  breakdown: bool,
                  channels_last: bool) -> tuple[dict[str, Callable[[int], None]], str]:
  """The twin's train step (and parts) on CUDA if available, and a description."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_twin  # pylint: disable=g-import-not-at-top

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True
  torch.backends.cudnn.allow_tf32 = _TF32.value
  torch.backends.cuda.matmul.allow_tf32 = _TF32.value
  torch.manual_seed(0)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = torch_twin.SegmentationNet(
      config.model.width, config.model.bn_momentum, config.model.bn_epsilon)
  model = model.to(device=device, memory_format=memory_format).train()
  autocast = torch.bfloat16 if _DTYPE.value == 'bfloat16' else None
  step = torch_twin.TrainStep(model, config.loss, config.train.learning_rate, autocast)
  image = torch.from_numpy(batch_np['image']).permute(0, 3, 1, 2)
  image = image.to(device=device, memory_format=memory_format)
  mask = torch.from_numpy(batch_np['mask']).to(device)

  def synchronize():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def run(fn, n):
    for _ in range(n):
      fn(image, mask)
    synchronize()

  def forward(x, m):
    with torch.no_grad():
      step.loss(x, m)

  runners = {}
  if breakdown:
    runners['torch forward'] = functools.partial(run, forward)
    runners['torch forward+backward'] = functools.partial(run, step.backward)
  runners['torch step'] = functools.partial(run, step)
  threads = f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''
  name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
  layout = 'channels_last' if channels_last else 'NCHW'
  return runners, f'torch {torch.__version__} on {name}{threads}, {layout}'


def check_equivalence(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray],
                      channels_last: bool) -> None:
  """Prints the largest differences between the JAX model and the twin in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_twin  # pylint: disable=g-import-not-at-top

  model = methods.get(config.method).create_model(config, 1).clone(
      axis_name=None, dtype=jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      train_state.prng_key(0), jnp.zeros((1,) + batch_np['image'].shape[1:]))
  objective = methods.get(config.method).objective(config, 1)

  def loss_fn(params):
    prediction, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                batch_np['image'], train=True, mutable=['batch_stats'])
    return objective(prediction, batch_np)[0], prediction

  # Full float32 on both sides: GPUs otherwise convolve in TF32 by default.
  with jax.default_matmul_precision('float32'):
    (loss, prediction), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables['params'])
  params = jax.device_get(variables['params'])

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  allow_tf32 = torch.backends.cudnn.allow_tf32
  torch.backends.cudnn.allow_tf32 = False
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  twin = torch_twin.SegmentationNet(
      config.model.width, config.model.bn_momentum, config.model.bn_epsilon)
  torch_twin.load_flax_params(twin, params)
  twin = twin.to(device=device, memory_format=memory_format).train()
  image = torch.from_numpy(batch_np['image']).permute(0, 3, 1, 2)
  image = image.to(device=device, memory_format=memory_format)
  mask = torch.from_numpy(batch_np['mask']).to(device)
  twin_prediction = twin(image)
  c = config.loss
  twin_loss = torch_twin.ssim_l2_loss(twin_prediction, mask, c.ssim_window, c.ssim_sigma,
                                      c.ssim_k1, c.ssim_k2, c.ssim_weight, c.l2_weight)
  twin_loss.backward()
  torch.backends.cudnn.allow_tf32 = allow_tf32

  map_diff = np.abs(np.asarray(prediction) - twin_prediction.detach().cpu().numpy()).max()
  grad_diff = grad_max = 0.0
  for i, conv in enumerate(twin.convs):
    ours = np.asarray(grads[f'Conv_{i}']['kernel'])
    theirs = conv.weight.grad.cpu().numpy().transpose(2, 3, 1, 0)
    grad_diff = max(grad_diff, float(np.abs(ours - theirs).max()))
    grad_max = max(grad_max, float(np.abs(ours).max()))
  for i, norm in enumerate(twin.norms):
    for ours, theirs in ((grads[f'BatchNorm_{i}']['scale'], norm.weight.grad),
                         (grads[f'BatchNorm_{i}']['bias'], norm.bias.grad)):
      grad_diff = max(grad_diff, float(np.abs(np.asarray(ours) - theirs.cpu().numpy()).max()))
  print(f'equivalence (float32, same parameters and batch): max |map diff| {map_diff:.2e} '
        f'(map range {float(np.ptp(np.asarray(prediction))):.2f}); '
        f'loss JAX {float(loss):.6f} torch {twin_loss.item():.6f} '
        f'(diff {abs(float(loss) - twin_loss.item()):.2e}); '
        f'max |gradient diff| {grad_diff:.2e} (largest gradient {grad_max:.2e})')


def main(_):
  config = FLAGS.config
  batch_size = config.train.global_batch_size
  parallel.local_batch_size(batch_size)
  size = config.image_size
  width = config.model.width
  rng = np.random.default_rng(0)
  batch_np = {
      'image': rng.random((batch_size, size, size, 3), dtype=np.float32),
      'mask': (rng.random((batch_size, size, size)) < 0.1).astype(np.float32),
  }
  if (_COMPARE_TORCH.value or _CHECK.value) and importlib.util.find_spec('torch') is None:
    sys.exit(TORCH_MISSING)

  jax.config.update('jax_default_matmul_precision',
                    'tensorfloat32' if _TF32.value else 'float32')
  dtype = jnp.dtype(_DTYPE.value)
  model = methods.get(config.method).create_model(config, 1).clone(dtype=dtype)
  print(f'machine: {machine.describe()}')
  print(f'JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}'
        + (f'; XLA options {" ".join(_XLA_OPTIONS.value)}' if _XLA_OPTIONS.value else ''))
  print(f'config: image {size}x{size}, width {width}, global batch {batch_size}, '
        f'compute {_DTYPE.value}')

  variables = jax.jit(functools.partial(model.clone(axis_name=None).init, train=False))(
      train_state.prng_key(0), jnp.zeros((1, size, size, 3)))
  counted = forward_flops(width, size, size)
  xla = xla_forward_flops(model.clone(axis_name=None), variables,
                          jnp.asarray(batch_np['image'])) / batch_size
  step_flops = training_flops(width, size, size) * batch_size
  xla_counts = 'all ops' if jax.default_backend() == 'cpu' else 'without library convolutions'
  print(f'model FLOPs per image: forward {counted / 1e9:.3f} G counted from the conv '
        f'layer shapes, {xla / 1e9:.3f} G by XLA cost analysis ({xla_counts}); '
        f'training 3x forward = {3 * counted / 1e9:.3f} G, {step_flops / 1e9:.2f} G per step')

  if _CHECK.value:
    check_equivalence(config, batch_np, _CHANNELS_LAST.value)

  runners = jax_runners(config, model, batch_np, _BREAKDOWN.value)
  if _COMPARE_TORCH.value:
    torch_part, described = torch_runners(config, batch_np, _BREAKDOWN.value,
                                          _CHANNELS_LAST.value)
    print(described)
    runners.update(torch_part)
  start = time.perf_counter()
  times = time_rounds(runners, _STEPS.value, _ROUNDS.value)
  print(f'timed {_ROUNDS.value} interleaved rounds of {_STEPS.value} steps after warm-up '
        f'({time.perf_counter() - start:.0f} s); per step: median (min, max)')
  medians = {name: statistics.median(t) for name, t in times.items()}
  figures = {'machine': machine.describe(), 'jax': jax.__version__,
             'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
             'image_size': size, 'width': width, 'global_batch': batch_size,
             'dtype': _DTYPE.value, 'tf32': _TF32.value, 'flops_per_step': step_flops,
             'seconds_per_step': medians, 'rounds': times, 'mfu': {}}
  for name, t in times.items():
    line = (f'  {name:24s} {medians[name] * 1e3:9.2f} ms '
            f'({min(t) * 1e3:.2f}, {max(t) * 1e3:.2f})')
    if name.endswith('step'):
      achieved = step_flops / medians[name]
      line += (f'   {batch_size / medians[name]:7.1f} images/s   '
               f'{achieved / 1e9:8.1f} GFLOP/s')
      for label, tflops in (('peak', _PEAK_TFLOPS.value), ('measured', _MEASURED_TFLOPS.value)):
        if tflops:
          figures['mfu'][f'{name} vs {label} {tflops:g} TFLOP/s'] = achieved / (tflops * 1e12)
          line += f'   MFU {100 * achieved / (tflops * 1e12):.1f}% of {tflops:g}'
    print(line)
  if _COMPARE_TORCH.value:
    for part in ('forward', 'forward+backward', 'step'):
      if f'jax {part}' in medians:
        paired = statistics.median(
            j / t for j, t in zip(times[f'jax {part}'], times[f'torch {part}']))
        print(f'JAX / torch {part} time: '
              f'{medians[f"jax {part}"] / medians[f"torch {part}"]:.2f} '
              f'(median of the per-round ratios {paired:.2f})')
        figures[f'jax_over_torch {part}'] = paired
    figures['torch'] = described
  if _JSON.value:
    if not all(math.isfinite(v) for v in medians.values()):
      raise ValueError(f'a step time is not finite: {medians}')
    with open(_JSON.value, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  app.run(main)
