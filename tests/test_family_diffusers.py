"""models/diffusers_unet.py against the diffusers library itself: folders, schedule, DDIM, training, checkpoints."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from pydantic import ValidationError

from models import checkpoint, diffusers_unet as du
from models.checkpoint import CheckpointError
from models.merge import merge
from models.sampling import generate
from models.training import fit
from stages.data import _mnist_5k

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with the cores shared, thread hand-offs cost 100x the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def library_unet(seed=0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # a fresh output layer is near zero: make the outputs depend on the network
        unet.conv_out.weight.normal_(0, 0.3)
    return unet


def load(folder):
    state, config = du.read_folder(folder)
    model = du.build(config)
    model.load_state_dict(state)
    return model.eval(), state, config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet = library_unet()
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder)
    return unet, folder


def test_folder_matches_library_outputs(saved):
    unet, folder = saved
    model, state, config = load(folder)
    assert all(k.startswith("unet.") for k in state) and len(state) == len(unet.state_dict())
    assert config["image_shape"] == [1, 8, 8] and config["label_dim"] == 0
    assert config["prediction_type"] == "epsilon" and config["beta_schedule"] == "linear"  # no scheduler: defaults
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t).sample)


def test_class_conditional_folder(tmp_path):
    unet = library_unet(num_class_embeds=4)
    unet.save_pretrained(tmp_path)
    model, _, config = load(tmp_path)
    assert config["label_dim"] == 3  # row 3 is "no label"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 2])), unet(x, t, class_labels=torch.tensor([0, 2])).sample)
        assert torch.equal(model(x, t), unet(x, t, class_labels=torch.tensor([3, 3])).sample)


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_alphas_cumprod_match_diffusers(schedule, start, end):
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(num_train_timesteps=1000, beta_schedule=schedule, beta_start=start, beta_end=end).alphas_cumprod
        ours = du.alphas_cumprod(dict(num_train_timesteps=1000, beta_schedule=schedule, beta_start=start, beta_end=end))
        assert ours.dtype == torch.float32 and torch.equal(ours, ref)


def ddim_reference(unet, scheduler, latents, steps, eta=0.0, noises=()):
    scheduler.set_timesteps(steps)
    x, noises = latents.clone(), list(noises)
    with torch.no_grad():
        for t in scheduler.timesteps:
            extra = {"variance_noise": noises.pop(0)} if eta else {}
            x = scheduler.step(unet(x, t).sample, t, x, eta=eta, **extra).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction,clip,alpha_one,offset",
                         [("epsilon", True, True, 0), ("v_prediction", False, False, 1), ("sample", True, False, 1)])
def test_ddim_matches_diffusers_scheduler(saved, spacing, prediction, clip, alpha_one, offset):
    unet, folder = saved
    _, state, config = load(folder)
    schedule = dict(prediction_type=prediction, clip_sample=clip, set_alpha_to_one=alpha_one, steps_offset=offset,
                    beta_schedule="squaredcos_cap_v2" if prediction == "v_prediction" else "linear")
    model = du.build({**config, **schedule})
    model.load_state_dict(state)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = ddim_reference(unet, DDIMScheduler(timestep_spacing=spacing, **schedule), latents, 5)
    ours = du.sample(model.eval(), latents, du.DDIMSettings(num_steps=5, timestep_spacing=spacing))
    assert ours.dtype == torch.float32 and ours.shape == latents.shape
    assert (ref.abs() < 0.99).float().mean() > 0.1  # not saturated: the comparison sees the network
    assert (ours - ref).abs().max() < 1e-5


def test_ddim_eta_uses_the_given_noise(saved):
    unet, folder = saved
    model, _, _ = load(folder)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    noises = [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    ref = ddim_reference(unet, DDIMScheduler(), latents, 4, eta=1.0, noises=noises)
    queue = list(noises)
    ours = du.sample(model, latents, du.DDIMSettings(num_steps=4, eta=1.0), noise=lambda shape: queue.pop(0))
    assert not queue and (ours - ref).abs().max() < 1e-5


def test_pipeline_folder_reads_scheduler(tmp_path):
    unet = library_unet(seed=3)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                                    clip_sample=False)).save_pretrained(tmp_path)
    model, _, config = load(tmp_path)
    assert (config["beta_schedule"], config["prediction_type"], config["clip_sample"]) == \
        ("squaredcos_cap_v2", "v_prediction", False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t).sample)


def test_pickled_weights_refused_with_conversion_hint(tmp_path):
    library_unet().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    convert = r"pickle.*trusted.*from_pretrained\('.*'\)\.save_pretrained\('.*', safe_serialization=True\)"
    with pytest.raises(CheckpointError, match=convert):
        du.read_folder(tmp_path)


def test_bad_folders_name_the_file_and_the_fix(tmp_path, saved):
    with pytest.raises(CheckpointError, match=r"config\.json is missing.*save_pretrained"):
        du.read_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not readable JSON"):
        du.read_folder(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"config\.json is not a JSON object"):
        du.read_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match=r"config\.json describes a 'UNet2DConditionModel'.*UNet2DModel"):
        du.read_folder(tmp_path)
    (tmp_path / "config.json").write_text((saved[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"has no diffusion_pytorch_model\.safetensors \(found: config\.json\)"):
        du.read_folder(tmp_path)


def test_checkpoint_round_trip_and_merge(saved, tmp_path):
    unet, folder = saved
    model, state, config = load(folder)
    checkpoint.save(tmp_path / "model.safetensors", model.state_dict(), "diffusers", config)
    loaded, family, loaded_config = checkpoint.load_model(tmp_path / "model.safetensors")
    assert family is du.FAMILY and loaded_config == json.loads(json.dumps(config))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), unet(x, t).sample)
    other = {k: v + 0.01 for k, v in state.items()}
    merged = merge(state, other, 1.0, method="neon")
    assert torch.allclose(merged["unet.conv_out.weight"], state["unet.conv_out.weight"] - 0.01)
    du.build(config).load_state_dict(merged)


def test_default_config_and_validation():
    config = {**du.DiffusersConfig().model_dump(), "image_shape": [1, 28, 28], "label_dim": 10, "label_dropout": 0.1}
    model = du.build(config).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28), torch.tensor([5, 900]), torch.tensor([3, 10])).shape == (2, 1, 28, 28)
    with pytest.raises(ValidationError, match="unknown UNet2DModel option 'channels'"):
        du.DiffusersConfig(unet={"channels": 8})
    with pytest.raises(ValidationError):
        du.DiffusersConfig(beta_schedule="sigmoid")
    short = du.build({**config, "num_train_timesteps": 50})
    with pytest.raises(ValueError, match="num_steps=100 exceeds the model's num_train_timesteps=50"):
        du.sample(short, torch.randn(1, 1, 28, 28), du.DDIMSettings(num_steps=100))


def test_generate_with_guidance_is_per_seed(tmp_path):
    library_unet(num_class_embeds=4).save_pretrained(tmp_path)
    model, _, _ = load(tmp_path)
    settings = du.DDIMSettings(num_steps=3, eta=1.0, guidance=2.0)
    labels = torch.tensor([0, 1, 2])
    a = generate(model, du.FAMILY, settings, (1, 8, 8), [5, 6, 7], batch_size=3, labels=labels)
    b = generate(model, du.FAMILY, settings, (1, 8, 8), [5, 6, 7], batch_size=1, labels=labels)
    assert a.dtype == torch.uint8 and a.shape == (3, 1, 8, 8)
    assert (a.int() - b.int()).abs().max() <= 1


def test_loss_decreases_on_digits():
    images, _, _ = _mnist_5k()
    images = torch.from_numpy(images[::10][:256])[:, :, ::2, ::2][:, :, 3:11, 3:11].contiguous()  # 8x8 digit centres
    unet = {k: v for k, v in TINY.items() if k not in ("in_channels", "out_channels", "sample_size")}  # data's
    config = {**du.DiffusersConfig(unet=unet).model_dump(), "image_shape": [1, 8, 8], "label_dim": 0,
              "label_dropout": 0.0}
    torch.manual_seed(0)
    model, loss_fn = du.build(config), du.loss(config)
    batch = images[:64].float() / 127.5 - 1
    value = loss_fn(model, batch, None, torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and all(p.grad is not None for p in model.parameters())
    fixed = lambda m: loss_fn(m, batch, None, torch.Generator().manual_seed(123)).item()
    before = fixed(model.eval())
    trained = fit(model, loss_fn, images, None, steps=20, batch_size=32, lr=2e-3, seed=0)
    assert fixed(trained) < 0.8 * before


def test_sharded_folder(tmp_path):
    unet = library_unet(seed=4)
    unet.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    model, _, _ = load(tmp_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([7, 70])
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t).sample)
