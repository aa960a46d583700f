"""Record tests/golden/references.json with the bundled ct-default (see cases.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cases import BUNDLED_EXAMPLE, CASES, REFERENCES, summary

import lungsight
from lungsight.examples import EXAMPLE_CT


def main() -> None:
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    det = lungsight.Detector.from_pretrained("ct-default")
    refs = {"model_sha256": det.entry.sha256}
    paths = {name: data / rel for name, rel in CASES.items()} | {BUNDLED_EXAMPLE: EXAMPLE_CT}
    for name, path in paths.items():
        refs[name] = summary(det.predict(lungsight.load_study(path), explain=False).result)
        print(name, refs[name]["label"], len(refs[name]["selected"]), "slices kept")
    REFERENCES.write_text(json.dumps(refs, indent=1) + "\n")


if __name__ == "__main__":
    main()
