"""Paper 004's three X-ray preprocessing schemes, each giving a square image and the lung mask in the same frame.

* ``raw`` (experiment 1): histogram equalisation of the whole image; then, as paper 004's network input layer does,
  the shortest side is scaled to the input size and the centre square is kept.
* ``cropped`` (experiment 2): a square region of interest around the lungs, found from the lung mask's row and column
  sums (the first and last non-zero row and column give the lungs' vertical and horizontal extents; the square is
  centred on the middle of both and its side is the longer extent plus a margin of :data:`ROI_MARGIN` on each
  side), cut from the original image and histogram-equalised. No mask is applied.
* ``segmented`` (experiment 3): the same square; the lung mask dilated with a 5 x 5 kernel; pixels outside the
  dilated mask set to 0 and the histogram equalisation computed from, and applied to, the pixels inside it only.

Geometry. The square is moved inside the image where it fits (so no black bars are added and the lungs stay whole);
only when the lungs' extent plus margin is longer than the image's side is the square padded with zeros, and then
``roi`` reaches outside the image (a negative ``top`` or ``left``). The square is then resized to ``size`` x
``size``. The 5 x 5 dilation is done at the original resolution on the crop, as the paper orders the steps.
The returned ``lung_mask`` is the undilated mask cut and resized exactly like the image, for the evidence-in-lung
share of Grad-CAM maps.

An implausible mask (:func:`~lungsight.preprocess.lung_fields.mask_quality`) is replaced by the anatomical template
(:func:`~lungsight.preprocess.lung_fields.template_mask`) for every scheme: ``mask_ok`` is False and ``note`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lungsight.preprocess.lung_fields import (
    LungSegmenter,
    default_segmenter,
    equalise,
    mask_quality,
    resize_mask,
    segment_detail,
    template_mask,
)
from lungsight.preprocess.transforms import fit_square

SCHEMES = ("raw", "cropped", "segmented")
ROI_MARGIN = 0.05  # added on each side of the lungs' longer extent, as a fraction of it
DILATION = 5  # paper 004: the mask is dilated with a 5 x 5 kernel


@dataclass
class XrayInput:
    """One X-ray prepared by a scheme.

    Attributes:
        image: ``(S, S)`` float32 in [0, 1], the scheme's output at ``size``.
        lung_mask: ``(S, S)`` bool, the (undilated) lung mask in the same frame.
        roi: ``(top, left, side, side)``, the square of the original image the output came from (may reach outside
            the image where it was padded).
        mask_ok: False when the lung mask was implausible or a template, in which case the template was used.
        note: why ``mask_ok`` is False, else ``""``.
        scheme: the scheme's name.
        support: ``(S, S)`` bool, the pixels the scheme kept: the dilated mask for ``segmented``, the part inside
            the original image (not padding) for the others.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    roi: tuple[int, int, int, int]
    mask_ok: bool
    note: str = ""
    scheme: str = ""
    support: np.ndarray | None = None


def lung_roi(mask: np.ndarray, margin: float = ROI_MARGIN) -> tuple[int, int, int, int]:
    """``(top, left, side, side)``: the square around the lungs from the mask's row and column sums (see module).

    The square is shifted inside the image when its side fits; otherwise it stays centred on the lungs along that
    axis and reaches outside the image (to be padded).
    """
    mask = np.asarray(mask, dtype=bool)
    rows = np.nonzero(mask.sum(axis=1))[0]
    cols = np.nonzero(mask.sum(axis=0))[0]
    if rows.size == 0:
        raise ValueError("empty lung mask: no region of interest")
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = round(float(max(r1 - r0, c1 - c0)) * (1.0 + 2.0 * margin))
    top = (int(r0) + int(r1) - side) // 2
    left = (int(c0) + int(c1) - side) // 2
    h, w = mask.shape
    if side <= h:
        top = min(max(top, 0), h - side)
    if side <= w:
        left = min(max(left, 0), w - side)
    return top, left, side, side


def centre_roi(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre square of an image (what scaling the shortest side and centre-cropping keeps)."""
    h, w = shape
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def crop(a: np.ndarray, roi: tuple[int, int, int, int], fill: float | bool = 0) -> np.ndarray:
    """The ``roi`` square of a 2-D array; parts outside the array are ``fill``."""
    top, left, side, _ = roi
    out = np.full((side, side), fill, dtype=a.dtype)
    h, w = a.shape
    r0, r1, c0, c1 = max(top, 0), min(top + side, h), max(left, 0), min(left + side, w)
    if r0 < r1 and c0 < c1:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = a[r0:r1, c0:c1]
    return out


def apply_scheme(image01: np.ndarray, scheme: str, mask: np.ndarray, size: int = 256) -> XrayInput:
    """Prepare a frontal X-ray (``(H, W)`` in [0, 1]) with one of :data:`SCHEMES`, given its lung mask.

    A mask of another shape than the image is resized to it first. See the module docstring for the schemes.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown X-ray scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    image = np.clip(np.nan_to_num(np.asarray(image01, dtype=np.float32)), 0.0, 1.0)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    mask = resize_mask(mask, image.shape)
    quality = mask_quality(mask)
    note = ""
    if not quality["ok"]:
        mask = template_mask(image)
        note = f"lung mask implausible ({quality['reason']}); used the anatomical template"
    inside = np.ones(image.shape, dtype=bool)
    if scheme == "raw":
        roi = centre_roi(image.shape)
        out = crop(equalise(image, inside), roi)
        keep = crop(inside, roi, False)
    else:
        roi = lung_roi(mask)
        out = crop(image, roi)
        keep = crop(inside, roi, False)
        if scheme == "segmented":
            dilated = ndi.binary_dilation(mask, structure=np.ones((DILATION, DILATION), dtype=bool))
            keep = crop(dilated, roi, False)
        out = equalise(out, keep)
    support = resize_mask(keep, (size, size))
    resized = fit_square(out, size)[0].numpy() * support
    return XrayInput(
        image=resized.astype(np.float32),
        lung_mask=resize_mask(crop(mask, roi, False), (size, size)),
        roi=roi,
        mask_ok=bool(quality["ok"]),
        note=note,
        scheme=scheme,
        support=support,
    )


def prepare_xray(
    image01: np.ndarray, scheme: str, segmenter: LungSegmenter | None = None, size: int = 256
) -> XrayInput:
    """Segment the lungs (default: the classical segmenter) and apply ``scheme``.

    When the segmenter fell back to its anatomical template, ``mask_ok`` is False and ``note`` says why.
    """
    detail = segment_detail(segmenter or default_segmenter(), image01)
    result = apply_scheme(image01, scheme, detail.mask, size)
    if detail.fell_back:
        result.mask_ok = False
        result.note = detail.note
    return result
