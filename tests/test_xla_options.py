"""XLA compiler options from the config: unknown ones are dropped, not fatal."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from twostage_jax.runtime import parallel
from twostage_jax.runtime import xla_options


def test_unknown_options_are_dropped_with_a_warning(caplog):
  options = {'xla_embed_ir_in_executable': False, 'xla_cpu_no_such_option_anywhere': 1}
  with caplog.at_level(logging.WARNING):
    kept = xla_options.supported(options)
  assert kept == {'xla_embed_ir_in_executable': False}
  assert 'xla_cpu_no_such_option_anywhere=1 is not supported' in caplog.text
  # Passed whole, the unknown option fails every compilation.
  mesh = parallel.make_mesh()
  batch = jax.device_put(jnp.zeros((jax.device_count(),)), parallel.batch_sharded(mesh))
  step = parallel.per_shard(lambda r, b: b + r, mesh, options)
  with pytest.raises(jax.errors.JaxRuntimeError, match='xla_cpu_no_such_option_anywhere'):
    step(jnp.float32(1), batch)
  guarded = parallel.per_shard(lambda r, b: b + r, mesh, kept)
  assert float(guarded(jnp.float32(1), batch).sum()) == jax.device_count()


def test_the_config_options_apply_on_the_cpu_backend():
  config = ml_collections.ConfigDict({'xla_cpu_options': {
      'xla_embed_ir_in_executable': False, 'xla_cpu_no_such_option_anywhere': 1}})
  assert jax.default_backend() == 'cpu'
  assert xla_options.compiler_options(config) == {'xla_embed_ir_in_executable': False}
