"""Datasets and their input to the step: `sources` (one module per dataset, one registry),
`decode` (image bytes to pixels), `crops` (the host's random-resized and center crops),
`loader` (worker processes that decode and crop batches), `pipeline` (the resident and the
streamed input of a run), `augmentations` (MoCo v2 views on the device), `prepare` (a resized
ArrayRecord copy of a dataset). Nothing is imported here, so a loader worker that unpickles a
source does not import JAX."""
