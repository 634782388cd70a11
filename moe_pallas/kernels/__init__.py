"""Pallas kernels (lowered through Triton) for the layer's expert computation.

Everything backend-specific (Pallas-Triton internals, tile sizes) lives in this package.
"""
