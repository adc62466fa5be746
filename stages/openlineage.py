"""OpenLineage events for every stage run, so lineage tools (Marquez, data catalogs) see the pipeline.

The stage runner calls `start` before a stage, then `complete` with the manifest the stage published, or
`fail`: one START and one COMPLETE or FAIL RunEvent per run, with the same runId.
- Job: namespace `neon` (NEON_OPENLINEAGE_NAMESPACE), name = the stage.
- Datasets: each artifact under the name DVC pushes it to, from the repo's default DVC remote
  (`.dvc/config`, then `.dvc/config.local`): remote `s3://neon/dvc` gives namespace `s3://neon`, name
  `dvc/artifacts/base`. Without a remote (or with a local one, which DVC stores by content hash) the
  namespace is `file` and the name the artifact's absolute path in the checkout. Inputs come from the
  manifest's `inputs`, the output is the artifact itself, so one stage's output is the next one's input
  under the same (namespace, name), and the events chain from the data to the evaluated model.
- Facets: `version` (the artifact's digest), `neon_digest` (digests, file digests, S3 version ids where
  known), on the run `parent` (the Prefect pipeline flow run, NEON_PARENT_FLOW_RUN_ID, else the stage's own
  flow run), `neon_params`, `neon_code` (git commit, dirty), `neon_prefect`, `processing_engine`; on the job
  `jobType` and `sourceCodeLocation`. The custom facets' JSON Schema is `FACETS_SCHEMA`.

Where events go: always a local file, one JSON event per line, `.neon/openlineage/events.jsonl`
(NEON_OPENLINEAGE_FILE; empty to switch it off), appended under a lock. Also to whatever the OpenLineage
client's own configuration names, and only when one is given: `OPENLINEAGE_URL` (Marquez), `OPENLINEAGE_CONFIG`
or an `openlineage.yml`, `OPENLINEAGE__TRANSPORT__...`. `OPENLINEAGE_DISABLED=true` emits nothing.

Emission never fails a stage: an error prints one warning line and the stage goes on. Tests set
NEON_OPENLINEAGE_STRICT=1 (or pass strict=True) to have the error raised. The client (0.2-0.5 s of imports,
with Prefect loaded) is imported on the first emit, never when this module is imported.
"""
from __future__ import annotations

import configparser
import fcntl
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping
from uuid import UUID, uuid4

NAMESPACE_ENV = "NEON_OPENLINEAGE_NAMESPACE"
FILE_ENV = "NEON_OPENLINEAGE_FILE"
STRICT_ENV = "NEON_OPENLINEAGE_STRICT"
PARENT_ENV = "NEON_PARENT_FLOW_RUN_ID"  # set by flows/pipeline.py for the stages of a scheduled run
DEFAULT_NAMESPACE = "neon"
EVENTS_FILE = Path(".neon/openlineage/events.jsonl")
PIPELINE_JOB, STAGE_FLOW_JOB = "neon-pipeline", "neon-stage"  # the Prefect flows' names
MANIFEST = "manifest.json"
MAX_FILES = 256  # file digests listed in an output's neon_digest facet; the artifact digest covers them all
VERSION_QUERY = "?versionId="

FACETS_SCHEMA_ID = "urn:neon-pipeline:openlineage:facets:1-0-0"
_OL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/"


def _facet_schema(base: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"allOf": [{"$ref": _OL + base},
                      {"type": "object", "properties": properties, "required": required}]}


