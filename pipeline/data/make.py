"""One entry point from a dataset on disk (COCO, YOLO, VOC) or the synthetic set to shards."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.manifest import DataError, Manifest
from pipeline.data.readers import read_coco, read_voc
from pipeline.data.synthetic import SYNTHETIC_CLASSES, synthetic_records
from pipeline.data.writer import write_shards
from pipeline.data.yolo_reader import read_yolo, read_yolo_split

FORMATS = ("coco", "yolo", "voc", "synthetic")


def make_shards(
    dataset_format: str,
    out: str | Path,
    split: str,
    *,
    source: str | Path | None = None,
    shard_size: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    annotations: str | Path | None = None,
    data_yaml: str | Path | None = None,
    num: int = 512,
    image_size: int = 256,
    seed: int = 0,
) -> Manifest:
    """Read ``source`` in ``dataset_format`` (one of FORMATS), write ``out/<split>-*.tar`` and the manifest.

    ``source`` is the image directory (coco) or dataset root (voc, one-folder yolo); without it, yolo reads
    the split ``split`` of ``data_yaml`` (``read_yolo_split``). Unused for synthetic, which
    renders ``num`` images of ``image_size`` pixels from ``seed``. Raises DataError for missing inputs;
    see ``write_shards`` for the rest.
    """
    if dataset_format not in FORMATS:
        raise DataError(f"unknown dataset format {dataset_format!r}; expected one of {FORMATS}")
    if dataset_format == "synthetic":
        info = {"format": "synthetic", "num": num, "image_size": image_size, "seed": seed}
        records, class_names, report = synthetic_records(num, image_size, seed), list(SYNTHETIC_CLASSES), None
        ground_truth = None
    else:
        if source is None and dataset_format != "yolo":
            raise DataError(f"format {dataset_format!r} needs a source directory (--source)")
        if dataset_format == "coco":
            if annotations is None:
                raise DataError("format 'coco' needs the instances JSON (--annotations)")
            found = read_coco(annotations, source)
        elif dataset_format == "yolo":
            if data_yaml is None:
                raise DataError("format 'yolo' needs the data YAML (--data-yaml)")
            found = read_yolo(source, data_yaml) if source is not None else read_yolo_split(data_yaml, split)
        else:
            found = read_voc(source)
        records, class_names, report, info = found.records, found.class_names, found.report, found.info
        ground_truth = found.ground_truth
    return write_shards(
        records, class_names, out, split, shard_size, max_side, workers, overwrite, info, report, ground_truth
    )
