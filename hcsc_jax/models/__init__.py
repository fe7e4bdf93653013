"""Models: torchvision-layout ResNets with grouped BN, timm-layout ViTs, MoCo v2 projection head,
encoder (its builders `make_encoder`, `encoder_meta`, `input_meta`, `build_encoder`, `check_model_config`; run
functionally with `split_model` / `apply_model`)."""

from .encoder import (
    COMPUTE_DTYPES,
    Encoder,
    apply_model,
    build_encoder,
    check_input,
    check_model_config,
    encoder_meta,
    input_meta,
    l2_normalize,
    make_encoder,
    split_model,
)
from .heads import ProjectionHead
from .norm import GroupedBatchNorm
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from .vit import VIT_ARCHS, VisionTransformer, build_vit

__all__ = [
    "ARCHS",
    "BasicBlock",
    "COMPUTE_DTYPES",
    "Bottleneck",
    "Encoder",
    "GroupedBatchNorm",
    "ProjectionHead",
    "ResNet",
    "VIT_ARCHS",
    "VisionTransformer",
    "apply_model",
    "build_encoder",
    "check_model_config",
    "encoder_meta",
    "check_input",
    "input_meta",
    "l2_normalize",
    "make_encoder",
    "resnet18",
    "resnet34",
    "resnet50",
    "split_model",
    "build_vit",
]