_STR, _NULLABLE_STR, _UUID = {"type": "string"}, {"type": ["string", "null"]}, {"type": "string", "format": "uuid"}
# JSON Schema of the custom facets; each facet's `_schemaURL` is FACETS_SCHEMA_ID#/$defs/<its class>.
FACETS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": FACETS_SCHEMA_ID,
    "$defs": {
        "NeonParamsRunFacet": _facet_schema("RunFacet", {"params": {"type": "object"}}, ["params"]),
        "NeonCodeRunFacet": _facet_schema("RunFacet", {"gitCommit": _NULLABLE_STR,
                                                       "dirty": {"type": ["boolean", "null"]}}, []),
        "NeonPrefectRunFacet": _facet_schema("RunFacet", {"flowRunId": _UUID, "pipelineFlowRunId": _UUID}, []),
        "NeonDigestDatasetFacet": _facet_schema("DatasetFacet", {
            "digest": _STR, "sha256": _STR, "manifestDigest": _STR,
            "files": {"type": "object", "additionalProperties": _STR},
            "fileCount": {"type": "integer"}, "versionId": _STR, "manifestVersionId": _STR}, []),
        "NeonInputInputDatasetFacet": _facet_schema("InputDatasetFacet", {"name": _STR}, ["name"]),
    },
}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def producer() -> str:
    return f"urn:neon-pipeline:{_version('neon-pipeline')}"


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def _disabled() -> bool:
    return os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true"


def _uuid(value: Any) -> str | None:
    try:
        return str(UUID(str(value).strip())) if value else None
    except ValueError:
        return None


# ---- where the artifacts live: the DVC remote -------------------------------------------------------------

def _read_dvc_config(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(path.read_text(), str(path))
    except (OSError, configparser.Error):
        return {}
    # configobj, which DVC writes with, quotes a section's name: ['remote "store"']
    return {re.sub(r"\s+", " ", s.strip().strip("'").strip()): {k: v.strip().strip("'\"") for k, v in parser[s].items()}
            for s in parser.sections()}


def dvc_remote(root: Path | str | None = None) -> tuple[str, str] | None:
    """(name, url) of the project's default DVC remote, `.dvc/config.local` overriding `.dvc/config`."""
    root = Path(root or Path.cwd())
    merged: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):
        for section, values in _read_dvc_config(root / ".dvc" / name).items():
            merged.setdefault(section, {}).update(values)
    name = merged.get("core", {}).get("remote")
    url = merged.get(f'remote "{name}"', {}).get("url") if name else None
    return (name, url) if url else None


@dataclass(frozen=True)
class Store:
    """How this checkout's artifacts are named as datasets."""
    namespace: str  # s3://bucket, or `file`
    prefix: str  # the key prefix in the bucket, or the checkout's absolute path
    remote: str | None = None  # the DVC remote's name (its key in dvc.lock's `cloud`)


def store(root: Path | str | None = None) -> Store:
    root = Path(root or Path.cwd()).resolve()
    found = dvc_remote(root)
    if found:
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#@]*@)?([^/?#]+)/*([^?#]*)", found[1])  # no user:password
        if m and m.group(1).lower() != "file":
            return Store(f"{m.group(1).lower()}://{m.group(2)}", m.group(3).strip("/"), found[0])
    return Store("file", root.as_posix(), found[0] if found else None)


