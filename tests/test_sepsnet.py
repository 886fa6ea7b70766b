"""The assembled SE-PSNet (Sec. III): training losses, inference graphs, deploy mode."""
from __future__ import annotations

import pytest
import torch

from sepsnet.config import BackboneConfig, BlenderConfig, ComponentsConfig, FCOSConfig, HeadsConfig, ModelConfig
from sepsnet.model import build_model
from sepsnet.model.sepsnet import SEPSNet, strip_aux

from _loss_batch import toy_batch

ALL_LOSSES = {"loss_fcos_cls", "loss_fcos_box", "loss_fcos_ctr", "loss_mask_bce", "loss_mask_iou",
              "loss_mask_silhouette", "loss_mask_aux", "loss_stuff", "loss_stuff_silhouette",
              "loss_basis_silhouette", "loss_basis_semantic", "loss_confidence"}
OFF = dict(mask_loss=False, mask_score=False, silhouette_feature=False, mask_aux=False,
           silhouette_stuff=False)


def _cfg(**components) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name="resnet18", freeze_at=0), fpn_channels=16,
                       num_thing_classes=3, num_stuff_classes=2,
                       fcos=FCOSConfig(num_convs=1, sizes_of_interest=[32, 64, 128, 256]),
                       blender=BlenderConfig(max_train_instances=12),
                       heads=HeadsConfig(stuff_channels=16, basis_channels=16,
                                         basis_num_convs=1),
                       components=ComponentsConfig(**components))


def _batch(n: int = 2, size: int = 128, g: int = 3, seed: int = 0):
    """Images with elliptic instances and a two-class stuff background (INTERFACES targets)."""
    return toy_batch(n, size, g, seed, border=30, radius=(10.0, 16.0))


