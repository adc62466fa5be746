"""DVC's side of the store and of a user's inputs.

`write_dvc_local`: the machine-local settings (endpoint, the embedded store's local-only keys) of the DVC
remotes that live in the store: `store` (version-aware, the pipeline's artifacts), `exps` (content-addressed,
experiments) and one `input-<bucket>` per bucket an input was tracked from.

`track`: a user's images or checkpoint, an s3:// prefix or object or a local folder, file or zip, imported
with `dvc import-url` into `inputs/data/` or `inputs/base/` and named in `inputs/tracked.yaml`, which makes
it a dependency of the `data` or `fetch` stage (stages/inputs.py). The import's `.dvc` file, committed with
git, records where the input came from and, per file, its ETag and size, or in a versioned bucket its
version id. It is left unfrozen, so DVC treats it as an external dependency: `dvc status` compares it with
its source and reports a change, and `dvc repro` re-imports it and reruns what depends on it, no `-f`.
"""
from __future__ import annotations

import configparser
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flows import ROOT
from stages import inputs, store

PIPELINE_REMOTES = ("store", "exps")  # the version-aware default remote; the content-addressed one for experiments
INPUT_REMOTE = "input-"  # + bucket: how DVC reaches a tracked input's bucket on a non-AWS endpoint


def _section(remote: str) -> str:
    return f"'remote \"{remote}\"'"


def _config(name: str) -> tuple[Path, configparser.ConfigParser]:
    path = ROOT / ".dvc" / name
    cfg = configparser.ConfigParser()
    cfg.read(path)
    return path, cfg


def _write(path: Path, cfg: configparser.ConfigParser) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        cfg.write(f)
    tmp.replace(path)


def _input_remotes() -> list[str]:
    _, cfg = _config("config")
    return [s.split('"')[1] for s in cfg.sections() if s.startswith(_section(INPUT_REMOTE)[:-2])]


