"""UTAD: its plug-in, IE-Net and Expert-Net, information terms and perceptual distance."""
