"""Bad params.yaml, exhaustively: every invalid value stops with one line that names its dotted key.

Property tests mutate the tiny preset (wrong types, negatives, NaN/inf, huge numbers, empty strings,
lists and mappings where scalars go, booleans where numbers go, unknown keys at every level, missing
keys and sections), write it to a file and load it with `stages.params.load`: the result is either
valid params or one `ParamsError` line that starts with the file and names the key. Anything else (a
traceback) fails the test. Cross-field constraints are checked against exact oracles, and a few cases
go through the real entry point (`python -m flows train`) to see the one `error:` line a user sees.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from stages import params
from stages.params import ParamsError

REPO = Path(__file__).resolve().parents[2]
TINY_RAW = yaml.safe_load((REPO / "tests" / "tiny_params.yaml").read_text())

# Deterministic in CI: derandomized, no example database, no deadline (2 shared CPU cores).
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=60)


# --- The tree of the tiny preset ---------------------------------------------------------------------

def _paths(node, prefix=()):
    """Every key path in a raw params tree: sections, leaves and list elements."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


PATHS = _paths(TINY_RAW)


def get(raw, path):
    for key in path:
        raw = raw[key]
    return raw


def with_value(path, value):
    raw = copy.deepcopy(TINY_RAW)
    get(raw, path[:-1])[path[-1]] = value
    return raw


def without(path):
    raw = copy.deepcopy(TINY_RAW)
    del get(raw, path[:-1])[path[-1]]
    return raw


def dotted(path) -> str:
    return ".".join(str(k) for k in path)


DICT_PATHS = [()] + [p for p in PATHS if isinstance(get(TINY_RAW, p), dict)]
DEFAULTS = params.Params().model_dump()


def known_keys(path) -> set[str]:
    """The names valid at a mapping of the tree (for evaluate.sampler: the active family's sampler settings)."""
    if path == ("evaluate", "sampler"):
        return set(DEFAULTS["sample"]["sampler"][TINY_RAW["model"]["family"]])
    return set(get(DEFAULTS, path))


# --- Checking one params file -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "params.yaml"


def write(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def load_outcome(path: Path) -> str | None:
    """None when the params load; else the error line, checked to be one line that names the file."""
    try:
        params.load(path)
    except ParamsError as exc:
        msg = str(exc)
        assert len(msg.splitlines()) == 1, msg  # no \n, \r, \x85, \u2028 ...
        assert msg.startswith(f"{path}: "), msg
        assert len(msg) < 1000, msg
        return msg
    return None


def has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    return False


def must_fail(original, value) -> bool:
    """Replacements that no valid params.yaml has, whatever the key."""
    if has_non_finite(value):
        return True
    if isinstance(original, dict):  # a section: only a mapping goes there
        return not isinstance(value, dict)
    if isinstance(original, list):
        return not isinstance(value, list)
    if isinstance(value, (list, dict)) or value is None:  # a scalar's place (tiny has no optional scalars)
        return True
    numeric = isinstance(original, (int, float)) and not isinstance(original, bool)
    return numeric and isinstance(value, bool)


# --- Values that do not belong --------------------------------------------------------------------------

SPECIAL_NUMBERS = st.sampled_from([0, -1, -10 ** 6, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30, -10 ** 30, 0.0, -0.0, 1e-300,
                                   1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, -2.5])
SPECIAL_STRINGS = st.sampled_from(["", " ", "nan", "inf", "-1", "1e400", "yes", "null", "~", "../x", "/", "artifacts/x",
                                   ".git", "s3://", "s3://Bad_Bucket/x", "s3://neon/../x", "a\x00b", "x" * 500,
                                   "edm", "model.pt", "http://example.com/x"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10 ** 25, max_value=10 ** 25), SPECIAL_NUMBERS,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), SPECIAL_STRINGS)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(min_size=1, max_size=6), SCALARS, max_size=2),
)


# --- Properties -------------------------------------------------------------------------------------------

