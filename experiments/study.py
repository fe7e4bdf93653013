"""Multi-seed study: HCSC vs MoCo v2 and PCL, and the paper's Table-5 ablations (issue 12).

  python experiments/study.py --setting=digits --root=/tmp/study          # train + eval + report
  nice -n 19 python experiments/study.py --setting=fashion_mnist_cpu --root=/tmp/study \
      --results_md=RESULTS.md                                             # 2-core CPU, <= 15 min a run
  python experiments/study.py --setting=fashion_mnist --root=/data/study  # needs a GPU
  python experiments/study.py --setting=fashion_mnist_cpu --report_only --results_md=RESULTS.md

Every run is `python train.py --config <config> --workdir <root>/<setting>/<run> --config.seed=S
<overrides>` followed by `python eval.py --eval=knn|linear_fast|cluster --checkpoint=<workdir>`;
the tables are built from the files those commands write (eval/<mode>_step<N>.json, the last
hierarchy/epoch_XXXX.npz) and nothing else. Runs go in the order of `plan()`: the main methods
seed by seed (so partial results stay balanced), then the ablations.

Archive: each finished run's small outputs (config.json, summary.json, metrics.jsonl, the eval
JSONs, study_times.json, the last hierarchy/epoch_XXXX.npz if under 1 MB; no checkpoints) are
copied to --archive/<setting>/<run> (default experiments/runs, committed to the repository), and
the report is built from the archive alone, so a later checkout continues where this one stopped.

Resuming: a run whose outputs are in the archive, or whose train and eval outputs all exist in
its workdir, is skipped; a half-trained run continues from its newest checkpoint (train.py
resumes by itself); missing evals are redone. A run that
fails (missing dataset, NaN loss, ...) is reported with its command, exit code and the end of its
log in <root>/<setting>/failures.json; the study goes on with the others, reports on what
finished and exits with status 1.

Outputs in --out (default: <archive>/<setting>/report): results.json (one row per finished run),
tables.md (mean +- std over seeds, paired differences to MoCo v2 and PCL), PNG figures;
--results_md also writes RESULTS.md (one section per setting of the archive; a setting with no
archived run keeps the section the file already has; figures under results/).

What each setting runs is in experiments/settings.py; the report, built from the archive alone, is
in experiments/report.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

# Run as a script (python experiments/study.py), sys.path[0] is experiments/: put the repository
# root first, for `from experiments import ...` (and hcsc_jax) as under pytest or `python -m`.
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import report, settings  # noqa: E402

ARCHIVE = os.path.join(settings.REPO, "experiments", "runs")
ARCHIVED_FILES = ("config.json", "summary.json", "reference.json", "metrics.jsonl", "study_times.json")
MAX_ARCHIVED_HIERARCHY = 1 << 20  # bytes


def plan(setting: settings.Setting):
    """-> [(method, seed)] in run order: references (cheap), main methods seed-major, then
    ablations seed-major."""
    order = []
    for group in ("reference", "main", "ablation"):
        methods = [m for m in setting.methods if m.group == group and m.reuse is None]
        for seed in sorted({s for m in methods for s in m.seeds}):
            order += [(m, seed) for m in methods if seed in m.seeds]
    return order


def train_command(setting: settings.Setting, method: settings.Method, seed: int, workdir: str,
                  extra=()) -> list[str]:
    return [sys.executable, "train.py", f"--config=configs/{method.config}", f"--workdir={workdir}",
            f"--config.seed={seed}", "--config.progress_bar=False", *setting.common, *method.overrides,
            *extra]


def eval_command(setting: settings.Setting, mode: str, workdir: str) -> list[str]:
    cmd = [sys.executable, "eval.py", f"--eval={mode}", f"--checkpoint={workdir}",
           "--config.progress_bar=False"]
    if mode == "knn":
        cmd.append("--config.evals.knn.ks=(20,200)")
    if mode == "cluster":
        cmd.append(f"--config.evals.cluster.ks=({setting.num_classes},)")
    return cmd + list(setting.eval_overrides)


def archive_run(workdir: str, dest: str) -> list[str]:
    """Copies the small outputs of a finished run (ARCHIVED_FILES, the newest eval JSON of each
    mode, the last hierarchy npz when under MAX_ARCHIVED_HIERARCHY bytes) to `dest` -> the files
    written (relative to dest). Written into `dest`.tmp first, then renamed: an archive folder is
    whole or absent."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "eval"))
    names = [f for f in ARCHIVED_FILES if os.path.isfile(os.path.join(workdir, f))]
    for mode in settings.EVAL_MODES:
        files = glob.glob(os.path.join(workdir, "eval", f"{mode}_step*.json"))
        newest = max(files, key=lambda p: int(re.search(r"_step(\d+)\.json$", p).group(1)))
        names.append(os.path.relpath(newest, workdir))
    hierarchies = sorted(glob.glob(os.path.join(workdir, "hierarchy", "epoch_*.npz")))
    if hierarchies and os.path.getsize(hierarchies[-1]) <= MAX_ARCHIVED_HIERARCHY:
        os.makedirs(os.path.join(tmp, "hierarchy"))
        names.append(os.path.relpath(hierarchies[-1], workdir))
    for name in names:
        shutil.copy2(os.path.join(workdir, name), os.path.join(tmp, name))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return sorted(names)


