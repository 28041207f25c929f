"""Vision: image preparation (modes, EXIF, bad input counted by reason), batch-time augmentation
(exact geometry, determinism, resume), the ViT built from the shared Transformer, and a short
digits speedrun that must clearly learn."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import check_plan_vs_run, kiln
from kiln.config import AugmentConfig, ImageDataConfig
from kiln.data.augment import BatchAugment
from kiln.data.images import ImageLoader, decode_image, split_batches
from kiln.model.config import preset
from kiln.model.transformer import Block
from kiln.model.vision import VisionSpec, VisionTransformer

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "vision-digits.yaml")
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.tensorboard=false",
         "train.progress=false", "train.log_every=50"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A run directory with the digits recipe's prepared data."""
    out = tmp_path_factory.mktemp("digits") / "run"
    assert kiln("prepare", "-c", RECIPE, f"out={out}") == 0
    return out


def _run_with_data(tmp_path: Path, digits: Path, name: str = "run") -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(digits / "data", out / "data")
    return out


# ---- decoding --------------------------------------------------------------------------------------
def test_sixteen_bit_palette_cmyk_and_transparency_become_8_bit_l_or_rgb(tmp_path):
    gray = np.zeros((8, 8), dtype=np.uint16)
    gray[:, :4] = 32896  # 128 · 257: scaled, this is 128; clipped, it would be 255
    Image.fromarray(gray).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # fully transparent white
    rgba.save(tmp_path / "clear.png")

    l8 = ImageDataConfig(size=8, mode="L")
    rgb8 = ImageDataConfig(size=8, mode="RGB")
    g = decode_image(tmp_path / "g16.png", l8)
    assert g.shape == (1, 8, 8) and g.dtype == np.uint8
    assert (g[0, :, :4] == 128).all() and (g[0, :, 4:] == 0).all()
    assert decode_image(tmp_path / "pal.png", rgb8)[:, 0, 0].tolist() == [255, 0, 0]
    red = decode_image(tmp_path / "cmyk.jpg", rgb8)[:, 4, 4].astype(int)
    assert red[0] > 230 and red[1] < 25 and red[2] < 25
    assert decode_image(tmp_path / "clear.png", rgb8).max() == 0  # composited on black


