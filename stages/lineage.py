"""Walk the manifests from an artifact back to the data and the base checkpoint, locally or in S3.

Inputs in a manifest are paths relative to the project root (`artifacts/base`), so the same walk
works on a checkout and on the S3 copy DVC pushes (a version-aware remote keeps the paths).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from stages import store
from stages.artifacts import MANIFEST


def _reader(target: str) -> tuple[Callable[[str], str], str, str]:
    """(read text at a location, root of the project copy, location of the target's manifest)."""
    if target.startswith("s3://"):
        fs = store.filesystem()
        path = target[len("s3://"):].rstrip("/")
        manifest = path if path.endswith(MANIFEST) else (f"{path}/{MANIFEST}" if fs.isdir(path)
                                                           else f"{path.rsplit('/', 1)[0]}/{MANIFEST}")
        return (lambda loc: fs.cat_file(loc).decode()), "s3://", manifest
    p = Path(target)
    manifest = p if p.name == MANIFEST else (p / MANIFEST if p.is_dir() else p.parent / MANIFEST)
    return (lambda loc: Path(loc).read_text()), "", str(manifest)


def chain(target: str) -> list[dict[str, Any]]:
    """The manifests from `target`'s artifact back to the first inputs, depth-first, each once."""
    read, scheme, first = _reader(target)
    try:
        top = json.loads(read(first))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} for {target}: not a pipeline artifact (or not pushed yet)") from None
    suffix = f"/{top['artifact']}/{MANIFEST}"
    root = first[: -len(suffix)] if first.endswith(suffix) else ""
    seen, out = set(), []

    def visit(manifest: dict[str, Any], depth: int) -> None:
        out.append({**manifest, "depth": depth})
        for ref in manifest.get("inputs", {}).values():
            path = ref.get("path", "")
            if not path.startswith("artifacts/") or path in seen:
                continue
            seen.add(path)
            loc = f"{root}/{path}/{MANIFEST}" if root else f"{path}/{MANIFEST}"
            visit(json.loads(read(loc)), depth + 1)

    visit(top, 0)
    return out


def render(target: str) -> str:
    lines = []
    for m in chain(target):
        pad = "  " * m["depth"]
        code = m.get("code", {})
        dirty = " (dirty)" if code.get("dirty") else ""
        lines.append(f"{pad}{m['artifact']}  [stage {m['stage']}]  digest {m['digest'][:16]}")
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
