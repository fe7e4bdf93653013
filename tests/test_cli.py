"""train.py and eval.py as a user meets them: every documented command line parses, --help exits
0, and a command line that cannot run is one line on stderr, exit status 2, nothing written."""

import importlib
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import preloaded
import pytest
from ml_collections.config_flags import config_path

ROOT = pathlib.Path(__file__).parent.parent
DOCUMENTED = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), ROOT / "train.py", ROOT / "eval.py",
              *sorted(ROOT.glob("configs/*.py"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python train.py ...` / `python eval.py ...` line of the README, docs/*.md and the docstrings
    (continuation lines joined, comments and `[optional]` parts dropped) -> (script, arguments)."""
    found = []
    for path in DOCUMENTED:
        text = path.read_text().replace("\\\\\n", " ").replace("\\\n", " ")
        for m in re.finditer(r"python3? (train|eval)\.py([^\n`]*)", text):
            rest = re.sub(r"\[[^\]]*\]", "", m.group(2))
            if rest.count('"') % 2:  # inside a quoted --command "... python train.py ..."
                rest = rest[:rest.rindex('"')]
            found.append((f"{m.group(1)}.py", shlex.split(rest, comments=True)))
    return found


COMMANDS = documented_commands()


def run(script, *args, cwd=ROOT, one_device=False):
    """`python script args` on the CPU (`one_device`: one CPU device, as a user's machine, not the 8
    virtual ones of conftest.py), forked from a process that has imported the package (preloaded.py)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if one_device:
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return preloaded.run(str(ROOT / script), args, cwd=cwd, env=env, timeout=300)


def test_the_docs_hold_commands_with_data_dir():
    assert len(COMMANDS) > 30 and SHOWN_FAILING <= {(s, tuple(a)) for s, a in COMMANDS}
    assert any(any(a.startswith("--config.data_dir=") for a in args) for _, args in COMMANDS)


@pytest.mark.parametrize("script,args", COMMANDS, ids=[" ".join([s, *a])[:90] for s, a in COMMANDS])
def test_documented_command_parses(script, args):
    """Up to argument parsing (absl's --only_check_args): the config loads, every override applies."""
    done = run(script, *args, "--only_check_args")
    assert done.returncode == 0, done.stderr[-2000:]


# What a documented command may fail on here, and only that: data, a checkpoint, an optional
# package or a run an earlier command makes that this machine does not have.
ELSEWHERE = re.compile(r"does not exist|is not prepared in|is not installed")
# Commands the docs show failing on purpose, each with the test that runs it.
SHOWN_FAILING = {
    ("train.py", ("--config.lr=0.0",)),  # docs/testing.md times it: test_a_usage_error_loads_no_library...
}
DRY_RUNS = sorted({(s, tuple(a)) for s, a in COMMANDS if (s, tuple(a)) not in SHOWN_FAILING
                   and not any(x.startswith("--coordinator_address") for x in a)  # (waits for its peers)
                   and not any(re.search(r"\b(RUN|DIR)\b", x) for x in a)})  # (placeholders)


@pytest.mark.slow
@pytest.mark.parametrize("script,args", DRY_RUNS, ids=[" ".join([s, *a])[:90] for s, a in DRY_RUNS])
def test_documented_command_runs_as_written_up_to_its_first_write(script, args, digits_run, tmp_path):
    """With --dry_run: every check the command makes before it writes (config, data, workdir,
    checkpoint, init encoder), from a directory holding configs/ and, for the commands that read
    it, the runs/digits the first command trains. It succeeds and writes nothing, or fails on
    what this machine lacks (ELSEWHERE), nothing else (a workdir collision, a missing split...)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    if script == "eval.py":
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "digits").symlink_to(digits_run)
    if "--config.init_encoder=runs/digits" in args:  # an encoder of configs/digits.py's architecture
        from configs import digits
        from hcsc_jax import models
        from hcsc_jax.run import checkpoints

        c = digits.get_config()
        meta = models.encoder_meta(c.model.to_dict(), 1, c.bn_group_size)
        checkpoints.export_encoder(str(tmp_path / "runs" / "digits"), meta,
                                   *models.split_model(models.build_encoder(meta))[1:])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = run(script, *args, "--dry_run", cwd=tmp_path, one_device=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 0 or (lines and ELSEWHERE.search(lines[-1])), done.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    if done.returncode == 0:
        assert "dry run: " in done.stderr


@pytest.mark.slow
def test_the_pixels_of_a_run_go_to_its_eval_pixels_folder(digits_run, tmp_path):
    """`eval.py --checkpoint=pixels:RUN` writes RUN/eval/pixels/ (not a folder named
    "pixels:RUN"); it needs only RUN's config.json."""
    (tmp_path / "run").mkdir()
    shutil.copy(os.path.join(digits_run, "config.json"), tmp_path / "run" / "config.json")
    done = run("eval.py", "--eval=knn", "--checkpoint=pixels:run", "--config.progress_bar=False",
               cwd=tmp_path, one_device=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert "knn_step0.json" in os.listdir(tmp_path / "run" / "eval" / "pixels")


@pytest.mark.parametrize("module", sorted(p.stem for p in ROOT.glob("configs/*.py") if p.stem != "__init__"))
def test_no_config_field_is_an_untyped_none(module):
    """A None field cannot be overridden from the command line ("Type NoneType ... is not
    supported"): it must be a typed placeholder."""
    c = importlib.import_module(f"configs.{module}").get_config()

    def paths(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from paths(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    untyped = [p for p in paths(c) if config_path.get_type(p, c) is type(None)]
    assert not untyped


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_exits_0(script):
    done = run(script, "--help")
    assert done.returncode == 0 and "\n  --config: " in done.stdout  # the flag itself, not only --helpfull


def test_config_help_lists_every_field_as_loaded_with_what_it_takes(tmp_path):
    """--config.help: the fields of the config after its variant and overrides, each with its rule;
    exit 0, nothing written."""
    done = run("train.py", "--config=configs/digits.py:authors", "--config.lr=0.5", "--config.help",
               f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "  config.bn_running_stats = 'first_group'  # one of 'mean_of_groups', 'first_group'" in lines
    assert any(line.startswith("  config.lr = 0.5  # ") for line in lines)
    assert any(line.startswith("  config.evals.knn.ks = (20, 200)  # ") for line in lines)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--config.epoch=3"], "train.py: error: --config.epoch: config has no field 'epoch'; "
                           "did you mean config.epochs?"),
    (["--config.objectiv.temperature=1"], "config has no field 'objectiv'; did you mean config.objective?"),
    (["--config=configs/nope.py"], "config file configs/nope.py does not exist"),
    (["--config=configs/digits.py:foo"], "unknown variant 'foo' of configs/digits.py"),
    (["--config.batch_size=abc"], "flag --config.batch_size=abc: invalid literal"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--config.eval.knn_k=5"], "train.py: error: --config.eval.knn_k: config has no field 'eval'; "
                                "did you mean config.evals?"),
    # (each a 30-line usage and exit 1 before)
    (["stray"], "train.py: error: unexpected arguments stray; this command takes flags only"),
    (["--", "--config.epochs=1"], "unexpected arguments --config.epochs=1 (every argument after a bare -- is "
                                  "one: drop it)"),
    (["--config.progress_bar=no"], "flag --config.progress_bar=no: 'no' is not a boolean; use True or False"),
    (["--config=PLAIN"], "get_config() returned a dict, not an ml_collections.ConfigDict"),  # (KeyError)
])
def test_a_flag_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "plain.py").write_text("def get_config():\n    return {'epochs': 1}\n")
    args = [a.replace("PLAIN", str(tmp_path / "plain.py")) for a in args]
    done = run("train.py", "--workdir", str(tmp_path / "run"), *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_usage_error_loads_no_library_the_check_does_not_need(tmp_path):
    """A config that cannot train is said before scikit-learn, matplotlib, tensorboardX or torch
    load (about 3 s instead of 9 on this machine): they are imported where they are used."""
    code = ("import runpy, sys\n"
            "sys.argv = ['train.py', '--workdir', sys.argv[1], '--config.lr=0.0']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    heavy = {'torch', 'sklearn', 'matplotlib', 'tensorboardX'}\n"
            "    print(e.code, *sorted(heavy & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.stdout.split() == ["2"], (done.stdout, done.stderr[-3000:])
    assert "config.lr must be a finite number > 0" in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=-8", "config.batch_size must be an integer in [1, 1048576], got -8; set "
                               "--config.batch_size"),
    ("--config.batch_size=0", "config.batch_size must be an integer in [1, 1048576], got 0"),
    ("--config.lr=0.0", "config.lr must be a finite number > 0, got 0.0"),
    ("--config.lr=inf", "config.lr must be a finite number > 0, got inf"),
    ("--config.model.arch=resnet9", "config.model.arch must be one of 'resnet18', "),  # (a traceback before)
    ("--config.input.pipeline=bogus", "config.input.pipeline must be one of 'memory', 'stream', got 'bogus'"),
    ("--config.clustering.num_clusters=(4,8,20)", "config.clustering.num_clusters must shrink level by"),
    ("--config.queue_size=100", "queue_size 100 is not a multiple of the global batch 64"),
    ("--config.objective.semantics=wrong", "semantics"),
    ("--config.clustering.num_clusters=(5000,)",  # (the workdir was created before: it needs the data)
     "config.clustering.num_clusters = 5000 exceeds the 1437 training images of digits:train"),
    ("--config.lr_warmup_epochs=3", "config.lr_warmup_epochs (3) must be smaller than config.epochs (3)"),
    ("--config.init_encoder=WORKDIR", "config.init_encoder is WORKDIR, the workdir this run would write"),
    ("--config.init_encoder=/nonexistent",  # (25 lines, the workdir created)
     "config.init_encoder: /nonexistent is neither a training workdir (with checkpoints/) nor an exported "
     "encoder"),
])
def test_a_config_that_cannot_train_is_one_line_exit_2_and_nothing_written(tmp_path, override, message):
    override, message = (x.replace("WORKDIR", str(tmp_path / "run")) for x in (override, message))
    done = run("train.py", "--config=configs/digits.py:runlocal", override, f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("--config.evals.knn.ks=(0,)", "config.evals.knn.ks must be a tuple of 1 or more entries, each an"),
    ("--config.evals.knn.temperature=-1.0", "config.evals.knn.temperature must be"),
    ("--config.evals.knn.test_block=0", "config.evals.knn.test_block must be an integer in [1, "),
])
def test_an_eval_entry_that_cannot_run_is_one_line_exit_2_before_the_checkpoint_is_read(tmp_path, override,
                                                                                        message):
    """eval.py checks the entry it runs with the rules of its evaluator module (`SETTINGS`), as
    train.py checks a run's entries, before it reads the checkpoint or writes anything."""
    done = run("eval.py", "--eval=knn", f"--checkpoint={tmp_path / 'none'}", override)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


