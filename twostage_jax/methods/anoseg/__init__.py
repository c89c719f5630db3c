"""AnoSeg: its plug-in, segmentation network and discriminator, and adversarial losses."""
