"""HCSC on ImageNet-1k, 200 epochs, the published single-crop settings (docs/method.md §6; linear 69.2,
kNN 60.7 in the paper): ResNet-50, batch 256, lr 0.03, queue 16384, 20 warm-up epochs, levels
3000/2000/1000, MoCo v2 augmentation at 224 px.

ImageNet is prepared by the user (`tfds build imagenet2012 --file_format=array_record
--manual_dir=...`, or an image folder: `--config.dataset=folder:/data/imagenet` with
`--config.train_split=train --config.eval_split=val`). Streaming input, bfloat16 compute with
float32 parameters / statistics / loss, k-means on the accelerators.

  python train.py --config configs/imagenet_hcsc_200ep.py --workdir /shared/runs/hcsc_200ep \
      --config.data_dir=~/tensorflow_datasets
  python train.py --config configs/imagenet_hcsc_200ep.py:runlocal   # smoke run, see below

Variants (`--config=configs/imagenet_hcsc_200ep.py:<variant>`, comma-separated): "" (the run above);
authors: the authors' training step for step (configs.apply_authors, docs/method.md §9; the compute
dtype stays bfloat16); runlocal: a
smoke run on a tiny image folder in ImageNet's layout, /tmp/imagenet_tiny (make it with
`python tests/imagenet_like.py`; 30 train images: one step per epoch), 2 epochs of a tiny
ResNet-50 at 32 px with levels 6 / 3, streamed, kNN after every epoch.
"""

from configs import apply_authors, default, parse_variants

VARIANTS = ("", "authors", "runlocal")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "imagenet_hcsc_200ep")
    c = default.get_config()  # the published settings
    c.dataset = "tfds:imagenet2012"
    c.model.dtype = "bfloat16"
    c.shuffle_bn_gather = "images"  # each chip runs the key encoder on its share (BENCHMARKS.md, pods)
    c.input.pipeline = "stream"
    c.evals.summary.num_clusters = (1000,)
    c.evals.knn = dict(every_epochs=10, ks=(20, 200), temperature=0.07)  # a kNN curve
    c.log_every_steps = 100
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 1000
    if "runlocal" in chosen:
        c.dataset = "folder:/tmp/imagenet_tiny"
        c.update(image_size=32, epochs=2, warmup_epochs=1, batch_size=16, bn_group_size=2, queue_size=32,
                 log_every_steps=1, checkpoint_every_epochs=1, checkpoint_every_steps=1, progress_bar=False)
        c.model.update(width=0.0625, embed_dim=16, hidden_dim=32)
        # "jax" even on a CPU: the smoke run goes through the k-means that "auto" picks on accelerators.
        c.clustering.update(num_clusters=(6, 3), niter=5, nredo=1, min_points_per_centroid=1, backend="jax")
        c.input.num_workers = 2
        c.evals.summary.update(knn_k=5, num_clusters=(3,))
        c.evals.knn.update(every_epochs=1, ks=(2, 5))
    if "authors" in chosen:
        apply_authors(c)
    return c