@FUZZ
@given(path=st.sampled_from(PATHS), value=VALUES)
@example(path=("sample", "n"), value=float("nan"))
@example(path=("sample", "sampler", "edm", "sigma_max"), value=float("inf"))
@example(path=("train", "lr"), value=[0.1])
@example(path=("sample", "n"), value={"a": 1})
@example(path=("data", "source"), value="")
@example(path=("merge", "weights"), value=[])
@example(path=("sample", "seed"), value=2 ** 64)
@example(path=("sample", "n"), value=True)
@example(path=("model", "edm", "channels", 0), value=-3)
@example(path=("data",), value={"\r": None})
@example(path=("data", "source"), value="a\u2028b")
@example(path=("merge", "weights", 1), value=0.5)
def test_every_bad_value_is_one_line_naming_its_key(params_file, path, value):
    original = get(TINY_RAW, path)
    msg = load_outcome(write(params_file, with_value(path, value)))
    if must_fail(original, value):
        assert msg is not None, f"{dotted(path)} = {value!r} was accepted"
    if msg is not None:  # a list element may be named by its list (e.g. two equal merge.weights)
        assert dotted(path if isinstance(path[-1], str) else path[:-1]) in msg, msg


@FUZZ
@given(where=st.sampled_from(DICT_PATHS),
       key=st.one_of(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_ABCXYZ0123456789-", min_size=1, max_size=12),
                     st.integers(min_value=-5, max_value=5), st.none(), st.booleans()),
       value=SCALARS)
@example(where=(), key="bogus", value=1)
@example(where=("sample", "sampler", "edm"), key="num_step", value=5)
@example(where=("evaluate", "sampler"), key="temperature", value=1.0)
@example(where=("model",), key="edm2", value=None)
def test_unknown_keys_at_every_level_are_named(params_file, where, key, value):
    if isinstance(key, str) and key in known_keys(where):
        return  # a real key: not unknown
    raw = copy.deepcopy(TINY_RAW)
    get(raw, where)[key] = value
    msg = load_outcome(write(params_file, raw))
    assert msg is not None, f"unknown key {key!r} at {dotted(where) or 'the top level'} was accepted"
    if isinstance(key, str):
        assert dotted((*where, key)) in msg, msg
    else:  # YAML read it as a number, null or boolean: not a name
        assert "not a name" in msg and (dotted(where) or "the top level") in msg, msg


@FEW
@given(path=st.sampled_from(PATHS))
def test_missing_keys_and_sections_fall_back_to_defaults_or_are_named(params_file, path):
    msg = load_outcome(write(params_file, without(path)))
    if msg is not None:
        assert dotted(path) in msg, msg


def test_missing_sections_each(params_file):
    """Every section may be left out (its defaults apply), unless a default conflicts with what is set."""
    for section in TINY_RAW:
        msg = load_outcome(write(params_file, without((section,))))
        assert msg is None or section in msg, msg
    assert load_outcome(write(params_file, {"data": {"source": "mnist"}})) is None


@FEW
@given(data=st.binary(max_size=300))
@example(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
@example(data=b"\xff\xfe\x00s\x00a")
@example(data=b"sample: {n: 1}\x00")
def test_binary_garbage_is_one_line_naming_the_file(params_file, data):
    params_file.write_bytes(data)
    load_outcome(params_file)  # a mapping by chance may load; anything else is one line


@FEW
@given(text=st.text(max_size=200))
def test_any_text_is_params_or_one_line(params_file, text):
    params_file.write_text(text)
    load_outcome(params_file)


NOT_PARAMS = {
    "syntax error": ("sample: [unclosed\n", "not valid YAML"),
    "bad indentation": ("sample:\n  n: 1\n   seed: 2\n", "not valid YAML"),
    "tab indentation": ("sample:\n\tn: 1\n", "not valid YAML"),
    "list at top level": ("- data\n- sample\n", "expected a mapping"),
    "scalar at top level": ("just words\n", "expected a mapping"),
    "empty": ("", "is empty"),
    "only comments": ("# nothing here\n\n", "is empty"),
    "duplicate key": ("sample: {n: 10}\nsample: {n: 20}\n", "found the key 'sample' twice"),
    "duplicate nested key": ("sample:\n  n: 10\n  n: 20\n", "found the key 'n' twice"),
    "python tag": ("sample: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "control character": ("sample: {n: 1}\x07\n", "not valid YAML"),
    "deep nesting": ("a: " + "[" * 3000 + "]" * 3000 + "\n", "not valid YAML"),
    "self-referencing alias": ("merge: {weights: &w [1.0, *w]}\n", "nested more than"),
    "alias bomb": ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                   "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nmodel: {diffusers: {unet: {x: [*e, *e]}}}\n",
                   "expands to more than"),
    "non-string key": ("sample: {1: 2}\n", "key 1 at `sample` is not a name"),
}


@pytest.mark.parametrize("case", NOT_PARAMS)
def test_a_file_that_is_not_params_is_one_line(params_file, case):
    text, expected = NOT_PARAMS[case]
    params_file.write_text(text)
    msg = load_outcome(params_file)
    assert msg is not None and expected in msg, msg
    fixes = ("fix it, or restore it", "write it as the repository's", "write the value out", "write the values out",
             "fix or quote it")
    assert any(fix in msg for fix in fixes), msg  # and says what to do


def test_binary_file_and_folder_are_one_line(tmp_path):
    png = tmp_path / "params.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert "not a text file" in load_outcome(png)
    folder = tmp_path / "dir"
    (folder / "params.yaml").mkdir(parents=True)
    msg = load_outcome(folder / "params.yaml")
    assert "cannot be read" in msg


def test_merge_keys_and_anchors_still_work(params_file):
    """YAML's own reuse (anchors, aliases, `<<` merges) is not a duplicate key."""
    params_file.write_text("sample: &s {n: 48, shard_size: 16, batch_size: 16}\n"
                           "finetune: {<<: {steps: 4, batch_size: 16}, batch_size: 8}\n")
    p = params.load(params_file)
    assert p.sample.n == 48 and p.finetune.batch_size == 8


# --- Cross-field constraints, against exact oracles -----------------------------------------------------

def parse_tiny(**changes) -> str | None:
    try:
        params.parse(params.with_overrides(TINY_RAW, changes), "params.yaml")
    except ParamsError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


@FEW
@given(shard=st.integers(1, 64), batch=st.integers(1, 64))
def test_shards_are_whole_batches(shard, batch):
    msg = parse_tiny(**{"sample.shard_size": shard, "sample.batch_size": batch})
    assert (msg is None) == (shard % batch == 0), msg
    if msg:
        assert "`sample.shard_size`" in msg and "sample.batch_size" in msg


POSITIVE = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False)


