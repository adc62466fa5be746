"""Users' diffusers `UNet2DModel` checkpoints as a family: DDPM training loss and the DDIM sampler.

Schedule and sampler follow diffusers' DDPMScheduler/DDIMScheduler step for step (tested against the
library), so a user's model samples here as in their own pipeline. diffusers is imported lazily: only
building a network or reading a folder pays its import time.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from models.checkpoint import CheckpointError, read as read_safetensors
from models.errors import ConfigError
from models.family import Family, Options, register
from models.guidance import guided

# 3 blocks: UNet2DModel's last down block keeps its size, so 28 -> 14 -> 7 (and back) works.
DEFAULT_UNET = {"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "attention_head_dim": 8}
WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset")


class DiffusersConfig(Options):
    unet: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_UNET))  # UNet2DModel kwargs; channels: data's
    num_train_timesteps: Annotated[int, Field(ge=2)] = 1000  # T: noise levels of the training chain
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # how noise grows with t
    beta_start: Annotated[float, Field(gt=0, lt=1)] = 0.0001  # beta at t=0 (linear schedules)
    beta_end: Annotated[float, Field(gt=0, lt=1)] = 0.02  # beta at t=T-1 (linear schedules)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"  # network predicts noise, v or x0
    clip_sample: bool = True  # the sampler clamps its x0 estimate to +-clip_sample_range
    clip_sample_range: Annotated[float, Field(gt=0)] = 1.0  # that clamp's bound
    set_alpha_to_one: bool = True  # last DDIM step lands on alpha_bar = 1 (clean); False = on alpha_bar[0]
    steps_offset: Annotated[int, Field(ge=0)] = 0  # added to "leading" timesteps (1 in Stable Diffusion schedulers)

    @field_validator("unet")
    @classmethod
    def _unet_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from diffusers import UNet2DModel
        known = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
        if unknown := sorted(set(v) - known):
            raise ValueError(f"unknown UNet2DModel option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return v


class DDIMSettings(Options):
    num_steps: Annotated[int, Field(ge=1, le=1000)] = 10  # DDIM steps (network calls); fewer = more mode-seeking
    eta: Annotated[float, Field(ge=0, le=1)] = 0.0  # 0 = deterministic DDIM, 1 = DDPM-like ancestral noise
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"  # which t to visit, as diffusers
    guidance: Annotated[float, Field(ge=0)] = 1.0  # classifier-free guidance (conditional models); > 1 is mode-seeking


def alphas_cumprod(config: dict) -> torch.Tensor:
    """alpha_bar_t in float32, rounded exactly as diffusers' schedulers round it."""
    n, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
    else:  # Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999 so the last step stays finite
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


