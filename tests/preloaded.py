"""`python script args` for the many short train.py / eval.py commands of tests/test_cli.py (usage
errors, dry runs, one-line failures), each in a child forked from one server process that has
already imported what the scripts import: the same code path, the same exit status and output,
without the ~2.5 s of imports each fresh start costs (about 80 commands). jax's backends are not
started in the server, so each child starts its own with its own XLA_FLAGS.

What a fresh interpreter would do differently, the import itself, is tested where it matters by
fresh processes: test_cli.py's `test_a_usage_error_loads_no_library_the_check_does_not_need` and
every test that starts train.py / eval.py with subprocess (test_trainer.py, test_stream_run.py...).
Commands that start loader workers or several processes do not come here.

Run as a script, this file is the server: one JSON request per line on stdin,
  {"script": path, "args": [...], "cwd": dir, "env": {...}},
one JSON reply per line on stdout, {"returncode": n, "stdout": text, "stderr": text}.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What train.py's and eval.py's `main` import before their checks.
PRELOAD = ("hcsc_jax.distributed", "hcsc_jax.data.sources", "hcsc_jax.evaluators", "hcsc_jax.sharding",
           "hcsc_jax.run.config_checks", "hcsc_jax.run.failures", "hcsc_jax.run.resume",
           "hcsc_jax.run.trainer", "hcsc_jax.run.workdir", "hcsc_jax.run.checkpoints")


def _child(request: dict, out: int, err: int):
    """In the forked child: `python script args` in the request's directory and environment, ended
    as the interpreter ends it (exit status, atexit handlers, flushed streams) but for the teardown
    of every module, which writes nothing and took 0.6 s of each command."""
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        script = os.path.abspath(request["script"])
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(script)  # as `python script` sets it
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter reports it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()  # (CPython's: what the interpreter runs at exit)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve():
    sys.path[0] = ROOT  # this checkout's package, as `python train.py` from ROOT finds it
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                _child(request, out.fileno(), err.fileno())
            _, status = os.waitpid(pid, 0)
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0],
                          "stderr": texts[1]}), flush=True)


_server: subprocess.Popen | None = None
_server_jax_env: dict = {}


def _stop():
    global _server
    if _server is not None:
        try:
            os.killpg(_server.pid, signal.SIGKILL)  # (its child too, should one still run)
        except ProcessLookupError:
            pass
        _server.wait()
        _server = None


atexit.register(_stop)


def run(script: str, args, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python script args` (in `cwd`, with `env`) as subprocess.run(..., capture_output=True,
    text=True) returns it, run in a child of this process's server (started at the first call,
    with `env`: the JAX_* settings jax reads at import must be the ones the commands use)."""
    global _server, _server_jax_env
    jax_env = {k: v for k, v in env.items() if k.startswith("JAX_")}
    if _server is None:
        _server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                   start_new_session=True)
        _server_jax_env = jax_env
    assert jax_env == _server_jax_env, "the server imported jax with other JAX_* settings"
    request = {"script": script, "args": list(args), "cwd": str(cwd), "env": env}
    _server.stdin.write(json.dumps(request) + "\n")
    _server.stdin.flush()
    with selectors.DefaultSelector() as sel:
        sel.register(_server.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            _stop()
            raise subprocess.TimeoutExpired([script, *args], timeout)
    line = _server.stdout.readline()
    if not line:
        _stop()
        raise RuntimeError("tests/preloaded.py's server ended")
    reply = json.loads(line)
    return subprocess.CompletedProcess([script, *args], reply["returncode"], reply["stdout"], reply["stderr"])


if __name__ == "__main__":
    serve()
