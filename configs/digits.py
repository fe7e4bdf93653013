"""HCSC and its baselines on scikit-learn's digits (1,797 8x8 images): the embedded default,
~minutes on a CPU. Variants (`--config=configs/digits.py:<variant>`, comma-separated):

  python train.py --config configs/digits.py --workdir runs/digits                # hcsc (default)
  python train.py --config configs/digits.py:mocov2 --workdir runs/digits_mocov2  # MoCo v2 baseline
  python train.py --config configs/digits.py:pcl --workdir runs/digits_pcl        # PCL baseline
  python train.py --config configs/digits.py:pcl,runlocal                         # smoke run of any of them
  python train.py --config configs/digits.py:vit --workdir runs/digits_vit        # HCSC with a ViT encoder
  python train.py --config configs/digits.py:authors --workdir runs/digits_authors  # the authors' training
  python train.py --config configs/digits.py:converged --workdir runs/digits_90      # 90 epochs

- hcsc: HCSC, paper semantics.
- mocov2: the same budget with no prototypes: plain InfoNCE for every epoch, no selection.
- pcl: PCL (Li et al., ICLR 2021) at the same budget, model and prototype counts: InfoNCE + mean
  over clusterings of ProtoNCE, no selection. Independent flat k-means of the key features
  (`clustering.mode="independent"`, seed + l per clustering, no parents), 60 / 30 / 10 clusters
  like HCSC's levels (PCL's ImageNet settings: 25000 / 50000 / 100000 for 1.28M images), the
  concentration phi of docs/method.md §1.4. ProtoNCE against r sampled negative prototypes per clustering
  (`objective.proto_negatives`): PCL's r = 16384 is 16-66% of its clusterings; here r = 16, 27% of
  the 60-cluster level. With groups of 8 queries (bn_group_size; PCL's per-GPU batch is 32) whose
  positives are excluded from the draw, the 10-cluster level has fewer than 16 eligible prototypes
  left, and then all of them are negatives (PCL's code would stop there).
  Semantics "official" = PCL's code: one negative draw per group, the group's positives in the
  denominator (`losses.pcl_proto_nce`); "paper" = the ProtoNCE equation.
- authors: the authors' training step for step (configs.apply_authors, docs/method.md §9): official
  semantics, their negative-prototype off-by-one, lr per epoch, the same k-means seeds every epoch,
  first-group BatchNorm statistics; combines with the methods (`digits.py:mocov2,authors`).
- vit: the encoder is a small ViT with 4-px patches (vit_t4 at width 1/2: 96 dims, 3 heads, 6
  blocks; a 4x4 grid of patches at 16 px) trained with MoCo v3's ViT recipe (AdamW, weight decay
  0.1, 5 epochs of linear lr warm-up, no ShuffleBN); combines with the methods. Not tuned.
- converged: 90 epochs instead of 40 (warm-up unchanged), where MoCo v2's kNN stops rising at this
  recipe (the 120-epoch curve of `experiments/study.py --setting=digits_curve`, RESULTS.md: kNN k=200
  flat from epoch 80, k=20 from 90, within two test images); combines with the methods.
- runlocal: a smoke run (3 epochs at 8 px, a tiny model, small queue and levels, kNN every 2
  epochs, no progress bar); combines with the others. The tests train it (tests/test_trainer.py;
  vit,runlocal: 2 blocks at width 1/4, tests/test_vit_training.py).
"""

from configs import apply_authors, apply_method, apply_vit, default, one_of, parse_variants

VARIANTS = ("hcsc", "mocov2", "pcl", "authors", "vit", "converged", "runlocal")
METHODS = ("hcsc", "mocov2", "pcl")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "digits")
    method = one_of(chosen, METHODS, "digits", "hcsc")
    c = default.get_config()
    c.dataset = "digits"
    c.train_split, c.eval_split = "train", "test"
    c.image_size = 16  # 8x8 digits upsampled by the crop: at 8 px MoCo barely leaves its plateau
    c.model.update(arch="resnet18", width=0.25, small_stem=True, embed_dim=64, hidden_dim=128)
    # Batch 32 (ShuffleBN groups of 8): 44 steps an epoch, 1,760 in all. At batch 128 (440 steps) the
    # instance loss stays near its plateau log(K+1) = 6.93 (6.58 at the end); at 32 it reaches 5.66
    # in about the same time (experiments/study.py --setting=digits_recipe, RESULTS.md).
    c.batch_size = 32
    c.bn_group_size = 8
    c.queue_size = 1024
    c.lr = 0.06
    c.epochs = 40
    c.warmup_epochs = 10
    c.clustering.update(num_clusters=(60, 30, 10), niter=20, nredo=5)
    # 8-px gray digits: milder crops, no flips (they change a digit's meaning), no blur.
    c.augment.update(scale=(0.4, 1.0), grayscale_prob=0.0, blur_prob=0.0, flip=False, mean=(0.5,), std=(0.5,))
    c.evals.summary.num_clusters = (60, 30, 10)
    c.evals.knn = dict(every_epochs=5, ks=(20, 200), temperature=0.07)  # a kNN curve in metrics.jsonl
    c.log_every_steps = 11
    c.checkpoint_every_epochs = 10
    if "converged" in chosen:
        c.epochs = 90
    if "runlocal" in chosen:
        c.update(epochs=3, image_size=8, warmup_epochs=1, batch_size=64, bn_group_size=8, queue_size=256,
                 lr=0.03, log_every_steps=5, checkpoint_every_epochs=1, progress_bar=False)
        c.model.update(width=0.125, embed_dim=16, hidden_dim=32)
        c.clustering.update(num_clusters=(20, 8, 4), nredo=1, niter=10)
        c.evals.summary.num_clusters = (20, 10)
        c.evals.knn.update(every_epochs=2, ks=(5, 20))
    if "vit" in chosen:
        apply_vit(c, "vit_t4", width=0.5, depth=6, lr=1e-3, lr_warmup_epochs=5)
        if "runlocal" in chosen:
            c.model.update(width=0.25, depth=2)
            c.lr_warmup_epochs = 1
    apply_method(c, method, proto_negatives=16)
    if "authors" in chosen:
        apply_authors(c)
    return c

