"""A pure JAX function of image batches as an ONNX graph, batch dimension dynamic.

The function is traced to a jaxpr twice, at batch sizes 1 and 2; every shape
or index that differs between the traces is linear in the batch size, and is
computed in the graph from the input's batch dimension. Each JAX primitive
the project's networks and post-processing use maps to a few ONNX operators
(`_HANDLERS`); calls (`jit`, `custom_jvp_call`) are inlined, and equations
whose inputs are all constants (the trained weights, reshaped or flipped)
are evaluated once with JAX and stored as initializers. A primitive outside
that set (the device SLIC's `while` loops) is refused by name.

Why not jax2onnx: its releases since 0.13 require orbax-checkpoint < 0.11.37
(this project pins 0.12.8), and 0.12.5, the newest that installs beside the
pins, fails under JAX 0.10 on three of the four methods (its vmap patch
reads a `batching.not_mapped` JAX no longer has; its `max_pool` patch takes
the window keyword-only; `conv_transpose` parameters it builds are not
hashable). It converts by patching Flax and JAX functions, which each
release of them can break; a jaxpr is the stable interface below them.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

OPSET = 18
_IR_VERSION = 8  # what OPSET needs; older runtimes load it too
_BATCH = 'batch'
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


@dataclasses.dataclass(frozen=True)
class Input:
  """A graph input: a batch of arrays of `shape` (without the batch axis) and `dtype`."""
  name: str
  shape: tuple[int, ...]
  dtype: Any


class UnsupportedPrimitive(NotImplementedError):
  """A JAX primitive the converter has no ONNX form for."""


def _onnx_type(dtype: Any) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Graph:
  """The ONNX nodes and initializers being built, and the values of jaxpr variables."""

  def __init__(self, first_input: str):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._first_input = first_input
    self._batch: str | None = None

  def name(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op: str, inputs: Sequence[str], **attributes: Any) -> str:
    out = self.name(op.lower())
    self.nodes.append(helper.make_node(op, list(inputs), [out], **attributes))
    return out

  def constant(self, value: Any, dtype: Any = None) -> str:
    array = np.asarray(value, dtype=dtype)
    name = self.name('const')
    self.initializers.append(numpy_helper.from_array(array, name))
    return name

  def batch(self) -> str:
    """The input's batch size as an int64 [1] tensor."""
    if self._batch is None:
      shape = self.node('Shape', [self._first_input])
      self._batch = self.node('Slice', [shape, self.constant([0], np.int64),
                                        self.constant([1], np.int64)])
    return self._batch

  def linear(self, at1: Sequence[int], at2: Sequence[int]) -> str:
    """An int64 vector whose entries are `at1` at batch 1 and `at2` at batch 2."""
    slope = np.asarray(at2, np.int64) - np.asarray(at1, np.int64)
    offset = np.asarray(at1, np.int64) - slope
    if not slope.any():
      return self.constant(offset)
    return self.node('Add', [self.node('Mul', [self.constant(slope), self.batch()]),
                             self.constant(offset)])


@dataclasses.dataclass
class _Eqn:
  """One equation of the two traces: the batch-1 one, and the batch-2 one's params."""
  eqn: Any
  params2: dict[str, Any]

  @property
  def params(self) -> dict[str, Any]:
    return self.eqn.params

  def aval(self, index: int = 0) -> Any:
    return self.eqn.outvars[index].aval


def _unary(op: str) -> Callable:
  return lambda g, e, x: [g.node(op, [x])]


def _binary(op: str) -> Callable:
  return lambda g, e, x, y: [g.node(op, [x, y])]


def _not_equal(g, e, x, y):
  return [g.node('Not', [g.node('Equal', [x, y])])]


def _logical(op: str, bitwise: str) -> Callable:
  def handler(g, e, x, y):
    return [g.node(op if e.aval().dtype == np.bool_ else bitwise, [x, y])]
  return handler


