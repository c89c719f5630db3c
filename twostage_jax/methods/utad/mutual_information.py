"""IE-Net's information terms: a lower bound on I(x; z) and the KL of the codes to N(0, I).

UTAD (Sec. 3.1) maximises the mutual information of images and their codes
"following f-GAN", with a KL term that keeps the codes Gaussian (Eq. 3:
L = -I + lambda KL). Eq. 2's KL is KL(p(z) || q(z)) on the aggregate code
distribution p(z) = E_x p(z|x) (`aggregate_kl`); the VAE's per-image
E_x KL(p(z|x) || q(z)) (`posterior_kl`) equals I(x; z) + KL(p(z) || q(z)),
so it also penalises the information Eq. 1 maximises. The bound is f-GAN's Jensen-Shannon one as Deep
InfoMax uses it: with T a network scoring (x, z) pairs,

  I_JSD = E_joint[-softplus(-T(x, z))] - E_marginal[softplus(T(x, z'))],

joint pairs taking each image with its own code, marginal ones with the
code of another image of the batch. With T's sigmoid output D = sigmoid(T)
this is E[log D(joint)] + E[log(1 - D(marginal))]; it is at most 0, and
-2 log 2 when T cannot tell the pairs apart.
"""

import jax
import jax.numpy as jnp

from twostage_jax.training import precision


def jsd_mutual_information(joint_logits: jax.Array, marginal_logits: jax.Array) -> jax.Array:
  """f-GAN's Jensen-Shannon estimate of I(x; z) from T's logits of joint and marginal pairs."""
  return (jnp.mean(-jax.nn.softplus(-precision.widen(joint_logits)))
          - jnp.mean(jax.nn.softplus(precision.widen(marginal_logits))))


def posterior_kl(mean: jax.Array, log_variance: jax.Array, axis_name: str) -> jax.Array:
  """KL(N(mean, exp(log_variance)) || N(0, I)) summed over the last axis, averaged over the rest.

  Each position's code is a diagonal Gaussian of the last axis's size. The
  average is this device's; the update averages it over devices.
  """
  del axis_name  # a mean of per-sample terms
  mean = precision.widen(mean)
  log_variance = precision.widen(log_variance)
  per_code = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_variance) - 1.0 - log_variance, -1)
  return jnp.mean(per_code)


def aggregate_kl(mean: jax.Array, log_variance: jax.Array, axis_name: str) -> jax.Array:
  """KL(N(m, v) || N(0, I)) of the Gaussian with the aggregate codes' moments, summed over codes.

  The aggregate p(z) is the mixture of every sample's and position's
  N(mean, exp(log_variance)) in the global batch (over the devices of
  `axis_name`); per code dimension its mean is m = E[mean] and its variance
  v = E[mean^2 + sigma^2] - m^2. The KL of that moment-matched Gaussian is
  at most the mixture's own (a Gaussian has the largest entropy of its
  moments), and it is 0 exactly when the first two moments are N(0, I)'s:
  the codes may spread across images as long as they spread like the prior.
  """
  mean = precision.widen(mean)
  variance = jnp.exp(precision.widen(log_variance))
  axes = tuple(range(mean.ndim - 1))
  first = jax.lax.pmean(jnp.mean(mean, axes), axis_name)
  second = jax.lax.pmean(jnp.mean(jnp.square(mean) + variance, axes), axis_name)
  return 0.5 * jnp.sum(second - 1.0 - jnp.log(second - jnp.square(first)))


# config.ie_net.kl: which KL Eq. 3's lambda weighs.
KL_FORMS = {'aggregate': aggregate_kl, 'posterior': posterior_kl}


def codes_of_next_sample(codes: jax.Array, axis_name: str) -> jax.Array:
  """For each sample of this device's share, the code of the next sample of the whole batch.

  The marginal pairs: sample i of the global batch meets the code of
  sample i + 1 (the last meets the first's), whichever device holds it, so
  a step on several devices pairs exactly what one device would.
  `codes` is (b, ...) per device; gradients flow back to the device that
  computed each code.
  """
  local = codes.shape[0]
  every = jax.lax.all_gather(codes, axis_name, tiled=True)
  start = jax.lax.axis_index(axis_name) * local
  following = (start + jnp.arange(local) + 1) % every.shape[0]
  return jnp.take(every, following, axis=0)
