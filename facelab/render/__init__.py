"""Differentiable rendering: cameras, SH lighting, shading, rasterizer backends, MeshRenderer.

Knows nothing of faces. Rasterizer contract = nvdiffrast's (rasterize, interpolate, texture,
antialias), with row 0 of every image at the top.
"""

from .backends import get_rasterizer
from .camera import PerspectiveCamera, WeakPerspectiveCamera, euler_to_matrix, rotation_6d_to_matrix
from .renderer import MeshRenderer, RenderOutput, vertex_normals
from .uv import dilate_texture, sample_at_vertices, sample_texture, unwrap, uv_rasterize

__all__ = ["MeshRenderer", "RenderOutput", "get_rasterizer", "vertex_normals", "PerspectiveCamera",
           "WeakPerspectiveCamera", "euler_to_matrix", "rotation_6d_to_matrix", "unwrap", "uv_rasterize",
           "sample_texture", "sample_at_vertices", "dilate_texture"]
