"""What a config field accepts (`Rule`), the rule constructors and the bounds fields share:
declared here, below every module that declares fields (`config_fields`, the evaluators), so each
can say what its own settings take. A rule also holds the field's resume policy: whether a
resumed run may change it (`free`), and for a field added after runs had started, the value an
older config.json means by leaving it out (`added`); `resume` reads both from the rules."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field accepts: `ok(value)`, said as `what` ("an integer >= 1"); `example` is a value it
    accepts and `bad` (kind, value) pairs it refuses, one of each kind (for the tests)."""

    what: str
    ok: Callable[[Any], bool]
    example: Any
    bad: tuple[tuple[str, Any], ...]
    free: bool = False  # a resumed run may change it (logging, cadence, workers: not what is trained)
    added: bool = False  # added after runs had been started (`added`)
    before: Any = None  # with `added`: what a config.json written before the field existed means


def free(rule: Rule) -> Rule:
    """`rule`, for a field a resumed run may change: it does not change what the run trains."""
    return dataclasses.replace(rule, free=True)


def added(rule: Rule, before: Any) -> Rule:
    """`rule`, for a field added after runs had been started: a config.json without it means
    `before` (the behavior before the field existed), so such runs still resume."""
    if not rule.ok(before):
        raise ValueError(f"the value before {before!r} is not {rule.what}")
    return dataclasses.replace(rule, added=True, before=before)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(x) -> str:
    return str(x) if _is_int(x) else f"{x:g}"


def _range(min_, max_, above=None, below=None) -> str:
    """">= 1", "> 0", "in [0, 1)", ...: the bounds given (None: none)."""
    low = min_ if min_ is not None else above
    high = max_ if max_ is not None else below
    if low is not None and high is not None:
        return (f"in {'[' if min_ is not None else '('}{_fmt(low)}, {_fmt(high)}"
                f"{']' if max_ is not None else ')'}")
    if low is not None:
        return f"{'>=' if min_ is not None else '>'} {_fmt(low)}"
    return f"{'<=' if max_ is not None else '<'} {_fmt(high)}" if high is not None else ""


def integer(min: int | None = None, max: int | None = None, note: str = "") -> Rule:
    """An int (not a bool) in [min, max] (None: unbounded)."""
    what = " ".join(filter(None, ["an integer", _range(min, max), f"({note})" if note else ""]))
    bad = [("wrong type", "x"), ("wrong type", 1.5)]
    bad += [("out of range", min - 1)] if min is not None else []
    bad += [("out of range", max + 1)] if max is not None else []
    return Rule(what, lambda v: _is_int(v) and (min is None or v >= min) and (max is None or v <= max),
                min if min is not None else (max if max is not None else 0), tuple(bad))


def real(min: float | None = None, max: float | None = None, *, above: float | None = None,
         below: float | None = None, note: str = "") -> Rule:
    """A finite int or float with min <= v <= max, above < v < below (None: unbounded)."""
    what = " ".join(filter(None, ["a finite number", _range(min, max, above, below),
                                  f"({note})" if note else ""]))

    def ok(v) -> bool:
        return (_is_number(v) and (min is None or v >= min) and (max is None or v <= max)
                and (above is None or v > above) and (below is None or v < below))

    lo = min if min is not None else (above if above is not None else 0.0)
    hi = max if max is not None else (below if below is not None else lo + 2.0)
    bad = [("wrong type", "x"), ("wrong type", True), ("nan", math.nan), ("inf", math.inf),
           ("inf", -math.inf)]
    bad += [("out of range", min - 1 - abs(min))] if min is not None else []
    bad += [("out of range", above)] if above is not None else []
    bad += [("out of range", max + 1 + abs(max))] if max is not None else []
    bad += [("out of range", below)] if below is not None else []
    return Rule(what, ok, (lo + hi) / 2, tuple(bad))


def boolean() -> Rule:
    return Rule("True or False", lambda v: isinstance(v, bool), False,
                (("wrong type", "yes"), ("wrong type", 1)))


def choice(*options: str) -> Rule:
    return Rule(f"one of {', '.join(map(repr, options))}", lambda v: isinstance(v, str) and v in options,
                options[0], (("not a choice", "bogus"), ("wrong type", 3)))


def text() -> Rule:
    """A non-empty string (a path, a dataset or split name: their sources check what they name)."""
    return Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()), "x",
                (("wrong type", 5), ("empty", "")))


def optional(rule: Rule, note: str = "") -> Rule:
    """None, or what `rule` accepts."""
    return Rule(f"{rule.what} or None" + (f" ({note})" if note else ""),
                lambda v: v is None or rule.ok(v), None, rule.bad)


