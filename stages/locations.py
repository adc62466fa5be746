"""Where params may point: an s3:// URI with a valid bucket and a plain key, or a local path outside the
project's own state. A location that climbs out with `..` or into artifacts/, .neon/ or .git/ would let
a params file read or overwrite pipeline state as if it were an input."""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

BUILT_IN_SOURCES = ("mnist", "toy2d", "fashion-mnist")  # data.source names that are data, not locations
PROJECT_FOLDERS = ("artifacts", ".neon", ".git")  # the project's own state: never an input named in params


def within_project(path: Path, root: Path) -> str | None:
    """The project folder (artifacts, .neon, .git) that `path` lies in, if any."""
    def real(p: Path) -> Path:
        try:
            return p.resolve()  # symlinks followed: a link into .git/ is inside .git/
        except (OSError, RuntimeError):  # a symlink loop, a name too long: judge the path as written
            return Path(os.path.normpath(p.absolute()))

    target = real(root / path)
    for name in PROJECT_FOLDERS:
        folder = real(root / name)
        if target == folder or folder in target.parents:
            return name
    return None


def check_location(value: str, root: Path, what: str) -> str:
    """An s3:// URI with a valid bucket and plain key, or a local path that neither climbs with `..` nor
    points into the project's own artifacts/, .neon/ or .git/. Absolute paths elsewhere are fine."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"contains a control character; give the {what} as a plain path or s3://bucket/key")
    if value.startswith("s3://"):
        bucket, _, key = value[len("s3://"):].partition("/")
        if not valid_bucket(bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 characters of a-z, 0-9, '.' and '-', "
                             "starting and ending with a letter or digit, not an IP address); fix the URI "
                             f"(s3://bucket/key) of the {what}")
        if any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"the key has a '.' or '..' component; name the {what} by its plain key "
                             "(s3://bucket/folder/name)")
        return value
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise ValueError(f"only s3:// URIs and local paths are supported for the {what}; copy it to S3 or to a "
                         "local folder and give that")
    path = Path(value)
    try:
        path = path.expanduser()
    except RuntimeError:  # no home directory to expand `~` to: the path as written
        pass
    if ".." in path.parts:
        raise ValueError(f"has a '..' component; give the {what} without it (an absolute path works for files "
                         "outside the project)")
    if inside := within_project(path, root):
        raise ValueError(f"points into the project's own {inside}/ (pipeline state, not an input); give your own "
                         f"{what} outside {inside}/")
    return value


def valid_bucket(name: str) -> bool:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name) or ".." in name or ".-" in name or "-." in name:
        return False
    try:
        ipaddress.IPv4Address(name)
        return False
    except ValueError:
        return True
