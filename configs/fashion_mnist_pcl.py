"""PCL baseline on Fashion-MNIST: configs/fashion_mnist.py (same budget, 200 / 50 / 10 clusters)
with PCL's objective: independent flat k-means clusterings, ProtoNCE against r = 64 sampled
negative prototypes per clustering (32% of the finest clustering; PCL's 16384 is 16-66% of its
clusterings), PCL's code semantics, no selection. See configs/digits_pcl.py."""

from configs import fashion_mnist


def get_config():
    c = fashion_mnist.get_config()
    c.clustering.mode = "independent"
    c.objective.update(semantics="official", instance_selection=False, prototype_selection=False,
                       proto_negatives=64)
    return c
