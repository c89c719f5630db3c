"""Bauer's self-supervised autoencoder: its plug-in, network and area protocol."""
