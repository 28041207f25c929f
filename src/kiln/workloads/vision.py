"""`kiln vision`: an image classifier (ViT on the shared Transformer, or the CNN baseline) trained on
prepared image shards with the shared Trainer; then the test split (accuracy, confusion matrix),
scikit-learn baselines on the same split, and the run's report. `kiln speedrun` with an image
recipe runs `run_vision_speedrun`: prepare, the recipe's model, and the `vision.compare` variants
(without augmentation, the CNN) side by side.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from kiln.config import Config, dump_yaml
from kiln.data.images import ImageLoader, open_image_data, read_split, split_batches
from kiln.data.layout import data_dir
from kiln.errors import KilnError
from kiln.hardware import tune_cpu_allocator
from kiln.model.config import ModelConfig
from kiln.model.vision import VisionSpec, build_vision_model
from kiln.provenance import read_config
from kiln.report import plot_over_steps, write_section
from kiln.runs import atomic_write_text, read_manifest, write_json
from kiln.train import parallel
from kiln.train.checkpoint import CheckpointManager
from kiln.train.restore import find_checkpoint
from kiln.train.trainer import Trainer
from kiln.workloads.classification import Classification, confusion, latest_metrics, plot_confusion, predict
from kiln.workloads.common import build_trained, ensure_data, record_run, resolve_resume

WORKLOAD = "vision"
EVAL_FILE = "vision_eval.json"
BASELINE_MAX_TRAIN = 10_000  # scikit-learn's SVC is quadratic in the training set: fit on at most this many


def plot_accuracy(metrics: list[dict], path: Path) -> bool:
    train = [(m["step"], m["accuracy"]) for m in metrics if "accuracy" in m]
    val = [(m["step"], m["val_accuracy"]) for m in metrics if "val_accuracy" in m]
    return plot_over_steps(path, [("training batches", train, False), ("validation", val, True)], "accuracy",
                           "accuracy", size=(6, 3.6), ylim=(0, 1.01))


def pixel_baselines(ddir: Path, man: dict) -> dict[str, float]:
    """Test accuracy of the majority class and of scikit-learn classifiers on raw pixels (scaled to
    [0, 1]), fitted on (at most BASELINE_MAX_TRAIN of) the same training split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    def flat(split: str) -> tuple[np.ndarray, np.ndarray]:
        maps, labels = read_split(ddir, man, split)
        x = np.concatenate([np.asarray(m) for m in maps]).reshape(len(labels), -1).astype(np.float32) / 255.0
        return x, labels

    xtr, ytr = flat("train")
    xte, yte = flat("test")
    if len(ytr) > BASELINE_MAX_TRAIN:
        keep = np.random.default_rng(0).permutation(len(ytr))[:BASELINE_MAX_TRAIN]
        xtr, ytr = xtr[keep], ytr[keep]
    majority = np.bincount(ytr).argmax()
    out = {"majority class": float((yte == majority).mean())}
    for name, clf in (("SVC (RBF kernel) on pixels", SVC(kernel="rbf", C=10.0, gamma="scale")),
                      ("logistic regression on pixels", LogisticRegression(max_iter=2000, C=1.0))):
        out[name] = float((clf.fit(xtr, ytr).predict(xte) == yte).mean())
    return out


def vision_model_config(cfg: Config, spec: VisionSpec) -> ModelConfig:
    """The model.* shape with what the task fixes: one output per class, bidirectional, untied,
    a context of the patch tokens."""
    over = cfg.model.overrides()
    fixed = {"vocab_size": spec.classes, "causal": False, "tie_embeddings": False}
    clash = {k: v for k, v in fixed.items() if k in over and over[k] != v}
    if clash:
        raise KilnError(f"kiln vision sets {', '.join(f'model.{k}' for k in clash)} itself "
                        f"({', '.join(f'{k}={v}' for k, v in fixed.items())}); drop those overrides")
    over.update(fixed)
    over.setdefault("max_seq_len", spec.tokens)
    return cfg.model.build(**over)


def describe_spec(spec: VisionSpec, mc: ModelConfig, params: int) -> str:
    if spec.arch == "cnn":
        return f"CNN ({mc.n_layers} conv stages up to {mc.d_model} channels), {params:,} parameters"
    return (f"ViT on the shared Transformer: {mc.n_layers} layers, d_model {mc.d_model}, {mc.n_heads} heads, "
            f"{spec.patch_size}×{spec.patch_size} patches" + (f" overlapping by {spec.overlap}" if spec.overlap else "")
            + f" ({spec.tokens} tokens), {spec.pooling} pooling, "
            f"{spec.positions} positions; {params:,} parameters")


