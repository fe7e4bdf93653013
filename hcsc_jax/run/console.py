"""Console logging and flag parsing for the command-line tools: our messages at INFO, everyone
else's at WARNING; a flag or config that cannot be read is one line and exit status 2."""

import difflib
import logging
import os
import re
import sys
import warnings

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags

USAGE_ERROR = 2  # the exit status of a command line that cannot run as given
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
_CONFIG_DEFAULTS: dict[str, str] = {}  # config flag name -> its default file, applied by parse_flags

def _in_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


class _RaisedToTheCaller(logging.Filter):
    """Drops Orbax's error records: its background save threads log a failed save (a full disk)
    with a traceback, hundreds of lines for one error, which they then raise to the caller, which
    reports it in one line (`failures.keeping_saves`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not _in_orbax(record.pathname)


class _OrbaxLeftovers(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of Orbax's own futures: a restore
    that fails (a checkpoint of other shapes) leaves its other reads failed the same way, each
    logged with a traceback at exit (hundreds of lines); the failure reaches the caller once."""

    def filter(self, record: logging.LogRecord) -> bool:
        tb = record.exc_info[1].__traceback__ if record.exc_info and record.exc_info[1] else None
        while tb is not None:
            if _in_orbax(tb.tb_frame.f_code.co_filename):
                return False
            tb = tb.tb_next
        return True


def _quiet_closed_loop(hook):
    """sys.unraisablehook `hook`, but silent for "Event loop is closed": after a save failed,
    tensorstore's callbacks of its other writes can still try to wake Orbax's closed event loop
    (an error nobody can catch, printed with a traceback; the failure itself is reported); and for
    Orbax's coroutines whose error is the failed restore the caller reports."""

    def unraisable(u):
        closed = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        code = getattr(u.object, "cr_code", None)  # a coroutine of Orbax's restore left behind by its error
        orbax = code is not None and _in_orbax(code.co_filename)
        if not (closed or orbax):
            hook(u)

    return unraisable


def setup() -> logging.Logger:
    """Quiets Orbax and faiss (they log every save and load at INFO; Orbax's errors reach the
    caller, which reports them) and returns the `hcsc_jax` logger, printing `HH:MM:SS message`
    lines."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(_RaisedToTheCaller())  # (Orbax logs through absl)
    logging.getLogger("asyncio").addFilter(_OrbaxLeftovers())
    # ... and the coroutines of that failed restore collected unawaited (this project has none of
    # its own): "RuntimeWarning: coroutine '_read_array_index_and_device_put' was never awaited"
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    logging.getLogger().setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("hcsc_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    return ours


def usage_error(message: str):
    """Prints `<program>: error: <message>` as one line on stderr and exits with status 2."""
    line = " ".join(str(message).split())
    print(f"{os.path.basename(sys.argv[0])}: error: {line}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def define_config(name: str, default: str, help_string: str):
    """`config_flags.DEFINE_config_file` whose default file is loaded by `parse_flags`, not at
    import (where an error in it or in an override would be a traceback)."""
    _CONFIG_DEFAULTS[name] = default
    return config_flags.DEFINE_config_file(name, None, f"{help_string} Default: {default}", lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with every config flag
    loaded and its overrides applied here: --help exits 0; an unknown flag or config field, a bad
    value or a missing config file exits 2 with one line saying what to change."""
    for name, default in _CONFIG_DEFAULTS.items():
        if config_argument(argv, name) is None:
            argv = [argv[0], f"--{name}={default}", *argv[1:]]
    asked = [a for a in argv[1:] if a.startswith("--") and a.partition("=")[0].endswith(".help")]
    argv = [a for a in argv if a not in asked]
    sys.argv = [a for a in sys.argv if a not in asked]  # config_flags reads its overrides from sys.argv
    try:
        rest = flags.FLAGS(argv)
        if len(rest) > 1:
            dashes = " (every argument after a bare -- is one: drop it)" if "--" in argv else ""
            usage_error(f"unexpected arguments {' '.join(rest[1:])}{dashes}; this command takes flags only "
                        "(--name=value, --config.field=value; --help lists them)")
        for name in _config_flags():
            value = flags.FLAGS[name].value
            getattr(value, "keys", None)  # a config file that failed to load raises here
            if not isinstance(value, ml_collections.ConfigDict):
                usage_error(f"{config_argument(argv, name)}: get_config() returned a {type(value).__name__}, "
                            "not an ml_collections.ConfigDict; start from configs/default.py's get_config()")
            _say_scalar_tuples(argv, name, value)
        for arg in asked:  # --config.help: the fields of that config, as loaded, and what each takes
            name = arg[2:].partition("=")[0][:-len(".help")]
            if name not in _config_flags():
                usage_error(f"{arg}: no config flag --{name}; --help lists the flags")
            print(describe_fields(flags.FLAGS[name].value, name))
        if asked:
            sys.exit(0)
        return rest
    except SystemExit as done:
        if done.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)  # absl exits 1 after printing the help that was asked for
        raise
    except Exception as err:  # noqa: BLE001 - flags, config files and overrides raise anything
        usage_error(explain(argv, err))


