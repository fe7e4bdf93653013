"""The study's report, from an archive alone: one row per archived run (`collect`), the tables
of means and paired differences (`tables`), the verdicts (`verdicts`), figures, tables.md and
results.json (`report`), and RESULTS.md (`results_md`). The settings are in experiments/settings.py,
the runner that fills the archive in experiments/study.py."""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np

from experiments import settings


def _labels(config_path: str):
    """The labels of the training split of the run whose config.json is `config_path`."""
    from hcsc_jax.data import sources  # the dataset's labels only

    config = json.load(open(config_path))
    return sources.load_dataset(config["dataset"], config["train_split"], config.get("data_dir")).labels


def level_nmi(workdir: str, labels, coarse=None) -> dict:
    """NMI of each prototype level of the run's last hierarchy/epoch_XXXX.npz against the train
    labels (and of the top level against a coarse grouping). {} without a hierarchy."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    files = sorted(glob.glob(os.path.join(workdir, "hierarchy", "epoch_*.npz")))
    if not files:
        return {}
    with np.load(files[-1]) as z:
        levels = []
        while f"level{len(levels)}/assignments" in z:
            levels.append(np.asarray(z[f"level{len(levels)}/assignments"]))
        sizes = [int(z[f"level{l}/centroids"].shape[0]) for l in range(len(levels))]
    out = {"hierarchy_file": os.path.basename(files[-1]), "level_sizes": sizes,
           "level_nmi": [float(nmi(labels, a)) for a in levels]}
    if coarse is not None:
        top = int(np.argmin(sizes))
        out["top_level_coarse_nmi"] = float(nmi(coarse, levels[top]))
    return out


def collect(setting: settings.Setting, archive: str) -> list[dict]:
    """One row per archived run (train + every eval), from the run's own files."""
    labels = {}  # train split -> its labels
    rows = []
    for method in setting.methods:
        source = next(m for m in setting.methods if m.name == method.reuse) if method.reuse else method
        for seed in method.seeds:
            workdir = settings.run_dir(archive, setting, source, seed)
            if not settings.complete(workdir):
                continue
            results = {m: settings.eval_result(workdir, m) for m in settings.EVAL_MODES}
            knn, lin, clu = results["knn"]["per_k"], results["linear_fast"], results["cluster"]["per_k"]
            k = str(setting.num_classes)
            times = json.load(open(os.path.join(workdir, "study_times.json")))
            row = dict(method=method.name, group=method.group, seed=seed,
                       environment=times.get("environment"),
                       workdir=(os.path.relpath(workdir, settings.REPO) if workdir.startswith(settings.REPO)
                                else workdir),
                       knn20=knn["20"]["top1"], knn200=knn["200"]["top1"], linear_fast=lin["top1"],
                       nmi=clu[k]["nmi"], ami=clu[k]["ami"], train_seconds=times.get("train_seconds"),
                       command=times.get("train_command"))
            config_path = os.path.join(workdir, "config.json")
            split = json.load(open(config_path))["train_split"]
            if split not in labels:
                labels[split] = _labels(config_path)
            coarse = (settings.fashion_coarse_labels(labels[split]) if setting.coarse == "fashion_mnist"
                      else None)
            row.update(level_nmi(workdir, labels[split], coarse))
            row.update(_curve(workdir))
            row.update(last_epoch(workdir))
            rows.append(row)
    return rows


def last_epoch(workdir: str) -> dict:
    """The last epoch record's InfoNCE loss and instance accuracy (%) of a trained run's
    metrics.jsonl: whether it left the log(K+1) plateau. {} for a run without one."""
    path = os.path.join(workdir, "metrics.jsonl")
    epochs = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    epochs = [r for r in epochs if r.get("type") == "epoch" and "loss_instance" in r]
    if not epochs:
        return {}
    queue = json.load(open(os.path.join(workdir, "config.json")))["queue_size"]
    last = epochs[-1]
    acc = last.get("instance_acc")  # (with instance selection: one per level, averaged)
    if acc is None:
        acc = np.mean([v for k, v in last.items() if k.startswith("instance_acc/")])
    return dict(last_loss_instance=last["loss_instance"], last_instance_acc=100 * float(acc),
                plateau=float(np.log(queue + 1)))


