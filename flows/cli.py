"""`neon`: what is not a DVC or Prefect command.

  neon store up|down|status|ls    the embedded SeaweedFS object store (127.0.0.1 only)
  neon store env                  its endpoint and local credentials as `export` lines (eval "$(neon store env)")
  neon store put PATH [S3_URI]    upload your checkpoint or images; prints the params lines that use them
  neon track data|base SOURCE     import images (data) or a checkpoint (base) from s3:// or a local path
                                  into inputs/, so that DVC sees them change; prints the params line
  neon prefect up|down|status     a local Prefect API server that the stages' flows then use
  neon lineage PATH_OR_S3_URI     the chain of artifacts, code and params behind an artifact;
                                  one object version: s3://BUCKET/KEY?versionId=V or --version-id V
  neon schedule apply|serve|worker|run
                                  the cron deployment of the whole pipeline (prefect.yaml), a worker
                                  on its pool for this checkout, a run now
"""
from __future__ import annotations

import argparse
import configparser
import json
import sys
from pathlib import Path

from flows import ROOT, SERVICES, inputs
from stages import lineage, store
from stages.inputs import ROLES


def cmd_store(args) -> int:
    state = SERVICES / store.DEFAULT_STATE_DIR  # the checkout, or the one an experiment's workspace came from
    if args.action == "up":
        info = store.start(state)
        inputs.write_dvc_local(info.endpoint)
        print(f"store up: {info.endpoint} bucket s3://{info.bucket} (versioned), data {info.data_dir}, pid {info.pid}")
    elif args.action == "down":
        print("store stopped" if store.stop(state) else "store was not running")
    elif args.action == "env":
        info = store.read_info(state)
        if info is None:
            print("store is not running; `neon store up`", file=sys.stderr)
            return 1
        for k, v in store.s3_env(info.endpoint).items():
            print(f"export {k}={v}")
        # The embedded store's own local-only keys (it listens on 127.0.0.1), so that s3fs, `aws s3` and
        # boto3 in this shell reach it; printed only on request, never logged.
        for k, v in store.credentials().items():
            print(f"export {k}={v}")
        # DVC's S3 client (botocore) then retries like the stages' own: bounded, with backoff
        print(f"export AWS_RETRY_MODE=standard AWS_MAX_ATTEMPTS={store.s3_settings()['NEON_S3_RETRIES']}")
    elif args.action == "put":
        return _put(state, args)
    else:
        info = store.read_info(state)
        if info is None:
            print("store is not running")
            return 1
        if args.action == "status":
            print(json.dumps(info.__dict__, indent=2))
        else:
            fs = store.filesystem(info.endpoint)
            for key in sorted(fs.find(info.bucket)):
                for v in fs.object_version_info(key):
                    latest = " (latest)" if v.get("IsLatest") else ""
                    print(f"s3://{info.bucket}/{v['Key']}  version {v['VersionId']}  {v['Size']} B{latest}")
    return 0


def _put(state: Path, args) -> int:
    """Upload a file (a checkpoint) or a folder (images, a diffusers checkpoint) into the embedded store and
    print what pins it: the version id, and the sha256 (file) or content digest (folder) that fetch checks."""
    from stages.artifacts import directory_digest, sha256_file

    info = store.read_info(state)
    if info is None or not args.paths:
        print("usage: neon store put PATH [s3://BUCKET/KEY] (with the store up: `neon store up`)", file=sys.stderr)
        return 1
    src = Path(args.paths[0])
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    dest = args.paths[1] if len(args.paths) > 1 else f"s3://{info.bucket}/inputs/{src.name}"
    if not dest.startswith("s3://"):
        raise RuntimeError(f"{dest}: the destination must be an s3:// URI")
    fs = store.filesystem(info.endpoint)
    key = dest[len("s3://"):].rstrip("/")
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    digests = {}
    for path in files:
        target = f"{key}/{path.relative_to(src).as_posix()}" if src.is_dir() else key
        with store.access(fs, f"upload to s3://{target}"):
            fs.put_file(str(path), target)
            version = fs.info(target, refresh=True).get("VersionId")
        digests[path.relative_to(src).as_posix() if src.is_dir() else path.name] = sha256_file(path)
        print(f"{path} -> s3://{target}  version {version}")
    if src.is_dir():
        print(f"folder digest {directory_digest(digests)} ({len(files)} files). Use it as\n"
              f"  data.source: s3://{key}/        (images: class sub-folders give labels)\n"
              f"  base.checkpoint: s3://{key}/    (a diffusers UNet2DModel folder)\n"
              f"or, so that DVC sees it change: `neon track data s3://{key}` (or `neon track base ...`)")
    else:
        print(f"sha256 {digests[src.name]}. Use it as\n  base.checkpoint: s3://{key}\n  base.sha256: {digests[src.name]}\n"
              f"or, so that DVC sees it change: `neon track base s3://{key}`")
    return 0


