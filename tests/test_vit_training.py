"""Training and evaluating a ViT encoder: the AdamW recipe against torch.optim.AdamW, the HCSC
step on 1 vs 8 devices and in bfloat16, digits.py:vit,runlocal trained and evaluated by kNN,
linear (through eval.py), semi-supervised and cluster, and the ViT-S/16 of
imagenet_hcsc_vit_s16.py:runlocal transferred to VOC07.

The step tests use one tiny ViT (vit_s4 at width 1/8: 48 dims, 6 heads, 2 blocks; 16x16x3 images,
a 4x4 grid of patches), global batch 32, queue 64, prototype levels 8 / 4, AdamW with warm-up and
gradient clipping, no ShuffleBN; its weights are filled from NumPy (no initialization compiles).
"""

import json
import os
import subprocess
import sys

import imagenet_like
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import digits, eval_imagenet, imagenet_hcsc_vit_s16
from hcsc_jax import models, sharding
from hcsc_jax.data import augmentations, pipeline
from hcsc_jax.evaluators import cluster, common, knn, semisup, voc
from hcsc_jax.method import device_prototypes, objective
from hcsc_jax.method import train_step as ts
from hcsc_jax.run import checkpoints, resume, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, K, N, HW, D, G = 32, 64, 64, 16, 16, 4
LEVELS = (8, 4)
# 1 vs 8 devices: the per-device batch differs (32 vs 4), so XLA may order the reductions (the
# gradient all-reduce, the loss mean) differently. Measured after two AdamW steps: <= 2.9e-7 on
# the parameters, optimizer moments and queue, <= 4.8e-7 on the losses; stated: rtol = atol = 1e-5.
DEV_TOL = dict(rtol=1e-5, atol=1e-5)
# bfloat16 matmuls (float32 residual stream, LayerNorm statistics, loss): the first step's losses
# moved by at most 0.017% from float32 here (loss 0.006%, instance 0.017%, proto 0.002%); stated:
# 0.5% of the float32 loss.
BF16_RTOL = 5e-3


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


# ----------------------------------------------------------------------------- optimizer


@pytest.mark.slow
def test_adamw_with_warmup_and_clipping_is_torch_adamw():
    torch = pytest.importorskip("torch")
    base_lr, batch, total, warmup, wd, clip = 1e-2, 512, 6, 2, 0.1, 1.0
    tx, schedule = ts.make_optimizer(base_lr, batch, total, wd, optimizer="adamw", warmup_steps=warmup,
                                     grad_clip=clip, betas=(0.9, 0.95))
    peak = base_lr * batch / 256
    lrs = [float(schedule(t)) for t in range(total)]
    expected = [peak * t / warmup for t in range(warmup)] + [
        peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup))) for t in range(warmup, total)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-9)  # MoCo v3's per-step schedule
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    grads = [{k: 3 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(4)]
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=lrs[0], betas=(0.9, 0.95), weight_decay=wd)
    p, state = jax.tree.map(jnp.asarray, params), None
    state = tx.init(p)
    for t, g in enumerate(grads):
        for k in tp:
            tp[k].grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        opt.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        for k in tp:
            np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{t} {k}")


def test_sgd_default_is_the_same_transformation():
    tx, _ = ts.make_optimizer(0.03, 256, 10, 1e-4, 0.9)
    old = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(optax.cosine_decay_schedule(0.03, 10), 0.9))
    p = {"w": jnp.arange(6.0).reshape(2, 3)}
    g = {"w": jnp.ones((2, 3))}
    a, b = tx.init(p), old.init(p)
    for _ in range(3):
        (ua, a), (ub, b) = tx.update(g, a, p), old.update(g, b, p)
        np.testing.assert_array_equal(ua["w"], ub["w"])
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw"):
        ts.make_optimizer(0.03, 256, 10, optimizer="lamb")


# ----------------------------------------------------------------------------- the step


def _tiny_vit(dtype=jnp.float32):
    abstract = nnx.eval_shape(lambda: models.make_encoder(
        "vit_s4", out_dim=D, hidden_dim=32, width=0.125, depth=2, image_size=HW, dtype=dtype,
        rngs=nnx.Rngs(0)))
    graphdef, params, stats = models.split_model(abstract)
    return nnx.merge(graphdef, _random(params), stats)


