"""Benchmarks of the real worker against plain diffusers."""
