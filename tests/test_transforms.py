"""Transforms: resize rule, random short edge, flip consistency, padding collate, preprocessing
shared with the predictor, inverse mapping, DataLoader construction."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import DataConfig, SEPSNetConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.loader import build_dataloader, build_dataset
from sepsnet.data.synthetic import generate
from sepsnet.data.transforms import (
    boxes_to_original,
    collate,
    inference_sizes,
    map_to_original,
    normalize,
    pad_to,
    pick_short_edge,
    prepare_input,
    preprocess_image,
    resize_image,
    resize_shape,
    write_input,
)
from sepsnet.errors import DataError


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate(root, 4, 2, seed=5, size=64)
    return root


def test_resize_shape_short_edge_and_cap() -> None:
    assert resize_shape(427, 640, 800, 1333) == (800, 1199)
    assert resize_shape(100, 1000, 800, 1333) == (133, 1333)  # longer edge capped
    assert resize_shape(640, 480, 240, 1000) == (320, 240)
    assert resize_shape(50, 70, 0, 1333) == (50, 70)  # 0 = keep size


def test_random_short_edge_covers_range() -> None:
    cfg = DataConfig(min_size_train=[10, 13])
    random.seed(0)
    drawn = {pick_short_edge(cfg, True) for _ in range(200)}
    assert drawn == {10, 11, 12, 13}
    assert pick_short_edge(cfg, False) == cfg.min_size_test
    with pytest.raises(DataError, match="min_size_train"):
        pick_short_edge(DataConfig(min_size_train=[20, 10]), True)


def test_flip_is_consistent(syn: Path) -> None:
    ds = CocoPanopticDataset.from_root(syn, "train", DataConfig(), train=True)
    image, id_map, rec = ds.load_raw(1)
    plain = ds.prepare(image, id_map, rec, short=80, flip=False)
    flipped = ds.prepare(image, id_map, rec, short=80, flip=True)
    w = plain["image"].shape[2]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["targets"]["masks"], plain["targets"]["masks"].flip(-1))
    assert torch.equal(flipped["targets"]["stuff"], plain["targets"]["stuff"].flip(-1))
    assert torch.equal(flipped["targets"]["classes"], plain["targets"]["classes"])
    b, fb = plain["targets"]["boxes"], flipped["targets"]["boxes"]
    assert b.shape[0] > 0
    assert torch.equal(fb[:, [0, 2]], w - b[:, [2, 0]]) and torch.equal(fb[:, [1, 3]], b[:, [1, 3]])
    # boxes are the tight extent of the masks
    for box, m in zip(fb, flipped["targets"]["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert flipped["info"]["flipped"] and not plain["info"]["flipped"]
    back = boxes_to_original(fb, flipped["info"]["resized_size"], flipped["info"]["resized_size"], flipped=True)
    assert torch.equal(back, b)


def test_collate_pads_to_32(syn: Path) -> None:
    ds = CocoPanopticDataset.from_root(syn, "train", DataConfig(min_size_test=70, max_size_test=200), train=False)
    items = [ds[0], ds[1], ds[2]]
    images, targets, infos = collate(items, 32)
    hmax = max(i["image"].shape[1] for i in items)
    wmax = max(i["image"].shape[2] for i in items)
    assert images.shape == (3, 3, pad_to(hmax, 32), pad_to(wmax, 32))
    assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0 and images.shape[2] > hmax
    for k, (item, t, info) in enumerate(zip(items, targets, infos)):
        h, w = info["resized_size"]
        assert item["image"].shape[1:] == (h, w)
        assert torch.equal(images[k, :, :h, :w], item["image"])
        assert (images[k, :, h:] == 0).all() and (images[k, :, :, w:] == 0).all()
        assert t["masks"].shape[1:] == images.shape[2:] and t["masks"].dtype == torch.uint8
        assert int(t["masks"].sum()) == int(item["targets"]["masks"].sum())
        assert (t["stuff"][h:] == 255).all() and (t["stuff"][:, w:] == 255).all()
        assert torch.equal(t["stuff"][:h, :w], item["targets"]["stuff"])
        assert info["padded_size"] == tuple(images.shape[2:])
    with pytest.raises(DataError):
        collate([], 32)


def test_preprocess_image_matches_dataset(syn: Path) -> None:
    cfg = DataConfig(min_size_test=96, max_size_test=200)
    ds = CocoPanopticDataset.from_root(syn, "val", cfg, train=False)
    item = ds[0]
    image, _, _ = ds.load_raw(0)
    tensor, hw = preprocess_image(image, cfg)
    assert hw == item["info"]["resized_size"] and min(hw) == 96
    assert torch.equal(tensor, item["image"])
    # normalisation: mean/std in RGB order on the 0..255 scale
    flat = np.full((8, 8, 3), (10, 20, 30), np.uint8)
    t, _ = preprocess_image(flat, DataConfig(min_size_test=0))
    expect = (torch.tensor([10.0, 20, 30]) - torch.tensor(cfg.pixel_mean)) / torch.tensor(cfg.pixel_std)
    assert torch.allclose(t[:, 0, 0], expect)
    with pytest.raises(DataError, match="HxWx3 uint8"):
        preprocess_image(np.zeros((8, 8), np.uint8), cfg)


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_inference_input_is_the_evaluation_input_bit_for_bit(input_format: str) -> None:
    """write_input (the runtime's in-place fill) gives exactly normalize(resize_image(...)) (what
    evaluation feeds the network), from an RGB frame and from the same frame in BGR order, into
    either network channel order; the padding prepare_input adds is zero."""
    rng = np.random.default_rng(3)
    cfg = DataConfig(min_size_test=96, max_size_test=150, input_format=input_format,
                     pixel_mean=[103.53, 116.28, 123.675], pixel_std=[57.375, 57.12, 58.395])
    rgb = rng.integers(0, 256, (123, 201, 3), dtype=np.uint8)
    (rh, rw), (H, W) = inference_sizes(123, 201, cfg, (128, 160))
    assert (rh, rw) != (123, 201) and (H, W) == (128, 160)
    expected = normalize(resize_image(rgb, (rh, rw)), cfg)
    for frame, bgr in ((rgb, False), (np.ascontiguousarray(rgb[..., ::-1]), True), (rgb[..., ::-1], True)):
        out = torch.full((3, H, W), 7.0)
        write_input(frame, cfg, (rh, rw), out, bgr=bgr)
        assert torch.equal(out[:, :rh, :rw], expected)
        assert bool((out[:, rh:] == 7.0).all()) and bool((out[:, :rh, rw:] == 7.0).all())  # padding: the caller's
    batch, resized = prepare_input(rgb, cfg, (128, 160))
    assert resized == (rh, rw) and batch.shape == (1, 3, H, W)
    assert torch.equal(batch[0, :, :rh, :rw], expected)
    assert not batch[0, :, rh:].any() and not batch[0, :, :rh, rw:].any()


def test_inverse_mapping_round_trip() -> None:
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 5, (6, 8)), np.ones((10, 10), np.int64))  # 60x80 blocks
    rh, rw = resize_shape(60, 80, 30, 1000)
    small = labels[::2, ::2]
    padded = np.full((pad_to(rh, 32), pad_to(rw, 32)), 99, np.int64)
    padded[:rh, :rw] = small
    back = map_to_original(padded, (rh, rw), (60, 80))
    assert back.shape == (60, 80) and back.dtype == labels.dtype
    assert (back == labels).mean() > 0.95 and 99 not in back
    boxes = torch.tensor([[0.0, 0.0, 40.0, 30.0], [5.0, 2.0, 10.0, 29.0]])
    orig = boxes_to_original(boxes, (rh, rw), (60, 80))
    assert torch.allclose(orig, boxes * 2)


def test_dataloader_batches(syn: Path) -> None:
    cfg = SEPSNetConfig()
    cfg.model.num_thing_classes, cfg.model.num_stuff_classes = 3, 3
    cfg.data.min_size_train, cfg.data.max_size_train = [48, 64], 96
    cfg.solver.batch_size = 2
    ds = build_dataset(cfg, train=True, root=str(syn))
    loader = build_dataloader(ds, cfg, train=True, num_workers=1)
    batches = list(loader)
    assert len(batches) == 2
    for images, targets, infos in batches:
        assert images.shape[0] == 2 == len(targets) == len(infos)
        assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        assert all(48 <= min(i["resized_size"]) <= 64 for i in infos)
    seen = sorted(i["image_id"] for _, _, infos in batches for i in infos)
    assert seen == [0, 1, 2, 3]
    val = build_dataloader(build_dataset(cfg, train=False, root=str(syn)), cfg, train=False, num_workers=0)
    assert [i["image_id"] for _, _, infos in val for i in infos] == [0, 1]
    cfg.model.num_thing_classes = 4
    with pytest.raises(DataError, match="3 thing / 3 stuff"):
        build_dataset(cfg, train=True, root=str(syn))


def test_dataloader_uses_distributed_sampler(syn: Path, tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    cfg = SEPSNetConfig()
    cfg.model.num_thing_classes, cfg.model.num_stuff_classes = 3, 3
    cfg.data.min_size_train, cfg.data.max_size_train = [48, 48], 96
    cfg.solver.batch_size = 2
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_dataloader(build_dataset(cfg, train=True, root=str(syn)), cfg, train=True, num_workers=0)
        assert isinstance(loader.sampler, DistributedSampler) and loader.batch_size == 2
        loader.sampler.set_epoch(1)
        assert sorted(i["image_id"] for _, _, infos in loader for i in infos) == [0, 1, 2, 3]
    finally:
        dist.destroy_process_group()