def _random(params, seed=0):
    """Random float32 weights of the shapes of `params` (a random-init stand-in, no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (rng.normal(size=x.shape) / np.sqrt(x.shape[0])).astype(np.float32), params)


def _host_protos():
    """(centroids, temperatures, valid, parents) of levels 8 / 4, unit-norm centroids."""
    rng = np.random.default_rng(1)
    cents = [rng.normal(size=(m, D)).astype(np.float32) for m in LEVELS]
    return ([c / np.linalg.norm(c, axis=1, keepdims=True) for c in cents],
            [rng.uniform(0.1, 0.3, m).astype(np.float32) for m in LEVELS], [np.ones(m, bool) for m in LEVELS],
            [rng.integers(0, LEVELS[1], LEVELS[0]).astype(np.int32)])


@pytest.fixture(scope="module")
def step_setup():
    model = _tiny_vit()
    tx, _ = ts.make_optimizer(1e-3, B, 10, 0.1, optimizer="adamw", warmup_steps=1, grad_clip=1.0)
    view = augmentations.AugmentConfig(crop_size=HW, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    cfg = ts.StepConfig(objective=objective.ObjectiveConfig(group_size=G), view_q=view, view_k=view,
                        ema_momentum=0.9, shuffle_bn=False)
    rng = np.random.default_rng(2)
    protos = _host_protos()
    bottom = rng.integers(0, LEVELS[0], size=N)
    return dict(model=model, tx=tx, cfg=cfg, protos=protos,
                images=rng.integers(0, 256, size=(N, HW, HW, 3), dtype=np.uint8),
                labels=np.stack([bottom, protos[3][0][bottom]], 1).astype(np.int32),
                state0=_host(ts.init_state(model, tx, K, D, len(LEVELS), seed=3)),
                idx=[rng.permutation(N)[:B].astype(np.int32) for _ in range(2)])


def _two_steps(s, mesh, graphdef=None):
    """Two steps with prototypes from state0 (its ICSC cache refreshed) -> [(state, metrics)] on the host."""
    rep, shd = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    protos = device_prototypes.make_prototypes(*s["protos"], sharding=rep)
    graphdef = graphdef or models.split_model(s["model"])[0]
    fn = ts.jit_train_step(graphdef, s["tx"], s["cfg"], mesh, warmup=False)
    batch = pipeline.gather_batch(mesh)
    images, labels = jax.device_put((s["images"], s["labels"]), rep)
    state = jax.jit(ts.refresh_queue_lse, out_shardings=rep)(jax.device_put(s["state0"], rep), protos)
    out = []
    for i in range(2):
        state, m = fn(state, *batch(images, labels, jax.device_put(s["idx"][i], shd)), protos)
        out.append((_host(state), _host(m)))
    return out


@pytest.fixture(scope="module")
def runs(step_setup):
    return {n: _two_steps(step_setup, sharding.make_mesh(jax.devices()[:n])) for n in (1, 8)}


@pytest.mark.slow
def test_one_vs_eight_devices_same_step(runs):
    for (s1, m1), (s8, m8) in zip(runs[1], runs[8]):
        assert m1.keys() == m8.keys() and "loss_proto" in m1
        for k in m1:
            np.testing.assert_allclose(m1[k], m8[k], err_msg=k, **DEV_TOL)
        for field in ("q_params", "k_params", "opt_state", "queue", "queue_lse"):
            for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(getattr(s1, field)),
                                      jax.tree_util.tree_leaves_with_path(getattr(s8, field))):
                np.testing.assert_allclose(a, b, err_msg=f"{field}{jax.tree_util.keystr(p)}", **DEV_TOL)
        assert jax.tree.leaves(s1.q_stats) == []  # no BatchNorm statistics in a ViT
    s0, s2 = runs[1][0][0], runs[1][1][0]
    assert int(s2.step) == 2 and not np.allclose(s0.q_params["backbone"]["cls_token"],
                                                 s2.q_params["backbone"]["cls_token"])


@pytest.mark.slow
def test_bfloat16_step_within_tolerance_of_float32(step_setup, runs):
    graphdef16 = models.split_model(_tiny_vit(jnp.bfloat16))[0]
    (s1, m1), _ = _two_steps(step_setup, sharding.make_mesh(jax.devices()[:1]), graphdef16)
    ref = runs[1][0][1]
    for k in ("loss", "loss_instance", "loss_proto"):
        np.testing.assert_allclose(m1[k], ref[k], rtol=BF16_RTOL, err_msg=k)
    assert m1["loss"] != ref["loss"]  # bfloat16 compute really happened
    for field in ("q_params", "k_params", "opt_state", "queue"):
        dtypes = {x.dtype for x in jax.tree.leaves(getattr(s1, field))} - {np.dtype(np.int32)}
        assert dtypes == {np.dtype(np.float32)}, (field, dtypes)


# ----------------------------------------------------------------------------- runlocal runs


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_shuffle_bn_for_a_vit_stops_before_anything_is_written(tmp_path):
    c = digits.get_config("vit,runlocal")
    c.shuffle_bn = True
    with pytest.raises(ValueError, match=r"vit_t4 is a ViT and has no BatchNorm: set --config\.shuffle_bn"):
        trainer.train_and_evaluate(c, str(tmp_path / "run"))
    c.shuffle_bn, c.image_size = False, 10
    with pytest.raises(ValueError, match=r"image size 10 is not divisible by the ViT patch size 4"):
        trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_digits_vit_runlocal_trains_and_every_evaluator_runs(tmp_path):
    """`python train.py --config configs/digits.py:vit,runlocal` (README), then the README's
    `python eval.py --config=configs/eval_digits.py:runlocal --eval=linear --checkpoint=RUN` and
    kNN, semi-supervised and cluster (eval_digits.py:runlocal protocols) on its ViT."""
    from configs import eval_digits

    c = digits.get_config("vit,runlocal")
    assert (c.model.arch, c.optimizer, c.shuffle_bn, c.weight_decay) == ("vit_t4", "adamw", False, 0.1)
    summary = trainer.train_and_evaluate(c, str(tmp_path))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "type" not in r]
    assert summary["step"] == 3 * (1437 // 64) and all(np.isfinite(r["loss"]) for r in steps)
    assert steps[0]["step"] == 5 and steps[0]["lr"] < steps[4]["lr"]  # lr warm-up over the first 22 steps
    assert "loss_proto" in [r for r in records if r.get("type") == "epoch"][-1]
    assert [r["epoch"] for r in records if r.get("type") == "eval"] == [1, 2]
    assert 0 <= summary["knn_top1"] <= 1 and summary["num_clusters"] == [20, 10]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "eval.py", "--config=configs/eval_digits.py:runlocal", "--eval=linear",
           f"--checkpoint={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "eval" / f"linear_step{summary['step']}.json") as f:
        res = json.load(f)
    assert res["model"]["arch"] == "vit_t4" and 0 <= res["top1"] <= 100
    cfg = eval_digits.get_config("runlocal")
    cfg.update(progress_bar=False, embed_batch=256)
    ctx = common.from_checkpoint(cfg, str(tmp_path), None, sharding.make_mesh())
    assert ctx.feature_dim() == 48 and ctx.encoder.meta["model"]["arch"] == "vit_t4"
    cfg.evals.semisup.update(fraction=0.1, batch_size=128)
    for name, fn in (("knn", knn.run), ("semisup", semisup.run), ("cluster", cluster.run)):
        res, line = fn(ctx, cfg.evals[name])
        assert line and res, name


def test_imagenet_vit_s16_runlocal_encoder_transfers_to_voc(tmp_path):
    """VOC07 transfer on the ViT-S/16 of configs/imagenet_hcsc_vit_s16.py:runlocal (bfloat16,
    16-px patches, 3 channels: VOC's images), random weights exported as an encoder. Training
    that config end to end on a generated image folder passed too (92 s on the loaded 2-core CPU,
    mostly compiles); the suite keeps this cheaper check, as digits.py:vit,runlocal trains."""
    c = imagenet_hcsc_vit_s16.get_config("runlocal")
    assert (c.model.arch, c.model.dtype, c.input.pipeline) == ("vit_s16", "bfloat16", "stream")
    meta = models.encoder_meta(c.model.to_dict(), 3, c.bn_group_size)
    graphdef, params, stats = models.split_model(models.build_encoder(meta, abstract=True))
    checkpoints.export_encoder(str(tmp_path / "enc"), meta, _random(params), stats)
    cfg = eval_imagenet.get_config("runlocal")
    cfg.update(progress_bar=False, dataset=f"folder:{imagenet_like.make_folder(str(tmp_path / 'imagenet'))}",
               data_dir=imagenet_like.make_tfds(str(tmp_path / "tfds")))
    cfg.evals.voc.dataset = "tfds:hcsc_tiny_voc"
    ctx = common.from_checkpoint(cfg, str(tmp_path / "enc"), None, sharding.make_mesh())
    assert ctx.encoder.meta["model"]["arch"] == "vit_s16" and ctx.feature_dim() == 48
    res, _ = voc.run(ctx, cfg.evals.voc)
    assert len(res["ap"]) == 20 and 0 <= res["map"] <= 100


def test_runs_started_before_the_optimizer_fields_still_resume():
    new = json.loads(digits.get_config().to_json())
    old = {k: v for k, v in new.items() if k not in resume.ADDED_FIELDS}
    assert resume.changed_fields(old, new) == []
    assert resume.changed_fields(old, dict(new, optimizer="adamw")) == ["optimizer"]


def test_imagenet_vit_config_holds_moco_v3_settings():
    c = imagenet_hcsc_vit_s16.get_config()
    assert (c.model.arch, c.model.depth, c.model.width, c.model.pos_embed, c.model.dtype) == (
        "vit_s16", 12, 1.0, "sincos", "bfloat16")
    assert (c.optimizer, c.lr, c.weight_decay, c.lr_warmup_epochs, c.epochs, c.batch_size) == (
        "adamw", 1.5e-4, 0.1, 40, 300, 1024)
    assert tuple(c.adam_betas) == (0.9, 0.999) and c.shuffle_bn is False and c.image_size == 224
    assert (c.model.hidden_dim, c.model.embed_dim, c.queue_size, c.warmup_epochs) == (4096, 256, 16384, 20)
    assert tuple(c.clustering.num_clusters) == (3000, 2000, 1000) and c.model.image_size == 224
