"""FaceModel: the shared linear face model as an ``nn.Module`` of buffers (moves with ``.to``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .format import load_model

EXPRESSION_SPACES = ("blendshape", "pca")


class FaceModel(nn.Module):
    """A linear 3D face model: geometry, expression, albedo and the topology-derived data.

    Args:
        arrays, meta: a face-model file's content (see ``facelab.facemodel.format``).
        expression_space: "blendshape" (the file's blendshape weights, neutral at 0, meant to
            stay in [0,1]) or "pca" (a whitened PCA of the blendshapes, N(0,1) codes; see
            ``expression_pca_scale``).
        n_shape, n_expression, n_albedo: keep only the first modes (None: all).
        expression_pca_scale: standard deviation assumed for blendshape weights when deriving the
            PCA space (codes c map to blendshape weights w = scale * U c).

    Shapes: B batch, V vertices; outputs are float32, mm, model space (+y up, +z out of the face).
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, expression_space: str = "blendshape",
                 n_shape: int | None = None, n_expression: int | None = None, n_albedo: int | None = None,
                 expression_pca_scale: float = 0.3):
        super().__init__()
        if expression_space not in EXPRESSION_SPACES:
            raise ValueError(f"expression_space {expression_space!r}; valid: {EXPRESSION_SPACES}")
        self.meta = dict(meta)
        self.expression_space = expression_space
        self.expression_names = [str(name) for name in arrays["expression_names"]][:n_expression]
        self.region_names = sorted(key[len("region_"):] for key in arrays if key.startswith("region_"))

        def buffer(name: str, value, dtype=torch.float32) -> None:
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value), dtype=dtype), persistent=False)

        buffer("mean", arrays["mean"])
        buffer("shape_basis", arrays["shape_basis"][:n_shape])
        blendshapes = arrays["expression_basis"][:n_expression]
        if expression_space == "pca":
            flat = blendshapes.reshape(len(blendshapes), -1).astype(np.float64)
            u, singular, vt = np.linalg.svd(flat, full_matrices=False)
            signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])  # deterministic signs
            u, vt = u * signs, vt * signs[:, None]
            buffer("expression_basis", (expression_pca_scale * singular[:, None] * vt).reshape(blendshapes.shape))
            buffer("blendshape_from_pca", expression_pca_scale * u)
        else:
            buffer("expression_basis", blendshapes)
        buffer("albedo_mean", arrays["albedo_mean"])
        buffer("albedo_basis", arrays["albedo_basis"][:n_albedo])
        if "specular_basis" in arrays:
            buffer("specular_mean", arrays["specular_mean"])
            buffer("specular_basis", arrays["specular_basis"][:n_albedo])
        buffer("triangles", arrays["triangles"], torch.long)
        if "uv" in arrays:
            buffer("uv", arrays["uv"])
            buffer("uv_triangles", arrays["uv_triangles"], torch.long)
        buffer("landmarks_68", arrays["landmarks_68"], torch.long)
        buffer("mirror", arrays["mirror"], torch.long)
        for name in self.region_names:
            buffer(f"region_{name}", arrays[f"region_{name}"], torch.bool)
        if "mouth_loop" in arrays:
            buffer("mouth_loop", arrays["mouth_loop"], torch.long)
        if "dense_triangles" in arrays:
            buffer("dense_triangles", arrays["dense_triangles"], torch.long)
            buffer("dense_barycentric", arrays["dense_barycentric"])
            buffer("dense_valid", arrays["dense_valid"], torch.bool)
        if "parent_ids" in arrays:
            buffer("parent_ids", arrays["parent_ids"], torch.long)
            indices = np.stack([arrays["upsample_rows"], arrays["upsample_cols"]])
            size = (int(arrays["upsample_rows"].max()) + 1, len(arrays["mean"]))
            self.register_buffer("upsample", torch.sparse_coo_tensor(
                torch.as_tensor(indices), torch.as_tensor(arrays["upsample_weights"]), size,
                check_invariants=True).coalesce(),
                persistent=False)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "FaceModel":
        arrays, meta = load_model(path)
        return cls(arrays, meta, **kwargs)

    # sizes -------------------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def num_shape(self) -> int:
        return self.shape_basis.shape[0]

    @property
    def num_expression(self) -> int:
        return self.expression_basis.shape[0]

    @property
    def num_albedo(self) -> int:
        return self.albedo_basis.shape[0]

    @property
    def regions(self) -> dict[str, torch.Tensor]:
        """Region name -> (V,) bool mask."""
        return {name: getattr(self, f"region_{name}") for name in self.region_names}

    # geometry ----------------------------------------------------------------------------------
    def forward(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None) -> torch.Tensor:
        """shape: (B,K) N(0,1) identity codes; expression: (B,E) blendshape weights or PCA codes.
        Either may be None (zeros). Returns vertices (B,V,3) float32, mm."""
        batch = _batch_size(shape, expression)
        vertices = self.mean.expand(batch, -1, -1)
        if shape is not None:
            vertices = vertices + torch.einsum("bk,kvd->bvd", self._check(shape, self.num_shape, "shape"), self.shape_basis)
        if expression is not None:
            vertices = vertices + torch.einsum(
                "be,evd->bvd", self._check(expression, self.num_expression, "expression"), self.expression_basis)
        return vertices

    def blendshape_weights(self, expression: torch.Tensor) -> torch.Tensor:
        """Expression codes (B,E) -> blendshape weights (B,E) (identity in the blendshape space)."""
        if self.expression_space == "blendshape":
            return expression
        return expression @ self.blendshape_from_pca.T

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B,V,3) -> (B,68,3) iBUG landmark positions."""
        return vertices[:, self.landmarks_68]

    def dense_landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B,V,3) -> (B,478,3) MediaPipe point positions (invalid iris points sit on the eyelid
        rim; mask them with ``dense_valid``)."""
        corners = vertices[:, self.triangles[self.dense_triangles]]  # (B,478,3,3)
        return torch.einsum("nk,bnkd->bnd", self.dense_barycentric, corners)

    def mirror_vertices(self, vertices: torch.Tensor) -> torch.Tensor:
        """The mirror image of a mesh in this topology: x -> -x and vertex ids through the mirror map."""
        flipped = vertices[:, self.mirror]
        return flipped * flipped.new_tensor([-1.0, 1.0, 1.0])

    def mouth_patch(self, vertices: torch.Tensor, inward_mm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Close the mouth opening with a fan around a derived centre vertex.

        Returns vertices (B,V+1,3) with the centre (the mean of the inner-lip loop, pushed
        `inward_mm` along -z so that the cavity sits behind the lips) appended, and the patch
        triangles (L,3) that index them. Only for the mouth mask; not part of colour renders.
        """
        centre = vertices[:, self.mouth_loop].mean(dim=1, keepdim=True)
        centre = centre - centre.new_tensor([0.0, 0.0, inward_mm])
        loop = self.mouth_loop
        centre_id = torch.full_like(loop, self.num_vertices)
        # boundary loops run along the mesh triangles' edges; the patch uses them reversed
        patch = torch.stack([loop, loop.roll(1), centre_id], dim=1)
        return torch.cat([vertices, centre], dim=1), patch

    # appearance --------------------------------------------------------------------------------
    def albedo(self, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """coeffs: (B,A) N(0,1) -> diffuse albedo (B,V,3), linear RGB (not clamped)."""
        return self._appearance(self.albedo_mean, self.albedo_basis, coeffs)

    def specular(self, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """coeffs: (B,A), the same vector as for ``albedo`` -> specular albedo (B,V,3)."""
        if not hasattr(self, "specular_basis"):
            raise AttributeError(f"face model {self.meta['name']!r} has no specular albedo")
        return self._appearance(self.specular_mean, self.specular_basis, coeffs)

    def _appearance(self, mean: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor | None) -> torch.Tensor:
        if coeffs is None:
            return mean[None]
        return mean + torch.einsum("bk,kvc->bvc", self._check(coeffs, len(basis), "albedo"), basis)

    def upsample_to_parent(self, values: torch.Tensor) -> torch.Tensor:
        """Coarse levels only: per-vertex values (B,V,C) -> (B,V_parent,C) by barycentric weights."""
        if not hasattr(self, "upsample"):
            raise AttributeError(f"face model {self.meta['name']!r} is not a coarse level")
        batch, _, channels = values.shape
        flat = values.permute(1, 0, 2).reshape(self.num_vertices, batch * channels)
        fine = torch.sparse.mm(self.upsample, flat)
        return fine.reshape(-1, batch, channels).permute(1, 0, 2)

    @staticmethod
    def _check(tensor: torch.Tensor, expected: int, what: str) -> torch.Tensor:
        if tensor.ndim != 2 or tensor.shape[1] != expected:
            raise ValueError(f"{what} coefficients must be (B,{expected}), got {tuple(tensor.shape)}")
        return tensor

    def extra_repr(self) -> str:
        return (f"name={self.meta.get('name')!r}, vertices={self.num_vertices}, shape={self.num_shape}, "
                f"expression={self.num_expression} ({self.expression_space}), albedo={self.num_albedo}")


def _batch_size(*tensors: torch.Tensor | None) -> int:
    sizes = {t.shape[0] for t in tensors if t is not None}
    if len(sizes) > 1:
        raise ValueError(f"batch sizes differ: {sorted(sizes)}")
    return sizes.pop() if sizes else 1