def tuple_of(item: Rule, min_len: int = 0, max_len: int | None = None) -> Rule:
    """A tuple (or list) of `min_len` to `max_len` entries, each accepted by `item`."""
    count = (f"{min_len} to {max_len}" if max_len is not None and max_len != min_len else
             f"{min_len}" if max_len is not None else f"{min_len} or more" if min_len else "any number of")
    bad = [("wrong type", "x"), *((f"entry {kind}", (value,)) for kind, value in item.bad)]
    bad += [("too short", ())] if min_len else []
    return Rule(f"a tuple of {count} entries, each {item.what}",
                lambda v: (isinstance(v, (tuple, list)) and len(v) >= min_len
                           and (max_len is None or len(v) <= max_len) and all(item.ok(x) for x in v)),
                (item.example,) * max(min_len, 1), tuple(bad))


def fixed(*items: Rule) -> Rule:
    """A tuple (or list) of len(items) entries, entry i accepted by items[i]."""
    example = tuple(r.example for r in items)
    bad = [("wrong type", "x"), ("too short", example[:-1])]
    bad += [(f"entry {i} {kind}", example[:i] + (value,) + example[i + 1:])
            for i, r in enumerate(items) for kind, value in r.bad[:1]]
    return Rule(f"a tuple ({', '.join(r.what for r in items)})",
                lambda v: (isinstance(v, (tuple, list)) and len(v) == len(items)
                           and all(r.ok(x) for r, x in zip(items, v))),
                example, tuple(bad))


def interval(lo: float, hi: float) -> Rule:
    """A pair (a, b) with lo < a <= b <= hi: a range of crop scales."""
    return Rule(f"a pair (lo, hi) with {lo:g} < lo <= hi <= {hi:g}",
                lambda v: (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v))
                           and lo < v[0] <= v[1] <= hi),
                ((lo + hi) / 2, hi),
                (("wrong type", "x"), ("too short", ()), ("not ordered", (0.9 * hi, 0.1 * hi)),
                 ("out of range", (lo - 1, hi + 4)), ("nan", (math.nan, hi))))


# ---- Bounds, each with its reason ----
# Epochs: 10**5 is 500 times ImageNet's 200 (and keeps the clustering seed below 2**31, see SEED).
MAX_EPOCHS = 10**5
# faiss and NumPy take 32-bit seeds; an epoch's k-means seed (clustering.epoch_seed) is at most
# seed + 1000 x epoch, plus the level, < 2**31.
SEED = integer(0, 2**31 - 1 - 1000 * MAX_EPOCHS)
# Image sides: 8 px is digits' own size (a small-stem ResNet's stride-8 map is then 1x1); 4096 px
# is 18x ImageNet's 224 (a batch of 256 such float32 views is 48 GiB).
SIDE = integer(8, 4096)
# Multi-crop's local views are smaller crops (96 of 224 px; 4 of digits' 8 in the tests): below 4 px
# a 3x3 convolution sees mostly its zero padding.
LOCAL_SIDE = integer(4, 4096)
# A batch or group beyond 2**20 images does not fit any device (ImageNet recipes: 256 to 4096).
BATCH = integer(1, 2**20)
# The queue: 2**24 keys x 128 dims float32 are 8 GiB on every device, 13x ImageNet's 1.28M images.
QUEUE = integer(1, 2**24)
# Layer sizes: MoCo v3's head is 4096 wide; 2**16 x 2048 features is a 0.5 GiB layer.
DIM = integer(1, 2**16)
# Level and k sizes: 2**20 clusters or neighbours is 0.8x ImageNet's training set.
CLUSTERS = integer(1, 2**20)
# Softmax temperatures (MoCo's 0.07 to 0.2) scale the logits of unit vectors by 1/T: below 1e-3
# they span 2000 and the softmax is one-hot (float32 exp underflows below -87), above 1e3 they stay
# within 1e-3 of each other and it is uniform.
TEMPERATURE = real(1e-3, 1e3)
# Iterations and restarts of k-means: faiss's defaults are 25 and 1; 10**5 iterations of ImageNet's
# 3000 clusters take days on any host.
NITER, NREDO = integer(1, 10**5), integer(1, 1000)
PROBABILITY = real(0, 1)
# Loader workers and prefetch: 1024 is more than any host's cores.
WORKERS = integer(-1, 1024, note="-1: one per core but one, 0: in the training process")
STEPS = integer(0, note="0: off")
EVERY_EPOCHS = integer(0, note="0: after the last epoch only")
LEARNING_RATE = real(above=0)  # (no upper bound: the NaN stop and the divergence guard catch a diverging one)
MOMENTUM = real(0, below=1)  # (1: no decay of the old velocity, which grows without bound)
SCALE = interval(0, 1)  # random-resized-crop areas, as fractions of the image
# Normalization: 1 (gray) or 3 (RGB) channels; a std of 0 divides by 0.
MEAN = tuple_of(real(), 1, 3)
STD = tuple_of(real(above=0), 1, 3)