def write_dvc_local(endpoint: str, remotes: tuple[str, ...] | None = None) -> None:
    """Point `remotes` (default: the pipeline's and every input remote already pointing at this machine)
    at `endpoint`, in .dvc/config.local (git-ignored): with the local-only keys when the endpoint is on this
    machine, else none (DVC's S3 client then takes AWS_ACCESS_KEY_ID etc. from the environment)."""
    path, cfg = _config("config.local")
    if remotes is None:  # an input remote set to another endpoint (e.g. the user's MinIO) keeps it
        remotes = PIPELINE_REMOTES + tuple(r for r in _input_remotes()
                                           if store.is_local(cfg.get(_section(r), "endpointurl", fallback="127.0.0.1")))
    settings = store.s3_settings()  # DVC's own S3 client: the same short timeouts (its retries: AWS_MAX_ATTEMPTS)
    for remote in remotes:
        section = _section(remote)
        if not cfg.has_section(section):
            cfg.add_section(section)
        cfg[section].update(endpointurl=endpoint, connect_timeout=f"{settings['NEON_S3_CONNECT_TIMEOUT']:g}",
                            read_timeout=f"{settings['NEON_S3_READ_TIMEOUT']:g}")
        if store.is_local(endpoint):
            creds = store.credentials()
            cfg[section].update(access_key_id=creds["AWS_ACCESS_KEY_ID"],
                                secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
    _write(path, cfg)


def _input_remote(bucket: str, endpoint: str) -> tuple[str, bool]:
    """The DVC remote `input-<bucket>` (URL in .dvc/config, endpoint and keys in .dvc/config.local), and
    whether it was added now."""
    name = INPUT_REMOTE + bucket
    path, cfg = _config("config")
    added = not cfg.has_section(_section(name))
    if added:
        cfg.add_section(_section(name))
        cfg[_section(name)]["url"] = f"s3://{bucket}"
        _write(path, cfg)
    write_dvc_local(endpoint, (name,))
    return name, added


@dataclass
class Tracked:
    source: str  # as the user gave it
    url: str  # what DVC imports from (a remote:// alias for a non-AWS endpoint)
    path: str  # the import, relative to the project: what the param names
    dvc_file: str
    version_aware: bool
    git_files: list[str]  # what to commit: the .dvc file, the .gitignore DVC edited, .dvc/config for a new remote


def _dvc(*args: str) -> str:
    dvc = str(Path(sys.executable).with_name("dvc"))
    proc = subprocess.run([dvc, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
    return proc.stdout


def _s3_url(source: str) -> tuple[str, bool, bool]:
    """(URL for DVC, whether the bucket keeps versions, whether a DVC remote was added for it) of an s3://
    source, which must exist."""
    bucket, _, key = source[len("s3://"):].partition("/")
    endpoint = store.default_endpoint()
    fs = store.filesystem(endpoint)
    with store.access(fs, source):
        if not bucket or not fs.exists(f"{bucket}/{key}".rstrip("/")):
            raise FileNotFoundError(f"{source} does not exist at {store.show_endpoint(endpoint)}; upload it first "
                                    "(`neon store put PATH S3_URI`)")
        versioned = bool(fs.is_bucket_versioned(bucket))
    if endpoint is None:  # AWS itself: DVC's S3 client finds it and the credentials as usual
        return f"s3://{bucket}/{key.rstrip('/')}", versioned, False
    remote, added = _input_remote(bucket, endpoint)
    return f"{inputs.REMOTE_SCHEME}{remote}/{key.rstrip('/')}", versioned, added


def _follow(role: str, path: str) -> None:
    """Name `path` for `role` in inputs/tracked.yaml (its comments kept), atomically."""
    file = ROOT / inputs.TRACKED
    entries = inputs.tracked(ROOT) | {role: path}
    text = file.read_text() if file.exists() else "tracked:\n"
    head = text[:text.index("tracked:")] if "tracked:" in text else text
    tmp = file.with_suffix(".tmp")
    tmp.write_text(head + "tracked:\n" + "".join(f"  {r}: {entries[r]}\n" for r in inputs.ROLES))
    tmp.replace(file)


def track(role: str, source: str, name: str | None = None) -> Tracked:
    """Import `source` into inputs/<role>/<name> (default: its last path component) and make it the input DVC
    follows for `role`; for a source that already is an import there, only the latter."""
    if role not in inputs.ROLES:
        raise RuntimeError(f"{role!r}: track `data` (data.source) or `base` (base.checkpoint)")
    existing = Path(source.rstrip("/"))
    if "://" not in source and (ROOT / f"{existing}.dvc").is_file() and \
            (ROOT / existing).resolve().parent == (ROOT / inputs.folder(role)).resolve():
        path = (ROOT / existing).resolve().relative_to(ROOT.resolve()).as_posix()
        _follow(role, path)
        imported = inputs.imported_from(str(ROOT / path)) or {}
        return Tracked(source, imported.get("url", ""), path, f"{path}.dvc", bool(imported.get("version_aware")),
                       [inputs.TRACKED.as_posix()])
    name = name or PurePosixPath(source.rstrip("/")).name
    if not name or name in (".", ".."):
        raise RuntimeError(f"{source}: give the input a name with --name")
    dest = inputs.folder(role) / name
    if (ROOT / dest).exists() or (ROOT / f"{dest}.dvc").exists():
        raise RuntimeError(f"{dest} already exists; to take the source's latest content run `dvc update {dest}.dvc`, "
                           f"to track another source under it first `dvc remove {dest}.dvc`")
    added = False
    if source.startswith("s3://"):
        url, version_aware, added = _s3_url(source)
    elif "://" in source:
        raise RuntimeError(f"{source}: track an s3:// URI or a local path")
    else:
        local = Path(source).expanduser().resolve()
        if not local.exists():
            raise FileNotFoundError(f"{source} does not exist")
        if local.is_relative_to(ROOT.resolve()):
            raise RuntimeError(f"{source} is inside the project: move it under {inputs.folder(role)}/ and "
                               f"`dvc add` it there, or track it from where it lives outside the project")
        url, version_aware = str(local), False
    (ROOT / dest.parent).mkdir(parents=True, exist_ok=True)
    _dvc("import-url", *(["--version-aware"] if version_aware else []), url, dest.as_posix())
    # unfrozen: `dvc repro` then re-imports a changed source, like an external dependency, instead of only
    # `dvc update` doing it
    _dvc("unfreeze", f"{dest}.dvc")
    _follow(role, dest.as_posix())
    git_files = [f"{dest}.dvc", f"{dest.parent}/.gitignore", inputs.TRACKED.as_posix(),
                 *([".dvc/config"] if added else [])]
    return Tracked(source, url, dest.as_posix(), f"{dest}.dvc", version_aware, git_files)
