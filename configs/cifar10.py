"""HCSC on CIFAR-10 through TFDS (prepare it with `tfds build cifar10 --file_format=array_record`
on a machine with network, then pass --config.data_dir).

  python train.py --config configs/cifar10.py --workdir runs/cifar10 --config.data_dir=~/tensorflow_datasets
"""

from configs import default


def get_config():
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
    c.eval.num_clusters = (200, 50, 10)
    c.log_every_steps = 50
    return c
