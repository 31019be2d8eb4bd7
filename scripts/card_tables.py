"""The model card's result tables, written from a sweep file so that no figure is typed by hand:
``python scripts/card_tables.py assets/models/camvid-vit-tiny [--sweep sweep.json]``.

Prints Markdown: the rows at the calibrated τ (``--taus ...,auto``) with ΔmIoU and its paired bootstrap interval,
one sentence per method (mIoU change, GFLOPs saved, measured speed-up, and whether the interval includes a loss
larger than 1 mIoU), the full τ sweep, and the per-class IoU at the calibrated τ. ``tests/test_bundled.py`` checks
the card's rows against the sweep file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("file", "method", "τ local", "τ global", "mIoU", "ΔmIoU [95 % CI]", "GFLOPs", "images/s",
           "tokens after CLAP", "tokens after GBM")


def _tau(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _delta(row: dict[str, Any]) -> str:
    if row["method"] == "baseline" or row.get("delta_miou") is None:
        return "–"
    low, high = row["delta_miou_ci"]
    return f"{row['delta_miou']:+.2f} [{low:+.2f}, {high:+.2f}]"


def _table(rows: list[dict[str, Any]], file: str) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        tokens = row["tokens"]
        cells = (file, row["method"], _tau(row["local_threshold"]), _tau(row["global_threshold"]), f"{row['miou']:.2f}",
                 _delta(row), f"{row['gflops']:.2f}", f"{row['images_per_s']:.2f}", f"{tokens['local']:.1f}",
                 f"{tokens['global']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sentence(row: dict[str, Any], baseline: dict[str, Any]) -> str:
    low, high = row["delta_miou_ci"]
    saved = 100 * (1 - row["gflops"] / baseline["gflops"])
    speed = row["images_per_s"] / baseline["images_per_s"]
    verdict = ("the interval includes a loss larger than 1.0 mIoU" if low < -1.0
               else "the whole interval lies within 1.0 mIoU of the baseline")
    return (f"- `{row['method']}` at the calibrated τ: **{row['miou']:.2f} mIoU** ({row['delta_miou']:+.2f}, paired "
            f"bootstrap 95 % interval [{low:+.2f}, {high:+.2f}]: {verdict}), **{saved:.1f} % fewer GFLOPs** "
            f"({baseline['gflops']:.2f} → {row['gflops']:.2f}), measured CPU speed-up {speed:.2f}× "
            f"({baseline['images_per_s']:.2f} → {row['images_per_s']:.2f} images/s).")


def card_tables(sweep: dict[str, Any], file: str) -> str:
    """The Markdown of the card's result section for one sweep document."""
    rows = sweep["rows"]
    baseline = next(r for r in rows if r["method"] == "baseline")
    calibrated = [r for r in rows if r.get("value") == "auto"]
    swept = [r for r in rows if r["method"] != "baseline" and r.get("value") != "auto"]
    names = sweep["class_names"]
    lines = ["At the calibrated τ:", "", *_table([baseline, *calibrated], file), ""]
    lines += [_sentence(row, baseline) for row in calibrated]
    lines += ["", "Full τ sweep (one τ for both stages):", "", *_table([baseline, *swept], file), ""]
    lines += ["Per-class IoU (%) at the calibrated τ:", "",
              "| class | baseline | " + " | ".join(r["method"] for r in calibrated) + " |",
              "| --- | --- | " + " | ".join("---" for _ in calibrated) + " |"]
    for index, name in enumerate(names):
        values = [baseline, *calibrated]
        lines.append(f"| {name} | " + " | ".join(f"{r['per_class_iou'][index]:.1f}" for r in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="the bundled model's folder")
    parser.add_argument("--sweep", default="sweep.json", help="the sweep file in that folder")
    args = parser.parse_args()
    print(card_tables(json.loads((args.model / args.sweep).read_text()), args.sweep))


if __name__ == "__main__":
    main()
