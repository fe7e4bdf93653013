"""Evaluation settings for eval.py (spec §7 protocols), sized for scikit-learn's digits.

Data fields left unset (None) are read from the training run's config.json when --checkpoint
is a train.py workdir; for an exported encoder without config.json set them on the command line:

  python eval.py --mode=knn --checkpoint=runs/digits
  python eval.py --mode=knn --checkpoint=exported --config.dataset=digits --config.image_size=16 \
      --config.mean="(0.5,)" --config.std="(0.5,)"
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data: None = taken from <checkpoint>/config.json (dataset, splits, image_size, augment.mean/std).
    c.dataset = config_dict.placeholder(str)
    c.data_dir = config_dict.placeholder(str)
    c.train_split = config_dict.placeholder(str)
    c.eval_split = config_dict.placeholder(str)
    c.image_size = config_dict.placeholder(int)
    c.mean = config_dict.placeholder(tuple)
    c.std = config_dict.placeholder(tuple)
    c.embed_batch = 256
    c.cache_features = True
    c.progress_bar = True

    # kNN: weighted by exp(sim / T).
    c.knn_ks = (10, 20, 100, 200)
    c.knn_temperature = 0.07

    # Linear classifier (frozen encoder, inference mode).
    c.linear = ml_collections.ConfigDict(dict(
        epochs=100, lr=5.0, batch_size=256, milestones=(60, 80), gamma=0.1, momentum=0.9,
        scale=(0.08, 1.0), flip=True))

    # Semi-supervised: fine-tune encoder + linear head on a class-balanced `fraction` of the
    # training labels (spec: 1% / 10%), whole-batch BN in train mode.
    c.semisup = ml_collections.ConfigDict(dict(
        fraction=0.1, epochs=70, trunk_lr=0.005, head_lr=0.02, batch_size=256, milestones=(30, 60), gamma=0.1,
        momentum=0.9, scale=(0.08, 1.0), flip=True))

    # k-means on the frozen features (ImageNet uses 1000 and 25000).
    c.cluster = ml_collections.ConfigDict(dict(ks=(10, 50, 100), niter=20, nredo=1))
    return c
