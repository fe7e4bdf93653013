"""hcsc_jax.run.checkpoints: the weights an evaluation reads are the weights that were saved.

`restore_encoder` restores a workdir's `TrainState` as a tree of dicts, yet checks the SHA-256
digest that training computed over the `TrainState` leaves in their own order; an exported
encoder carries a digest of its own. Small states filled from NumPy (no XLA initialization).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import digits, eval_digits
from hcsc_jax import models, sharding
from hcsc_jax.evaluators import EvalError, common
from hcsc_jax.method import train_step as ts
from hcsc_jax.run import checkpoints, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = ["--config.dataset=digits", "--config.train_split=train", "--config.eval_split=test",
          "--config.image_size=8", "--config.mean=(0.5,)", "--config.std=(0.5,)"]


def _filled(meta, seed=0):
    """The encoder of `meta` with random NumPy weights (unit BN variances)."""
    graphdef, p, s = nnx.split(models.build_encoder(meta, abstract=True), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)
    nnx.replace_by_pure_dict(p, jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.1,
                                             nnx.to_pure_dict(p)))
    nnx.replace_by_pure_dict(s, jax.tree.map(lambda x: np.ones(x.shape, np.float32), nnx.to_pure_dict(s)))
    return nnx.merge(graphdef, p, s)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with steps 1 and 2 of a real TrainState: a ViT of 11 blocks (integer keys past 9,
    which a tree of dicts orders "10" < "2") under AdamW (optax's named-tuple states)."""
    config = digits.get_config("vit,runlocal")
    config.model.depth = 11
    meta = models.encoder_meta(config.model.to_dict(), 1, config.bn_group_size)
    tx, _ = setup.make_optimizer(config, 10)
    state = ts.init_state(_filled(meta), tx, config.queue_size, config.model.embed_dim, 2, 0)
    path = tmp_path_factory.mktemp("run")
    mngr = checkpoints.manager(str(path))
    for step in (1, 2):
        checkpoints.save(mngr, state.replace(step=jax.numpy.array(step, jax.numpy.int32)),
                         {"epoch": step, "encoder": meta}, None)
    mngr.wait_until_finished()
    return str(path)


def _eval_config():
    """configs/eval_digits.py:runlocal with the digits fields an encoder without config.json needs."""
    config = eval_digits.get_config("runlocal")
    config.update(dataset="digits", train_split="train", eval_split="test", image_size=8, mean=(0.5,),
                  std=(0.5,))
    return config


def _flip_a_bit(monkeypatch, step):
    """Restores of `step` come back with one bit of one query-encoder weight flipped (as a bad
    disk block or a copy error would leave it): the exponent's top bit, 0.0253 -> ~1e37."""
    restore = checkpoints.restore_replicated

    def flipped(mngr, s, item):
        tree = restore(mngr, s, item)
        if s == step:
            params = tree["q_params"] if "q_params" in tree else tree["params"]
            leaf = params["backbone"]["cls_token"]
            leaf = leaf["value"] if isinstance(leaf, dict) else leaf
            bits = np.asarray(leaf).copy().view(np.uint32)
            bits.flat[0] ^= np.uint32(1 << 30)
            new = jax.device_put(bits.view(np.float32), leaf.sharding)
            if isinstance(params["backbone"]["cls_token"], dict):
                params["backbone"]["cls_token"]["value"] = new
            else:
                params["backbone"]["cls_token"] = new
        return tree

    monkeypatch.setattr(checkpoints, "restore_replicated", flipped)


@pytest.mark.slow
def test_restore_encoder_checks_the_training_digest_and_falls_back(workdir, monkeypatch, caplog):
    model, meta = checkpoints.restore_encoder(workdir)  # the digest of an intact step matches
    assert meta["step"] == 2 and meta["model"]["depth"] == 11
    intact = np.asarray(model.backbone.cls_token[...])
    _flip_a_bit(monkeypatch, 2)
    with caplog.at_level(logging.WARNING):
        model, meta = checkpoints.restore_encoder(workdir)
    assert meta["step"] == 1 and np.array_equal(np.asarray(model.backbone.cls_token[...]), intact)
    assert ("encoder at step 2 in" in caplog.text and "differs from the one saved (SHA-256 digest)); trying "
            "the previous one" in caplog.text)
    with pytest.raises(checkpoints.NoReadableStep,
                       match=r"^the encoder at step 2 in .* could not be restored \(ValueError: the restored "
                             r"state of step 2 differs from the one saved \(SHA-256 digest\)\)$"):
        checkpoints.restore_encoder(workdir, step=2)
    config = _eval_config()
    with pytest.raises(EvalError, match=r"^the encoder at step 2 in .* could not be restored \(ValueError: "):
        common.from_checkpoint(config, workdir, 2, sharding.make_mesh())  # eval.py --step=2: one line, exit 1
    _flip_a_bit(monkeypatch, 1)
    with pytest.raises(checkpoints.NoReadableStep,
                       match=r"no encoder in .* could be restored \(steps \[1, 2\]; step 2: ValueError: "):
        checkpoints.restore_encoder(workdir)


