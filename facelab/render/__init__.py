"""Differentiable rendering: cameras, SH lighting, shading, rasterizer backends, MeshRenderer.

Knows nothing of faces. Rasterizer contract = nvdiffrast's (rasterize, interpolate, texture,
antialias), with row 0 of every image at the top.
"""

from .backends import get_rasterizer
from .camera import PerspectiveCamera, WeakPerspectiveCamera, euler_to_matrix, rotation_6d_to_matrix
from .renderer import MeshRenderer, RenderOutput, vertex_normals

__all__ = ["MeshRenderer", "RenderOutput", "get_rasterizer", "vertex_normals", "PerspectiveCamera",
           "WeakPerspectiveCamera", "euler_to_matrix", "rotation_6d_to_matrix"]
