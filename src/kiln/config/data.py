"""`data.*`: what `kiln prepare` reads and how it cleans, tokenizes and shards it, text or images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config.schema import ranged


@dataclass
class ReaderConfig:
    format: Literal["auto", "stdlib", "text", "jsonl", "parquet", "warc"] = "auto"  # auto = by file name
    text_field: str = "text"  # JSONL / Parquet column holding the text
    id_field: str = "id"  # JSONL / Parquet column naming the document ("" = file:record)
    url_field: str = "url"  # JSONL / Parquet column with the source URL, if any
    html: Literal["auto", "always", "never"] = "auto"  # extract main text from HTML (auto: WARC, .html files)
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    extract_timeout_s: float = ranged(5.0, gt=0)  # per-document time limit for the HTML extractor
    max_record_bytes: int = ranged(16_000_000, ge=1)  # skip a record (file, line, row, WARC record) larger than this
    task_bytes: int = ranged(64_000_000, ge=1)  # split JSONL / text-line inputs larger than this into byte-range tasks


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int = ranged(0, ge=0)  # worker processes (local) or concurrent tasks (ray); 0 = the CPU count
    ray_address: str = ""  # "" = start a local Ray instance; "auto" or host:port = join a cluster


@dataclass
class TokenizerConfig:
    vocab_size: int = ranged(8192, ge=264)  # byte-level BPE vocabulary: 256 bytes + 7 special tokens + merges
    path: str = ""  # an existing tokenizer.json to use instead of training one
    train_bytes: int = ranged(0, ge=0)  # train on at most this many bytes of text (0 = all)


@dataclass
class ImageDataConfig:
    """`kiln prepare` with data.kind=images: how images are decoded, sized, split and stored."""

    size: int = ranged(32, ge=4)  # side of the square images stored, in pixels
    mode: Literal["RGB", "L"] = "RGB"  # stored channels: RGB (3) or L (grayscale, 1)
    fit: Literal["crop", "pad"] = "crop"  # keep the aspect ratio, then center-crop or pad to a square
    upscale: bool = False  # enlarge images smaller than `size`; false: skip them (counted as smaller_than_size)
    test_fraction: float = ranged(0.1, gt=0, lt=1)  # share of each class held out for test (data.val_fraction: validation)
    classes: list[str] = field(default_factory=list)  # class names in label order; [] = folder names / listing labels, sorted
    path_field: str = "path"  # CSV / JSONL column with the image path (relative to the listing's folder)
    label_field: str = "label"  # CSV / JSONL column with the class name or index
    max_pixels: int = ranged(89_478_485, ge=1)  # skip larger images (decompression bombs); Pillow's own limit
    task_images: int = ranged(512, ge=1)  # images per preparation task (the unit of parallelism and of resume)
    shard_images: int = ranged(50_000, ge=1)  # images per shard file
    contact_per_class: int = ranged(8, ge=1)  # samples per class on the report's contact sheet


@dataclass
class DataConfig:
    input: str = "stdlib"  # "stdlib" (this interpreter's standard library), a path, a directory or a glob
    path: str = ""  # prepared data directory pretrain reads; "" = <out>/data
    val_fraction: float = ranged(0.02, gt=0, lt=1)  # share of documents held out for validation (split by document id)
    max_docs: int = ranged(0, ge=0)  # keep at most this many documents after every stage (0 = all)
    min_chars: int = ranged(64, ge=0)  # the `length` stage: drop documents shorter than this
    max_chars: int = ranged(2_000_000, ge=1)  # the `length` stage: drop documents longer than this
    preset: Literal["auto", "code", "web", "minimal"] = "auto"  # stages used when `stages` is empty (auto: by input)
    stages: list[Any] = field(default_factory=list)  # [name | {name: {option: value}}]; see docs/data.md
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    exclusions: bool = False  # write every dropped document (id, stage, reason, url, source file) to <data>/exclusions.jsonl
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard_tokens: int = ranged(50_000_000, ge=1)  # tokens per shard file
    seed: int = ranged(0, ge=0)  # shuffles document order across the corpus
    kind: Literal["text", "images"] = "text"  # images: data.input is `digits`, an image folder or a CSV/JSONL listing
    images: ImageDataConfig = field(default_factory=ImageDataConfig)
    # The sharded global steps (docs/data.md, "At scale"): the dedup's bucket size sets how many bucket tasks sort
    # key records (at least one per worker; a task holds about 2.5x this; the decisions do not depend on it);
    # the shuffle puts this many training tokens in each bucket task (the shard layout depends on it; one
    # bucket = one whole-corpus permutation).
    dedup_bucket_bytes: int = ranged(256_000_000, ge=1)
    shuffle_bucket_tokens: int = ranged(1_000_000_000, ge=1)
