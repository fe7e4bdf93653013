"""Multi-crop local views in the objective (docs/method.md §6): reference equality, fresh PCSC masks,
selection_on_local, warm-up, gradients, and nothing changes without local views."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
import test_objective
from numpy_reference import unit
from test_objective import B, D, run

from hcsc_jax.method import objective
from hcsc_jax.method.objective import ObjectiveConfig

problem = test_objective.problem  # the shared fixture: B = 8 queries, K = 24, levels of 9/5/3
RNG = jax.random.key(7)
T = 0.2


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(1)
    return (unit(rng, B, D), unit(rng, B, D))


def masks(pb, cfg, num_local):
    """The objective's masks for RNG: (instance: L (B, K) or None, proto: 1 + V lists of L)."""
    positives = [pb["labels"][:, l] for l in range(3)]
    inst = objective.instance_masks(pb["queue"], pb["protos"], positives, RNG, cfg)
    proto = objective.prototype_masks(pb["protos"], positives, RNG, cfg, 1 + num_local)
    to_np = lambda ms: [None if m is None else np.asarray(m) for m in ms]
    return None if inst is None else to_np(inst), [to_np(p) for p in proto]


@pytest.mark.parametrize("selection_on_local", [False, True])
@pytest.mark.parametrize("semantics", ["paper", "official"])
def test_local_terms_match_reference(problem, views, semantics, selection_on_local):
    pb = problem
    cfg = ObjectiveConfig(semantics=semantics, group_size=4, selection_on_local=selection_on_local)
    loss, m = run(pb, cfg, RNG, local_q=views)
    inst, proto = masks(pb, cfg, len(views))
    # Global masks are view 0 of prototype_masks; every view draws its own PCSC masks.
    positives = [pb["labels"][:, l] for l in range(3)]
    global_proto = objective.prototype_masks(pb["protos"], positives, RNG, cfg)[0]
    np.testing.assert_array_equal(global_proto[0], proto[0][0])
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not np.array_equal(proto[a][0], proto[b][0]) and not np.array_equal(proto[a][1], proto[b][1])

    args = (pb["k"], pb["queue"], pb["levels"], pb["labels"], inst)
    local = lambda pk, sol: ref.local_terms(views, *args, pk, T, semantics, 4, sol)
    glob = ref.hcsc_loss(pb["q"], *args, proto[0], T, semantics, 4)
    want_inst, want_proto = local(proto[1:], selection_on_local)
    np.testing.assert_allclose(m["loss_local_instance"], want_inst, rtol=1e-5)
    np.testing.assert_allclose(m["loss_local_proto"], want_proto, rtol=1e-5)
    np.testing.assert_allclose(loss, glob + want_inst + want_proto, rtol=1e-5)

    # The reference tells the spec apart from the likely mistakes (so this test can fail).
    mistakes = {
        "views averaged": glob + (want_inst + want_proto) / len(views),
        "global PCSC masks reused": glob + want_inst + local([proto[0]] * len(views), selection_on_local)[1],
        "selection_on_local ignored": glob + sum(local(proto[1:], not selection_on_local)),
    }
    if selection_on_local and semantics == "official":
        mistakes["mean over levels"] = glob + want_inst / 3 + want_proto
    for name, wrong in mistakes.items():
        assert abs(wrong - float(loss)) > 1e-3 * abs(wrong), name


def test_local_view_equal_to_query(problem):
    """Local views equal to q: the same instance masks give the global instance term again; fresh
    PCSC masks give a different prototype term, unless prototype selection is off."""
    pb = problem
    same = (pb["q"], pb["q"])
    _, m = run(pb, ObjectiveConfig(semantics="official", group_size=4, selection_on_local=True), local_q=same)
    np.testing.assert_allclose(m["loss_local_instance"], 2 * m["loss_instance"], rtol=1e-6)
    assert abs(float(m["loss_local_proto"]) - 2 * float(m["loss_proto"])) > 1e-3
    _, m = run(pb, ObjectiveConfig(prototype_selection=False), local_q=same)
    np.testing.assert_allclose(m["loss_local_proto"], 2 * m["loss_proto"], rtol=1e-6)
    plain = ref.info_nce(pb["q"], pb["k"], pb["queue"], None, T, "paper")[0]
    np.testing.assert_allclose(m["loss_local_instance"], 2 * plain, rtol=1e-5)


