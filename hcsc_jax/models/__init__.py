"""Models: torchvision-layout ResNets with grouped BN, MoCo v2 projection head, encoder (and
its builders: `make_encoder`, `encoder_meta`, `build_encoder`)."""

from .encoder import Encoder, build_encoder, encoder_meta, l2_normalize, make_encoder
from .heads import ProjectionHead
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
    "build_encoder",
    "encoder_meta",
    "l2_normalize",
    "make_encoder",
    "resnet18",
    "resnet34",
    "resnet50",
]
