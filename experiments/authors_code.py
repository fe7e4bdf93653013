"""Running the authors' released code (github.com/gyfastas/HCSC, MIT License) on a CPU, side by side
with hcsc-jax: it is read from `../shared/reference/HCSC` (next to this repository), never copied.

Their code expects CUDA, NCCL, faiss-GPU and torchvision. `install_shims` makes it run on the CPU
with as little as that needs: `Tensor.cuda()` returns the tensor; NCCL becomes gloo and
`torch.cuda.set_device` does nothing; `DistributedDataParallel` gets no device ids; faiss's GPU
index is the CPU `IndexFlatL2`; torchvision (not installable beside the CPU build of torch) is a
stub whose `models` holds a torchvision-layout ResNet with hcsc-jax's width and small-stem options
(`torch_resnet`); pandas (imported, unused) is a stub. Their training code itself runs unchanged.
Used by tests/test_authors_step.py (one step) and experiments/authors_digits.py (whole runs).
"""

from __future__ import annotations

import importlib.machinery
import pathlib
import sys
import types

REFERENCE = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "HCSC"


def missing() -> str | None:
    """Why the authors' code cannot run here (one line), or None."""
    try:
        import faiss  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"the authors' code needs {err.name} (pip install torch==2.13.0)"
    if not (REFERENCE / "pretrain.py").is_file():
        return f"the authors' code is not at {REFERENCE}"
    return None


def torch_resnet(arch: str, *, small_stem: bool, width: float, in_channels: int, num_classes: int):
    """A torchvision-layout ResNet-18/34 (the module names, blocks and initialization of
    `torchvision.models.resnet*`) with hcsc-jax's width and small-stem options: `fc` =
    Linear(features, num_classes)."""
    import torch
    from torch import nn

    ch = lambda c: max(1, round(c * width))
    conv = lambda cin, cout, k, s, p: nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin, planes, stride, downsample):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, planes, 3, stride, 1), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes)
            self.relu, self.downsample = nn.ReLU(), downsample

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    layers = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[arch]

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            cin = ch(64)
            self.conv1 = conv(in_channels, cin, 3, 1, 1) if small_stem else conv(in_channels, cin, 7, 2, 3)
            self.bn1, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
            self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, stride=2, padding=1)
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
                planes, blocks = ch(planes), []
                for j in range(n):
                    stride = 2 if i > 0 and j == 0 else 1
                    ds = None
                    if stride != 1 or cin != planes:
                        ds = nn.Sequential(conv(cin, planes, 1, stride, 0), nn.BatchNorm2d(planes))
                    blocks.append(BasicBlock(cin, planes, stride, ds))
                    cin = planes
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, num_classes)
            for m in self.modules():  # torchvision's initialization (and hcsc-jax's: models/resnet.py)
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _dataset_class(name: str):
    if not name[:1].isupper():
        raise AttributeError(name)
    return type(name, (), {})


def install_shims(arch: str, **resnet) -> None:
    """The shims of the module docstring; `arch` and `resnet` (small_stem, width, in_channels) are
    the encoder their `torchvision.models.__dict__[arch]` builds. Puts their code on sys.path."""
    import faiss
    import torch
    import torch.distributed as dist

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    init = dist.init_process_group
    dist.init_process_group = lambda backend=None, **kw: init("gloo", **kw)
    ddp = torch.nn.parallel.DistributedDataParallel

    class CPUDistributedDataParallel(ddp):
        def __init__(self, module, device_ids=None, output_device=None, **kw):
            super().__init__(module, **kw)

    torch.nn.parallel.DistributedDataParallel = CPUDistributedDataParallel
    torchvision, pandas = _stub("torchvision"), _stub("pandas")
    torchvision.models, torchvision.transforms, torchvision.datasets = (
        _stub(f"torchvision.{name}") for name in ("models", "transforms", "datasets"))
    torchvision.models.__dict__[arch] = lambda num_classes: torch_resnet(arch, num_classes=num_classes,
                                                                         **resnet)
    torchvision.datasets.__getattr__ = _dataset_class  # base classes in hcsc/loader.py
    for module in (torchvision, torchvision.models, torchvision.transforms, torchvision.datasets, pandas):
        sys.modules.setdefault(module.__name__, module)
    faiss.StandardGpuResources = lambda: None
    faiss.GpuIndexFlatConfig = types.SimpleNamespace
    faiss.GpuIndexFlatL2 = lambda res, d, cfg: faiss.IndexFlatL2(d)
    if str(REFERENCE) not in sys.path:
        sys.path.insert(0, str(REFERENCE))
