"""Console logging for the command-line tools: our messages at INFO, everyone else's at WARNING."""

import logging

from absl import logging as absl_logging


def setup() -> logging.Logger:
    """Quiets Orbax and faiss (they log every save and load at INFO) and returns the
    `hcsc_jax` logger, printing `HH:MM:SS message` lines."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("hcsc_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    return ours
