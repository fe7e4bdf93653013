"""`python -m hcsc_jax.aot`: the trainer's functions compiled for TPU pods on this CPU machine.

The HLO parsing and the verdict are checked on their own; the compiles need libtpu (the `tpu`
extra, which the test extra pulls in) and skip in one line without it. The collectives test
compiles the runlocal ImageNet config's prototype step for a one-host (v5e:2x2) and a four-host
(v5e:4x4) slice and checks what a step communicates against what it must: the gradient
all-reduce (parameter bytes), BatchNorm statistics, the ShuffleBN gather of the key view, the
all-gather of the batch's keys for the queue; never the queue, the prototypes or the dataset.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from hcsc_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _libtpu_reason() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install -e '.[tpu]')"
    return None


needs_libtpu = pytest.mark.skipif(_libtpu_reason() is not None, reason=str(_libtpu_reason()))

HLO = """\
HloModule jit_step, entry_computation_layout={()}

%add.1.clone (x: f32[], y: f32[]) -> f32[] {
  ROOT %add = f32[] add(f32[] %x, f32[] %y)
}

%while_body.7 (p: (s32[], f32[8,6,16])) -> (s32[], f32[8,6,16]) {
  %all_gather.33 = f32[8,6,16]{2,1,0:T(8,128)S(1)} all-gather(f32[2,6,16]{2,1,0} %g), channel_id=3
}

%async_collective_fusion.1 (param_0: u8[4,32,32,3]) -> u8[16,32,32,3] {
  %all-gather.14 = u8[16,32,32,3]{2,1,3,0:T(32,128)(4,1)} all-gather(%param_0), channel_id=1, dimensions={0}
}

%async_collective_fusion.2 (param_0: u8[4,32,32,3]) -> u8[16,32,32,3] {
  %all-gather.16 = u8[16,32,32,3]{2,1,3,0:T(32,128)(4,1)S(1)} all-gather(%param_0), channel_id=1
}

