"""Config loading: every shipped YAML loads; bad files give messages naming key and file."""
from pathlib import Path

import pytest

from sepsnet.config import ConfigError, SEPSNetConfig, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, SEPSNetConfig)
    assert cfg.model.num_thing_classes >= 1
    # round trip through the dict stored in checkpoints
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_paper_numbers_in_coco_config() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "coco_r101.yaml")
    s = cfg.solver
    assert (s.lr, s.momentum, s.weight_decay, s.warmup_iters, s.max_iter, s.batch_size) == (
        0.01, 0.9, 1e-4, 1000, 600000, 6)
    assert s.steps == [120000, 420000, 500000]
    assert cfg.postprocess.alpha == 0.8
    assert cfg.model.backbone.name == "resnet101"


def test_base_inheritance() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "coco_x101.yaml")
    assert cfg.model.backbone.name == "resnext101_32x8d"
    assert cfg.solver.max_iter == 600000


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  backbone:\n    nmae: resnet50\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "nmae" in msg and str(p) in msg and "model.backbone" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("solver:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"solver\.lr.*number"):
        load_config(p)
    p.write_text("model:\n  num_thing_classes: 2.5\n")
    with pytest.raises(ConfigError, match="num_thing_classes.*integer"):
        load_config(p)
    p.write_text("model:\n  components: {mask_aux: 1}\n")
    with pytest.raises(ConfigError, match="mask_aux.*true/false"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_semantic_validation(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("postprocess:\n  alpha: 1.5\n")
    with pytest.raises(ConfigError, match="alpha"):
        load_config(p)
    p.write_text("model:\n  backbone: {name: vgg16}\n")
    with pytest.raises(ConfigError, match="vgg16"):
        load_config(p)
    p.write_text("model:\n  backbone: {pretrained: /nonexistent/weights.pth}\n")
    with pytest.raises(ConfigError, match="pretrained file not found"):
        load_config(p)


def test_overrides(tmp_path: Path) -> None:
    from sepsnet.config import parse_overrides

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny_synthetic.yaml",
                      overrides=parse_overrides(["solver.max_iter=30", "model.components.mask_aux=false",
                                                 "data.min_size_train=[128, 160]"]))
    assert cfg.solver.max_iter == 30 and cfg.model.components.mask_aux is False
    assert cfg.data.min_size_train == [128, 160]
    with pytest.raises(ConfigError, match="solver.max_itr|max_itr"):
        load_config(Path(__file__).parents[1] / "configs" / "tiny_synthetic.yaml",
                    overrides=parse_overrides(["solver.max_itr=3"]))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["solver"])