def _artifact_path(path: str, root: Path) -> str | None:
    """`artifacts/x` (project-relative, posix) when `path` names an artifact of this checkout, else None."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root)
        except ValueError:
            return None
    parts = [x for x in p.as_posix().split("/") if x not in ("", ".")]
    return "/".join(parts) if parts and parts[0] == "artifacts" and ".." not in parts else None


def dataset(path: str, root: Path | str | None = None, where: Store | None = None) -> tuple[str, str]:
    """(namespace, name) of a path a manifest records: an artifact of this checkout, an s3:// (or other URI)
    object, or a local file."""
    root = Path(root or Path.cwd()).resolve()
    path = path.partition(VERSION_QUERY)[0]
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/?#@]*@)?([^/?#]*)/*(.*)$", path)
    if m and m.group(1).lower() != "file":
        return f"{m.group(1).lower()}://{m.group(2)}", m.group(3).rstrip("/") or "/"
    if m:  # file:///abs/path
        return "file", "/" + m.group(3).rstrip("/")
    artifact = _artifact_path(path, root)
    if artifact is not None:
        where = where or store(root)
        return where.namespace, f"{where.prefix}/{artifact}" if where.prefix else artifact
    p = Path(path)
    if not p.is_absolute() and (root / p).exists():
        p = root / p
    return "file", (p.resolve().as_posix() if p.is_absolute() else path.rstrip("/") or path)


def _locked_manifest_versions(root: Path, remote: str | None) -> dict[str, tuple[str | None, str]]:
    """artifact path -> (md5, S3 version id) of its manifest.json as DVC last pushed it (dvc.lock)."""
    lock = root / "dvc.lock"
    if not remote or not lock.is_file():
        return {}
    import yaml

    data = yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    out: dict[str, tuple[str | None, str]] = {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            for f in entry.get("files") or []:
                version = ((f.get("cloud") or {}).get(remote) or {}).get("version_id")
                if f.get("relpath") == MANIFEST and version:
                    out[str(entry.get("path", "")).rstrip("/")] = (f.get("md5"), version)
    return out


def _manifest_version(artifact: str | None, root: Path, locked: dict[str, tuple[str | None, str]]) -> str | None:
    """The S3 version id of the artifact's manifest.json, when the pushed bytes are this checkout's."""
    if artifact is None or artifact not in locked:
        return None
    import hashlib

    md5, version = locked[artifact]
    try:
        return version if hashlib.md5((root / artifact / MANIFEST).read_bytes()).hexdigest() == md5 else None
    except OSError:
        return None


# ---- the run -------------------------------------------------------------------------------------------

@dataclass
class RunHandle:
    """One stage run, from `start` to `complete` or `fail`."""
    stage: str
    run_id: str
    namespace: str
    root: Path
    params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None  # the Prefect pipeline flow run (scheduled runs)
    flow_run_id: str | None = None  # the stage's own Prefect flow run
    strict: bool = False
    code: dict[str, Any] | None = None
    finished: bool = False


def _plain(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    return json.loads(json.dumps(dict(params), default=str))


def _new_run_id() -> str:
    try:
        from openlineage.client.uuid import generate_new_uuid  # UUIDv7, as the spec recommends

        return str(generate_new_uuid())
    except Exception:  # noqa: BLE001 - a broken client still gets a valid run id; its emit reports the error
        return str(uuid4())


def _warn(what: str, stage: str, exc: BaseException) -> None:
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    print(f"warning: OpenLineage {what} event of stage {stage} not emitted ({detail})", file=sys.stderr)


def _guarded(what: str, stage: str, strict: bool, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - lineage must never be the reason a stage fails
        if strict:
            raise
        _warn(what, stage, exc)
        return None


def start(stage: str, params: Any = None, parent_run_id: str | None = None, *, flow_run_id: str | None = None,
          root: Path | str | None = None, strict: bool | None = None) -> RunHandle:
    """Emit the START event of a run of `stage` and return its handle (for `complete` or `fail`).

    params: the params (a dict or a pydantic model); COMPLETE replaces them with the manifest's, the ones the
    stage used. parent_run_id: the Prefect pipeline flow run, default NEON_PARENT_FLOW_RUN_ID. flow_run_id: the
    stage's own Prefect flow run."""
    strict = _strict(strict)

    def make() -> RunHandle:
        return RunHandle(stage=stage, run_id=_new_run_id() if not _disabled() else str(uuid4()),
                         namespace=os.environ.get(NAMESPACE_ENV, "").strip() or DEFAULT_NAMESPACE,
                         root=Path(root or Path.cwd()).resolve(), params=_plain(params),
                         parent_run_id=_uuid(parent_run_id or os.environ.get(PARENT_ENV)),
                         flow_run_id=_uuid(flow_run_id), strict=strict)

    handle = _guarded("START", stage, strict, make)
    if handle is None:  # unreadable params or the like: a bare handle, so complete/fail still report
        handle = RunHandle(stage=stage, run_id=str(uuid4()), namespace=DEFAULT_NAMESPACE,
                           root=Path(root or Path.cwd()), strict=strict)
    if not _disabled():
        _guarded("START", stage, strict, lambda: _emit(_event(handle, "START"), handle))
    return handle


def complete(handle: RunHandle | None, manifest: Mapping[str, Any], *, strict: bool | None = None) -> None:
    """Emit the COMPLETE event: the manifest's inputs and its artifact as the output."""
    if handle is None or _disabled():
        return
    strict = handle.strict if strict is None else strict
    _guarded("COMPLETE", handle.stage, strict, lambda: _finish(handle, "COMPLETE", manifest=manifest))


