"""Encoder workloads: the vision classifier (`vision.*` and its `augment`), the masked-LM text encoder
(`encoder.*`) and its classification fine-tune (`classify.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kiln.config.schema import ranged


@dataclass
class AugmentConfig:
    """Batch-time augmentation of training images, on the training device (`kiln.data.augment`)."""

    enabled: bool = True
    crop_scale: float = ranged(0.8, gt=0, le=1)  # random resized crop: the smallest share of the image area kept
    crop_ratio: float = ranged(1.25, ge=1)  # crop aspect ratios drawn in [1/r, r]
    rotation: float = ranged(10.0, ge=0, le=180)  # random rotation in ±degrees
    flip: bool = False  # random horizontal flip (off by default: digits and text are not mirror-symmetric)
    jitter: float = ranged(0.0, ge=0, lt=1)  # brightness / contrast / saturation jitter strength; 0 = off


@dataclass
class VisionConfig:
    arch: Literal["vit", "cnn"] = "vit"  # vit: the shared Transformer over patches (causal=false); cnn: a small baseline
    patch_size: int = ranged(4, ge=1)  # ViT patch side in pixels; must divide data.images.size
    patch_overlap: int = ranged(0, ge=0)  # pixels each patch's embedding also sees of its neighbours, per side
    pooling: Literal["cls", "mean"] = "cls"  # ViT: a class token, or the mean of the patch tokens
    positions: Literal["learned", "rope"] = "learned"  # learned table over the patch grid, or RoPE over raster order
    label_smoothing: float = ranged(0.0, ge=0, lt=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    baselines: bool = True  # fit scikit-learn baselines (SVC, logistic regression) on the same split for the report
    # extra runs `kiln speedrun` trains beside the recipe's, on the same split, for the report's comparison
    compare: list[Literal["no-augment", "augment", "cnn", "vit"]] = field(default_factory=lambda: ["no-augment", "cnn"])


@dataclass
class EncoderConfig:
    mask_rate: float = ranged(0.15, gt=0, lt=1)  # share of tokens chosen as masked-LM targets
    mask_token: float = ranged(0.8, ge=0, le=1)  # of those: replaced by the mask token ...
    random_token: float = ranged(0.1, ge=0, le=1)  # ... or by a random token; the rest are left as they are
    export: bool = True  # write a Hugging Face (EuroBERT) directory to <out>/export/hf at the end

    def __post_init__(self) -> None:
        if self.mask_token + self.random_token > 1:
            raise ValueError(f"encoder.mask_token={self.mask_token} + encoder.random_token={self.random_token} exceeds 1; "
                             "the two shares split the chosen tokens: lower one of them")


@dataclass
class ClassifyConfig:
    input: str = "stdlib-order"  # stdlib-order, stdlib-packages (labelled from the stdlib; docs/vision-and-encoders.md) or a JSONL path
    text_field: str = "text"  # JSONL: the text to classify
    label_field: str = "label"  # JSONL: its class name
    packages: list[str] = field(default_factory=lambda: [
        "asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml"])  # the stdlib tasks' sources
    max_per_class: int = ranged(0, ge=0)  # examples kept per class (0 = all)
    val_fraction: float = ranged(0.1, gt=0, lt=1)
    test_fraction: float = ranged(0.2, gt=0, lt=1)
    pooling: Literal["mean", "bos"] = "mean"  # how the head reads the sequence: mean of real tokens, or the first
    seed: int = ranged(0, ge=0)  # which examples fall in which split
