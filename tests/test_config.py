"""Config loading: every shipped YAML loads; bad files give messages naming key and file."""
from pathlib import Path

import pytest

from sepsnet.config import ConfigError, SEPSNetConfig, config_from_dict, load_config, validate_model

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, SEPSNetConfig)
    assert cfg.model.num_thing_classes >= 1
    # round trip through the dict stored in checkpoints
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


PAPER_SOLVER = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "warmup_iters": 1000,
                "warmup_method": "constant", "steps": [120000, 420000, 500000], "gamma": 0.1,
                "max_iter": 600000, "batch_size": 6}


@pytest.mark.parametrize("name", ["coco_r101.yaml", "cityscapes_r101.yaml"])
def test_paper_numbers_in_paper_configs(name: str) -> None:
    """Paper IV-A, written out in the file itself (not inherited from dataclass defaults)."""
    import yaml

    path = Path(__file__).parents[1] / "configs" / name
    cfg = load_config(path)
    assert {k: getattr(cfg.solver, k) for k in PAPER_SOLVER} == PAPER_SOLVER
    written = yaml.safe_load(path.read_text())["solver"]
    assert {k: written.get(k) for k in PAPER_SOLVER} == PAPER_SOLVER
    assert cfg.postprocess.alpha == 0.8
    assert cfg.model.backbone.name == "resnet101"
    # the paper starts from ImageNet weights: the config names the file and its input convention
    assert cfg.model.backbone.pretrained == "weights/R-101.pkl" and cfg.model.backbone.stride_in_1x1
    assert (cfg.data.input_format, cfg.data.pixel_std) == ("BGR", [1.0, 1.0, 1.0])


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
    cfg = load_config(p)  # a stored config need not have its pretrained file; a training start does
    with pytest.raises(ConfigError, match="pretrained file not found"):
        validate_model(cfg.model, training=True)


@pytest.mark.parametrize("text, key", [
    ("postprocess:\n  dedup_iou: 1.2\n", "postprocess.dedup_iou"),
    ("postprocess:\n  nms_thresh: -0.1\n", "postprocess.nms_thresh"),
    ("postprocess:\n  score_thresh: 2\n", "postprocess.score_thresh"),
    ("postprocess:\n  max_instances: 0\n", "postprocess.max_instances"),
    ("postprocess:\n  pre_nms_topk: 0\n", "postprocess.pre_nms_topk"),
    ("postprocess:\n  stuff_area_limit: -1\n", "postprocess.stuff_area_limit"),
    ("model:\n  fcos: {sizes_of_interest: [64, 64, 256, 512]}\n", "model.fcos.sizes_of_interest"),
    ("model:\n  blender: {sampling_ratio: -1}\n", "model.blender.sampling_ratio"),
    ("solver:\n  weight_decay_norm: -1.0e-4\n", "solver.weight_decay_norm"),
])
def test_range_validation_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert key in str(err.value) and str(err.value).startswith(str(p))


def test_range_validation_accepts_bounds(tmp_path: Path) -> None:
    p = tmp_path / "ok.yaml"
    p.write_text("postprocess: {dedup_iou: 1.0, mask_thresh: 0.0, max_instances: 1, stuff_area_limit: 0}\n"
                 "model:\n  blender: {sampling_ratio: 0}\n")
    cfg = load_config(p)
    assert cfg.postprocess.dedup_iou == 1.0 and cfg.model.blender.sampling_ratio == 0
    assert cfg.solver.weight_decay_norm == 0.0 and cfg.solver.weight_decay_bias is None


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
