"""A real-photo quality set: tree crowns in NEON aerial RGB photos (10 cm per pixel), one class.

    python -m benchmarks.tree_crowns --out data/tree-crowns
    python -m benchmarks.quality --config benchmarks/tree-crowns.yaml data.root=data/tree-crowns

The photos and their hand-drawn boxes are the sample data of the DeepForest package (MIT; NEON imagery),
taken from its wheel on PyPI (``pip download deepforest==2.1.0 --no-deps``, or ``--wheel FILE``); nothing of
its code is used. Each photo is cut into ``--tile`` px tiles at its own resolution (the last row and column
of tiles end at the photo's edge, overlapping their neighbours); a box cut by a tile's edge is kept, clipped,
when at least half its area lies inside, and dropped otherwise. The splits are different places: train is
the 2299 x 2472 photo 2019_YELL_2_528000_4978000 (574 crowns drawn: 90 tiles, 600 boxes), val the
1249 x 1035 photo 2019_YELL_2_541000_4977000 (279 crowns) and OSBS_029 (400 x 400, 61 crowns): 29 tiles,
440 boxes. Crowns are 8-107 px wide (median about 40). The tiles are written as a YOLO dataset (JPEG
quality 95) and sharded with this project's ``make_shards``, ``--shard-size`` tiles per shard in the
photos' raster order (90 train tiles are 6 shards of 15, which 1, 2, 3 or 6 data ranks split evenly).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image

from pipeline.data.make import make_shards

WHEEL = "deepforest==2.1.0"
SPLITS = {
    "train": ["2019_YELL_2_528000_4978000_image_crop2"],
    "val": ["2019_YELL_2_541000_4977000_image_crop", "OSBS_029"],
}
MIN_INSIDE = 0.5  # fraction of a crown's box a tile must hold for the crown to be labelled there


def tile_origins(size: int, tile: int) -> list[int]:
    """Left (or top) edges of the tiles covering ``size`` px; the last one ends at the edge."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile), size - tile]


def read_boxes(xml: bytes) -> tuple[str, list[tuple[float, float, float, float]]]:
    """(image file name, boxes xyxy in pixels) of a Pascal VOC annotation."""
    root = ET.fromstring(xml)
    boxes = [
        tuple(float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        for obj in root.iter("object")
    ]
    return root.findtext("filename"), boxes


def tile_boxes(
    boxes: list[tuple[float, float, float, float]], x0: int, y0: int, tile: int
) -> list[tuple[float, float, float, float]]:
    """The boxes of one tile, xyxy in the tile's pixels: clipped, kept if ``MIN_INSIDE`` of each is in."""
    kept = []
    for x1, y1, x2, y2 in boxes:
        cx1, cy1 = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
        cx2, cy2 = min(x2 - x0, float(tile)), min(y2 - y0, float(tile))
        inside = max(cx2 - cx1, 0.0) * max(cy2 - cy1, 0.0)
        if inside >= MIN_INSIDE * (x2 - x1) * (y2 - y1):
            kept.append((cx1, cy1, cx2, cy2))
    return kept


def write_yolo(wheel: Path, folder: Path, tile: int) -> Path:
    """Tile the wheel's photos into ``folder`` as a YOLO dataset; returns its data YAML."""
    with zipfile.ZipFile(wheel) as zf:
        for split, stems in SPLITS.items():
            images, labels = folder / "images" / split, folder / "labels" / split
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
            for stem in stems:
                name, boxes = read_boxes(zf.read(f"deepforest/data/{stem}.xml"))
                with zf.open(f"deepforest/data/{name}") as f:
                    photo = Image.open(f).convert("RGB")
                for y0 in tile_origins(photo.height, tile):
                    for x0 in tile_origins(photo.width, tile):
                        crop = photo.crop((x0, y0, x0 + tile, y0 + tile))
                        key = f"{stem}_{x0}_{y0}"
                        crop.save(images / f"{key}.jpg", quality=95)
                        rows = [
                            f"0 {(a + c) / 2 / crop.width:.6f} {(b + d) / 2 / crop.height:.6f} "
                            f"{(c - a) / crop.width:.6f} {(d - b) / crop.height:.6f}\n"
                            for a, b, c, d in tile_boxes(boxes, x0, y0, tile)
                        ]
                        (labels / f"{key}.txt").write_text("".join(rows))
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames: {{0: tree}}\n")
    return data_yaml


def download_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(into)]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: pip could not download {WHEEL} (no package index?); pass --wheel FILE")
    return next(into.glob("deepforest-*.whl"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="shard root to write (train and val splits)")
    parser.add_argument("--wheel", type=Path, help=f"a {WHEEL} wheel (default: pip download it)")
    parser.add_argument("--tile", type=int, default=256, help="tile side in px (default 256)")
    parser.add_argument("--shard-size", type=int, default=15, help="samples per shard (default 15)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tree-crowns-") as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        try:
            data_yaml = write_yolo(wheel, Path(tmp) / "yolo", args.tile)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise SystemExit(f"error: {wheel} is not a readable {WHEEL} wheel: {exc}") from None
        for split in SPLITS:
            manifest = make_shards("yolo", args.out, split, data_yaml=data_yaml, shard_size=args.shard_size)
            print(f"{split}: {manifest.num_samples} tiles, {manifest.num_boxes} crowns -> {manifest.path}")


if __name__ == "__main__":
    main()
