"""The assembled HCSC objective (docs/method.md §5): reference equality, switches, caching, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from numpy_reference import unit

from hcsc_jax.method import device_prototypes, objective
from hcsc_jax.method.objective import ObjectiveConfig

B, K, D = 8, 24, 6
SIZES = (9, 5, 3)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    centroids = [unit(rng, m, D) for m in SIZES]
    phi = [rng.uniform(0.05, 0.4, m).astype(np.float32) for m in SIZES]
    valid = [np.ones(m, bool) for m in SIZES]
    valid[0][7] = False  # an empty cluster at the bottom level
    parents = [rng.integers(0, SIZES[l + 1], SIZES[l]).astype(np.int32) for l in range(2)]
    bottom = rng.choice([i for i in range(SIZES[0]) if i != 7], B).astype(np.int32)
    labels = np.stack([bottom, parents[0][bottom], parents[1][parents[0][bottom]]], 1)
    return dict(
        q=unit(rng, B, D), k=unit(rng, B, D), queue=unit(rng, K, D), labels=labels,
        protos=device_prototypes.make_prototypes(centroids, phi, valid, parents),
        levels=[dict(centroids=c, phi=t, valid=v) for c, t, v in zip(centroids, phi, valid)],
    )


RUN_KEY = jax.random.key(7)  # run's default rng


def run(pb, cfg, rng=RUN_KEY, **kw):
    args = dict(q=pb["q"], k=pb["k"], queue=pb["queue"], prototypes=pb["protos"], labels=pb["labels"])
    args.update(kw)
    return objective.hcsc_objective(rng=rng, cfg=cfg, **args)


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_objective_matches_reference(problem, semantics):
    pb = problem
    cfg = ObjectiveConfig(semantics=semantics, group_size=4)
    loss, metrics = run(pb, cfg)
    positives = [pb["labels"][:, l] for l in range(3)]
    inst = objective.instance_masks(pb["queue"], pb["protos"], positives, jax.random.key(7), cfg)
    proto = objective.prototype_masks(pb["protos"], positives, jax.random.key(7), cfg)[0]
    assert proto[2] is None  # top level: all candidates, no selection
    want = ref.hcsc_loss(
        pb["q"], pb["k"], pb["queue"], pb["levels"], pb["labels"], np.asarray(inst),
        [None if m is None else np.asarray(m) for m in proto], 0.2, semantics, 4,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # The official instance term is the sum over levels, so it is ~L times the paper's.
    per_level = [float(metrics[f"instance_loss/{l}"]) for l in range(3)]
    expect = sum(per_level) if semantics == "official" else np.mean(per_level)
    np.testing.assert_allclose(metrics["loss_instance"], expect, rtol=1e-6)


def test_masks_follow_selection_probabilities(problem):
    pb = problem
    # Queue entry 0 is each query's own bottom prototype with a tiny phi: p_select -> 0 for it.
    protos = pb["protos"].replace(temperatures=(jnp.full(SIZES[0], 1e-3),) + pb["protos"].temperatures[1:])
    queue = pb["queue"].copy()
    queue[0] = pb["levels"][0]["centroids"][pb["labels"][0, 0]]
    positives = [pb["labels"][:, l] for l in range(3)]
    cfg = ObjectiveConfig()
    hits = np.zeros((B, K))
    for s in range(200):
        inst = objective.instance_masks(queue, protos, positives, jax.random.key(s), cfg)
        hits += np.asarray(inst[0])
    assert hits[0, 0] == 0  # never selected
    rate = hits / 200
    from hcsc_jax.method import selection
    p = np.asarray(selection.instance_selection_probs(queue, protos.centroids[0], protos.temperatures[0],
                                                      positives[0], protos.valid[0]))
    assert np.abs(rate - p).max() < 0.15  # 200 draws: 4.2 sigma at p = 0.5


def test_switches(problem):
    pb = problem
    no_sel = ObjectiveConfig(instance_selection=False, prototype_selection=False)
    loss, m = run(pb, no_sel)
    plain = ref.info_nce(pb["q"], pb["k"], pb["queue"], None, 0.2, "paper")[0]
    protos = [
        ref.proto_nce(pb["q"], lv["centroids"], lv["phi"], pb["labels"][:, l], None, lv["valid"], "paper",
                      B)[0]
        for l, lv in enumerate(pb["levels"])
    ]
    np.testing.assert_allclose(loss, plain + np.mean(protos), rtol=1e-5)
    inst_only, m = run(pb, ObjectiveConfig(proto_loss=False))
    assert "loss_proto" not in m
    np.testing.assert_allclose(inst_only, m["loss_instance"])
    warm, m = run(pb, ObjectiveConfig(), prototypes=None)
    np.testing.assert_allclose(warm, plain, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one of instance_loss and proto_loss"):
        ObjectiveConfig(instance_loss=False, proto_loss=False)
    with pytest.raises(ValueError, match="positive must be one of"):
        ObjectiveConfig(positive="closest")


def test_nearest_positive_is_argmax_of_scaled_similarity(problem):
    pb = problem
    labels = []
    for lv in pb["levels"]:
        s = pb["q"] @ lv["centroids"].T / lv["phi"]
        s[:, ~lv["valid"]] = -np.inf
        labels.append(s.argmax(1))
    labels = np.stack(labels, 1).astype(np.int32)
    cfg = ObjectiveConfig(sampler="threefry")
    nearest, _ = run(pb, ObjectiveConfig(positive="nearest", sampler="threefry"),
                     labels=np.zeros_like(labels))
    assigned, _ = run(pb, cfg, labels=labels)
    np.testing.assert_allclose(nearest, assigned, rtol=1e-6)


def test_cached_queue_normalizer_gives_same_loss(problem):
    pb = problem
    lse = device_prototypes.queue_log_normalizers(pb["queue"], pb["protos"])
    a, _ = run(pb, ObjectiveConfig())
    b, _ = run(pb, ObjectiveConfig(), queue_lse=lse)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match=r"queue_lse must be \(L, K\)"):
        run(pb, ObjectiveConfig(), queue_lse=lse[:2])


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_only_q_gets_gradients(problem, semantics):
    pb = problem
    cfg = ObjectiveConfig(semantics=semantics, group_size=4)

    def f(q, k, queue, protos):
        return objective.hcsc_objective(q, k, queue, protos, pb["labels"], jax.random.key(1), cfg)[0]

    # (jitted: op by op, a cold compilation cache compiled each op alone, 109 s on 2 cores)
    gq, gk, gqueue, gp = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), allow_int=True))(
        jnp.asarray(pb["q"]), jnp.asarray(pb["k"]), jnp.asarray(pb["queue"]), pb["protos"])
    assert float(jnp.abs(gq).sum()) > 0
    assert float(jnp.abs(gk).sum()) == 0 and float(jnp.abs(gqueue).sum()) == 0
    for g in jax.tree.leaves((gp.centroids, gp.temperatures, gp.selection_tables)):
        assert float(jnp.abs(g).sum()) == 0


def test_new_prototypes_do_not_recompile(problem):
    pb = problem
    traces = []

    @jax.jit
    def step(q, protos, rng):
        traces.append(1)
        return objective.hcsc_objective(q, pb["k"], pb["queue"], protos, pb["labels"], rng,
                                        ObjectiveConfig())[0]

    rng = np.random.default_rng(5)
    for epoch in range(3):
        c = [unit(rng, m, D) for m in SIZES]
        t = [rng.uniform(0.05, 0.4, m).astype(np.float32) for m in SIZES]
        v = [rng.random(m) < 0.9 for m in SIZES]
        par = [rng.integers(0, SIZES[l + 1], SIZES[l]).astype(np.int32) for l in range(2)]
        protos = device_prototypes.make_prototypes(c, t, v, par)
        step(pb["q"], protos, jax.random.key(epoch)).block_until_ready()
    assert len(traces) == 1


def test_one_device_equals_eight(problem):
    pb = problem
    cfg = ObjectiveConfig(semantics="official", group_size=1)
    f = jax.jit(lambda q, k, queue, protos, labels, rng:
                objective.hcsc_objective(q, k, queue, protos, labels, rng, cfg))
    single, m1 = f(pb["q"], pb["k"], pb["queue"], pb["protos"], pb["labels"], jax.random.key(3))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    rep = NamedSharding(mesh, P())
    multi, m8 = f(shard(pb["q"]), shard(pb["k"]), jax.device_put(pb["queue"], rep),
                  jax.device_put(pb["protos"], rep), shard(pb["labels"]), jax.random.key(3))
    np.testing.assert_allclose(multi, single, rtol=1e-6)
    np.testing.assert_allclose(m8["instance_keep/1"], m1["instance_keep/1"], rtol=1e-6)


def test_label_shape_error(problem):
    with pytest.raises(ValueError, match=r"labels must be \(B, L\) = \(8, 3\)"):
        run(problem, ObjectiveConfig(), labels=problem["labels"][:, :2])
    with pytest.raises(ValueError, match="need L centroids/temperatures/valid and L-1 parents"):
        device_prototypes.make_prototypes([np.zeros((2, 3))] * 3, [np.ones(2)] * 3, [np.ones(2, bool)] * 3,
                                  [np.zeros(2)])


# ------------------------------------------------------------------------------------------
# PCL: independent clusterings (no parents), InfoNCE + mean ProtoNCE with r sampled negatives


@pytest.fixture(scope="module")
def pcl_problem():
    rng = np.random.default_rng(3)
    sizes = (5, 9, 3)  # independent clusterings: any sizes, any order
    centroids = [unit(rng, m, D) for m in sizes]
    phi = [rng.uniform(0.05, 0.4, m).astype(np.float32) for m in sizes]
    valid = [np.ones(m, bool) for m in sizes]
    labels = np.stack([rng.integers(0, m, B) for m in sizes], 1).astype(np.int32)  # unrelated per level
    return dict(q=unit(rng, B, D), k=unit(rng, B, D), queue=unit(rng, K, D), labels=labels,
                protos=device_prototypes.make_prototypes(centroids, phi, valid, []),
                levels=[dict(centroids=c, phi=t) for c, t in zip(centroids, phi)])


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_pcl_objective_matches_reference(pcl_problem, semantics):
    pb = pcl_problem
    cfg = ObjectiveConfig(semantics=semantics, instance_selection=False, prototype_selection=False,
                          proto_negatives=3, group_size=4)
    loss, metrics = run(pb, cfg)
    positives = [pb["labels"][:, l] for l in range(3)]
    sampled = [np.asarray(m)
               for m in objective.pcl_negative_masks(pb["protos"], positives, jax.random.key(7), cfg)]
    inst = ref.info_nce(pb["q"], pb["k"], pb["queue"], None, 0.2, semantics)[0]
    proto = [ref.pcl_proto_nce(pb["q"], lv["centroids"], lv["phi"], pb["labels"][:, l], sampled[l],
                               semantics, 4)[0]
             for l, lv in enumerate(pb["levels"])]
    np.testing.assert_allclose(loss, inst + np.mean(proto), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_proto"], np.mean(proto), rtol=1e-5)
    assert all(m.sum(-1).max() <= 3 for m in sampled)
    # Another key draws other negatives, hence (almost surely) another loss.
    other, _ = run(pb, cfg, rng=jax.random.key(8))
    assert float(other) != float(loss)


def test_pcl_config_errors(pcl_problem):
    with pytest.raises(ValueError, match="replaces prototype selection"):
        ObjectiveConfig(proto_negatives=4)
    with pytest.raises(ValueError, match=">= 0"):
        ObjectiveConfig(proto_negatives=-1, prototype_selection=False)
    # Prototype selection needs parents: independent clusterings have none.
    with pytest.raises(ValueError, match="needs a hierarchy"):
        run(pcl_problem, ObjectiveConfig(instance_selection=False))


@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_skip_last_prototype_is_the_authors_range_of_the_largest_assigned_id(problem, semantics):
    """objective.skip_last_prototype: the negatives of a level are the authors' `range(im2cluster.max())`
    (hcsc/hcsc.py), here with every valid cluster holding members; the highest id stays a positive."""
    pb = problem
    cfg = ObjectiveConfig(semantics=semantics, group_size=4, skip_last_prototype=True)
    loss, _ = run(pb, cfg)
    positives = [pb["labels"][:, l] for l in range(3)]
    inst = objective.instance_masks(pb["queue"], pb["protos"], positives, RUN_KEY, cfg)
    proto = objective.prototype_masks(pb["protos"], positives, RUN_KEY, cfg)[0]
    levels = []
    for lv in pb["levels"]:
        im2cluster = np.flatnonzero(lv["valid"])  # an image in every valid cluster
        in_range = np.isin(np.arange(len(lv["valid"])), list(range(im2cluster.max())))
        levels.append(dict(lv, valid=lv["valid"] & in_range))
    skipped = [int(np.flatnonzero(lv["valid"] & ~v["valid"])[0]) for lv, v in zip(pb["levels"], levels)]
    assert skipped == [8, 4, 2]
    want = ref.hcsc_loss(pb["q"], pb["k"], pb["queue"], levels, pb["labels"], np.asarray(inst),
                         [None if m is None else np.asarray(m) for m in proto], 0.2, semantics, 4)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(loss) != float(run(pb, ObjectiveConfig(semantics=semantics, group_size=4))[0])
    # A query whose positive is the highest id still has it as its positive.
    labels = pb["labels"].copy()
    labels[0] = (8, 4, 2)
    positives = [labels[:, l] for l in range(3)]
    inst = objective.instance_masks(pb["queue"], pb["protos"], positives, RUN_KEY, cfg)
    proto = objective.prototype_masks(pb["protos"], positives, RUN_KEY, cfg)[0]
    levels_top = ref.hcsc_loss(pb["q"], pb["k"], pb["queue"], levels, labels, np.asarray(inst),
                               [None if m is None else np.asarray(m) for m in proto], 0.2, semantics, 4)
    np.testing.assert_allclose(run(pb, cfg, labels=labels)[0], levels_top, rtol=1e-5)


def test_skip_last_prototype_in_pcl_draws(pcl_problem):
    """PCL's code has the same `range(im2cluster.max())`: its sampled negatives skip the last id too."""
    pb = pcl_problem
    cfg = ObjectiveConfig(semantics="official", instance_selection=False, prototype_selection=False,
                          proto_negatives=8, group_size=4, skip_last_prototype=True)
    positives = [pb["labels"][:, l] for l in range(3)]
    for s in range(5):
        sampled = objective.pcl_negative_masks(pb["protos"], positives, jax.random.key(s), cfg)
        assert not any(bool(np.asarray(m)[:, -1].any()) for m in sampled)
    plain = dataclasses.replace(cfg, skip_last_prototype=False)
    sampled = objective.pcl_negative_masks(pb["protos"], positives, jax.random.key(0), plain)
    assert any(bool(np.asarray(m)[:, -1].any()) for m in sampled)
