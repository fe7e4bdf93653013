"""MoCo v2 baseline on digits: the HCSC digits config with no prototypes (same budget).

  python train.py --config configs/digits_mocov2.py --workdir runs/digits_mocov2
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.clustering.num_clusters = ()  # no hierarchy: plain InfoNCE for every epoch
    c.objective.update(instance_selection=False, prototype_selection=False, proto_loss=False)
    return c