@pytest.mark.parametrize("shape", [(1, 3, 480, 640), (1, 3, 513, 1025), (1, 3, 128, 256)])
def test_forward_dense_shapes(shape):
    torch.manual_seed(0)
    model = SEPSNet(_cfg()).eval()
    h, w = shape[2:]
    with torch.no_grad():
        out = model.forward_dense(torch.randn(*shape))
    hs = [-(-h // s) for s in (8, 16, 32, 64, 128)]
    ws = [-(-w // s) for s in (8, 16, 32, 64, 128)]
    n_loc = sum(a * b for a, b in zip(hs, ws))
    expect = {"boxes": (1, n_loc, 4), "scores": (1, n_loc, 3), "centerness": (1, n_loc),
              "attention": (1, n_loc, 4 * 14 * 14), "bases": (1, 5, -(-h // 4), -(-w // 4)),
              "p3": (1, 16, hs[0], ws[0]), "stuff_logits": (1, 3, -(-h // 4), -(-w // 4))}
    assert {k: tuple(v.shape) for k, v in out.items()} == expect
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_train_step_losses_and_gradients():
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == ALL_LOSSES
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    for head in ("backbone", "fcos_head", "stuff_head", "basis_head", "mask_aux", "confidence_head",
                 "stuff_head.silhouette", "basis_head.semantic"):
        grads = [p.grad.abs().sum() for p in model.get_submodule(head).parameters()]
        assert sum(grads) > 0, head


def test_overfitting_lowers_the_loss():
    torch.manual_seed(0)
    model = SEPSNet(_cfg()).train()
    images, targets = _batch(n=1, seed=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    totals = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_deploy_matches_stripped_train_model():
    torch.manual_seed(0)
    train = SEPSNet(_cfg())
    assert set(train.aux_module_names()) == {"stuff_head.silhouette", "basis_head.semantic", "mask_aux"}
    deploy = SEPSNet(_cfg(), deploy=True).eval()
    assert deploy.aux_module_names() == []
    aux_params = {id(p) for n in train.aux_module_names() for p in train.get_submodule(n).parameters()}
    called = []
    for n in train.aux_module_names():
        train.get_submodule(n).register_forward_hook(lambda *a, n=n: called.append(n))
    train.eval()
    images = torch.randn(1, 3, 128, 160)
    ref = train(images)
    assert called == []
    rois = torch.tensor([[0, 5.0, 8.0, 90.0, 70.0], [0, 40.0, 30.0, 150.0, 120.0]])
    ref_inst = train.forward_instances(ref["bases"], ref["p3"], rois, ref["attention"][0, :2])
    sum(v.sum() for v in list(ref.values()) + list(ref_inst.values())).backward()
    assert all(p.grad is None for p in train.parameters() if id(p) in aux_params)
    assert called == []
    removed = strip_aux(train)
    assert set(removed) == {"stuff_head.silhouette", "basis_head.semantic", "mask_aux"}
    assert train.aux_module_names() == []
    deploy.load_state_dict(train.state_dict(), strict=True)
    with torch.no_grad():
        out = deploy(images)
        inst = deploy.forward_instances(out["bases"], out["p3"], rois, out["attention"][0, :2])
    for k in ref:
        assert torch.allclose(out[k], ref[k], atol=1e-5), k
    assert set(inst) == {"mask_probs", "iou_score", "silhouette_score"}
    for k in inst:
        assert torch.allclose(inst[k], ref_inst[k], atol=1e-5), k


def test_components_all_off_and_zero_instances():
    torch.manual_seed(0)
    model = SEPSNet(_cfg(**OFF)).train()
    assert model.aux_module_names() == ["basis_head.semantic"]
    images, targets = _batch(n=1)
    losses = model(images, targets)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_box", "loss_fcos_ctr", "loss_mask_bce",
                           "loss_stuff", "loss_basis_semantic"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
        assert out["bases"].shape[1] == 4
        inst = model.forward_instances(out["bases"], out["p3"], torch.zeros(0, 5), torch.zeros(0, 784))
    assert set(inst) == {"mask_probs"} and inst["mask_probs"].shape == (0, 56, 56)
    full = SEPSNet(_cfg()).eval()
    with torch.no_grad():
        d = full(images)
        inst = full.forward_instances(d["bases"], d["p3"], torch.zeros(0, 5), torch.zeros(0, 784))
    assert {k: tuple(v.shape) for k, v in inst.items()} == {
        "mask_probs": (0, 56, 56), "iou_score": (0,), "silhouette_score": (0,)}


def test_image_without_instances_trains():
    torch.manual_seed(0)
    model = SEPSNet(_cfg()).train()
    images, targets = _batch(n=1)
    targets[0].update(boxes=torch.zeros(0, 4), classes=torch.zeros(0, dtype=torch.int64),
                      masks=torch.zeros(0, 128, 128, dtype=torch.uint8))
    losses = model(images, targets)
    assert set(losses) == ALL_LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


class _Instances(torch.nn.Module):
    def __init__(self, model: SEPSNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, bases, p3, rois, attention):
        out = self.model.forward_instances(bases, p3, rois, attention)
        return out["mask_probs"], out["iou_score"], out["silhouette_score"]


def test_forward_instances_exports_with_dynamic_count(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = SEPSNet(_cfg(), deploy=True).eval()
    with torch.no_grad():
        d = model(torch.randn(1, 3, 128, 128))
    rois = torch.tensor([[0, 5.0, 8.0, 90.0, 70.0], [0, 40.0, 30.0, 120.0, 120.0], [0, 1.0, 1.0, 20.0, 20.0]])
    attn = d["attention"][0, :3]
    n = torch.export.Dim("n", min=0)
    path = tmp_path / "inst.onnx"
    torch.onnx.export(_Instances(model).eval(), (d["bases"], d["p3"], rois, attn), str(path), dynamo=True,
                      dynamic_shapes={"bases": None, "p3": None, "rois": {0: n}, "attention": {0: n}},
                      input_names=["bases", "p3", "rois", "attention"], opset_version=18)
    graph = onnx.load(str(path)).graph
    dims = {i.name: i.type.tensor_type.shape.dim[0] for i in graph.input}
    assert dims["rois"].dim_param and dims["attention"].dim_param  # really dynamic
    modes = [a.s for nd in graph.node if nd.op_type == "RoiAlign" for a in nd.attribute
             if a.name == "coordinate_transformation_mode"]
    assert modes and all(m == b"half_pixel" for m in modes)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for k in (0, 1, 3):
        feed = {"bases": d["bases"].numpy(), "p3": d["p3"].numpy(), "rois": rois[:k].numpy(),
                "attention": attn[:k].numpy()}
        got = sess.run(None, feed)
        with torch.no_grad():
            ref = model.forward_instances(d["bases"], d["p3"], rois[:k], attn[:k])
        for g, r in zip(got, ref.values()):
            assert g.shape == tuple(r.shape)
            assert torch.allclose(torch.from_numpy(g), r, atol=1e-5)


def test_confidence_loss_reaches_only_the_confidence_head():
    """Its inputs are detached (DESIGN facts): loss_confidence trains the head and nothing else."""
    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    images, targets = _batch()
    losses = model(images, targets)
    losses["loss_confidence"].backward()
    got = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {"confidence_head"}, got
