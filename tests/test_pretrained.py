"""hcsc_jax.load_encoder: a trained encoder in user code. Its features equal the encoder module run
by hand on the documented preprocessing (torchvision-style resize + center crop + normalize), for
same-sized arrays (device crop) and lists of any sizes (host crop); a workdir, its export and the
key encoder load alike; bad images are one clear error."""

import jax
import numpy as np
import pytest
from PIL import Image

import hcsc_jax
from hcsc_jax import models
from hcsc_jax.data import augmentations, crops, sources
from hcsc_jax.run import checkpoints


@pytest.fixture(scope="module")
def enc(digits_run):
    return hcsc_jax.load_encoder(digits_run)


@pytest.fixture(scope="module")
def images():
    return sources.load_dataset("digits", "test").images[:40]  # (40, 8, 8, 1) uint8


def by_hand(enc, x):
    feats, proj = enc.module(x, train=False)
    return np.asarray(feats), np.asarray(proj)


@pytest.mark.slow
def test_input_spec_comes_from_the_run(enc, digits_run):
    assert enc.input == hcsc_jax.InputSpec(8, 1, (0.5,), (0.5,))  # configs/digits.py:runlocal
    assert enc.meta["step"] == 66 and enc.meta["model"]["arch"] == "resnet18"
    assert isinstance(enc.module, models.Encoder) and enc.num_features == 64


