"""Post-processing shared by PyTorch evaluation and the engine runtime (DESIGN "Inference split").

Pure torch on CPU or CUDA tensors; never imports ``sepsnet.model`` or ``sepsnet.engines``.
"""
from sepsnet.postprocess.candidates import Candidates, level_sizes, select_candidates
from sepsnet.postprocess.fusion import panoptic_fusion
from sepsnet.postprocess.paste import PastedMasks, paste_mask_crops, paste_masks
from sepsnet.postprocess.pipeline import panoptic_inference, postprocess_image
from sepsnet.postprocess.preselect import Preselect
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.scoring import mask_scores, silhouette_dedup
from sepsnet.postprocess.timing import FRAME_STAGES, PIPELINE_STAGES, StageTimer

__all__ = ["FRAME_STAGES", "PIPELINE_STAGES", "Candidates", "PanopticResult", "PastedMasks", "Preselect",
           "StageTimer", "level_sizes", "mask_scores", "panoptic_fusion", "panoptic_inference", "paste_mask_crops",
           "paste_masks", "postprocess_image", "select_candidates", "silhouette_dedup"]
