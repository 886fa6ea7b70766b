"""Peak resident memory of one PanopticPredictor frame at a very large size (issue 16 item 4).

    python benchmarks/predictor_peak_memory.py [--bundle BUNDLE] [--size 8000x8000] [--out peak.json]

Without --bundle a tiny random-weight bundle (low thresholds: many instances) is exported to a
temp folder first, in a child process. Reports the process's peak RSS (``ru_maxrss``, which includes
the frame itself), the RSS before the frame, the seconds and the number of instances pasted.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle")
    p.add_argument("--size", default="8000x8000")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from sepsnet.engines.predictor import PanopticPredictor

    h, w = (int(v) for v in a.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(a.bundle) if a.bundle else Path(tmp) / "bundle"
        if not a.bundle:  # export in a child process: its memory must not count here
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); " \
                   f"from predictor_memory import make_bundle; from pathlib import Path; make_bundle(Path({tmp!r}))"
            subprocess.run([sys.executable, "-c", code], check=True)
        pred = PanopticPredictor.from_bundle(bundle, backend="ort")
        pred(np.zeros((240, 320, 3), np.uint8))  # warm-up at a small size
        frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        before = psutil.Process().memory_info().rss / 2**20
        t0 = time.perf_counter()
        res = pred(frame)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    result = {"benchmark": "predictor_peak_memory", "size": [h, w], "frame_mib": round(frame.nbytes / 2**20, 1),
              "rss_before_frame_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
              "seconds": round(seconds, 2), "instances": res.num_instances, "segments": len(res.segments_info),
              "mask_crop_mpx": round(sum(max(0, x1 - x0) * max(0, y1 - y0) for x0, y0, x1, y1 in res.masks.regions)
                                     / 1e6, 1) if getattr(res, "masks", None) is not None else 0}
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