@pytest.mark.slow
def test_features_and_projection_of_an_array_equal_the_module_on_its_center_crops(enc, images):
    x = augmentations.center_crop(images, 8, (0.5,), (0.5,))
    np.testing.assert_allclose(np.asarray(enc.preprocess(images)), np.asarray(x), atol=1e-6)
    want_f, want_p = by_hand(enc, x)
    f, p = enc.features(images, batch_size=16), enc.project(images)  # 40 = 2.5 batches: padding dropped
    assert f.shape == (40, enc.num_features) and f.dtype == np.float32 and p.shape == (40, 16)
    np.testing.assert_allclose(f, want_f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p, want_p, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    # (N, H, W) too
    np.testing.assert_allclose(enc.features(images[..., 0], batch_size=16), f, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_a_list_of_sizes_and_color_images_are_cropped_on_the_host(enc, images):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 13, 3), np.uint8)
    listed = [images[0], rng.integers(0, 256, (11, 9, 1), np.uint8), rgb, images[1][..., 0]]
    gray = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]  # Pillow's luma, exactly
    views = np.stack([crops.center_crop_image(im, 8) for im in (images[0], listed[1], gray, images[1])])
    np.testing.assert_array_equal(enc._uint8_views(listed)[0], views)
    want_f, _ = by_hand(enc, augmentations.normalize(views, (0.5,), (0.5,)))
    np.testing.assert_allclose(enc.features(listed), want_f, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_functional_form_jits_and_gives_the_same_features(enc, images):
    graphdef, params, stats = enc.split()
    apply = jax.jit(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=False)[0])
    np.testing.assert_allclose(np.asarray(apply(params, stats, enc.preprocess(images))), enc.features(images),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_export_and_the_key_encoder_load_alike(enc, digits_run, images, tmp_path):
    module, meta = checkpoints.restore_encoder(digits_run)
    _, params, stats = models.split_model(module)
    recorded = dict(meta, input=models.input_meta(8, 1, (0.5,), (0.5,)))
    checkpoints.export_encoder(str(tmp_path / "exported"), recorded, params, stats)
    exported = hcsc_jax.load_encoder(tmp_path / "exported")
    assert exported.input == enc.input
    np.testing.assert_array_equal(exported.features(images), enc.features(images))
    key = hcsc_jax.load_encoder(digits_run, which="key")
    assert not np.allclose(key.features(images), enc.features(images))  # the momentum encoder's own weights
    checkpoints.export_encoder(str(tmp_path / "bare"), meta, params, stats)  # no input recorded
    with pytest.raises(ValueError, match=r"records no input .*InputSpec\(\.\.\.\)"):
        hcsc_jax.load_encoder(tmp_path / "bare")


@pytest.mark.slow
def test_bad_images_are_one_clear_error(enc):
    with pytest.raises(ValueError, match="must be uint8"):
        enc.features(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="2 channels; this encoder takes 1"):
        enc.features(np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        enc.features([])
    with pytest.raises(ValueError, match="which must be 'query' or 'key'"):
        hcsc_jax.load_encoder("anything", which="value")
    # Extremes (a ZeroDivisionError, errors from deep inside JAX, rows of a misread image before).
    with pytest.raises(ValueError, match=r"^images\[1\] must be at least 1x1 pixels, got 0x0"):
        enc.features([np.zeros((8, 8), np.uint8), np.zeros((0, 0), np.uint8)])
    with pytest.raises(ValueError, match=r"^images must be at least 1x1 pixels, got 0x5"):
        enc.features(np.zeros((2, 0, 5, 1), np.uint8))
    with pytest.raises(ValueError, match=r"could be one \(H, W, C\) image or 20 gray \(H, W\) ones: pass "):
        enc.features(np.zeros((20, 20, 3), np.uint8))
    for bad in (0, -3, 2.5, 1e9):
        with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got "):
            enc.features(np.zeros((2, 8, 8, 1), np.uint8), batch_size=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"^num_classes must be an integer >= 1, got "):
            enc.classifier(bad)
    empty = enc.features(np.zeros((0, 8, 8, 1), np.uint8))
    assert empty.shape == (0, enc.num_features) and empty.dtype == np.float32
    assert enc.project(np.zeros((0, 8, 8, 1), np.uint8)).shape == (0, 16)


@pytest.mark.slow
def test_a_batch_is_no_larger_than_the_images_there_are_nor_than_the_memory_bound(enc, images, monkeypatch):
    """Two large images with batch_size=10**9 were padded to 10**9 (and 2 of 5000x5000 to 256):
    out of memory. The batch is the images there are (rounded to the devices), and at most
    MAX_BATCH_BYTES of them as float32; the features stay the same."""
    from hcsc_jax import pretrained

    want, asked = enc.features(images), []
    real = pretrained.pipeline.array_batches
    monkeypatch.setattr(pretrained.pipeline, "array_batches",
                        lambda x, mesh, batch, **kw: asked.append(batch) or real(x, mesh, batch, **kw))
    n_dev = len(jax.local_devices())
    np.testing.assert_allclose(enc.features(images[:2], batch_size=10**9), want[:2], rtol=1e-5, atol=1e-5)
    assert asked == [n_dev]
    monkeypatch.setattr(pretrained, "MAX_BATCH_BYTES", 8 * 8 * 4 * 3)  # 3 images of 8x8x1 float32
    np.testing.assert_allclose(enc.features(images), want, rtol=1e-5, atol=1e-5)
    assert asked[-1] == n_dev  # (at least one image per device)


@pytest.mark.slow
def test_a_classifier_fine_tunes_a_copy_of_the_backbone(enc, images):
    import optax
    from flax import nnx

    before = enc.features(images)
    model = enc.classifier(10, seed=1)
    assert model.fc.kernel[...].shape == (enc.num_features, 10)
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    views, labels = enc.preprocess(images), sources.load_dataset("digits", "test").labels[:40]

    @nnx.jit  # (one compiled step: eager op-by-op dispatch of a ResNet's backward takes minutes)
    def step(model, optimizer, views, labels):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(views, train=True), labels).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    step(model, optimizer, views, labels)
    assert not np.allclose(model.backbone.conv1.kernel[...], enc.module.backbone.conv1.kernel[...])
    np.testing.assert_array_equal(enc.features(images), before)  # the encoder itself is untouched


@pytest.mark.slow
def test_a_fine_tuned_classifier_saves_and_loads_with_its_input(enc, images, tmp_path):
    """save_classifier / load_classifier: the same logits as the model saved (inference mode),
    its input spec and classes kept; raw uint8 into a Classifier, an encoder read as a classifier
    and the reverse are one clear error each."""
    from flax import nnx

    model = enc.classifier(10, seed=3)
    model.fc.bias[...] = np.arange(10, dtype=np.float32)  # (so a fresh head would not match)
    enc.save_classifier(model, tmp_path / "tuned")
    tuned = hcsc_jax.load_classifier(tmp_path / "tuned")
    assert tuned.input == enc.input and tuned.meta["num_classes"] == 10
    want = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, enc.preprocess(images)))
    np.testing.assert_allclose(tuned.logits(images, batch_size=16), want, rtol=1e-5, atol=1e-5)
    assert tuned.logits(np.zeros((0, 8, 8, 1), np.uint8)).shape == (0, 10)
    with pytest.raises(ValueError, match="takes the normalized float crops of preprocess"):
        model(np.zeros((2, 8, 8, 1), np.uint8), train=False)
    with pytest.raises(ValueError, match="holds a fine-tuned classifier, not an encoder: read it with"):
        hcsc_jax.load_encoder(tmp_path / "tuned")
    meta = {k: v for k, v in enc.meta.items() if k != "step"}
    meta["input"] = enc.input.__dict__
    checkpoints.export_encoder(str(tmp_path / "export"), meta, *enc.split()[1:])
    with pytest.raises(ValueError, match="holds an encoder, not a fine-tuned classifier"):
        hcsc_jax.load_classifier(tmp_path / "export")
