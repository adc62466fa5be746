"""Security: credentials stay out of everything the pipeline writes, params cannot point where they
should not, checkpoints are never unpickled, and every service listens on the loopback only."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import uuid
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st
from PIL import Image

from models import checkpoint, family as families
from models.checkpoint import CheckpointError
from stages import params, store
from stages.params import ParamsError
from tests.conftest import BIN, REPO, TINY, run

TINY_RAW = yaml.safe_load(TINY.read_text())
FEW = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def tiny_with(**changes) -> dict:
    return params.with_overrides(TINY_RAW, changes)


def write_pngs(folder: Path, count: int = 32, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(folder / f"{i:03d}.png")


def edm_checkpoint(path: Path, size: int = 16) -> str:
    """A small EDM base for (1, size, size) images, saved as this pipeline saves it; returns its sha256."""
    p = params.parse(TINY_RAW)
    config = {**p.model.family_config(), "image_shape": [1, size, size]}
    torch.manual_seed(0)
    checkpoint.save(path, families.get("edm").build(config).state_dict(), "edm", config)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_project(root: Path, env: dict[str, str]) -> None:
    """The repository's files (tracked, and new ones not ignored) in `root`, committed to a git repository of
    their own (as DVC needs)."""
    tracked = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO, dict(os.environ)).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git = ["git", "-c", "user.email=t@localhost", "-c", "user.name=t"]
    run(git + ["init", "-q"], root, env)
    run(git + ["add", "-A"], root, env)
    run(git + ["commit", "-qm", "test project"], root, env)


def prefect_home(tmp_path_factory, url: str) -> Path:
    """The folder of the session's Prefect server (its database and log), found by its URL."""
    for state in tmp_path_factory.getbasetemp().glob("*/server.json"):
        if json.loads(state.read_text())["url"] == url:
            return state.parent
    raise AssertionError(f"no server.json for {url} under {tmp_path_factory.getbasetemp()}")


