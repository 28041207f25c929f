"""`kiln prepare` with `data.kind=images`: labelled images in, uint8 image shards and a report out.

Inputs (`data.input`): `digits` (scikit-learn's bundled handwritten digits: no download), a folder
with one subfolder per class, or a CSV / JSONL listing of path,label rows. The driver lists and
labels the images (a row without a label, or with one outside `data.images.classes`, is dropped
and counted), decodes them in tasks through the same executors as text (`kiln.data.executor`:
in-process, local processes or Ray), each task leaving a completion marker so a rerun redoes only
the missing ones, then splits each class into train / validation / test by seed, computes the
training split's per-channel mean and std, and writes the shards (`kiln.data.images`), a contact
sheet (samples per class) and `prepare_report.md` with the counts and every drop by reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.config import Config, ImageDataConfig
from kiln.data.executor import Executor
from kiln.data.images import SPLITS, BadImage, decode_image, write_shards
from kiln.data.layout import check_not_a_trained_run, data_dir, work_dir
from kiln.data.report import image_data_lines
from kiln.data.tasks import save_json
from kiln.errors import KilnError
from kiln.runs import (
    atomic_dir,
    atomic_write,
    atomic_write_text,
    clean_stale_temps,
    fingerprint,
    manifest,
    read_manifest,
)

DIGITS = "digits"
LISTING_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")
MESSAGES_PER_REASON = 3


@dataclass
class Listing:
    """What the driver found: items (a file path, or an index into the digits) with class indices,
    the class names, what was dropped before decoding, and a fingerprint of the inputs."""

    source: str  # digits | folder | listing
    items: list  # [(path str | digits index, class index)]
    classes: list[str]
    dropped: Counter
    messages: list[str]
    fingerprint: str


@dataclass
class ImageJob:
    index: int
    items: list
    source: str
    images: ImageDataConfig
    strict: bool
    work: str


def _stat_fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            st = Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _list_digits() -> Listing:
    import sklearn

    d = _digits()
    items = [(i, int(t)) for i, t in enumerate(d.target)]
    return Listing(DIGITS, items, [str(c) for c in d.target_names], Counter(), [], f"sklearn-{sklearn.__version__}")


def _list_folder(root: Path, ic: ImageDataConfig) -> Listing:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise KilnError(f"data.input '{root}' has no class folders; put each class's images in a subfolder "
                        "named after the class (or give a CSV / JSONL listing of path,label)")
    names = [f.name for f in folders]
    classes = list(ic.classes) or names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise KilnError(f"class folder(s) {unknown[:3]} in '{root}' are not in data.images.classes={classes}; "
                        "add them to the list or move them out of data.input")
    items, dropped, messages = [], Counter(), []
    for folder in folders:
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise KilnError(f"class folder '{folder}' holds no images; add images to it or remove the folder")
        items += [(str(f), classes.index(folder.name)) for f in files]
    stray = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    if stray:
        dropped["missing_label"] += len(stray)
        messages += [f"{f}: missing_label (not inside a class folder)" for f in stray[:MESSAGES_PER_REASON]]
    return Listing("folder", items, classes, dropped, messages, _stat_fingerprint([p for p, _ in items]))


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"image listing '{path}' cannot be read ({e}); give a UTF-8 CSV or JSONL file") from None
    if path.suffix.lower() == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(text))]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise KilnError(f"{path}:{n} is not valid JSON; each line of a JSONL listing is one "
                            '{"path": ..., "label": ...} object') from None
        rows.append(row if isinstance(row, dict) else {})
    return rows


def _list_rows(path: Path, ic: ImageDataConfig) -> Listing:
    rows = _rows(path)
    dropped, messages = Counter(), []

    def drop(n: int, reason: str, why: str) -> None:
        dropped[reason] += 1
        if dropped[reason] <= MESSAGES_PER_REASON:
            messages.append(f"{path}:{n}: {reason} ({why})")

    labelled = []
    for n, row in enumerate(rows, 2 if path.suffix.lower() == ".csv" else 1):
        ref, label = row.get(ic.path_field), row.get(ic.label_field)
        if ref in (None, ""):
            drop(n, "missing_path", f"no '{ic.path_field}' field")
        elif label is None or str(label).strip() == "":
            drop(n, "missing_label", f"no '{ic.label_field}' field")
        else:
            labelled.append((n, str(path.parent / str(ref)), str(label).strip()))
    if ic.classes:
        classes = list(ic.classes)
    else:
        names = {lab for _, _, lab in labelled}
        if names and all(_is_int(x) for x in names):  # class indices: 0 .. the largest
            classes = [str(i) for i in range(max(int(x) for x in names) + 1)] if any(int(x) >= 0 for x in names) else []
        else:
            classes = sorted(names)
    items = []
    for n, ref, label in labelled:
        if label in classes:
            items.append((ref, classes.index(label)))
        elif _is_int(label) and 0 <= int(label) < len(classes):
            items.append((ref, int(label)))
        else:
            drop(n, "label_out_of_range", f"label {label!r} is not one of the {len(classes)} classes")
    return Listing("listing", items, classes, dropped, messages,
                   _stat_fingerprint([str(path)] + [p for p, _ in items]))


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def list_images(spec: str, ic: ImageDataConfig) -> Listing:
    if spec == DIGITS:
        return _list_digits()
    path = Path(spec)
    if spec == "stdlib":
        raise KilnError("data.input=stdlib is text; with data.kind=images give 'digits', a folder with one subfolder "
                        "per class, or a CSV / JSONL listing of path,label")
    if path.is_dir():
        return _list_folder(path, ic)
    if path.is_file() and path.name.lower().endswith(LISTING_SUFFIXES):
        return _list_rows(path, ic)
    if path.is_file():
        raise KilnError(f"data.input '{spec}' is a file but not a CSV / JSONL listing; give a .csv or .jsonl of "
                        "path,label rows, a folder of class subfolders, or 'digits'")
    raise KilnError(f"data.input '{spec}' does not exist; give 'digits', a folder with one subfolder per class, "
                    "or a CSV / JSONL listing of path,label")


# ---- the per-task step -------------------------------------------------------------------------
_DIGITS_IMAGES = None


def decode_task(job: ImageJob) -> dict:
    """Decode one task's images into `work/decode/NNNNN.npz`; `NNNNN.json` (counts, drops) is the
    completion marker that lets a rerun skip the task."""
    from PIL import Image

    global _DIGITS_IMAGES
    d = Path(job.work) / "decode"
    name = f"{job.index:05d}"
    marker = d / f"{name}.json"
    if marker.is_file():
        try:
            return json.loads(marker.read_text())
        except json.JSONDecodeError:
            pass
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    c = 1 if job.images.mode == "L" else 3
    arrays, labels, dropped, messages = [], [], Counter(), []
    for ref, label in job.items:
        try:
            if job.source == DIGITS:
                if _DIGITS_IMAGES is None:
                    _DIGITS_IMAGES = _digits().images
                pixels = np.rint(_DIGITS_IMAGES[ref] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 gray levels
                arrays.append(decode_image(Image.fromarray(pixels, "L"), job.images))
            else:
                arrays.append(decode_image(ref, job.images))
            labels.append(label)
        except BadImage as e:
            if job.strict:
                raise KilnError(f"{ref}: {e.reason}: {e} (data.strict=true stops at the first bad image; set it "
                                "to false to skip and count such images)") from None
            dropped[e.reason] += 1
            if dropped[e.reason] <= MESSAGES_PER_REASON:
                messages.append([e.reason, f"{ref}: {e.reason} ({e})"])
    size = job.images.size
    images = np.stack(arrays) if arrays else np.zeros((0, c, size, size), dtype=np.uint8)
    atomic_write(d / f"{name}.npz", lambda f: np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64)))
    result = {"images": len(arrays), "dropped": dict(dropped), "messages": messages,
              "seconds": round(time.perf_counter() - t0, 3)}
    save_json(marker, result)
    return result


# ---- the driver --------------------------------------------------------------------------------
def split_indices(labels: np.ndarray, n_classes: int, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Each class shuffled by `seed` and cut into test, validation and train shares (stratified), so
    every split holds every class in proportion; train order is shuffled, the others sorted."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for k in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test, n_val = round(test * len(idx)), round(val * len(idx))
        if len(idx) >= 3:  # room for one of each
            n_test, n_val = max(1, n_test), max(1, n_val)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {s: np.sort(np.concatenate(p)).astype(np.int64) for s, p in parts.items()}
    out["train"] = rng.permutation(out["train"])
    return out


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]


def contact_sheet(images: np.ndarray, labels: np.ndarray, classes: list[str], per_class: int, path: Path) -> None:
    """A PNG grid: one row per class, its first `per_class` training images, the class name on the left."""
    from PIL import Image, ImageDraw

    c, h, w = images.shape[1:]
    cell = max(32, h)
    label_w = 8 + 7 * max(len(n) for n in classes[:200])
    rows = min(len(classes), 200)
    sheet = Image.new("RGB", (label_w + per_class * (cell + 2), rows * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k in range(rows):
        y = k * (cell + 2)
        draw.text((4, y + cell // 2 - 5), classes[k], fill=(0, 0, 0))
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
            a = images[i].transpose(1, 2, 0)
            im = Image.fromarray(a[:, :, 0], "L").convert("RGB") if c == 1 else Image.fromarray(a, "RGB")
            sheet.paste(im.resize((cell, round(cell * h / w)), Image.Resampling.NEAREST), (label_w + j * (cell + 2), y))
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def _print_messages(listing: Listing, results: list[dict]) -> list[str]:
    lines = list(listing.messages)
    shown = Counter()
    for r in results:
        for reason, line in r["messages"]:
            if shown[reason] < MESSAGES_PER_REASON:
                shown[reason] += 1
                lines.append(line)
    for line in lines:
        print(f"prepare: skipped {line}", file=sys.stderr)
    return lines


def prepare_images(cfg: Config) -> dict:
    out, ddir, ic = Path(cfg.out), data_dir(cfg), cfg.data.images
    clean_stale_temps(ddir.parent)
    t_start = time.perf_counter()
    listing = list_images(cfg.data.input, ic)
    inputs = fingerprint({"listing": listing.fingerprint, "input": cfg.data.input,
                          "data": {k: v for k, v in asdict(cfg.data).items()
                                   if k in ("images", "val_fraction", "seed", "kind")}})
    old = read_manifest(ddir)
    if old and old.get("kind") == "images" and old.get("inputs") == inputs:
        print(f"prepare: {ddir} is up to date with its inputs, skipping")
        return old
    check_not_a_trained_run(cfg, out, ddir)
    work = work_dir(ddir)
    if (work / "inputs").is_file() and (work / "inputs").read_text() != inputs:
        shutil.rmtree(work)
    resumed = sum(1 for _ in (work / "decode").glob("*.json")) if work.is_dir() else 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "inputs").write_text(inputs)

    images, labels, dropped, messages, meta = _decode_all(cfg, listing, work, resumed)
    man = _write_data(cfg, ddir, listing, images, labels, dropped, messages, inputs, meta, t_start)
    splits, c, n_classes = man["splits"], man["channels"], len(listing.classes)
    drops = ", ".join(f"{k}: {v}" for k, v in dropped.most_common()) or "none"
    mean, std = man["mean"], man["std"]
    write_image_report(out, ddir, man)
    shutil.rmtree(work, ignore_errors=True)
    s = {k: v["images"] for k, v in splits.items()}
    print(f"prepare: {len(labels):,} images kept of {man['read']['listed']:,} (dropped: {drops}); "
          f"{s['train']:,} train, {s['val']:,} validation, {s['test']:,} test; {n_classes} classes, "
          f"{c}×{ic.size}×{ic.size}; mean {[round(m, 3) for m in mean]}, std {[round(v, 3) for v in std]}")
    return man


def _decode_all(cfg: Config, listing, work: Path, resumed: int):
    """Decode and resize every listed image in tasks on the executor (each task's result kept in
    `work`, so an interrupted run resumes); returns (images, labels, drop counts, messages,
    {executor, tasks, decode seconds}), refusing a corpus with no image left or an empty class."""
    ic = cfg.data.images
    per = ic.task_images
    jobs = [ImageJob(i, listing.items[s : s + per], listing.source, ic, cfg.data.strict, str(work))
            for i, s in enumerate(range(0, len(listing.items), per))]
    with Executor(cfg.data.executor) as ex:
        print(f"prepare: {len(listing.items):,} images of {len(listing.classes)} classes from '{cfg.data.input}' in "
              f"{len(jobs)} tasks on {ex.label}" + (f"; resuming ({resumed} tasks already decoded)" if resumed else ""))
        t = time.perf_counter()
        results = ex.map(decode_task, jobs, "prepare: decode")
        decode_s = time.perf_counter() - t
        label = ex.label
    messages = _print_messages(listing, results)
    dropped = Counter(listing.dropped)
    for r in results:
        dropped.update(r["dropped"])
    parts = [np.load(work / "decode" / f"{j.index:05d}.npz") for j in jobs]
    c = 1 if ic.mode == "L" else 3
    images = np.concatenate([p["images"] for p in parts]) if parts else np.zeros((0, c, ic.size, ic.size), np.uint8)
    labels = np.concatenate([p["labels"] for p in parts]) if parts else np.zeros(0, np.int64)
    n_classes = len(listing.classes)
    counts = np.bincount(labels, minlength=n_classes) if n_classes else np.zeros(0, int)
    drops = ", ".join(f"{k}: {v}" for k, v in dropped.most_common()) or "none"
    if not len(labels):
        raise KilnError(f"no images left from data.input '{cfg.data.input}' (dropped: {drops}); fix the inputs or "
                        "the data.images settings named in the reasons")
    empty = [listing.classes[k] for k in range(n_classes) if counts[k] == 0]
    if empty:
        raise KilnError(f"class(es) {empty[:5]} have no usable image (dropped: {drops}); add images to them or "
                        "remove them from data.images.classes / the listing")
    return images, labels, dropped, messages, {"executor": label, "tasks": len(jobs), "decode_s": decode_s}


def _write_data(cfg: Config, ddir: Path, listing, images: np.ndarray, labels: np.ndarray, dropped: Counter,
                messages: list[str], inputs: str, meta: dict, t_start: float) -> dict:
    """Split by class, write the uint8 shards, the contact sheet and the manifest into `ddir`
    (whole or not at all); returns the manifest."""
    ic = cfg.data.images
    c, n_classes = (1 if ic.mode == "L" else 3), len(listing.classes)
    t = time.perf_counter()
    split = split_indices(labels, n_classes, cfg.data.val_fraction, ic.test_fraction, cfg.data.seed)
    if not len(split["train"]):
        raise KilnError("the training split is empty; lower data.val_fraction / data.images.test_fraction")
    mean, std = channel_stats(images[split["train"]])
    splits = {}
    with atomic_dir(ddir) as tmp:
        for name in SPLITS:
            idx = split[name]
            splits[name] = {"shards": write_shards(tmp, name, images[idx], labels[idx], ic.shard_images),
                            "images": int(len(idx)), "per_class": np.bincount(labels[idx], minlength=n_classes).tolist()}
        train = split["train"]
        contact_sheet(images[train], labels[train], listing.classes, ic.contact_per_class, tmp / "contact_sheet.png")
        man = manifest("prepare", asdict(cfg.data), inputs, kind="images", source=listing.source,
                       classes=listing.classes, size=ic.size, mode=ic.mode, channels=c, mean=mean, std=std,
                       splits=splits, read={"listed": len(listing.items) + sum(listing.dropped.values()),
                                            "kept": int(len(labels)), "dropped": dict(dropped)},
                       messages=messages, executor=meta["executor"], tasks=meta["tasks"],
                       seconds={"decode": round(meta["decode_s"], 2), "shards": round(time.perf_counter() - t, 2),
                                "total": round(time.perf_counter() - t_start, 2)})
        (tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    return man


# ---- reports -----------------------------------------------------------------------------------
def write_image_report(run: Path, ddir: Path, man: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = ["# kiln prepare report (images)", "", *image_data_lines(run, man, ddir)]
    path = run / "prepare_report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