def cmd_track(args) -> int:
    tracked = inputs.track(args.role, args.source, args.name)
    pinned = "pinned by S3 version ids" if tracked.version_aware else "pinned by checksums"
    print(f"tracked {tracked.source} as {tracked.path} ({pinned}; from {tracked.url})\n"
          f"Use it in params.yaml:\n  {ROLES[args.role]}: {tracked.path}\n"
          f"and commit the import: git add {' '.join(tracked.git_files)}\n"
          f"`dvc status` reports a change at the source; `dvc repro` re-imports it and reruns what depends on it.")
    return 0


def cmd_prefect(args) -> int:
    import os

    from flows import server

    home = Path(os.environ["PREFECT_HOME"])
    if args.action == "up":
        print(f"prefect server up: {server.start(home)}")
    elif args.action == "down":
        print("prefect server stopped" if server.stop(home) else "prefect server was not running")
    else:
        url = server.running(home)
        print(url or "prefect server is not running")
        return 0 if url else 1
    return 0


def cmd_lineage(args) -> int:
    print(lineage.render(args.target, args.version_id))
    return 0


def _results_url() -> str:
    """Where Prefect keeps flow results: NEON_RESULTS_URL, else `prefect-results/` in the DVC remote's bucket."""
    import os

    if url := os.environ.get("NEON_RESULTS_URL"):
        return url
    cfg = configparser.ConfigParser()
    cfg.read([ROOT / ".dvc" / "config", ROOT / ".dvc" / "config.local"])
    remote = cfg.get("'remote \"store\"'", "url", fallback=f"s3://{store.DEFAULT_BUCKET}/dvc")
    return f"s3://{remote.removeprefix('s3://').split('/', 1)[0]}/prefect-results"


def _prepare_pool() -> str:
    """The process work pool the deployment targets, and the result-storage block (no credentials in it:
    s3fs takes them, and the endpoint, from each worker's environment)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.filesystems import RemoteFileSystem
    from prefect.workers.utilities import (
        get_default_base_job_template_for_infrastructure_type,
    )

    from flows.pipeline import RESULTS_BLOCK, WORK_POOL

    async def pool() -> None:
        async with get_client() as client:
            try:
                await client.read_work_pool(WORK_POOL)
            except ObjectNotFound:
                template = await get_default_base_job_template_for_infrastructure_type("process")
                try:
                    await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process",
                                                                 base_job_template=template))
                except ObjectAlreadyExists:  # a worker starting at the same time created it
                    pass

    asyncio.run(pool())
    url = _results_url()
    RemoteFileSystem(basepath=url).save(RESULTS_BLOCK, overwrite=True)
    return url


def _worker_env() -> dict[str, str]:
    """A worker's environment: this checkout as NEON_ROOT; the embedded store (when it runs and no other
    endpoint is set) with its local-only credentials. Credentials stay in the process environment: nothing
    here is sent to the Prefect server."""
    import os

    env = {**os.environ, "NEON_ROOT": str(ROOT)}
    if not (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")) and \
            (info := store.read_info(SERVICES / store.DEFAULT_STATE_DIR)) is not None:
        env.update(store.s3_env(info.endpoint))
    if store.is_local(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")):
        env.update(store.credentials())
    return env


def _run_now(wait: bool, timeout: float) -> dict:
    """Trigger the deployment now; with `wait`, its final state, its stages' child runs and its result."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.deployments import run_deployment

    from flows.pipeline import DEPLOYMENT

    run = run_deployment(f"neon-pipeline/{DEPLOYMENT}", timeout=timeout if wait else 0, poll_interval=1,
                         as_subflow=False)
    out = {"flow_run_id": str(run.id), "name": run.name, "state": run.state.type.value if run.state else None}
    if not wait or not run.state or not run.state.is_final():
        return out

    async def children() -> list[dict]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        return [{"name": r.name, "state": r.state.type.value if r.state else None} for r in runs]

    out["children"] = asyncio.run(children())
    out["message"] = run.state.message
    if run.state.is_completed():
        try:
            out["result"] = run.state.result()  # read back from the result storage (the S3 store)
        except Exception as exc:  # noqa: BLE001 - the run's state stands; say why its result is unreadable
            out["result_error"] = f"{type(exc).__name__}: {exc}"
    return out


