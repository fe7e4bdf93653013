"""PCL baseline (Li et al., ICLR 2021) on digits: the HCSC digits config (same budget, model and
prototype counts) with PCL's objective instead of HCSC's.

  python train.py --config configs/digits_pcl.py --workdir runs/digits_pcl

PCL = InfoNCE + mean over clusterings of ProtoNCE, no selection:
- clusterings: independent flat k-means of the key features (`clustering.mode="independent"`,
  seed + l per clustering, no parents), 60 / 30 / 10 clusters like HCSC's levels (PCL's ImageNet
  settings are 25000 / 50000 / 100000 for 1.28M images), concentration phi as in spec §1.4
  (PCL's own estimate: the same formula, clip and rescale to the temperature 0.2);
- ProtoNCE against r sampled negative prototypes per clustering (`objective.proto_negatives`).
  PCL uses r = 16384 (its --pcl-r, also its queue size), i.e. 66% of its smallest and 16% of its
  largest clustering. Here r = 16: 27% of the 60-cluster level, inside that range. With groups of
  32 queries (bn_group_size, PCL's per-GPU batch) whose positives are excluded from the draw,
  the 30- and 10-cluster levels usually have fewer than 16 eligible prototypes left, and then all
  of them are negatives (PCL's code would stop with an error there);
- semantics "official" = PCL's code: one negative draw per group and the group's positives in
  the denominator (see `losses.pcl_proto_nce`); "paper" = the ProtoNCE equation.
"""

from configs import digits


def get_config():
    c = digits.get_config()
    c.clustering.mode = "independent"
    c.objective.update(semantics="official", instance_selection=False, prototype_selection=False,
                       proto_negatives=16)
    return c