@FEW
@given(lo=POSITIVE, hi=POSITIVE)
def test_edm_noise_levels_run_from_sigma_max_down_to_sigma_min(lo, hi):
    msg = parse_tiny(**{"sample.sampler.edm.sigma_min": lo, "sample.sampler.edm.sigma_max": hi})
    assert (msg is None) == (lo < hi), msg
    if msg:
        assert "`sample.sampler.edm.sigma_min`" in msg and "sample.sampler.edm.sigma_max" in msg
    override = parse_tiny(**{"evaluate.sampler": {"sigma_min": lo, "sigma_max": hi}})
    assert (override is None) == (lo < hi), override
    if override:
        assert "evaluate.sampler.sigma_min" in override


@FEW
@given(n=st.integers(50, 60), k=st.integers(1, 50), inception_n=st.integers(0, 60))
def test_evaluate_has_more_samples_than_neighbours(n, k, inception_n):
    msg = parse_tiny(**{"evaluate.n": n, "evaluate.k": k, "evaluate.inception_n": inception_n})
    assert (msg is None) == (k < n and (inception_n == 0 or inception_n > k)), msg
    if msg:
        assert "evaluate.k" in msg and ("evaluate.n" in msg or "evaluate.inception_n" in msg)


@FEW
@given(batch=st.integers(1, 200), n=st.sampled_from([16, 48, 96, 160]))
def test_finetune_batches_fit_the_synthetic_set(batch, n):
    msg = parse_tiny(**{"finetune.batch_size": batch, "sample.n": n, "sample.shard_size": 16, "sample.batch_size": 16})
    assert (msg is None) == (batch <= n), msg
    if msg:
        assert "`finetune.batch_size`" in msg and "sample.n" in msg


@FEW
@given(weights=st.lists(st.floats(min_value=-5, max_value=5, allow_nan=False).filter(bool), min_size=1, max_size=5))
def test_merge_weights_get_distinct_files(weights):
    msg = parse_tiny(**{"merge.weights": weights})
    names = [f"{w:g}" for w in weights]
    assert (msg is None) == (len(set(names)) == len(names)), msg
    if msg:
        assert "`merge.weights`" in msg


