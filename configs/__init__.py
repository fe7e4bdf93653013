"""Configs for train.py / eval.py, big_vision style: one file per dataset, `get_config(arg)` picks
a variant, e.g. `--config=configs/digits.py:pcl`. `arg` is a comma-separated list of variant names
(`digits.py:pcl,runlocal`); each module lists its names in `VARIANTS`."""


def parse_variants(arg: str | None, variants: tuple[str, ...], module: str) -> set[str]:
    """'pcl,runlocal' -> {'pcl', 'runlocal'}; None or '' -> set(). Unknown names -> ValueError
    naming the known ones."""
    names = [t.strip() for t in (arg or "").split(",") if t.strip()]
    unknown = [t for t in names if t not in variants]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} of configs/{module}.py; variants: "
                         f"{', '.join(v for v in variants if v)} "
                         f"(comma-separated, e.g. configs/{module}.py:{variants[-1]})")
    return set(names)


def one_of(chosen: set[str], options: tuple[str, ...], module: str, default: str) -> str:
    """The one name of `options` in `chosen` (default when none); two -> ValueError."""
    picked = [o for o in options if o in chosen]
    if len(picked) > 1:
        raise ValueError(f"configs/{module}.py: variants {' and '.join(picked)} exclude each other; "
                         f"pick one of {', '.join(options)}")
    return picked[0] if picked else default


def apply_method(c, method: str, proto_negatives: int):
    """Turns an HCSC config into its MoCo v2 or PCL baseline at the same budget ("hcsc": as is).
    MoCo v2: no prototypes, plain InfoNCE every epoch, no selection. PCL: independent flat k-means
    clusterings, InfoNCE + mean ProtoNCE against `proto_negatives` sampled negative prototypes per
    clustering, PCL's code semantics, no selection (configs/digits.py says more)."""
    if method == "mocov2":
        c.clustering.num_clusters = ()  # no hierarchy: plain InfoNCE for every epoch
        c.objective.update(instance_selection=False, prototype_selection=False, proto_loss=False)
    elif method == "pcl":
        c.clustering.mode = "independent"
        c.objective.update(semantics="official", instance_selection=False, prototype_selection=False,
                           proto_negatives=proto_negatives)
    elif method != "hcsc":
        raise ValueError(f"unknown method {method!r}")


def apply_authors(c):
    """The authors' training (github.com/gyfastas/HCSC), every remaining difference switched to
    their code (docs/method.md §9): "official" semantics, their negative-prototype off-by-one,
    the learning rate changed once per epoch, the same k-means seeds every epoch (seed + level:
    their 0, 1, 2 at seed 0), and
    BatchNorm running statistics of the first BN group (rank 0's, as DDP broadcasts them). On
    top of any method: MoCo v2 is their code with no prototypes, PCL already follows PCL's code.
    Their code trains ResNets: a ViT config is refused."""
    if c.model.arch.startswith("vit"):
        raise ValueError("variant 'authors' is the authors' ResNet training (SGD, per-epoch cosine, "
                         "BatchNorm); it does not combine with a ViT ('vit')")
    c.objective.update(semantics="official", skip_last_prototype=True)
    c.clustering.seed_per_epoch = False
    c.update(lr_granularity="epoch", bn_running_stats="first_group")


def apply_vit(c, arch: str, *, width: float = 1.0, depth: int = 12, lr: float = 1.5e-4,
              lr_warmup_epochs: int = 40, weight_decay: float = 0.1, grad_clip: float = 0.0):
    """Turns a config's encoder into a ViT trained with MoCo v3's ViT recipe (HCSC's objective,
    queue and prototypes unchanged): `arch` (models/vit.py: vit_s16, vit_t4, ...) at `width` x
    its embedding dim with `depth` blocks, fixed sin-cos position embedding, no ShuffleBN (a ViT
    has no BatchNorm), AdamW at `lr` per 256 images with `lr_warmup_epochs` of linear warm-up,
    then cosine decay, decoupled weight decay `weight_decay`, optional gradient clipping."""
    c.model.update(arch=arch, width=width, small_stem=False)
    c.model.depth = depth
    c.model.pos_embed = "sincos"
    c.model.image_size = c.get_ref("image_size")  # the grid of the exported / learned pos_embed
    c.shuffle_bn = False
    c.update(optimizer="adamw", lr=lr, lr_warmup_epochs=lr_warmup_epochs, weight_decay=weight_decay,
             grad_clip=grad_clip)
