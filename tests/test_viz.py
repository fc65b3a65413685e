import numpy as np
import torch

from noisecraft.viz.images import DenoisingRecorder, make_grid, to_uint8


def test_to_uint8_matches_diffusers_rounding():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 2.0]).view(1, 1, 1, 6)
    # pixels are round(clamp(x / 2 + 0.5, 0, 1) * 255)
    assert to_uint8(x).ravel().tolist() == [0, 64, 128, 166, 255, 255]


def test_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 3), v) for v in (-1.0, 0.0, 1.0)])
    g = make_grid(imgs, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert g[1, 1, 0] == 0 and g[1, 5, 0] == 128 and g[4, 1, 0] == 255
    assert g[0].max() == 0  # padding is black


def test_recorder_frames_put_xt_and_x0_side_by_side():
    rec = DenoisingRecorder(nrow=1)
    x0 = torch.zeros(1, 1, 4, 4)
    rec({"i": 0, "x": torch.full((1, 1, 4, 4), 3.0), "sigma": torch.tensor(2.0), "denoised": x0})
    frame = rec.frames[0]
    assert frame.shape == (8, 8 + 6 + 8, 1)  # two 4x4 grids with 2 px padding, 6 px gap
    # left: x_t scaled back to unit variance, 3 / sqrt(5) -> clamped to 1 -> 255
    assert frame[3, 3, 0] == 255
    assert frame[3, 8 + 6 + 3, 0] == 128  # right: x0_hat = 0
    rec(
        {
            "i": 1,
            "x": torch.zeros(1, 1, 4, 4),
            "sigma": torch.tensor(0.0),
            "denoised": x0,
            "batch": 1,
        }
    )
    assert len(rec.frames) == 1  # other batches are ignored
    assert np.all(frame[:, 8:14] == 255)
