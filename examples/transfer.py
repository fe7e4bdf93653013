"""Fine-tune a trained encoder on a few labelled images, in user code, beside a random-init one.

  python train.py                                        # -> runs/digits (HCSC on digits)
  python examples/transfer.py --workdir=runs/digits      # 10 labels per class, 300 steps

Everything here is what a user of the library writes: `hcsc_jax.load_encoder` for the trained
encoder and its input spec, `preprocess` for the views, `classifier` for a copy of the backbone
under a new linear head, `nnx.Optimizer` with optax over all parameters, BatchNorm in train mode
while fine-tuning and in inference mode to evaluate. The random-init baseline is the same
architecture built from the checkpoint's metadata (`models.build_encoder`) and fine-tuned with
the same steps. Prints the held-out top-1 of both.
"""

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hcsc_jax
from hcsc_jax import models
from hcsc_jax.data import sources


def labelled_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of each class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                           for c in np.unique(labels)])


def fine_tune(model, x, y, steps: int, batch: int, lr: float, seed: int):
    """Trains all of `model` (a `hcsc_jax.Classifier`) on (x, y) with SGD (momentum 0.9, cosine
    lr) -> the model."""
    optimizer = nnx.Optimizer(model, optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        def loss_fn(model):
            logits = model(xb, train=True)  # BN in train mode: batch statistics, running stats updated
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=len(x) < batch)
        step(model, optimizer, x[idx], y[idx])
    return model


def accuracy(model, x, y, batch: int = 256) -> float:
    predict = nnx.jit(lambda model, xb: jnp.argmax(model(xb, train=False), axis=-1))
    hits = sum(int((predict(model, x[i:i + batch]) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/digits", help="a train.py workdir, or an exported encoder")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="a multiple of the encoder's BN group size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    enc = hcsc_jax.load_encoder(args.workdir)
    train = sources.load_dataset(args.dataset, args.train_split)
    test = sources.load_dataset(args.dataset, args.eval_split)
    subset = labelled_subset(train.labels, args.labels_per_class, args.seed)
    x, y = enc.preprocess(train.images[subset]), jnp.asarray(train.labels[subset])
    x_test, y_test = enc.preprocess(test.images), jnp.asarray(test.labels)

    random_init = hcsc_jax.Pretrained(models.build_encoder(enc.meta, seed=args.seed), enc.input, enc.meta)
    results = {}
    for name, encoder in (("trained encoder", enc), ("random init", random_init)):
        model = fine_tune(encoder.classifier(train.num_classes, args.seed), x, y, args.steps, args.batch,
                          args.lr, args.seed)
        results[name] = accuracy(model, x_test, y_test)
    print(f"fine-tuned on {len(subset)} labelled {args.dataset} images ({args.labels_per_class} per class), "
          f"{args.steps} steps; top-1 on {args.eval_split} ({len(y_test)} images):")
    for name, acc in results.items():
        print(f"  {name:16s} {100 * acc:6.2f}%")
    return results


if __name__ == "__main__":
    main()
