"""Evaluation settings for eval.py (docs/method.md §7 protocols), sized for scikit-learn's digits.

Data fields left unset (None) are read from the training run's config.json when --checkpoint
is a train.py workdir; for an exported encoder without config.json set them on the command line:

  python eval.py --eval=knn --checkpoint=runs/digits
  python eval.py --eval=knn --checkpoint=exported --config.dataset=digits --config.image_size=16 \
      --config.mean="(0.5,)" --config.std="(0.5,)"
  python eval.py --config=configs/eval_digits.py:runlocal --eval=linear --checkpoint=runs/digits  # smoke run
  python eval.py --eval=summary --checkpoint=runs/digits   # summary.json's numbers again

The evaluators are `config.evals` entries, the schema of the training configs' (configs/default.py):
name -> {type (the protocol, hcsc_jax/evaluators/; default: the name), its settings}; --eval=NAME
runs one (`every_epochs` only matters in training). Other settings of a protocol under another
name: a config file that adds e.g. `c.evals.knn500 = dict(c.evals.knn, type="knn", ks=(500,))`.

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

    # The evaluators (hcsc_jax/evaluators/): name -> {type (default: the name), settings}.
    c.evals = ml_collections.ConfigDict()
    # kNN: weighted by exp(sim / T); chunks bound the device memory (hcsc_jax/evaluators/knn.py).
    c.evals.knn = dict(ks=(10, 20, 100, 200), temperature=0.07, train_chunk=16384, test_block=1024)

    # Linear classifier (frozen encoder, inference mode); resumable every N steps (0: epoch ends).
    # linear_fast: the same classifier and settings on cached center-crop features (a quick read).
    linear = dict(epochs=100, lr=5.0, batch_size=256, milestones=(60, 80), gamma=0.1, momentum=0.9,
                  scale=(0.08, 1.0), flip=True, checkpoint_every_steps=0)
    c.evals.linear = dict(linear)
    c.evals.linear_fast = dict(linear, type="linear_fast")

    # Semi-supervised: fine-tune encoder + linear head on the images of `split_file` or, without
    # one, a class-balanced `fraction` of the training labels; whole-batch BN in train mode.
    c.evals.semisup = dict(
        split_file=config_dict.placeholder(str), fraction=0.1, epochs=70, trunk_lr=0.005, head_lr=0.02,
        batch_size=256, milestones=(30, 60), gamma=0.1, momentum=0.9, scale=(0.08, 1.0), flip=True)

    # k-means on the frozen features (ImageNet uses 1000 and 25000); no subsampling at this size.
    c.evals.cluster = dict(ks=(10, 50, 100), niter=20, nredo=1, max_points_per_centroid=1_000_000)

    # VOC07 transfer: linear SVMs on frozen features (needs a prepared TFDS voc/2007).
    c.evals.voc = dict(dataset="tfds:voc/2007", train_split="train+validation", test_split="test",
                       image_size=224, costs=(0.01, 0.1, 1.0, 10.0), folds=3)

    # A training run's summary.json (evaluators/summary.py; needs a train.py workdir: the key
    # encoder and config.json). Settings left unset (None) are the run's own summary entry's.
    c.evals.summary = dict(knn_k=config_dict.placeholder(int), knn_temperature=config_dict.placeholder(float),
                           num_clusters=config_dict.placeholder(tuple))
    if "runlocal" in chosen:
        c.progress_bar = False
        c.evals.knn.ks = (5, 20)
        for name in ("linear", "linear_fast", "semisup"):
            c.evals[name].update(epochs=2, milestones=(1,))
        c.evals.cluster.ks = (10,)
        c.evals.voc.update(image_size=32, costs=(1.0,), folds=2)
    return c
