"""Labelled images: decoding with Pillow, uint8 image shards on disk, and the loader that trains from them.

A prepared image directory holds `manifest.json` (`kind: images`, the class names, the image size
and channels, the training split's per-channel mean and std) and, per split (train, val, test),
`SPLIT_NNNNN.npy` (uint8, N × C × H × W) with `SPLIT_NNNNN.labels.npy` (int64 class indices).
`ImageLoader` memory-maps the shards, visits the split in a seeded permutation per epoch like
`TokenLoader`, and augments and normalizes each batch on the training device (`kiln.data.augment`);
its position is two integers, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from kiln.config import AugmentConfig, ImageDataConfig
from kiln.errors import KilnError
from kiln.runs import read_manifest

SPLITS = ("train", "val", "test")


class BadImage(Exception):
    """An image that is skipped: `reason` is the counted name, the message says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def image_suffixes() -> set[str]:
    """File suffixes Pillow can decode here (its registered plugins)."""
    from PIL import Image

    return {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _to_mode(im, mode: str):
    """`im` as 8-bit L or RGB: 16- and 32-bit images are scaled (not clipped), palettes expanded,
    transparency composited on black, CMYK and YCbCr converted."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            top = max(1.0, float(a.max(initial=0)))
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert(mode)


def _fit(im, size: int, fit: str, upscale: bool):
    """Resize keeping the aspect ratio so the image covers (crop) or fits inside (pad) a size×size
    square, then center-crop or pad it with black."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h) if fit == "crop" else size / max(w, h)
    if scale > 1 and not upscale:
        raise BadImage("smaller_than_size", f"{w}×{h} is smaller than data.images.size={size} "
                       "(set data.images.upscale=true to enlarge such images)")
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)
    if fit == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        return im.crop((left, top, left + size, top + size))
    canvas = Image.new(im.mode, (size, size), 0)
    canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def decode_image(source, cfg: ImageDataConfig) -> np.ndarray:
    """A file path or a PIL image → a (C, size, size) uint8 array, or `BadImage` saying why not.

    EXIF orientation is applied; any Pillow mode becomes L or RGB (`data.images.mode`); an image of
    more than `data.images.max_pixels` pixels is refused before it is decoded (decompression bombs).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix.lower() not in image_suffixes():
            raise BadImage("unsupported_format", f"'{path.suffix or path.name}' is not an image format Pillow reads")
        try:
            if path.stat().st_size == 0:
                raise BadImage("empty_file", "the file is empty (0 bytes)")
        except FileNotFoundError:
            raise BadImage("missing_file", "no such file") from None
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels
    with warnings.catch_warnings():
        # Pillow warns between the limit and twice it, and raises above; both are refused here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(source) if isinstance(source, (str, Path)) else source
            with im:
                im = ImageOps.exif_transpose(im)
                im.load()
                im = _fit(_to_mode(im, cfg.mode), cfg.size, cfg.fit, cfg.upscale)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("decompression_bomb", f"{e}; raise data.images.max_pixels if the image is genuine") from None
        except UnidentifiedImageError:
            raise BadImage("corrupt", "Pillow cannot identify the image (corrupt or not what its name says)") from None
        except BadImage:
            raise
        except PermissionError as e:
            raise BadImage("unreadable", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage("corrupt", f"cannot be decoded ({str(e) or type(e).__name__})") from None
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ---- shards --------------------------------------------------------------------------------------
def write_shards(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, per_shard: int) -> list[dict]:
    """Write `images` (N, C, H, W uint8) and `labels` as numbered shard pairs; returns their records."""
    shards = []
    for i, start in enumerate(range(0, max(len(images), 1), per_shard)):
        name = f"{split}_{i:05d}"
        np.save(directory / f"{name}.npy", np.ascontiguousarray(images[start : start + per_shard]))
        np.save(directory / f"{name}.labels.npy", labels[start : start + per_shard].astype(np.int64))
        shards.append({"file": f"{name}.npy", "labels": f"{name}.labels.npy",
                       "images": int(len(images[start : start + per_shard]))})
    return shards


def open_image_data(path: str | Path) -> dict:
    """The manifest of a prepared image directory, checked for the shards it lists."""
    path = Path(path)
    man = read_manifest(path)
    if man is None:
        raise KilnError(f"'{path}' holds no prepared data (manifest.json missing or unreadable); run `kiln prepare` "
                        "with data.kind=images first")
    if man.get("kind") != "images":
        raise KilnError(f"'{path}' holds prepared text (token shards), not images; prepare images there with "
                        "data.kind=images, or point data.path at an image directory")
    for split in SPLITS:
        for shard in man["splits"].get(split, {}).get("shards", []):
            for key in ("file", "labels"):
                if not (path / shard[key]).is_file():
                    raise KilnError(f"image shard '{path / shard[key]}' is missing; re-run `kiln prepare`")
    return man


def read_split(path: str | Path, man: dict, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """A split's image shards (memory-mapped) and all its labels."""
    path = Path(path)
    shards = man["splits"].get(split, {}).get("shards", [])
    maps, labels = [], []
    for s in shards:
        try:
            m = np.load(path / s["file"], mmap_mode="r")
            lab = np.load(path / s["labels"])
        except (OSError, ValueError) as e:
            raise KilnError(f"image shard '{path / s['file']}' cannot be read ({e}); re-run `kiln prepare`") from None
        if len(m) != s["images"] or len(lab) != s["images"]:
            raise KilnError(f"image shard '{path / s['file']}' is truncated; re-run `kiln prepare`")
        maps.append(m)
        labels.append(lab)
    return maps, (np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images → (x - mean) / std per channel."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _stats(man: dict, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(man["mean"], dtype=torch.float32, device=device),
            torch.tensor(man["std"], dtype=torch.float32, device=device))


