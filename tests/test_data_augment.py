"""Tests of pipeline.data.loading.augment_batch: Keras-style zoom and shear folded into the one affine
warp, off by default without changing the random stream of existing configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.loading import affine_theta, augment_batch

SIZE = 32
CENTRE = (SIZE - 1) / 2  # pixel-centre coordinate of the image centre (15.5)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _legacy_augment(x: torch.Tensor, cfg: dict, generator: torch.Generator) -> torch.Tensor:
    """augment_batch as it was before zoom/shear (rotation, shifts, flips), kept verbatim so the
    new code can be checked to reproduce existing runs exactly."""
    n = x.shape[0]
    rnd = torch.rand((n, 5), generator=generator)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(float(cfg.get("rotation", 0)))
    shift = float(cfg.get("shift", 0))
    tx, ty = (rnd[:, 1] * 2 - 1) * shift * 2, (rnd[:, 2] * 2 - 1) * shift * 2
    sx = torch.where((rnd[:, 3] < 0.5) & bool(cfg.get("hflip")), -1.0, 1.0)
    sy = torch.where((rnd[:, 4] < 0.5) & bool(cfg.get("vflip")), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1),
                         torch.stack([sin * sx, cos * sy, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _warp(x: torch.Tensor, *, zoom_w: float = 1.0, zoom_h: float = 1.0,
          shear_deg: float = 0.0) -> torch.Tensor:
    """Apply one fixed zoom/shear through affine_theta (no rotation, shift or flip)."""
    n = x.shape[0]
    zero, one = torch.zeros(n), torch.ones(n)
    theta = affine_theta(zero, zero, zero, one, one, one * zoom_w, one * zoom_h,
                         one * math.radians(shear_deg))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _centred_square(side: int = 8) -> torch.Tensor:
    x = torch.zeros(1, 1, SIZE, SIZE)
    lo = (SIZE - side) // 2
    x[..., lo:lo + side, lo:lo + side] = 1.0
    return x


def _extent(img: torch.Tensor) -> tuple[int, int]:
    """Width and height (pixels > 0.5) of the bright square through the image centre."""
    mid = SIZE // 2
    return int((img[mid, :] > 0.5).sum()), int((img[:, mid] > 0.5).sum())


def test_all_off_is_the_identity():
    x = torch.rand(3, 3, SIZE, SIZE)
    off = {"rotation": 0, "shift": 0.0, "hflip": False, "vflip": False, "zoom": 0.0, "shear": 0.0}
    torch.testing.assert_close(augment_batch(x, off, _gen()), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"zoom": 0.0, "shear": 0.0}, {"zoom": None}])
def test_zoom_and_shear_off_reproduce_the_former_augmentation_exactly(extra):
    # Same output bit for bit and the same random stream afterwards as before zoom/shear existed.
    cfg = {"rotation": 10, "shift": 0.1, "hflip": True, "vflip": True}
    x = torch.rand(4, 3, SIZE, SIZE)
    new_gen, old_gen = _gen(1), _gen(1)
    assert torch.equal(augment_batch(x, {**cfg, **extra}, new_gen),
                       _legacy_augment(x, cfg, old_gen))
    assert torch.equal(new_gen.get_state(), old_gen.get_state())


def test_zoom_factor_below_one_magnifies_a_centred_square():
    # Keras' convention: the factor scales the sampling grid, so 0.5 shows the image 2x larger.
    x = _centred_square(8)
    assert _extent(x[0, 0]) == (8, 8)
    assert _extent(_warp(x, zoom_w=0.5, zoom_h=0.5)[0, 0]) == (16, 16)
    assert _extent(_warp(x, zoom_w=0.5, zoom_h=1.0)[0, 0]) == (16, 8)  # width only
    assert _extent(_warp(x, zoom_w=2.0, zoom_h=2.0)[0, 0]) == (4, 4)


def test_augment_zoom_draws_width_and_height_factors_in_range():
    x = _centred_square(8).expand(16, 1, SIZE, SIZE).contiguous()
    cfg = {"zoom": 0.5}
    out = augment_batch(x, cfg, _gen(3))
    # Replay the draws: 5 numbers per image (rotation, shifts, flips), then the 2 zoom factors.
    gen = _gen(3)
    torch.rand((16, 5), generator=gen)
    factors = 1 + (torch.rand((16, 2), generator=gen) * 2 - 1) * 0.5
    assert ((factors >= 0.5) & (factors <= 1.5)).all()
    for img, (zw, zh) in zip(out[:, 0], factors.tolist()):
        width, height = _extent(img)
        assert abs(width - 8 / zw) <= 2 and abs(height - 8 / zh) <= 2
    widths = [_extent(img)[0] for img in out[:, 0]]
    assert max(widths) > 8 > min(widths)  # some images zoomed in, some out


def test_shear_moves_pixels_as_keras_computes_by_hand():
    # Keras' shear: output (row, col) reads input (row - sin(s) * col, cos(s) * col), with row
    # and col centred. Bilinear sampling reproduces a linear ramp exactly, so an image whose
    # value is its row index (or column index) shows where each output pixel was read from.
    rows = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE, 1).expand(1, 1, SIZE, SIZE)
    cols = rows.transpose(2, 3)
    x = torch.cat([rows, cols], 1)
    out = _warp(x, shear_deg=30.0)
    i, j = 16, 20  # centred row 0.5, centred col 4.5
    # row read: 0.5 - sin(30 deg) * 4.5 = -1.75 -> index 15.5 - 1.75 = 13.75
    assert out[0, 0, i, j].item() == pytest.approx(13.75, abs=1e-4)
    # col read: cos(30 deg) * 4.5 = 3.8971 -> index 19.3971
    assert out[0, 1, i, j].item() == pytest.approx(CENTRE + math.cos(math.pi / 6) * 4.5,
                                                   abs=1e-4)
    # half a pixel left of the centre (col -0.5) the read is 0.25 rows lower; further right,
    # higher
    assert out[0, 0, i, SIZE // 2 - 1].item() == pytest.approx(i + 0.25, abs=1e-4)
    assert out[0, 0, i, j + 4].item() < out[0, 0, i, j].item()


def test_shear_is_in_degrees():
    # train.augment.shear=0.2 (Keras shear_range=0.2) is a 0.2 degree shear: at most
    # sin(0.2 deg) * 15.5 = 0.054 px of displacement at this size, not 0.2 rad (3 px).
    rows = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE, 1).expand(8, 1, SIZE, SIZE)
    out = augment_batch(rows.contiguous(), {"shear": 0.2}, _gen(5))
    displacement = (out - rows).abs().max().item()
    assert 0 < displacement <= math.sin(math.radians(0.2)) * CENTRE + 1e-4


def test_deterministic_under_the_same_generator():
    cfg = {"rotation": 10, "shift": 0.1, "hflip": True, "vflip": False, "zoom": 0.2,
           "shear": 10.0}
    x = torch.rand(4, 3, SIZE, SIZE)
    first, again = augment_batch(x, cfg, _gen(7)), augment_batch(x, cfg, _gen(7))
    assert torch.equal(first, again)
    assert not torch.equal(first, augment_batch(x, cfg, _gen(8)))


def test_invalid_ranges_are_errors():
    x = torch.rand(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="0 <= zoom < 1"):
        augment_batch(x, {"zoom": 1.0}, _gen())
    with pytest.raises(ValueError, match="shear >= 0"):
        augment_batch(x, {"shear": -5}, _gen())
