"""HCSC and its baselines on Fashion-MNIST (60,000 28x28 gray images, 10 classes with a natural
hierarchy: tops / shoes / bags / trousers). Data: the Debian package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist`) or the four IDX files in --config.data_dir.
Variants (`--config=configs/fashion_mnist.py:<variant>`, comma-separated):

  python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist          # hcsc (default)
  python train.py --config configs/fashion_mnist.py:mocov2 --workdir runs/fashion_mnist_mocov2
  python train.py --config configs/fashion_mnist.py:pcl --workdir runs/fashion_mnist_pcl
  python train.py --config configs/fashion_mnist.py:vit --workdir runs/fashion_mnist_vit

- hcsc: HCSC, paper semantics, levels 200 / 50 / 10.
- mocov2: the same budget without prototypes or selection.
- pcl: PCL at the same budget (200 / 50 / 10 clusters): independent flat k-means clusterings,
  ProtoNCE against r = 64 sampled negative prototypes per clustering (32% of the finest
  clustering; PCL's 16384 is 16-66% of its clusterings), PCL's code semantics, no selection
  (configs/digits.py explains the choices).
- cpu: a budget for a 2-core CPU (<= 15 minutes a run): the first 15,000 training images
  (the test split stays whole), 16 px, ResNet-18 at width 0.25, 18 epochs (4 warm-up), batch 64
  (lr 0.12 per 256 images), queue 4096, levels 50 / 16 / 4 (PCL: r = 16); combines with the
  methods (`cpu,pcl`).
- authors: the authors' training step for step (configs.apply_authors, docs/method.md §9); combines with
  the methods and cpu (`cpu,mocov2,authors`).
- vit: the encoder is ViT-S with 4-px patches (vit_s4: 384 dims, 6 heads, 12 blocks; a 7x7 grid
  at 28 px) trained with MoCo v3's ViT recipe (AdamW, weight decay 0.1, 10 epochs of linear lr
  warm-up, no ShuffleBN); combines with the methods. Not tuned.
- runlocal: a smoke run on four tiny IDX files in /tmp/fashion_mnist_tiny (make them with
  `python tests/imagenet_like.py`): 2 epochs of a tiny model at 16 px; combines with the others
  (vit,runlocal: 2 blocks at width 1/8).
"""

from configs import apply_authors, apply_method, apply_vit, default, one_of, parse_variants

VARIANTS = ("hcsc", "mocov2", "pcl", "cpu", "authors", "vit", "runlocal")
METHODS = ("hcsc", "mocov2", "pcl")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "fashion_mnist")
    method = one_of(chosen, METHODS, "fashion_mnist", "hcsc")
    c = default.get_config()
    c.dataset = "fashion_mnist"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 28
    c.model.update(arch="resnet18", width=0.5, small_stem=True, embed_dim=128, hidden_dim=256)
    c.batch_size = 256
    c.queue_size = 8192
    c.lr = 0.06
    c.epochs = 100
    c.warmup_epochs = 10
    # ~300 images per bottom cluster, as the published 3000 clusters are for ImageNet's 1.28M.
    c.clustering.num_clusters = (200, 50, 10)
    c.augment.update(scale=(0.3, 1.0), grayscale_prob=0.0, blur_prob=0.0, flip=True, mean=(0.286,),
                     std=(0.353,))
    c.evals.summary.num_clusters = (200, 50, 10)
    c.log_every_steps = 50
    c.checkpoint_every_epochs = 5
    if "cpu" in chosen:
        # One run in <= 15 minutes on a 2-core CPU: the first 15,000 training images (1,445-1,548
        # per class), 16 px, a quarter-width ResNet-18; 300 images per bottom cluster. Batch 64:
        # 4x the updates of batch 256 for the same images and CPU time (after 6 epochs MoCo v2's
        # kNN top-1 was 77.98% at batch 64, 75.07% at 256; RESULTS.md, fashion_mnist_cpu).
        c.train_split = "train[:15000]"
        c.update(image_size=16, epochs=18, warmup_epochs=4, batch_size=64, bn_group_size=16, lr=0.12,
                 queue_size=4096, checkpoint_every_epochs=3)
        c.model.update(width=0.25, embed_dim=64, hidden_dim=128)
        c.clustering.num_clusters = (50, 16, 4)
        c.evals.summary.num_clusters = (50, 16, 4)
        c.evals.knn = dict(every_epochs=3, ks=(20, 200), temperature=0.07)
    if "runlocal" in chosen:
        c.data_dir = "/tmp/fashion_mnist_tiny"
        c.update(epochs=2, warmup_epochs=1, image_size=16, batch_size=64, bn_group_size=8, queue_size=128,
                 log_every_steps=1, checkpoint_every_epochs=1, progress_bar=False)
        c.model.update(width=0.125, embed_dim=16, hidden_dim=32)
        c.clustering.update(num_clusters=(12, 6, 3), nredo=1, niter=5)
        c.evals.summary.num_clusters = (10,)
    if "vit" in chosen:
        apply_vit(c, "vit_s4", lr=5e-4, lr_warmup_epochs=10)
        if "runlocal" in chosen:
            c.model.update(width=0.125, depth=2)
            c.lr_warmup_epochs = 1
    apply_method(c, method, proto_negatives=16 if "cpu" in chosen else 64)
    if "authors" in chosen:
        apply_authors(c)
    return c
