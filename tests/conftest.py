"""Shared fixtures: the Cityscapes layout is tested on a synthetic tree everywhere and, where a real
frame is available (``SEPSNET_CITYSCAPES_SAMPLE``), on that frame too."""
from __future__ import annotations

from pathlib import Path

import pytest

from _samples import real_cityscapes_sample, write_synthetic_cityscapes


@pytest.fixture(scope="session")
def synthetic_cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-frame Cityscapes tree (official layout) built once per session; treat it as read-only."""
    return write_synthetic_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="session", params=["synthetic", "real"])
def cityscapes_root(request: pytest.FixtureRequest, synthetic_cityscapes: Path) -> Path:
    """The synthetic tree, then the real sample frame (skipped with the reason where absent)."""
    if request.param == "synthetic":
        return synthetic_cityscapes
    return real_cityscapes_sample()


@pytest.fixture(params=["native", "fallback"])
def pq_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """sepsnet-pq's two paths: the C helper (skipped when it is not built) and NumPy / OpenCV."""
    from sepsnet.eval import pq_native

    if request.param == "native" and pq_native.NATIVE is None:
        pytest.skip("C helper sepsnet.eval._pq_native not built (pip install -e . builds it) or SEPSNET_PQ_NATIVE=0")
    if request.param == "fallback":
        monkeypatch.setattr(pq_native, "NATIVE", None)
    return request.param


class CountingStuffNative:
    """The stuff C helper, counting its calls and those that decided the labels (not -1 / -2)."""

    def __init__(self, module) -> None:
        self.module, self.calls, self.decided = module, 0, 0

    def decide_labels(self, *args):
        n = self.module.decide_labels(*args)
        self.calls += 1
        self.decided += n >= 0
        return n


def _counting_stuff_native(monkeypatch: pytest.MonkeyPatch) -> CountingStuffNative:
    from sepsnet.postprocess import stuff

    if stuff.NATIVE is None:
        pytest.skip("C helper sepsnet.postprocess._stuff_native not built (pip install -e . builds it) "
                    "or SEPSNET_STUFF_NATIVE=0")
    counting = CountingStuffNative(stuff.NATIVE)
    monkeypatch.setattr(stuff, "NATIVE", counting)
    return counting


@pytest.fixture(params=["native", "numpy"])
def stuff_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> CountingStuffNative | None:
    """The stuff labels' two paths: the C helper (skipped when it is not built), counted, and NumPy (None)."""
    from sepsnet.postprocess import stuff

    if request.param == "native":
        return _counting_stuff_native(monkeypatch)
    monkeypatch.setattr(stuff, "NATIVE", None)
    return None


@pytest.fixture
def stuff_native(monkeypatch: pytest.MonkeyPatch) -> CountingStuffNative:
    """The stuff C helper alone (skipped when it is not built), counted: for tests of the helper itself."""
    return _counting_stuff_native(monkeypatch)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the seeded, untrained tiny model (``configs/tiny_synthetic.yaml``) for export tests."""
    import torch

    from sepsnet.config import load_config
    from sepsnet.model import build_model
    from sepsnet.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_synthetic.yaml")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", model=build_model(cfg), cfg=cfg,
                           iteration=1, with_rng=False)
