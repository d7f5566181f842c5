"""Pipelines: Pano-SD and the multi-view tour pipeline, their samplers, compilation, specs to tours."""

from diffpano.pipelines.multiview import MultiViewPanoPipeline
from diffpano.pipelines.pano import PanoPipeline, PanoramaOutput, TourOutput

__all__ = ["MultiViewPanoPipeline", "PanoPipeline", "PanoramaOutput", "TourOutput"]
