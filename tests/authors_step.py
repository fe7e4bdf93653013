"""Runs one training step of the authors' released code (`../shared/reference/HCSC`, MIT License)
on the CPU, for tests/test_authors_step.py: their `pretrain.build_model`, `build_optimizer`,
`adjust_learning_rate`, `run_hkmeans` and `train`, called as they are, in one process per rank
over gloo.

  python tests/authors_step.py INPUT.npz OUTPUT.npz RANK WORLD PORT

The shims that let their code run on a CPU are `experiments/authors_code.py`'s (`install_shims`).
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

import json
import pathlib
import sys
import types

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from experiments import authors_code  # noqa: E402

missing = authors_code.missing


def _shims(args: dict, given: dict):
    """`authors_code.install_shims` and the two given draws; returns the sampler and the list it
    records the probabilities it is given into."""
    import torch

    authors_code.install_shims(args["arch"], small_stem=args["small_stem"], width=args["width"],
                               in_channels=args["in_channels"])
    perm = torch.from_numpy(given["perm"])
    torch.randperm = lambda n, *a, **k: perm.clone()
    recorded = []

    class GivenBernoulli:
        """`Bernoulli(p).sample()` -> the next given mask, `p` recorded."""

        masks: list = []
        errors: list = []

        def __init__(self, probs):
            self.probs = probs

        def sample(self):  # their ICSC draw sits in a bare `except`: errors are kept, raised after the step
            mask = GivenBernoulli.masks.pop(0)
            if tuple(mask.shape) != tuple(self.probs.shape):
                GivenBernoulli.errors.append(f"mask {tuple(mask.shape)} for p {tuple(self.probs.shape)}")
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
    model = torch.nn.parallel.DistributedDataParallel(model)  # as their main(), on the CPU
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
    assert not sampler.errors, sampler.errors
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
