"""What DVC sees of a stage's outside input. `inputs/tracked.yaml` names, per stage, the import it depends on
(dvc.yaml reads the file as `vars`): `data` depends on `tracked.data`, `fetch` on `tracked.base`.
`neon track` (flows/inputs.py) imports a source (an s3:// prefix or object, a local folder, zip or file)
under `inputs/<role>/` with `dvc import-url` and names it there; the import's `.dvc` file says where it came
from, which the stage records in its manifest's input. A source DVC does not follow is read as it is at
run time, and DVC cannot tell that it changed: the stage says so in its log.

(A dependency on the folder `inputs/<role>/` would be simpler, but DVC 3.67's version-aware `dvc push`
rewrites dvc.lock without the hash of a directory dependency that no stage outputs, so every push would
make the stage look changed. An import is an output, and its hash survives.)
"""
from __future__ import annotations

import configparser
from pathlib import Path, PurePosixPath

import yaml

INPUTS = Path("inputs")  # relative to the project root, where the stages run
TRACKED = INPUTS / "tracked.yaml"
ROLES = {"data": "data.source", "base": "base.checkpoint"}  # inputs/<role>/ feeds this param
REMOTE_SCHEME = "remote://"


def folder(role: str) -> Path:
    return INPUTS / role


def placeholder(role: str) -> str:
    """What tracked.yaml names while nothing is tracked for `role`: the folder's README."""
    return (folder(role) / "README.md").as_posix()


def tracked(root: Path | str = ".") -> dict[str, str]:
    """role -> the path in inputs/tracked.yaml (the placeholder README when the file or entry is missing)."""
    try:
        entries = (yaml.safe_load((Path(root) / TRACKED).read_text()) or {}).get("tracked") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        entries = {}
    return {role: str(entries.get(role) or placeholder(role)) for role in ROLES}


def untracked_note(role: str, source: str) -> str | None:
    """The log line for a source DVC does not follow (one that is not, and does not lie in, the import
    tracked.yaml names for `role`), with the command that makes it followed; None when it is followed."""
    followed = tracked()[role]
    if "://" not in source and followed != placeholder(role) and \
            Path(source).resolve().is_relative_to(Path(followed).resolve()):
        return None
    name = PurePosixPath(source.rstrip("/")).name or "input"
    return (f"note: DVC does not follow {source} ({TRACKED} names {followed} for this stage), so a change "
            f"there reruns nothing; track it with `neon track {role} {source}`, then {ROLES[role]}: "
            f"{folder(role)}/{name}")


def imported_from(source: str) -> dict | None:
    """For a source that is a `dvc import-url` output (`<source>.dvc` beside it): the URL it was imported from
    (a `remote://NAME/...` alias resolved through .dvc/config to the remote's URL), whether the import pins
    object versions, and the md5 DVC pins the copy to (a folder's ends in `.dir`); else None."""
    if "://" in source:
        return None
    dvc_file = Path(str(source).rstrip("/") + ".dvc")
    try:
        spec = yaml.safe_load(dvc_file.read_text())
        dep, out = spec["deps"][0], spec["outs"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    url = str(dep.get("path", ""))
    if url.startswith(REMOTE_SCHEME):
        remote, _, key = url[len(REMOTE_SCHEME):].partition("/")
        cfg = configparser.ConfigParser()
        cfg.read(Path(".dvc") / "config")
        base = cfg.get(f"'remote \"{remote}\"'", "url", fallback=None)
        if base:
            url = f"{base.rstrip('/')}/{key}" if key else base
    return {"url": url, "version_aware": bool((dep.get("fs_config") or {}).get("version_aware")),
            "dvc_file": dvc_file.as_posix(), "md5": out.get("md5")}
