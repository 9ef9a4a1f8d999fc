"""LPIPS loads only from a local file, says clearly when none is given, and behaves as a distance."""

import pytest
import torch
from safetensors.torch import save_file

from autoencoder.perceptual import LPIPS


def _weights_file(tmp_path, lpips_naming=False):
    torch.manual_seed(0)
    model = LPIPS()
    state = {}
    for k, v in model.state_dict().items():
        if k in ("shift", "scale"):
            continue
        if k.startswith("lin"):
            v = v.abs()  # LPIPS heads are non-negative
            if lpips_naming:
                k = k.replace(".weight", ".model.1.weight")
        state[k] = v.contiguous()
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(state, path)
    return path


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lpips_path"):
        LPIPS.from_file(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LPIPS.from_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an LPIPS-VGG file"):
        LPIPS.from_file(bad)


@pytest.mark.parametrize("lpips_naming", [False, True])
def test_distance_properties(tmp_path, lpips_naming):
    model = LPIPS.from_file(_weights_file(tmp_path, lpips_naming))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    near = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    far = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(model(x, x), torch.zeros(2))
    assert (model(x, near) > 0).all() and (model(x, far) > model(x, near)).all()
