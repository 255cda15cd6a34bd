"""ParameterEncoder: named groups, a zero first prediction, any timm backbone, local checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch

from facelab.nets.encoder import ParameterEncoder

GROUPS = {"shape": 5, "expression": 3, "pose": 7}


def test_groups_come_out_by_name_and_the_first_prediction_is_zero():
    encoder = ParameterEncoder("resnet18", GROUPS)
    params = encoder(torch.rand(2, 3, 64, 64))
    assert {name: tuple(value.shape) for name, value in params.items()} == {"shape": (2, 5), "expression": (2, 3),
                                                                           "pose": (2, 7)}
    assert all(float(value.detach().abs().max()) == 0.0 for value in params.values())


def test_the_head_learns_while_backbone_gradients_flow():
    encoder = ParameterEncoder("resnet18", GROUPS)
    params = encoder(torch.rand(2, 3, 64, 64))
    (params["pose"] - 1.0).square().sum().backward()
    assert encoder.head.weight.grad.abs().sum() > 0  # the zero head still has a gradient
    first_layer = next(encoder.backbone.parameters())
    assert first_layer.grad is not None  # zero head weights: backbone gradients are exactly zero at step 0
    torch.optim.SGD(encoder.parameters(), lr=0.1).step()
    params = encoder(torch.rand(2, 3, 64, 64))
    params["pose"].sum().backward()
    assert first_layer.grad.abs().sum() > 0


def test_split_is_the_inverse_of_concatenating_the_groups():
    encoder = ParameterEncoder("resnet18", GROUPS)
    flat = torch.arange(30.0).reshape(2, 15)
    parts = encoder.split(flat)
    torch.testing.assert_close(torch.cat(list(parts.values()), dim=-1), flat)
    assert parts["expression"][0].tolist() == [5.0, 6.0, 7.0]


def test_a_local_checkpoint_loads_with_a_prefix_and_bad_ones_are_clear_errors(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": {f"backbone.{key}": value for key, value in source.state_dict().items()}}, path)
    encoder = ParameterEncoder("resnet18", GROUPS, checkpoint=path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(encoder.backbone.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ParameterEncoder("resnet18", GROUPS, checkpoint=tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("resnet34", pretrained=False, num_classes=0).state_dict(), other)
    with pytest.raises(ValueError, match="shapes differ|lacks|has [0-9]+ weights this backbone lacks"):
        ParameterEncoder("resnet18", GROUPS, checkpoint=other)


def test_unknown_backbone_and_bad_input_are_clear_errors():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet5000'"):
        ParameterEncoder("resnet5000", GROUPS)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        ParameterEncoder("resnet18", GROUPS)(torch.rand(2, 64, 64))
