#!/usr/bin/env python3
"""Sources for building selfext on a machine without network access (an air-gapped GPU server, say).

    python scripts/offline_source.py OUT_DIR [--backend cuda] [--backend vulkan ...]

From the pinned llama-cpp-python sdist (SELFEXT_LLAMA_SOURCE if it names that tarball, else the one in the build's
cache, downloaded there with pip if missing and checked against patches/UPSTREAM's SHA-256), writes to OUT_DIR:

  llama.cpp-<commit>.tar.gz      the sdist's vendor/llama.cpp without what selfext's build never reads: the models,
                                 docs, tests, examples and conversion scripts, and the ggml backends other than the CPU,
                                 BLAS, RPC and the --backend ones (7 MB with CUDA, of 76); pass it to the build as
                                 SELFEXT_LLAMA_SOURCE
  llama_cpp_python-<v>.tar.gz    llama-cpp-python itself without its vendored llama.cpp: the Python layer selfext runs
                                 on, installed with CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"

then prints the commands to run on the other machine.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patches import SKIP_DIRS, pristine_source, upstream_info  # noqa: E402

# top-level entries of llama.cpp that the build never reads: those any source copy skips, and more
SKIP_TOP = SKIP_DIRS | {".github", "tests", "examples", "scripts", "conversion", "gguf-py", "grammars", "prompts",
                        "requirements"}
# ggml backends (ggml/src/ggml-<name>) that every build may add; --backend adds more
KEEP_BACKENDS = {"cpu", "blas", "rpc"}
# backends that compile another backend's sources
SHARES = {"hip": {"cuda"}, "musa": {"cuda"}}
# top-level entries of llama-cpp-python that its Python layer never reads
SKIP_PYTHON = {"vendor", "examples", ".git"}


def keep_llama(rel: str, backends: set[str]) -> bool:
    """Whether the build needs llama.cpp's file rel (a path relative to the llama.cpp tree)."""
    parts = rel.split("/")
    if parts[0] in SKIP_TOP or ".git" in parts:
        return False
    if len(parts) > 2 and parts[:2] == ["ggml", "src"] and parts[2].startswith("ggml-"):
        name = parts[2][len("ggml-"):]
        if len(parts) > 3 or "." not in name:  # a backend's folder, not a file like ggml-alloc.c
            return name in backends
    return True


def write(out: Path, backend_args: list[str]) -> tuple[Path, Path]:
    info = upstream_info()
    backends = set(KEEP_BACKENDS)
    for b in backend_args:
        backends |= {b} | SHARES.get(b, set())
    sdist = pristine_source(info)
    if sdist.is_dir():
        sys.exit(f"{sdist}: a directory; this script reads the llama-cpp-python sdist tarball")
    top = info["SDIST_SUBDIR"].split("/")[0]                 # llama_cpp_python-<v>
    vendor = info["SDIST_SUBDIR"] + "/"                       # .../vendor/llama.cpp/
    out.mkdir(parents=True, exist_ok=True)
    llama_out = out / f"llama.cpp-{info['LLAMA_CPP_COMMIT']}.tar.gz"
    python_out = out / f"{top}.tar.gz"
    with tarfile.open(sdist) as src, tarfile.open(llama_out, "w:gz") as lt, tarfile.open(python_out, "w:gz") as pt:
        for member in src.getmembers():
            name = member.name
            if name.startswith(vendor):
                dest = lt if keep_llama(name[len(vendor):], backends) else None
            else:
                rel = name[len(top) + 1:] if name.startswith(top + "/") else ""
                dest = pt if rel and rel.split("/")[0] not in SKIP_PYTHON else None
            if dest is not None:
                dest.addfile(member, src.extractfile(member) if member.isfile() else None)
    return llama_out, python_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write the two tarballs to")
    ap.add_argument("--backend", action="append", default=[],
                    help="a ggml backend to keep besides cpu, blas and rpc (cuda, metal, vulkan, hip, ...); repeatable")
    args = ap.parse_args()
    llama_out, python_out = write(args.out, [b.lower() for b in args.backend])
    for p in (llama_out, python_out):
        print(f"{p}: {p.stat().st_size / 2**20:.1f} MiB")
    cmake = " ".join([f"-DGGML_{b.upper()}=ON" for b in args.backend] + ["-DLLAMA_BUILD=OFF", "-DLLAVA_BUILD=OFF"])
    print(f"""
On the machine without network (Python with scikit-build-core, CMake and a compiler; wheels of selfext's dependencies
where it lacks them, e.g. from `pip download` here), next to a copy of this repository:
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip install --no-deps --no-build-isolation {python_out.name}
  SELFEXT_LLAMA_SOURCE=$PWD/{llama_out.name} CMAKE_ARGS="{cmake}" pip install --no-build-isolation <repository>""")

if __name__ == "__main__":
    main()
