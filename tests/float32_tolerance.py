"""How far apart two compilations of one float32 function may be.

XLA orders a program's sums as it fuses and partitions it, so two programs
computing the same float32 function (jit and jax.export; maps and scores in
one program or in two; 8 devices or 1) may round differently. Reordering a
sum of K terms changes it by about sqrt(K) * 2^-24 of the terms' size (the
roundings add up as a random walk; the worst case is K * 2^-24), and D
layers of such sums add up to about sqrt(D * K) * 2^-24 of the output's
scale. The networks of the tests have at most D = 30 layers of at most
K = 9 * 64 = 576 terms: about 8e-6 of the largest value of a map. The
tolerance, 1e-4 of it, leaves 12x; what it must catch is a map of other
parameters or other post-processing, which differs by the map's own scale
(the shared run's maps after 2 and after 4 steps differ by tens of percent of it).
"""

import numpy as np

RELATIVE_TO_SCALE = 1e-4


def assert_same_function(got, want, scale=None, err_msg: str = '') -> None:
  """`got` and `want`, two compilations' float32 outputs, agree to 1e-4 of the outputs' scale.

  `scale`: the largest magnitude of what was summed, when `want` is itself a
  difference of larger values; by default want's largest magnitude.
  """
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = float(np.abs(want).max()) if scale is None else float(scale)
  np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE_TO_SCALE * scale, err_msg=err_msg)