def _run(cmd, log_path) -> tuple[int, float]:
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=settings.REPO, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def _tail(path, lines=15) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _lock(workdir: str) -> bool:
    """Claims a run for this process (<workdir>/study.lock with its pid); False if another live
    study process holds it. A lock left by a dead process is taken over."""
    path = os.path.join(workdir, "study.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                try:
                    os.remove(path)  # stale
                except FileNotFoundError:
                    pass
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def execute(setting: settings.Setting, root: str, extra=(), only=None, log=print,
            archive=ARCHIVE) -> list[dict]:
    """Trains and evaluates every planned run not yet complete, archiving each as it finishes
    (`archive_run`). -> failures (dicts). Several study processes may work on one root at once:
    each run is claimed by a lock file."""
    failures = []
    for method, seed in plan(setting):
        if only and settings.slug(method.name) not in only:
            continue
        workdir = settings.run_dir(root, setting, method, seed)
        kept = settings.run_dir(archive, setting, method, seed)
        name = f"{method.name} seed {seed}"
        if settings.complete(kept):
            log(f"[skip] {name}: archived ({kept})")
            continue
        todo = [m for m in settings.EVAL_MODES if settings.eval_result(workdir, m) is None]
        if settings.trained(workdir) and not todo:
            archive_run(workdir, kept)
            log(f"[skip] {name}: complete ({workdir}); archived to {kept}")
            continue
        os.makedirs(workdir, exist_ok=True)
        if not _lock(workdir):
            log(f"[busy] {name}: another study process is running it")
            continue
        try:
            if method.pixels_of:
                failed = _pixels_run(setting, method, seed, workdir, name, todo, (archive, root), log)
            else:
                failed = _execute_run(setting, method, seed, workdir, name, todo, extra, log)
            failures += failed
            if not failed:
                archive_run(workdir, kept)
                log(f"[archived] {name}: {kept}")
        finally:
            os.remove(os.path.join(workdir, "study.lock"))
    return failures


def _execute_run(setting, method, seed, workdir, name, todo, extra, log) -> list[dict]:
    """Trains (or resumes) one run and runs its missing evals. -> its failures."""
    failures = []
    log_path = os.path.join(workdir, "study.log")
    times_path = os.path.join(workdir, "study_times.json")
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}
    if not settings.trained(workdir):
        cmd = train_command(setting, method, seed, workdir, extra)
        log(f"[train] {name}: {' '.join(cmd)}")
        rc, secs = _run(cmd, log_path)
        times["train_seconds"] = times.get("train_seconds", 0.0) + secs
        times["train_command"] = " ".join(cmd[1:])
        times.setdefault("environment", report.environment())  # where it trained (its first part, if resumed)
        json.dump(times, open(times_path, "w"), indent=2)
        if rc != 0 or not settings.trained(workdir):
            failures.append(dict(run=name, workdir=workdir, stage="train", command=" ".join(cmd),
                                 returncode=rc, log=log_path, log_tail=_tail(log_path)))
            log(f"[FAILED] {name}: train.py exited with {rc}; see {log_path}:\n{_tail(log_path, 5)}")
            return failures
    for mode in todo:
        cmd = eval_command(setting, mode, workdir)
        rc, secs = _run(cmd, log_path)
        times[f"eval_{mode}_seconds"] = secs
        json.dump(times, open(times_path, "w"), indent=2)
        if rc != 0 or settings.eval_result(workdir, mode) is None:
            failures.append(dict(run=name, workdir=workdir, stage=f"eval {mode}", command=" ".join(cmd),
                                 returncode=rc, log=log_path, log_tail=_tail(log_path)))
            log(f"[FAILED] {name}: eval.py --eval={mode} exited with {rc}; see {log_path}")
            break
    else:
        log(f"[done] {name} ({times.get('train_seconds', 0):.0f} s training)")
    return failures


