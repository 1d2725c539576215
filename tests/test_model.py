import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

from core.builder import (
    Classifier,
    FixedBatchNorm2d,
    load_backbone_weights,
    make_cams,
    parameter_groups,
    poly_lr_factor,
)
from core.step import ema_momentum, freeze_as_teacher, update_teacher
from tools.errors import UserError


@pytest.mark.parametrize("arch,size,channels", [("resnet18", 64, 512), ("resnet50", 64, 2048), ("resnet18", 96, 512)])
def test_output_stride_is_16(arch, size, channels):
    model = Classifier(arch, pretrained="none", head="gap").eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, size, size))
        backbone_map = model.backbone(torch.randn(1, 3, size, size))
    assert features.shape == (1, 20, size // 16, size // 16)
    assert backbone_map.shape[1] == channels
    assert logits.shape == (1, 20)
    assert torch.allclose(logits, features.mean(dim=(2, 3)))


def test_head_is_1x1_without_bias():
    model = Classifier("resnet18", pretrained="none")
    assert model.head.kernel_size == (1, 1) and model.head.bias is None
    assert model.head.weight.shape == (20, 512, 1, 1)


def test_fix_mode_uses_running_statistics_and_trains_affine():
    model = Classifier("resnet18", mode="fix", pretrained="none").train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, FixedBatchNorm2d) for m in bns)
    before = bns[0].running_mean.clone()
    x = torch.randn(2, 3, 64, 64) * 5 + 3
    out_train = model(x)[0]
    assert torch.equal(bns[0].running_mean, before)  # statistics never move
    assert torch.allclose(out_train, model.eval()(x)[0])  # same in train and eval mode
    out_train.sum().backward()
    assert bns[0].weight.grad is not None and bns[0].bias.grad is not None


def test_normal_mode_is_ordinary_batchnorm():
    model = Classifier("resnet18", mode="normal", pretrained="none").train()
    assert not any(isinstance(m, FixedBatchNorm2d) for m in model.modules())
    bn = model.backbone[1]
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, before)


def test_cams_are_relu_normalised_per_channel():
    features = torch.tensor([[[[-1.0, 2.0], [4.0, 0.5]]], [[[-3.0, -1.0], [-2.0, -0.5]]]])
    cams = make_cams(features)
    # the reference subtracts 1e-5 before normalising: a tiny positive response is no activation
    tiny = make_cams(torch.tensor([[[[5e-6, 1.0]]]]))
    assert tiny[0, 0, 0, 0] == 0 and tiny[0, 0, 0, 1] == pytest.approx((1 - 1e-5) / (1 + 1e-5))
    assert torch.allclose(cams[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.125]]), atol=1e-4)
    assert torch.equal(cams[1], torch.zeros_like(cams[1]))


def test_parameter_groups_follow_the_reference():
    model = Classifier("resnet18", pretrained="none")
    groups = parameter_groups(model, lr=0.1, wd=1e-4)
    assert [g["lr"] for g in groups] == [0.1, 0.2, 1.0, 2.0]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[2] == {id(model.head.weight)} and ids[3] == set()
    bn = model.backbone[1]
    assert id(bn.weight) in ids[0] and id(bn.bias) in ids[1]
    assert sum(len(s) for s in ids) == len(list(model.parameters()))


def test_poly_schedule_and_reference_optimizer():
    assert poly_lr_factor(0, 100) == 1.0
    assert poly_lr_factor(50, 100) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(99, 100) == pytest.approx(0.01**0.9)
    from core.config import parse_args
    from core.step import build_optimizer

    args = parse_args({}, ["--data_dir", "x"])
    opt = build_optimizer(Classifier("resnet18", pretrained="none"), args)
    # the reference's SGD received the weight decay in the momentum slot: effective momentum 1e-4
    assert all(g["momentum"] == 1e-4 and g["nesterov"] for g in opt.param_groups)


