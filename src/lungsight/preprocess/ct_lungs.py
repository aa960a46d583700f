"""Lung masks of a CT volume derived from Hounsfield units by a fixed rule (no learning, no manual masks).

:func:`derive_lung_mask_hu` is the classical threshold-and-components lung extraction:

1. *air*: voxels below ``threshold`` (-400 HU: aerated lung is about -900..-500 HU, soft tissue above -100 HU),
   labelled into 3-D connected components;
2. *lung, not air*: aerated lung is a mix of air and tissue (alveolar walls, vessels), so even its darkest tenth of
   voxels is denser than pure air; a component whose 10th percentile is below ``pure_air`` (-960 HU) is pure air -
   the air around the patient and under the table, bowel gas - and is dropped. This works on cropped
   volumes too, where the lungs touch the image border and "air connected to the border" would remove them;
3. *lungs*: of the remaining components the largest and, when it is at least ``min_share`` of that size, the
   second largest (the other lung, when the two are not joined) are kept;
4. *holes*: each slice's mask has its holes filled, which brings the vessels and dense opacities that lie inside the
   lung back into it.

This is how the lung targets of ``chest_ct_cropped.nii.gz`` are made for ``lungsight segment train --masks hu``
(docs/ct-segmentation.md): a U-Net trained on them learns this rule, and its Dice measures agreement with the rule,
not with a radiologist. Known weaknesses of the rule: consolidation touching the pleura is left out (a hole is filled
only when it is enclosed); severely emphysematous lung (below -950 HU by definition) looks like pure air and is lost;
the trachea and main bronchi are included where they join the lungs at -400 HU (in 3-D, at the carina).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from lungsight.preprocess.window import LUNG_WINDOW

AIR_HU = -400.0
PURE_AIR_HU = -960.0
MIN_SHARE = 0.1


def derive_lung_mask_hu(
    volume_hu: np.ndarray, threshold: float = AIR_HU, pure_air: float = PURE_AIR_HU, min_share: float = MIN_SHARE
) -> np.ndarray:
    """``(n, H, W)`` CT volume in HU (display order, one axial slice per index) -> ``(n, H, W)`` bool lung mask.

    A single ``(H, W)`` slice is accepted too. See the module docstring for the rule and its limits.
    """
    vol = np.asarray(volume_hu, dtype=np.float32)
    single = vol.ndim == 2
    if single:
        vol = vol[None]
    if vol.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) volume, got shape {vol.shape}")
    labels, n = ndi.label(vol < threshold)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep: list[int] = []
    for i in np.argsort(sizes)[::-1]:
        if keep and sizes[i] < min_share * sizes[keep[0] - 1]:
            break
        if np.percentile(vol[labels == i + 1], 10) > pure_air:
            keep.append(int(i) + 1)
            if len(keep) == 2:
                break
    lungs = np.isin(labels, keep)
    out = np.stack([ndi.binary_fill_holes(sl) for sl in lungs])
    return out[0] if single else out


def grey_to_hu(grey01: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] of a lung-windowed image back to approximate HU (the inverse of the lung window).

    Lets :func:`derive_lung_mask_hu` work on 8-bit CT slices, under the same assumption as the rest of the package
    (8-bit CT exports are in a lung window; see :mod:`lungsight.preprocess.window`).
    """
    lo, hi = LUNG_WINDOW
    return lo + np.asarray(grey01, dtype=np.float32) * (hi - lo)
