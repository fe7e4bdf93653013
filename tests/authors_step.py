"""Runs one training step of the authors' released code (`../shared/reference/HCSC`, MIT License)
on the CPU, for tests/test_authors_step.py: their `pretrain.build_model`, `build_optimizer`,
`adjust_learning_rate`, `run_hkmeans` and `train`, called as they are, in one process per rank
over gloo.

  python tests/authors_step.py INPUT.npz OUTPUT.npz RANK WORLD PORT

The shims, as few as their code needs off a GPU cluster: `Tensor.cuda()` returns the tensor;
the process group is gloo (their `init_distributed_mode` is not called); faiss's GPU index is the
CPU `IndexFlatL2`; torchvision (not installable beside the CPU torch build) is a stub whose
`models` holds a torchvision-layout ResNet (`torch_resnet`), and pandas (imported, unused) a stub.
Two draws are replaced by the inputs so that both sides see the same ones: ShuffleBN's
`torch.randperm` returns the given permutation, and each `Bernoulli(p).sample()` returns the
given selection mask (the `p` it was given is recorded, to compare with ours).

INPUT holds the encoders in torch names (`q/<name>`, `k/<name>`), SGD momentum buffers
(`mom/<name>`), the queue (d, K) and its pointer, the global views (B, C, H, W) in rank order,
the dataset indices, the permutation, the masks (`inst/<l>` (B, K); `pcsc/<l>` (B, M_l): column
c for prototype c) and, for a prototype step, the features to cluster; `args` (JSON) their
options. Rank 0 writes OUTPUT: the encoders and the queue after the step, the lr, their
clustering and the probabilities their sampler was given.
"""

from __future__ import annotations

import importlib.machinery
import json
import pathlib
import sys
import types

import numpy as np

REFERENCE = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "HCSC"


def missing() -> str | None:
    """Why the authors' step cannot run here (one line), or None."""
    try:
        import faiss  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"the authors' code needs {err.name} (pip install torch==2.13.0)"
    if not (REFERENCE / "pretrain.py").is_file():
        return f"the authors' code is not at {REFERENCE}"
    return None


def torch_resnet(arch: str, *, small_stem: bool, width: float, in_channels: int, num_classes: int):
    """A torchvision-layout ResNet (the module names and v1.5 blocks of `torchvision.models.resnet*`)
    with hcsc-jax's width and small-stem options: `fc` = Linear(features, num_classes)."""
    import torch
    from torch import nn

    ch = lambda c: max(1, round(c * width))
    conv = lambda cin, cout, k, s, p: nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)

    class Basic(nn.Module):
        expansion = 1

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
                    blocks.append(Basic(cin, planes, stride, ds))
                    cin = planes
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, num_classes)

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


def _shims(args: dict, given: dict):
    """The stubs and patches of the module docstring; returns the list the sampler records into."""
    import faiss
    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torchvision, pandas = _stub("torchvision"), _stub("pandas")
    torchvision.models, torchvision.transforms, torchvision.datasets = (
        _stub(f"torchvision.{name}") for name in ("models", "transforms", "datasets"))
    torchvision.models.__dict__[args["arch"]] = lambda num_classes: torch_resnet(
        args["arch"], small_stem=args["small_stem"], width=args["width"], in_channels=args["in_channels"],
        num_classes=num_classes)
    torchvision.datasets.__getattr__ = _dataset_class  # base classes in hcsc/loader.py
    for module in (torchvision, torchvision.models, torchvision.transforms, torchvision.datasets, pandas):
        sys.modules.setdefault(module.__name__, module)
    faiss.StandardGpuResources = lambda: None
    faiss.GpuIndexFlatConfig = types.SimpleNamespace
    faiss.GpuIndexFlatL2 = lambda res, d, cfg: faiss.IndexFlatL2(d)

    perm = torch.from_numpy(given["perm"])
    torch.randperm = lambda n, *a, **k: perm.clone()
    recorded = []

    class GivenBernoulli:
        """`Bernoulli(p).sample()` -> the next given mask, `p` recorded."""

        masks: list = []

        def __init__(self, probs):
            self.probs = probs

        def sample(self):
            mask = GivenBernoulli.masks.pop(0)
            assert tuple(mask.shape) == tuple(self.probs.shape), (mask.shape, self.probs.shape)
            recorded.append(self.probs.detach().numpy().copy())
            return mask

    torch.distributions.bernoulli.Bernoulli = GivenBernoulli
    return GivenBernoulli, recorded


def main(argv) -> int:
    inp, out, rank, world, port = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    given = dict(np.load(inp, allow_pickle=False))
    args = json.loads(str(given.pop("args")))
    sampler, recorded = _shims(args, given)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, str(REFERENCE))
    import pretrain

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a = types.SimpleNamespace(**args, device="cpu", local_rank=0, print_freq=10**9, cos=1, lr_final=0.0,
                              mlp=True, multi_crop=False, selection_on_local=False)
    model = pretrain.build_model(a, None)
    state = {f"encoder_{e}.{k[2:]}": torch.from_numpy(v) for k, v in given.items() for e in "qk"
             if k.startswith(f"{e}/")}
    state.update(queue=torch.from_numpy(given["queue"]), queue_ptr=torch.from_numpy(given["queue_ptr"]))
    missing_keys, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing_keys) <= {"queue_index"}, (missing_keys, unexpected)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = pretrain.build_optimizer(a, model)
    named = dict(model.module.named_parameters())
    for name, buf in given.items():
        if name.startswith("mom/"):
            optimizer.state[named[f"encoder_q.{name[4:]}"]]["momentum_buffer"] = torch.from_numpy(buf).clone()

    cluster_result = None
    if "features" in given:
        a.num_cluster = [str(k) for k in args["num_cluster"]]
        cluster_result = pretrain.run_hkmeans(given["features"].copy(), a)
    b = given["x_q"].shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)
    index = torch.from_numpy(given["index"][rows])
    masks = []  # in the order their forward draws: PCSC per level below the top, then ICSC per level
    if cluster_result is not None:
        for n in range(len(args["num_cluster"]) - 1):
            im2cluster = cluster_result["im2cluster"][n]
            neg = list(set(range(im2cluster.max())) - set(im2cluster[index].tolist()))  # as hcsc.py
            masks.append(torch.from_numpy(given[f"pcsc/{n}"][rows][:, neg]))
        masks += [torch.from_numpy(given[f"inst/{n}"][rows]) for n in range(len(args["num_cluster"]))
                  if f"inst/{n}" in given]
    sampler.masks = masks
    pretrain.adjust_learning_rate(optimizer, args["epoch"], a)
    images = [torch.from_numpy(given["x_q"][rows]), torch.from_numpy(given["x_k"][rows])]
    pretrain.train([(images, index)], model, torch.nn.CrossEntropyLoss(), optimizer, args["epoch"], a,
                   cluster_result)
    assert not sampler.masks, "a given mask was not drawn"
    if rank == 0:
        result = {k: v.detach().numpy() for k, v in model.module.state_dict().items()}
        result["lr"] = np.float64(optimizer.param_groups[0]["lr"])
        for i, p in enumerate(recorded):
            result[f"p/{i}"] = p
        for key, levels in (cluster_result or {}).items():
            for l, x in enumerate(levels):
                result[f"clusters/{key}/{l}"] = x.numpy()
        np.savez(out, **result)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