ENTRY %main.9 (a: f32[1000]) -> f32[] {
  %all-reduce.269 = (bf16[7,7,3,4]{3,2,1,0:T(4,128)(2,1)S(1)}, /*index=1*/f32[16]{0:T(128)S(1)}) \
all-reduce(bf16[7,7,3,4] %g0, f32[16] %g1), to_apply=%add.1.clone, metadata={op_name="jit(step)/transpose"}
  %all-gather-start = (f32[4,16]{1,0}, f32[16,16]{1,0}) all-gather-start(f32[4,16]{1,0} %k), channel_id=6
  %all-gather-done = f32[16,16]{1,0} all-gather-done(%all-gather-start)
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_parses_tuples_async_starts_and_loop_bodies():
    found = aot.collectives(HLO)
    assert [(c["kind"], c["bytes"], c["computation"]) for c in found] == [
        ("all-gather", 8 * 6 * 16 * 4, "while_body.7"),
        ("all-gather", 16 * 32 * 32 * 3, "async_collective_fusion.1"),  # channel 1, split over two fusions
        ("all-reduce", 7 * 7 * 3 * 4 * 2 + 16 * 4, "ENTRY"),  # a tuple: both gradients
        ("all-gather", (4 * 16 * 4 + 16 * 16 * 4) // 2, "ENTRY"),  # an async start, once (not its done)
    ]
    assert found[2]["op"] == "jit(step)/transpose"
    assert aot.collective_totals(found)["all-gather"] == dict(count=3, bytes=8 * 6 * 16 * 4 + 49152 + 640)


def _program(name, total, fixed=0, resident=0):
    p = aot.Program(name, None, resident=resident, fixed=fixed)
    p._analysis = dict(memory=dict(total=total), flops=0.0, bytes_accessed=0.0, collectives=[])
    return p


def _tgt(chip="v5e", chips=4):
    return aot.Target(f"{chip}:test", aot.CHIPS[chip], tuple(range(chips)), 1)


def test_verdict_fits_and_names_the_largest_program():
    config = SimpleNamespace(batch_size=256, bn_group_size=32, model=SimpleNamespace(dtype="bfloat16"))
    fits, lines = aot.verdict(config, _tgt(), [_program("warmup_step", 2 * aot.GiB),
                                               _program("feature_pass", 3 * aot.GiB, resident=aot.GiB)])
    assert fits and lines[0].startswith("fits: the largest, feature_pass, needs 4.00 GiB of the 16.00 GiB")


def test_verdict_does_not_fit_gives_the_largest_batch_by_its_linear_estimate():
    # 1 GiB that does not grow with the batch, 0.25 GiB per image at batch 256: 65 GiB on a 16-GiB
    # v5e; 95% of 16 GiB holds (15.2 - 1) / 0.25 = 56.8 images: 0 whole multiples of 32 x 4 chips.
    config = SimpleNamespace(batch_size=256, bn_group_size=32, model=SimpleNamespace(dtype="float32"))
    step = _program("prototype_step", aot.GiB + 256 * aot.GiB // 4, fixed=aot.GiB)
    fits, lines = aot.verdict(config, _tgt(), [step])
    assert not fits and lines[0].startswith("does not fit: prototype_step 65.00 GiB > 95% of the 16.00 GiB")
    assert lines[1].startswith("even one BN group per chip does not fit")
    assert any("--config.model.dtype=bfloat16" in line for line in lines)
    # At batch 512 (129 GiB) a 95-GiB v5p holds (95 * 0.95 - 1) / 0.25 = 357 images: 256, a
    # multiple of 128; the estimate per image is the same from any batch.
    config.batch_size = 512
    step = _program("prototype_step", aot.GiB + 512 * aot.GiB // 4, fixed=aot.GiB)
    fits, lines = aot.verdict(config, _tgt("v5p"), [step])
    assert not fits and "largest global batch that fits: about 256 " in lines[1]
    config.batch_size = 1024
    step = _program("prototype_step", aot.GiB + 1024 * aot.GiB // 4, fixed=aot.GiB)
    assert "about 256 " in aot.verdict(config, _tgt("v5p"), [step])[1][1]


def test_a_topology_that_is_not_a_tpu_generation_is_one_line():
    with pytest.raises(aot.AotError, match=r"--topology 'a100:8'.*v5p:4x4x8"):
        aot.target("a100:8")


def _aot(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "hcsc_jax.aot", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


RUNLOCAL = ["--config=configs/imagenet_hcsc_200ep.py:runlocal", "--num_train=100000", "--num_eval=50",
            "--channels=3",
            # Sizes that make a collective of the queue (16384 x 16), the prototypes (4096 / 512
            # levels, a 4096 x 512 selection table) or the dataset stand out against the batch's
            # and the gradients' (0.4 MB).
            "--config.queue_size=16384", "--config.clustering.num_clusters=(4096,512)",
            "--config.batch_size=32"]  # (2 per chip on v5e:4x4: one BN group of 2)
# Per-chip memory of the runlocal prototype step with those sizes (jax 0.10.2 / libtpu 0.0.42.1,
# 2026-12-06: 58 MiB on v5e:2x2, 49 MiB on v5e:4x4; 71 MiB on v5e:2x2 with the key encoder run on
# the whole batch on every chip): a step that grows past this holds something new.
MEMORY_BOUND = 64 * 2**20


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology,hosts", [("v5e:2x2", 1), ("v5e:4x4", 4)])
def test_the_runlocal_step_communicates_only_what_it_must(tmp_path, topology, hosts):
    out = tmp_path / "aot.json"
    res = _aot(*RUNLOCAL, f"--topology={topology}", "--programs=prototype_step", f"--json={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fits: the largest, prototype_step" in res.stdout
    r = json.loads(out.read_text())
    assert (r["chips"], r["hosts"]) == ({"v5e:2x2": 4, "v5e:4x4": 16}[topology], hosts)
    (step,) = r["programs"]
    sizes, b, d, s = r["sizes"], r["batch_size"], 16, 32  # embed_dim 16, 32-px views
    expected = dict(
        gradients=sizes["q_params"],  # the gradient all-reduce (f32 at most; XLA may send bf16)
        batch_stats=sizes["batch_stats"],  # BN statistics of the groups
        key_view=b * s * s * 3,  # ShuffleBN: the uint8 key view, gathered in the shuffled order
        keys=2 * b * d * 4,  # the batch's keys (and their queue normalizers) for every chip
    )
    total = sum(c["bytes"] for c in step["collectives"])
    assert 0.3 * sizes["q_params"] < total <= 1.1 * sum(expected.values()), (total, expected)
    for c in step["collectives"]:  # anything but the gradients is at most the uint8 key view
        assert "transpose(" in c["op"] or c["bytes"] <= expected["key_view"], c
    biggest = max(c["bytes"] for c in step["collectives"])
    for what in ("queue", "prototypes"):
        assert biggest < sizes[what], f"a collective of {biggest} bytes: the {what} ({sizes[what]}) moves"
    # Each chip computes its share of the batch: the FLOPs of the pod per image do not grow with the
    # chips (9.4 M on v5e:2x2, 10.0 M on v5e:4x4; 12.5 M on v5e:2x2 when XLA's own partitioning of
    # ShuffleBN's gather ran the key encoder on the whole batch on every chip).
    assert step["flops"] * r["chips"] / b < 11e6
    assert step["total"] <= MEMORY_BOUND, f"{step['total']} bytes per chip, above the recorded {MEMORY_BOUND}"
    assert math.isclose(step["total"], sum(step["memory"][k] for k in ("argument", "output", "temp", "code"))
                        - step["memory"]["alias"] + step["resident"])


@needs_libtpu
def test_an_impossible_setting_is_refused_with_its_verdict_and_exit_1(tmp_path):
    # 50 million held-out rows of 128 features: the kNN pass's test features alone are 24 GiB.
    res = _aot("--config=configs/imagenet_hcsc_200ep.py:runlocal", "--topology=v5e:2x2", "--num_train=1000",
               "--num_eval=50000000", "--channels=3", "--programs=knn_similarity", timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "does not fit: knn_similarity" in res.stdout and "of the 16.00 GiB of a v5e chip" in res.stdout


@needs_libtpu
def test_usage_errors_are_one_line_and_exit_2():
    res = _aot("--config=configs/imagenet_hcsc_200ep.py:runlocal", "--topology=v5e:2x2", "--num_train=1000",
               "--num_eval=50", "--channels=3", "--config.batch_size=20", "--config.queue_size=40",
               timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("aot.py: error: global batch 20 must be a multiple")
    res = _aot("--topology=v9:2x2", timeout=300)
    assert res.returncode == 2 and "--topology 'v9:2x2'" in res.stderr.strip().splitlines()[-1]


def test_a_gpu_topology_needs_xla_s_description_of_the_card():
    with pytest.raises(aot.AotError, match=r"--topology h100:8: give --gpu_target_config=.*h100_sxm.txtpb"):
        aot.target("h100:8")
    with pytest.raises(aot.AotError, match=r"<card>:<GPUs per node>"):
        aot.target("h100:eight")
