"""Tests for hcsc_jax.convert: PyTorch <-> Flax weights.

torchvision cannot be installed beside the CPU torch build used here, so the PyTorch reference is
a short torchvision-layout ResNet written in this file (`_torch_resnet`: the same module names,
v1.5 bottleneck with the stride on the 3x3 conv, symmetric padding, MaxPool2d(3, 2, 1),
Sequential downsample) with the MoCo v2 head ``fc = Sequential(Linear, ReLU, Linear)``. Tests that
need torch skip without it. For speed on a 2-core CPU the numerical checks use batch 2 and small
images: 64 px for the 7x7-stem models, 32 px (R50) / 16 px (R18) for the small-stem ones; the
padding and layout differences they guard against show at any even size.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
from flax import nnx

from hcsc_jax import convert, models
from hcsc_jax.models import ProjectionHead
from hcsc_jax.run import checkpoints


def _meta(arch="resnet18", width=0.25, small_stem=True, embed_dim=16, hidden_dim=32, in_channels=3):
    return models.encoder_meta(
        {
            "arch": arch,
            "width": width,
            "small_stem": small_stem,
            "embed_dim": embed_dim,
            "hidden_dim": hidden_dim,
            "dtype": "float32",
        },
        in_channels,
        32,
    )


def _pure(model):
    _, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(s)


def _random_stats_encoder(meta, seed=1):
    """An encoder with random weights and non-trivial BN scale/bias/mean/var, filled from NumPy
    into an abstract model (a real JAX initialization costs ~25 s of compiles on a cold CPU)."""
    import jax

    graphdef, p, s = nnx.split(models.build_encoder(meta, abstract=True), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name in ("mean", "bias"):
            return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

    nnx.replace_by_pure_dict(p, jax.tree.map_with_path(fill, nnx.to_pure_dict(p)))
    nnx.replace_by_pure_dict(s, jax.tree.map_with_path(fill, nnx.to_pure_dict(s)))
    return nnx.merge(graphdef, p, s)


def _assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


# ----------------------------------------------------------------------------- PyTorch reference


def _torch_resnet(arch, *, small_stem=False, width=1.0, in_channels=3, hidden_dim=None, out_dim=128):
    """torchvision-layout ResNet + MoCo v2 head; forward -> (pooled features, L2-normalized z)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def ch(c):
        return max(1, round(c * width))

    def conv(cin, cout, k, s, p):
        return nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride, downsample):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, planes, 3, stride, 1), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes)
            self.relu, self.downsample = nn.ReLU(), downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride, downsample):
            super().__init__()
            self.conv1, self.bn1 = conv(cin, planes, 1, 1, 0), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, stride, 1), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = conv(planes, planes * 4, 1, 1, 0), nn.BatchNorm2d(planes * 4)
            self.relu, self.downsample = nn.ReLU(), downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    block, layers = {
        "resnet18": (Basic, (2, 2, 2, 2)),
        "resnet34": (Basic, (3, 4, 6, 3)),
        "resnet50": (Bottle, (3, 4, 6, 3)),
    }[arch]

    class Net(nn.Module):
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
                    cout = planes * block.expansion
                    ds = None
                    if stride != 1 or cin != cout:
                        ds = nn.Sequential(conv(cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))
                    blocks.append(block(cin, planes, stride, ds))
                    cin = cout
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            h = hidden_dim or cin
            self.fc = nn.Sequential(nn.Linear(cin, h), nn.ReLU(), nn.Linear(h, out_dim))

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            f = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return f, nn.functional.normalize(self.fc(f), dim=1)

    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial affine and running statistics
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(1234)
    return net.eval()


