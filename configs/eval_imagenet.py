"""The paper's evaluation of an ImageNet ResNet-50 (docs/method.md §7, the authors' eval_*.py scripts).

  python eval.py --config=configs/eval_imagenet.py --eval=knn    --checkpoint=RUN   # kNN, k 10/20/100/200
  python eval.py --config=configs/eval_imagenet.py --eval=linear --checkpoint=RUN   # linear, 100 epochs
  python eval.py --config=configs/eval_imagenet.py:semisup1  --eval=semisup --checkpoint=RUN   # 1% labels
  python eval.py --config=configs/eval_imagenet.py:semisup10 --eval=semisup --checkpoint=RUN   # 10% labels
  python eval.py --config=configs/eval_imagenet.py --eval=voc    --checkpoint=RUN   # VOC07 SVM mAP
  python eval.py --config=configs/eval_imagenet.py:places205 --eval=linear --checkpoint=RUN

Data: a prepared TFDS imagenet2012 (ArrayRecord) in --config.data_dir, or an image folder
(`--config.dataset=folder:/data/imagenet --config.eval_split=val`). `split_dir` holds the
authors' 1percent.txt / 10percent.txt (github.com/gyfastas/HCSC, the SimCLR subsets).
Streamed input: each host decodes its share; `num_workers` loader processes per host (-1: one per
core but one, 0: none).
"""

import ml_collections

from configs import eval_digits, one_of, parse_variants

VARIANTS = ("", "semisup1", "semisup10", "places205", "runlocal")  # comma-separated: semisup1,runlocal


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    chosen = parse_variants(arg, VARIANTS, "eval_imagenet")
    split = one_of(chosen, ("semisup1", "semisup10"), "eval_imagenet", None)
    c = eval_digits.get_config()
    c.dataset = "tfds:imagenet2012"
    c.train_split, c.eval_split = "train", "validation"
    c.image_size = 224  # resize 256 -> center crop 224 for features; RandomResizedCrop 224 for training
    c.mean, c.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    c.pipeline = "stream"
    c.expect_arch = "resnet50"
    c.embed_batch = 1024
    c.split_dir = "splits"  # where 1percent.txt / 10percent.txt are (--config.split_dir=...)
    for name in ("linear", "linear_fast"):  # the published protocol otherwise (eval_digits.py)
        c.evals[name].update(checkpoint_every_steps=1000)
    c.evals.cluster.update(ks=(1000, 25000), max_points_per_centroid=256)
    if split:
        c.evals.semisup.split_file = c.get_ref("split_dir") + f"/{split[len('semisup'):]}percent.txt"
    if "places205" in chosen:  # the same linear protocol on an image folder of Places205
        c.dataset, c.train_split, c.eval_split = "folder:/data/places205", "train", "val"
    if "runlocal" in chosen:  # smoke test: a tiny image folder, two epochs of everything
        c.dataset, c.eval_split, c.expect_arch = "folder:/tmp/imagenet_tiny", "val", None
        c.image_size, c.embed_batch = 32, 16
        c.evals.knn.ks = (2, 4)
        for name in ("linear", "linear_fast"):
            c.evals[name].update(epochs=2, batch_size=16, milestones=(1,), checkpoint_every_steps=1)
        c.evals.semisup.update(epochs=2, batch_size=16, milestones=(1,))
        c.evals.cluster.ks = (3,)
        c.evals.voc.update(image_size=32, costs=(1.0,), folds=2)
    return c
