"""The shared face model layer: file format, converters, FaceModel and the albedo prior.

>>> from facelab.facemodel import load_face_model
>>> model = load_face_model("ict-face-lite")   # built and cached on first use
>>> vertices = model(shape, expression)         # (B,V,3) mm
"""

from __future__ import annotations

from .build import build_face_model, model_path
from .derive import IBUG_MIRROR_68
from .model import FaceModel

NAMES = ("ict-face", "ict-face-lite")


def load_face_model(name: str = "ict-face-lite", region: str = "face", **kwargs) -> FaceModel:
    """Build the model on first use (cached), then load it. kwargs go to FaceModel
    (expression_space, n_shape, n_expression, n_albedo)."""
    return FaceModel.from_file(build_face_model(name, region=region), **kwargs)


__all__ = ["FaceModel", "load_face_model", "build_face_model", "model_path", "IBUG_MIRROR_68", "NAMES"]
