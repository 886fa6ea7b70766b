"""Post-processing shared by PyTorch evaluation and the engine runtime (DESIGN "Inference split").

Pure torch on CPU or CUDA tensors; never imports ``sepsnet.model`` or ``sepsnet.engines``.
"""
from sepsnet.postprocess.candidates import Candidates, level_sizes, select_candidates
from sepsnet.postprocess.fusion import panoptic_fusion
from sepsnet.postprocess.paste import paste_masks
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.scoring import mask_scores, silhouette_dedup

__all__ = ["Candidates", "PanopticResult", "level_sizes", "mask_scores", "panoptic_fusion",
           "panoptic_inference", "paste_masks", "select_candidates", "silhouette_dedup"]
