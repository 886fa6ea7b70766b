"""Eq. 4 mask score and silhouette de-duplication (III-G)."""
import torch

from sepsnet.postprocess.scoring import mask_scores, silhouette_dedup


def test_alpha_scoring():
    fcos, iou = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 1.0])
    assert torch.allclose(mask_scores(fcos, iou, 0.8), torch.tensor([0.74, 0.6]))
    assert torch.allclose(mask_scores(fcos, iou, 0.0), iou)
    assert torch.equal(mask_scores(fcos, None, 0.8), fcos)


def _masks():
    m = torch.zeros(4, 20, 20, dtype=torch.bool)
    m[0, 2:12, 2:12] = True
    m[1, 3:12, 2:12] = True  # IoU 0.9 with 0, same class
    m[2, 2:12, 2:12] = True  # identical to 0 but another class
    m[3, 2:12, 8:18] = True  # same class, IoU 0.25 with 0
    return m


def test_dedup_keeps_higher_silhouette_score():
    m, cls = _masks(), torch.tensor([1, 1, 2, 1])
    assert silhouette_dedup(m, cls, torch.tensor([0.2, 0.9, 0.1, 0.1]), 0.7).tolist() == [1, 2, 3]
    assert silhouette_dedup(m, cls, torch.tensor([0.9, 0.2, 0.1, 0.1]), 0.7).tolist() == [0, 2, 3]
    assert silhouette_dedup(m, cls, torch.tensor([0.9, 0.2, 0.1, 0.1]), 0.95).tolist() == [0, 1, 2, 3]
    # off when the confidence head is off; empty input
    assert silhouette_dedup(m, cls, None, 0.7).tolist() == [0, 1, 2, 3]
    assert silhouette_dedup(m[:0], cls[:0], torch.zeros(0), 0.7).numel() == 0


def test_dedup_only_among_eligible_instances():
    m, cls = _masks(), torch.tensor([1, 1, 2, 1])
    sil = torch.tensor([0.2, 0.9, 0.1, 0.1])
    # instance 1 (better silhouette) is not eligible: it neither removes 0 nor is removed
    eligible = torch.tensor([True, False, True, True])
    assert silhouette_dedup(m, cls, sil, 0.7, eligible=eligible).tolist() == [0, 1, 2, 3]
    assert silhouette_dedup(m, cls, sil, 0.7, eligible=torch.ones(4, dtype=torch.bool)).tolist() == [1, 2, 3]


def test_dedup_with_regions_matches_without():
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(12, 30, 30, dtype=torch.bool)
    regs = []
    for i in range(12):
        x0, y0 = torch.randint(0, 12, (2,), generator=g).tolist()
        m[i, y0:y0 + 15, x0:x0 + 15] = torch.rand(15, 15, generator=g) > 0.1
        regs.append([x0, y0, x0 + 15, y0 + 15])
    cls = torch.randint(0, 2, (12,), generator=g)
    sil = torch.rand(12, generator=g)
    a = silhouette_dedup(m, cls, sil, 0.3)
    b = silhouette_dedup(m, cls, sil, 0.3, torch.tensor(regs))
    assert torch.equal(a, b) and a.numel() < 12
    kept = a.tolist()
    for i in kept:  # no two kept same-class masks overlap above the threshold
        for j in kept:
            if i < j and cls[i] == cls[j]:
                inter = (m[i] & m[j]).sum().item()
                assert inter / ((m[i] | m[j]).sum().item()) <= 0.3
    for j in set(range(12)) - set(kept):  # every removed mask had a kept, higher-silhouette twin
        assert any(cls[i] == cls[j] and sil[i] > sil[j]
                   and (m[i] & m[j]).sum() / (m[i] | m[j]).sum() > 0.3 for i in kept)