def _sd_numpy(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize(
    "arch,small_stem,width,in_channels,size,hidden",
    [
        ("resnet50", False, 1.0, 3, 64, None),
        ("resnet50", True, 1.0, 3, 32, None),
        ("resnet18", False, 1.0, 3, 64, None),
        ("resnet18", True, 0.25, 1, 16, 128),
        ("resnet34", False, 0.25, 3, 64, 48),
    ],
)
@pytest.mark.slow
def test_torch_weights_give_the_same_outputs(arch, small_stem, width, in_channels, size, hidden):
    torch = pytest.importorskip("torch")
    net = _torch_resnet(
        arch, small_stem=small_stem, width=width, in_channels=in_channels, hidden_dim=hidden, out_dim=64
    )
    sd = _sd_numpy(net)
    meta = convert.infer_meta(sd)
    assert meta["model"] == {
        "arch": arch,
        "width": width,
        "small_stem": small_stem,
        "embed_dim": 64,
        "hidden_dim": hidden or net.fc[0].in_features,
        "dtype": "float32",
    }
    assert meta["in_channels"] == in_channels
    model = convert.torch_to_encoder(sd)
    x = np.random.default_rng(0).normal(size=(2, in_channels, size, size)).astype(np.float32)
    with torch.no_grad():
        f_ref, z_ref = (t.numpy() for t in net(torch.from_numpy(x)))
    feats, z = model(x.transpose(0, 2, 3, 1), train=False)  # NCHW -> NHWC
    assert feats.shape == f_ref.shape and z.shape == z_ref.shape
    assert _rel_err(feats, f_ref) < 1e-4, _rel_err(feats, f_ref)
    assert _rel_err(z, z_ref) < 1e-4, _rel_err(z, z_ref)
    # ... and the exported dict is the torch one again (num_batches_tracked reset to 0).
    back = convert.encoder_to_torch(model)
    assert list(back) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], 0 if k.endswith("num_batches_tracked") else v, err_msg=k)


# ----------------------------------------------------------------------------- round trip, keys


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_import_round_trip_is_bit_exact(arch):
    meta = _meta(arch, width=0.125, small_stem=arch == "resnet18", embed_dim=8, hidden_dim=None)
    model = _random_stats_encoder(meta)
    sd = convert.encoder_to_torch(model)
    assert sd["conv1.weight"].shape[2:] == ((3, 3) if arch == "resnet18" else (7, 7))
    assert (
        sd["layer2.0.downsample.0.weight"].ndim == 4
        and sd["fc.0.weight"].shape == (8 * (4 if arch == "resnet50" else 1) * 8,) * 2
    )
    assert sd["bn1.num_batches_tracked"].dtype == np.int64 and int(sd["bn1.num_batches_tracked"]) == 0
    assert "fc.0.weight" not in convert.encoder_to_torch(model, backbone_only=True)
    again = convert.torch_to_encoder(sd, meta)
    _assert_trees_equal(_pure(model), _pure(again))
    # Meta inferred from shapes equals the original one.
    inferred = convert.infer_meta(sd)
    assert inferred["model"]["arch"] == arch and inferred["model"]["width"] == 0.125
    _assert_trees_equal(_pure(model), _pure(convert.torch_to_encoder(sd)))


def test_authors_layout_imports_and_ignores_momentum_encoder_and_queue(caplog):
    meta = _meta()
    model = _random_stats_encoder(meta)
    sd = convert.encoder_to_torch(model)
    authors = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    authors.update({f"module.encoder_k.{k}": v + 1 for k, v in sd.items()})
    authors["module.queue"] = np.zeros((16, 64), np.float32)
    authors["module.queue_ptr"] = np.zeros((1,), np.int64)
    _assert_trees_equal(_pure(model), _pure(convert.torch_to_encoder(authors)))
    # Without the DataParallel "module." prefix too.
    plain_q = {k[len("module.") :]: v for k, v in authors.items()}
    _assert_trees_equal(_pure(model), _pure(convert.torch_to_encoder(plain_q, meta)))


def test_torchvision_dict_without_head_keeps_fresh_head(caplog):
    meta = _meta(hidden_dim=None, embed_dim=128)
    model = _random_stats_encoder(meta)
    sd = convert.encoder_to_torch(model, backbone_only=True)
    sd["fc.weight"] = np.zeros((1000, 128), np.float32)
    sd["fc.bias"] = np.zeros((1000,), np.float32)
    with caplog.at_level("WARNING"):
        got = convert.torch_to_encoder({f"module.{k}": v for k, v in sd.items()}, seed=5)
    assert "fc.weight (1000, 128)" in caplog.text and "fresh initialization" in caplog.text
    p, s = _pure(got)
    p0, s0 = _pure(model)
    _assert_trees_equal((p0["backbone"], s0), (p["backbone"], s))
    fresh = nnx.to_pure_dict(nnx.state(ProjectionHead(128, None, 128, rngs=nnx.Rngs(5)), nnx.Param))
    _assert_trees_equal(fresh, p["head"])


