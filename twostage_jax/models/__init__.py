"""Flax modules, applied as pure functions of (variables, inputs)."""

from twostage_jax.models.autoencoder import BauerAutoencoder
from twostage_jax.models.segmentation import SegmentationNet

__all__ = ['BauerAutoencoder', 'SegmentationNet']
