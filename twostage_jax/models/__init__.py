"""Flax modules, applied as pure functions of (variables, inputs)."""

