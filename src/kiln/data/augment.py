"""Batch-time image augmentation on the training device, vectorised over the batch.

Random resized crop, rotation and horizontal flip compose into one 2×3 affine matrix per image,
applied in a single `affine_grid` + `grid_sample` pass (bilinear; outside the image is black);
color jitter (brightness, contrast, saturation) is a few elementwise operations. The random
parameters are drawn on the CPU from the generator the loader passes, so a batch is the same on any
device and after a resume; only the warp itself runs on the device that holds the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.config import AugmentConfig

# ITU-R 601 luma weights: the grayscale that contrast and saturation jitter blend towards.
_LUMA = (0.299, 0.587, 0.114)


class BatchAugment:
    def __init__(self, cfg: AugmentConfig, channels: int) -> None:
        self.cfg, self.channels = cfg, channels

    def _uniform(self, n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    def matrices(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 2, 3) affine matrices mapping output coordinates ([-1, 1]²) to input coordinates:
        input = center + R(angle) · diag(flip · crop_w, crop_h) · output."""
        c = self.cfg
        area = self._uniform(n, c.crop_scale, 1.0, gen)
        log_ratio = self._uniform(n, -math.log(c.crop_ratio), math.log(c.crop_ratio), gen)
        w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop width as a share of the image width
        h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        cx = self._uniform(n, -1.0, 1.0, gen) * (1 - w)  # the crop stays inside the image
        cy = self._uniform(n, -1.0, 1.0, gen) * (1 - h)
        angle = torch.deg2rad(self._uniform(n, -c.rotation, c.rotation, gen))
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double() if c.flip else torch.ones(n).double()
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([w * flip * cos, -h * sin, cx], -1),
                             torch.stack([w * flip * sin, h * cos, cy], -1)], 1)
        return theta.float()

    def jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and (RGB) saturation, each scaled by a factor in [1 - j, 1 + j]."""
        j, n = self.cfg.jitter, x.shape[0]

        def factor() -> torch.Tensor:
            return self._uniform(n, 1 - j, 1 + j, gen).float().to(x.device).view(n, 1, 1, 1)

        x = x * factor()
        gray = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True) if self.channels == 3 else x
        mean = gray.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean
        if self.channels == 3:
            gray = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = (x - gray) * factor() + gray
        return x.clamp(0.0, 1.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment float images (B, C, H, W) in [0, 1] on their own device."""
        theta = self.matrices(x.shape[0], gen).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.jitter(x, gen) if self.cfg.jitter > 0 else x