def _export(path, meta, nan=False):
    model = _filled(meta)
    _, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
    if nan:
        s["backbone"]["bn1"]["var"][...] = np.full(s["backbone"]["bn1"]["var"].shape, np.nan, np.float32)
    checkpoints.export_encoder(str(path), meta, p, s)
    return model


def test_an_exported_encoder_carries_a_digest_and_nan_is_refused(tmp_path, monkeypatch, caplog):
    meta = models.encoder_meta(dict(arch="resnet18", width=0.0625, small_stem=True, embed_dim=8,
                                    hidden_dim=16, dtype="float32"), 3, 8)
    model = _export(tmp_path / "enc", meta)
    loaded, got = checkpoints.restore_encoder(str(tmp_path / "enc"))
    assert len(got["digest"]) == 64
    assert np.array_equal(np.asarray(loaded.head.fc2.kernel[...]), np.asarray(model.head.fc2.kernel[...]))
    # An export of an earlier version has no digest: NaN / inf only, with a note.
    meta_file = tmp_path / "enc" / "0" / "meta" / "metadata"
    old = {k: v for k, v in json.loads(meta_file.read_text()).items() if k != "digest"}
    meta_file.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        checkpoints.restore_encoder(str(tmp_path / "enc"))
    assert "exported without a weight digest" in caplog.text
    _export(tmp_path / "nan", meta, nan=True)
    with pytest.raises(checkpoints.NoReadableStep,
                       match=r"the encoder in .*/nan cannot be used: \['batch_stats'\]\['backbone'\]\['bn1'\]"
                             r"\['var'\] of step 0 holds NaN or inf"):
        checkpoints.restore_encoder(str(tmp_path / "nan"))
    vit = models.encoder_meta(digits.get_config("vit,runlocal").model.to_dict(), 1, None)
    _export(tmp_path / "vit", vit)
    _flip_a_bit(monkeypatch, 0)
    with pytest.raises(checkpoints.NoReadableStep,
                       match=r"the encoder in .*/vit cannot be used: the restored state of step 0 differs"):
        checkpoints.restore_encoder(str(tmp_path / "vit"))


def test_eval_py_stops_in_one_line_when_no_step_is_readable(workdir, tmp_path):
    """Every step's weights differ from their digest: eval.py exits 1 with one line, no results."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    for step in (1, 2):
        meta_file = run / "checkpoints" / str(step) / "meta" / "metadata"
        meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), digest="0" * 64)))
    proc = subprocess.run(
        [sys.executable, "eval.py", "--config=configs/eval_digits.py:runlocal", "--eval=knn",
         f"--checkpoint={run}", *DIGITS], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"eval.py: error: no encoder in {run}/checkpoints could be restored (steps [1, 2]; step 2: "
        "ValueError: the restored state of step 2 differs from the one saved (SHA-256 digest)) (see the "
        "warnings above)")
    assert "encoder at step 2 in" in proc.stderr and not any((run / "eval").glob("*.json"))


def test_a_vit_exported_to_torch_imports_back_without_arch_and_keeps_its_input(workdir, tmp_path, caplog):
    """export-torch writes the encoder's meta and the input it was trained on (the workdir's
    config.json) beside the .pth; import-torch reads them: a ViT of a non-standard width needs no
    --arch, and eval.py no --config.image_size / mean / std."""
    pytest.importorskip("torch")
    from hcsc_jax import convert

    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config_json = dict(image_size=8, augment=dict(mean=[0.5] * 3, std=[0.25] * 3))  # the fields it reads
    (run / "config.json").write_text(json.dumps(config_json))
    pth = str(tmp_path / "vit.pth")
    assert convert.main(["export-torch", str(run), pth]) == 0
    recorded = json.loads(open(convert.sidecar_path(pth)).read())
    assert recorded["input"] == dict(image_size=8, channels=1, mean=[0.5], std=[0.25])
    assert recorded["model"]["arch"] == "vit_t4" and recorded["model"]["width"] == 0.25
    with caplog.at_level(logging.WARNING):
        assert convert.main(["import-torch", pth, str(tmp_path / "imported")]) == 0
    assert "assumed" not in caplog.text
    model, meta = checkpoints.restore_encoder(str(tmp_path / "imported"))
    assert meta["model"]["arch"] == "vit_t4" and meta["input"] == recorded["input"]
    original, _ = checkpoints.restore_encoder(str(run))
    assert np.array_equal(np.asarray(model.backbone.blocks[10].mlp.fc2.kernel[...]),
                          np.asarray(original.backbone.blocks[10].mlp.fc2.kernel[...]))
    config = _eval_config()
    config.update(image_size=None, mean=None, std=None)
    ctx = common.from_checkpoint(config, str(tmp_path / "imported"), None, sharding.make_mesh())
    assert (ctx.data.image_size, ctx.data.mean, ctx.data.std) == (8, (0.5,), (0.25,))
    # Without its sidecar the width cannot be told from the shapes: --arch, as for any timm file.
    os.remove(convert.sidecar_path(pth))
    assert convert.main(["import-torch", pth, str(tmp_path / "bare")]) == 2