def _not(g, e, x):
  return [g.node('Not' if e.aval().dtype == np.bool_ else 'BitwiseNot', [x])]


def _rsqrt(g, e, x):
  return [g.node('Reciprocal', [g.node('Sqrt', [x])])]


def _square(g, e, x):
  return [g.node('Mul', [x, x])]


def _integer_pow(g, e, x):
  power = e.params['y']
  if power == 2:
    return [g.node('Mul', [x, x])]
  return [g.node('Pow', [x, g.constant(float(power), e.aval().dtype)])]


def _convert(g, e, x):
  return [g.node('Cast', [x], to=_onnx_type(e.params['new_dtype']))]


def _select_n(g, e, which, *cases):
  if len(cases) != 2:
    raise UnsupportedPrimitive(f'select_n with {len(cases)} cases')
  predicate = which if e.eqn.invars[0].aval.dtype == np.bool_ else g.node(
      'Cast', [which], to=onnx.TensorProto.BOOL)
  return [g.node('Where', [predicate, cases[1], cases[0]])]


def _reshape(g, e, x):
  return [g.node('Reshape', [x, g.linear(e.params['new_sizes'], e.params2['new_sizes'])])]


def _broadcast_in_dim(g, e, x):
  rank = len(e.params['shape'])
  kept = e.params['broadcast_dimensions']
  new_axes = [axis for axis in range(rank) if axis not in kept]
  if new_axes:
    x = g.node('Unsqueeze', [x, g.constant(new_axes, np.int64)])
  return [g.node('Expand', [x, g.linear(e.params['shape'], e.params2['shape'])])]


def _squeeze(g, e, x):
  return [g.node('Squeeze', [x, g.constant(list(e.params['dimensions']), np.int64)])]


def _expand_dims(g, e, x):
  return [g.node('Unsqueeze', [x, g.constant(list(e.params['dimensions']), np.int64)])]


def _transpose(g, e, x):
  return [g.node('Transpose', [x], perm=list(e.params['permutation']))]


def _concatenate(g, e, *xs):
  return [g.node('Concat', list(xs), axis=e.params['dimension'])]


def _stack(g, e, *xs):
  axis = e.params['axis']
  axes = g.constant([axis], np.int64)
  return [g.node('Concat', [g.node('Unsqueeze', [x, axes]) for x in xs], axis=axis)]


def _slice(g, e, x):
  rank = len(e.params['start_indices'])
  strides = e.params['strides'] or (1,) * rank
  return [g.node('Slice', [
      x, g.linear(e.params['start_indices'], e.params2['start_indices']),
      g.linear(e.params['limit_indices'], e.params2['limit_indices']),
      g.constant(list(range(rank)), np.int64), g.constant(list(strides), np.int64)])]


def _rev(g, e, x):
  axes = list(e.params['dimensions'])
  return [g.node('Slice', [x, g.constant([-1] * len(axes), np.int64),
                           g.constant([_INT64_MIN] * len(axes), np.int64),
                           g.constant(axes, np.int64), g.constant([-1] * len(axes), np.int64)])]


def _split(g, e, x):
  sizes = e.params['sizes']
  outs = [g.name('split') for _ in sizes]
  g.nodes.append(helper.make_node('Split', [x, g.constant(list(sizes), np.int64)], outs,
                                  axis=e.params['axis']))
  return outs


def _reduce(op: str) -> Callable:
  def handler(g, e, x):
    return [g.node(op, [x, g.constant(list(e.params['axes']), np.int64)], keepdims=0)]
  return handler


def _arg(op: str) -> Callable:
  def handler(g, e, x):
    axis, = e.params['axes']
    index = g.node(op, [x], axis=axis, keepdims=0)
    return [g.node('Cast', [index], to=_onnx_type(e.params['index_dtype']))]
  return handler


