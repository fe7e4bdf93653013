"""Defaults shared by every config: the published HCSC ImageNet settings (docs/method.md §6).

Dataset configs start from `get_config()` here and override what differs.
"""

import ml_collections

from hcsc_jax.data.decode import MAX_PIXELS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data.
    c.dataset = "tfds:imagenet2012"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None: the TFDS default, or the source's own
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224  # crop size of both views

    # Optional initialization of both encoders from an encoder checkpoint (a train.py workdir,
    # or a directory from `python -m hcsc_jax.convert import-torch`); architectures must match.
    c.init_encoder = ml_collections.config_dict.placeholder(str)

    # Encoder: ResNet-50 (torchvision v1.5) + 2048-2048-128 MLP head, no BN in the head. A ViT
    # (arch "vit_s16", ...: models/vit.py) also reads model.depth, pos_embed and image_size.
    c.model = ml_collections.ConfigDict(dict(
        arch="resnet50", width=1.0, small_stem=False, embed_dim=128,
        hidden_dim=ml_collections.FieldReference(None, field_type=int), dtype="float32"))

    # MoCo machinery.
    c.batch_size = 256  # global
    c.bn_group_size = 32
    # What BatchNorm's running statistics (eval mode: clustering features, kNN, linear probes)
    # follow: "mean_of_groups" (every BN group's statistics, averaged) or "first_group" (the first
    # group's: the authors' DDP runs, where broadcast_buffers copies rank 0's to every rank).
    c.bn_running_stats = "mean_of_groups"
    c.shuffle_bn = True
    # How ShuffleBN permutes the key view across devices (train_step.SHUFFLE_GATHERS): "views" (the
    # same run on any number of processes, but every device runs the key encoder on the whole batch)
    # or "images" (each device on its share; what the pod configs use).
    c.shuffle_bn_gather = "views"
    c.queue_size = 16384
    c.ema_momentum = 0.999
    c.lr = 0.03  # at batch 256; scaled linearly with the global batch
    c.weight_decay = 1e-4
    c.sgd_momentum = 0.9
    # "sgd" (MoCo v2, above) or "adamw" (MoCo v3's ViT recipe: decoupled weight_decay, adam_betas);
    # lr_warmup_epochs of linear warm-up before the cosine decay; grad_clip > 0: clip to that norm.
    c.optimizer = "sgd"
    c.adam_betas = (0.9, 0.999)
    c.lr_warmup_epochs = 0
    # "step": the lr follows its schedule every step; "epoch": held for an epoch at the value of
    # its first step (the authors' adjust_learning_rate: a per-epoch cosine). Not with lr warm-up.
    c.lr_granularity = "step"
    c.grad_clip = 0.0
    c.epochs = 200
    c.warmup_epochs = 20  # instance loss only, no prototypes

    # HCSC objective (hcsc_jax.method.objective.ObjectiveConfig).
    c.objective = ml_collections.ConfigDict(dict(
        semantics="paper", positive="assignment", temperature=0.2, instance_selection=True,
        prototype_selection=True, instance_loss=True, proto_loss=True, sampler="hash",
        selection_on_local=False,  # multi-crop: local InfoNCE with the instance masks too
        proto_negatives=0,  # PCL's r: sampled negative prototypes per level (0: all, HCSC)
        skip_last_prototype=False))  # True: the authors' off-by-one (docs/method.md §9)

    # Hierarchical k-means between epochs (docs/method.md §1). Empty num_clusters = no prototypes.
    c.clustering = ml_collections.ConfigDict(dict(
        num_clusters=(3000, 2000, 1000), temperature=0.2, niter=20, nredo=5,
        max_points_per_centroid=1000, min_points_per_centroid=10,
        # "faiss" (host CPU), "jax" (the same Lloyd iterations on the accelerators) or "auto":
        # "jax" when JAX has accelerators, "faiss" on CPU-only hosts (clustering.resolve_backend).
        backend="auto",
        # True: epoch e's k-means seed is seed + 1000 e + level (a new draw every epoch); False:
        # seed + level every epoch (the authors: 0, 1, 2 per level, as at seed 0).
        seed_per_epoch=True,
        mode="hierarchical"))  # or "independent": flat k-means per level, no parents (PCL)

    # Augmentation (MoCo v2, docs/method.md §6).
    c.augment = ml_collections.ConfigDict(dict(
        scale=(0.2, 1.0), jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, flip=True,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        # Multi-crop (docs/method.md §6): local views through the query encoder only, as
        # ((crop_size, (scale_lo, scale_hi)), ...); empty = the two-view method.
        local_views=()))

    # Input. "memory": the dataset is decoded once and kept on the devices, every crop is taken
    # there (digits, Fashion-MNIST, CIFAR). "stream": each process's loader workers decode its
    # share of every batch and take the random-resized crops on the host (`num_workers` worker
    # processes: -1 = one per core but one, 0 = none, in the training process; each keeps
    # `prefetch` batches ready); flip and photometric ops still run on the devices.
    # `resampling` of the host crops: "linear" (OpenCV bilinear, fast) or "antialias" (Pillow, as
    # torchvision); `bad_images`: "skip" (warn, use the next readable image) or "error" (stop).
    # `max_pixels`: an image whose header says more pixels is refused before decoding, and a file
    # of more than 4 bytes per such pixel before reading, as bad_images says (Pillow's
    # decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS; data/decode.py).
    c.input = ml_collections.ConfigDict(dict(pipeline="memory", num_workers=-1, prefetch=2,
                                             resampling="linear", bad_images="skip",
                                             max_pixels=MAX_PIXELS))

    # Evaluators (hcsc_jax/evaluators/), one schema with configs/eval_*.py: name -> {type (the
    # protocol; default: the name), every_epochs (0: after the last epoch only), its settings}.
    # Each runs every `every_epochs` epochs and after the last; results in metrics.jsonl ("type":
    # "eval", "<name>/<metric>"). The entry of type "summary" is summary.json: kNN top-1 on
    # `eval_split` (k = knn_k) and the NMI of a hierarchy of the key encoder's projections with
    # levels `num_clusters` (empty: no NMI); without one, summary.json holds only step and epochs.
    c.evals = ml_collections.ConfigDict()
    c.evals.summary = dict(type="summary", every_epochs=0, knn_k=20, knn_temperature=0.07,
                           num_clusters=(1000,))

    # Metrics go to metrics.jsonl and TensorBoard event files (<workdir>/tensorboard); also to
    # Weights & Biases when wandb.project is set (pip install wandb; mode "offline" writes to the
    # workdir for `wandb sync` later).
    c.wandb = ml_collections.ConfigDict(dict(
        project=ml_collections.config_dict.placeholder(str),
        entity=ml_collections.config_dict.placeholder(str),
        name=ml_collections.config_dict.placeholder(str), mode="online"))
    # Training-curve and cluster figures in <workdir>/figures at the end of a run (all figures:
    # python -m hcsc_jax.visualize WORKDIR).
    c.figures_at_end = True

    # Divergence guard: stop (keeping the last checkpoint) when a step's loss or gradient norm is
    # above these (0: no limit). A NaN or inf loss always stops the run.
    c.divergence = ml_collections.ConfigDict(dict(max_loss=0.0, max_grad_norm=0.0))

    # Bookkeeping.
    c.log_every_steps = 50
    c.checkpoint_every_epochs = 5
    c.checkpoint_every_steps = 0  # also save mid-epoch every N global steps (0: off)
    c.keep_checkpoints = 3
    c.progress_bar = True
    return c
