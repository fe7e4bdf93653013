"""PyTorch <-> hcsc-jax encoder weights: the released HCSC / MoCo v2 / PCL files and torchvision
ResNets, and timm / MoCo v3 / DINO Vision Transformers.

The mapping itself is pure NumPy (no torch import); only the command line needs torch, to read and
write ``.pth`` files.

================================  ==========================================================
NNX path                          torch ``state_dict`` key
================================  ==========================================================
``backbone/<m>/kernel`` (conv)    ``<m>.weight``   HWIO <-> OIHW (``w.transpose(2, 3, 1, 0)``)
``backbone/<m>/scale``, ``bias``  ``<m>.weight``, ``<m>.bias``                    (BatchNorm)
``backbone/<m>/mean``, ``var``    ``<m>.running_mean``, ``<m>.running_var``       (BatchNorm)
(none)                            ``<m>.num_batches_tracked`` dropped on import, 0 on export
``head/fc0``, ``head/fc2``        ``fc.0``, ``fc.2``   kernel [in, out] <-> weight [out, in]
================================  ==========================================================

Accepted key layouts on import (:func:`normalize_keys`):

* the authors' HCSC files and MoCo v2 / PCL files: ``module.encoder_q.<torchvision key>`` with
  the MLP head as ``fc.0``/``fc.2``; ``encoder_k``, ``queue`` and ``queue_ptr`` are ignored (as is
  anything else outside ``encoder_q``, with a note);
* plain torchvision ResNet state dicts (optionally ``module.``-prefixed): the backbone is loaded,
  the projection head keeps its fresh initialization, and a single-layer ``fc.weight``/``fc.bias``
  (the 1000-class classifier) is ignored with a note.

ViTs (a state dict with a ``cls_token``) map key for key onto `models.vit` (its docstring has
the table): linear weights are transposed, the patch-embedding conv goes OIHW -> HWIO, LayerNorm
``weight`` is ``scale``. Accepted layouts (:func:`normalize_vit_keys`): plain timm / DINO
backbones, ``module.``-prefixed ones, and MoCo v3 files (``module.base_encoder.*``, the default,
or ``module.momentum_encoder.*`` with ``encoder="momentum"``; the other encoder and the predictor
are ignored with a note). ``head.*`` (timm's classifier, MoCo v3's projection MLP) is ignored
with a note: the HCSC head is ``fc.0``/``fc.2`` as for ResNets, freshly initialized when absent.
The architecture comes from the shapes (``vit_t/s/b`` by the embedding dim, the patch size from
the patch conv; ``arch`` names it for narrower widths), the position embedding is recognized as
MoCo v3's fixed sin-cos table or taken as a learned one. A learned table for another grid than
the requested ``image_size`` is an error unless ``interpolate_pos_embed`` says how to resize
the grid, as torch's ``F.interpolate(mode="bicubic", align_corners=False)`` does: "bicubic"
(a = -0.75, no antialiasing: what DINO's and MoCo v3's loaders do) or "bicubic_antialias"
(``antialias=True``: Keys' a = -0.5 kernel, widened when shrinking, what timm's
``resample_abs_pos_embed`` does, e.g. for ``timm.create_model(..., img_size=...)``); the two
differ (for a ViT-S/16 resized to 256 px, by 8e-2 in the table and 3e-3 in the output, as
reported in issue #29). No mode is guessed from the file: timm, DINO and MoCo v3 ViTs share one
key layout. The sin-cos table is simply recomputed for any grid. Export writes timm's keys (the
sin-cos table included, for the model's image size), so ``timm.create_model('vit_small_patch16_224')
.load_state_dict(sd, strict=False)`` reports only the classifier as missing and ``fc.*`` as
unexpected.

Command line::

  python -m hcsc_jax.convert import-torch model.pth OUT_DIR [--image-size 224] [--mean 0.485,0.456,0.406] \
      [--std 0.229,0.224,0.225]                                # -> checkpoints.restore_encoder(OUT_DIR)
  python -m hcsc_jax.convert import-torch vit.pth OUT_DIR [--arch vit_s16] [--image-size 224] \
      [--interpolate-pos-embed bicubic|bicubic_antialias] [--encoder base|momentum]   # a ViT
  python -m hcsc_jax.convert export-torch CHECKPOINT OUT.pth [--backbone-only | --moco-layout]

``export-torch`` writes plain torchvision names for the backbone and ``fc.0.*``/``fc.2.*`` for the
head: ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` then reports only the
head keys as unexpected and ``fc.weight``/``fc.bias`` as missing. ``--backbone-only`` leaves the
head out (what detectron2's ``convert-torchvision-to-d2.py`` expects); ``--moco-layout`` writes
``{'arch', 'epoch', 'state_dict': {'module.encoder_q.<key>': ...}}`` as the authors' files are,
for their ``main_lincls.py`` and MoCo's ``convert-pretrain-to-detectron2.py``. Beside the
``.pth`` it writes ``<OUT.pth>.json``: the encoder's meta (architecture, width, depth, ...) and
the input it was trained on (image size, mean, std: `models.input_meta`, from a workdir's
config.json or an encoder's meta); ``import-torch`` reads that sidecar when it finds one, so an
exported ViT of any width imports back without ``--arch``. An import records the input in the
encoder's meta for eval.py: ``--image-size`` / ``--mean`` / ``--std``, else the sidecar's, else
ImageNet's (224 px, or the ViT's size) for 3-channel weights, with a warning saying so.

Modules: `resnet` (ResNet layouts), `vit` (ViT layouts and the position-embedding resize), `files`
(.pth files, import and export with the sidecar), `cli` (the command line).
"""

from hcsc_jax.convert.cli import main
from hcsc_jax.convert.files import (
    MAX_ZIP_EXPANSION,
    check_torch_file,
    export_torch,
    import_torch,
    import_torch_module,
    load_torch_state_dict,
    read_sidecar,
    save_torch_state_dict,
    sidecar_path,
)
from hcsc_jax.convert.resnet import encoder_to_torch, infer_meta, normalize_keys, torch_to_encoder
from hcsc_jax.convert.vit import (
    POS_EMBED_RESIZE,
    infer_vit_meta,
    interpolate_pos_embed,
    is_vit_state_dict,
    normalize_vit_keys,
    vit_encoder_to_torch,
    vit_torch_to_encoder,
)

__all__ = [
    "MAX_ZIP_EXPANSION", "POS_EMBED_RESIZE", "check_torch_file", "encoder_to_torch", "export_torch",
    "import_torch", "import_torch_module", "infer_meta", "infer_vit_meta", "interpolate_pos_embed",
    "is_vit_state_dict", "load_torch_state_dict", "main", "normalize_keys", "normalize_vit_keys",
    "read_sidecar", "save_torch_state_dict", "sidecar_path", "torch_to_encoder", "vit_encoder_to_torch",
    "vit_torch_to_encoder",
]
