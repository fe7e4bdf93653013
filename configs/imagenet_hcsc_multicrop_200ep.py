"""HCSC with multi-crop on ImageNet-1k, 200 epochs (docs/method.md §6; linear 73.3, kNN 66.6 in the
paper): the single-crop settings plus four local views at 192/160/128/96 px through the query
encoder, each adding a local InfoNCE and a local PCSC term.

  python train.py --config configs/imagenet_hcsc_multicrop_200ep.py --workdir /shared/runs/hcsc_mc
  python train.py --config configs/imagenet_hcsc_multicrop_200ep.py:runlocal   # smoke run

Variants (comma-separated): "" (the run above); authors: as configs/imagenet_hcsc_200ep.py:authors;
runlocal: configs/imagenet_hcsc_200ep.py:runlocal (a tiny image
folder, /tmp/imagenet_tiny) with two local views scaled to its 32-px crops (the largest and the
smallest: 24 and 12 px; fewer views, less to compile).
"""

from configs import imagenet_hcsc_200ep, parse_variants

VARIANTS = ("", "authors", "runlocal")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "imagenet_hcsc_multicrop_200ep")
    c = imagenet_hcsc_200ep.get_config(",".join(sorted(chosen)))
    c.augment.local_views = ((192, (0.172, 0.86)), (160, (0.143, 0.715)), (128, (0.114, 0.571)),
                             (96, (0.086, 0.429)))
    # The authors' main_hcsc.py default: local views use plain InfoNCE (no instance selection).
    c.objective.selection_on_local = False
    if "runlocal" in chosen:  # the first and last views' scales, crops in proportion to 224 -> 32 px
        c.augment.local_views = ((24, (0.172, 0.86)), (12, (0.086, 0.429)))
    return c