def test_warmup_sums_plain_info_nce(problem, views):
    pb = problem
    cfg = ObjectiveConfig(semantics="official", selection_on_local=True)  # no masks in warm-up
    loss, m = run(pb, cfg, prototypes=None, local_q=views)
    plain = [ref.info_nce(x, pb["k"], pb["queue"], None, T, "official")[0] for x in (pb["q"], *views)]
    np.testing.assert_allclose(m["loss_local_instance"], plain[1] + plain[2], rtol=1e-5)
    np.testing.assert_allclose(loss, sum(plain), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], loss)


@pytest.mark.parametrize("warmup", [False, True])
def test_gradients_reach_local_views_not_keys(problem, views, warmup):
    pb = problem
    cfg = ObjectiveConfig(semantics="official", group_size=4, selection_on_local=True)
    protos = None if warmup else pb["protos"]

    def f(q, k, local_q):
        return objective.hcsc_objective(q, k, pb["queue"], protos, pb["labels"], RNG, cfg, local_q=local_q)[0]

    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    gq, gk, glocal = grad(pb["q"], pb["k"], views)
    assert float(jnp.abs(gq).sum()) > 0 and float(jnp.abs(gk).sum()) == 0
    assert len(glocal) == 2 and all(float(jnp.abs(g).sum()) > 0 for g in glocal)
    # A view's gradient comes from its own local terms only: another second view leaves it as is.
    _, _, other = grad(pb["q"], pb["k"], (views[0], views[0]))
    np.testing.assert_allclose(other[0], glocal[0], rtol=1e-5, atol=1e-7)
    assert not np.allclose(other[1], glocal[1])


def test_no_local_views_changes_nothing(problem, views):
    pb = problem
    official = ObjectiveConfig(semantics="official", group_size=4, selection_on_local=True)
    for cfg in [ObjectiveConfig(), official]:
        base, m0 = run(pb, cfg)
        empty, m_empty = run(pb, cfg, local_q=())
        assert float(empty) == float(base) and m_empty.keys() == m0.keys()
        assert not any("local" in key for key in m0)
        # Local views leave every global metric (and so the global masks) exactly as they were.
        loss, m = run(pb, cfg, local_q=views)
        assert m.keys() - m0.keys() == {"loss_local_instance", "loss_local_proto"}
        for key in m0.keys() - {"loss"}:
            assert float(m[key]) == float(m0[key]), key
        np.testing.assert_allclose(loss, base + m["loss_local_instance"] + m["loss_local_proto"], rtol=1e-6)


def test_switches_with_local_views(problem, views):
    pb = problem
    loss, m = run(pb, ObjectiveConfig(instance_loss=False), local_q=views)
    assert "loss_local_instance" not in m
    np.testing.assert_allclose(loss, m["loss_proto"] + m["loss_local_proto"], rtol=1e-6)
    loss, m = run(pb, ObjectiveConfig(proto_loss=False, selection_on_local=True), local_q=views)
    assert "loss_local_proto" not in m
    np.testing.assert_allclose(loss, m["loss_instance"] + m["loss_local_instance"], rtol=1e-6)
    # selection_on_local without instance selection: one plain InfoNCE per view.
    _, m = run(pb, ObjectiveConfig(instance_selection=False, selection_on_local=True), local_q=views)
    plain = sum(ref.info_nce(x, pb["k"], pb["queue"], None, T, "paper")[0] for x in views)
    np.testing.assert_allclose(m["loss_local_instance"], plain, rtol=1e-5)


def test_local_shape_error(problem, views):
    want = r"local_q\[1\] must be \(B, d\) = \(8, 6\) like q, got \(4, 6\)"
    for protos in [problem["protos"], None]:
        with pytest.raises(ValueError, match=want):
            run(problem, ObjectiveConfig(), prototypes=protos, local_q=(views[0], views[1][:4]))
    with pytest.raises(ValueError, match=r"local_q\[0\] must be .* got \(8, 6, 1\)"):
        run(problem, ObjectiveConfig(), local_q=(views[0][..., None],))
