"""What DVC sees of a stage's outside input: `inputs/data/` is a dependency of `data`, `inputs/base/` of
`fetch` (dvc.yaml). A source under that folder reruns its stage when it changes; one anywhere else (an
s3:// prefix, a folder elsewhere) is read as it is at run time, and DVC cannot tell that it changed.
`neon track` (flows/inputs.py) imports such a source into the folder with `dvc import-url`; the import's
`.dvc` file says where it came from, which the stage records in its manifest's input.
"""
from __future__ import annotations

import configparser
from pathlib import Path, PurePosixPath

import yaml

INPUTS = Path("inputs")  # relative to the project root, where the stages run
ROLES = {"data": "data.source", "base": "base.checkpoint"}  # inputs/<role>/ feeds this param
REMOTE_SCHEME = "remote://"


def folder(role: str) -> Path:
    return INPUTS / role


def is_seen(role: str, source: str) -> bool:
    """Whether `source` lies in `inputs/<role>/`, the folder the stage depends on."""
    if "://" in source:
        return False
    return Path(source).resolve().is_relative_to(folder(role).resolve())


def untracked_note(role: str, source: str) -> str | None:
    """The log line for a source DVC does not see, with the command that makes it seen; None when it is seen."""
    if is_seen(role, source):
        return None
    name = PurePosixPath(source.rstrip("/")).name or "input"
    return (f"note: DVC does not see {source} (only {folder(role)}/ is a dependency of this stage), so a change "
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
