"""The engine's share of a forward for each token reducer on a Segmenter built from a timm backbone (issue 15).

    OMP_NUM_THREADS=1 python scripts/engine_share.py --backbone vit_small_patch16_384 --size 512

The model has random weights (the clustering, matching and merging cost the same whatever the weights); its input
is ``--images`` ADE20K sample images from ``--data`` resized to ``--size``² (synthetic scenes where the folder is
absent). For each ``METHOD:VALUE`` of ``--methods``: the median forward time, the median engine time (a wall clock
over the ``algm.*`` ranges on the CPU) and the median of their per-image ratio
(:func:`~algm_viz.evaluation.bench.engine_share`). Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from algm_viz.evaluation.bench import engine_share
from algm_viz.evaluation.inference import prepare
from algm_viz.methods import apply_method
from algm_viz.models import create_segmenter
from algm_viz.patch import merging_restored
from algm_viz.scenes import street_scene

DEFAULT_METHODS = ["expedite:0.4", "ailurus:0.4", "ailurus_prop:0.65", "tome:28", "algm:0.9"]


def load_images(data: Path, count: int, size: int) -> tuple[list[np.ndarray], str]:
    """``count`` ``[size, size, 3]`` uint8 RGB images and where they come from."""
    paths = sorted(data.rglob("*.jpg"))[:count]
    if len(paths) == count:
        return [cv2.resize(cv2.imread(str(p))[:, :, ::-1], (size, size), interpolation=cv2.INTER_AREA) for p in paths], str(data)
    scenes = [cv2.resize(street_scene(i).image, (size, size), interpolation=cv2.INTER_AREA) for i in range(count)]
    return scenes, f"synthetic street scenes (fewer than {count} images under {data})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16_384")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, metavar="METHOD:VALUE")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per image (and engine-timed ones)")
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ade20k_samples")
    args = parser.parse_args()
    model = create_segmenter(args.backbone, num_classes=150, image_size=args.size).eval()
    images, source = load_images(args.data, args.images, args.size)
    for spec in args.methods:
        method, _, value = spec.partition(":")
        with merging_restored(model), torch.inference_mode():
            apply_method(model, method, float(value))
            share = engine_share(model, [prepare(model, image, None, "cpu") for image in images], args.repeats)
        print(json.dumps({"backbone": args.backbone, "size": args.size, "images": source, "threads": torch.get_num_threads(),
                          "method": method, "value": float(value), "forward_ms": round(share["forward_ms"], 1),
                          "engine_ms": round(share["engine_ms"], 2), "share": round(share["engine_fraction"], 4)}))

if __name__ == "__main__":
    main()
