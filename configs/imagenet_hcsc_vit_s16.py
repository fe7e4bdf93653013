"""HCSC with a ViT-S/16 encoder on ImageNet-1k, MoCo v3's ViT-S settings (Chen, Xie and He, ICCV
2021, and its main_moco.py) where they are not HCSC's: AdamW with lr 1.5e-4 per 256 images
(2.4e-3 at batch 4096; here batch 1024: 6e-4), weight decay 0.1, 40 epochs of linear lr warm-up
then cosine decay, 300 epochs, fixed 2-D sin-cos position embedding, bfloat16 compute with
float32 parameters, no ShuffleBN (a ViT has no BatchNorm), and MoCo v3's projection size
(4096 hidden, 256 out) on HCSC's two-layer head. HCSC's objective, queue (16384), momentum encoder
(0.999), 20 instance-only epochs, levels 3000/2000/1000 and MoCo v2 augmentation are unchanged.
Not published or run by the authors: these are settings to start from, not reproduced numbers.

  python train.py --config configs/imagenet_hcsc_vit_s16.py --workdir /shared/runs/hcsc_vit_s16 \
      --config.data_dir=~/tensorflow_datasets
  python train.py --config configs/imagenet_hcsc_vit_s16.py:runlocal   # smoke run, see below

Variants (`--config=configs/imagenet_hcsc_vit_s16.py:<variant>`): "" (the run above); runlocal:
configs/imagenet_hcsc_200ep.py:runlocal (a tiny image folder, /tmp/imagenet_tiny, made by
`python tests/imagenet_like.py`; 32 px, 2 epochs) with a ViT-S/16 of 2 blocks at width 1/8
(48 dims, 6 heads, a 2x2 grid of patches).
"""

from configs import apply_vit, imagenet_hcsc_200ep, parse_variants

VARIANTS = ("", "runlocal")


def get_config(arg=None):
    chosen = parse_variants(arg, VARIANTS, "imagenet_hcsc_vit_s16")
    c = imagenet_hcsc_200ep.get_config("runlocal" if "runlocal" in chosen else None)
    apply_vit(c, "vit_s16", lr=1.5e-4, lr_warmup_epochs=40, weight_decay=0.1)
    c.model.update(embed_dim=256, hidden_dim=4096)
    c.epochs = 300
    if "runlocal" in chosen:
        c.model.update(width=0.125, depth=2, embed_dim=16, hidden_dim=32)
        c.update(epochs=2, lr_warmup_epochs=1)
    else:
        c.update(batch_size=1024)
    return c
