"""ResNets for small images and the "no final ReLU" variants used by UCIR/PODNet.

- `resnet32` (He et al. 2016, CIFAR version, section 4.2): 3 stages of 5 basic blocks with 16/32/64 channels,
  64-d features, stages named `stage_1..stage_3` as in the original code. As in the paper (and the original's and
  PyCIL's code), the shortcuts are identities, and where a stage halves the map and doubles the channels the
  shortcut subsamples and pads the new channels with zeros (option A, no parameters); convolutions start from
  He et al.'s normal init (std sqrt(2 / (k^2 * out channels))). Global average pooling instead of the original's
  fixed AvgPool(8), so any input size works (identical at 32 px).
- `resnet18_cifar`: torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool (the usual CIFAR variant).
- `cosine_resnet18`, `cosine_resnet32`: the same networks without the ReLU after the last residual addition
  (Hou et al., CVPR 2019), so features can be negative before the cosine classifier.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from backbone import BACKBONES
from utils.registry import UserError


#: the modules whose inputs adapters (ACL, DynaMMo) and POD-spatial (PODNet) use: one per stage
STAGES, LAYERS = ("stage_1", "stage_2", "stage_3"), ("layer1", "layer2", "layer3", "layer4")


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, last_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra_channels = stride, c_out - c_in
        self.last_relu = last_relu

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity; subsampled and zero-padded in channels where the block changes the shape (option A)."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.last_relu else out


class ResNet32(nn.Module):
    def __init__(self, last_relu: bool = True, blocks_per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, c_in = [], 16
        for i, c_out in enumerate((16, 32, 64)):
            blocks = []
            for b in range(blocks_per_stage):
                is_last = i == 2 and b == blocks_per_stage - 1
                blocks.append(_Block(c_in, c_out, 2 if (b == 0 and i > 0) else 1, last_relu or not is_last))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage_1, self.stage_2, self.stage_3 = stages
        self.feature_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stage_3(self.stage_2(self.stage_1(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class _BasicBlockNoReLU(BasicBlock):
    """torchvision's BasicBlock without the ReLU after the residual addition."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out + identity


def _no_pretrained(name, pretrained, pretrain_path):
    if pretrained and not pretrain_path:
        raise UserError(f"backbone '{name}' has no published weights; set pretrain_path or pretrained: false")


def _load_path(model, pretrain_path):
    if pretrain_path:
        from backbone.pretrained import load_into, read_state_dict

        load_into(model, read_state_dict(pretrain_path), pretrain_path)
    return model


def _resnet18_cifar(last_relu: bool) -> nn.Module:
    model = resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.feature_dim = 512
    if not last_relu:
        model.layer4[-1].__class__ = _BasicBlockNoReLU
    return model


@BACKBONES.register("resnet32", layer_names=STAGES)
def resnet32(pretrained=False, pretrain_path=None):
    _no_pretrained("resnet32", pretrained, pretrain_path)
    return _load_path(ResNet32(), pretrain_path if pretrained else None)


@BACKBONES.register("cosine_resnet32", layer_names=STAGES)
def cosine_resnet32(pretrained=False, pretrain_path=None):
    _no_pretrained("cosine_resnet32", pretrained, pretrain_path)
    return _load_path(ResNet32(last_relu=False), pretrain_path if pretrained else None)


@BACKBONES.register("resnet18_cifar", layer_names=LAYERS)
def resnet18_cifar(pretrained=False, pretrain_path=None):
    _no_pretrained("resnet18_cifar", pretrained, pretrain_path)
    return _load_path(_resnet18_cifar(last_relu=True), pretrain_path if pretrained else None)


@BACKBONES.register("cosine_resnet18", layer_names=LAYERS)
def cosine_resnet18(pretrained=False, pretrain_path=None):
    """ImageNet-style resnet18 (7x7 stem) without the final ReLU; torchvision weights fit it unchanged."""
    from backbone.pretrained import load_pretrained, torchvision_cache_file

    model = resnet18(weights=None)
    model.fc = nn.Identity()
    model.feature_dim = 512
    model.layer4[-1].__class__ = _BasicBlockNoReLU
    if pretrained:
        load_pretrained(model, "resnet18", pretrain_path, torchvision_cache_file("resnet18"))
    return model
