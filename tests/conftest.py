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