class DiffusersUNet(nn.Module):
    """UNet2DModel under `unet.` plus the schedule its sampler needs (not saved: it follows from the config)."""
    def __init__(self, unet: nn.Module, config: dict):
        super().__init__()
        self.unet = unet
        self.label_dim = config.get("label_dim", 0)
        self.schedule = {k: config[k] for k in SCHEDULE_KEYS}
        self.register_buffer("alphas_cumprod", alphas_cumprod(config), persistent=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_dim and labels is None:  # row label_dim of the class embedding means "no label"
            labels = torch.full((x.shape[0],), self.label_dim, dtype=torch.long, device=x.device)
        return self.unet(x, timesteps, class_labels=labels if self.label_dim else None).sample


def build(config: dict) -> DiffusersUNet:
    from diffusers import UNet2DModel
    kwargs, (c, h, w) = dict(config["unet"]), config["image_shape"]
    kwargs.setdefault("in_channels", c)
    kwargs.setdefault("out_channels", kwargs["in_channels"])
    kwargs.setdefault("sample_size", h if h == w else [h, w])
    if kwargs["in_channels"] != c or kwargs["out_channels"] != c:  # learned-variance UNets output 2c
        raise ConfigError(f"the UNet maps {kwargs['in_channels']} to {kwargs['out_channels']} channels; "
                         f"the data has {c} and the sampler needs one prediction per channel")
    label_dim = config.get("label_dim", 0)
    want = label_dim + 1 if label_dim else None  # the last row of the class embedding means "no label"
    if kwargs.get("class_embed_type") or kwargs.get("num_class_embeds") not in (None, want):
        raise ConfigError(f"label_dim={label_dim} needs a plain class embedding with num_class_embeds={want}; "
                         f"the UNet has {kwargs.get('num_class_embeds')} and class_embed_type "
                         f"{kwargs.get('class_embed_type')!r}")
    kwargs["num_class_embeds"] = want
    return DiffusersUNet(UNet2DModel(**kwargs), config)


def loss(config: dict):
    """DDPM's simple loss: t uniform in [0, T), MSE to the prediction type's target."""
    abar_all, kind = alphas_cumprod(config), config["prediction_type"]

    def ddpm_loss(model, images, labels, generator=None):
        t = torch.randint(0, len(abar_all), (images.shape[0],), generator=generator, device=images.device)
        eps = torch.randn(images.shape, generator=generator, device=images.device)
        abar = abar_all.to(images.device)[t].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        target = {"epsilon": eps, "v_prediction": a * eps - s * images, "sample": images}[kind]
        return ((model(a * images + s * eps, t, labels).float() - target) ** 2).mean()
    return ddpm_loss


def timesteps(settings: DDIMSettings, num_train: int, steps_offset: int) -> list[int]:
    n = settings.num_steps
    if n > num_train:
        raise ConfigError(f"num_steps={n} exceeds the model's num_train_timesteps={num_train}")
    if settings.timestep_spacing == "leading":
        return [i * (num_train // n) + steps_offset for i in reversed(range(n))]
    if settings.timestep_spacing == "trailing":
        return [round(num_train - i * (num_train / n)) - 1 for i in range(n)]
    step = (num_train - 1) / (n - 1) if n > 1 else 0.0  # i * step, as numpy's linspace rounds it
    return [round(i * step) for i in reversed(range(n))]


@torch.no_grad()
def sample(model: DiffusersUNet, latents: torch.Tensor, settings: DDIMSettings, labels=None, noise=None):
    """DDIM (Song et al. 2021) as diffusers' DDIMScheduler steps it; images clamped to [-1, 1].

    In float32 like diffusers: early steps divide by sqrt(alpha_bar_T) ~ 0.006, which magnifies rounding,
    so float64 would draw samples visibly (> 1e-5) apart from the user's own pipeline's.
    """
    sch, abar_all = model.schedule, model.alphas_cumprod
    # diffusers steps back by T // num_steps whatever the spacing; kept so a user's model samples the same.
    stride = sch["num_train_timesteps"] // settings.num_steps
    final = torch.ones((), device=latents.device) if sch["set_alpha_to_one"] else abar_all[0]
    x = latents.to(torch.float32)
    for t in timesteps(settings, sch["num_train_timesteps"], sch["steps_offset"]):
        a, a_prev = abar_all[t], abar_all[t - stride] if t - stride >= 0 else final
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = guided(model, x, tt, labels, settings.guidance).to(torch.float32)
        if sch["prediction_type"] == "epsilon":
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        elif sch["prediction_type"] == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if sch["clip_sample"]:  # eps stays the unclipped one, as in diffusers
            x0 = x0.clamp(-sch["clip_sample_range"], sch["clip_sample_range"])
        std = settings.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps
        if settings.eta > 0:
            x = x + std * (noise or (lambda shape: torch.randn(shape)))(x.shape).to(x.device)
    return x.clamp(-1, 1)


def _json(path: Path, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; {fix}")
    return data


def read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers model folder (config.json + weights) or pipeline folder (unet/, scheduler/) as
    (float32 state dict under `unet.`, full config: Config fields + image_shape + label_dim).

    image_shape = [in_channels, *sample_size]; label_dim = num_class_embeds - 1 (0 without classes).
    The scheduler's schedule options are used when it has them, else Config defaults.
    """
    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    raw = _json(unet_dir / "config.json", f"export the model with `UNet2DModel.save_pretrained('{unet_dir}')`")
    if (kind := raw.get("_class_name")) != "UNet2DModel":
        raise CheckpointError(f"{unet_dir / 'config.json'} describes a {kind!r}; only diffusers UNet2DModel "
                              "(unconditional or class-conditional pixel models) is supported")
    unet = {k: v for k, v in raw.items() if not k.startswith("_")}
    size = unet.get("sample_size")
    if size is None:
        raise CheckpointError(f"{unet_dir / 'config.json'} has no sample_size; set it to the training image size")
    sched_file = next((p for p in (path / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json")
                       if p.is_file()), None)
    sched = _json(sched_file, "re-export the pipeline") if sched_file else {}
    if sched.get("trained_betas") is not None or sched.get("rescale_betas_zero_snr") or sched.get("thresholding"):
        raise CheckpointError(f"{sched_file} uses trained_betas, rescale_betas_zero_snr or thresholding, which this "
                              "family does not implement; retrain with a beta_schedule instead")
    try:
        cfg = DiffusersConfig(unet=unet, **{k: sched[k] for k in SCHEDULE_KEYS if k in sched}).model_dump()
    except ValueError as exc:
        raise CheckpointError(f"{unet_dir} is not a supported diffusers UNet: {exc}") from None
    cfg["image_shape"] = [unet.get("in_channels", 3), *([size, size] if isinstance(size, int) else size)]
    cfg["label_dim"] = (unet.get("num_class_embeds") or 1) - 1
    shards = sorted(unet_dir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    files = [unet_dir / WEIGHTS] if (unet_dir / WEIGHTS).is_file() else shards
    if not files:
        found = sorted(p.name for p in unet_dir.iterdir())
        hint = ("; the .bin weights are a pickle, which is never loaded: convert them once in a trusted "
                f"environment with `UNet2DModel.from_pretrained('{unet_dir}')"
                f".save_pretrained('{unet_dir}', safe_serialization=True)`"
                if any(n.endswith(".bin") for n in found) else "")
        raise CheckpointError(f"{unet_dir} has no {WEIGHTS} (found: {', '.join(found) or 'nothing'}){hint}")
    state = {k: v for f in files for k, v in read_safetensors(f)[0].items()}  # refuses pickles in disguise
    # float32 whatever the export's dtype (fp16 variants): built models are float32 and must match exactly.
    return {f"unet.{k}": v.float() if v.is_floating_point() else v for k, v in state.items()}, cfg


FAMILY = register(Family(
    name="diffusers", summary="diffusers UNet2DModel, DDPM loss, DDIM sampler; mode-seeking: few steps "
    "(num_steps ~10), eta 0, guidance > 1", Config=DiffusersConfig, Settings=DDIMSettings, build=build, loss=loss,
    sample=sample, data_kind="image", read_folder=read_folder))
