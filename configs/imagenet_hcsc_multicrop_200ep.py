"""HCSC with multi-crop on ImageNet-1k, 200 epochs (spec §6; linear 73.3, kNN 66.6 in the
paper): the single-crop settings plus four local views at 192/160/128/96 px through the query
encoder, each adding a local InfoNCE and a local PCSC term.

  python train.py --config configs/imagenet_hcsc_multicrop_200ep.py --workdir /shared/runs/hcsc_mc
"""

from configs import imagenet_hcsc_200ep


def get_config():
    c = imagenet_hcsc_200ep.get_config()
    c.augment.local_views = ((192, (0.172, 0.86)), (160, (0.143, 0.715)), (128, (0.114, 0.571)),
                             (96, (0.086, 0.429)))
    # The authors' main_hcsc.py default: local views use plain InfoNCE (no instance selection).
    c.objective.selection_on_local = False
    return c
