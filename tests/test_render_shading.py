"""SH lighting and shading of facelab.render.lighting / facelab.render.shading against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from facelab.render.lighting import (
    DEFAULT_SH_DC,
    mono_to_rgb,
    sh_basis,
    sh_from_directional,
    sh_irradiance,
)
from facelab.render.shading import blinn_phong, gamma_decode, gamma_encode, lambertian, shade


def sphere(count: int, dtype=torch.float32) -> torch.Tensor:
    """(1,count,3) unit normals spread evenly over the sphere (Fibonacci lattice)."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1 - 2 * index / count
    azimuth = math.pi * (1 + 5**0.5) * index
    radius = (1 - z * z).sqrt()
    return torch.stack([radius * azimuth.cos(), radius * azimuth.sin(), z], -1)[None].to(dtype)


def unit(*xyz: float, dtype=torch.float32) -> torch.Tensor:
    vector = torch.tensor([xyz], dtype=dtype)
    return vector / vector.norm(dim=-1, keepdim=True)


def test_basis_constants_follow_ramamoorthi_hanrahan_order():
    x, y, z = 0.48, 0.6, 0.64  # unit
    expected = [0.886227, 1.023328 * y, 1.023328 * z, 1.023328 * x, 0.858086 * x * y, 0.858086 * y * z,
                0.247708 * (3 * z * z - 1), 0.858086 * x * z, 0.429043 * (x * x - y * y)]
    torch.testing.assert_close(sh_basis(torch.tensor([x, y, z])), torch.tensor(expected), atol=2e-6, rtol=0)


def test_irradiance_of_environment_one_plus_z_is_pi_plus_two_pi_thirds_nz():
    normals = sphere(2000)
    sh = torch.zeros(1, 1, 9)
    sh[0, 0, 0] = 1 / 0.282095  # radiance L(w) = 1 + w_z projected: c_00 = sqrt(4 pi), c_10 = sqrt(4 pi / 3)
    sh[0, 0, 2] = 1 / 0.488603
    expected = math.pi + 2 * math.pi / 3 * normals[..., 2:]
    torch.testing.assert_close(sh_irradiance(normals, sh), expected, atol=2e-5, rtol=0)


def test_default_dc_alone_gives_unit_irradiance_everywhere():
    assert DEFAULT_SH_DC == pytest.approx(1 / 0.886227, rel=1e-6)
    sh = torch.zeros(2, 3, 9)
    sh[..., 0] = DEFAULT_SH_DC
    normals = sphere(500).expand(2, -1, -1)
    torch.testing.assert_close(sh_irradiance(normals, sh), torch.ones(2, 500, 3))


def test_directional_light_approximates_clamped_cosine_within_three_band_error():
    normals = sphere(20000)
    direction = unit(0.3, -0.5, 0.8)
    irradiance = sh_irradiance(normals, sh_from_directional(direction, torch.ones(1, 1)))[0, :, 0]
    exact = (normals[0] @ direction[0]).clamp_min(0)
    assert (irradiance - exact).abs().mean() < 0.05
    brightest = normals[0, irradiance.argmax()]
    assert torch.rad2deg(torch.arccos((brightest @ direction[0]).clamp(max=1))) < 2.0
    # Colour and scale pass straight through: irradiance is linear in the intensity.
    coloured = sh_irradiance(normals, sh_from_directional(direction * 3, torch.tensor([[2.0, 1.0, 0.5]])))
    torch.testing.assert_close(coloured, irradiance[None, :, None] * torch.tensor([2.0, 1.0, 0.5]))


def test_mono_to_rgb_copies_the_grey_light_to_each_channel():
    mono = torch.randn(2, 1, 9)
    rgb = mono_to_rgb(mono)
    assert rgb.shape == (2, 3, 9)
    normals = sphere(100).expand(2, -1, -1)
    torch.testing.assert_close(sh_irradiance(normals, rgb), sh_irradiance(normals, mono).expand(-1, -1, 3))


def highlight(normals, **kwargs):
    defaults = dict(light_direction=unit(0.5, 0.4, 0.7), view_direction=unit(0, 0, 1), shininess=200.0,
                    specular_albedo=torch.full((1, normals.shape[1], 1), 0.3),
                    light_color=torch.tensor([[0.9, 0.8, 0.7]]))
    return blinn_phong(normals, **{**defaults, **kwargs})


