"""The classifier: a torchvision ResNet at output stride 16 with a 1x1 CAM head."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

from core.batchnorm import BNPlan, GroupedBatchNorm2d, to_grouped_batchnorm
from core.csi import CSIHead
from tools.errors import UserError

# name -> (constructor, ImageNet weights, channels of layer4)
ARCHITECTURES = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, 2048),
}
BN_MODES = ("fix", "normal")
OUTPUT_STRIDE = 16


class FixedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics; weight and bias still train.

    Unlike torchvision.ops.FrozenBatchNorm2d the affine part stays trainable (the reference's `fix` mode).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def fix_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d below `module` for a FixedBatchNorm2d holding the same tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FixedBatchNorm2d):
            fixed = FixedBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            fixed.load_state_dict(child.state_dict())
            setattr(module, name, fixed)
        else:
            fix_batchnorm(child)
    return module


def set_output_stride_16(resnet: tvm.ResNet) -> None:
    """Make layer4 keep the resolution of layer3 (stride 1, no dilation)."""
    first = resnet.layer4[0]
    strided_conv = first.conv2 if isinstance(first, tvm.resnet.Bottleneck) else first.conv1
    strided_conv.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)


def load_backbone_weights(resnet: tvm.ResNet, architecture: str, pretrained: str | Mapping) -> None:
    """Load ImageNet weights through torchvision's weights API, a local state dict file, or a state dict
    given directly (the demo backbone: core/step.py build_model resolves --pretrained demo)."""
    if isinstance(pretrained, Mapping):
        state, pretrained = dict(pretrained), "(given weights)"
    elif pretrained == "none":
        return
    elif pretrained == "imagenet":
        weights = ARCHITECTURES[architecture][1]
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # offline: URLError, OSError, ...
            raise UserError(
                f"cannot download the ImageNet weights for {architecture} ({type(exc).__name__}: {exc}); "
                f"put {Path(weights.url).name} in ~/.cache/torch/hub/checkpoints/, "
                "or pass --pretrained none (random init) or --pretrained PATH (a torchvision state dict)"
            ) from None
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise UserError(f"--pretrained {pretrained}: no such file; use imagenet, demo, none or a path to a "
                            "state dict")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--pretrained {pretrained} is not a readable torch state dict ({exc})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(
            f"--pretrained {pretrained} does not fit {architecture}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


HEADS = ("csi", "gap")


class Classifier(nn.Module):
    """ResNet backbone (output stride 16), a 1x1 conv producing the class maps, and the scoring head.

    head "csi" (OASS): each class is scored through its Class-Specific Instance, the backbone map
    masked by that class's CAM (core/csi.py). head "gap" (the baselines): logits = GAP(class maps).
    forward returns (logits B x C, raw class maps B x C x H/16 x W/16); its `bn_plan` (core/batchnorm.py)
    reaches every BatchNorm of the call, None: plain BatchNorm over the whole batch.
    """

    def __init__(self, architecture: str = "resnet50", num_classes: int = 20, mode: str = "normal",
                 pretrained: str | Mapping = "imagenet", head: str = "gap") -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise UserError(f"--architecture {architecture} is not supported; choose one of {', '.join(ARCHITECTURES)}")
        if mode not in BN_MODES:
            raise UserError(f"--mode {mode} is not supported; choose fix or normal")
        if head not in HEADS:
            raise UserError(f"--head {head} is not supported; choose csi or gap")
        build, _, channels = ARCHITECTURES[architecture]
        resnet = build(weights=None)
        load_backbone_weights(resnet, architecture, pretrained)
        set_output_stride_16(resnet)
        self.backbone = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )
        # normal: BatchNorm that can follow the reference's per-call, per-GPU grouping (core/batchnorm.py)
        if mode == "fix":
            fix_batchnorm(self.backbone)
        else:
            to_grouped_batchnorm(self.backbone)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.head.weight)
        self.csi = CSIHead(channels, num_classes) if head == "csi" else None

    def forward(self, images: torch.Tensor, bn_plan: BNPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = backbone_features(self.backbone, images, bn_plan)
        features = self.head(x)
        if self.csi is None:
            return features.mean(dim=(2, 3)), features
        return self.csi(x, make_cams(features), bn_plan), features


def normalise(norm: nn.Module, x: torch.Tensor, bn_plan: BNPlan | None) -> torch.Tensor:
    return norm(x, bn_plan) if isinstance(norm, GroupedBatchNorm2d) else norm(x)


def residual_block(block: tvm.resnet.BasicBlock | tvm.resnet.Bottleneck, x: torch.Tensor,
                   bn_plan: BNPlan | None) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward, step for step, with the plan passed to each BatchNorm."""
    out = block.relu(normalise(block.bn1, block.conv1(x), bn_plan))
    out = normalise(block.bn2, block.conv2(out), bn_plan)
    if isinstance(block, tvm.resnet.Bottleneck):
        out = normalise(block.bn3, block.conv3(block.relu(out)), bn_plan)
    identity = x if block.downsample is None else normalise(block.downsample[1], block.downsample[0](x), bn_plan)
    out += identity
    return block.relu(out)


def backbone_features(backbone: nn.Sequential, images: torch.Tensor, bn_plan: BNPlan | None) -> torch.Tensor:
    """The backbone's layer4 map: stem (conv, BatchNorm, ReLU, max-pool), then the residual blocks."""
    conv, norm, relu, maxpool, *layers = backbone
    x = maxpool(relu(normalise(norm, conv(images), bn_plan)))
    for layer in layers:
        for block in layer:
            x = residual_block(block, x, bn_plan)
    return x


def classifier_from_config(config: dict, num_classes: int, pretrained: str = "none") -> Classifier:
    """The network a run's saved config describes (its weights come from the checkpoint)."""
    return Classifier(config["architecture"], num_classes=num_classes, mode=config["mode"], pretrained=pretrained,
                      head=config["head"])


def make_cams(features: torch.Tensor) -> torch.Tensor:
    """The reference's CAM: a = ReLU(features); ReLU(a - 1e-5) / (max over h, w of a + 1e-5), per channel."""
    positive = F.relu(features)
    return F.relu(positive - 1e-5) / (positive.amax(dim=(2, 3), keepdim=True) + 1e-5)


def parameter_groups(model: Classifier, lr: float, wd: float) -> list[dict]:
    """The reference's four groups: the ResNet's parameters are "pretrained", everything else "scratch";
    weights get wd, biases none; lr x1 / x2 (pretrained weights / biases) and x10 / x20 (scratch)."""
    groups = {key: [] for key in ("pretrained_weight", "pretrained_bias", "scratch_weight", "scratch_bias")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "pretrained" if name.startswith("backbone.") else "scratch"
        kind = "bias" if name.endswith("bias") else "weight"
        groups[f"{part}_{kind}"].append(param)
    return [
        {"name": "pretrained_weight", "params": groups["pretrained_weight"], "lr": lr, "weight_decay": wd},
        {"name": "pretrained_bias", "params": groups["pretrained_bias"], "lr": 2 * lr, "weight_decay": 0.0},
        {"name": "scratch_weight", "params": groups["scratch_weight"], "lr": 10 * lr, "weight_decay": wd},
        {"name": "scratch_bias", "params": groups["scratch_bias"], "lr": 20 * lr, "weight_decay": 0.0},
    ]


def poly_lr_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """Poly schedule: the lr of step `step` (0-based) is lr0 * (1 - step/T)^power."""
    return (1.0 - step / total_steps) ** power