def test_ema_updates_parameters_only():
    assert ema_momentum(0, 0.99) == 0.0
    assert ema_momentum(1, 0.99) == 0.5
    assert ema_momentum(1000, 0.99) == 0.99
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = freeze_as_teacher(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))  # independent, as the reference
    assert teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student[1].running_mean.fill_(7.0)
        teacher[1].running_mean.fill_(-1.0)
    t_before = [p.clone() for p in teacher.parameters()]
    update_teacher(teacher, student, step=3, alpha_ema=0.99)  # a = 0.75
    for t0, t1, s in zip(t_before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, 0.75 * t0 + 0.25 * s)
    assert torch.equal(teacher[1].running_mean, torch.full((2,), -1.0))  # the teacher's own statistics
    update_teacher(teacher, student, step=0, alpha_ema=0.99)  # a = 0: a copy of the student's parameters
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_warmup_alpha_schedules_and_lr_factor():
    from core.config import parse_args
    from core.step import alpha_re_at, lr_factor

    args = parse_args({}, ["--data_dir", "x", "--warmup_epoch", "3", "--alpha_re", "4", "--alpha_schedule_re", "0"])
    # the reference's step warm-up: 1/3 for steps 0..660, 2/3 for 661..1321, then poly from step 1322
    assert lr_factor(args, 0, 9915) == pytest.approx(1 / 3)
    assert lr_factor(args, 660, 9915) == pytest.approx(1 / 3)
    assert lr_factor(args, 661, 9915) == pytest.approx(2 / 3)
    assert lr_factor(args, 1322, 9915) == pytest.approx(poly_lr_factor(1322, 9915))
    assert alpha_re_at(args, 0, 100) == 4.0 and alpha_re_at(args, 99, 100) == 4.0  # Puzzle-CAM's schedule 0
    args = parse_args({}, ["--data_dir", "x", "--alpha_re", "3", "--alpha_schedule_re", "0.05"])
    assert alpha_re_at(args, 0, 1000) == 0.0 and alpha_re_at(args, 25, 1000) == pytest.approx(1.5)
    assert alpha_re_at(args, 999, 1000) == 3.0
    assert lr_factor(args, 10, 100) == pytest.approx(poly_lr_factor(10, 100))  # warm-up off by default


def test_csi_head_scores_the_classes_and_gap_is_the_baseline():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    gap = Classifier("resnet18", pretrained="none", head="gap").eval()
    csi = Classifier("resnet18", pretrained="none", head="csi").eval()
    assert gap.csi is None and csi.csi is not None
    with torch.no_grad():
        logits, features = csi(x)
        expected = csi.csi(csi.backbone(x), make_cams(features))
    assert torch.equal(logits, expected) and not torch.allclose(logits, features.mean(dim=(2, 3)))
    groups = parameter_groups(csi, lr=0.1, wd=1e-4)
    scratch_weights = {id(p) for p in groups[2]["params"]}
    assert {id(csi.head.weight), id(csi.csi.weight), id(csi.csi.conv_weight)} <= scratch_weights
    assert id(csi.csi.bias) in {id(p) for p in groups[3]["params"]}


def test_pretrained_errors_are_one_line_user_errors(tmp_path):
    resnet = tvm.resnet18(weights=None)
    with pytest.raises(UserError, match="no such file"):
        load_backbone_weights(resnet, "resnet18", str(tmp_path / "missing.pth"))
    torch.save(tvm.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="does not fit resnet18"):
        load_backbone_weights(resnet, "resnet18", str(tmp_path / "r34.pth"))
    good = tvm.resnet18(weights=None).state_dict()
    torch.save(good, tmp_path / "r18.pth")
    load_backbone_weights(resnet, "resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(resnet.conv1.weight, good["conv1.weight"])


def test_imagenet_weights_offline_say_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvm.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match="--pretrained none"):
        Classifier("resnet18", pretrained="imagenet")
