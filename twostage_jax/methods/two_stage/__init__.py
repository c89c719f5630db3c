"""The two-stage coarse-to-fine model: its plug-in, network, refinement and SLIC on host and device."""