def files_holding(folders: list[Path], needles: list[bytes], skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    """{needle: [files that contain it]} over every file under `folders`."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in [folder] if folder.is_file() else sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink() and path not in skip:
                data = path.read_bytes()
                for needle in needles:
                    if needle in data:
                        found.setdefault(needle.decode(), []).append(str(path))
    return found


# --- (a) credentials never leave the environment ----------------------------------------------------------

def test_credentials_never_reach_outputs_logs_or_prefect(tmp_path, tmp_path_factory, prefect_api, monkeypatch):
    """A store whose credentials are a planted secret; the real stages (data from S3, the base checkpoint
    from S3) run through `dvc repro` and `python -m flows`, plus a failing run and one with a wrong secret.
    No file they write (artifacts, results, dvc.lock, .neon, .dvc, git), no captured output, no record in
    the Prefect server's database and no store log holds either credential."""
    tag = uuid.uuid4().hex.upper()
    key_id, secret, wrong = f"NEONAK{tag[:14]}", f"neon-secret-{tag}", f"neon-wrong-{tag[::-1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    state = tmp_path / "store"
    info = store.start(state)  # enforces the planted credentials (store.credentials() reads the environment)
    captured: list[str] = []
    try:
        fs = store.filesystem(info.endpoint)
        write_pngs(tmp_path / "digits")
        fs.put(str(tmp_path / "digits"), "neon/user/digits", recursive=True)
        digest = edm_checkpoint(tmp_path / "model.safetensors")
        fs.put_file(str(tmp_path / "model.safetensors"), "neon/user/base/model.safetensors")

        root = tmp_path / "project"
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_API_URL": prefect_api,
               "PREFECT_HOME": str(root / ".neon" / "prefect"), **store.s3_env(info.endpoint)}
        env.pop("PYTHONPATH", None)
        copy_project(root, env)
        good = tiny_with(**{"data.source": "s3://neon/user/digits", "data.limit": 0,
                            "base.checkpoint": "s3://neon/user/base/model.safetensors", "base.sha256": digest})
        (root / "params.yaml").write_text(yaml.safe_dump(good))
        (root / ".dvc" / "config.local").write_text(  # where a user keeps DVC's credentials: the one place allowed
            f"['remote \"store\"']\n    endpointurl = {info.endpoint}\n"
            f"    access_key_id = {key_id}\n    secret_access_key = {secret}\n")

        for cmd in (["dvc", "repro", "fetch"], ["dvc", "push"]):
            proc = run(cmd, root, env)
            captured += [proc.stdout, proc.stderr]
        assert (root / "dvc.lock").is_file() and (root / "artifacts/base/manifest.json").is_file()

        failing = {  # one error line each, the same cleanly as the runs that worked
            "missing": ({**env}, tiny_with(**{**_flat(good), "base.checkpoint": "s3://neon/user/none.safetensors"}),
                        "fetch", "does not exist"),
            "wrong secret": ({**env, "AWS_SECRET_ACCESS_KEY": wrong}, good, "data", "data.source = s3://neon/user/digits"),
        }
        procs = {}
        for name, (run_env, raw, stage, _) in failing.items():
            folder = tmp_path / name.replace(" ", "-")
            shutil.copytree(root, folder, symlinks=True, ignore=shutil.ignore_patterns(".git"))
            (folder / "params.yaml").write_text(yaml.safe_dump(raw))
            run_env = {**run_env, "PREFECT_HOME": str(folder / ".neon" / "prefect"), "NEON_S3_RETRIES": "1"}
            procs[name] = (folder, subprocess.Popen([sys.executable, "-m", "flows", stage], cwd=folder, env=run_env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for name, (folder, proc) in procs.items():
            out, err = proc.communicate(timeout=300)
            captured += [out, err]
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert proc.returncode == 1 and len(errors) == 1 and failing[name][3] in errors[0], (name, err[-2000:])
            assert "Traceback" not in err, (name, err[-2000:])
    finally:
        store.stop(state)

    needles = [key_id.encode(), secret.encode(), wrong.encode()]
    assert files_holding([root / ".dvc" / "config.local"], needles[:2]), "the search does not see the credentials"
    for text in captured:
        assert not [n for n in needles if n in text.encode()], text[-3000:]
    home = prefect_home(tmp_path_factory, prefect_api)
    folders = [root, tmp_path / "missing", tmp_path / "wrong-secret", home, state]
    allowed = {root / ".dvc" / "config.local", tmp_path / "missing" / ".dvc" / "config.local",
               tmp_path / "wrong-secret" / ".dvc" / "config.local"}
    assert files_holding(folders, needles, allowed) == {}
    # The search looked where the records are: the stages' log lines reached the server's database.
    assert files_holding([home], [f"sha256 {digest[:16]}".encode()]), "fetch's log line is not in the Prefect database"
    assert json.loads((root / "artifacts/base/manifest.json").read_text())["checkpoint"]["sha256"] == digest


@pytest.mark.e2e
def test_the_full_pipeline_and_its_prefect_artifacts_hold_no_credentials(reproduced, prefect_api, tmp_path_factory):
    """The session's tiny pipeline (every stage, `dvc push`, the report published as Prefect artifacts): its
    outputs, its captured output and the Prefect server's records hold neither of the store's credentials."""
    import urllib.request

    root, _, first_output = reproduced
    needles = [v.encode() for v in store.credentials().values()]
    assert files_holding([root / ".dvc" / "config.local"], needles), "the search does not see the credentials"
    assert not [n for n in needles if n in first_output.encode()]
    outputs = [root / "artifacts", root / "results", root / "dvc.lock", root / ".neon", root / ".dvc" / "tmp",
               root / ".dvc" / "cache"]
    home = prefect_home(tmp_path_factory, prefect_api)
    assert files_holding([p for p in outputs if p.exists()] + [home], needles) == {}
    request = urllib.request.Request(f"{prefect_api}/artifacts/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        artifacts = json.loads(response.read())
    assert {"neon-report", "neon-fid-vs-w"} <= {a.get("key") for a in artifacts}, "the report was not published"
    assert not [n for n in needles if n in json.dumps(artifacts).encode()]


def _flat(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- (b) locations in params: no traversal, not the project's own state, valid S3 buckets ---------------

def parse_at(root: Path, key: str, value: str) -> str | None:
    try:
        params.parse(tiny_with(**{key: value}), "params.yaml", root=root)
    except ParamsError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


LOCATIONS = ["data.source", "base.checkpoint", "reference.stats"]


@pytest.mark.parametrize("key", LOCATIONS)
def test_users_own_locations_keep_working(tmp_path, key):
    root = tmp_path / "project"
    (root / "artifacts").mkdir(parents=True)
    elsewhere = tmp_path / "mine" / "digits"
    elsewhere.mkdir(parents=True)
    for value in [str(elsewhere), str(elsewhere / "model.safetensors"), "~/datasets/digits", "data/digits.zip",
                  "./data/digits", "artifacts_old/x", "my.artifacts/x", "s3://neon/user/digits",
                  "s3://my.bucket-1/a/b/c.safetensors", "s3://abc", "s3://neon/dvc/artifacts/train/model.safetensors"]:
        assert parse_at(root, key, value) is None, (key, value)


@pytest.mark.parametrize("key", LOCATIONS)
def test_traversal_project_state_and_bad_buckets_are_refused(tmp_path, key):
    root = tmp_path / "project"
    for name in ("artifacts", ".neon", ".git"):
        (root / name).mkdir(parents=True)
    (tmp_path / "link").symlink_to(root / ".git")
    bad = {"../data": "'..'", "data/../../etc": "'..'", "/srv/../etc/passwd": "'..'",
           "artifacts": "artifacts/", "artifacts/data": "artifacts/", "./artifacts/train/model.safetensors": "artifacts/",
           ".neon/store/data": ".neon/", ".git/config": ".git/", str(root / "artifacts" / "x"): "artifacts/",
           str(root / ".neon"): ".neon/", str(tmp_path / "link" / "config"): ".git/",
           "s3://Neon/x": "bucket name", "s3://ab/x": "bucket name", "s3://-neon/x": "bucket name",
           "s3://neon-/x": "bucket name", "s3://ne..on/x": "bucket name", "s3://192.168.10.1/x": "bucket name",
           "s3://" + "a" * 64 + "/x": "bucket name", "s3:///x": "bucket name", "s3://neon_1/x": "bucket name",
           "s3://neon/a/../b": "'..' component", "s3://neon/./b": "'.' or '..'",
           "http://example.com/digits.zip": "only s3://", "file:///etc/passwd": "only s3://",
           "data\x00/x": "control character", "data\n": "control character"}
    for value, expected in bad.items():
        msg = parse_at(root, key, value)
        assert msg is not None and f"`{key}`" in msg and expected in msg, (value, msg)


@FEW
@given(bucket=st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,20}[a-z0-9]\Z"),
       parts=st.lists(st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_=.-]{0,8}\Z"), max_size=3))
def test_any_valid_bucket_with_a_plain_key_is_accepted(bucket, parts):
    uri = "s3://" + "/".join([bucket, *parts])
    assert parse_at(Path.cwd(), "data.source", uri) is None, uri


@FEW
@given(parts=st.lists(st.sampled_from(["data", "x", "..", ".", "img", "artifactsx"]), min_size=1, max_size=5),
       absolute=st.booleans())
def test_paths_climbing_with_dotdot_are_refused(tmp_path_factory, parts, absolute):
    root = tmp_path_factory.getbasetemp() / "dotdot-project"
    value = ("/" if absolute else "") + "/".join(parts)
    msg = parse_at(root, "data.source", value)
    assert (msg is not None) == (".." in parts), (value, msg)


def test_the_project_is_where_params_yaml_is(tmp_path):
    """`load` judges relative paths from the params file's folder, where the stages run."""
    root = tmp_path / "project"
    (root / "artifacts").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_with(**{"data.source": str(root / "artifacts")})))
    with pytest.raises(ParamsError, match=r"`data.source` = .* points into the project's own artifacts/"):
        params.load(root / "params.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_with(**{"data.source": str(tmp_path / "digits")})))
    assert params.load(root / "params.yaml").data.source == str(tmp_path / "digits")


# --- (c) checkpoints load only through safetensors ---------------------------------------------------------

class _Payload:
    """Unpickling this opens (creates) the marker file: the harmless stand-in for running any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickles(marker: Path) -> dict[str, bytes]:
    out = {f"protocol {p}": pickle.dumps(_Payload(marker), protocol=p) for p in (0, 2, 4, 5)}
    buf = io.BytesIO()
    torch.save({"state_dict": _Payload(marker)}, buf)  # PyTorch's zip format, what .pt/.bin/.ckpt files are
    out["torch.save"] = buf.getvalue()
    return out


@pytest.fixture
def marker(tmp_path) -> Path:
    """A marker file that unpickling the payloads would create; checked to really work, then removed."""
    path = tmp_path / "unpickled-marker"
    for name, data in pickles(path).items():
        if name != "torch.save":
            pickle.loads(data)
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        assert path.exists(), f"the {name} payload does not run"
        path.unlink()
    return path


def test_pickled_checkpoints_are_refused_unread(tmp_path, marker):
    for kind, data in pickles(marker).items():
        for name in ("model.pt", "pytorch_model.bin", "last.ckpt", "model.safetensors", "weights"):
            path = tmp_path / kind.replace(" ", "-") / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            for load in (checkpoint.read, checkpoint.load_model):
                with pytest.raises(CheckpointError) as exc:
                    load(path)
                msg = str(exc.value)
                assert "\n" not in msg and str(path) in msg, msg
                assert "pickle" in msg or "not a readable safetensors checkpoint" in msg, msg
                assert not marker.exists(), f"{kind} {name}: unpickled by {load.__name__}"


def test_fetch_refuses_a_pickle_given_as_base_checkpoint(tmp_path, marker, monkeypatch):
    """Stage fetch with a pickle disguised as .safetensors (digest pinned, so it gets as far as loading)."""
    from stages import data, fetch
    from stages.params import BaseParams, DataParams

    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "digits", count=8)
    data.run(DataParams(source=str(tmp_path / "digits")))
    disguised = tmp_path / "user" / "model.safetensors"
    disguised.parent.mkdir()
    disguised.write_bytes(pickles(marker)["torch.save"])
    digest = hashlib.sha256(disguised.read_bytes()).hexdigest()
    p = params.parse(TINY_RAW)
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint, which this pipeline never loads"):
        fetch.run(BaseParams(checkpoint=str(disguised), sha256=digest), p.model)
    assert not marker.exists()
    assert not (tmp_path / "artifacts" / "base").exists(), "a refused checkpoint was published"


def test_a_pickle_suffix_stops_at_params_load(tmp_path):
    """Through the real entry point: one line, exit 1, before anything is read."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_with(**{"base.checkpoint": "/models/base.ckpt"})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never contacted: params fail first
    proc = subprocess.run([sys.executable, "-m", "flows", "fetch"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(
        "error: params.yaml: `base.checkpoint` = '/models/base.ckpt' is invalid: is a pickle format, which is never loaded")


def test_diffusers_folders_read_only_safetensors(tmp_path, marker):
    """A diffusers folder: the .bin (a pickle) is never opened, beside safetensors weights or alone."""
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    from models import diffusers_unet

    unet = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
            "layers_per_block": 1, "norm_num_groups": 4, "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    both, alone = tmp_path / "both", tmp_path / "bin-only"
    for folder in (both, alone):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **unet}))
        (folder / "diffusion_pytorch_model.bin").write_bytes(pickles(marker)["torch.save"])
    save_file(UNet2DModel(**unet).state_dict(), str(both / diffusers_unet.WEIGHTS))

    state, config = diffusers_unet.read_folder(both)
    assert state and config["image_shape"] == [1, 8, 8]
    with pytest.raises(CheckpointError, match=r"the \.bin weights are a pickle, which is never loaded") as exc:
        diffusers_unet.read_folder(alone)
    assert "\n" not in str(exc.value)
    (alone / diffusers_unet.WEIGHTS).write_bytes(pickles(marker)["protocol 4"])  # a pickle in disguise
    with pytest.raises(CheckpointError, match="pickle"):
        diffusers_unet.read_folder(alone)
    assert not marker.exists()


# --- Decompression bombs: a few bytes whose header claims a gigantic image ------------------------------

def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header and a tiny IDAT: decoding would need width x height bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (12_000, 12_000), (5_000, 5_000), (1, 20_000_000)])
def test_decompression_bombs_are_refused_unread(tmp_path, monkeypatch, width, height):
    """Above PIL's own limit (DecompressionBombError), in its warning band, and above this pipeline's limit:
    one line naming the file, from a folder or a zip, with no warning and nothing decoded."""
    from stages import data, sources
    from stages.common import StageError
    from stages.params import DataParams

    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "digits", count=4)
    (tmp_path / "digits" / "bomb.png").write_bytes(bomb_png(width, height))
    with zipfile.ZipFile(tmp_path / "digits.zip", "w") as z:
        for path in sorted((tmp_path / "digits").iterdir()):
            z.write(path, f"digits/{path.name}")
    for source, shown in ((tmp_path / "digits", str(tmp_path / "digits" / "bomb.png")),
                          (tmp_path / "digits.zip", f"digits/bomb.png in {tmp_path / 'digits.zip'}")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's DecompressionBombWarning included
            with pytest.raises(StageError) as exc:
                data.run(DataParams(source=str(source)))
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith(f"{shown}: claims ") and "decompression bomb" in msg, msg
        assert "remove it" in msg
    assert width * height > sources.MAX_PIXELS


def test_a_zip_bomb_member_is_refused_before_it_is_extracted(tmp_path, monkeypatch):
    """A member whose declared size is above any image's: refused by its header, nothing inflated."""
    from stages import data, sources
    from stages.common import StageError
    from stages.params import DataParams

    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "digits", count=4)
    with zipfile.ZipFile(tmp_path / "digits.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted((tmp_path / "digits").iterdir()):
            z.write(path, f"digits/{path.name}")
        with z.open("digits/zeros.png", "w", force_zip64=True) as member:
            for _ in range(sources.MAX_FILE_BYTES // (1 << 24) + 1):
                member.write(bytes(1 << 24))
    assert (tmp_path / "digits.zip").stat().st_size < 2 << 20  # a few hundred kB that would inflate to > 256 MiB
    inflated, read = [], zipfile.ZipFile.read

    def spy(self, name, pwd=None):
        inflated.append(name)
        return read(self, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", spy)
    with pytest.raises(StageError, match=r"digits/zeros.png in .*digits.zip: 285,212,672 bytes uncompressed, "
                                         r"more than an image here may have"):
        data.run(DataParams(source=str(tmp_path / "digits.zip")))
    assert "digits/zeros.png" not in inflated and inflated, inflated


def test_a_decompression_bomb_through_the_entry_point_is_one_line(tmp_path, prefect_api):
    write_pngs(tmp_path / "digits", count=4)
    (tmp_path / "digits" / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_with(**{"data.source": str(tmp_path / "digits")})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api,
           "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([sys.executable, "-m", "flows", "data"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "bomb.png: claims too many pixels" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "artifacts" / "data").exists()


# --- (d) every service listens on the loopback only -----------------------------------------------------

LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1


def _tree(pid: int) -> set[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def _bound(inodes: set[str]) -> list[tuple[str, str, int]]:
    """(table, local address hex, port) of the listening TCP sockets and unconnected UDP sockets among `inodes`."""
    out = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            listening = state == "0A" if table.startswith("tcp") else int(remote.split(":")[1], 16) == 0
            if inode in inodes and listening:
                address, port = local.split(":")
                out.append((table, address, int(port, 16)))
    return out


def test_services_listen_on_loopback_only(s3_store, prefect_api, tmp_path_factory):
    """The store (SeaweedFS: master, volume, filer, S3 and their gRPC ports, admin) and the Prefect server,
    with every child process: each listening socket is bound to 127.0.0.1 or ::1, never to all interfaces."""
    server_pid = json.loads((prefect_home(tmp_path_factory, prefect_api) / "server.json").read_text())["pid"]
    for name, pid, url in (("store", s3_store.pid, s3_store.endpoint), ("prefect", server_pid, prefect_api)):
        bound = _bound(_socket_inodes(_tree(pid)))
        ports = {port for _, _, port in bound}
        assert int(url.split(":")[2].split("/")[0]) in ports, f"{name}: its own port is not among {bound}"
        exposed = [(table, address, port) for table, address, port in bound if address not in LOOPBACK]
        assert not exposed, f"{name} listens beyond the loopback: {exposed}"
