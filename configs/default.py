"""Defaults shared by every config: the published HCSC ImageNet settings (docs/method.md §6).

Dataset configs start from `get_config()` here and override what differs. Each field is declared
once, in hcsc_jax/run/config_fields.py (`FIELDS`): its default, what it means, the values it
accepts and whether a resumed run may change it; train.py's `--config.help` lists them as a
config has them.
"""

import ml_collections

from hcsc_jax.run import config_fields


def get_config() -> ml_collections.ConfigDict:
    return config_fields.defaults()