@pytest.mark.parametrize("changes, expected", [
    ({"merge.weights": []}, "`merge.weights`"),
    ({"merge.weights": [float("nan")]}, "`merge.weights.0` = nan"),
    ({"merge.weights": [1.0, float("inf")]}, "`merge.weights.1` = inf"),
    ({"merge.weights": [1.0, 0.0]}, "`merge.weights.1` = 0.0 is invalid: w = 0 is the base model"),
    ({"merge.weights": [1.0000001, 1.0000002]}, "both be saved as w=1.safetensors"),
    ({"evaluate.inception_n": 12, "reference.inception_n": 0}, "needs Inception reference statistics"),
    ({"data.source": "toy2d", "reference.inception_n": 0}, "`evaluate.inception_n` = 12 is invalid: must be 0 with data.source = toy2d"),
    ({"data.source": "toy2d", "evaluate.inception_n": 0, "reference.stats": "/tmp/stats.npz"}, "`reference.stats`"),
    ({"model.consistency.sigma_min": 2.0, "model.consistency.sigma_max": 1.0}, "`model.consistency.sigma_min` = 2.0"),
    ({"model.consistency.sigma_min": 1.5}, "`sample.sampler.consistency.sigma_low` = 1.0 is invalid: must be above model.consistency.sigma_min"),
    ({"sample.sampler.consistency.sigma_high": 100.0}, "must not exceed model.consistency.sigma_max"),
    ({"sample.sampler.consistency.sigma_low": 3.0}, "sample.sampler.consistency.sigma_high"),
    ({"model.diffusers.num_train_timesteps": 5}, "`sample.sampler.diffusers.num_steps` = 10"),
    ({"model.ar.dim": 7}, "model.ar.dim=7"),
    ({"evaluate.seed": -1}, "`evaluate.seed` = -1"),
    ({"train.seed": 2 ** 64}, "`train.seed`"),
    ({"evaluate.guidance": [1.0, float("nan")]}, "`evaluate.guidance.1` = nan"),
    ({"evaluate.sampler": {"num_steps": True}}, "`evaluate.sampler.num_steps` = True"),
    ({"evaluate.sampler": {"zeta": 1.0}}, "`evaluate.sampler.zeta` is invalid"),
    ({"evaluate.sampler": {"num_steps": [3]}}, "`evaluate.sampler.num_steps` = [3]"),
])
def test_cross_field_and_value_checks_name_the_key(changes, expected):
    msg = parse_tiny(**changes)
    assert msg is not None and expected in msg, msg


def test_a_checkpoint_of_its_own_makes_the_model_sections_advisory():
    """With base.checkpoint set, the checkpoint's config (not model.*) is what the sampler runs against."""
    assert parse_tiny(**{"model.diffusers.num_train_timesteps": 5, "base.checkpoint": "s3://neon/user/ddpm",
                         "base.sha256": "0" * 64}) is None
    assert parse_tiny(**{"model.consistency.sigma_min": 1.5, "base.checkpoint": "/data/cm.safetensors",
                         "base.sha256": "0" * 64}) is None


# --- Locations (the security checks are in test_security.py) ---------------------------------------------

def test_builtin_sources_and_pickle_checkpoints():
    for name in ("mnist", "toy2d", "fashion-mnist"):
        assert parse_tiny(**{"data.source": name, **({"evaluate.inception_n": 0} if name == "toy2d" else {})}) is None
    for suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".PT"):
        msg = parse_tiny(**{"base.checkpoint": f"/data/model{suffix}"})
        assert msg and "`base.checkpoint`" in msg and "never loaded" in msg, msg


# --- Through the real entry point --------------------------------------------------------------------------

CLI_CASES = {
    "syntax": b"sample: [unclosed\n",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(200)),
    "nan": yaml.safe_dump(with_value(("sample", "sampler", "edm", "sigma_max"), float("nan"))).encode(),
    "cross-field": yaml.safe_dump(with_value(("sample", "batch_size"), 5)).encode(),
    "traversal": yaml.safe_dump(with_value(("data", "source"), "../../etc")).encode(),
}
CLI_EXPECT = {"syntax": "not valid YAML", "binary": "not a text file",
              "nan": "`sample.sampler.edm.sigma_max` = nan", "cross-field": "sample.batch_size",
              "traversal": "`data.source` = '../../etc'"}


def test_cli_prints_one_error_line_and_exits_1(tmp_path):
    """`python -m flows train` validates params before Prefect starts: no server is needed to fail."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never contacted: params fail first
    procs = {}
    for case, data in CLI_CASES.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "params.yaml").write_bytes(data)
        procs[case] = subprocess.Popen([sys.executable, "-m", "flows", "train"], cwd=folder, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (case, err)
        assert "Traceback" not in err + out, (case, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: params.yaml: "), (case, err)
        assert CLI_EXPECT[case] in lines[0], (case, lines[0])
