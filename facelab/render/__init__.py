"""Differentiable rendering: cameras, SH lighting, shading, rasterizer backends (issue #3)."""