def _iota(g, e):
  shape, dimension = e.params['shape'], e.params['dimension']
  if shape != e.params2['shape']:
    raise UnsupportedPrimitive('iota over the batch axis')
  values = np.arange(shape[dimension], dtype=e.params['dtype'])
  view = [1] * len(shape)
  view[dimension] = shape[dimension]
  return [g.constant(np.broadcast_to(values.reshape(view), shape))]


def _spatial(g, x, rank):
  """(B, H, W) or (B, H, W, C) as (B, C, H, W), and the function that undoes it."""
  if rank == 3:
    axis = g.constant([1], np.int64)
    return g.node('Unsqueeze', [x, axis]), lambda y: g.node('Squeeze', [y, axis])
  if rank == 4:
    return (g.node('Transpose', [x], perm=[0, 3, 1, 2]),
            lambda y: g.node('Transpose', [y], perm=[0, 2, 3, 1]))
  raise UnsupportedPrimitive(f'a window over a rank-{rank} array')


def _reduce_window(kind: str) -> Callable:
  def handler(g, e, x):
    window = e.params['window_dimensions']
    strides = e.params['window_strides']
    padding = e.params['padding']
    rank = len(window)
    dilated = any(d != 1 for d in e.params['base_dilation'] + e.params['window_dilation'])
    spatial = (1, 2)
    if dilated or any(window[a] != 1 or strides[a] != 1 or padding[a] != (0, 0)
                      for a in range(rank) if a not in spatial):
      raise UnsupportedPrimitive(f'reduce_window_{kind} beyond 2-D pooling: {e.params}')
    nchw, back = _spatial(g, x, rank)
    attributes = dict(kernel_shape=[window[1], window[2]], strides=[strides[1], strides[2]],
                      pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
    if kind == 'max':
      return [back(g.node('MaxPool', [nchw], **attributes))]
    mean = g.node('AveragePool', [nchw], count_include_pad=1, **attributes)
    area = g.constant(float(window[1] * window[2]), e.aval().dtype)
    return [back(g.node('Mul', [mean, area]))]
  return handler


def _dilate_input(g, x, factors, spatial_shape):
  """Zeros between the pixels of (B, C, H, W) `x`: what lhs_dilation means."""
  (fh, fw), (h, w) = factors, spatial_shape
  if (fh, fw) == (1, 1):
    return x
  six = g.node('Unsqueeze', [x, g.constant([3, 5], np.int64)])  # (B, C, H, 1, W, 1)
  padded = g.node('Pad', [six, g.constant([0, 0, 0, 0, 0, 0, 0, 0, 0, fh - 1, 0, fw - 1],
                                          np.int64)])
  flat = g.node('Reshape', [padded, g.constant([0, 0, h * fh, w * fw], np.int64)])
  return g.node('Slice', [flat, g.constant([0, 0], np.int64),
                          g.constant([(h - 1) * fh + 1, (w - 1) * fw + 1], np.int64),
                          g.constant([2, 3], np.int64)])


def _conv(g, e, x, kernel):
  params = e.params
  numbers = params['dimension_numbers']
  lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
  if len(lhs_spec) != 4 or params['batch_group_count'] != 1:
    raise UnsupportedPrimitive(f'conv_general_dilated beyond 2-D: {params}')
  lhs_shape = e.eqn.invars[0].aval.shape
  nchw = g.node('Transpose', [x], perm=list(lhs_spec))
  nchw = _dilate_input(g, nchw, params['lhs_dilation'],
                       (lhs_shape[lhs_spec[2]], lhs_shape[lhs_spec[3]]))
  oihw = g.node('Transpose', [kernel], perm=list(rhs_spec))
  (top, bottom), (left, right) = params['padding']
  if min(top, bottom, left, right) < 0:
    raise UnsupportedPrimitive('negative convolution padding')
  out = g.node('Conv', [nchw, oihw], strides=list(params['window_strides']),
               dilations=list(params['rhs_dilation']), pads=[top, left, bottom, right],
               group=params['feature_group_count'])
  return [g.node('Transpose', [out], perm=list(np.argsort(out_spec)))]


def _dot_general(g, e, x, y):
  (x_contract, y_contract), (x_batch, y_batch) = e.params['dimension_numbers']
  x_rank, y_rank = len(e.eqn.invars[0].aval.shape), len(e.eqn.invars[1].aval.shape)
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  x_axes = [next(letters) for _ in range(x_rank)]
  y_axes = [next(letters) for _ in range(y_rank)]
  for i, j in zip(x_contract + x_batch, y_contract + y_batch):
    y_axes[j] = x_axes[i]
  out = ([x_axes[i] for i in x_batch]
         + [a for i, a in enumerate(x_axes) if i not in x_contract + x_batch]
         + [a for i, a in enumerate(y_axes) if i not in y_contract + y_batch])
  equation = f'{"".join(x_axes)},{"".join(y_axes)}->{"".join(out)}'
  return [g.node('Einsum', [x, y], equation=equation)]


def _clamp(g, e, low, x, high):
  return [g.node('Min', [g.node('Max', [x, low]), high])]


_HANDLERS: dict[str, Callable] = {
    'add': _binary('Add'), 'sub': _binary('Sub'), 'mul': _binary('Mul'),
    'div': _binary('Div'), 'max': _binary('Max'), 'min': _binary('Min'),
    'pow': _binary('Pow'), 'integer_pow': _integer_pow, 'square': _square,
    'neg': _unary('Neg'), 'abs': _unary('Abs'), 'exp': _unary('Exp'), 'log': _unary('Log'),
    'sqrt': _unary('Sqrt'), 'rsqrt': _rsqrt, 'tanh': _unary('Tanh'),
    'logistic': _unary('Sigmoid'), 'floor': _unary('Floor'), 'ceil': _unary('Ceil'),
    'sign': _unary('Sign'), 'copy': _unary('Identity'), 'copy_p': _unary('Identity'),
    'eq': _binary('Equal'), 'ne': _not_equal, 'lt': _binary('Less'),
    'le': _binary('LessOrEqual'), 'gt': _binary('Greater'), 'ge': _binary('GreaterOrEqual'),
    'and': _logical('And', 'BitwiseAnd'), 'or': _logical('Or', 'BitwiseOr'), 'not': _not,
    'select_n': _select_n, 'convert_element_type': _convert, 'clamp': _clamp,
    'reshape': _reshape, 'broadcast_in_dim': _broadcast_in_dim, 'squeeze': _squeeze,
    'expand_dims': _expand_dims, 'transpose': _transpose, 'concatenate': _concatenate,
    'stack': _stack, 'slice': _slice, 'rev': _rev, 'split': _split,
    'reduce_sum': _reduce('ReduceSum'), 'reduce_max': _reduce('ReduceMax'),
    'reduce_min': _reduce('ReduceMin'), 'argmin': _arg('ArgMin'), 'argmax': _arg('ArgMax'),
    'iota': _iota, 'reduce_window_sum': _reduce_window('sum'),
    'reduce_window_max': _reduce_window('max'), 'conv_general_dilated': _conv,
    'dot_general': _dot_general,
}
# Calls whose body is inlined: the parameter holding it.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'custom_vjp_call': 'call_jaxpr', 'closed_call': 'call_jaxpr'}


def _closed(jaxpr: Any) -> jex.ClosedJaxpr:
  return jaxpr if isinstance(jaxpr, jex.ClosedJaxpr) else jex.ClosedJaxpr(jaxpr, ())


class _Converter:
  """Walks the two traces in step, emitting ONNX nodes or folding constants."""

  def __init__(self, graph: _Graph):
    self.g = graph

  def run(self, closed1: jex.ClosedJaxpr, closed2: jex.ClosedJaxpr,
          args: list[Any]) -> list[Any]:
    """Values (an ONNX name, or a numpy constant) of the outputs, given the inputs'."""
    jaxpr1, jaxpr2 = closed1.jaxpr, closed2.jaxpr
    if len(jaxpr1.eqns) != len(jaxpr2.eqns):
      raise UnsupportedPrimitive('the function traces differently at batch sizes 1 and 2')
    env: dict[Any, Any] = {}

    def read(atom):
      if isinstance(atom, jex.Literal):
        return np.asarray(atom.val, dtype=atom.aval.dtype)
      return env[atom]

    for var, value in zip(jaxpr1.constvars, closed1.consts):
      env[var] = np.asarray(value)
    for var, value in zip(jaxpr1.invars, args):
      env[var] = value
    for eqn1, eqn2 in zip(jaxpr1.eqns, jaxpr2.eqns):
      name = eqn1.primitive.name
      if name != eqn2.primitive.name:
        raise UnsupportedPrimitive('the function traces differently at batch sizes 1 and 2')
      inputs = [read(atom) for atom in eqn1.invars]
      if name in _CALLS:
        key = _CALLS[name]
        outputs = self.run(_closed(eqn1.params[key]), _closed(eqn2.params[key]), inputs)
      elif (all(isinstance(v, np.ndarray) for v in inputs)
            and [v.aval.shape for v in eqn1.outvars] == [v.aval.shape for v in eqn2.outvars]):
        outputs = self._fold(eqn1, inputs)
      else:
        if name not in _HANDLERS:
          raise UnsupportedPrimitive(
              f'JAX primitive {name!r} has no ONNX form here (the converter knows '
              f'{", ".join(sorted(_HANDLERS))})')
        names = [v if isinstance(v, str) else self.g.constant(v) for v in inputs]
        outputs = _HANDLERS[name](self.g, _Eqn(eqn1, eqn2.params), *names)
      for var, value in zip(eqn1.outvars, outputs):
        env[var] = value
    return [read(atom) for atom in jaxpr1.outvars]

  def _fold(self, eqn: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The equation evaluated with JAX: its inputs are constants (weights, literals)."""
    out = eqn.primitive.bind(*[jnp.asarray(v) for v in inputs], **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [np.asarray(v) for v in outs]


def to_onnx(fn: Callable[..., Any], inputs: Sequence[Input],
            output_names: Sequence[str]) -> onnx.ModelProto:
  """The ONNX model of `fn(*batches) -> outputs`, every input and output batched.

  Args:
    fn: a pure JAX function of the inputs' batches; its outputs are a tuple
      (or one array) whose first axis is the batch.
    inputs: the graph's inputs, in `fn`'s argument order.
    output_names: a name for each output.

  Raises:
    UnsupportedPrimitive: naming a primitive the converter cannot express.
  """
  traces = [jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct((batch,) + i.shape, i.dtype)
                                 for i in inputs]) for batch in (1, 2)]
  graph = _Graph(inputs[0].name)
  outputs = _Converter(graph).run(traces[0], traces[1], [i.name for i in inputs])
  out_avals = traces[0].out_avals
  if len(outputs) != len(output_names):
    raise ValueError(f'{len(outputs)} outputs, {len(output_names)} names')
  for value, name in zip(outputs, output_names):
    source = value if isinstance(value, str) else graph.constant(value)
    graph.nodes.append(helper.make_node('Identity', [source], [name]))
  model = helper.make_model(
      helper.make_graph(
          graph.nodes, 'detector',
          [helper.make_tensor_value_info(i.name, _onnx_type(i.dtype), [_BATCH, *i.shape])
           for i in inputs],
          [helper.make_tensor_value_info(name, _onnx_type(aval.dtype),
                                         [_BATCH, *aval.shape[1:]])
           for name, aval in zip(output_names, out_avals)],
          graph.initializers),
      opset_imports=[helper.make_opsetid('', OPSET)], ir_version=_IR_VERSION,
      producer_name='twostage_jax')
  onnx.checker.check_model(model)
  return model
