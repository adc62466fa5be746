"""The user's own data and reference statistics: a folder, a zip (EDM/StyleGAN dataset.json) and an S3
prefix give the same images, labels and content digest; bad data stops with one line naming the file;
imported .npz statistics stand in for computed ones. Each test runs the stages in a fresh folder."""
from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import data, reference, sources, store
from stages.artifacts import read_manifest
from stages.common import DATA, REFERENCE, StageError, load_images
from stages.params import DataParams, ReferenceParams

FAST_REFERENCE = dict(steps=3, batch_size=8, inception_n=0)  # statistics, not a good classifier, are under test


@pytest.fixture(scope="module")
def digits():
    """30 real digits, 10 each of classes 0, 1 and 2."""
    images, labels, _ = data._mnist_5k()
    keep = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(3)])
    return images[keep], labels[keep]


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_class_folders(root: Path, images, labels) -> Path:
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        (root / str(label) / f"digit{i:03d}.png").write_bytes(png(image))
    return root


def write_edm_zip(path: Path, images, labels) -> Path:
    """The StyleGAN/EDM dataset_tool layout, listed in reverse so that order cannot be what matches."""
    names = [f"{i // 10:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, image in reversed(list(zip(names, images))):
            z.writestr(name, png(image))
        z.writestr("dataset.json", json.dumps({"labels": [[n, int(c)] for n, c in zip(names, labels)]}))
    return path


def run_data(source: str) -> tuple[dict, np.ndarray, np.ndarray | None]:
    manifest = data.run(DataParams(source=source))
    images, labels = load_images(DATA / "images.npz")
    return manifest["data"], images, labels


def classifier_stats() -> tuple[np.ndarray, np.ndarray]:
    reference.run(ReferenceParams(**FAST_REFERENCE))
    with np.load(REFERENCE / "classifier.npz") as z:
        return z["mu"], z["sigma"]


def test_folder_zip_and_s3_give_the_same_data_and_statistics(digits, workdir, s3_store, monkeypatch):
    images, labels = digits
    for key, value in store.s3_env(s3_store.endpoint).items():
        monkeypatch.setenv(key, value)
    folder = write_class_folders(workdir / "digits", images, labels)
    archive = write_edm_zip(workdir / "digits.zip", images, labels)
    fs = store.filesystem(s3_store.endpoint)
    fs.put(str(folder), f"{s3_store.bucket}/user/digits", recursive=True)
    fs.put(str(archive), f"{s3_store.bucket}/user/digits.zip")

    results = {}
    for source in ("digits", "digits.zip", f"s3://{s3_store.bucket}/user/digits", f"s3://{s3_store.bucket}/user/digits.zip"):
        results[source] = (*run_data(source), *classifier_stats())
    first_meta, first_images, first_labels, first_mu, first_sigma = results["digits"]
    assert first_meta["shape"] == [1, 28, 28] and first_meta["count"] == 30
    assert first_meta["kind"] == "image" and first_meta["classes"] == 3
    assert first_labels.dtype == np.int64
    # the same set of (image, label) pairs as went in, in the canonical order
    assert sorted(zip(map(bytes, first_images), first_labels)) == sorted(zip(map(bytes, images), labels))
    for source, (meta, got_images, got_labels, mu, sigma) in results.items():
        assert meta["content_digest"] == first_meta["content_digest"], source
        np.testing.assert_array_equal(got_images, first_images, err_msg=source)
        np.testing.assert_array_equal(got_labels, first_labels, err_msg=source)
        np.testing.assert_allclose(mu, first_mu, err_msg=source)
        np.testing.assert_allclose(sigma, first_sigma, err_msg=source)
    assert read_manifest(DATA)["inputs"]["source"]["digest"] == first_meta["content_digest"]


def test_rgb_and_jpeg_without_labels(workdir):
    rng = np.random.default_rng(0)
    root = workdir / "wrapped" / "faces"  # one folder around everything (as `zip -r` makes) is not a class
    root.mkdir(parents=True)
    for i in range(6):
        image = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        image.save(root / f"face{i}.{'png' if i % 2 else 'jpg'}")
    (root / "notes.txt").write_text("not an image: ignored")
    meta, images, labels = run_data("wrapped")
    assert meta["shape"] == [3, 12, 16] and meta["classes"] == 0 and labels is None
    assert images.dtype == np.uint8 and images.shape == (6, 3, 12, 16)


def test_mnist_keeps_its_order_and_gains_a_content_digest():
    meta, images, labels = run_data("mnist")
    original, original_labels, _ = data._mnist_5k()
    np.testing.assert_array_equal(images, original)
    np.testing.assert_array_equal(labels, original_labels)
    assert meta["classes"] == 10 and meta["content_digest"] == sources.content_digest(original, original_labels)


def test_fashion_mnist_from_the_debian_layout(workdir, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", workdir / "absent")
    with pytest.raises(StageError, match="apt-get install dataset-fashion-mnist"):
        data.run(DataParams(source="fashion-mnist"))
    directory = workdir / "fashion"
    directory.mkdir()
    pixels = np.arange(3 * 28 * 28, dtype=np.uint8)
    header = np.array([0x803, 3, 28, 28], ">u4").tobytes()
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(np.array([0x801, 3], ">u4").tobytes() + bytes([4, 0, 9])))
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", directory)
    meta, images, labels = run_data("fashion-mnist")
    assert meta["shape"] == [1, 28, 28] and meta["classes"] == 10 and labels.tolist() == [4, 0, 9]
    np.testing.assert_array_equal(images.ravel(), pixels)


def _truncated(root: Path, digits):
    write_class_folders(root, *digits)
    victim = root / "1" / "digit012.png"
    victim.write_bytes(victim.read_bytes()[:60])
    return "1/digit012.png", "not a readable PNG/JPEG image"


def _mixed_sizes(root: Path, digits):
    write_class_folders(root, *digits)
    (root / "2" / "digit025.png").write_bytes(png(np.zeros((1, 32, 32), np.uint8)))
    return "2/digit025.png", "is 32x32 L but .* is 28x28 L"


def _mixed_modes(root: Path, digits):
    write_class_folders(root, *digits)
    (root / "2" / "digit025.png").write_bytes(png(np.zeros((3, 28, 28), np.uint8)))
    return "2/digit025.png", "is 28x28 RGB but .* is 28x28 L"


def _empty(root: Path, digits):
    (root / "0").mkdir(parents=True)
    return "data.source = bad", "no PNG or JPEG images"


def _label_names_missing_file(root: Path, digits):
    write_class_folders(root, *digits)
    entries = [[p.relative_to(root).as_posix(), int(p.parent.name)] for p in sorted(root.rglob("*.png"))]
    (root / "dataset.json").write_text(json.dumps({"labels": entries + [["0/gone.png", 0]]}))
    return "dataset.json: labels '0/gone.png', which is not an image", "remove the entry or add the image"


def _image_without_label(root: Path, digits):
    write_class_folders(root, *digits)
    entries = [[p.relative_to(root).as_posix(), int(p.parent.name)] for p in sorted(root.rglob("*.png"))]
    (root / "dataset.json").write_text(json.dumps({"labels": entries[1:]}))
    return f"bad/{entries[0][0]}: has no label in dataset.json", "add"


def _images_beside_class_folders(root: Path, digits):
    write_class_folders(root, *digits)
    (root / "stray.png").write_bytes(png(digits[0][0]))
    return "bad/stray.png: lies beside class sub-folders", "put every image in a class sub-folder"


@pytest.mark.parametrize("make_bad", [_truncated, _mixed_sizes, _mixed_modes, _empty, _label_names_missing_file,
                                      _image_without_label, _images_beside_class_folders])
def test_bad_data_is_named_and_nothing_is_written(make_bad, digits, workdir):
    named, problem = make_bad(workdir / "bad", digits)
    with pytest.raises(StageError) as err:
        data.run(DataParams(source="bad"))
    message = str(err.value)
    assert "\n" not in message and named in message, message
    assert re.search(problem, message), message
    assert not DATA.exists() and not list(Path("artifacts").glob(".data.*"))  # nothing half-written


def test_unknown_source_names_the_choices():
    with pytest.raises(StageError, match=r"'cifar' is neither a built-in \(mnist, toy2d, fashion-mnist\)"):
        data.run(DataParams(source="cifar"))


def _stats(path: Path, dim: int, **extra) -> Path:
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        np.savez(f, **{"mu": rng.normal(size=dim), "sigma": np.eye(dim, dtype=np.float32), **extra})
    return path


@pytest.fixture
def labelled(digits, workdir):
    write_class_folders(workdir / "digits", *digits)
    data.run(DataParams(source="digits"))


def test_imported_npz_is_the_inception_space(labelled, workdir, monkeypatch):
    stats = _stats(workdir / "edm-ref.npz", 2048)
    manifest = reference.run(ReferenceParams(**FAST_REFERENCE, stats=str(stats)))
    assert list(manifest["reference"]["spaces"]) == ["classifier", "inception"]
    assert manifest["inputs"]["stats"]["path"] == str(stats)
    monkeypatch.setattr(reference, "InceptionFeatures", lambda directory: None)  # the network itself is not under test
    spaces = reference.load_spaces()
    with np.load(stats) as z:
        np.testing.assert_array_equal(spaces["inception"].mu, z["mu"])
        np.testing.assert_array_equal(spaces["inception"].sigma, z["sigma"])
    assert spaces["inception"].real.shape == (0, 2048) and spaces["inception"].dim == 2048
    assert len(spaces["classifier"].real) == 30  # the computed space keeps its real features


def test_imported_classifier_statistics(labelled, workdir):
    stats = _stats(workdir / "clf.npz", 128)
    reference.run(ReferenceParams(**FAST_REFERENCE, stats=str(stats), stats_space="classifier"))
    with np.load(REFERENCE / "classifier.npz") as got, np.load(stats) as want:
        np.testing.assert_array_equal(got["mu"], want["mu"])
        assert "features" not in got.files


@pytest.mark.parametrize("arrays, space, message", [
    ({"mu": np.zeros(64), "sigma": np.eye(64)}, "inception", r"mu \(64,\) / sigma \(64, 64\) are not the 2048-d inception space"),
    ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "classifier", "are not the 128-d classifier space"),
    ({"mu": np.zeros(2048)}, "inception", "has no sigma"),
])
def test_imported_npz_that_does_not_fit_is_refused(arrays, space, message, labelled, workdir):
    path = workdir / "ref.npz"
    np.savez(path, **arrays)
    with pytest.raises(StageError, match=message) as err:
        reference.run(ReferenceParams(**FAST_REFERENCE, stats=str(path), stats_space=space))
    assert "reference.stats = " in str(err.value) and not REFERENCE.exists()


def test_unlabelled_data_needs_inception_statistics(digits, workdir):
    root = workdir / "flat"
    root.mkdir()
    for i, image in enumerate(digits[0]):
        (root / f"{i}.png").write_bytes(png(image))
    data.run(DataParams(source="flat"))
    with pytest.raises(StageError, match="classifier feature space needs them .*reference.stats"):
        reference.run(ReferenceParams(**FAST_REFERENCE))
    with pytest.raises(StageError, match="stats_space = classifier needs .* labelled"):
        reference.run(ReferenceParams(**FAST_REFERENCE, stats=str(_stats(workdir / "c.npz", 128)),
                                      stats_space="classifier"))
    manifest = reference.run(ReferenceParams(**FAST_REFERENCE, stats=str(_stats(workdir / "i.npz", 2048))))
    assert list(manifest["reference"]["spaces"]) == ["inception"]
