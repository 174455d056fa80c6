"""Prompt sources for self-distillation (`lightspeed train-eagle3 --prompts SOURCE`).

    path/to/file.jsonl   one prompt per line: a JSON string, {"prompt": str} / {"text": str}
                         (completion prompts), or {"messages": [...]} / {"conversations": [...]}
                         / a bare list of {"role", "content"} turns (chat: the target answers the
                         last turn through its chat template)
    stdlib[:N]           built-in, offline: functions and methods with docstrings from the Python
                         standard library sources, as completion prompts (signature + docstring);
                         at most N of them (default 2000; about 4,000 exist). NOTE: never HumanEval (the evaluation set).
    python[:N]           the same from every Python source on the machine: the standard library,
                         then the installed packages (site-packages; tests skipped); default N 20000.
"""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

from lightspeed.errors import InvalidRequestError

Prompt = str | list[dict]  # completion text, or chat turns


def _from_record(rec, where: str) -> Prompt:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, list):
        return _turns(rec, where)
    if isinstance(rec, dict):
        for key in ("messages", "conversations"):
            if key in rec:
                return _turns(rec[key], where)
        for key in ("prompt", "text", "instruction", "question"):
            if isinstance(rec.get(key), str):
                return rec[key]
    raise InvalidRequestError(f"{where}: expected a string, {{\"prompt\": ...}} or {{\"messages\": [...]}}, "
                              f"got {str(rec)[:80]!r}")


def _turns(turns, where: str) -> list[dict]:
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise InvalidRequestError(f"{where}: chat turns must be objects with role and content")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequestError(f"{where}: each chat turn needs a role and a string content")
        out.append({"role": role, "content": content})
    if out and out[-1]["role"] == "assistant":
        out = out[:-1]  # NOTE: the target writes the answer itself (self-distillation)
    if not out:
        raise InvalidRequestError(f"{where}: a conversation with no turn for the model to answer")
    return out


def read_jsonl_prompts(path: Path) -> list[Prompt]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{path}:{n}: not JSON ({e.msg})") from None
            p = _from_record(rec, f"{path}:{n}")
            if p:
                prompts.append(p)
    return prompts


def _source_files():
    """(root, the parts of a relative path to skip) of the standard library, then of site-packages."""
    paths = sysconfig.get_paths()
    yield Path(paths["stdlib"]), ("test", "idlelib", "lib2to3", "site-packages", "dist-packages", "tkinter",
                                  "turtledemo")
    for site in dict.fromkeys((paths["purelib"], paths["platlib"])):
        yield Path(site), ("test", "tests", "testing", "_vendor", "vendored")


def stdlib_prompts(limit: int = 2000, site_packages: bool = False) -> list[str]:
    """Signature + docstring of public functions and methods (a method under its class's first
    line) of the standard library (then of site-packages), sorted files, first `limit`; each a
    completion prompt ending where the body starts."""
    prompts: list[str] = []
    for n, (root, skip) in enumerate(_source_files()):
        if n and not site_packages:
            break
        for f in sorted(root.rglob("*.py")):
            if any(part in skip for part in f.relative_to(root).parts):
                continue
            prompts += _function_prompts(f, limit - len(prompts))
            if len(prompts) >= limit:
                return prompts
    return prompts


def _function_prompts(f: Path, limit: int) -> list[str]:
    """Up to `limit` prompts from one source file (none when it does not parse)."""
    try:
        src = f.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []
    lines = src.splitlines()
    found = [("", node) for node in tree.body]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_") and lines[cls.lineno - 1].endswith(":"):
            found += [(lines[cls.lineno - 1] + "\n", node) for node in cls.body]
    prompts: list[str] = []
    for prefix, node in found:
        if len(prompts) >= limit:
            break
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc or len(doc) < 20 or not node.body or len(node.body) < 2:
            continue
        end = node.body[0].end_lineno  # the docstring's last line
        head = prefix + "\n".join(lines[node.lineno - 1 - len(node.decorator_list): end])
        if len(head) <= 1500:
            prompts.append(head + "\n")
    return prompts


def load_prompts(source: str) -> list[Prompt]:
    """--prompts SOURCE -> prompts; InvalidRequestError when it yields none."""
    name, _, num = source.partition(":")
    if name in ("stdlib", "python"):
        limit = 2000 if name == "stdlib" else 20000
        if num:
            try:
                limit = int(num)
            except ValueError:
                raise InvalidRequestError(f"--prompts {source}: expected {name} or {name}:N") from None
        prompts: list[Prompt] = list(stdlib_prompts(limit, site_packages=name == "python"))
        if not prompts:
            raise InvalidRequestError(f"--prompts {source}: no Python sources with docstrings were found on this "
                                      "machine; pass a JSONL file of prompts")
        return prompts
    path = Path(source).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"--prompts {source}: no such file (pass a JSONL file of prompts or chat turns, "
                                  "or stdlib[:N] / python[:N] for the built-in sources)")
    prompts = read_jsonl_prompts(path)
    if not prompts:
        raise InvalidRequestError(f"--prompts {source}: the file holds no prompts (one JSON prompt or conversation "
                                  "per line)")
    return prompts