def describe_augment(cfg: Config) -> str:
    a = cfg.vision.augment
    if not a.enabled:
        return "off"
    parts = [f"random resized crop (area ≥ {a.crop_scale:g}, ratio ≤ {a.crop_ratio:g})", f"rotation ±{a.rotation:g}°"]
    if a.flip:
        parts.append("horizontal flip")
    if a.jitter:
        parts.append(f"color jitter {a.jitter:g}")
    return ", ".join(parts)


def run_vision(cfg: Config) -> dict:
    ddir = data_dir(cfg)
    if cfg.data.kind != "images" and read_manifest(ddir) is None:
        raise KilnError("kiln vision trains on images: set data.kind=images with data.input=digits, an image folder "
                        "or a listing (e.g. -c recipes/vision-digits.yaml)")
    ensure_data(cfg, ddir, WORKLOAD)
    env = parallel.init_env(cfg)
    if env.layout["tp"] > 1 or env.layout["pp"] > 1:
        raise KilnError("kiln vision runs data-parallel only (DDP / FSDP2); set parallel.tp=1 and parallel.pp=1")
    if env.device.type == "cpu":
        tune_cpu_allocator()
    man = open_image_data(ddir)
    vc = cfg.vision
    spec = VisionSpec(vc.arch, man["size"], man["channels"], len(man["classes"]), vc.patch_size, vc.pooling,
                      vc.positions, vc.patch_overlap)
    mc = vision_model_config(cfg, spec)
    out = Path(cfg.out)
    ckpt = CheckpointManager(out, cfg.train.keep_last)
    start = resolve_resume(cfg, ckpt, mc, WORKLOAD)
    if start is not None and CheckpointManager.info(start).get("vision") != spec.to_dict():
        raise KilnError(f"'{cfg.out}' holds a vision run of a different model ({CheckpointManager.info(start).get('vision')}"
                        f" there, {spec.to_dict()} here); choose a new out= or use that run's vision.* settings")
    source = find_checkpoint(cfg.init_from) if cfg.init_from else None
    notes = []

    model = build_trained(lambda: build_vision_model(mc, spec), cfg, env, source, start, WORKLOAD, notes)
    bare = build_vision_model(mc, spec) if env.distributed else model  # for sizes only
    loader = ImageLoader(ddir, "train", cfg.train.batch_size, cfg.train.seed, rank=env.dp_rank, world=env.dp_world,
                         augment=vc.augment, device=env.device)
    objective = Classification(("pixel_values",), vc.label_smoothing)
    if env.is_main:  # inputs checked: now the run directory
        out.mkdir(parents=True, exist_ok=True)
        before = read_config(out)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        record_run(cfg, env, WORKLOAD, before)
    trainer = Trainer(
        cfg, model, env, loader, objective,
        eval_batches=split_batches(ddir, "val", cfg.train.batch_size, cfg.train.eval_batches, env.dp_rank, env.dp_world),
        flops_per_token=bare.flops_per_image(),
        meta={"model": mc.to_dict(), "vision": spec.to_dict(), "classes": man["classes"], "data": str(ddir),
              "mean": man["mean"], "std": man["std"], **({"init_from": str(source)} if source else {})},
        name=WORKLOAD,
    )
    for note in notes:
        trainer.say(f"init_from: {note}")
    if start is not None:
        trainer.resume_from(start)
    params = sum(p.numel() for p in bare.parameters())
    trainer.say(f"{describe_spec(spec, mc, params)}; augmentation {describe_augment(cfg)}; batch "
                f"{cfg.train.batch_size} images × {trainer.accum} micro-batches, {env.describe()}, "
                f"{cfg.train.max_steps} steps (throughput below counts images as tokens)")
    with parallel.peer_failures_as_errors(env, cfg.parallel.timeout_s):
        last = trainer.fit()
        test = split_batches(ddir, "test", cfg.train.batch_size)
        predicted = predict(model, test, objective, env)
    if not env.is_main:
        return last
    labels = np.concatenate([b["labels"].numpy() for b in test]) if test else np.zeros(0, dtype=np.int64)
    matrix = confusion(labels, predicted, len(man["classes"]))
    logged = latest_metrics(out)
    result = {
        "arch": spec.arch, "spec": spec.to_dict(), "model": describe_spec(spec, mc, params),
        "augment": describe_augment(cfg), "augmented": cfg.vision.augment.enabled, "steps": trainer.step,
        "elapsed_s": round(trainer.elapsed, 1), "images_per_s": logged.get("tokens_per_s"),
        "val_accuracy": logged.get("val_accuracy"), "test_images": int(len(labels)),
        "test_correct": int(np.trace(matrix)), "test_accuracy": float(np.trace(matrix) / max(1, len(labels))),
        "confusion": matrix.tolist(), "classes": man["classes"],
    }
    if vc.baselines:
        result["baselines"] = pixel_baselines(ddir, man)
    write_json(out / EVAL_FILE, result)
    write_vision_report(out)
    trainer.say(f"test accuracy {100 * result['test_accuracy']:.2f}% ({result['test_correct']}/{len(labels)}); "
                f"report {out / 'report.md'}")
    return {**last, "test_accuracy": result["test_accuracy"]}