def describe_fields(config, name: str = "config") -> str:
    """Every field of `config` (after its variant and overrides), its value and what it accepts
    (`config_checks`' rule), one per line: what `--config.help` prints."""
    from hcsc_jax.run import config_checks  # (heavy: only for --config.help, so --help stays fast)

    lines = [f"Fields of --{name} as loaded (set one with --{name}.FIELD=VALUE):"]
    for field, value in config_checks.fields(config.to_dict()):
        rule = config_checks.rule_for(config, field)
        lines.append(f"  {name}.{field} = {value!r}" + (f"  # {rule.what}" if rule else ""))
    return "\n".join(lines)


def _config_flags() -> list[str]:
    return [name for name, flag in flags.FLAGS._flags().items()
            if config_flags.is_config_flag(flag) and name == flag.name]


def explain(argv: list[str], err: Exception) -> str:
    """One line for a command line that failed to parse with `err`: the config file that does not
    exist, the overridden field that is not in the config (with the closest name), or the last
    line of the error."""
    for name in _config_flags():
        path = config_argument(argv, name)
        file = path.split(":", 1)[0]
        if not os.path.isfile(file):
            return f"config file {file} does not exist; pass --{name}=an existing file (see configs/)"
        try:
            config = config_flags.ConfigFileFlagParser(name).parse(path)
        except Exception as load_err:  # noqa: BLE001 - the config file's own error
            return _missing_key(path, load_err) or last_line(load_err)
        for field in overrides(argv, name):
            missing = unknown_field(config, field)
            if missing:
                return f"--{name}.{field}: {missing}"
    return last_line(err)


def _missing_key(path: str, err: Exception) -> str | None:
    """One line for a config file that sets a field the config it starts from lacks (ml_collections
    raises a KeyError or AttributeError: "'eval'\\nDid you mean "evals" instead of "eval"?")."""
    key = re.match(r"""^[\\"']*(\w+)[\\"']*(?:\\n|\n|$)""", str(err))
    if not isinstance(err, (KeyError, AttributeError)) or not key:
        return None
    close = re.search(r'Did you mean "(\w+)"', str(err))
    return (f"{path}: config.{key.group(1)} is not a field of the config it starts from"
            + (f"; did you mean config.{close.group(1)}?" if close else ""))


def last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else type(err).__name__
    # ml_collections words a bad boolean as a tuple: "flag --config.x=no: ('Non-boolean argument
    # to boolean flag', 'no')"
    tuple_ = re.fullmatch(r"(.*): \('Non-boolean argument to boolean flag', (.*)\)", line)
    if tuple_:
        return f"{tuple_.group(1)}: {tuple_.group(2)} is not a boolean; use True or False (or 1 / 0)"
    return line


def config_argument(argv: list[str], name: str) -> str | None:
    """The value of --name (as `--name=V` or `--name V`) in `argv`, the last one given."""
    value = None
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
        elif re.match(rf"^--?{name}=", arg):
            value = arg.split("=", 1)[1]
    return value


def _say_scalar_tuples(argv: list[str], name: str, config) -> None:
    """One note per override of a tuple field given as one value (`--config.clustering.num_clusters=60`
    is the single level (60,)): accepted, and said."""
    for arg in argv:
        m = re.match(rf"^--?{name}\.([^=]+)=(.*)$", arg)
        if not m or m.group(2).strip()[:1] in "([":
            continue
        try:
            node = config
            for key in m.group(1).split("."):
                node = node[key]
        except (KeyError, AttributeError, TypeError):
            continue
        if isinstance(node, tuple | list):
            print(f"{os.path.basename(sys.argv[0])}: note: {arg} is the tuple {tuple(node)}", file=sys.stderr)


def overrides(argv: list[str], name: str) -> list[str]:
    """The dotted field names of the --name.FIELD=... overrides in `argv`."""
    found = [re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg) for arg in argv]
    return [m.group(1) for m in found if m]


def unknown_field(config, field: str) -> str | None:
    """None when the dotted `field` is in `config`, else what is wrong with it: the closest known
    name (difflib)."""
    node, done = config, []
    for part in field.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = "config" + "".join(f".{d}" for d in done)
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else f"; known: {', '.join(sorted(keys))}"
            return f"{where} has no field {part!r}{hint}"
        node, done = node[part], done + [part]
    return None
