"""Data: split files, long-tail profiles, sources, curation, datasets and transforms; one path
identity and folder walk (`paths`), one image loader (`images`), one batching of images
(`loader`)."""
from oltr.data.curation import curate, load_manifest, verify_manifest
from oltr.data.datasets import (
    Benchmark,
    ImageListDataset,
    dataset_for,
    load_benchmark,
    report_skipped_images,
)
from oltr.data.images import load_image
from oltr.data.loader import ImageLoader
from oltr.data.paths import ImageLocator, walk_images
from oltr.data.profiles import PROFILES, class_counts
from oltr.data.sources import Source, find_fashion_mnist, parse_source, read_idx
from oltr.data.splits import (
    OPEN_LABEL,
    read_split_file,
    read_split_lines,
    sha256_file,
    write_split_file,
)
from oltr.data.transforms import TRANSFORM_PRESETS, build_transform

__all__ = [
    "OPEN_LABEL",
    "PROFILES",
    "TRANSFORM_PRESETS",
    "Benchmark",
    "ImageListDataset",
    "ImageLoader",
    "ImageLocator",
    "Source",
    "build_transform",
    "class_counts",
    "curate",
    "dataset_for",
    "find_fashion_mnist",
    "load_benchmark",
    "load_image",
    "load_manifest",
    "parse_source",
    "read_idx",
    "read_split_file",
    "read_split_lines",
    "report_skipped_images",
    "sha256_file",
    "verify_manifest",
    "walk_images",
    "write_split_file",
]