def write_vision_report(out: Path) -> Path:
    """The report's vision section (test accuracy, confusion matrix, baselines, the speedrun's comparison), then report.md."""
    from kiln.train.metrics import read_metrics

    r = json.loads((out / EVAL_FILE).read_text())
    plot_confusion(np.asarray(r["confusion"]), r["classes"], out / "confusion.png",
                   f"test confusion matrix ({100 * r['test_accuracy']:.1f}% correct)")
    lines = ["## Vision", "",
             f"- model: {r['model']}", f"- augmentation (training batches, on the device): {r['augment']}",
             f"- **test accuracy {100 * r['test_accuracy']:.2f}%** ({r['test_correct']:,}/{r['test_images']:,} "
             f"held-out images) after {r['steps']:,} steps in {r['elapsed_s']:.0f} s"
             + (f"; last validation accuracy {100 * r['val_accuracy']:.2f}%" if r.get("val_accuracy") is not None else ""),
             ""]
    if plot_accuracy(read_metrics(out), out / "accuracy.png"):
        lines += ["![accuracy](accuracy.png)", ""]
    lines += ["![test confusion matrix](confusion.png)", ""]
    rows = []
    compare = out / "vision_compare.json"
    if compare.is_file():
        for c in json.loads(compare.read_text()):
            rows.append((c["name"], c["model"], c["augment"], c["test_accuracy"], f"{c['steps']:,} steps, {c['elapsed_s']:.0f} s"))
    for name, acc in (r.get("baselines") or {}).items():
        rows.append((name, "scikit-learn", "—", acc, "same training split"))
    if rows:
        lines += ["Test accuracy on the same split:", "", "| run | model | augmentation | test accuracy | cost |",
                  "|---|---|---|---:|---|",
                  *[f"| {n} | {m} | {a} | {100 * acc:.2f}% | {c} |" for n, m, a, acc, c in rows], ""]
    return write_section(out, "vision", lines)


VARIANTS = {
    "no-augment": ("ViT without augmentation", {"vision.augment.enabled": False, "vision.arch": "vit"}),
    "augment": ("ViT with augmentation", {"vision.augment.enabled": True, "vision.arch": "vit"}),
    "cnn": ("CNN baseline", {"vision.arch": "cnn"}),
    "vit": ("ViT", {"vision.arch": "vit"}),
}


def _with(cfg: Config, out: Path, ddir: Path, changes: dict) -> Config:
    """`cfg` for a comparison run in `out` on the same prepared data, with dotted `changes`."""
    new = dataclasses.replace(cfg, out=str(out), data=dataclasses.replace(cfg.data, path=str(ddir)),
                              vision=dataclasses.replace(cfg.vision, augment=dataclasses.replace(cfg.vision.augment)))
    for key, value in changes.items():
        node = new
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return new


def run_vision_speedrun(cfg: Config) -> dict:
    """prepare → the recipe's model → each `vision.compare` variant on the same split → one report."""
    from kiln.data.pipeline import run_prepare

    t0 = time.perf_counter()
    out, ddir = Path(cfg.out), data_dir(cfg)
    print("== prepare")
    run_prepare(cfg)
    print("== vision")
    main = run_vision(cfg)
    runs = [{"name": "this run", **_summary(out)}]
    for variant in cfg.vision.compare:
        title, changes = VARIANTS[variant]
        sub = out / f"compare-{variant}"
        print(f"== vision: {title} ({sub})")
        run_vision(_with(cfg, sub, ddir, {**changes, "vision.baselines": False}))
        runs.append({"name": f"[{title}]({sub.name}/report.md)", **_summary(sub)})
    write_json(out / "vision_compare.json", runs)
    path = write_vision_report(out)
    print(f"== done in {time.perf_counter() - t0:.0f} s; test accuracy {100 * main['test_accuracy']:.2f}%; report: {path}")
    return main


def _summary(run: Path) -> dict:
    r = json.loads((run / EVAL_FILE).read_text())
    return {k: r[k] for k in ("model", "augment", "test_accuracy", "steps", "elapsed_s")}
