"""HCSC on Fashion-MNIST (60,000 28x28 grey images, 10 classes with a natural hierarchy:
tops / shoes / bags / trousers). Data: the Debian package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist`) or the four IDX files in --config.data_dir.

  python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist
"""

from configs import default


def get_config():
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
    c.augment.update(scale=(0.3, 1.0), grayscale_prob=0.0, blur_prob=0.0, flip=True, mean=(0.286,), std=(0.353,))
    c.eval.num_clusters = (200, 50, 10)
    c.log_every_steps = 50
    c.checkpoint_every_epochs = 5
    return c
