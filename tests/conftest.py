"""Shared fixtures. Tests never download: FACELAB_OFFLINE=1 for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["FACELAB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("FACELAB_ASSETS") or REPO.parent / "shared" / "assets")
if "FACELAB_ASSETS" not in os.environ and MIRROR.is_dir():
    os.environ["FACELAB_ASSETS"] = str(MIRROR)


def _load(name: str):
    from facelab.assets import AssetNotFoundError
    from facelab.facemodel import load_face_model

    try:
        return load_face_model(name)
    except AssetNotFoundError as error:
        pytest.skip(f"face model assets unavailable: {error}")


@pytest.fixture(scope="session")
def full_model():
    """The ``ict-face`` model (built into the user cache on first use, about 4 s)."""
    return _load("ict-face")


@pytest.fixture(scope="session")
def lite_model(full_model):
    """The ``ict-face-lite`` model (decimated on first use, about 20 s)."""
    return _load("ict-face-lite")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The shared annotated photos (research-only, never copied into the project)."""
    folder = MIRROR / "faces"
    if not folder.is_dir():
        pytest.skip(f"shared photos unavailable at {folder}")
    return folder


@pytest.fixture(scope="session")
def specular_checkpoint(lite_model, tmp_path_factory) -> Path:
    """An untrained ``specular`` checkpoint (resnet18, 64 px, ict-face-lite) in the layout
    ``facelab train`` writes: its zero head predicts the mean face at the default pose and light,
    centred in the crop. About 1 s; no training."""
    import torch

    from facelab.config import compose
    from facelab.methods import get_method

    cfg = compose(["logger=csv", "trainer=cpu", "method=specular", "method.losses.id.weight=0"])
    torch.manual_seed(0)
    method = get_method("specular")(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "specular.ckpt"
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": dict(method.hparams),
                "global_step": 0}, path)
    return path
