"""Tests for hcsc_jax.method.train_step (docs/method.md §6): 1 vs 8 devices, ShuffleBN, EMA, queue,
warm-up switch, batch-config errors, optimizer.

One tiny configuration (resnet18 at width 1/16 with a small stem, 16x16x3 images, global batch 64,
BN groups of 4, queue 128 = 2 batches, 3 prototype levels) is compiled once per mesh: the
module-scoped `runs` fixture trains two steps with prototypes from the same initial state on a
1-device and on an 8-device mesh, `warm` one warm-up step without ShuffleBN, and host copies of
every state are kept. The other tests check those states against independent recomputations:
the views are rebuilt from the step's rng with `step_keys`, and the key / query encoders are run
on them separately (`apply_model`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hcsc_jax import models, sharding
from hcsc_jax.data import augmentations, pipeline
from hcsc_jax.data.batch import Images
from hcsc_jax.method import device_prototypes, losses, objective
from hcsc_jax.method import train_step as ts
from hcsc_jax.models import make_encoder

B = 64  # global batch
K = 128  # queue size = 2 batches: the pointer wraps after 2 steps
G = 4  # bn_group_size
N = 128  # dataset size
HW, C = 16, 3
D = 16  # embedding dim
LEVELS = (16, 8, 4)
M = 0.9  # EMA momentum, low so the EMA is visible
BASE_LR = 0.03
TOTAL_STEPS = 10

# 1 vs 8 devices: per-device shapes differ (64 vs 8 samples), so XLA may order some reductions
# (gradient all-reduce, loss mean) differently; one step from the same state agrees to <= 3e-6 (the
# largest: the SGD momentum buffers; loss/metrics to ~1e-6), so rtol = atol = 1e-5 holds. (With
# 8x8 images the last stage is 1x1 and a BN group of 4 samples
# normalizes 4 numbers: the step is then ill-conditioned, a 1e-6 change of the parameters moves
# the next gradient by ~1e-4 relative, and the 2nd step agrees only to ~1e-3. 16x16 avoids this.)
DEV_TOL = dict(rtol=1e-5, atol=1e-5)
# Recomputations outside the fused step (separately jitted encoder / objective): same ops,
# different fusion.
REC_TOL = dict(rtol=1e-5, atol=1e-5)
# The multi-crop step adds 8 px local views (BN groups over 1x1 last-stage maps, see above): on an
# Intel Xeon host (2026-11-30) one of its BN biases differed by 1.1e-5 between 1 and 8 devices.
MULTICROP_DEV_TOL = dict(rtol=1e-5, atol=3e-5)


# ----------------------------------------------------------------------------- helpers
def _host(tree):
    """A host copy (np.array copies: a zero-copy view of a CPU buffer would change when the
    buffer is donated to the next step)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _assert_tree_close(a, b, msg="", **tol):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(x, y, err_msg=f"{msg}{p}", **tol)


def _max_tree_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for (_, x), (_, y) in zip(_leaves(a), _leaves(b)))


def _make_protos_host(seed):
    """Random L2-normalized centroids, phi in [0.1, 0.3], parents; one invalid prototype on the
    lower levels. Same shapes for every seed."""
    rng = np.random.default_rng(seed)
    cents, temps, valid, parents = [], [], [], []
    for l, m in enumerate(LEVELS):
        c = rng.normal(size=(m, D)).astype(np.float32)
        cents.append(c / np.linalg.norm(c, axis=1, keepdims=True))
        temps.append(rng.uniform(0.1, 0.3, size=m).astype(np.float32))
        v = np.ones(m, bool)
        v[-1] = l == len(LEVELS) - 1
        valid.append(v)
        if l < len(LEVELS) - 1:
            parents.append(rng.integers(0, LEVELS[l + 1] - 1, size=m).astype(np.int32))
    return cents, temps, valid, parents


def _assignments(parents, seed=3):
    """(N, L) k-means-like assignments consistent with the parents, never an invalid prototype."""
    rng = np.random.default_rng(seed)
    a = [rng.integers(0, LEVELS[0] - 1, size=N)]
    for p in parents:
        a.append(p[a[-1]])
    return np.stack(a, 1).astype(np.int32)


