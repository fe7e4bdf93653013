"""The published configs compiled for TPU pods on a CPU host (`python -m hcsc_jax.aot`), and the
BENCHMARKS.md table made from them.

  python benchmarks/aot_pods.py            # compiles the rows not yet in benchmarks/aot/ (minutes each)
  python benchmarks/aot_pods.py --table    # prints the markdown table from benchmarks/aot/*.json

Each row runs `python -m hcsc_jax.aot --config=... --topology=... --json=benchmarks/aot/<row>.json`
and keeps its printed tables beside the JSON (<row>.txt). Rows other than the first compile every
program but the warm-up step (the prototype step does what it does and more). Needs libtpu
(`pip install -e ".[tpu]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "aot")
NOT_WARMUP = "--programs=prototype_step,feature_pass,kmeans_lloyd,kmeans_assign,knn_similarity"

# (row name, config, topology, extra flags)
ROWS = (
    ("r50_b4096_v5p-4x4x8", "imagenet_hcsc_200ep.py", "v5p:4x4x8", ("--config.batch_size=4096",)),
    ("r50_b256_v5e-2x4", "imagenet_hcsc_200ep.py", "v5e:2x4", (NOT_WARMUP,)),
    ("r50_b256_v4-2x2x1", "imagenet_hcsc_200ep.py", "v4:2x2x1", (NOT_WARMUP,)),
    ("r50mc_b256_v5e-2x4", "imagenet_hcsc_multicrop_200ep.py", "v5e:2x4", (NOT_WARMUP,)),
    ("r50mc_b256_v4-2x2x1", "imagenet_hcsc_multicrop_200ep.py", "v4:2x2x1", (NOT_WARMUP,)),
    ("vits16_b1024_v5e-4x4", "imagenet_hcsc_vit_s16.py", "v5e:4x4", (NOT_WARMUP,)),
    ("vits16_b1024_v5p-2x2x4", "imagenet_hcsc_vit_s16.py", "v5p:2x2x4", (NOT_WARMUP,)),
    # 4096 on 256 chips is 16 per chip: BN groups of 16 (32 would need 8192).
    ("r50_b4096_v5e-16x16", "imagenet_hcsc_200ep.py", "v5e:16x16",
     ("--config.batch_size=4096", "--config.bn_group_size=16", NOT_WARMUP)),
    ("r50mc_b4096_v5p-4x4x8", "imagenet_hcsc_multicrop_200ep.py", "v5p:4x4x8",
     ("--config.batch_size=4096", NOT_WARMUP)),
    ("r50mc_b4096_v5e-16x16", "imagenet_hcsc_multicrop_200ep.py", "v5e:16x16",
     ("--config.batch_size=4096", "--config.bn_group_size=16", NOT_WARMUP)),
    # An impossible setting: the verdict and exit status 1.
    # (65536 x a 65536 queue is 2**32 selection draws, more than the hash sampler's one call.)
    ("r50_b32768_v5e-2x2", "imagenet_hcsc_200ep.py", "v5e:2x2",
     ("--config.batch_size=32768", "--config.queue_size=32768", "--programs=prototype_step")),
)


def claim(path: str) -> bool:
    """Takes the row of the claim file `path` (holding the pid of the run compiling it) unless a
    live process holds it; a claim left by a killed run is taken over."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(open(path).read() or 0)
            if pid > 0:
                os.kill(pid, 0)
                return False
        except PermissionError:  # alive, another user's
            return False
        except (ValueError, ProcessLookupError):
            pass
        os.remove(path)
        return claim(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def run_rows(only=()):
    os.makedirs(OUT, exist_ok=True)
    for name, config, topology, extra in ROWS:
        path = os.path.join(OUT, f"{name}.json")
        if (only and name not in only) or os.path.exists(path):
            continue
        if not claim(os.path.join(OUT, f"{name}.claim")):
            continue  # a row another run of this script is compiling
        cmd = [sys.executable, "-m", "hcsc_jax.aot", f"--config=configs/{config}", f"--topology={topology}",
               *extra, f"--json={os.path.relpath(path, ROOT)}"]
        print(" ".join(cmd[1:]), flush=True)
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        with open(os.path.join(OUT, f"{name}.txt"), "w") as f:
            f.write(f"$ python {' '.join(cmd[1:])}\n{res.stdout}\n(exit status {res.returncode})\n")
            if res.returncode not in (0, 1) or not res.stdout.strip():  # a crash: its last words too
                f.write(res.stderr[-3000:])
        os.remove(os.path.join(OUT, f"{name}.claim"))
        print(f"  exit {res.returncode}", flush=True)
        if res.returncode not in (0, 1):
            print(res.stderr[-2000:], file=sys.stderr)


def gib(n):
    return f"{n / 2**30:.2f}"


def table() -> str:
    rows = []
    head = ("| config | topology (chips, hosts) | batch (per chip) | prototype step GiB / chip (HBM) | "
            "largest program | fits | step GFLOP / chip | step GB accessed / chip | step collectives MiB "
            "| roofline bound per step (bound by) | bound, images/s per chip |")
    rows += [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, config, topology, _ in ROWS:
        path = os.path.join(OUT, f"{name}.json")
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        progs = {p["name"]: p for p in r["programs"]}
        step = progs.get("prototype_step") or progs.get("warmup_step")
        largest = max(r["programs"], key=lambda p: p["total"])
        hbm = r["chip"]["hbm_bytes"]
        if "refused" in step:
            cost = "refused by XLA | - | - | - | -"
        else:
            coll = sum(c["bytes"] for c in step["collectives"]) / 2**20
            rl = step["roofline"]
            cost = (f"{step['flops'] / 1e9:,.0f} | {step['bytes_accessed'] / 1e9:.1f} | {coll:,.1f} | "
                    f"{1e3 * rl['bound_s']:.1f} ms ({rl['bound_by']}) | "
                    f"{r['batch_size'] / r['chips'] / rl['bound_s']:,.0f}")
        rows.append(f"| {config.removesuffix('.py')} | {topology} ({r['chips']}, {r['hosts']}) | "
                    f"{r['batch_size']} ({r['batch_size'] // r['chips']}) | {gib(step['total'])} "
                    f"({gib(hbm)}) | {largest['name']} {gib(largest['total'])} | "
                    f"{'yes' if r['fits'] else '**no**'} | {cost} |")
    first = json.load(open(os.path.join(OUT, f"{ROWS[0][0]}.json"))) if os.path.exists(
        os.path.join(OUT, f"{ROWS[0][0]}.json")) else None
    if first:
        v = first["versions"]
        rows.append("")
        rows.append(f"jax {v['jax']}, libtpu {v['libtpu']}, flax {v['flax']}; "
                    "`python benchmarks/aot_pods.py`; each row's tables in `benchmarks/aot/<row>.txt`")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the markdown table of the rows done")
    p.add_argument("--only", default="", help="comma-separated row names")
    args = p.parse_args()
    if args.table:
        print(table())
    else:
        run_rows(tuple(s for s in args.only.split(",") if s))


if __name__ == "__main__":
    main()
