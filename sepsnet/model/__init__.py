"""sepsnet model: the SE-PSNet network (paper Sec. III) and its parts."""
from __future__ import annotations

from sepsnet.config import ModelConfig, SEPSNetConfig


def build_model(cfg: SEPSNetConfig | ModelConfig, deploy: bool = False):
    """Build :class:`~sepsnet.model.sepsnet.SEPSNet` from a full or a model config."""
    from sepsnet.model.sepsnet import SEPSNet

    model_cfg = cfg.model if isinstance(cfg, SEPSNetConfig) else cfg
    return SEPSNet(model_cfg, deploy=deploy)


__all__ = ["build_model"]
