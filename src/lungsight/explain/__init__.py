"""Explanations: Grad-CAM heat maps, evidence-in-lung share and slice overlays."""

from lungsight.explain.gradcam import GradCAM, cam_energy_inside, finish_maps
from lungsight.explain.overlay import overlay_image, save_overlay

__all__ = ["GradCAM", "cam_energy_inside", "finish_maps", "overlay_image", "save_overlay"]
