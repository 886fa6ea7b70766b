"""sepsnet model: the SE-PSNet network (paper Sec. III) and its parts."""
from __future__ import annotations

from sepsnet.config import ModelConfig, SEPSNetConfig


def build_model(cfg: SEPSNetConfig | ModelConfig, deploy: bool = False, pretrained: bool = False):
    """Build :class:`~sepsnet.model.sepsnet.SEPSNet` from a full or a model config.

    ``pretrained=True`` (the start of a training run) loads ``model.backbone.pretrained`` and applies
    the training-only checks (file present; ``freeze_at`` > 0 only with pretrained weights). Consumers
    of trained checkpoints leave it False: the checkpoint holds every weight."""
    from sepsnet.model.sepsnet import SEPSNet

    model_cfg = cfg.model if isinstance(cfg, SEPSNetConfig) else cfg
    return SEPSNet(model_cfg, deploy=deploy, load_pretrained=pretrained)


__all__ = ["build_model"]
