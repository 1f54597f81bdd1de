"""BEVGrid validation, (de)serialisation and feature resampling between grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.errors import ConfigError
from pipelines.grid import BEVGrid, resample


def test_square_grid_shape_centres_and_description():
    grid = BEVGrid.square(51.2, 128)
    assert grid.shape == (128, 128)
    assert grid.cell_size == pytest.approx((0.8, 0.8))
    assert grid.describe() == "x -51.2..51.2 m, y -51.2..51.2 m at 128x128 (0.8 m cells)"


def test_rectangular_grid_rows_follow_y_and_columns_follow_x():
    grid = BEVGrid(x_range=(0.0, 4.0), y_range=(-1.0, 1.0), cell_size=(1.0, 0.5))
    assert grid.shape == (4, 4)
    centres = grid.cell_centers
    assert centres.shape == (4, 4, 2) and centres.dtype == np.float32
    np.testing.assert_allclose(centres[0, 0], [0.5, -0.75])
    np.testing.assert_allclose(centres[0, :, 0], [0.5, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(centres[:, 0, 1], [-0.75, -0.25, 0.25, 0.75])
    assert "0.5" in grid.describe() and "4x4" in grid.describe()


def test_world_to_cell_puts_centres_on_integers():
    grid = BEVGrid(x_range=(0.0, 4.0), y_range=(-1.0, 1.0), cell_size=(1.0, 0.5))
    np.testing.assert_allclose(grid.world_to_cell(grid.cell_centers)[2, 3], [3.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(grid.world_to_cell([[0.0, -1.0], [4.0, 1.0]]), [[-0.5, -0.5], [3.5, 3.5]])
    out = grid.world_to_cell(torch.tensor([[2.0, 0.0]]))
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.5]]))


def test_dict_round_trip_through_json():
    grid = BEVGrid(x_range=(-54.0, 54.0), y_range=(-54.0, 54.0), cell_size=(0.6, 0.6))
    d = json.loads(json.dumps(grid.to_dict()))
    assert d == {"x_range": [-54.0, 54.0], "y_range": [-54.0, 54.0], "cell_size": [0.6, 0.6]}
    again = BEVGrid.from_dict(d)
    assert again == grid and again.shape == (180, 180)
    assert hash(again) == hash(grid)


def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match=r"unknown keys \['voxel'\].*missing keys \['cell_size'\]"):
        BEVGrid.from_dict({"x_range": [-1, 1], "y_range": [-1, 1], "voxel": [0.5, 0.5]})


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"x_range": (1.0, -1.0)}, "x_range.*min < max"),
        ({"y_range": (0.0, 0.0)}, "y_range.*min < max"),
        ({"cell_size": (0.0, 0.5)}, "cell_size.*> 0"),
        ({"cell_size": (0.5, -1.0)}, "cell_size.*> 0"),
        ({"cell_size": (0.3, 0.5)}, "x_range.*6.66667 cells.*whole number"),
        ({"x_range": (-1.0,)}, "x_range.*two numbers"),
        ({"y_range": ("a", "b")}, "y_range.*two numbers"),
    ],
)
def test_bad_grids_raise_config_error(kwargs, pattern):
    fields = {"x_range": (-1.0, 1.0), "y_range": (-1.0, 1.0), "cell_size": (0.5, 0.5)} | kwargs
    with pytest.raises(ConfigError, match=pattern):
        BEVGrid(**fields)


def test_same_range_ignores_resolution():
    assert BEVGrid.square(51.2, 128).same_range(BEVGrid.square(51.2, 50))
    assert not BEVGrid.square(51.2, 128).same_range(BEVGrid.square(54.0, 128))


@pytest.mark.parametrize(("src_size", "dst_size"), [(128, 50), (50, 128), (180, 128)])
def test_resample_constant_field_is_exact_for_same_range(src_size, dst_size):
    src, dst = BEVGrid.square(51.2, src_size), BEVGrid.square(51.2, dst_size)
    features = np.full((2, 3, src_size, src_size), 1.7, dtype=np.float32)
    out = resample(features, src, dst)
    assert out.shape == (2, 3, dst_size, dst_size)
    np.testing.assert_allclose(out, 1.7, rtol=1e-6, atol=1e-6)


def test_resample_is_identity_when_grids_are_equal_and_does_not_alias():
    grid = BEVGrid.square(51.2, 16)
    features = torch.randn(2, 4, 16, 16)
    out = resample(features, grid, BEVGrid.from_dict(grid.to_dict()))
    torch.testing.assert_close(out, features, atol=1e-6, rtol=0)
    out += 1.0
    assert not torch.allclose(out, features)


def test_resample_reproduces_a_linear_ramp_when_upsampling():
    src, dst = BEVGrid.square(8.0, 8), BEVGrid.square(8.0, 32)
    ramp = np.broadcast_to(src.cell_centers[..., 0], (1, 8, 8)).copy()  # value = x in metres
    out = resample(ramp, src, dst)
    expected = dst.cell_centers[..., 0]
    interior = np.abs(expected) <= 8.0 - src.cell_size[0] / 2  # between the outer src cell centres
    np.testing.assert_allclose(out[0][interior], expected[interior], atol=1e-5)
    # Outside the outer src centres the border value holds.
    np.testing.assert_allclose(out[0][~interior], np.sign(expected[~interior]) * 7.0, atol=1e-5)


def test_resample_zeroes_cells_outside_the_source_range():
    src = BEVGrid.square(4.0, 8)
    dst = BEVGrid(x_range=(-8.0, 8.0), y_range=(-4.0, 4.0), cell_size=(1.0, 1.0))
    out = resample(np.ones((1, 8, 8), dtype=np.float64), src, dst)
    assert out.shape == (1, 8, 16) and out.dtype == np.float64
    np.testing.assert_array_equal(out[0, :, :4], 0.0)
    np.testing.assert_array_equal(out[0, :, 12:], 0.0)
    np.testing.assert_allclose(out[0, :, 4:12], 1.0, atol=1e-12)


def test_resample_keeps_kind_dtype_and_leading_dims():
    src, dst = BEVGrid.square(4.0, 8), BEVGrid.square(4.0, 4)
    numpy_in = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    numpy_out = resample(numpy_in, src, dst)
    assert isinstance(numpy_out, np.ndarray) and numpy_out.dtype == np.float32
    assert numpy_out.shape == (3, 4, 4)
    torch_out = resample(torch.from_numpy(numpy_in).to(torch.float64), src, dst)
    assert isinstance(torch_out, torch.Tensor) and torch_out.dtype == torch.float64
    np.testing.assert_allclose(torch_out.numpy(), numpy_out, atol=1e-6)
    half = resample(torch.ones(2, 5, 1, 8, 8, dtype=torch.bfloat16), src, dst)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 5, 1, 4, 4)
    # Halving by an integer factor samples between the four src cells: their mean.
    expected = numpy_in.reshape(3, 4, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(numpy_out, expected, atol=1e-5)


def test_resample_rejects_features_that_do_not_match_the_source_grid():
    with pytest.raises(ValueError, match="do not match src grid"):
        resample(np.zeros((1, 8, 9)), BEVGrid.square(4.0, 8), BEVGrid.square(4.0, 4))


def test_resample_averages_whole_blocks_at_integer_downsampling_ratios():
    src, dst = BEVGrid.square(51.2, 128), BEVGrid.square(51.2, 32)
    features = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = resample(features, src, dst)
    torch.testing.assert_close(out, F.avg_pool2d(features, 4), rtol=0, atol=1e-12)
    # Point sampling would have read the middle 2×2 of each 4×4 block only.
    middle = features.reshape(2, 3, 32, 4, 32, 4)[:, :, :, 1:3, :, 1:3].mean(dim=(3, 5))
    assert (out - middle).abs().max() > 0.1
    # A single bright src cell counts 1/16 in its dst cell wherever it sits in the block (no aliasing).
    for row, col in ((0, 0), (1, 2), (3, 3)):
        spike = torch.zeros(1, 128, 128, dtype=torch.float64)
        spike[0, 8 + row, 12 + col] = 16.0
        pooled = resample(spike, src, dst)
        assert pooled[0, 2, 3].item() == pytest.approx(1.0) and pooled.sum().item() == pytest.approx(1.0)


def test_resample_pools_unequal_factors_per_axis():
    src = BEVGrid(x_range=(-8.0, 8.0), y_range=(-4.0, 4.0), cell_size=(0.5, 1.0))   # 8 rows x 32 cols
    dst = BEVGrid(x_range=(-8.0, 8.0), y_range=(-4.0, 4.0), cell_size=(2.0, 2.0))   # 4 rows x 8 cols
    features = np.random.default_rng(1).normal(size=(5, 8, 32)).astype(np.float32)
    out = resample(features, src, dst)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (5, 4, 8)
    np.testing.assert_allclose(out, features.reshape(5, 4, 2, 8, 4).mean(axis=(2, 4)), atol=1e-6)


@pytest.mark.parametrize(("src_size", "dst_size"), [(180, 128), (50, 128), (32, 128), (128, 48)])
def test_resample_samples_bilinearly_when_the_ratio_is_not_an_integer_reduction(src_size, dst_size):
    src, dst = BEVGrid.square(51.2, src_size), BEVGrid.square(51.2, dst_size)
    features = torch.randn(1, 2, src_size, src_size, generator=torch.Generator().manual_seed(2))
    centres = (torch.arange(dst_size, dtype=torch.float64) + 0.5) / dst_size * 2 - 1   # normalised dst centres
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)[None].float()
    expected = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(resample(features, src, dst), expected, rtol=0, atol=1e-5)