def _pixels_run(setting, method, seed, workdir, name, todo, roots, log) -> list[dict]:
    """The raw-pixel reference: `eval.py --checkpoint=pixels:<workdir>` for each missing mode, on
    the data of the `pixels_of` method's run of this seed (its config.json, copied here)."""
    source = next(m for m in setting.methods if m.name == method.pixels_of)
    data_of = next((d for d in (settings.run_dir(r, setting, source, seed) for r in roots)
                    if settings.trained(d)), None)
    if data_of is None:
        log(f"[FAILED] {name}: needs {source.name} seed {seed} first (its data and crops)")
        return [dict(run=name, workdir=workdir, stage="data", command="", returncode=None, log="",
                     log_tail=f"no trained run of {source.name} seed {seed}")]
    shutil.copy(os.path.join(data_of, "config.json"), os.path.join(workdir, "config.json"))
    times = dict(environment=report.environment(), train_seconds=0.0,
                 train_command=f"eval.py --checkpoint=pixels:<run> on the data of {source.name} seed {seed}")
    log_path = os.path.join(workdir, "study.log")
    for mode in todo:
        cmd = eval_command(setting, mode, f"pixels:{workdir}") + [f"--out={os.path.join(workdir, 'eval')}"]
        rc, times[f"eval_{mode}_seconds"] = _run(cmd, log_path)
        if rc != 0 or settings.eval_result(workdir, mode) is None:
            log(f"[FAILED] {name}: eval.py --eval={mode} exited with {rc}; see {log_path}")
            return [dict(run=name, workdir=workdir, stage=f"eval {mode}", command=" ".join(cmd),
                         returncode=rc, log=log_path, log_tail=_tail(log_path))]
    json.dump(times, open(os.path.join(workdir, "study_times.json"), "w"), indent=2)
    json.dump(dict(encoder=settings.PIXELS, data_of=f"{source.name} seed {seed}"),
              open(os.path.join(workdir, "reference.json"), "w"), indent=2)
    log(f"[done] {name}")
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(settings.SETTINGS), default="digits")
    p.add_argument("--root", default="runs/study", help="where the runs' workdirs go (checkpoints included)")
    p.add_argument("--archive", default=ARCHIVE,
                   help="where each finished run's small outputs are copied, and the report is read from")
    p.add_argument("--out", default=None, help="report folder (default <archive>/<setting>/report)")
    p.add_argument("--report_only", action="store_true",
                   help="only collect what finished and write the report")
    p.add_argument("--only", default="", help="comma-separated method slugs to run (e.g. moco_v2,hcsc)")
    p.add_argument("--extra", action="append", default=[], help="extra train.py flag for every run")
    p.add_argument("--results_md", default=None,
                   help="also write RESULTS.md (every setting's report under --archive)")
    args = p.parse_args(argv)
    setting = settings.SETTINGS[args.setting]
    root, archive = os.path.abspath(args.root), os.path.abspath(args.archive)
    out_dir = os.path.abspath(args.out or os.path.join(archive, setting.name, "report"))
    command = "python experiments/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fail_path = os.path.join(root, setting.name, "failures.json")
    failures = []
    if not args.report_only:
        os.makedirs(os.path.join(root, setting.name), exist_ok=True)
        only = {s for s in args.only.split(",") if s}
        failures = execute(setting, root, tuple(args.extra), only, log=lambda s: print(s, flush=True),
                           archive=archive)
        with open(fail_path, "w") as f:
            json.dump(failures, f, indent=2)
    elif os.path.isfile(fail_path):
        failures = json.load(open(fail_path))
    res = report.report(setting, archive, out_dir, failures, command)
    print(res["text"])
    print(f"report: {out_dir}")
    if args.results_md:
        report.results_md(archive, args.results_md, command)
        print(f"wrote {args.results_md}")
    if failures:
        print(f"{len(failures)} run(s) failed: " + "; ".join(f"{f['run']} ({f['stage']})" for f in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