def test_blinn_phong_highlight_sits_at_half_vector_with_peak_albedo_times_light():
    normals = sphere(50000)
    light, view = unit(0.5, 0.4, 0.7), unit(0, 0, 1)
    half = (light + view) / (light + view).norm()
    specular = highlight(normals)
    brightest = normals[0, specular[0, :, 0].argmax()]
    assert torch.rad2deg(torch.arccos((brightest @ half[0]).clamp(max=1))) < 2.0
    peak = highlight(half[:, None, :], specular_albedo=torch.full((1, 1, 1), 0.3))
    torch.testing.assert_close(peak[0, 0], 0.3 * torch.tensor([0.9, 0.8, 0.7]))
    facing_away = (normals[0] @ light[0]) <= 0
    assert (specular[0, facing_away] == 0).all()


def test_blinn_phong_point_light_and_viewer_positions_equal_directions_they_imply():
    generator = torch.Generator().manual_seed(0)
    positions = torch.randn(1, 30, 3, generator=generator) * 20 + torch.tensor([0.0, 0.0, -500.0])
    normals = torch.nn.functional.normalize(torch.randn(1, 30, 3, generator=generator) + torch.tensor([0, 0, 2.0]),
                                            dim=-1)
    light_position, eye = torch.tensor([[200.0, 300.0, 0.0]]), torch.zeros(1, 3)
    by_position = highlight(normals, positions=positions, light_position=light_position, light_direction=None,
                            view_position=eye, view_direction=None, shininess=torch.tensor([10.0]),
                            specular_albedo=torch.full((1, 30, 3), 0.3))
    for index in range(0, 30, 7):  # compare a few points with the direction form
        point = positions[:, index]
        one = highlight(normals[:, index:index + 1], light_direction=light_position - point,
                        view_direction=eye - point, shininess=10.0, specular_albedo=torch.full((1, 1, 3), 0.3))
        torch.testing.assert_close(by_position[:, index], one[:, 0])
    with pytest.raises(ValueError, match="exactly one of light"):
        highlight(normals, light_position=light_position)


def test_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(1)
    normals = torch.nn.functional.normalize(torch.randn(2, 5, 3, generator=generator, dtype=torch.float64), dim=-1)
    sh = torch.randn(2, 3, 9, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(sh_irradiance, (normals.requires_grad_(), sh.requires_grad_()))

    light = unit(0.3, 0.2, 0.9, dtype=torch.float64).expand(2, 3)
    view = unit(0.0, 0.0, 1.0, dtype=torch.float64).expand(2, 3)
    half = torch.nn.functional.normalize(light + view, dim=-1)
    # Normals near the half vector, so every point is lit (n.l > 0) away from the kink.
    near = torch.nn.functional.normalize(half[:, None] + 0.3 * torch.randn(2, 5, 3, generator=generator,
                                                                           dtype=torch.float64), dim=-1)
    inputs = (near.requires_grad_(), light.clone().requires_grad_(), torch.tensor([8.0, 30.0], dtype=torch.float64,
              requires_grad=True), torch.rand(2, 5, 1, dtype=torch.float64, generator=generator).requires_grad_(),
              torch.rand(2, 3, dtype=torch.float64, generator=generator).requires_grad_())

    def specular(n, l, s, albedo, color):
        return blinn_phong(n, light_direction=l, view_direction=view, shininess=s, specular_albedo=albedo,
                           light_color=color)

    assert torch.autograd.gradcheck(specular, inputs)


def test_gamma_round_trip_and_finite_gradient_at_zero():
    values = torch.linspace(1e-3, 1.5, 200)
    torch.testing.assert_close(gamma_decode(gamma_encode(values)), values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gamma_encode(torch.tensor(0.25), gamma=2.0), torch.tensor(0.5))
    zero = torch.zeros(3, requires_grad=True)
    (gamma_encode(zero).sum() + gamma_decode(zero).sum()).backward()
    assert torch.isfinite(zero.grad).all()
    assert gamma_encode(torch.zeros(1)).item() < 1 / 2048  # the clamp is below 8-bit resolution


def test_gamma_encode_gradient_matches_finite_differences():
    values = torch.tensor([1e-3, 0.04, 0.5, 1.0, 1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gamma_encode(x, 2.2), (values,), check_forward_ad=True)


def test_shade_adds_sh_diffuse_and_optional_specular():
    normals = sphere(64)
    albedo = torch.rand(1, 64, 3)
    sh = torch.zeros(1, 1, 9)
    sh[..., 0] = DEFAULT_SH_DC
    torch.testing.assert_close(shade(albedo, normals, sh), albedo)
    torch.testing.assert_close(lambertian(albedo, sh_irradiance(normals, mono_to_rgb(sh))), albedo)
    specular = torch.full((1, 64, 1), 0.2)
    light = dict(light_direction=unit(0, 0, 1), view_direction=unit(0, 0, 1), shininess=16.0)
    torch.testing.assert_close(shade(albedo, normals, sh, specular, **light),
                               albedo + blinn_phong(normals, specular_albedo=specular, **light))
