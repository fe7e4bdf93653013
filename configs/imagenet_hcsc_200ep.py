"""HCSC on ImageNet-1k, 200 epochs, the published single-crop settings (spec §6; linear 69.2,
kNN 60.7 in the paper): ResNet-50, batch 256, lr 0.03, queue 16384, 20 warm-up epochs, levels
3000/2000/1000, MoCo v2 augmentation at 224 px.

ImageNet is prepared by the user (`tfds build imagenet2012 --file_format=array_record
--manual_dir=...`, or an image folder: `--config.dataset=folder:/data/imagenet` with
`--config.train_split=train --config.eval_split=val`). Streaming input, bfloat16 compute with
float32 parameters / statistics / loss, k-means on the accelerators.

  python train.py --config configs/imagenet_hcsc_200ep.py --workdir /shared/runs/hcsc_200ep \
      --config.data_dir=~/tensorflow_datasets
"""

from configs import default


def get_config():
    c = default.get_config()  # the published settings
    c.dataset = "tfds:imagenet2012"
    c.model.dtype = "bfloat16"
    c.input.pipeline = "stream"
    c.clustering.backend = "jax"  # same Lloyd iterations as faiss; "faiss" for the host path
    c.eval.num_clusters = (1000,)
    c.evals.knn = dict(every_epochs=10, ks=(20, 200), temperature=0.07)  # a kNN curve
    c.log_every_steps = 100
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 1000
    return c
