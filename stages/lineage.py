"""Walk the manifests from an artifact back to the data and the base checkpoint, locally or in S3.

Inputs in a manifest are paths relative to the project root (`artifacts/base`) with the digest the
stage read, so the same walk works on a checkout and on the S3 copy DVC pushes (a version-aware
remote keeps the paths). In S3 each path holds every run pushed there, so the walk takes, for each
input, the version of its manifest whose digest is the one recorded, never simply the latest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from stages import store
from stages.artifacts import MANIFEST
from stages.common import StageError

VERSION_QUERY = "?versionId="  # how s3fs (version_aware) and the S3 console name one object version


class LineageError(StageError):
    """The recorded lineage cannot be followed to the exact versions it names."""


def _parent(path: str) -> tuple[str, str]:
    folder, _, name = path.rpartition("/")
    return folder, name


class _Local:
    """A checkout holds one version of each artifact: read it, and say when it is not the recorded one."""

    def top(self, target: str, version: None = None) -> tuple[dict, str, None]:
        p = Path(target)
        loc = p if p.name == MANIFEST else (p / MANIFEST if p.is_dir() else p.parent / MANIFEST)
        try:
            return json.loads(loc.read_text()), str(loc), None
        except FileNotFoundError:
            raise FileNotFoundError(f"no {MANIFEST} for {target}: not a pipeline artifact") from None

    def resolve(self, root: str, name: str, ref: dict, child: dict) -> tuple[dict, str, None] | None:
        if not ref.get("path", "").startswith("artifacts/"):
            return None
        loc = f"{root}/{ref['path']}/{MANIFEST}" if root else f"{ref['path']}/{MANIFEST}"
        manifest = json.loads(Path(loc).read_text())
        if ref.get("digest") and manifest["digest"] != ref["digest"]:
            manifest = {**manifest, "recorded": ref["digest"]}  # shown, not fatal: a checkout may be mid-rerun
        return manifest, loc, None


class _S3:
    """Every version of every pushed file: pick the one a digest or a version id names, and verify it."""

    def __init__(self) -> None:
        self.fs = store.filesystem()
        self._read: dict[tuple[str, str], dict] = {}

    def versions(self, path: str) -> list[str]:
        """Version ids of exactly `path` (the listing is by prefix), newest first."""
        try:
            listed = self.fs.object_version_info(path)
        except (FileNotFoundError, KeyError):  # KeyError: a listing with no "Versions" at all
            return []
        mine = [v for v in listed if v.get("Key") == path.split("/", 1)[1]]
        return [v["VersionId"] for v in sorted(mine, key=lambda v: not v.get("IsLatest"))]  # S3 lists newest first

    def manifest(self, path: str, version: str) -> dict:
        if (path, version) not in self._read:
            self._read[path, version] = json.loads(self.fs.cat_file(path, version_id=version).decode())
        return self._read[path, version]

    def sha256(self, path: str, version: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(path, "rb", version_id=version) as f:  # streamed: checkpoints can be large
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def latest(self, path: str) -> str:
        found = self.versions(path)
        if not found:
            raise FileNotFoundError(f"no s3://{path} in the store: not a pipeline artifact (or not pushed yet)")
        return found[0]

    def listing(self, path: str, version: str, digest: str | None = None, ref: tuple[str, dict, dict] | None = None
                ) -> tuple[dict, str, str]:
        """The newest manifest version beside `path` that lists exactly its bytes at `version` (and has `digest`).

        `ref` (input name, ref, consumer): the sha256 the consumer recorded must be these bytes' too."""
        folder, name = _parent(path)
        sha = self.sha256(path, version)
        if ref and ref[1].get("sha256") not in (None, sha):
            raise LineageError(f"s3://{path} version {version} has sha256 {sha}, but {ref[2]['artifact']} recorded "
                               f"{ref[1]['sha256']} for input `{ref[0]}`: the recorded version is not the bytes it "
                               "fetched (fetch before version-pinned downloads could do that); rerun `dvc repro fetch`")
        loc = f"{folder}/{MANIFEST}"
        for v in self.versions(loc):
            m = self.manifest(loc, v)
            if m.get("files", {}).get(name) == sha and digest in (None, m.get("digest")):
                return m, loc, v
        raise LineageError(f"no stored version of s3://{loc} lists {name} with sha256 {sha} (the bytes of version "
                           f"{version}{'' if digest is None else f' and digest {digest}'}): it was pushed without "
                           "its manifest; push the whole artifact folder from the run that made it (`dvc push`)")

    def top(self, target: str, version: str | None) -> tuple[dict, str, str]:
        try:
            return self._top(target[len("s3://"):].rstrip("/"), version)
        except FileNotFoundError:
            at = f" at version {version}" if version else ""
            raise FileNotFoundError(f"no {target}{at} in the store: not a pipeline artifact (or not pushed yet)") from None

    def _top(self, path: str, version: str | None) -> tuple[dict, str, str]:
        if path.endswith(MANIFEST):
            version = version or self.latest(path)
            return self.manifest(path, version), path, version
        if version is None and self.fs.info(path, refresh=True)["type"] == "directory":
            loc = f"{path}/{MANIFEST}"
            version = self.latest(loc)
            return self.manifest(loc, version), loc, version
        return self.listing(path, version or self.latest(path))

    def resolve(self, root: str, name: str, ref: dict, child: dict) -> tuple[dict, str, str] | None:
        path, digest = ref.get("path", ""), ref.get("digest")
        if path.startswith("s3://") and digest:  # a base fetched from another pipeline's pushed artifact
            path, _, pinned = path[len("s3://"):].partition(VERSION_QUERY)
            if ref.get("version_id") or pinned:
                return self.listing(path, ref.get("version_id") or pinned, digest, (name, ref, child))
            loc = f"{_parent(path)[0]}/{MANIFEST}"
        elif path.startswith("artifacts/"):
            loc = f"{root}/{path}/{MANIFEST}"
        else:
            return None
        for v in self.versions(loc):
            if digest is None or self.manifest(loc, v).get("digest") == digest:
                return self.manifest(loc, v), loc, v
        raise LineageError(f"no stored version of s3://{loc} has digest {digest} (input `{name}` of "
                           f"{child['artifact']}): the run that made it was not pushed or its versions were "
                           "deleted; `dvc push` from the commit whose dvc.lock has it, then retry")