def cmd_schedule(args) -> int:
    import os
    import subprocess

    from flows.pipeline import WORK_POOL, deployment

    if args.action == "apply":  # the pool, the results block, then prefect.yaml's deployment via `prefect deploy`
        import yaml

        url = _prepare_pool()
        config = yaml.safe_load((ROOT / "prefect.yaml").read_text())  # its deployment, with this cron as its schedule
        (spec,) = [d for d in config["deployments"] if d["name"] == "nightly"]
        spec["schedules"] = [{**(spec.get("schedules") or [{}])[0], "cron": args.cron}]
        rendered = ROOT / ".neon" / "schedule" / "prefect.yaml"
        rendered.parent.mkdir(parents=True, exist_ok=True)
        rendered.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [str(Path(sys.executable).with_name("prefect")), "deploy", "--no-prompt", "--prefect-file",
               str(rendered), "--name", "nightly"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"prefect deploy failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-3000:]}")
        print(f"deployment neon-pipeline/nightly on work pool {WORK_POOL!r} scheduled: cron {args.cron!r}; "
              f"results in {url}")
    elif args.action == "serve":  # one process, no pool: it runs the scheduled runs itself
        os.environ.update(_worker_env())
        from prefect import serve

        serve(deployment(cron=args.cron))
    elif args.action == "worker":  # replaces this process: signals reach the worker directly
        prefect = str(Path(sys.executable).with_name("prefect"))
        name = args.name or f"neon-{os.uname().nodename}-{os.getpid()}"
        cmd = [prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", name]
        env = _worker_env()
        if args.healthcheck:  # GET http://127.0.0.1:8080/health answers while the worker polls
            cmd.append("--with-healthcheck")
            env.setdefault("PREFECT_WORKER_WEBSERVER_HOST", "127.0.0.1")
        os.execve(prefect, cmd, env)
    else:
        os.environ.update({k: v for k, v in _worker_env().items() if k != "NEON_ROOT"})  # to read the result back
        out = _run_now(args.wait, args.timeout)
        print(json.dumps(out, default=str) if args.json else
              f"flow run {out['name']} ({out['flow_run_id']}): {out['state']}"
              + "".join(f"\n  {c['name']}: {c['state']}" for c in out.get("children", [])))
        return 0 if not args.wait or out["state"] == "COMPLETED" else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("store", help="the embedded S3 object store")
    p.add_argument("action", choices=["up", "down", "status", "ls", "env", "put"])
    p.add_argument("paths", nargs="*", help="put: PATH (a file or a folder) and optionally the s3:// URI to put it at")
    p.set_defaults(fn=cmd_store)
    p = sub.add_parser("track", help="import an input into inputs/ so that DVC sees it change",
                       description="Import SOURCE (s3://BUCKET/KEY, a folder, a .zip or a checkpoint file) with "
                       "`dvc import-url` into inputs/data/NAME (images: data.source) or inputs/base/NAME (a "
                       "checkpoint: base.checkpoint), the folders the data and fetch stages depend on.")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("source", help="s3://BUCKET/KEY (the embedded store, or AWS_ENDPOINT_URL_S3's) or a local path")
    p.add_argument("--name", default=None, help="the import's name under inputs/ROLE/ (default: SOURCE's last part)")
    p.set_defaults(fn=cmd_track)
    p = sub.add_parser("prefect", help="a local Prefect API server for the flows")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(fn=cmd_prefect)
    p = sub.add_parser("lineage", help="print the lineage of an artifact (path or s3:// URI)",
                       description="Walk an artifact's manifests back to the data and the base checkpoint. In S3 "
                       "each input is the manifest version whose digest its consumer recorded, and the version id of "
                       "every manifest used is printed.")
    p.add_argument("target", help="an artifact folder, a file in one, or its manifest.json: a local path, or "
                   "s3://BUCKET/KEY (latest version) or s3://BUCKET/KEY?versionId=V (that version)")
    p.add_argument("--version-id", default=None, help="the S3 version of TARGET (same as ?versionId=V)")
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("schedule", help="the scheduled deployment of the pipeline")
    p.add_argument("action", choices=["apply", "serve", "worker", "run"],
                   help="apply: the work pool, the results block and prefect.yaml's deployment; serve: run the "
                   "schedule from this process (no pool); worker: a process worker on the pool for this checkout; "
                   "run: trigger the deployment now")
    p.add_argument("--cron", default=None)
    p.add_argument("--name", default=None, help="worker: its name (default neon-HOST-PID)")
    p.add_argument("--healthcheck", action="store_true", help="worker: serve /health on 127.0.0.1:8080")
    p.add_argument("--wait", action="store_true", help="run: wait for the final state")
    p.add_argument("--timeout", type=float, default=3600, help="run --wait: seconds (default 3600)")
    p.add_argument("--json", action="store_true", help="run: print one JSON object")
    p.set_defaults(fn=cmd_schedule)
    args = parser.parse_args(argv)
    if getattr(args, "cron", "") is None:
        from flows.pipeline import CRON

        args.cron = CRON
    try:
        return args.fn(args)
    except (FileNotFoundError, RuntimeError, store.StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `neon store ls | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