def _curve(workdir: str) -> dict:
    """kNN-vs-epoch points, if the run's metrics.jsonl holds evaluator records (any numeric key
    with "knn" and "top1" in its name on a record with an epoch)."""
    path = os.path.join(workdir, "metrics.jsonl")
    points, by_k = [], []  # (epoch from 0, best top-1); (epochs done, k=20, k=200 top-1)
    if os.path.isfile(path):
        for line in open(path):
            rec = json.loads(line)
            keys = sorted(k for k, v in rec.items()
                          if "knn" in k and "top1" in k and isinstance(v, (int, float)))
            if keys and "epoch" in rec:
                points.append((rec["epoch"], rec[keys[0]]))
                if "knn/per_k/20/top1" in rec:
                    by_k.append((rec["epoch"] + 1, rec["knn/per_k/20/top1"], rec.get("knn/per_k/200/top1")))
    return {"knn_curve": points, "knn_by_epoch": by_k} if points else {}


METRICS = (("knn20", "kNN top-1 k=20 (%)"), ("knn200", "kNN top-1 k=200 (%)"),
           ("linear_fast", "linear_fast top-1 (%)"), ("nmi", "NMI (k-means, k=#classes)"),
           ("ami", "AMI (k-means, k=#classes)"))


def _ms(values, digits=2):
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def _digits(metric):
    return 3 if metric in ("nmi", "ami") else 2


def tables(setting: settings.Setting, rows: list[dict]) -> str:
    by_method = {m.name: [r for r in rows if r["method"] == m.name] for m in setting.methods}
    out = []
    for group, title in (("reference", "Reference"), ("main", "Methods"),
                         ("ablation", "Ablations (Table-5 style: the HCSC config with one switch changed)")):
        methods = [m for m in setting.methods if m.group == group]
        if not methods:
            continue
        out.append(f"#### {title}\n")
        out.append("| method | seeds done / planned | " + " | ".join(h for _, h in METRICS)
                   + " | NMI per prototype level | last epoch: InfoNCE loss (plateau log(K+1)) / instance "
                     "acc (%) | train wall time (s) |")
        out.append("|" + " --- |" * (len(METRICS) + 5))
        for m in methods:
            rs = by_method[m.name]
            seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
            cells = [_ms([r[k] for r in rs], _digits(k)) for k, _ in METRICS]
            lv = [r["level_nmi"] for r in rs if "level_nmi" in r]
            lvl = " / ".join(_ms(col, 3) for col in zip(*lv)) if lv else "-"
            if lv:
                lvl += f" ({'/'.join(map(str, rs[0]['level_sizes']))})"
            if any("top_level_coarse_nmi" in r for r in rs):
                lvl += "; top vs coarse groups " + _ms([r["top_level_coarse_nmi"] for r in rs], 3)
            t = _ms([r["train_seconds"] for r in rs if r.get("train_seconds")], 0)
            last = [r for r in rs if "last_loss_instance" in r]
            inst = (f"{_ms([r['last_loss_instance'] for r in last], 2)} ({last[0]['plateau']:.2f}) / "
                    f"{_ms([r['last_instance_acc'] for r in last], 1)}") if last else "-"
            out.append(f"| {m.name} | {len(rs)} / {len(m.seeds)} (seeds {seeds or '-'}) | "
                       + " | ".join(cells) + f" | {lvl} | {inst} | {t} |")
        out.append("")
    if setting.curve_table:  # the in-training kNN of each run, epoch by epoch
        for r in rows:
            pts = r.get("knn_by_epoch") or []
            if pts:
                out.append(f"#### kNN top-1 during training: {r['method']}, seed {r['seed']} "
                           "(k = 20 / 200, %)\n")
                out.append("| epochs done | " + " | ".join(str(e) for e, _, _ in pts) + " |")
                out.append("|" + " --- |" * (len(pts) + 1))
                out.append("| k = 20 | " + " | ".join(f"{a:.2f}" for _, a, _ in pts) + " |")
                out.append("| k = 200 | " + " | ".join("-" if b is None else f"{b:.2f}" for _, _, b in pts)
                           + " |")
                out.append("")
    # Paired differences over the seeds both have: every method vs the raw pixels, every trained one vs
    # MoCo v2 and vs PCL (the references' own differences are the pixel table's); the ablations also vs
    # "hierarchical prototypes, no selection" (what the selection adds, as the paper's Table 5).
    no_sel = next((m.name for m in setting.methods if m.name.startswith("hier. prototypes")), None)
    for base_name, methods in ((settings.PIXELS, [m.name for m in setting.methods
                                                  if m.name != settings.PIXELS]),
                               ("MoCo v2", [m.name for m in setting.methods
                                            if m.name != "MoCo v2" and m.group != "reference"]),
                               ("PCL", [m.name for m in setting.methods
                                        if m.name not in ("MoCo v2", "PCL") and m.group != "reference"]),
                               (no_sel, [m.name for m in setting.methods
                                         if m.group == "ablation" and m.name != no_sel]),
                               (setting.baseline, [m.name for m in setting.methods if m.group != "reference"
                                                   and m.name != setting.baseline])):
        base = _by_seed(by_method.get(base_name, []))
        if not base:
            continue
        lines = []
        for name in methods:
            pairs = [(r, base[r["seed"]]) for r in by_method[name] if r["seed"] in base]
            if not pairs:
                continue
            cells = []
            for k, _ in METRICS:
                d = [a[k] - b[k] for a, b in pairs]
                cells.append(_ms(d, _digits(k)) + " [" + ", ".join(f"{x:+.{_digits(k)}f}" for x in d) + "]")
            lines.append(f"| {name} | {len(pairs)} | " + " | ".join(cells) + " |")
        if lines:
            same = "every seed against its one row" if base_name == settings.PIXELS else "same seed"
            out.append(f"#### Paired difference to {base_name} ({same}): method − {base_name}, "
                       "mean ± std [per seed]\n")
            out.append("| method | paired seeds | " + " | ".join(f"Δ {h}" for _, h in METRICS) + " |")
            out.append("|" + " --- |" * (len(METRICS) + 2))
            out += lines + [""]
    return "\n".join(out)


