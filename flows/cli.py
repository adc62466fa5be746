"""`neon`: what is not a DVC or Prefect command.

  neon store up|down|status|ls    the embedded SeaweedFS object store (127.0.0.1 only)
  neon prefect up|down|status     a local Prefect API server that the stages' flows then use
  neon lineage PATH_OR_S3_URI     the chain of artifacts, code and params behind an artifact;
                                  one object version: s3://BUCKET/KEY?versionId=V or --version-id V
  neon schedule apply|serve       the cron deployment of the whole pipeline
"""
from __future__ import annotations

import argparse
import configparser
import json
import sys
from pathlib import Path

from flows import ROOT
from stages import lineage, store


def _write_dvc_local(info: store.StoreInfo) -> None:
    """Point the DVC remote at the embedded store (machine-local: .dvc/config.local is git-ignored)."""
    path = ROOT / ".dvc" / "config.local"
    cfg = configparser.ConfigParser()
    cfg.read(path)
    section = "'remote \"store\"'"
    if not cfg.has_section(section):
        cfg.add_section(section)
    creds = store.credentials()
    settings = store.s3_settings()  # DVC's own S3 client: the same short timeouts (its retries: AWS_MAX_ATTEMPTS)
    cfg[section].update(endpointurl=info.endpoint, access_key_id=creds["AWS_ACCESS_KEY_ID"],
                        secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                        connect_timeout=f"{settings['NEON_S3_CONNECT_TIMEOUT']:g}",
                        read_timeout=f"{settings['NEON_S3_READ_TIMEOUT']:g}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        cfg.write(f)
    tmp.replace(path)


def cmd_store(args) -> int:
    state = ROOT / store.DEFAULT_STATE_DIR
    if args.action == "up":
        info = store.start(state)
        _write_dvc_local(info)
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
        # DVC's S3 client (botocore) then retries like the stages' own: bounded, with backoff
        print(f"export AWS_RETRY_MODE=standard AWS_MAX_ATTEMPTS={store.s3_settings()['NEON_S3_RETRIES']}")
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


def cmd_schedule(args) -> int:
    from prefect import serve

    from flows.pipeline import deployment

    dep = deployment(cron=args.cron)
    if args.action == "apply":
        dep_id = dep.apply()
        print(f"deployment neon-pipeline/{dep.name} ({dep_id}) scheduled: cron {args.cron!r}")
    else:
        serve(dep)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("store", help="the embedded S3 object store")
    p.add_argument("action", choices=["up", "down", "status", "ls", "env"])
    p.set_defaults(fn=cmd_store)
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
    p.add_argument("action", choices=["apply", "serve"])
    p.add_argument("--cron", default=None)
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
