"""Time and peak-memory growth of refusing hostile model uploads (issues 13 and 18), as a Markdown table.

``python scripts/hostile_models.py`` writes a tiny valid checkpoint and variants next to it in a temporary
folder, then loads each with ``load_segmenter`` in this process: per case the refusal (first 70
characters), the wall time, and the growth of peak resident memory (``VmHWM`` reset through
``/proc/self/clear_refs`` before each case; Linux only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from algm_viz.models import create_segmenter, load_segmenter, save_segmenter

NET = {"backbone": "vit_tiny_patch16_384", "d_model": 32, "n_heads": 2, "n_layers": 2, "patch_size": 16,
       "image_size": 64, "n_cls": 5, "decoder": {"name": "linear"}}
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "net_kwargs: {backbone: *i}\n"


def _variant(**net) -> str:
    return yaml.safe_dump({"net_kwargs": {**NET, **net}})


CASES = {
    "valid tiny checkpoint (loads)": _variant(),
    "YAML bomb (9 levels of 9 aliases)": BOMB,
    "40 MB variant.yml": _variant() + "# padding\n" * 4_000_000,
    "!!python/object/apply:os.system": "net_kwargs: !!python/object/apply:os.system ['true']\n",
    "d_model 100000": _variant(d_model=100_000),
    "image_size 100000²": _variant(image_size=[100_000, 100_000]),
    "n_cls 10000000": _variant(n_cls=10_000_000),
    "d_model 2048 × 12 layers (budget)": _variant(d_model=2048, n_heads=16, n_layers=12, d_ff=8192, image_size=512),
    "1024 classes at 2048² (activation budget)": _variant(n_cls=1024, image_size=2048, patch_size=32),
    "backbone hf-hub:…": _variant(backbone="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"),
    "backbone local-dir:/etc": _variant(backbone="local-dir:/etc"),
}


def _status(field: str) -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = create_segmenter(NET["backbone"], decoder="linear", num_classes=NET["n_cls"], image_size=NET["image_size"],
                                 embed_dim=NET["d_model"], depth=NET["n_layers"], num_heads=NET["n_heads"])
        weights = save_segmenter(model, root / "valid", NET) / "checkpoint.pth"
        load_segmenter(root / "valid")  # warm-up: lazy imports do not count
        print("| case | result | time (ms) | peak RSS growth (MiB) |\n| --- | --- | --- | --- |")
        for i, (name, text) in enumerate(CASES.items()):
            folder = root / f"case{i}"
            folder.mkdir()
            (folder / "checkpoint.pth").symlink_to(weights)
            (folder / "variant.yml").write_text(text)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            before, start = _status("VmRSS"), time.perf_counter()
            try:
                load_segmenter(folder)
                result = "loaded"
            except ValueError as error:
                result = str(error)[:70] + ("…" if len(str(error)) > 70 else "")
            seconds = time.perf_counter() - start
            growth = (_status("VmHWM") - before) / 2**20
            print(f"| {name} | {result.replace('|', '/')} | {seconds * 1000:.1f} | {growth:.1f} |")


if __name__ == "__main__":
    main()