OLD_TRAIN_CONFIG = """
from configs import digits

def get_config():
    c = digits.get_config()
    c.eval.num_clusters = (10,)  # before config.evals.summary
    return c
"""

@pytest.mark.parametrize("script,args,message", [
    ("eval.py", ["--config.knn.ks=(5,)"],
     "eval.py: error: --config.knn.ks: config has no field 'knn'; known: "),
    ("train.py", ["--config=OLD"],
     "OLD: config.eval is not a field of the config it starts from; did you mean config.evals?"),
])
def test_a_field_the_config_lacks_is_one_line_with_the_closest_name(tmp_path, script, args, message):
    """An override of a field the config does not have, or a config file that sets one on the
    config it starts from (here `knn` and `eval`, which became `config.evals` entries before
    0.1.0), is exit 2 in one line, with the closest known name or the known ones."""
    old = tmp_path / "old.py"
    old.write_text(OLD_TRAIN_CONFIG)
    args, message = [a.replace("OLD", str(old)) for a in args], message.replace("OLD", str(old))
    more = ["--workdir", str(tmp_path / "run")] if script == "train.py" else ["--eval=knn", "--checkpoint=x"]
    done = run(script, *args, *more, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    ([], "pass --eval=NAME, an entry of the config's evals: cluster, knn, linear, linear_fast, semisup, "
         "summary, voc"),
    (["--eval=nope"], "--eval=nope: the config has no evals.nope; known: cluster, knn"),
    (["--eval=knn", "--mode=linear"], "--eval=knn and --mode=linear disagree"),
])
def test_eval_names_an_entry_of_the_configs_evals(tmp_path, args, message):
    done = run("eval.py", *args, f"--checkpoint={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def train_only_copy(tmp_path_factory):
    """A prepared copy that has a train split and no eval split."""
    from PIL import Image

    from hcsc_jax.data import prepare

    root = tmp_path_factory.mktemp("train_only")
    (root / "images" / "ant").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / "ant" / "a.png")
    prepare.prepare(f"folder:{root / 'images'}", "train", root / "copy")
    return root / "copy"


