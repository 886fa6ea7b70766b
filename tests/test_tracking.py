"""Track ids across frames: translated objects keep their ids, classes never swap ids, lost tracks
survive a short gap, new objects get new ids (mask and box matching)."""
from __future__ import annotations

import pytest
import torch

from sepsnet.engines.tracking import SegmentTracker
from sepsnet.postprocess.results import PanopticResult

H, W = 120, 200


def frame(objects: list[tuple[int, int, int, int, int]]) -> PanopticResult:
    """A panoptic result with square thing segments (category, x, y, size) on a stuff background.
    ``objects``: (key, category, x, y, size); segment ids are assigned in list order, like a
    detector whose output order changes from frame to frame."""
    id_map = torch.full((H, W), 1, dtype=torch.int32)  # stuff segment 1
    segments = [{"id": 1, "category_id": 0, "isthing": False, "area": 0, "bbox": [0, 0, W, H]}]
    for k, (_, cat, x, y, size) in enumerate(objects):
        sid = k + 2
        id_map[y:y + size, x:x + size] = sid
        segments.append({"id": sid, "category_id": cat, "isthing": True, "score": 0.9, "area": size * size,
                         "bbox": [x, y, size, size]})
    return PanopticResult(id_map, segments, (H, W))


def ids_by_key(result: PanopticResult, objects: list) -> dict[int, int]:
    things = [s for s in result.segments_info if s["isthing"]]
    assert all("track_id" not in s for s in result.segments_info if not s["isthing"])
    return {obj[0]: s["track_id"] for obj, s in zip(objects, things)}


@pytest.mark.parametrize("match", ["mask", "box"])
def test_translated_sequence_keeps_ids(match: str) -> None:
    tracker = SegmentTracker(iou_thresh=0.3, max_lost=2, match=match, stride=2)
    seen: dict[int, set[int]] = {}
    for t in range(8):
        objects = [(0, 1, 10 + 4 * t, 20, 30),  # moving right
                   (1, 2, 150 - 3 * t, 60, 28),  # moving left, another class
                   (2, 1, 60, 70 + 2 * t, 24)]  # moving down, same class as object 0
        if t % 2:
            objects.reverse()  # the detector's order must not matter
        result = frame(objects)
        tracker.update(result)
        for key, tid in ids_by_key(result, objects).items():
            seen.setdefault(key, set()).add(tid)
    assert all(len(ids) == 1 for ids in seen.values()), seen
    assert len({next(iter(v)) for v in seen.values()}) == 3


def test_lost_track_survives_a_short_gap_then_retires() -> None:
    tracker = SegmentTracker(max_lost=2, stride=1)
    a = [(0, 1, 20, 20, 30)]
    r = frame(a)
    tracker.update(r)
    first = ids_by_key(r, a)[0]
    for _ in range(2):  # missed twice: kept
        tracker.update(frame([]))
    r = frame(a)
    tracker.update(r)
    assert ids_by_key(r, a)[0] == first
    for _ in range(3):  # missed three times: retired
        tracker.update(frame([]))
    r = frame(a)
    tracker.update(r)
    assert ids_by_key(r, a)[0] != first


def test_same_place_other_class_is_another_track() -> None:
    tracker = SegmentTracker(stride=1)
    r1, r2 = frame([(0, 1, 20, 20, 30)]), frame([(0, 2, 20, 20, 30)])
    tracker.update(r1)
    tracker.update(r2)
    assert r1.segments_info[1]["track_id"] != r2.segments_info[1]["track_id"]


def test_jump_beyond_the_threshold_is_a_new_track() -> None:
    tracker = SegmentTracker(iou_thresh=0.3, stride=1)
    r1, r2 = frame([(0, 1, 10, 20, 20)]), frame([(0, 1, 100, 20, 20)])  # no overlap
    tracker.update(r1)
    tracker.update(r2)
    assert r1.segments_info[1]["track_id"] != r2.segments_info[1]["track_id"]


def test_frame_size_change_falls_back_to_boxes() -> None:
    tracker = SegmentTracker(stride=1)
    r1 = frame([(0, 1, 10, 20, 30)])
    tracker.update(r1)
    r2 = PanopticResult(r1.id_map[:, :150].clone(), [dict(s) for s in r1.segments_info], (H, 150))
    tracker.update(r2)
    assert r2.segments_info[1]["track_id"] == r1.segments_info[1]["track_id"]


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="match"):
        SegmentTracker(match="centroid")
    with pytest.raises(ValueError, match="iou_thresh"):
        SegmentTracker(iou_thresh=1.5)