def split_target(target: str, version_id: str | None = None) -> tuple[str, str | None]:
    """`s3://b/k?versionId=V` and/or `--version-id V` -> (s3://b/k, V)."""
    target, _, in_uri = target.partition(VERSION_QUERY)
    if in_uri and version_id and in_uri != version_id:
        raise LineageError(f"two version ids for {target}: {in_uri} in the URI and {version_id} from "
                           "--version-id; give one")
    version_id = in_uri or version_id or None
    if version_id and not target.startswith("s3://"):
        raise LineageError(f"a version id needs an s3:// URI, not {target}: a checkout holds one version")
    return target, version_id


def chain(target: str, version_id: str | None = None) -> list[dict[str, Any]]:
    """The manifests from `target`'s artifact back to the first inputs, depth-first, each once."""
    target, version_id = split_target(target, version_id)
    source = _S3() if target.startswith("s3://") else _Local()
    try:
        return _walk(source, target, version_id)
    except (BotoCoreError, ClientError, PermissionError) as exc:
        raise LineageError(f"cannot read {target} from S3 ({type(exc).__name__}: {exc}); set AWS_ENDPOINT_URL_S3 "
                           "and the AWS_* credentials, or run `neon store up`") from None


def _walk(source: _Local | _S3, target: str, version_id: str | None) -> list[dict[str, Any]]:
    top, loc, version = source.top(target, version_id)
    seen, out = set(), []

    def visit(manifest: dict[str, Any], loc: str, version: str | None, depth: int) -> None:
        out.append({**manifest, "depth": depth, "manifest_version": version})
        suffix = f"/{manifest['artifact']}/{MANIFEST}"
        root = loc[: -len(suffix)] if loc.endswith(suffix) else ""
        for name, ref in manifest.get("inputs", {}).items():
            key = (ref.get("path"), ref.get("digest"), ref.get("version_id"))
            if key in seen:
                continue
            seen.add(key)
            found = source.resolve(root, name, ref, manifest)
            if found:
                visit(*found, depth + 1)

    visit(top, loc, version, 0)
    return out


def render(target: str, version_id: str | None = None) -> str:
    lines = []
    for m in chain(target, version_id):
        pad = "  " * m["depth"]
        code = m.get("code", {})
        dirty = " (dirty)" if code.get("dirty") else ""
        where = f"  manifest version {m['manifest_version']}" if m.get("manifest_version") else ""
        lines.append(f"{pad}{m['artifact']}  [stage {m['stage']}]  digest {m['digest'][:16]}{where}")
        if m.get("recorded"):
            lines.append(f"{pad}  ! not the version its consumer used (that recorded digest {m['recorded'][:16]}): "
                         "this checkout is mid-rerun; `dvc repro`, or walk the pushed copy in S3")
        lines.append(f"{pad}  code {str(code.get('git_commit'))[:12]}{dirty}  device {m.get('device')}  "
                     f"{m.get('started')} -> {m.get('finished')}")
        lines.append(f"{pad}  params {json.dumps(m.get('params'), sort_keys=True)}")
        for name, ref in m.get("inputs", {}).items():
            ident = ref.get("digest") or ref.get("sha256") or ""
            extra = f"  version {ref['version_id']}" if ref.get("version_id") else ""
            lines.append(f"{pad}  <- {name}: {ref.get('path')}  {ident[:16]}{extra}")
        if m["stage"] == "fetch":
            lines.append(f"{pad}  checkpoint sha256 {m['checkpoint']['sha256']}")
    return "\n".join(lines)
