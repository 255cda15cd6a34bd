"""Image encoders: a timm backbone, pooled, and one linear head that predicts named parameter
groups.

    encoder = ParameterEncoder("resnet50", {"shape": 100, "expression": 53, "pose": 7})
    params = encoder(images)          # {"shape": (B,100), "expression": (B,53), "pose": (B,7)}

The head starts at zero (weights and bias), so the first prediction is every group's zero: the
mean face, no expression, and whatever the method's offsets make of zero (identity pose, default
light). Backbones start from random weights: nothing is downloaded. A local checkpoint (a timm or
torchvision state dict, or a Lightning checkpoint whose keys carry a prefix) can be loaded with
``checkpoint=PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import timm
import torch
from torch import Tensor, nn


class ParameterEncoder(nn.Module):
    """images (B,3,H,W) float in [0,1] -> {group: (B,size)}.

    backbone: any timm model name; groups: name -> size, in output order; checkpoint: a local
    state dict for the backbone (None: random init); normalize: subtract ImageNet mean and
    divide by its std inside (what timm backbones and their checkpoints expect)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, backbone: str, groups: Mapping[str, int], checkpoint: str | Path | None = None,
                 normalize: bool = True):
        super().__init__()
        if not groups or any(int(size) < 1 for size in groups.values()):
            raise ValueError(f"groups must map names to positive sizes, got {dict(groups)}")
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise ValueError(f"unknown timm backbone {backbone!r} ({error}); see timm.list_models()") from error
        if checkpoint is not None:
            load_backbone_checkpoint(self.backbone, checkpoint)
        self.groups = {name: int(size) for name, size in groups.items()}
        self.head = nn.Linear(self.backbone.num_features, sum(self.groups.values()))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> Tensor:
        """(B,3,H,W) -> (B,F) pooled backbone features."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W), got {tuple(images.shape)}")
        if self.normalize:
            images = (images - self.mean) / self.std
        return self.backbone(images)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.split(self.head(self.features(images)))

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """(B,sum of sizes) -> {group: (B,size)}: the one place where the flat layout is sliced."""
        return dict(zip(self.groups, torch.split(flat, list(self.groups.values()), dim=-1)))


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load a local state dict into a backbone; keys may carry a prefix (``backbone.``,
    ``encoder.backbone.``, ``model.``, ``module.``), classifier weights are ignored. Missing
    file, no matching keys or mismatched shapes are clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist; give a local file (nothing is "
                                "downloaded here) or leave the checkpoint unset to start from random weights")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    matched, used = {}, set()
    for key, value in state.items():
        for prefix in ("", "backbone.", "encoder.backbone.", "model.", "module."):
            if key.startswith(prefix) and key[len(prefix):] in own:
                matched[key[len(prefix):]] = value
                used.add(key)
                break
    # weights meant for a backbone that this one lacks: a bigger sibling architecture
    wrapped = any(key.startswith(("backbone.", "encoder.backbone.")) for key in state)
    extra = [key for key in state if key not in used and not key.split(".")[-2:-1] == ["fc"]
             and not any(part in key for part in ("head.", "classifier."))
             and (key.startswith(("backbone.", "encoder.backbone.")) or not wrapped)]
    if not matched:
        raise ValueError(f"backbone checkpoint {path}: none of its {len(state)} keys match the backbone's "
                         f"(first: {next(iter(state), None)!r}, expected e.g. {next(iter(own), None)!r})")
    wrong = [key for key, value in matched.items() if value.shape != own[key].shape]
    if wrong:
        raise ValueError(f"backbone checkpoint {path}: shapes differ for {', '.join(wrong[:5])}"
                         f"{' ...' if len(wrong) > 5 else ''} (a different architecture?)")
    if matched and extra:
        raise ValueError(f"backbone checkpoint {path} has {len(extra)} weights this backbone lacks "
                         f"(first: {extra[0]!r}); is it the same architecture?")
    missing = sorted(set(own) - set(matched))
    if missing:
        raise ValueError(f"backbone checkpoint {path} lacks {len(missing)} backbone weights "
                         f"(first: {missing[0]!r}); is it the same architecture?")
    backbone.load_state_dict(matched)