def test_missing_and_unexpected_keys_are_named():
    meta = _meta()
    sd = convert.encoder_to_torch(_random_stats_encoder(meta))
    missing = {f"module.encoder_q.{k}": v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \(1: layer3.1.bn2.running_var\)") as e:
        convert.torch_to_encoder(missing, meta)
    assert "unexpected" not in str(e.value)
    extra = dict(sd, **{"layer1.0.conv9.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1: layer1.0.conv9.weight\)"):
        convert.torch_to_encoder(extra, meta)
    # Many missing: a count and the first 20.
    half = {k: v for k, v in sd.items() if not k.startswith("layer4")}
    with pytest.raises(ValueError, match=r"missing keys \(\d+: layer4\.0\.conv1\.weight.*more\)"):
        convert.torch_to_encoder(half, meta)
    bad = dict(sd, **{"fc.2.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(ValueError, match=r"fc.2.weight: torch \(3, 32\)"):
        convert.torch_to_encoder(bad, meta)
    with pytest.raises(ValueError, match="unsupported ResNet"):
        convert.infer_meta({k: v for k, v in sd.items() if not k.startswith("layer4.1")})


def test_cli_missing_files(tmp_path, capsys):
    pytest.importorskip("torch")
    assert convert.main(["import-torch", str(tmp_path / "nope.pth"), str(tmp_path / "out")]) == 2
    assert "no such PyTorch checkpoint file" in capsys.readouterr().err
    assert convert.main(["export-torch", str(tmp_path / "nothing"), str(tmp_path / "x.pth")]) == 2
    assert "neither a training workdir" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_import_then_export_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    net = _torch_resnet("resnet18", small_stem=True, width=0.25, hidden_dim=32, out_dim=16)
    sd = _sd_numpy(net)
    pth = tmp_path / "hcsc.pth"
    wrapped = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    wrapped.update({f"module.encoder_k.{k}": v for k, v in net.state_dict().items()})
    wrapped["module.queue"] = torch.randn(16, 32)
    wrapped["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": wrapped, "optimizer": {}}, pth)
    out = tmp_path / "enc"
    r = _convert_cli("import-torch", str(pth), str(out))
    assert r.returncode == 0, r.stderr
    model, meta = checkpoints.restore_encoder(str(out))
    assert meta["model"]["arch"] == "resnet18" and meta["model"]["small_stem"] is True
    # The file does not say what input it was trained on: ImageNet's, said, recorded for eval.py.
    assert ("assumed ImageNet's image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225) "
            "(the file does not say); pass --image-size --mean --std if the weights were trained "
            "otherwise") in r.stderr
    assert meta["input"] == dict(image_size=224, channels=3, mean=[0.485, 0.456, 0.406],
                                 std=[0.229, 0.224, 0.225])
    assert convert.main(["import-torch", str(pth), str(tmp_path / "given"), "--image-size=16",
                         "--mean=0.5,0.5,0.5", "--std=0.2,0.2,0.2"]) == 0
    assert checkpoints.restore_encoder(str(tmp_path / "given"))[1]["input"] == dict(
        image_size=16, channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        f_ref, z_ref = (t.numpy() for t in net(torch.from_numpy(x)))
    feats, z = model(x.transpose(0, 2, 3, 1), train=False)
    assert _rel_err(feats, f_ref) < 1e-4 and _rel_err(z, z_ref) < 1e-4

    back = tmp_path / "back.pth"
    r = _convert_cli("export-torch", str(out), str(back), "--moco-layout")
    assert r.returncode == 0, r.stderr
    obj = torch.load(back, map_location="cpu", weights_only=True)
    assert obj["arch"] == "resnet18"
    got = {k[len("module.encoder_q.") :]: v for k, v in obj["state_dict"].items()}
    net.load_state_dict(got)  # strict: every key and shape of the torchvision layout + head
    for k, v in sd.items():
        np.testing.assert_array_equal(
            got[k].numpy(), 0 if k.endswith("num_batches_tracked") else v, err_msg=k
        )
    # Plain torchvision names, backbone only, in-process.
    plain = tmp_path / "plain.pth"
    assert convert.main(["export-torch", str(out), str(plain), "--backbone-only"]) == 0
    obj = torch.load(plain, map_location="cpu", weights_only=True)
    res = net.load_state_dict(obj, strict=False)
    assert sorted(res.missing_keys) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert not res.unexpected_keys


def _convert_cli(*args):
    """Runs `python -m hcsc_jax.convert ARGS` from the repo root on the CPU."""
    return subprocess.run(
        [sys.executable, "-m", "hcsc_jax.convert", *args], check=False, capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def _not_checkpoints(tmp_path, good_pth):
    """Files that torch.load must never see -> {name: (path, what the one line says)}."""
    import tarfile

    files = {}
    (tmp_path / "notes.pth").write_text("hello world\n")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as tar:
        tar.add(good_pth, arcname="model.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("notes/readme.txt", "not a checkpoint")
    # A zip bomb: a few KB whose data.pkl expands to 5 MB (a 1 MB file expanding to 1 GiB alike).
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", bytes(5 * 2**20))
        z.writestr("archive/version", "3\n")
    neither = ("is not a PyTorch checkpoint: neither the zip archive that torch.save writes nor a legacy "
               "pickle")
    files.update({name: (tmp_path / name, neither) for name in ("notes.pth", "random.pth", "model.tar.gz")})
    files["other.zip"] = (tmp_path / "other.zip", "is not a PyTorch checkpoint: a zip archive without the "
                                                   "<name>/data.pkl that torch.save writes")
    files["bomb.pth"] = (tmp_path / "bomb.pth", "is not a PyTorch checkpoint: its zip members would expand "
                                                 "to 5,242,882 bytes, ")
    return files


def test_a_file_that_is_no_checkpoint_is_not_told_to_trust_pickle(tmp_path, capsys, monkeypatch):
    """Text, random bytes, a .tar.gz, a zip without data.pkl and a zip bomb are refused before
    torch.load reads them, in one line that gives no --trust-pickle advice; the files torch.save
    writes (zip, and the legacy pickle) are read."""
    torch = pytest.importorskip("torch")
    net = _torch_resnet("resnet18", small_stem=True, width=0.25, hidden_dim=32, out_dim=16)
    good = tmp_path / "good.pth"
    torch.save(net.state_dict(), good)
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    for name, (path, message) in _not_checkpoints(tmp_path, good).items():
        for flags in ([], ["--trust-pickle"]):
            assert convert.main(["import-torch", str(path), str(tmp_path / "out"), *flags]) == 2, name
            err = capsys.readouterr().err
            assert message in err and "--trust-pickle" not in err, (name, err)
            assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    monkeypatch.setattr(torch, "load", load)
    torch.save(net.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for path in (good, tmp_path / "legacy.pth"):
        np.testing.assert_array_equal(convert.load_torch_state_dict(str(path))["conv1.weight"],
                                      net.state_dict()["conv1.weight"].numpy())


@pytest.mark.parametrize("key,value,message", [
    ("conv1.weight", np.nan, r"conv1.weight holds NaN or inf \(432 of 432 values\)"),
    ("layer2.1.bn2.weight", np.inf, r"layer2.1.bn2.weight holds NaN or inf \(1 of 32 values\)"),
    ("layer1.0.bn1.running_var", -0.5,
     r"layer1.0.bn1.running_var holds negative variances \(min -0.5\): not a BatchNorm's running variance"),
    ("fc.0.weight", "int64", r"fc.0.weight is a int64 tensor; the model needs floating-point values there"),
])
def test_weights_that_are_no_weights_are_refused_naming_the_tensor(tmp_path, capsys, key, value, message):
    """NaN, inf, integer tensors where weights belong, negative running variances: one line
    naming the tensor, nothing written (num_batches_tracked, int64, is fine)."""
    torch = pytest.importorskip("torch")
    net = _torch_resnet("resnet18", small_stem=True, width=0.25, hidden_dim=32, out_dim=16)
    sd = net.state_dict()
    assert sd["bn1.num_batches_tracked"].dtype == torch.int64
    if value == "int64":
        sd[key] = sd[key].to(torch.int64)
    else:
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = value
        if np.isnan(value):
            sd[key].fill_(value)
    torch.save(sd, tmp_path / "bad.pth")
    assert convert.main(["import-torch", str(tmp_path / "bad.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {message}\n", err) and not (tmp_path / "out").exists()


def test_without_torch_import_is_one_line_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    (tmp_path / "a.pth").write_bytes(b"")
    assert convert.main(["import-torch", str(tmp_path / "a.pth"), str(tmp_path / "out")]) == 2
    assert "need torch, an optional dependency: pip install torch" in capsys.readouterr().err


def test_pickled_objects_need_trust_pickle(tmp_path, capsys):
    """A file with non-tensor objects (the authors' files carry an argparse.Namespace) is refused
    by the safe load, with the flag to pass; --trust-pickle then reads it."""
    import argparse

    torch = pytest.importorskip("torch")
    net = _torch_resnet("resnet18", small_stem=True, width=0.25, hidden_dim=32, out_dim=16)
    pth = tmp_path / "with_args.pth"
    torch.save({"args": argparse.Namespace(lr=0.03), "state_dict": net.state_dict()}, pth)
    with pytest.raises(ValueError, match="pass --trust-pickle"):
        convert.load_torch_state_dict(str(pth))
    assert convert.main(["import-torch", str(pth), str(tmp_path / "refused")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    sd = convert.load_torch_state_dict(str(pth), trust_pickle=True)
    np.testing.assert_array_equal(sd["conv1.weight"], net.state_dict()["conv1.weight"].numpy())
    assert convert.main(["import-torch", str(pth), str(tmp_path / "trusted"), "--trust-pickle"]) == 0


def test_an_input_no_encoder_can_take_is_refused_wherever_it_is_read_or_written(tmp_path, capsys):
    """image size, mean and std of an encoder's input: from import-torch's flags, a sidecar, an
    exported encoder's meta, eval's data fields, an `InputSpec` by hand. A std of 0, a NaN, a size
    < 1, a sidecar of the wrong JSON type: one line, exit 2, nothing written (before: imported
    without a word, then NaN features and a 10.8% kNN with exit 0)."""
    torch = pytest.importorskip("torch")
    from hcsc_jax import InputSpec
    from hcsc_jax.evaluators import common

    net = _torch_resnet("resnet18", small_stem=True, width=0.125, hidden_dim=16, out_dim=8)
    pth = tmp_path / "enc.pth"
    torch.save(net.state_dict(), pth)
    flags = {"--std=0,0,0": "std must be finite numbers > 0", "--mean=nan,0,0": "mean must be finite numbers",
             "--image-size=-3": "image_size must be an integer >= 1, got -3",
             "--image-size=0": "image_size must be an integer >= 1, got 0"}
    for flag, message in flags.items():
        assert convert.main(["import-torch", str(pth), str(tmp_path / "out"), flag]) == 2, flag
        err = capsys.readouterr().err
        assert f"error: import-torch: {message}" in err and len(err.strip().splitlines()) == 1, (flag, err)
    wrong_type = "is JSON, but not what export-torch writes"
    zero_std = {"input": {"image_size": 16, "mean": [0.5] * 3, "std": [0.0]}}
    sidecars = {json.dumps(zero_std): "input std must be",
                json.dumps({"input": {"image_size": -5}}): "input image_size must be an integer >= 1, got -5",
                json.dumps([1, 2]): f"{wrong_type} (the file is not an object",
                json.dumps({"input": [16]}): f"{wrong_type} (input is not an object"}
    for text, message in sidecars.items():
        (tmp_path / "enc.pth.json").write_text(text)
        assert convert.main(["import-torch", str(pth), str(tmp_path / "out")]) == 2, text
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (text, err)
    assert not (tmp_path / "out").exists()
    # A good import; its meta is checked again where it is read.
    (tmp_path / "enc.pth.json").unlink()
    assert convert.main(["import-torch", str(pth), str(tmp_path / "out"), "--image-size=16"]) == 0
    with pytest.raises(ValueError, match=r"^InputSpec: std must be finite numbers > 0, one per channel"):
        InputSpec(16, 3, (0.5,) * 3, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match=r"^InputSpec: mean must be .* per channel \(3\), got \[0.5\]"):
        InputSpec(16, 3, (0.5,), (0.2,) * 3)
    data = ml_collections.ConfigDict(dict(dataset="digits", train_split="train", eval_split="test"))
    with pytest.raises(common.EvalError, match=r"^std must be finite numbers > 0, .*; set --config.image_"):
        common.data_spec(data, None, dict(image_size=16, mean=[0.5], std=[0.0]))
    # An output path that cannot be written: one line naming it.
    (tmp_path / "file").write_text("")
    assert convert.main(["export-torch", str(tmp_path / "out"), str(tmp_path / "file" / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file" in err and len(err.strip().splitlines()) == 1, err
