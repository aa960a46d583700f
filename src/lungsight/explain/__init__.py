"""Explanations: Grad-CAM heat maps, evidence-in-lung share and slice overlays."""

from lungsight.explain.gradcam import GradCAM, cam_energy_inside
from lungsight.explain.overlay import overlay_image, save_overlay

__all__ = ["GradCAM", "cam_energy_inside", "overlay_image", "save_overlay"]