def fail(handle: RunHandle | None, message: str, *, stack_trace: str | None = None,
         strict: bool | None = None) -> None:
    """Emit the FAIL event, with `message` (and the traceback, if given) as its errorMessage facet."""
    if handle is None or _disabled():
        return
    strict = handle.strict if strict is None else strict
    _guarded("FAIL", handle.stage, strict,
             lambda: _finish(handle, "FAIL", error=(str(message), stack_trace)))


def _finish(handle: RunHandle, state: str, **kwargs: Any) -> None:
    if handle.finished:
        raise RuntimeError(f"run {handle.run_id} of stage {handle.stage} already ended; start a new one")
    _emit(_event(handle, state, **kwargs), handle)
    handle.finished = True


# ---- building the events with the client's classes ----------------------------------------------------------

_CUSTOM: dict[str, type] = {}


def _custom_facets() -> dict[str, type]:
    """The custom facet classes (built on first use: the client is imported lazily)."""
    if _CUSTOM:
        return _CUSTOM
    import attr
    from openlineage.client.generated.base import DatasetFacet, InputDatasetFacet, RunFacet

    def schema(name: str) -> Callable[[], str]:
        return staticmethod(lambda: f"{FACETS_SCHEMA_ID}#/$defs/{name}")  # type: ignore[return-value]

    @attr.define
    class NeonParamsRunFacet(RunFacet):
        params: dict = attr.field(factory=dict)
        _get_schema = schema("NeonParamsRunFacet")

    @attr.define
    class NeonCodeRunFacet(RunFacet):
        gitCommit: str | None = attr.field(default=None)  # noqa: N815
        dirty: bool | None = attr.field(default=None)
        _get_schema = schema("NeonCodeRunFacet")

    @attr.define
    class NeonPrefectRunFacet(RunFacet):
        flowRunId: str | None = attr.field(default=None)  # noqa: N815
        pipelineFlowRunId: str | None = attr.field(default=None)  # noqa: N815
        _get_schema = schema("NeonPrefectRunFacet")

    @attr.define
    class NeonDigestDatasetFacet(DatasetFacet):
        digest: str | None = attr.field(default=None)
        sha256: str | None = attr.field(default=None)
        manifestDigest: str | None = attr.field(default=None)  # noqa: N815
        files: dict | None = attr.field(default=None)
        fileCount: int | None = attr.field(default=None)  # noqa: N815
        versionId: str | None = attr.field(default=None)  # noqa: N815
        manifestVersionId: str | None = attr.field(default=None)  # noqa: N815
        _get_schema = schema("NeonDigestDatasetFacet")

    @attr.define
    class NeonInputInputDatasetFacet(InputDatasetFacet):
        name: str = attr.field(default="")
        _get_schema = schema("NeonInputInputDatasetFacet")

    _CUSTOM.update((c.__name__, c) for c in (NeonParamsRunFacet, NeonCodeRunFacet, NeonPrefectRunFacet,
                                             NeonDigestDatasetFacet, NeonInputInputDatasetFacet))
    return _CUSTOM


def _code(handle: RunHandle, manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    if manifest and isinstance(manifest.get("code"), Mapping):
        return dict(manifest["code"])
    if handle.code is None:  # START and FAIL: the tree as it is now (a manifest records the same at its start)
        try:
            from stages.artifacts import code_version

            handle.code = code_version(handle.root)
        except Exception:  # noqa: BLE001
            handle.code = {}
    return handle.code


def _repo_url(root: Path) -> str | None:
    """The `origin` remote of the checkout (read from .git/config, no git process), without any credentials."""
    try:
        from openlineage.client.git import _find_git_dir, get_git_repo_url

        url = get_git_repo_url(git_dir=_find_git_dir(str(root)))
    except Exception:  # noqa: BLE001
        return None
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url) if url else None


