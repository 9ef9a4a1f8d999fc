"""LPIPS perceptual distance (Zhang et al. 2018, VGG variant), loaded from a local safetensors file.

Nothing is downloaded. The file holds torchvision's VGG16 ``features.N.weight/bias`` tensors and
LPIPS' five linear heads as ``linK.weight`` (the ``lpips`` package names them ``linK.model.1.weight``;
both spellings load). Converting once on a machine with both packages::

    import lpips, torch, safetensors.torch as st
    m = lpips.LPIPS(net="vgg")
    sd = {f"features.{k}": v for k, v in m.net.state_dict().items()}  # slices -> features.N
    sd |= {k: v for k, v in m.state_dict().items() if k.startswith("lin")}
    st.save_file({k: v.contiguous() for k, v in sd.items()}, "lpips_vgg.safetensors")
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# (torchvision VGG16 `features` index of each conv, its channels); ReLU follows each conv, max-pool
# sits at 4, 9, 16, 23. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
          (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
_POOLS = (4, 9, 16, 23)
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(torch.nn.Module):
    """d(x, y) = Σ_l mean_hw || w_l ⊙ (φ̂_l(x) - φ̂_l(y)) ||², φ̂ unit-normalised over channels; x, y in [-1, 1]."""

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Identity() for _ in range(30)]
        for idx, cin, cout in _CONVS:
            layers[idx] = torch.nn.Conv2d(cin, cout, 3, padding=1)
            layers[idx + 1] = torch.nn.ReLU()
        for idx in _POOLS:
            layers[idx] = torch.nn.MaxPool2d(2, 2)
        self.features = torch.nn.Sequential(*layers)
        for k, ch in enumerate(_CHANNELS):
            self.add_module(f"lin{k}", torch.nn.Conv2d(ch, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path | None) -> "LPIPS":
        if path is None:
            raise ValueError("the perceptual (LPIPS) term needs its network weights: set train.lpips_path to a "
                             "local safetensors file (see autoencoder/perceptual.py for the format), or set "
                             "train.perceptual_weight=0")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train.lpips_path={str(path)!r} does not exist")
        from safetensors.torch import load_file

        state = {re.sub(r"^(lin\d)\.model\.1\.", r"\1.", k): v for k, v in load_file(path).items()}
        model = cls()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise ValueError(f"{str(path)!r} is not an LPIPS-VGG file: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        return model

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,)."""
        total = 0.0
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y), strict=True)):
            total = total + getattr(self, f"lin{k}")((fx - fy).square()).mean(dim=(1, 2, 3))
        return total
