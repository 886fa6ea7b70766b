"""Host reads per frame of the host and the device post-processing paths (issue 13, CUDA target).

Synthetic dense outputs of ``benchmarks/postprocess_speed.py`` and a stand-in instance engine whose
outputs for a roi depend on that roi only (so the device path's padded batch gives the same result).
For each path (``device_path=False`` / ``True``): the host reads and host->device uploads of one
frame counted by :class:`sepsnet.postprocess.host_reads.HostReadCounter` (what would synchronise a
GPU), the median wall seconds over ``--repeats`` frames, and whether both paths give the same id map
and segments. With ``--device cuda`` also the synchronisations ``torch.cuda.set_sync_debug_mode``
reports per frame. Prints and saves JSON (``--out``).

    python benchmarks/host_reads.py [--height 256 --width 512 --instances 30] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postprocess_speed import make_dense

from sepsnet.config import SEPSNetConfig
from sepsnet.fileio import atomic_write_json
from sepsnet.postprocess.host_reads import HostReadCounter
from sepsnet.postprocess.pipeline import panoptic_inference


def roi_blobs(bases, p3, rois, attention):
    """A 56x56 blob per roi whose size and scores follow from the roi's own coordinates."""
    r = 56
    key = (rois[:, 1] * 0.013 + rois[:, 2] * 0.029 + rois[:, 3] * 0.017 + rois[:, 4] * 0.031).frac()
    c = (torch.arange(r, device=rois.device, dtype=torch.float32) + 0.5) / r * 2 - 1
    d = (c[None, :, None] ** 2 + c[None, None, :] ** 2) * (0.8 + key[:, None, None])
    return {"mask_probs": torch.sigmoid((1.0 - d) * 8), "iou_score": 0.3 + 0.6 * key,
            "silhouette_score": 1 - key}


def cuda_syncs(fn) -> int:
    """Synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports while ``fn`` runs."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--instances", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args()
    cfg = SEPSNetConfig()
    cfg.postprocess.max_instances = a.instances
    dense = make_dense(a.height, a.width, a.instances, a.device)
    sizes = [((a.height, a.width), (a.height, a.width))]
    report: dict = {"size": [a.height, a.width], "instances": a.instances, "device": a.device,
                    "torch_threads": torch.get_num_threads(), "paths": {}}
    results = {}
    for name, flag in (("host", False), ("device", True)):
        def frame(flag=flag):
            return panoptic_inference(dense, roi_blobs, sizes, cfg, device_path=flag)[0]

        results[name] = frame()  # warm-up
        with HostReadCounter() as reads:
            frame()
        walls = []
        for _ in range(a.repeats):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = frame()
            res.id_map.sum().item()  # wait for the frame (the device path leaves the id map queued)
            walls.append(time.perf_counter() - t0)
        entry = {"host_reads_per_frame": reads.reads, "uploads_per_frame": reads.uploads,
                 "read_kinds": sorted(set(reads.events)), "median_wall_s": round(statistics.median(walls), 5),
                 "instances_kept": results[name].num_instances, "segments": len(results[name].segments_info)}
        if a.device.startswith("cuda"):
            entry["cuda_syncs_per_frame"] = cuda_syncs(frame)
        report["paths"][name] = entry
    report["identical_output"] = bool(torch.equal(results["host"].id_map.cpu(), results["device"].id_map.cpu())
                                      and results["host"].segments_info == results["device"].segments_info)
    print(json.dumps(report, indent=1))
    if a.out:
        atomic_write_json(report, a.out)


if __name__ == "__main__":
    main()
