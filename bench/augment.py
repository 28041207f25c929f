"""Images/s of kiln's batch-time augmentation on its own vs the training step it feeds.

Prepares the vision recipe's data (scikit-learn's digits; skipped when already prepared), then times,
on one device and the same batch size: (1) the augmentation alone (`BatchAugment`: one affine warp per
image + normalization), (2) the whole loader (`ImageLoader.next_batch`: gather uint8 images, copy to
the device, augment, normalize) and (3) one training step of the recipe's model (forward, backward,
AdamW). The loader is not the bottleneck when (2) is many times faster than (3); the ratio says how
many.

    python bench/augment.py [-c recipes/vision-digits.yaml] [--steps 30] [--device auto] [--batch 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _rate(fn, n: int, images: int, sync) -> float:
    fn()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return images * n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default="recipes/vision-digits.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=0, help="images per batch (0 = the recipe's train.batch_size)")
    ap.add_argument("--out", default="", help="run directory for the prepared data (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from kiln.config import Config, load
    from kiln.data.augment import BatchAugment
    from kiln.data.images import ImageLoader
    from kiln.data.layout import data_dir
    from kiln.data.pipeline import run_prepare
    from kiln.model.vision import VisionSpec, build_vision_model
    from kiln.train import parallel
    from kiln.train.optim import build_optimizer
    from kiln.workloads.classification import Classification
    from kiln.workloads.vision import vision_model_config

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "run")
        overrides = [f"out={out}", f"device={args.device}"] + ([f"train.batch_size={args.batch}"] if args.batch else [])
        cfg: Config = load(Config, args.config, overrides)
        run_prepare(cfg)
        env = parallel.init_env(cfg)
        device = env.device

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        ddir = data_dir(cfg)
        b = cfg.train.batch_size
        loader = ImageLoader(ddir, "train", b, seed=0, augment=cfg.vision.augment, device=device)
        raw = torch.from_numpy(loader.images(loader._perm[:b])).to(device).float() / 255.0
        gen = torch.Generator().manual_seed(0)
        augment = BatchAugment(cfg.vision.augment, loader.man["channels"])
        aug_rate = _rate(lambda: augment(raw, gen), args.steps, b, sync)
        load_rate = _rate(loader.next_batch, args.steps, b, sync)

        man = loader.man
        vc = cfg.vision
        spec = VisionSpec(vc.arch, man["size"], man["channels"], len(man["classes"]), vc.patch_size, vc.pooling,
                          vc.positions)
        model = build_vision_model(vision_model_config(cfg, spec), spec)
        model.init_weights(0)
        model = parallel.parallelize(model, cfg, env)
        opt = build_optimizer(model, cfg.train)
        objective = Classification(("pixel_values",))
        batch = loader.next_batch()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else None

        def step() -> None:
            if autocast is not None:
                with autocast:
                    loss, _ = objective.loss(model, batch)
            else:
                loss, _ = objective.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_rate = _rate(step, args.steps, b, sync)
        compiled = " (compiled)" if parallel.use_compile(cfg, device) else ""

    print(f"device {device}; {vc.arch} from {args.config}{compiled}; batch {b} images of "
          f"{man['channels']}×{man['size']}×{man['size']}; {args.steps} timed repetitions each")
    print(f"augmentation alone (warp + jitter):      {aug_rate:12,.0f} images/s")
    print(f"loader (gather + copy + augment + norm): {load_rate:12,.0f} images/s")
    print(f"training step (fwd + bwd + AdamW):       {step_rate:12,.0f} images/s")
    print(f"ratio loader / training step: {load_rate / step_rate:.1f}× "
          f"({'the loader is not the bottleneck' if load_rate > step_rate else 'the LOADER IS the bottleneck'})")


if __name__ == "__main__":
    main()
