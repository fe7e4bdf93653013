"""HCSC on scikit-learn's digits (1,797 8x8 images): the embedded default, ~minutes on a CPU.

  python train.py --config configs/digits.py --workdir runs/digits
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "digits"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 16  # 8x8 digits upsampled by the crop: at 8 px MoCo barely leaves its plateau
    c.model.update(arch="resnet18", width=0.25, small_stem=True, embed_dim=64, hidden_dim=128)
    c.batch_size = 128
    c.queue_size = 1024
    c.lr = 0.06
    c.epochs = 40
    c.warmup_epochs = 10
    c.clustering.update(num_clusters=(60, 30, 10), niter=20, nredo=5)
    # 8-px grey digits: milder crops, no flips (they change a digit's meaning), no blur.
    c.augment.update(scale=(0.4, 1.0), grayscale_prob=0.0, blur_prob=0.0, flip=False, mean=(0.5,), std=(0.5,))
    c.eval.update(num_clusters=(60, 30, 10))
    c.evals.knn = dict(every_epochs=5, ks=(20, 200), temperature=0.07)  # a kNN curve in metrics.jsonl
    c.log_every_steps = 11
    c.checkpoint_every_epochs = 10
    return c
