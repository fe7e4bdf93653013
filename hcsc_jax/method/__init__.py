"""The method (docs/method.md): ICSC / PCSC selection (`selection`), masked InfoNCE and ProtoNCE
(`losses`), the whole objective of a batch with the prototypes on the devices (`objective`), and
the jitted, sharded train step with its state, EMA key encoder, ShuffleBN, queue and optimizer
(`train_step`). What a run is made of besides (the encoder, the clustering, the input) lives in
`hcsc_jax.models`, `hcsc_jax.clustering` and `hcsc_jax.data`; running it, in `hcsc_jax.run`."""
