"""COVID-19 infection masks on CT slices and the infected fraction of the lung (paper 003's segmentation step).

Any U-Net checkpoint of :mod:`lungsight.models.unet` whose header says ``task: "infection-segmentation"`` is an
infection model: ``lungsight segment train --layout nifti --target infection`` on COVID-19-CT-Seg or MedSeg writes one
(docs/ct-segmentation.md). :class:`InfectionSegmenter` runs it on every slice of a CT :class:`~lungsight.study.Study`;
the lung mask that the fraction is taken over comes from :func:`lungsight.preprocess.ct_lungs.derive_lung_mask_hu`
(a HU threshold rule; 8-bit slices are mapped back to HU through the lung window) or from a CT lung U-Net
(``lung_model``). The infected fraction of lung is the infection pixels inside the lung mask over the lung pixels,
summed over the slices (equal pixel area per slice, so pixels stand in for area).

:func:`add_infection` is the hook of ``lungsight predict --infection-model FILE``: it adds ``result["infection"]``
and writes ``overlays/infection_NNNN.png`` (slice | infection probability over it, lung outlined) for the slices with
the most infection.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lungsight.errors import InputError
from lungsight.explain.overlay import save_overlay
from lungsight.models.unet import TASK as LUNG_TASK
from lungsight.models.unet import load_lung_unet, normalise, unet_image
from lungsight.preprocess.ct_lungs import derive_lung_mask_hu, grey_to_hu
from lungsight.preprocess.window import to_unit
from lungsight.study import Study

TASK = "infection-segmentation"
BATCH = 16
N_OVERLAYS = 4


@dataclass
class InfectionResult:
    """Per-slice infection probability and masks of one study, and the lung mask they are measured against."""

    probabilities: np.ndarray  # (n, H, W) float32
    infection: np.ndarray  # (n, H, W) bool
    lung: np.ndarray  # (n, H, W) bool
    lung_source: str

    @property
    def fraction_of_lung(self) -> float | None:
        """Infection pixels inside the lung over lung pixels, all slices together (None when no lung was found)."""
        lung = int(self.lung.sum())
        return None if lung == 0 else float((self.infection & self.lung).sum() / lung)

    def per_slice(self, labels: list[str]) -> list[dict[str, Any]]:
        """One entry per slice that has lung: index, label, lung and infected pixels, infected fraction."""
        rows = []
        for k in np.flatnonzero(self.lung.any(axis=(1, 2))):
            lung, inf = int(self.lung[k].sum()), int((self.infection[k] & self.lung[k]).sum())
            rows.append(
                {"index": int(k), "label": labels[k], "lung_px": lung, "infection_px": inf, "fraction": inf / lung}
            )
        return rows


def _slices01(study: Study) -> np.ndarray:
    return to_unit(study.pixels, study.intensity)


def _hu(study: Study) -> np.ndarray:
    return study.pixels if study.intensity == "hu" else grey_to_hu(_slices01(study))


@torch.no_grad()
def _unet_probabilities(model: torch.nn.Module, config: dict[str, Any], slices01: np.ndarray) -> np.ndarray:
    """Sigmoid output of a U-Net on each ``(H, W)`` slice, resized back to the slice, ``(n, H, W)`` float32."""
    size, pre = int(config["input_size"]), str(config.get("preprocess", "equalise"))
    out = []
    for i in range(0, len(slices01), BATCH):
        x = torch.from_numpy(np.stack([unet_image(s, size, pre) for s in slices01[i : i + BATCH]]))
        p = torch.sigmoid(model(normalise(x[:, None])))
        out.append(F.interpolate(p, size=slices01.shape[1:], mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(out).numpy()


class InfectionSegmenter:
    """A trained infection U-Net (``task: "infection-segmentation"``) applied slice by slice to CT studies."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: dict[str, Any],
        name: str = "infection-unet",
        lung_model: tuple[torch.nn.Module, dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.config, self.name = model.eval(), config, name
        self.threshold = float(config["threshold"])
        self.lung_model = lung_model

    @classmethod
    def from_file(cls, path: Path, lung_model: Path | None = None) -> InfectionSegmenter:
        """Load an infection model, and optionally a CT lung U-Net (else lungs come from the HU rule)."""
        model, config = load_lung_unet(Path(path), TASK)
        lung = load_lung_unet(Path(lung_model), LUNG_TASK) if lung_model else None
        return cls(model, config, name=Path(path).name, lung_model=lung)

    def lung_mask(self, study: Study) -> tuple[np.ndarray, str]:
        """``(n, H, W)`` lung mask of the study and where it came from."""
        if self.lung_model is None:
            return derive_lung_mask_hu(_hu(study)), "derived from HU (threshold rule, derive_lung_mask_hu)"
        model, config = self.lung_model
        probs = _unet_probabilities(model, config, _slices01(study))
        return probs >= float(config["threshold"]), "lung U-Net"

    def segment(self, study: Study) -> InfectionResult:
        """Infection probability and mask of every slice, with the lung mask."""
        if study.modality != "CT":
            raise InputError(f"infection segmentation needs a CT study, got {study.modality}")
        probs = _unet_probabilities(self.model, self.config, _slices01(study))
        lung, source = self.lung_mask(study)
        return InfectionResult(probs, probs >= self.threshold, lung, source)


def infection_summary(result: InfectionResult, study: Study, model_name: str) -> dict[str, Any]:
    """The ``result["infection"]`` entry of a prediction (overlays are added by :func:`add_infection`)."""
    return {
        "model": model_name,
        "lung_mask": result.lung_source,
        "fraction_of_lung": result.fraction_of_lung,
        "per_slice": result.per_slice(study.slice_labels),
    }


def add_infection(pred: Any, study: Study, model_path: Path, out_dir: Path, lung_model: Path | None = None) -> dict:
    """Segment infection in ``study``, add ``pred.result["infection"]`` and write its overlays into ``out_dir``."""
    segmenter = InfectionSegmenter.from_file(model_path, lung_model)
    result = segmenter.segment(study)
    entry = infection_summary(result, study, segmenter.name)
    slices01 = _slices01(study)
    worst = sorted(entry["per_slice"], key=lambda r: -r["infection_px"])[:N_OVERLAYS]
    overlays = []
    for row in sorted(worst, key=lambda r: r["index"]):
        k = row["index"]
        rel = f"overlays/infection_{k:04d}.png"
        caption = f"{row['label']}  infection {100 * row['fraction']:.1f}% of lung"
        save_overlay(slices01[k], result.probabilities[k], out_dir / rel, caption, mask_outline=result.lung[k])
        overlays.append({"index": k, "file": rel})
    entry["overlays"] = overlays
    pred.result["infection"] = entry
    return entry
