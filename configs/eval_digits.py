"""Evaluation settings for eval.py (spec §7 protocols), sized for scikit-learn's digits.

Data fields left unset (None) are read from the training run's config.json when --checkpoint
is a train.py workdir; for an exported encoder without config.json set them on the command line:

  python eval.py --mode=knn --checkpoint=runs/digits
  python eval.py --mode=knn --checkpoint=exported --config.dataset=digits --config.image_size=16 \
      --config.mean="(0.5,)" --config.std="(0.5,)"
  python eval.py --config=configs/eval_digits.py:runlocal --mode=linear --checkpoint=runs/digits  # smoke run

Variants (`--config=configs/eval_digits.py:<variant>`): "" (the published protocols); runlocal:
every protocol shrunk to a smoke run (2 epochs of linear / semi-supervised training, small k).
"""

import ml_collections
from ml_collections import config_dict

from configs import parse_variants

VARIANTS = ("", "runlocal")

def get_config(arg=None) -> ml_collections.ConfigDict:
    chosen = parse_variants(arg, VARIANTS, "eval_digits")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data: None = taken from <checkpoint>/config.json (dataset, splits, image_size, augment.mean/std,
    # input.pipeline / num_workers / prefetch / bad_images).
    c.dataset = config_dict.placeholder(str)
    c.data_dir = config_dict.placeholder(str)
    c.train_split = config_dict.placeholder(str)
    c.eval_split = config_dict.placeholder(str)
    c.image_size = config_dict.placeholder(int)
    c.mean = config_dict.placeholder(tuple)
    c.std = config_dict.placeholder(tuple)
    c.pipeline = config_dict.placeholder(str)  # "memory" or "stream"
    c.num_workers = config_dict.placeholder(int)
    c.prefetch = config_dict.placeholder(int)
    c.bad_images = config_dict.placeholder(str)  # "skip" or "error"
    c.expect_arch = config_dict.placeholder(str)  # e.g. "resnet50": refuse other checkpoints
    c.embed_batch = 256
    c.progress_bar = True

    # kNN: weighted by exp(sim / T); chunks bound the device memory (hcsc_jax/evaluators/knn.py).
    c.knn = ml_collections.ConfigDict(dict(ks=(10, 20, 100, 200), temperature=0.07, train_chunk=16384,
                                           test_block=1024))

    # Linear classifier (frozen encoder, inference mode); resumable every N steps (0: epoch ends).
    c.linear = ml_collections.ConfigDict(dict(
        epochs=100, lr=5.0, batch_size=256, milestones=(60, 80), gamma=0.1, momentum=0.9,
        scale=(0.08, 1.0), flip=True, checkpoint_every_steps=0))

    # Semi-supervised: fine-tune encoder + linear head on the images of `split_file` or, without
    # one, a class-balanced `fraction` of the training labels; whole-batch BN in train mode.
    c.semisup = ml_collections.ConfigDict(dict(
        split_file=config_dict.placeholder(str), fraction=0.1, epochs=70, trunk_lr=0.005, head_lr=0.02,
        batch_size=256, milestones=(30, 60), gamma=0.1, momentum=0.9, scale=(0.08, 1.0), flip=True))

    # k-means on the frozen features (ImageNet uses 1000 and 25000); no subsampling at this size.
    c.cluster = ml_collections.ConfigDict(dict(ks=(10, 50, 100), niter=20, nredo=1,
                                               max_points_per_centroid=1_000_000))

    # VOC07 transfer: linear SVMs on frozen features (needs a prepared TFDS voc/2007).
    c.voc = ml_collections.ConfigDict(dict(
        dataset="tfds:voc/2007", train_split="train+validation", test_split="test", image_size=224,
        costs=(0.01, 0.1, 1.0, 10.0), folds=3))
    if "runlocal" in chosen:
        c.progress_bar = False
        c.knn.ks = (5, 20)
        c.linear.update(epochs=2, milestones=(1,))
        c.semisup.update(epochs=2, milestones=(1,))
        c.cluster.ks = (10,)
        c.voc.update(image_size=32, costs=(1.0,), folds=2)
    return c