def _event(handle: RunHandle, state: str, manifest: Mapping[str, Any] | None = None,
           error: tuple[str, str | None] | None = None) -> Any:
    from openlineage.client.constants import __version__ as client_version
    from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import (error_message_run, job_type_job, parent_run, processing_engine_run,
                                             source_code_location_job)

    made_by = producer()
    custom = _custom_facets()
    code = _code(handle, manifest)
    params = manifest.get("params") if manifest and isinstance(manifest.get("params"), Mapping) else handle.params

    run_facets: dict[str, Any] = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=_version("neon-pipeline"), name="neon", openlineageAdapterVersion=client_version, producer=made_by),
        "neon_params": custom["NeonParamsRunFacet"](params=dict(params), producer=made_by),
        "neon_code": custom["NeonCodeRunFacet"](gitCommit=code.get("git_commit"), dirty=code.get("dirty"),
                                                producer=made_by),
    }
    if handle.parent_run_id or handle.flow_run_id:
        run_facets["neon_prefect"] = custom["NeonPrefectRunFacet"](
            flowRunId=handle.flow_run_id, pipelineFlowRunId=handle.parent_run_id, producer=made_by)
        parent_job, parent_id = ((PIPELINE_JOB, handle.parent_run_id) if handle.parent_run_id
                                 else (STAGE_FLOW_JOB, handle.flow_run_id))
        root = None
        if handle.parent_run_id:
            root = parent_run.Root(run=parent_run.RootRun(runId=handle.parent_run_id),
                                   job=parent_run.RootJob(namespace=handle.namespace, name=PIPELINE_JOB))
        run_facets["parent"] = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=parent_id), job=parent_run.Job(namespace=handle.namespace, name=parent_job),
            root=root, producer=made_by)
    if error is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=error[0], programmingLanguage="python", stackTrace=error[1], producer=made_by)

    job_facets: dict[str, Any] = {"jobType": job_type_job.JobTypeJobFacet(
        processingType="BATCH", integration="NEON", jobType="STAGE", producer=made_by)}
    module = handle.root / "stages" / f"{handle.stage}.py"
    if code.get("git_commit") and module.is_file():
        job_facets["sourceCodeLocation"] = source_code_location_job.SourceCodeLocationJobFacet(
            type="git", url=module.as_uri(), repoUrl=_repo_url(handle.root), path=f"stages/{handle.stage}.py",
            version=code["git_commit"], producer=made_by)

    inputs, outputs = _datasets(handle, manifest, made_by) if manifest else ([], [])
    return RunEvent(eventType=getattr(RunState, state), eventTime=datetime.now(timezone.utc).isoformat(),
                    run=Run(runId=handle.run_id, facets=run_facets),
                    job=Job(namespace=handle.namespace, name=handle.stage, facets=job_facets),
                    inputs=inputs, outputs=outputs, producer=made_by)


