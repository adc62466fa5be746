"""Make the pipeline's bucket exist with versioning on (DVC's remote is version-aware: `dvc push` records each
object's version id in dvc.lock, and lineage reads manifests by version). Idempotent: compose's `s3-init`
runs it at every `docker compose up`.

Endpoint and credentials from the environment: AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
The bucket: NEON_BUCKET (default neon). Exit 0 when the bucket is versioned, 1 with one line otherwise.
"""
from __future__ import annotations

import os
import sys
import time

from stages import store


def main() -> int:
    bucket = os.environ.get("NEON_BUCKET", store.DEFAULT_BUCKET)
    fs = store.filesystem()
    for attempt in range(30):  # the S3 gateway may answer its health check before it serves buckets
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            fs.make_bucket_versioned(bucket, versioned=True)
            status = fs.call_s3("get_bucket_versioning", Bucket=bucket).get("Status")
            break
        except Exception as exc:  # noqa: BLE001 - not up yet, or refused: retried, then reported
            last = exc
            time.sleep(2)
            fs.invalidate_cache()
    else:
        print(f"error: bucket {bucket} could not be made versioned: {last}", file=sys.stderr)
        return 1
    if status != "Enabled":
        print(f"error: bucket {bucket} versioning is {status!r}, not Enabled", file=sys.stderr)
        return 1
    print(f"bucket {bucket}: versioning Enabled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
