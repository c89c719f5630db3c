"""Test setup: 8 simulated CPU devices.

The tests import the installed package (`pip install -e .`, which README's
install line does), never a path of their own.
"""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
