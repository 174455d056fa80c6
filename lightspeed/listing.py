"""`lightspeed list`: the catalog (cached or not) and every model file in the cache, with sizes."""
from __future__ import annotations

from pathlib import Path

from lightspeed.loader.pull import list_catalog, lightspeed_home


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def list_models() -> str:
    """The table `lightspeed list` prints."""
    catalog = list_catalog()
    rows = [("NAME", "SIZE", "CACHED", "DESCRIPTION")]
    rows += [(m["name"], _size(m["size"]), "yes" if m["path"] else "no", m["description"]) for m in catalog]
    cached = {m["path"] for m in catalog if m["path"]}
    models_dir = lightspeed_home() / "models"
    others = sorted(p for p in models_dir.glob("*") if p.is_file() and str(p) not in cached
                    and not p.name.startswith(".")) if models_dir.is_dir() else []
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append(f"\ncache: {models_dir}")
    lines += [f"  {p.name}  {_size(p.stat().st_size)}" for p in others]
    total = sum(Path(p).stat().st_size for p in cached) + sum(p.stat().st_size for p in others)
    lines.append(f"  {len(cached) + len(others)} files, {_size(total)}")
    return "\n".join(lines)
