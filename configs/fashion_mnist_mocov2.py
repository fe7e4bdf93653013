"""MoCo v2 baseline on Fashion-MNIST: configs/fashion_mnist.py without prototypes or selection."""

from configs import fashion_mnist


def get_config():
    c = fashion_mnist.get_config()
    c.clustering.num_clusters = ()
    c.objective.update(instance_selection=False, prototype_selection=False, proto_loss=False)
    return c
