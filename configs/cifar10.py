"""HCSC on CIFAR-10 through TFDS (prepare it with `tfds build cifar10 --file_format=array_record`
on a machine with network, then pass --config.data_dir).

  python train.py --config configs/cifar10.py --workdir runs/cifar10 --config.data_dir=~/tensorflow_datasets
  python train.py --config configs/cifar10.py:runlocal --config.data_dir=~/tensorflow_datasets   # smoke run

Variants (`--config=configs/cifar10.py:<variant>`, comma-separated): "" (the run above); authors:
the authors' training step for step (configs.apply_authors, docs/method.md §9); runlocal: a smoke run on
the first 256 / 128 images of the splits (TFDS slices), 2 epochs of a tiny model at 16 px.
"""

from configs import apply_authors, default, parse_variants

VARIANTS = ("", "authors", "runlocal")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "cifar10")
    c = default.get_config()
    c.dataset = "tfds:cifar10"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 32
    c.model.update(arch="resnet18", width=1.0, small_stem=True, embed_dim=128, hidden_dim=512,
                   dtype="bfloat16")  # a GPU/TPU config: float32 parameters, bfloat16 compute
    c.batch_size = 256
    c.queue_size = 4096
    c.lr = 0.06
    c.epochs = 200
    c.warmup_epochs = 20
    c.clustering.num_clusters = (200, 50, 10)
    c.augment.update(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    c.evals.summary.num_clusters = (200, 50, 10)
    c.log_every_steps = 50
    if "runlocal" in chosen:
        c.train_split, c.eval_split = "train[:256]", "test[:128]"
        c.update(epochs=2, warmup_epochs=1, image_size=16, batch_size=64, bn_group_size=8, queue_size=128,
                 log_every_steps=1, checkpoint_every_epochs=1, progress_bar=False)
        c.model.update(width=0.125, embed_dim=16, hidden_dim=32)
        c.clustering.update(num_clusters=(12, 6, 3), nredo=1, niter=5)
        c.evals.summary.num_clusters = (10,)
    if "authors" in chosen:
        apply_authors(c)
    return c