class _AtEverySeed(dict):
    """{any seed: the one row}: the raw pixels have no initialization to pair by."""

    def __init__(self, row: dict):
        super().__init__({row["seed"]: row})
        self.row = row

    def __contains__(self, seed) -> bool:
        return True

    def __getitem__(self, seed) -> dict:
        return self.row


def _by_seed(rows: list[dict]) -> dict:
    """{seed: row}; the raw pixels (one row) stand beside every seed."""
    if len(rows) == 1 and rows[0]["method"] == settings.PIXELS:
        return _AtEverySeed(rows[0])
    return {r["seed"]: r for r in rows}


def verdicts(setting: settings.Setting, rows: list[dict]) -> list[str]:
    """Plain sentences: where HCSC does / does not beat each baseline: the paired mean difference,
    its 95% t-interval over seeds and the number of seeds HCSC is ahead on."""
    from scipy import stats

    by = {m.name: _by_seed([r for r in rows if r["method"] == m.name]) for m in setting.methods}
    lines = ["#### Where HCSC wins and where it does not (paired over common seeds)", ""]
    for other in (settings.PIXELS, "MoCo v2", "PCL"):
        if not by.get("HCSC") or not by.get(other):
            continue
        seeds = sorted(s for s in by["HCSC"] if s in by[other])
        if not seeds:
            continue
        for k, h in METRICS:
            d = np.array([by["HCSC"][s][k] - by[other][s][k] for s in seeds])
            wins, n, f = int((d > 0).sum()), len(d), _digits(k)
            if n > 1:
                half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
                ci = f"95% CI [{d.mean() - half:+.{f}f}, {d.mean() + half:+.{f}f}]"
                clear = abs(d.mean()) > half
            else:
                ci, clear = "one seed, no interval", False
            verdict = ("HCSC higher" if d.mean() > 0 else "HCSC **not** higher") + (
                " (the interval excludes 0)" if clear else "; not distinguishable from seed noise")
            lines.append(f"- {h}: HCSC − {other} = {d.mean():+.{f}f}, {ci}, HCSC ahead on {wins}/{n} seeds: "
                         f"{verdict}")
    return lines if len(lines) > 2 else []