def _datasets(handle: RunHandle, manifest: Mapping[str, Any], made_by: str) -> tuple[list, list]:
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import dataset_version_dataset, output_statistics_output_dataset

    custom = _custom_facets()
    root, where = handle.root, store(handle.root)
    try:
        locked = _locked_manifest_versions(root, where.remote)
    except Exception:  # noqa: BLE001 - a bonus: a dvc.lock that cannot be read only loses the version ids
        locked = {}

    def version_facet(value: str | None) -> dict[str, Any]:
        return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=value, producer=made_by)
                } if value else {}

    inputs = []
    for name, ref in sorted((manifest.get("inputs") or {}).items()):
        path = str(ref.get("path", ""))
        if not path:
            continue
        # an input `neon track` imported is named where it lives (its S3 URI), not by its local copy
        namespace, ds_name = dataset((ref.get("imported_from") or {}).get("url") or path, root, where)
        pinned = path.partition(VERSION_QUERY)[2] or ref.get("version_id")
        digest = ref.get("digest")
        facets = {**version_facet(digest or ref.get("sha256") or pinned),
                  "neon_digest": custom["NeonDigestDatasetFacet"](
                      digest=digest, sha256=ref.get("sha256"), versionId=pinned,
                      manifestVersionId=_manifest_version(_artifact_path(path, root), root, locked), producer=made_by)}
        inputs.append(InputDataset(namespace=namespace, name=ds_name, facets=facets,
                                   inputFacets={"neon_input": custom["NeonInputInputDatasetFacet"](
                                       name=name, producer=made_by)}))

    outputs = []
    artifact = manifest.get("artifact")
    if artifact:
        namespace, ds_name = dataset(str(artifact), root, where)
        files = dict(manifest.get("files") or {})
        folder = Path(artifact) if Path(artifact).is_absolute() else root / artifact
        size = 0
        for f in files:
            try:
                size += (folder / f).stat().st_size
            except OSError:
                pass
        facets = {**version_facet(manifest.get("digest")),
                  "neon_digest": custom["NeonDigestDatasetFacet"](
                      digest=manifest.get("digest"), manifestDigest=manifest.get("manifest_digest"),
                      files=dict(sorted(files.items())[:MAX_FILES]), fileCount=len(files),
                      manifestVersionId=_manifest_version(_artifact_path(str(artifact), root), root, locked),
                      producer=made_by)}
        outputs.append(OutputDataset(namespace=namespace, name=ds_name, facets=facets, outputFacets={
            "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                size=size, fileCount=len(files) + 1, producer=made_by)}))  # + manifest.json
    return inputs, outputs


# ---- where the events go --------------------------------------------------------------------------------

def events_path(root: Path | str | None = None) -> Path | None:
    """The local events file (NEON_OPENLINEAGE_FILE, default .neon/openlineage/events.jsonl); None when off."""
    configured = os.environ.get(FILE_ENV)
    if configured is not None and not configured.strip():
        return None
    path = Path(configured.strip()) if configured else EVENTS_FILE
    return path if path.is_absolute() else Path(root or Path.cwd()) / path


def _append(path: Path, line: str) -> None:
    """Append one line under an exclusive lock, in one write: concurrent stages never interleave."""
    data = line.replace("\n", " ").encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":  # a line torn by a crash: ours starts on a line of its own
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # releases the lock


def read_events(path: Path | str | None = None) -> list[dict[str, Any]]:
    """The events in a local events file, oldest first (a line torn by a crash is skipped)."""
    path = Path(path) if path else events_path()
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _client_config_key() -> tuple | None:
    """What the OpenLineage client's own configuration is made of; None when nothing configures it."""
    env = tuple(sorted((k, v) for k, v in os.environ.items()
                       if k in ("OPENLINEAGE_URL", "OPENLINEAGE_ENDPOINT", "OPENLINEAGE_API_KEY", "OPENLINEAGE_CONFIG")
                       or k.startswith("OPENLINEAGE__")))
    files = []
    for candidate in (Path.cwd() / "openlineage.yml", Path.home() / ".openlineage" / "openlineage.yml"):
        try:
            files.append((str(candidate), candidate.stat().st_mtime_ns))
        except OSError:
            continue
    return (env, tuple(files)) if env or files else None


_CLIENTS: dict[tuple, Any] = {}


def _configured_client() -> Any | None:
    """The client with the transport its standard configuration names (HTTP for OPENLINEAGE_URL, ...), or None."""
    key = _client_config_key()
    if key is None:
        return None
    if key not in _CLIENTS:
        from openlineage.client import OpenLineageClient

        before = {k: v for k, v in os.environ.items() if k.startswith("OPENLINEAGE__")}
        try:
            _CLIENTS[key] = OpenLineageClient()
        finally:  # the client copies OPENLINEAGE_URL into OPENLINEAGE__TRANSPORT__... variables: undo that
            for k in [k for k in os.environ if k.startswith("OPENLINEAGE__") and k not in before]:
                del os.environ[k]
            os.environ.update(before)
    return _CLIENTS[key]


def _emit(event: Any, handle: RunHandle) -> None:
    from openlineage.client.serde import Serde

    errors = []
    path = events_path(handle.root)
    if path is not None:
        try:
            _append(path, Serde.to_json(event))
        except Exception as exc:  # noqa: BLE001 - still try the configured transport
            errors.append(exc)
    try:
        client = _configured_client()
        if client is not None:
            client.emit(event)
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)
    if errors:
        raise errors[0]
