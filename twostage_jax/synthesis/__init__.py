"""Host-side training inputs of the methods.

DRAEM Perlin blends, SAIM superpixels, Bauer's patch distortion, AnoSeg's
hard-augmented CutPaste, and the plain normal images UTAD trains on.
"""

from twostage_jax.synthesis.augment import AUGMENTERS
from twostage_jax.synthesis.augment import random_augment
from twostage_jax.synthesis.cutpaste import HardCutPaste
from twostage_jax.synthesis.distortion import PatchDistorter
from twostage_jax.synthesis.geometric import random_geometric
from twostage_jax.synthesis.perlin import perlin_mask
from twostage_jax.synthesis.perlin import perlin_noise
from twostage_jax.synthesis.pseudo_anomaly import PseudoAnomalySynthesizer
from twostage_jax.synthesis.pseudo_anomaly import superpixel_paste
from twostage_jax.synthesis.samples import CutPasteSampler
from twostage_jax.synthesis.samples import DistortionSampler
from twostage_jax.synthesis.samples import NormalSampler
from twostage_jax.synthesis.samples import PseudoAnomalySampler
from twostage_jax.synthesis.samples import augment_settings
from twostage_jax.synthesis.source_store import SourceStore
from twostage_jax.synthesis.source_store import build_image_store
from twostage_jax.synthesis.source_store import build_source_store
from twostage_jax.synthesis.sources import describe_sources
from twostage_jax.synthesis.sources import load_anomaly_sources
from twostage_jax.synthesis.superpixel import slic_labels
from twostage_jax.synthesis.superpixel import superpixel_mask

__all__ = [
    'AUGMENTERS',
    'CutPasteSampler',
    'DistortionSampler',
    'HardCutPaste',
    'NormalSampler',
    'PatchDistorter',
    'PseudoAnomalySampler',
    'PseudoAnomalySynthesizer',
    'SourceStore',
    'augment_settings',
    'build_image_store',
    'build_source_store',
    'describe_sources',
    'load_anomaly_sources',
    'perlin_mask',
    'perlin_noise',
    'random_augment',
    'random_geometric',
    'slic_labels',
    'superpixel_mask',
    'superpixel_paste',
]
