"""Stage `fetch`: copy the base checkpoint (s3:// or a path) into the artifacts and verify its sha256.

The expected digest comes from `base.sha256`, else from the `manifest.json` beside the checkpoint
(which every artifact of this pipeline has). A checkpoint with neither is refused: pin it first.
A folder from another codebase (a diffusers UNet2DModel: config.json + safetensors weights) is pinned
by the digest of its contents (names and file digests) and converted by the family's `read_folder`.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from stages import inputs, store
from models import checkpoint, family as families
from stages.artifacts import (MANIFEST, artifact, directory_digest, file_digests, input_ref, parse_manifest,
                              sha256_file)
from stages.common import BASE, MODEL_FILE, TRAIN, WORK, StageError, log
from stages.model_config import load
from stages.params import BaseParams, ModelParams


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _is_folder(source: str) -> bool:
    """A checkpoint folder from another codebase (e.g. diffusers' config.json + weights) rather than one file."""
    if _is_s3(source):
        from botocore.exceptions import BotoCoreError, ClientError  # only S3 sources need the S3 stack

        fs = store.filesystem()
        try:  # an unreachable store is not "not a folder": `access` raises it as one line
            with store.access(fs, f"base.checkpoint {source}"):
                return fs.isdir(source[len("s3://"):])
        except (BotoCoreError, ClientError, OSError):
            return False
    return Path(source).is_dir()


def _download_folder(source: str, dest: Path) -> dict:
    """Copy a folder (local or an s3:// prefix) to `dest`; return its content digest and file count."""
    if _is_s3(source):
        fs = store.filesystem()
        with store.access(fs, f"base.checkpoint {source}"):
            fs.get(source[len("s3://"):].rstrip("/") + "/", str(dest), recursive=True)
    else:
        shutil.copytree(source, dest)
    files = {p.relative_to(dest).as_posix(): sha256_file(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    if not files:
        raise StageError(f"base.checkpoint {source} is an empty folder; point it at the model's folder")
    return {"digest": directory_digest(files), "folder": True, "files": len(files)}


def _convert_folder(source: str, folder: Path, dest: Path, digest: str, model_p: ModelParams) -> None:
    """A verified foreign checkpoint folder -> this pipeline's checkpoint (safetensors + family metadata)."""
    fam = families.get(model_p.family)
    if fam.read_folder is None:
        raise StageError(f"base.checkpoint {source} is a folder, which model.family = {model_p.family} cannot read; "
                         "give a .safetensors file, or set model.family: diffusers for a diffusers UNet2DModel folder")
    state, config = fam.read_folder(folder)
    checkpoint.save(dest, state, model_p.family, {**config, "label_dropout": model_p.label_dropout},
                    extra={"imported_from": source, "folder_digest": digest})


def _verify_import(source: str, found: str | None, imported: dict) -> None:
    """A checkpoint `neon track` imported is pinned by its .dvc file (in git), which `dvc status` checks
    against the source; here the copy's md5 `found` is checked against it (a folder's, None here, DVC checks
    when it checks the folder out)."""
    pinned = str(imported.get("md5") or "")
    if found is not None and pinned and not pinned.endswith(".dir"):
        if found != pinned:
            raise StageError(f"{source} has md5 {found} but {imported['dvc_file']} pins {pinned}: run "
                             f"`dvc checkout {imported['dvc_file']}` (or `dvc update` it to take the source's change)")


def _verify(source: str, digest: str, want: str) -> None:
    if not want:
        raise StageError(f"{source} has no expected sha256: set base.sha256 in params.yaml (its current digest "
                         f"is {digest}; check it against the publisher's) or put it beside a manifest.json")
    if digest != want:
        raise StageError(f"{source} has sha256 {digest}, expected {want}: the checkpoint is corrupted or not the "
                         "one pinned; re-upload it or fix base.sha256")


def _download(source: str, dest: Path) -> dict:
    """Copy `source` to `dest`; return what identifies the copy (S3 version id where there is one)."""
    if _is_s3(source):
        from botocore.exceptions import BotoCoreError, ClientError

        fs = store.filesystem()
        key = source[len("s3://"):]
        try:
            # By the version just read: the latest could be replaced between the two calls, and then the
            # recorded version id would not name the bytes whose sha256 is verified.
            with store.access(fs, f"base.checkpoint {source}"):
                version = fs.info(key, refresh=True).get("VersionId")
                fs.get_file(key, str(dest), version_id=version)
        except FileNotFoundError:
            raise StageError(f"base.checkpoint {source} does not exist (no such object); check the bucket, "
                             "the key and AWS_ENDPOINT_URL_S3") from None
        except PermissionError as exc:
            raise StageError(f"base.checkpoint {source}: access denied ({exc}); check AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY") from None
        except (BotoCoreError, ClientError) as exc:
            raise StageError(f"base.checkpoint {source}: cannot read it from S3 ({type(exc).__name__}: {exc}); "
                             "set AWS_ENDPOINT_URL_S3 and the AWS_* credentials, or run `neon store up`") from None
        return {"version_id": version}
    path = Path(source)
    if not path.is_file():
        raise StageError(f"base.checkpoint {source} does not exist or is not a file; give an existing path or s3:// URI")
    shutil.copyfile(path, dest)
    return {}


def _manifest_beside(source: str) -> dict | None:
    """The pipeline manifest that lists the checkpoint, if it sits next to it."""
    parent, name = (source.rsplit("/", 1) if "/" in source else (".", source))
    where = f"{parent}/{MANIFEST}"
    try:
        if _is_s3(source):
            fs = store.filesystem()
            with store.access(fs, f"base.checkpoint {source} (its {MANIFEST})"):
                text = fs.cat_file(where[len("s3://"):])
        else:
            text = Path(where).read_bytes()
    except (FileNotFoundError, OSError):
        return None
    manifest = parse_manifest(text, where, "replace it with the manifest its stage wrote, or remove it and set "
                                           "base.sha256 to the checkpoint's digest")
    return manifest if name in manifest.get("files", {}) else None


def run(base_p: BaseParams, model_p: ModelParams) -> dict:
    source = base_p.checkpoint or (TRAIN / MODEL_FILE).as_posix()
    beside = _manifest_beside(source)
    want = base_p.sha256 or (beside["files"][PurePosixPath(source).name] if beside else "")
    imported = inputs.imported_from(source) if base_p.checkpoint else None
    pinned_by_dvc = bool(imported) and not want

    def verify(digest: str, md5: str | None) -> None:
        if pinned_by_dvc:
            _verify_import(source, md5, imported)
        else:
            _verify(source, digest, want)

    params = base_p.model_dump()
    with artifact(BASE, "fetch", params, inputs={}) as out:
        dest = out.path(MODEL_FILE)
        if base_p.checkpoint and _is_folder(source):  # pinned by the folder's content digest, then converted
            WORK.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=WORK) as tmp:
                origin = _download_folder(source, Path(tmp) / "folder")
                digest = origin.pop("digest")
                verify(digest, None)
                _convert_folder(source, Path(tmp) / "folder", dest, digest, model_p)
        else:
            origin = _download(source, dest)
            digests = file_digests(dest, "sha256", *(["md5"] if pinned_by_dvc else []))
            digest = digests["sha256"]
            verify(digest, digests.get("md5"))
        _, family, config = load(dest, model_p)
        if not base_p.checkpoint:
            out.manifest["inputs"] = {"checkpoint": input_ref(TRAIN)}
        else:
            ref = {"path": source, "sha256": digest, **origin}
            if beside:
                ref["digest"] = beside["digest"]
            if imported:
                ref["imported_from"] = imported
            out.manifest["inputs"] = {"checkpoint": ref}
        out.extra["checkpoint"] = {"sha256": digest, "source": source, "config": {"family": family.name, "config": config},
                                   **origin}
    pin = f"pinned by {imported['dvc_file']}" if pinned_by_dvc else "verified"
    log(f"[fetch] {source} -> {BASE / MODEL_FILE} (sha256 {digest[:16]}..., {pin})")
    if base_p.checkpoint and (note := inputs.untracked_note("base", source)):
        log(f"[fetch] {note}")
    return out.manifest