def figures(setting: settings.Setting, rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    methods = [m.name for m in setting.methods if any(r["method"] == m.name for r in rows)]
    if not methods:
        return made
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6))
    for ax, (k, h) in zip(axes, METRICS):
        vals = [[r[k] for r in rows if r["method"] == m] for m in methods]
        means = [np.mean(v) for v in vals]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals]
        x = np.arange(len(methods))
        ax.bar(x, means, yerr=stds, capsize=3, color=["C0" if m in ("MoCo v2", "PCL", "HCSC") else "C7"
                                                       for m in methods])
        for xi, v in zip(x, vals):
            ax.plot([xi] * len(v), v, "k.", ms=3)
        lo = min(min(v) for v in vals)
        hi = max(max(v) for v in vals)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
        ax.set_xticks(x, [m.replace(", ", ",\n").replace(" (", "\n(") for m in methods], rotation=60,
                      ha="right", fontsize=6)
        ax.set_title(h, fontsize=8)
    fig.suptitle(f"{setting.name}: mean ± std over seeds (dots: seeds; y axes do not start at 0)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{setting.name}_bars.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    made.append(path)
    curves = [r for r in rows if r.get("knn_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, m in enumerate(methods):
            for r in [r for r in curves if r["method"] == m]:
                e, v = zip(*r["knn_curve"])
                ax.plot(e, v, color=f"C{i}", alpha=0.6, label=m)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{setting.name}_knn_curves.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        made.append(path)
    return made


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "flax", "faiss-cpu", "numpy", "scikit-learn", "optax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = f"CPU: {cpu}, {os.cpu_count()} cores"
    try:
        out = subprocess.run([sys.executable, "-c",
                              "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)"],
                             capture_output=True, text=True, timeout=120)
        device += f"; jax backend: {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(versions=versions, device=device, date=datetime.datetime.now(datetime.UTC).isoformat(
        timespec="minutes"))


def report(setting: settings.Setting, archive: str, out_dir: str, failures: list[dict], command: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rows = collect(setting, archive)
    env = environment()
    trained_on = sorted({_env_line(r["environment"]) for r in rows if r.get("environment")})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(setting=setting.name, rows=rows, environment=env, failures=failures,
                       command=command), f, indent=2)
    text = tables(setting, rows)
    done = {m.name: sum(r["method"] == m.name for r in rows) for m in setting.methods}
    header = [f"Command: `{command}`", "", f"Report written {_env_line(env)}.", ""]
    if trained_on:
        header += ["Runs trained on (date of each run's start; machine; versions):", ""]
        header += [f"- {line}" for line in trained_on] + [""]
    header += ["Finished runs per method: " + ", ".join(f"{k} {v}" for k, v in done.items()), ""]
    if failures:
        header += ["Failed runs:", ""] + [f"- {f['run']} ({f['stage']}, exit {f['returncode']}): "
                                          f"see {f['log']}" for f in failures] + [""]
    text = "\n".join(header) + "\n" + text + "\n" + "\n".join(verdicts(setting, rows)) + "\n"
    with open(os.path.join(out_dir, "tables.md"), "w") as f:
        f.write(text)
    figs = figures(setting, rows, out_dir)
    return dict(rows=rows, text=text, figures=figs, env=env)


def _env_line(env: dict) -> str:
    return (f"{env['date'][:10]}; {env['device']}; "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


METRIC_NOTES = (
    "Metrics per run, all from `eval.py` on the final checkpoint unless said otherwise: kNN top-1 on the "
    "held-out split (k = 20 and 200, T = 0.07, pooled features of the query encoder); **linear_fast** top-1 "
    "(`eval.py --eval=linear_fast`: the linear protocol's classifier on cached center-crop features, no "
    "augmentation; not the full linear protocol); NMI / AMI of faiss k-means of the pooled train features "
    "with k = number of classes (`--eval=cluster`); for PCL and HCSC the NMI of each prototype level / "
    "clustering of the run's last `hierarchy/epoch_XXXX.npz` against the train labels. Means ± sample std "
    "over the seeds that finished; paired differences are taken seed by seed against MoCo v2 (same seed = "
    "same initialization and data order; and against PCL), listed per seed in brackets. Train wall time "
    "includes compilation, "
    "the final in-train evaluation, and contention: runs shared the machine with other jobs.")


def _sections(text: str) -> dict[str, str]:
    """The "## <name>" sections of a RESULTS.md text -> {name: the section's text, heading included}."""
    found = list(re.finditer(r"^## (\S+)\s*$", text, flags=re.M))
    return {m.group(1): text[m.start():found[i + 1].start() if i + 1 < len(found) else len(text)].strip()
            for i, m in enumerate(found)}


RESULTS_SECTIONS = ("fashion_mnist_cpu", "digits", "digits_converged", "digits_curve", "digits_recipe",
                    "fashion_mnist")


def results_md(archive: str, path: str, command: str, names=RESULTS_SECTIONS) -> str:
    """RESULTS.md: one section per setting from <archive>/<setting>/report (figures copied next to
    `path` under results/). A setting with no archived run keeps the section `path` already has
    (made by an earlier study whose runs were not archived), or gets a note saying it was not run."""
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
    before = _sections(open(path).read()) if os.path.isfile(path) else {}
    parts = ["# Results: HCSC vs MoCo v2 and PCL, with the paper's ablations", "",
             f"Written by `{command}` from the runs' own outputs (see `experiments/study.py`).", "",
             METRIC_NOTES, ""]
    notes = os.path.join(settings.REPO, "experiments", "RESULTS_NOTES.md")
    if os.path.isfile(notes):
        parts += [open(notes).read().strip(), ""]
    for name in names:
        setting = settings.SETTINGS[name]
        report_dir = os.path.join(archive, name, "report")
        res_path = os.path.join(report_dir, "results.json")
        rows = json.load(open(res_path))["rows"] if os.path.isfile(res_path) else []
        if not rows and name in before and "**Not run yet.**" not in before[name]:
            parts += [before[name], ""]
            continue
        parts += [f"## {name}", "", settings.DESCRIPTION.get(name, ""), ""]
        if not rows:
            parts += [
                "**Not run yet.**" + (" This setting needs a GPU (about 52 images/s on the 2-core CPU, "
                                      "i.e. days for 9 runs) and none was available to this study; "
                                      "it waits for one." if setting.needs_gpu else ""),
                "", f"Command: `python experiments/study.py --setting={name} --root=<runs dir> "
                    f"--results_md=RESULTS.md` (MoCo v2, PCL, HCSC x seeds "
                    f"{', '.join(map(str, setting.methods[0].seeds))}).", ""]
            continue
        parts += [open(os.path.join(report_dir, "tables.md")).read().strip(), ""]
        os.makedirs(fig_dir, exist_ok=True)
        for png in sorted(glob.glob(os.path.join(report_dir, "*.png"))):
            shutil.copy(png, fig_dir)
            rel = os.path.relpath(os.path.join(fig_dir, os.path.basename(png)),
                                  os.path.dirname(os.path.abspath(path)))
            parts += [f"![{os.path.basename(png)}]({rel})", ""]
    for name in EXTRA_SECTIONS:  # written by their own scripts into <archive>/<name>/report.md
        section = os.path.join(archive, name, "report.md")
        if os.path.isfile(section):
            parts += [open(section).read().strip(), ""]
        elif name in before:
            parts += [before[name], ""]
    text = "\n".join(parts)
    with open(path, "w") as f:
        f.write(text)
    return text


# RESULTS.md sections made by other scripts of experiments/ (authors_digits.py: the authors' code
# beside ours under :authors).
EXTRA_SECTIONS = ("authors_digits",)