@pytest.mark.parametrize("args,message", [
    (["--config=configs/digits.py:runlocal", "--config.dataset=mnist"],
     "unknown dataset 'mnist'; registered: digits, fashion_mnist, folder, prepared, tfds"),
    (["--config=configs/fashion_mnist.py:runlocal", "--config.data_dir=/nonexistent/dir"],
     "Fashion-MNIST not found: /nonexistent/dir lacks train-images-idx3-ubyte"),
    (["--config=configs/cifar10.py:runlocal", "--config.data_dir=TMP/tfds"],
     "TFDS dataset 'cifar10' is not prepared in TMP/tfds"),
    (["--config=configs/digits.py:runlocal", "--config.dataset=folder:/nonexistent/images"],
     "image folder '/nonexistent/images' does not exist"),
    (["--config=configs/digits.py:runlocal", "--config.dataset=prepared:COPY",
      "--config.eval_split=validation"],
     "prepared dataset 'COPY' has no split 'validation' (splits: train)"),
], ids=["unknown", "missing_data_dir", "unprepared_tfds", "missing_folder", "no_eval_split"])
def test_data_that_cannot_be_read_is_one_line_exit_1_and_nothing_written(tmp_path, train_only_copy, args,
                                                                          message):
    """Each was a 30-70-line traceback after the workdir was made (the missing eval split: after a
    whole epoch)."""
    fill = lambda text: text.replace("TMP", str(tmp_path)).replace("COPY", str(train_only_copy))
    done = run("train.py", *map(fill, args), f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert fill(message) in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("checkpoint,message", [
    ("missing", "checkpoint path TMP/missing does not exist"),
    ("not_a_run", "TMP/not_a_run is not a train.py run (it has no checkpoints/) nor an exported encoder"),
])
def test_eval_of_a_path_that_is_not_a_run_is_one_line_and_creates_nothing(tmp_path, checkpoint, message):
    """It said "no training config.json ..." and created <path>/eval/."""
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "notes.py").write_text("")
    done = run("eval.py", "--eval=knn", f"--checkpoint={tmp_path / checkpoint}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert message.replace("TMP", str(tmp_path)) in done.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["not_a_run", "notes.py"]


@pytest.mark.slow
def test_a_resume_no_checkpoint_of_which_restores_is_one_line_exit_1(tmp_path, digits_run):
    """Its config.json deleted and the model changed: every step fails to restore (other shapes).
    Was a NoReadableStep traceback and 212 lines of Orbax's futures; now a warning a step and one
    error line naming the newest step's reason, and the checkpoints are left as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    (run_dir / "config.json").unlink()
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    done = run("train.py", "--config=configs/digits.py:runlocal", f"--workdir={run_dir}", "--config.epochs=4",
               "--config.model.width=0.25")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if "workdir:" not in line]
    assert len(lines) == 1 + len([s for s in steps if s.isdigit()]), lines
    assert "checkpoints could be restored (steps [" in lines[-1]
    assert "is not compatible with the stored shape" in lines[-1]
    assert "resume with the model that wrote them" in lines[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == steps


def test_a_tuple_field_given_one_value_is_accepted_and_said(tmp_path):
    """--config.clustering.num_clusters=60 was silently the single level (60,)."""
    done = run("train.py", "--config=configs/digits.py:runlocal", "--config.clustering.num_clusters=60",
               "--config.evals.knn.ks=(5,)", f"--workdir={tmp_path / 'run'}", "--only_check_args")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "train.py: note: --config.clustering.num_clusters=60 is the tuple (60,)"]
