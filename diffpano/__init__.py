"""DiffPano: text to consistent multi-view 360° panoramas (spherical epipolar-aware diffusion). Imports no Ray."""

from diffpano.epipolar import EpipolarAdapter
from diffpano.pipelines import MultiViewPanoPipeline, PanoPipeline, PanoramaOutput, TourOutput

__all__ = ["EpipolarAdapter", "MultiViewPanoPipeline", "PanoPipeline", "PanoramaOutput", "TourOutput"]
__version__ = "0.1.0"
