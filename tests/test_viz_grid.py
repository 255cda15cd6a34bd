"""Logging pictures of facelab.viz.grid: normal colours, overlays, landmark dots, grid geometry, PNG output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from facelab.viz.grid import (
    HEADER_HEIGHT,
    SEPARATOR,
    SEPARATOR_VALUE,
    draw_landmarks,
    image_grid,
    normals_to_rgb,
    overlay,
    save_png,
)


def test_normals_facing_camera_map_to_light_blue_and_background_stays_black():
    normals = torch.zeros(2, 3, 8, 8)
    normals[:, 2, 2:6, 2:6] = 1.0
    rgb = normals_to_rgb(normals.requires_grad_())
    assert rgb.shape == (2, 3, 8, 8) and not rgb.requires_grad
    torch.testing.assert_close(rgb[:, :, 3, 3], torch.tensor([[0.5, 0.5, 1.0]] * 2))
    assert rgb[:, :, 0, 0].abs().max() == 0 and rgb[:, :, 7, 7].abs().max() == 0


def test_overlay_with_alpha_zero_keeps_input_and_full_alpha_full_opacity_gives_render():
    generator = torch.Generator().manual_seed(0)
    image, render = torch.rand(2, 3, 6, 5, generator=generator), torch.rand(2, 3, 6, 5, generator=generator)
    torch.testing.assert_close(overlay(image, render, torch.zeros(2, 1, 6, 5)), image)
    torch.testing.assert_close(overlay(image, render, torch.ones(2, 1, 6, 5), opacity=1.0), render)
    half = overlay(image, render, torch.ones(2, 1, 6, 5), opacity=0.5)
    torch.testing.assert_close(half, 0.5 * (image + render))


def test_landmark_at_pixel_centre_colours_that_array_pixel():
    images = torch.zeros(2, 3, 40, 30)
    points = torch.tensor([[[10.5, 20.5]], [[3.5, 5.5]]])
    drawn = draw_landmarks(images, points, color=(0.2, 1.0, 0.6))
    assert drawn.shape == images.shape
    torch.testing.assert_close(drawn[0, :, 20, 10], torch.tensor([51, 255, 153]) / 255.0)
    torch.testing.assert_close(drawn[1, :, 5, 3], torch.tensor([51, 255, 153]) / 255.0)
    assert drawn[0, :, 5, 3].max() == 0  # each sample gets only its own points
    assert drawn[0, :, 30:, :].max() == 0 and images.max() == 0  # dots stay local; the input is untouched


def test_reference_points_drawn_in_their_own_colour_under_the_prediction():
    images = torch.zeros(1, 3, 40, 40)
    points, reference = torch.tensor([[[10.5, 10.5]]]), torch.tensor([[[30.5, 30.5], [10.5, 10.5]]])
    drawn = draw_landmarks(images, points, reference=reference, radius=2)
    torch.testing.assert_close(drawn[0, :, 30, 30], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(drawn[0, :, 10, 10], torch.tensor([0.0, 1.0, 0.0]))


def test_grid_size_counts_rows_columns_header_and_separators_and_places_cells():
    batch, height, width = 3, 16, 24
    columns = {f"c{i}": torch.full((batch, 3, height, width), 0.0) for i in range(3)}
    for c, images in enumerate(columns.values()):
        for r in range(batch):
            images[r] = (10 * (c + 1) + r) / 255.0
    columns["mask"] = torch.full((batch, 1, height, width), 200 / 255.0)  # single channel, replicated
    grid = image_grid(columns, max_rows=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (HEADER_HEIGHT + 2 * height + SEPARATOR, 4 * width + 3 * SEPARATOR, 3)
    for c in range(4):
        for r in range(2):
            y, x = HEADER_HEIGHT + r * (height + SEPARATOR), c * (width + SEPARATOR)
            cell = grid[y:y + height, x:x + width]
            expected = 200 if c == 3 else 10 * (c + 1) + r
            assert (cell == expected).all(), (r, c)
    assert (grid[HEADER_HEIGHT:, width:width + SEPARATOR] == SEPARATOR_VALUE).all()
    assert (grid[HEADER_HEIGHT + height:HEADER_HEIGHT + height + SEPARATOR] == SEPARATOR_VALUE).all()
    assert grid[:HEADER_HEIGHT, :width].max() > 0  # the column name is written in the header

    plain = image_grid(columns, max_rows=8, label=False)
    assert plain.shape == (3 * height + 2 * SEPARATOR, 4 * width + 3 * SEPARATOR, 3)
    assert (plain[:height, :width] == 10).all()


@pytest.mark.parametrize("shape", [(3, 3, 16, 20), (3, 3, 12, 24), (2, 3, 16, 24), (3, 2, 16, 24)])
def test_mismatched_column_raises_value_error_naming_it(shape):
    columns = {"input": torch.zeros(3, 3, 16, 24), "render": torch.zeros(*shape)}
    with pytest.raises(ValueError, match="render"):
        image_grid(columns)


def test_save_png_round_trips_through_cv2_imread(tmp_path):
    generator = np.random.default_rng(0)
    array = generator.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    array[0, 0] = (255, 0, 0)  # pure red in RGB
    path = save_png(array, tmp_path / "nested" / "dir" / "preview.png")
    assert path.is_file() and path.suffix == ".png"
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert tuple(back[0, 0]) == (0, 0, 255)  # cv2 reads BGR
    np.testing.assert_array_equal(back[..., ::-1], array)