class ImageLoader:
    """Batches of `pixel_values` (B, C, H, W float, normalized) and `labels` (B,) for one data-parallel rank.

    The loader interface every workload shares. Images are visited in a permutation seeded by
    (seed, epoch); global batch k takes images [k·world·B, (k+1)·world·B) of it and rank r its r-th
    slice. With `augment`, each batch is warped on `device` (where the model trains) with random
    parameters drawn from a generator seeded by (seed, epoch, position, rank): the same batches
    after a resume, whatever the device.
    """

    def __init__(self, path: str | Path, split: str, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 augment: AugmentConfig | None = None, device: torch.device | str = "cpu") -> None:
        from kiln.data.augment import BatchAugment

        self.path = Path(path)
        self.man = open_image_data(self.path)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device = torch.device(device)
        self.maps, self.labels = read_split(self.path, self.man, split)
        self.n = len(self.labels)
        if self.n < batch_size * world:
            raise KilnError(f"the '{split}' split of '{self.path}' has {self.n} images, fewer than one global batch "
                            f"({batch_size}×{world}); lower train.batch_size or prepare more images")
        counts = [len(m) for m in self.maps]
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.mean, self.std = _stats(self.man, self.device)
        self.augment = BatchAugment(augment, self.man["channels"]) if augment is not None and augment.enabled else None
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def images(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.maps[s][i - self._first[s]] for s, i in zip(self._shard_of[index], index)])

    def next_batch(self) -> dict[str, torch.Tensor]:
        step = self.batch_size * self.world
        if self.pos + step > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        mine = self._perm[self.pos + self.rank * self.batch_size : self.pos + (self.rank + 1) * self.batch_size]
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.epoch, self.pos, self.rank])
                                                .integers(2**62)))
        self.pos += step
        x = torch.from_numpy(self.images(mine)).to(self.device, non_blocking=True).float() / 255.0
        if self.augment is not None:
            x = self.augment(x, gen)
        return {"pixel_values": normalize(x, self.mean, self.std),
                "labels": torch.from_numpy(self.labels[mine]).to(self.device)}

    @property
    def tokens_per_batch(self) -> int:
        """Images per micro-batch: the trainer's throughput and accumulation count images."""
        return self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "world": self.world,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["batch_size"] * state["world"] != self.batch_size * self.world:
            frac = state["pos"] / max(1, self.n)  # a different global batch: keep the share of the epoch seen
            step = self.batch_size * self.world
            self.epoch, self.pos = state["epoch"], int(frac * self.n) // step * step
        else:
            self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)


def split_batches(path: str | Path, split: str, batch_size: int, max_batches: int = 0, rank: int = 0,
                  world: int = 1) -> list[dict[str, torch.Tensor]]:
    """A split in order, normalized, never augmented: the same batches at every evaluation. With
    several data-parallel ranks each takes an equal share of the batches (all of them if fewer
    than the ranks; the evaluator sums counts, so copies do not change a mean)."""
    man = open_image_data(path)
    maps, labels = read_split(path, man, split)
    if not len(labels):
        return []
    mean, std = _stats(man)
    n_batches = math.ceil(len(labels) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    per = n_batches // world
    mine = range(n_batches) if per == 0 else range(rank, per * world, world)
    first = np.concatenate([[0], np.cumsum([len(m) for m in maps])])

    def rows(lo: int, hi: int) -> np.ndarray:  # images lo..hi of the split, across shard boundaries
        hi = min(hi, len(labels))
        return np.concatenate([np.asarray(m[max(lo - a, 0) : max(hi - a, 0)]) for m, a in zip(maps, first)])

    return [{"pixel_values": normalize(torch.from_numpy(rows(b * batch_size, (b + 1) * batch_size)), mean, std),
             "labels": torch.from_numpy(labels[b * batch_size : (b + 1) * batch_size])} for b in mine]
