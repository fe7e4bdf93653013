"""Models: torchvision-layout ResNets with grouped BN, MoCo v2 projection head, encoder."""

from .heads import Encoder, ProjectionHead, l2_normalize, make_encoder
from .norm import GroupedBatchNorm
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50

__all__ = [
    "ARCHS",
    "BasicBlock",
    "Bottleneck",
    "Encoder",
    "GroupedBatchNorm",
    "ProjectionHead",
    "ResNet",
    "l2_normalize",
    "make_encoder",
    "resnet18",
    "resnet34",
    "resnet50",
]
