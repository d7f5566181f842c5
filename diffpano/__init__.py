"""DiffPano: text to consistent multi-view 360° panoramas (spherical epipolar-aware diffusion). Imports no Ray."""

import logging

# diffusers' Stable Diffusion modules import transformers' CLIP and SigLIP image processors, which warn in every
# process that they fall back to their PIL versions (torchvision has no build for this CPU torch). The PIL versions
# are the ones this project uses, so the warning says nothing to a user.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed); falling back" not in record.getMessage())

from diffpano.models.epipolar import EpipolarAdapter  # noqa: E402
from diffpano.pipelines import MultiViewPanoPipeline, PanoPipeline, PanoramaOutput, TourOutput  # noqa: E402

__all__ = ["EpipolarAdapter", "MultiViewPanoPipeline", "PanoPipeline", "PanoramaOutput", "TourOutput"]
__version__ = "0.1.0"