def test_exif_orientation_is_applied_before_cropping(tmp_path):
    im = np.zeros((8, 16), dtype=np.uint8)  # 16 wide, 8 tall; left half white
    im[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(im, "L").save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rot.jpg", ImageDataConfig(size=8, mode="L"))[0].astype(int)
    # displayed upright it is 8 wide and 16 tall, white on top: the center crop splits top/bottom
    assert out[:3].mean() > 200 and out[-3:].mean() < 50


def test_resize_keeps_the_aspect_ratio_then_crops_or_pads(tmp_path):
    Image.new("L", (32, 16), 255).save(tmp_path / "wide.png")
    crop = decode_image(tmp_path / "wide.png", ImageDataConfig(size=8, mode="L"))[0]
    pad = decode_image(tmp_path / "wide.png", ImageDataConfig(size=8, mode="L", fit="pad"))[0]
    assert (crop == 255).all()  # covers the square
    assert (pad[2:6] == 255).all() and (pad[:2] == 0).all() and (pad[6:] == 0).all()  # 8×4 inside, black bands


# ---- preparation and bad input -------------------------------------------------------------------
def _png(path: Path, size: int, value: int) -> None:
    Image.new("L", (size, size), value).save(path)


def _folder_with_bad_images(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _png(root / cls / f"ok{i}.png", 12, 40 * i + (100 if cls == "dog" else 0))
    good = (root / "cat" / "ok0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "cat" / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    _png(root / "dog" / "tiny.png", 4, 200)  # smaller than the 8×8 crop, upscale off
    _png(root / "dog" / "bomb.png", 30, 10)  # 900 pixels: over twice data.images.max_pixels=200
    _png(root / "dog" / "big.png", 16, 10)  # 256 pixels: over the limit (Pillow only warns) → refused too
    return root


def test_bad_images_are_skipped_with_a_counted_reason(tmp_path):
    src = _folder_with_bad_images(tmp_path / "images")
    out = tmp_path / "run"
    assert kiln("prepare", f"out={out}", "data.kind=images", f"data.input={src}", "data.images.size=8",
                "data.images.mode=L", "data.images.max_pixels=200", "data.val_fraction=0.2",
                "data.images.test_fraction=0.2", "data.executor.workers=1") == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    assert man["read"]["dropped"] == {"corrupt": 2, "empty_file": 1, "unsupported_format": 1,
                                      "smaller_than_size": 1, "decompression_bomb": 2}
    assert man["read"]["kept"] == 6 and man["classes"] == ["cat", "dog"]
    assert sum(s["images"] for s in man["splits"].values()) == 6
    assert all(s["per_class"] == [1, 1] for n, s in man["splits"].items() if n != "train")  # stratified
    report = (out / "prepare_report.md").read_text()
    assert "decompression_bomb: 2" in report and "contact_sheet.png" in report
    assert (out / "data" / "contact_sheet.png").is_file()


def test_an_interrupted_prepare_redoes_only_the_tasks_without_a_marker(tmp_path):
    """A finished task's completion marker stands: the rerun takes its decoded images as they are
    (here doctored to tell them apart) and decodes only the task that has no marker."""
    out = tmp_path / "run"
    args = ["-c", RECIPE, f"out={out}", "data.images.task_images=1000", "data.executor.workers=1"]
    assert kiln("prepare", *args) == 0
    inputs = json.loads((out / "data" / "manifest.json").read_text())["inputs"]
    shutil.rmtree(out / "data")
    work = out / "data.work"
    (work / "decode").mkdir(parents=True)
    (work / "inputs").write_text(inputs)
    np.savez(work / "decode" / "00000.npz", images=np.full((1000, 1, 16, 16), 7, np.uint8),
             labels=np.zeros(1000, np.int64))
    (work / "decode" / "00000.json").write_text(json.dumps({"images": 1000, "dropped": {}, "messages": [],
                                                            "seconds": 0.0}))
    assert kiln("prepare", *args) == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    images = np.concatenate([np.load(out / "data" / s["file"]) for n in ("train", "val", "test")
                             for s in man["splits"][n]["shards"]])
    per_image = images.reshape(len(images), -1)
    assert int((per_image == 7).all(1).sum()) == 1000  # the marked task was not decoded again
    assert man["splits"]["train"]["per_class"][0] > 700  # its doctored labels (all class 0) were used too
    assert not work.exists()


@pytest.mark.parametrize("case", ["empty class folder", "class of only bad images", "no image at all"])
def test_unusable_inputs_are_one_clear_error_and_write_nothing(tmp_path, capsys, case):
    src = tmp_path / "images"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    _png(src / "cat" / "a.png", 12, 10)
    if case == "class of only bad images":
        (src / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    elif case == "no image at all":
        (src / "cat" / "a.png").write_bytes(b"")
        (src / "dog" / "b.png").write_bytes(b"")
    want = {"empty class folder": "class folder", "class of only bad images": "have no usable image",
            "no image at all": "no images left"}[case]
    out = tmp_path / "run"
    assert kiln("prepare", f"out={out}", "data.kind=images", f"data.input={src}", "data.images.size=8",
                "data.executor.workers=1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kiln prepare: error: ") and want in err
    assert not (out / "data").exists()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_listing_rows_without_a_label_or_out_of_range_are_counted(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    for name, v in (("a.png", 10), ("b.png", 200), ("c.png", 90)):
        _png(tmp_path / "img" / name, 12, v)
    rows = [{"path": "img/a.png", "label": "cat"}, {"path": "img/b.png", "label": "1"},
            {"path": "img/c.png", "label": ""}, {"path": "img/c.png", "label": "zebra"},
            {"path": "img/c.png", "label": "7"}, {"path": "", "label": "cat"}]
    listing = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        with open(listing, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "label"])
            w.writeheader()
            w.writerows(rows)
    else:
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert kiln("prepare", f"out={out}", "data.kind=images", f"data.input={listing}", "data.images.size=8",
                "data.images.classes=cat,dog", "data.executor.workers=1", "data.val_fraction=0.01",
                "data.images.test_fraction=0.01") == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    assert man["read"]["dropped"] == {"missing_label": 1, "label_out_of_range": 2, "missing_path": 1}
    assert man["splits"]["train"]["per_class"] == [1, 1]  # "1" is the index of dog


# ---- augmentation and the loader -----------------------------------------------------------------
def test_an_identity_warp_is_exact_and_flips_mirror_exactly():
    x = torch.rand(64, 3, 8, 8)
    aug = BatchAugment(AugmentConfig(crop_scale=1.0, crop_ratio=1.0, rotation=0.0, flip=True), channels=3)
    y = aug(x, torch.Generator().manual_seed(0))
    same = (y - x).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()
    no_flip = BatchAugment(AugmentConfig(crop_scale=1.0, crop_ratio=1.0, rotation=0.0, flip=False), channels=3)
    assert torch.allclose(no_flip(x, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_a_half_turn_rotates_the_image_upside_down():
    x = torch.rand(4, 1, 8, 8)
    aug = BatchAugment(AugmentConfig(crop_scale=1.0, crop_ratio=1.0, rotation=180.0), channels=1)
    theta = aug.matrices(4, torch.Generator().manual_seed(0))
    angles = torch.atan2(theta[:, 1, 0], theta[:, 0, 0])
    assert (angles.abs() <= torch.pi).all() and angles.std() > 0.1  # drawn in ±180°
    half = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]]).expand(4, -1, -1)
    grid = torch.nn.functional.affine_grid(half, [4, 1, 8, 8], align_corners=False)
    turned = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(turned, x.flip(-1).flip(-2), atol=1e-5)  # the convention matrices() builds on


def test_the_loader_is_deterministic_and_resumes_exactly(digits):
    ddir = digits / "data"
    a = ImageLoader(ddir, "train", 16, seed=3, augment=AugmentConfig(jitter=0.3))
    first = a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(90)]  # runs over an epoch boundary (1,259 images / 16)
    b = ImageLoader(ddir, "train", 16, seed=3, augment=AugmentConfig(jitter=0.3))
    b.load_state_dict(state)
    again = [b.next_batch() for _ in range(90)]
    for x, y in zip(rest, again):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["labels"], y["labels"])
    other = ImageLoader(ddir, "train", 16, seed=4, augment=AugmentConfig(jitter=0.3)).next_batch()
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    plain = ImageLoader(ddir, "train", 16, seed=3, augment=AugmentConfig(enabled=False)).next_batch()
    assert torch.equal(plain["labels"], first["labels"]) and not torch.equal(plain["pixel_values"], first["pixel_values"])


def test_normalization_uses_the_training_split_statistics(digits):
    x = torch.cat([b["pixel_values"] for b in split_batches(digits / "data", "train", 256)])
    assert x.shape[1:] == (1, 16, 16)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


# ---- the model -------------------------------------------------------------------------------------
def test_the_vit_is_the_shared_transformer_and_sees_every_patch():
    spec = VisionSpec("vit", image_size=8, channels=1, classes=10, patch_size=4)
    cfg = preset("tiny", vocab_size=10, causal=False, tie_embeddings=False, max_seq_len=spec.tokens)
    model = VisionTransformer(cfg, spec)
    model.init_weights(0)
    assert all(isinstance(b, Block) for b in model.layers.values()) and model.tok_emb is None
    x = torch.randn(2, 1, 8, 8)
    y = x.clone()
    y[:, :, 4:, 4:] += 1.0  # only the last patch changes; the class token comes first
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert not torch.allclose(model(x), model(y))  # bidirectional: the first token sees the last patch


@pytest.mark.parametrize("overlap", [0, 1])
def test_an_overlapping_patch_embedding_sees_exactly_its_ring_of_neighbours(overlap):
    """With `overlap` 1 each 4×4 patch is embedded from a 6×6 window (zeros past the edge): a
    pixel one column right of the first patch reaches its token, one two columns right does not."""
    spec = VisionSpec("vit", image_size=8, channels=1, classes=10, patch_size=4, overlap=overlap)
    cfg = preset("tiny", vocab_size=10, causal=False, tie_embeddings=False, max_seq_len=spec.tokens)
    model = VisionTransformer(cfg, spec)
    model.init_weights(0)
    x = torch.randn(1, 1, 8, 8)
    patches = model.patches(x)
    assert patches.shape == (1, 4, (4 + 2 * overlap) ** 2)
    near, far = x.clone(), x.clone()
    near[..., 0, 4] += 1.0
    far[..., 0, 5] += 1.0
    assert torch.equal(model.patches(far)[:, 0], patches[:, 0])
    assert torch.equal(model.patches(near)[:, 0], patches[:, 0]) == (overlap == 0)


# ---- training ----------------------------------------------------------------------------------------
def test_digits_speedrun_clearly_learns_and_reports(tmp_path, digits):
    """The recipe, test-sized: a small ViT for 250 steps must clearly learn (> 85% on the test split),
    and the comparison without augmentation, the scikit-learn baselines and the plots land in the report."""
    out = _run_with_data(tmp_path, digits)
    assert kiln("speedrun", "-c", RECIPE, f"out={out}", *SMALL, "train.max_steps=250", "train.eval_every=125",
                "train.lr=3e-3", "train.warmup_steps=20", "vision.compare=no-augment") == 0
    result = json.loads((out / "vision_eval.json").read_text())
    assert result["test_accuracy"] > 0.85, result["test_accuracy"]
    assert result["baselines"]["majority class"] < 0.2 < result["baselines"]["SVC (RBF kernel) on pixels"]
    runs = json.loads((out / "vision_compare.json").read_text())
    assert [r["name"].split("]")[0] for r in runs] == ["this run", "[ViT without augmentation"]
    assert runs[1]["test_accuracy"] > 0.5 and runs[1]["augment"] == "off"
    report = (out / "report.md").read_text()
    for part in ("## Data (images)", "## Vision", "confusion.png", "contact_sheet.png", "accuracy.png",
                 "ViT without augmentation"):
        assert part in report
    assert (out / "confusion.png").is_file() and (out / "compare-no-augment" / "report.md").is_file()
    check_plan_vs_run(out, partial=True)  # a ViT over patch tokens: the patch embedding and pooled head are not planned


def test_a_resumed_vision_run_reaches_the_same_weights(tmp_path, digits):
    """With the CNN (the same loop, loader and augmentation as the ViT): 3 + 3 steps equal 6."""
    from safetensors.torch import load_file

    def weights(run: Path) -> dict:
        name = (run / "checkpoints" / "latest").read_text().strip()
        return load_file(run / "checkpoints" / name / "model.safetensors")

    args = [*SMALL, "vision.arch=cnn", "model.d_model=32", "vision.baselines=false", "train.eval_every=1000", "train.batch_size=16",
            "train.warmup_steps=2", "train.schedule=constant", "vision.augment.jitter=0.2"]
    straight = _run_with_data(tmp_path, digits, "straight")
    assert kiln("vision", "-c", RECIPE, f"out={straight}", *args, "train.max_steps=6") == 0
    parts = _run_with_data(tmp_path, digits, "parts")
    assert kiln("vision", "-c", RECIPE, f"out={parts}", *args, "train.max_steps=3", "train.ckpt_every=3") == 0
    assert kiln("vision", "-c", RECIPE, f"out={parts}", *args, "train.max_steps=6") == 0
    a, b = weights(straight), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_plan_vs_run(straight, predicted=False)  # a CNN has no transformer block to plan: said, no figure
