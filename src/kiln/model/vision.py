"""Image classifiers: a vision transformer made of the language model's own `Transformer`, and a small CNN.

The ViT is the shared `Transformer` (its blocks, norms and RoPE, `causal=False`) with the token
embedding replaced by a patch embedding and the LM head read as the class head (`vocab_size` =
the number of classes): `model(pixel_values) -> (B, classes)`. Positions are a learned table over
the patch grid (RoPE then sees position 0 everywhere, which makes it the identity), or RoPE over
the patches' raster order, the one index per token the Transformer's rotary embedding takes. The
CNN is the baseline it is measured against. Both keep their stages in `layers`, so activation
checkpointing, compile and FSDP2 (`kiln.train.parallel`) wrap them like the language model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer
from kiln.model.weights import copy_into


@dataclass
class VisionSpec:
    """What a vision model is besides its `ModelConfig`: recorded in checkpoints, checked on resume."""

    arch: str  # vit | cnn
    image_size: int
    channels: int
    classes: int
    patch_size: int = 4
    pooling: str = "cls"  # cls | mean
    positions: str = "learned"  # learned | rope
    overlap: int = 0  # pixels each patch's window reaches into its neighbours, on every side

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Sequence length of the ViT: one token per patch, plus the class token."""
        return self.grid**2 + (self.pooling == "cls")

    def to_dict(self) -> dict:
        return asdict(self)


class VisionTransformer(Transformer):
    """ViT on the shared Transformer: patches → linear embedding (+ class token, + learned positions)
    → the Transformer's blocks, bidirectional → final norm → pooled → the head (`lm_head`, over classes)."""

    def __init__(self, cfg: ModelConfig, spec: VisionSpec) -> None:
        if cfg.causal or cfg.tie_embeddings or cfg.vocab_size != spec.classes:
            raise KilnError("a vision transformer needs model.causal=false, untied embeddings and one output per class")
        if spec.image_size % spec.patch_size:
            raise KilnError(f"vision.patch_size={spec.patch_size} does not divide the image size {spec.image_size}; "
                            "pick a divisor of data.images.size")
        if cfg.max_seq_len < spec.tokens:
            raise KilnError(f"model.max_seq_len={cfg.max_seq_len} is shorter than the {spec.tokens} patch tokens")
        super().__init__(cfg)
        self.spec = spec
        self.tok_emb = None  # the patch embedding takes its place
        window = spec.patch_size + 2 * spec.overlap
        self.patch_emb = nn.Linear(spec.channels * window**2, cfg.d_model, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if spec.pooling == "cls" else None
        self.pos_emb = nn.Parameter(torch.zeros(1, spec.tokens, cfg.d_model)) if spec.positions == "learned" else None

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, patches, C·w·w), patches in raster order: each p×p patch with
        `overlap` pixels of its neighbours around it (zeros past the image's edge), w = p + 2·overlap."""
        p, o = self.spec.patch_size, self.spec.overlap
        return F.unfold(pixel_values, p + 2 * o, padding=o, stride=p).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.patch_emb(self.patches(pixel_values))
        b = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        positions = None  # RoPE over raster order (the class token first)
        if self.pos_emb is not None:
            x = x + self.pos_emb
            positions = torch.zeros(b, x.shape[1], dtype=torch.long, device=x.device)  # rotary off
        hidden = super().forward(x, positions=positions, return_hidden=True)
        pooled = hidden[:, 0] if self.cls_token is not None else hidden.mean(dim=1)
        return self.lm_head(pooled)

    def flops_per_image(self) -> float:
        """Training FLOPs per image: the blocks over every token (6N + attention), plus the patch embedding."""
        t, n = self.spec.tokens, self.spec.grid**2
        return 3.0 * (t * self.cfg.forward_flops_per_token(t) + 2.0 * self.patch_emb.in_features * self.cfg.d_model * n)


class ConvStage(nn.Module):
    """Two 3×3 convolutions, each with GroupNorm and GELU, then 2×2 max pooling (while the map is ≥ 2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class SmallCNN(nn.Module):
    """The baseline: `model.n_layers` conv stages whose widths double up to `model.d_model`, global
    average pooling, a linear head."""

    def __init__(self, cfg: ModelConfig, spec: VisionSpec) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        widths = [max(8, cfg.d_model // 2 ** (cfg.n_layers - 1 - i)) for i in range(cfg.n_layers)]
        self.widths = widths
        self.layers = nn.ModuleDict({str(i): ConvStage(c_in, c_out)
                                     for i, (c_in, c_out) in enumerate(zip([spec.channels, *widths], widths))})
        self.head = nn.Linear(widths[-1], spec.classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for stage in self.layers.values():
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """He-normal convolutions, a 0.02-normal head, zero biases, unit norm gains; drawn whole in a
        fixed order (like `Transformer.init_weights`), so a sharded model starts from the same weights."""
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed(seed)
        for name, p in self.named_parameters():
            full = torch.empty(p.shape, dtype=p.dtype)
            if name.endswith("bias"):
                full.zero_()
            elif p.ndim == 1:
                full.fill_(1.0)
            elif p.ndim == 4:
                full.normal_(0.0, math.sqrt(2.0 / (p.shape[1] * p.shape[2] * p.shape[3])), generator=gen)
            else:
                full.normal_(0.0, 0.02, generator=gen)
            copy_into(p, full)

    def flops_per_image(self) -> float:
        """Training FLOPs per image: 3 × (2 · multiply-adds of every convolution + the head)."""
        size, total = self.spec.image_size, 0.0
        for stage in self.layers.values():
            for conv in (stage.conv1, stage.conv2):
                total += 2.0 * conv.in_channels * conv.out_channels * 9 * size * size
            size = size // 2 if size >= 2 else size
        return 3.0 * (total + 2.0 * self.head.in_features * self.head.out_features)


def build_vision_model(cfg: ModelConfig, spec: VisionSpec) -> nn.Module:
    if spec.arch == "cnn":
        return SmallCNN(cfg, spec)
    return VisionTransformer(cfg, spec)
