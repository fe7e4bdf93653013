"""`python -m hcsc_jax.convert import-torch | export-torch` (the package docstring says what each
does)."""

from __future__ import annotations

import argparse
import logging
import sys

from hcsc_jax.convert.files import export_torch, import_torch, sidecar_path
from hcsc_jax.convert.vit import _MOCO_V3_ENCODERS, POS_EMBED_RESIZE
from hcsc_jax.run import checkpoints

log = logging.getLogger("hcsc_jax.convert")

def _floats(text: str) -> tuple[float, ...]:
    """A --mean / --std value: comma-separated floats."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        message = f"{text!r} is not comma-separated numbers, e.g. 0.5,0.5,0.5"
        raise argparse.ArgumentTypeError(message) from None


def main(argv: list[str] | None = None) -> int:
    import hcsc_jax.convert as package  # (its docstring: the command line's description)

    ap = argparse.ArgumentParser(prog="python -m hcsc_jax.convert",
                                 description=package.__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser(
        "import-torch", help="PyTorch .pth (HCSC / MoCo v2 / PCL / torchvision; timm / MoCo v3 / DINO ViT) "
        "-> Orbax encoder"
    )
    imp.add_argument("pth")
    imp.add_argument("out_dir")
    imp.add_argument("--embed-dim", type=int, default=128, help="head output dim when the file has no head")
    imp.add_argument("--hidden-dim", type=int, default=None, help="head hidden dim when the file has no head")
    imp.add_argument("--bn-group-size", type=int, default=32, help="recorded in meta, for fine-tuning")
    imp.add_argument("--seed", type=int, default=0, help="initialization of a head absent from the file")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="unpickle any object in the file (runs code it names): only for files you trust")
    imp.add_argument("--arch", default=None, help="ViT only: the architecture (e.g. vit_s16) when the width "
                     "is not the standard one")
    imp.add_argument("--image-size", type=int, default=None,
                     help="image side the weights were trained on, recorded for eval.py; a ViT's model size "
                     "too (default: the sidecar's, else a ViT's position-embedding grid, else 224)")
    imp.add_argument("--mean", type=_floats, default=None, help="per-channel input mean the weights were "
                     "trained with, e.g. 0.485,0.456,0.406 (default: the sidecar's, else ImageNet's for RGB)")
    imp.add_argument("--std", type=_floats, default=None, help="per-channel input std (as --mean)")
    imp.add_argument("--interpolate-pos-embed", choices=tuple(POS_EMBED_RESIZE), default=None,
                     help="ViT only: resize a learned position embedding to --image-size: bicubic (torch's "
                     "F.interpolate, as DINO and MoCo v3 do) or bicubic_antialias (antialias=True, as timm's "
                     "resample_abs_pos_embed does)")
    imp.add_argument("--encoder", choices=_MOCO_V3_ENCODERS, default="base",
                     help="MoCo v3 files: base_encoder (default) or momentum_encoder")
    exp = sub.add_parser("export-torch",
                         help="train workdir or exported encoder -> torchvision-named (ViT: timm-named) .pth")
    exp.add_argument("checkpoint")
    exp.add_argument("out_pth")
    grp = exp.add_mutually_exclusive_group()
    grp.add_argument(
        "--backbone-only",
        action="store_true",
        help="leave out the fc.0/fc.2 head (for detectron2's convert-torchvision-to-d2.py)",
    )
    grp.add_argument(
        "--moco-layout",
        action="store_true",
        help="write {'arch', 'epoch', 'state_dict': {'module.encoder_q.<key>': ...}} like the authors' files",
    )
    exp.add_argument("--which", choices=("query", "key"), default="query", help="encoder of a train workdir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.cmd == "import-torch":
            meta = import_torch(
                args.pth,
                args.out_dir,
                seed=args.seed,
                trust_pickle=args.trust_pickle,
                interpolate_pos_embed=args.interpolate_pos_embed,
                encoder=args.encoder,
                arch=args.arch,
                image_size=args.image_size,
                mean=args.mean,
                std=args.std,
                embed_dim=args.embed_dim,
                hidden_dim=args.hidden_dim,
                bn_group_size=args.bn_group_size,
            )
            print(f"wrote {args.out_dir}: {meta['model']} in_channels={meta['in_channels']} "
                  f"input={meta.get('input')}")
        else:
            sd = export_torch(
                args.checkpoint,
                args.out_pth,
                backbone_only=args.backbone_only,
                moco_layout=args.moco_layout,
                which=args.which,
            )
            print(f"wrote {args.out_pth}: {len(sd)} tensors; its meta in {sidecar_path(args.out_pth)}")
    except (OSError, ValueError, ImportError, checkpoints.NoReadableStep) as err:
        if isinstance(err, OSError) and err.filename:  # e.g. a read-only output directory
            err = f"{err.filename}: {err.strerror or err}"
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