def _tiny_model(dtype=jnp.float32):
    """resnet18 at width 1/16 with a small stem, built abstractly and filled with NumPy random
    values (He-normal kernels, random BN affine): the library's truncated-normal init compiles
    one program per kernel shape (~10 s on this CPU) and its values do not matter here."""
    abstract = nnx.eval_shape(lambda: make_encoder(
        "resnet18", out_dim=D, hidden_dim=32, small_stem=True, width=0.0625, bn_group_size=G,
        in_channels=C, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, params, stats = models.split_model(abstract)
    rng = np.random.default_rng(0)

    def fill(path, x):
        if len(x.shape) >= 2:
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape).astype(x.dtype)
        if "scale" in str(path[-1]):
            return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
        return rng.normal(0.0, 0.1, x.shape).astype(x.dtype)

    params = jax.tree_util.tree_map_with_path(fill, params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: np.ones(x.shape, x.dtype) if "var" in str(p[-1]) else np.zeros(x.shape, x.dtype), stats)
    return nnx.merge(graphdef, params, stats)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup():
    model = _tiny_model()
    graphdef = models.split_model(model)[0]
    tx, _ = ts.make_optimizer(BASE_LR, B, TOTAL_STEPS, weight_decay=1e-4, momentum=0.9)
    # random crop + flip: the photometric ops are off (skipped statically: much faster to compile)
    view = augmentations.AugmentConfig(crop_size=HW, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    obj = objective.ObjectiveConfig(group_size=G)
    cfg = ts.StepConfig(objective=obj, view_q=view, view_k=view, ema_momentum=M)
    assert cfg.shuffle_bn
    cfg_plain = ts.StepConfig(objective=obj, view_q=view, view_k=view, ema_momentum=M,
                              shuffle_bn=False)
    state0 = _host(ts.init_state(model, tx, K, D, len(LEVELS), seed=7))
    images = np.random.default_rng(0).integers(0, 256, size=(N, HW, HW, C), dtype=np.uint8)
    protos_a = _make_protos_host(1)
    protos_b = _make_protos_host(2)  # same shapes, other values
    assignments = _assignments(protos_a[3])
    order = np.random.default_rng(5).permutation(N).astype(np.int32)
    idx = [order[:B], order[B:]]

    fwd = jax.jit(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=True))

    @jax.jit
    def views(state, batch):
        key_q, key_k, key_shuffle, key_obj = ts.step_keys(state)
        return (augmentations.augment(key_q, batch, cfg.view_q),
                augmentations.augment(key_k, batch, cfg.view_k), key_shuffle, key_obj)

    return dict(graphdef=graphdef, tx=tx, cfg=cfg, cfg_plain=cfg_plain, state0=state0, images=images,
                protos_a=protos_a, protos_b=protos_b, assignments=assignments, idx=idx, fwd=fwd,
                views=views, hcsc=jax.jit(objective.hcsc_objective, static_argnums=6))


class _Run:
    """Two steps with prototypes on one mesh, from state0 with its ICSC cache refreshed (as the
    trainer does at the start of an epoch with prototypes). Host copies s0, s1, s2, m1, m2."""

    def __init__(self, s, mesh):
        self.mesh = mesh
        self.rep, shd = sharding.replicated(mesh), sharding.batch_sharded(mesh)
        self.batch = pipeline.gather_batch(mesh)
        self.proto_fn = ts.jit_train_step(s["graphdef"], s["tx"], s["cfg"], mesh, warmup=False)
        self.images = jax.device_put(s["images"], self.rep)
        self.assign = jax.device_put(s["assignments"], self.rep)
        self.protos_a = device_prototypes.make_prototypes(*s["protos_a"], sharding=self.rep)
        self.protos_b = device_prototypes.make_prototypes(*s["protos_b"], sharding=self.rep)
        self.idx = [jax.device_put(i, shd) for i in s["idx"]]
        refresh = jax.jit(ts.refresh_queue_lse, out_shardings=self.rep)
        self.s0 = _host(refresh(self.put(s["state0"]), self.protos_a))
        self.s1, self.m1 = self.step(self.s0, 0)
        self.s2, self.m2 = self.step(self.s1, 1)

    def put(self, host_state):
        """A fresh device copy (the step donates its state)."""
        return jax.device_put(host_state, self.rep)

    def step(self, host_state, i, protos=None, fn=None):
        fn = fn or self.proto_fn
        st, m = fn(self.put(host_state), *self.batch(self.images, self.assign, self.idx[i]),
                   protos or self.protos_a)
        return _host(st), _host(m)


@pytest.fixture(scope="module")
def runs(setup):
    one = _Run(setup, sharding.make_mesh(jax.devices()[:1]))
    eight = _Run(setup, sharding.make_mesh())
    assert one.mesh.size == 1 and eight.mesh.size == 8
    return one, eight


@pytest.fixture(scope="module")
def warm(setup, runs):
    """One warm-up step without ShuffleBN from state0 on the 1-device mesh."""
    one = runs[0]
    fn = ts.jit_train_step(setup["graphdef"], setup["tx"], setup["cfg_plain"], one.mesh, warmup=True)
    s1, m1 = one.step(setup["state0"], 0, fn=fn)
    return fn, s1, m1


def _views(s, state_before, i):
    return s["views"](jax.device_put(state_before), jnp.asarray(s["images"][s["idx"][i]]))


def _keys(s, state_before, k_params, i, shuffle=True):
    """Keys of step i rebuilt from its rng: the key encoder (params after the EMA) on the permuted
    key view, unpermuted (or on the view as is). -> (keys, new k_stats)."""
    _, x_k, key_shuffle, _ = _views(s, state_before, i)
    if not shuffle:
        _, k, stats = s["fwd"](k_params, state_before.k_stats, x_k)
        return np.asarray(k), _host(stats)
    perm, unperm = ts.shuffle_permutation(key_shuffle, B)
    _, k, stats = s["fwd"](k_params, state_before.k_stats, x_k[perm])
    return np.asarray(k)[np.asarray(unperm)], _host(stats)


def _query(s, state_before, i):
    """Query embeddings of step i (q params before the update), new q stats, objective key."""
    x_q, _, _, key_obj = _views(s, state_before, i)
    _, q, stats = s["fwd"](state_before.q_params, state_before.q_stats, x_q)
    return q, _host(stats), key_obj


# ----------------------------------------------------------------------------- 1 vs 8 devices
@pytest.mark.slow
def test_one_vs_eight_devices_same_numbers(runs):
    """Each step, from the same state, gives the same numbers on 1 and on 8 devices. Step 2 starts
    from the 1-device s1 on both meshes: the two s1 differ by ~6e-8 (reduction order), and on this
    tiny net such a change of the parameters alone moves step 2's gradient by ~2e-4 relative
    (a ReLU or BN-group kink crossed: the 1-device step from the 8-device s1 does the same), so
    chained states compare the net's conditioning, not the mesh."""
    one, eight = runs
    s2, m2 = eight.step(one.s1, 1)
    for name, a, b in (("m1", one.m1, eight.m1), ("m2", one.m2, m2)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], err_msg=f"{name}[{k}]", **DEV_TOL)
    for name, a, b in (("s1", one.s1, eight.s1), ("s2", one.s2, s2)):
        for field in ("queue", "queue_lse", "q_params", "q_stats", "k_params", "k_stats", "opt_state"):
            _assert_tree_close(getattr(a, field), getattr(b, field), f"{name}.{field}", **DEV_TOL)
    for a, b in ((one.s1, eight.s1), (one.s2, s2), (one.s2, eight.s2)):
        for field in ("queue_ptr", "step", "rng"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # the runs did something: the parameters moved, the queue was written, proto terms are there
    assert int(one.s2.step) == 2
    assert _max_tree_diff(one.s2.q_params, one.s0.q_params) > 1e-3
    assert np.max(np.abs(one.s2.queue - one.s0.queue)) > 0.1
    assert one.m2["loss_proto"] > 0.1 and np.isfinite(one.m2["loss"])


def test_shuffle_gather_of_images_gives_the_step_of_permuted_views(setup, runs):
    """shuffle_gather="images" (the uint8 key images gathered in the shuffled order, augmented on
    each device's share) gives the step of the default "views" on 8 devices, to the tolerance of
    1 vs 8 devices. (The key encoder then runs on 8 shards instead of the whole batch on every
    device: its BN reductions round differently in the last bits, which a second step's Bernoulli
    selection can amplify: 2e-4 relative in its gradient norm here.)"""
    import dataclasses as dc

    eight = runs[1]
    cfg = dc.replace(setup["cfg"], shuffle_gather="images")
    fn = ts.jit_train_step(setup["graphdef"], setup["tx"], cfg, eight.mesh, warmup=False)
    s1, m1 = eight.step(eight.s0, 0, fn=fn)
    for k in m1:
        np.testing.assert_allclose(m1[k], eight.m1[k], err_msg=f"m1[{k}]", **DEV_TOL)
    for field in ("queue", "q_params", "k_params", "k_stats", "opt_state"):
        _assert_tree_close(getattr(s1, field), getattr(eight.s1, field), f"s1.{field}", **DEV_TOL)


# ----------------------------------------------------------------------------- ShuffleBN
def test_shuffle_permutation_crosses_groups_and_inverts():
    for seed in range(3):
        perm, unperm = (np.asarray(a) for a in ts.shuffle_permutation(jax.random.key(seed), B))
        np.testing.assert_array_equal(np.sort(perm), np.arange(B))
        np.testing.assert_array_equal(perm[unperm], np.arange(B))
        np.testing.assert_array_equal(unperm[perm], np.arange(B))
        x = np.random.default_rng(seed).normal(size=(B, 3))
        np.testing.assert_array_equal(x[perm][unperm], x)
        # sample perm[j] lands in BN group j // G; a random permutation moves ~60/63 of them
        moved = np.mean(perm // G != np.arange(B) // G)
        assert moved > 0.75, moved
        # the shuffled BN groups mix samples of several original groups
        sources = [len(set(perm[g:g + G] // G)) for g in range(0, B, G)]
        assert np.mean(sources) > 3.0, sources
    p0 = np.asarray(ts.shuffle_permutation(jax.random.key(0), B)[0])
    p1 = np.asarray(ts.shuffle_permutation(jax.random.key(1), B)[0])
    assert not np.array_equal(p0, p1)


@pytest.mark.slow
def test_step_keys_are_shuffle_bn_keys(setup, runs, warm):
    s, one = setup, runs[0]
    for i, (before, after) in enumerate(((one.s0, one.s1), (one.s1, one.s2))):
        rows = slice(i * B, (i + 1) * B)
        keys, k_stats = _keys(s, before, after.k_params, i, shuffle=True)
        np.testing.assert_allclose(after.queue[rows], keys, **REC_TOL)
        _assert_tree_close(after.k_stats, k_stats, "k_stats", **REC_TOL)
        # without the shuffle the BN groups hold other samples, so the keys differ
        plain, plain_stats = _keys(s, before, after.k_params, i, shuffle=False)
        assert np.max(np.abs(after.queue[rows] - plain)) > 1e-2
        assert _max_tree_diff(plain_stats, k_stats) > 1e-6  # per-group variances differ
    # StepConfig(shuffle_bn=False): the same EMA'd key encoder on the unshuffled view
    _, w1, _ = warm
    _assert_tree_close(w1.k_params, one.s1.k_params, rtol=0, atol=0)
    plain, plain_stats = _keys(s, setup["state0"], w1.k_params, 0, shuffle=False)
    np.testing.assert_allclose(w1.queue[:B], plain, **REC_TOL)
    _assert_tree_close(w1.k_stats, plain_stats, "k_stats", **REC_TOL)
    assert np.max(np.abs(w1.queue[:B] - one.s1.queue[:B])) > 1e-2


# ----------------------------------------------------------------------------- EMA
def test_ema_uses_query_params_before_update(runs):
    one = runs[0]
    # init: the key encoder is a copy of the query encoder
    _assert_tree_close(one.s0.k_params, one.s0.q_params, rtol=0, atol=0)
    _assert_tree_close(one.s0.k_stats, one.s0.q_stats, rtol=0, atol=0)
    for before, after in ((one.s0, one.s1), (one.s1, one.s2)):
        want = jax.tree.map(lambda k, q: M * k + (1 - M) * q, before.k_params, before.q_params)
        _assert_tree_close(after.k_params, want, "k_params", rtol=1e-6, atol=1e-6)
    # In step 2 k != q, so the EMA is visible; the query params after the update (q2) would give
    # a measurably different answer. No gradient reaches k: the formula holds to rounding.
    assert _max_tree_diff(one.s2.k_params, one.s1.k_params) > 1e-4
    wrong = jax.tree.map(lambda k, q: M * k + (1 - M) * q, one.s1.k_params, one.s2.q_params)
    assert _max_tree_diff(one.s2.k_params, wrong) > 1e-5
    assert _max_tree_diff(one.s2.q_params, one.s1.q_params) > 1e-3


# ----------------------------------------------------------------------------- queue
def test_queue_rows_pointer_and_lse(setup, runs):
    s, one = setup, runs[0]
    np.testing.assert_allclose(np.linalg.norm(setup["state0"].queue, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(setup["state0"].queue_lse, 0.0)
    protos = device_prototypes.make_prototypes(*s["protos_a"])
    lse = lambda x: np.asarray(device_prototypes.queue_log_normalizers(jnp.asarray(x), protos))
    np.testing.assert_allclose(one.s0.queue_lse, lse(one.s0.queue), **REC_TOL)  # refresh_queue_lse
    assert int(one.s0.queue_ptr) == 0
    for i, (before, after) in enumerate(((one.s0, one.s1), (one.s1, one.s2))):
        new, old = slice(i * B, (i + 1) * B), slice((1 - i) * B, (2 - i) * B)
        # the step's keys are written at [ptr, ptr + B), the other rows are untouched
        keys, _ = _keys(s, before, after.k_params, i)
        np.testing.assert_allclose(after.queue[new], keys, **REC_TOL)
        np.testing.assert_allclose(np.linalg.norm(after.queue[new], axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(after.queue[old], before.queue[old])
        # the ICSC cache: new rows = normalizers of the new keys, other rows unchanged
        np.testing.assert_allclose(after.queue_lse[:, new], lse(keys), **REC_TOL)
        np.testing.assert_array_equal(after.queue_lse[:, old], before.queue_lse[:, old])
        np.testing.assert_allclose(after.queue_lse, lse(after.queue), **REC_TOL)
        assert np.max(np.abs(after.queue_lse[:, new] - before.queue_lse[:, new])) > 1e-2
    # the pointer: B after one step, wraps to 0 after K / B = 2 steps
    assert int(one.s1.queue_ptr) == B
    assert int(one.s2.queue_ptr) == 0


def test_enqueue_wraps():
    q, p = ts.enqueue(jnp.zeros((8, 2)), jnp.int32(4), jnp.ones((4, 2)))
    assert int(p) == 0
    np.testing.assert_array_equal(q[:4], 0)
    np.testing.assert_array_equal(q[4:], 1)
    q, p = ts.enqueue(q, p, 2 * jnp.ones((4, 2)))
    assert int(p) == 4
    np.testing.assert_array_equal(q[:4], 2)
    np.testing.assert_array_equal(q[4:], 1)


def test_loss_uses_queue_before_enqueue(setup, runs):
    s, one = setup, runs[0]
    protos = device_prototypes.make_prototypes(*s["protos_a"])
    for i, (before, after, metrics) in enumerate(((one.s0, one.s1, one.m1), (one.s1, one.s2, one.m2))):
        q, q_stats, key_obj = _query(s, before, i)
        _assert_tree_close(after.q_stats, q_stats, "q_stats", **REC_TOL)
        keys = jnp.asarray(after.queue[i * B:(i + 1) * B])
        labels = jnp.asarray(s["assignments"][s["idx"][i]])
        loss_old, rec = s["hcsc"](q, keys, jnp.asarray(before.queue), protos, labels, key_obj,
                                  s["cfg"].objective, jnp.asarray(before.queue_lse))
        assert set(rec) | {"grad_norm"} == set(metrics)
        for k, v in rec.items():
            np.testing.assert_allclose(metrics[k], v, err_msg=k, **REC_TOL)
        # with the queue after the enqueue (the own keys among the negatives) the loss differs
        loss_new, _ = s["hcsc"](q, keys, jnp.asarray(after.queue), protos, labels, key_obj,
                                s["cfg"].objective, jnp.asarray(after.queue_lse))
        assert abs(float(loss_new) - float(loss_old)) > 1e-3


# ----------------------------------------------------------------------------- warm-up switch
def test_warmup_is_plain_infonce(setup, warm):
    s, (_, w1, wm1) = setup, warm
    s0 = s["state0"]
    assert set(wm1) == {"loss", "loss_instance", "instance_acc", "grad_norm"}
    q, q_stats, _ = _query(s, s0, 0)
    _assert_tree_close(w1.q_stats, q_stats, "q_stats", **REC_TOL)
    keys = jnp.asarray(w1.queue[:B])
    cfg = s["cfg"].objective
    loss, acc = losses.info_nce(q, keys, jnp.asarray(s0.queue), None, cfg.temperature, cfg.semantics)
    np.testing.assert_allclose(wm1["loss"], loss, **REC_TOL)
    np.testing.assert_allclose(wm1["loss_instance"], loss, **REC_TOL)
    np.testing.assert_allclose(wm1["instance_acc"], acc, **REC_TOL)
    # against the queue before the enqueue
    loss_new, _ = losses.info_nce(q, keys, jnp.asarray(w1.queue), None, cfg.temperature, cfg.semantics)
    assert abs(float(loss_new) - float(wm1["loss"])) > 1e-3
    # warm-up keeps the ICSC cache as it is (no prototypes), but still enqueues
    np.testing.assert_array_equal(w1.queue_lse, s0.queue_lse)
    assert int(w1.queue_ptr) == B


def test_proto_terms_only_without_warmup(runs):
    one = runs[0]
    for l in range(len(LEVELS)):
        for name in ("proto_loss", "proto_acc", "instance_loss", "instance_acc", "instance_keep"):
            assert f"{name}/{l}" in one.m1
    np.testing.assert_allclose(one.m1["loss"], one.m1["loss_instance"] + one.m1["loss_proto"], rtol=1e-6)
    assert one.m1["loss_proto"] > 0.1


def test_warmup_ignores_prototypes_proto_step_does_not(setup, runs, warm):
    one, (fn, w1, wm1) = runs[0], warm
    w1b, wm1b = one.step(setup["state0"], 0, protos=one.protos_b, fn=fn)
    assert wm1b.keys() == wm1.keys()
    for k in wm1:
        np.testing.assert_array_equal(wm1b[k], wm1[k], err_msg=k)
    _assert_tree_close(w1b, w1, rtol=0, atol=0)
    s1b, m1b = one.step(one.s0, 0, protos=one.protos_b)
    assert abs(float(m1b["loss"]) - float(one.m1["loss"])) > 1e-3
    assert np.max(np.abs(s1b.queue_lse[:, :B] - one.s1.queue_lse[:, :B])) > 1e-2


# ----------------------------------------------------------------------------- errors
def test_check_batch_config_errors():
    ts.check_batch_config(64, 128, 4, 8)  # fits
    ts.check_batch_config(64, 64, 8, 8)
    with pytest.raises(ValueError, match=r"queue_size 100 is not a multiple of the global batch 64"):
        ts.check_batch_config(64, 100, 4, 8)
    with pytest.raises(ValueError, match=r"use e\.g\. queue_size=64"):
        ts.check_batch_config(64, 100, 4, 8)
    with pytest.raises(ValueError, match=r"queue_size 32 is not a multiple of the global batch 64"):
        ts.check_batch_config(64, 32, 4, 8)  # a queue smaller than the batch
    with pytest.raises(ValueError, match=r"global batch 96 must be a multiple of bn_group_size x devices"
                                         r" = 8 x 8 = 64"):
        ts.check_batch_config(96, 192, 8, 8)
    with pytest.raises(ValueError, match=r"global batch 32 must be a multiple of bn_group_size x devices"):
        ts.check_batch_config(32, 128, 8, 8)


# ----------------------------------------------------------------------------- optimizer
def test_lr_schedule():
    _, schedule = ts.make_optimizer(0.03, 512, 100)
    peak = 0.03 * 512 / 256
    np.testing.assert_allclose(schedule(0), peak, rtol=1e-6)
    np.testing.assert_allclose(schedule(25), peak * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-5)
    np.testing.assert_allclose(schedule(50), peak / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(100), 0.0, atol=1e-9)
    lrs = np.asarray([schedule(t) for t in range(0, 101, 5)])
    assert np.all(np.diff(lrs) < 0)


def test_lr_held_per_epoch_is_the_authors_adjust_learning_rate():
    """lr_granularity="epoch" (hold_steps = steps per epoch): the authors' adjust_learning_rate, a
    cosine of the epoch, `lr * 0.5 * (1 + cos(pi * epoch / epochs))`, for every step of the epoch."""
    epochs, per_epoch = 5, 7
    _, schedule = ts.make_optimizer(0.03, 128, epochs * per_epoch, hold_steps=per_epoch)
    _, per_step = ts.make_optimizer(0.03, 128, epochs * per_epoch)
    lr = 0.03 * 128 / 256
    for step in range(epochs * per_epoch):
        epoch = step // per_epoch
        want = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        np.testing.assert_allclose(schedule(step), want, rtol=1e-6)
    assert float(per_step(per_epoch + 3)) < float(schedule(per_epoch + 3))  # per step: decays in the epoch


def test_sgd_update_is_torch_sgd_with_l2():
    wd, mom, base_lr, batch, total = 0.1, 0.9, 0.5, 128, 4
    tx, _ = ts.make_optimizer(base_lr, batch, total, weight_decay=wd, momentum=mom)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    # torch.optim.SGD(lr_t, momentum, weight_decay) by hand: d = g + wd * p; buf = d at the first
    # step, then mom * buf + d; p -= lr_t * buf; lr_t from the cosine schedule, t = 0, 1, ...
    peak = base_lr * batch / 256
    p_ref = {k: v.astype(np.float64) for k, v in params.items()}
    buf = None
    p = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(p)
    for t, g in enumerate(grads):
        lr = peak * 0.5 * (1 + np.cos(np.pi * t / total))
        d = {k: g[k] + wd * p_ref[k] for k in g}
        buf = d if buf is None else {k: mom * buf[k] + d[k] for k in d}
        p_ref = {k: p_ref[k] - lr * buf[k] for k in p_ref}
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, p)
        p = optax.apply_updates(p, updates)
        for k in p_ref:
            np.testing.assert_allclose(p[k], p_ref[k], rtol=1e-5, atol=1e-6, err_msg=f"step {t} {k}")
    # the decay is there: with zero gradients the first update is -peak * wd * p
    p0 = jax.tree.map(jnp.asarray, params)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, p0), tx.init(p0), p0)
    np.testing.assert_allclose(upd["w"], -peak * wd * params["w"], rtol=1e-5)


# ----------------------------------------------------------------------------- multi-crop views
LOCAL = (12, 12, 8)  # two local views of one size (one batch through the encoder) and a smaller one


@pytest.fixture(scope="module")
def multicrop(setup, runs):
    """One step with prototypes and three local views, on 1 and on 8 devices, from runs' s0."""
    view = setup["cfg"].view_q
    local = tuple(dataclasses.replace(view, crop_size=size, scale=(0.1, 0.5)) for size in LOCAL)
    cfg = dataclasses.replace(setup["cfg"], view_local=local)
    out = []
    for run in runs:
        fn = ts.jit_train_step(setup["graphdef"], setup["tx"], cfg, run.mesh, warmup=False)
        out.append(run.step(run.s0, 0, fn=fn))
    return cfg, out


@pytest.mark.slow
def test_multicrop_step_matches_separate_local_forwards(setup, runs, multicrop):
    """The step's loss equals the objective recomputed with every local view embedded by its own
    query-encoder forward (so batching views of one size did not mix their BN groups), local views
    drawn from fold_in(key_q, v + 1); 1 device == 8 devices."""
    cfg, ((s1, m1), (s1_8, m1_8)) = multicrop
    one = runs[0]
    s0 = one.s0
    batch = jnp.asarray(setup["images"][setup["idx"][0]])
    key_q, _, _, key_obj = ts.step_keys(jax.device_put(s0))
    x_local = [augmentations.augment(jax.random.fold_in(key_q, v + 1), batch, c)
               for v, c in enumerate(cfg.view_local)]
    assert [x.shape[1] for x in x_local] == list(LOCAL)
    k_params = jax.tree.map(lambda k, q: M * k + (1 - M) * q, s0.k_params, s0.q_params)
    keys, _ = _keys(setup, s0, k_params, 0)
    q, _, _ = _query(setup, s0, 0)
    local_q = tuple(setup["fwd"](s0.q_params, s0.q_stats, x)[1] for x in x_local)
    labels = jnp.asarray(setup["assignments"][setup["idx"][0]])
    hcsc = jax.jit(objective.hcsc_objective, static_argnums=6)
    loss, metrics = hcsc(q, keys, s0.queue, one.protos_a, labels, key_obj, cfg.objective, s0.queue_lse,
                         local_q=local_q)
    np.testing.assert_allclose(m1["loss"], loss, **REC_TOL)
    np.testing.assert_allclose(m1["loss_local_proto"], metrics["loss_local_proto"], **REC_TOL)
    # the local terms are there and large: three views' InfoNCE and PCSC on top of the global ones
    assert m1["loss_local_instance"] > 2 * one.m1["loss_instance"]
    assert m1["loss"] > one.m1["loss"] + m1["loss_local_instance"] + m1["loss_local_proto"] - 1e-3
    for k in m1:
        np.testing.assert_allclose(m1[k], m1_8[k], err_msg=k, **DEV_TOL)
    _assert_tree_close(s1.q_params, s1_8.q_params, "q_params", **MULTICROP_DEV_TOL)
    assert _max_tree_diff(s1.q_params, one.s1.q_params) > 1e-4  # local views changed the update


@pytest.mark.slow
def test_streaming_views_equal_resident_crops(setup, runs):
    """One step function, both inputs: host-cropped views (streamed) give the same state
    as whole images (resident) whose views are cropped on the device (whole-image crops)."""
    whole = dataclasses.replace(setup["cfg"].view_q, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    cfg = dataclasses.replace(setup["cfg"], view_q=whole, view_k=whole, view_local=(whole,))
    eight = runs[1]
    step = ts.jit_train_step(setup["graphdef"], setup["tx"], cfg, eight.mesh, warmup=False)
    s_dev, m_dev = eight.step(eight.s0, 0, fn=step)
    idx = setup["idx"][0]
    shd = sharding.batch_sharded(eight.mesh)
    views = Images(tuple(jax.device_put(setup["images"][idx], shd) for _ in range(3)), cropped=True)
    labels = jax.device_put(setup["assignments"][idx], shd)
    s_host, m_host = _host(step(eight.put(eight.s0), views, labels, eight.protos_a))
    for k in m_dev:
        np.testing.assert_allclose(m_host[k], m_dev[k], err_msg=k, **REC_TOL)
    for field in ("queue", "queue_lse", "q_params", "q_stats", "k_params", "k_stats"):
        _assert_tree_close(getattr(s_host, field), getattr(s_dev, field), field, **REC_TOL)
    with pytest.raises(ValueError, match="got 2 view arrays for 3 views"):
        step(eight.put(eight.s0), Images(views.views[:2], cropped=True), labels, eight.protos_a)


# ----------------------------------------------------------------------------- mixed precision
# bfloat16 keeps 8 bits of mantissa: activations carry ~0.4% relative error per op; through the
# network, the L2-normalized embeddings and a temperature of 0.2 the step's losses moved by at most
# 0.23% here (loss 0.11%, instance 0.23%, proto 0.05%). Stated tolerance: 1% of the float32 loss.
BF16_RTOL = 1e-2


@pytest.mark.slow
def test_bfloat16_step_loss_close_to_float32_and_state_stays_float32(setup, runs):
    one = runs[0]
    graphdef16 = models.split_model(_tiny_model(jnp.bfloat16))[0]
    fn = ts.jit_train_step(graphdef16, setup["tx"], setup["cfg"], one.mesh, warmup=False)
    s1, m1 = one.step(one.s0, 0, fn=fn)  # same parameters and batch as one.m1 in float32
    for k in ("loss", "loss_instance", "loss_proto"):
        np.testing.assert_allclose(m1[k], one.m1[k], rtol=BF16_RTOL, err_msg=k)
    assert m1["loss"] != one.m1["loss"]  # bfloat16 compute really happened
    for field in ("q_params", "q_stats", "k_params", "k_stats", "opt_state", "queue", "queue_lse"):
        dtypes = {x.dtype for x in jax.tree.leaves(getattr(s1, field))} - {np.dtype(np.int32)}
        assert dtypes == {np.dtype(np.float32)}, (field, dtypes)  # (int32: the optimizer's count)
    assert all(np.asarray(v).dtype == np.float32 for v in m1.values())
