#!/usr/bin/env python3
"""Work on the llama.cpp patch series as git commits.

  python scripts/patches.py checkout DIR   # pinned llama.cpp in DIR as a git repo: one commit per patch
  (edit, commit: one commit per patch; the first line of the message is the subject, the rest the description)
  python scripts/patches.py export DIR     # rewrite patches/NNNN-*.patch and patches/series from DIR's commits

The pristine source comes from SELFEXT_LLAMA_SOURCE (a llama.cpp directory or the llama-cpp-python sdist) or
from the sdist that the build downloads into the cache (~/.cache/selfext); see patches/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
BASE_TAG = "upstream"
SKIP_DIRS = {"models", "docs", "media", "benches", ".git"}


def upstream_info() -> dict[str, str]:
    info = {}
    for line in (PATCHES / "UPSTREAM").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            info[key] = value
    return info


def git(repo: Path, *args: str, capture: bool = False) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="selfext", GIT_AUTHOR_EMAIL="selfext@localhost",
               GIT_COMMITTER_NAME="selfext", GIT_COMMITTER_EMAIL="selfext@localhost")
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                         stdout=subprocess.PIPE if capture else None, text=True)
    return out.stdout if capture else ""


def cache_dir() -> Path:
    """Where the build keeps the downloaded sdist, as CMakeLists.txt chooses it."""
    if "SELFEXT_CACHE_DIR" in os.environ:
        return Path(os.environ["SELFEXT_CACHE_DIR"])
    if "XDG_CACHE_HOME" in os.environ:
        return Path(os.environ["XDG_CACHE_HOME"]) / "selfext"
    return Path.home() / ".cache" / "selfext"


def pristine_source(info: dict[str, str]) -> Path:
    given = os.environ.get("SELFEXT_LLAMA_SOURCE")
    if given:
        return Path(given)
    cache = cache_dir()
    sdist = cache / info["SDIST_NAME"]
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={info['LLAMA_CPP_PYTHON_VERSION']}", "-d", str(cache)], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != info["SDIST_SHA256"]:
        sys.exit(f"{sdist}: SHA-256 {digest} != {info['SDIST_SHA256']}")
    return sdist


def copy_source(source: Path, dest: Path, info: dict[str, str]) -> None:
    if source.is_dir():
        shutil.copytree(source, dest, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
        return
    prefix = info["SDIST_SUBDIR"] + "/"
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            if not rel or rel.split("/")[0] in SKIP_DIRS:
                continue
            member.name = rel
            tar.extract(member, dest, filter="data")


def read_patch(path: Path) -> tuple[str, str]:
    """(commit message, diff) of a DEP-3 style patch file."""
    text = path.read_text()
    header, sep, diff = text.partition("\n---\n")
    if not sep:
        sys.exit(f"{path.name}: no '---' line between the header and the diff")
    subject, description = "", []
    for line in header.splitlines():
        if line.startswith("Subject: "):
            subject = line[len("Subject: "):]
        elif line.startswith("Description: "):
            description.append(line[len("Description: "):])
        elif line.startswith(" ") and description:
            description.append("" if line.strip() == "." else line[1:])
    return subject + "\n\n" + "\n".join(description) + "\n", diff


def checkout(dest: Path) -> None:
    info = upstream_info()
    if dest.exists():
        sys.exit(f"{dest} exists; remove it or choose another directory")
    copy_source(pristine_source(info), dest, info)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", f"llama.cpp {info['LLAMA_CPP_COMMIT']} (llama-cpp-python {info['LLAMA_CPP_PYTHON_VERSION']})")
    git(dest, "tag", BASE_TAG)
    for name in series():
        message, diff = read_patch(PATCHES / name)
        subprocess.run(["git", "-C", str(dest), "apply", "--index", "-"], input=diff, text=True, check=True)
        git(dest, "commit", "-q", "-m", message)
    print(f"{dest}: {len(series())} patches applied as commits on top of tag '{BASE_TAG}'")


def series() -> list[str]:
    lines = (PATCHES / "series").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def export(repo: Path) -> None:
    commits = git(repo, "rev-list", "--reverse", f"{BASE_TAG}..HEAD", capture=True).split()
    for old in series():
        (PATCHES / old).unlink(missing_ok=True)
    names = []
    for n, sha in enumerate(commits, 1):
        subject = git(repo, "log", "-1", "--format=%s", sha, capture=True).strip()
        body = git(repo, "log", "-1", "--format=%b", sha, capture=True).strip()
        diff = git(repo, "diff", "--no-color", "--no-prefix", "--src-prefix=a/", "--dst-prefix=b/",
                   f"{sha}~1", sha, capture=True)
        slug = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")[:50]
        name = f"{n:04d}-{slug}.patch"
        desc = "\n".join(" " + (l if l.strip() else ".") for l in body.splitlines())
        header = f"Subject: {subject}\nDescription: {desc.lstrip() if desc else subject}\n"
        (PATCHES / name).write_text(header + "---\n" + diff)
        names.append(name)
    (PATCHES / "series").write_text("".join(n + "\n" for n in names))
    print(f"exported {len(names)} patches to {PATCHES}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["checkout", "export"])
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    checkout(args.dir) if args.command == "checkout" else export(args.dir)


if __name__ == "__main__":
    main()
