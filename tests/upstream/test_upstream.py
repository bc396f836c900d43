"""cmake/upstream.cmake on its own: where the pristine llama.cpp comes from, what the series does to it, and what a
re-configure rewrites.

Each test configures a throw-away CMake project (``project(... NONE)``: no compiler) that includes our
upstream.cmake and calls ``selfext_prepare_upstream``, next to a copy of patches/ it may edit. The pristine source is
the sdist the build downloads into the selfext cache (or ``SELFEXT_LLAMA_SOURCE``); without either they skip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "patches"

PROJECT = """\
cmake_minimum_required(VERSION 3.21)
project(selfext_upstream_only NONE)
include(cmake/upstream.cmake)
selfext_prepare_upstream(SELFEXT_LLAMA_SRC)
message(STATUS "prepared: ${SELFEXT_LLAMA_SRC}")
"""


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts import each other from their directory)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PATCHES_PY = load_script("patches")
UPSTREAM = PATCHES_PY.upstream_info()


def series(patch_dir: Path = PATCHES) -> list[str]:
    lines = (line.strip() for line in (patch_dir / "series").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def touched(patch: Path) -> list[str]:
    """Files a unified diff writes (b/ paths), in order."""
    files = re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)
    return list(dict.fromkeys(files))


ALL_TOUCHED = [f for name in series() for f in touched(PATCHES / name)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def given_source() -> Path | None:
    value = os.environ.get("SELFEXT_LLAMA_SOURCE")
    return Path(value).resolve() if value else None


def pinned_sdist() -> Path:
    """The pinned llama-cpp-python sdist: SELFEXT_LLAMA_SOURCE when that is a file, else the build's cache."""
    given = given_source()
    path = given if given and given.is_file() else PATCHES_PY.cache_dir() / UPSTREAM["SDIST_NAME"]
    if not path.is_file():
        pytest.skip(f"no llama.cpp source: neither {path} (downloaded by the first build) "
                    "nor SELFEXT_LLAMA_SOURCE is present")
    return path


@pytest.fixture(scope="module")
def cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake is not on PATH")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    version = tuple(int(x) for x in re.search(r"(\d+)\.(\d+)", out).groups())  # type: ignore[union-attr]
    if version < (3, 21):
        pytest.skip(f"cmake {version[0]}.{version[1]} is older than the 3.21 CMakeLists.txt needs")
    return exe


@pytest.fixture(scope="module")
def sdist() -> Path:
    return pinned_sdist()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine llama.cpp source directory: SELFEXT_LLAMA_SOURCE when that is one, else the sdist's, extracted."""
    given = given_source()
    if given and given.is_dir():
        return given
    path = pinned_sdist()
    dest = tmp_path_factory.mktemp("pristine")
    prefix = UPSTREAM["SDIST_SUBDIR"] + "/"
    kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(path, "r|gz") as tar:  # one pass over the stream
        for member in tar:
            if member.name.startswith(prefix):
                tar.extract(member, dest, **kw)
    return dest / UPSTREAM["SDIST_SUBDIR"]


@pytest.fixture(scope="module")
def small_source(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama.cpp tree of a few files: what the series touches, and a top level like the real one's."""
    dest = tmp_path_factory.mktemp("small") / "llama.cpp"
    for rel in [*ALL_TOUCHED, "CMakeLists.txt", "src/models/models.h"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_dir / rel, dest / rel)
    for rel in ["models/ggml-vocab-llama-spm.gguf", "docs/build.md", "media/logo.png", "benches/x/README.md",
                ".git/HEAD", "tools/server/docs/api.md"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(rel)
    return dest


class Project:
    """A configure-only CMake project around cmake/upstream.cmake, with its own copy of patches/."""

    def __init__(self, root: Path, cmake: str):
        self.root, self.cmake = root, cmake
        (root / "cmake").mkdir(parents=True)
        shutil.copy2(ROOT / "cmake" / "upstream.cmake", root / "cmake")
        shutil.copytree(PATCHES, root / "patches", ignore=shutil.ignore_patterns("src", "include", "ggml"))
        (root / "CMakeLists.txt").write_text(PROJECT)
        self.patches = root / "patches"
        self.tree = root / "build" / "upstream" / "src"

    def configure(self, source: Path | None, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "SELFEXT_LLAMA_SOURCE"}
        return subprocess.run(
            [self.cmake, "-S", str(self.root), "-B", str(self.root / "build"),
             f"-DSELFEXT_LLAMA_SOURCE={source or ''}", f"-DSELFEXT_CACHE_DIR={cache or self.root / 'no-cache'}"],
            capture_output=True, text=True, env=env, timeout=300)

    def prepare(self, source: Path) -> Path:
        done = self.configure(source)
        assert done.returncode == 0, done.stdout + done.stderr
        return self.tree

    def mtimes(self, files: list[str]) -> dict[str, int]:
        return {f: (self.tree / f).stat().st_mtime_ns for f in files}

    def age(self, files: list[str]) -> None:
        """Date ``files`` back a day, so that any rewrite shows in its mtime whatever the clock's resolution."""
        for f in files:
            st = (self.tree / f).stat()
            os.utime(self.tree / f, ns=(st.st_atime_ns, st.st_mtime_ns - 86_400 * 10**9))


@pytest.fixture
def project(tmp_path: Path, cmake: str) -> Project:
    return Project(tmp_path / "project", cmake)


def patched_by_patch(pristine: Path, patch_dir: Path, work: Path) -> Path:
    """The pristine files the series touches, with the series applied by patch(1) directly: what we expect."""
    for f in ALL_TOUCHED:
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pristine / f, work / f)
    for name in series(patch_dir):
        patch = str(patch_dir / name)
        cmd = (["patch", "-p1", "--batch", "--fuzz=0", "-s", "-i", patch] if shutil.which("patch") else
               ["git", "apply", "-p1", patch])  # what upstream.cmake falls back to
        subprocess.run(cmd, cwd=work, check=True)
    return work


def assert_prepared(tree: Path, pristine: Path, tmp_path: Path) -> None:
    assert (tree / "src" / "models" / "models.h").read_bytes() == (pristine / "src/models/models.h").read_bytes()
    assert not any((tree / top).exists() for top in ("models", "docs", "media", "benches", ".git"))
    expected = patched_by_patch(pristine, PATCHES, tmp_path)
    for f in ALL_TOUCHED:
        assert (tree / f).read_bytes() == (expected / f).read_bytes(), f"{f} differs from the series applied"
        assert (tree / f).read_bytes() != (pristine / f).read_bytes(), f"{f} is unpatched"


# --- where the source comes from -------------------------------------------------------------------------------------

def test_a_source_directory_yields_the_patched_tree_with_src_models(project: Project, source_dir: Path,
                                                                    tmp_path: Path) -> None:
    tree = project.prepare(source_dir)
    assert_prepared(tree, source_dir, tmp_path / "expected")
    assert (tree / "ggml" / "CMakeLists.txt").is_file() and (tree / ".clang-format").is_file()


def test_the_sdist_given_or_in_the_cache_yields_the_same_patched_tree(project: Project, sdist: Path,
                                                                      source_dir: Path, tmp_path: Path) -> None:
    tree = project.prepare(sdist)
    assert_prepared(tree, source_dir, tmp_path / "given")
    if sdist.name != UPSTREAM["SDIST_NAME"] or sha256(sdist) != UPSTREAM["SDIST_SHA256"]:
        return  # upstream.cmake would delete a cached sdist whose SHA-256 differs, and download the pinned one
    # the build's default: SELFEXT_LLAMA_SOURCE unset, the pinned sdist already in the cache (same tarball,
    # so the tree is not extracted again)
    done = project.configure(None, cache=sdist.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "downloading" not in done.stdout and "extracting" not in done.stdout
    assert_prepared(tree, source_dir, tmp_path / "cached")


def test_only_the_top_level_models_docs_media_benches_and_git_are_left_out(project: Project,
                                                                           small_source: Path) -> None:
    tree = project.prepare(small_source)
    assert (tree / "src" / "models" / "models.h").is_file()
    assert (tree / "tools" / "server" / "docs" / "api.md").read_text() == "tools/server/docs/api.md"
    left_out = {"models", "docs", "media", "benches", ".git"}
    assert left_out <= {p.name for p in small_source.iterdir()}
    assert sorted(p.name for p in tree.iterdir()) == sorted(p.name for p in small_source.iterdir()
                                                            if p.name not in left_out)


def test_a_directory_that_is_not_llama_cpp_stops_the_build_naming_it(project: Project, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = project.configure(tmp_path / "empty")
    assert done.returncode != 0
    assert (f"selfext: SELFEXT_LLAMA_SOURCE={tmp_path / 'empty'} is not a llama.cpp source tree"
            in one_line(done.stderr))


# --- scripts/offline_source.py: the sources for a machine without network ----------------------------------------

def offline_source(monkeypatch: pytest.MonkeyPatch, sdist: Path):
    """scripts/offline_source.py as a module, reading the sdist at ``sdist``."""
    monkeypatch.setenv("SELFEXT_LLAMA_SOURCE", str(sdist))
    return load_script("offline_source")


def fake_sdist(path: Path, files: list[str]) -> Path:
    top = UPSTREAM["SDIST_SUBDIR"].split("/")[0]
    with tarfile.open(path, "w:gz") as tar:
        for rel in files:
            data = rel.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(("env", "expected"), [
    ({"SELFEXT_CACHE_DIR": "/c/selfext-cache", "XDG_CACHE_HOME": "/x"}, "/c/selfext-cache"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/selfext"),
    ({}, "~/.cache/selfext"),
])
def test_the_scripts_look_for_the_sdist_where_the_build_keeps_it(monkeypatch: pytest.MonkeyPatch,
                                                                  env: dict[str, str], expected: str) -> None:
    # CMakeLists.txt: SELFEXT_CACHE_DIR, else $XDG_CACHE_HOME/selfext, else ~/.cache/selfext
    for name in ("SELFEXT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert PATCHES_PY.cache_dir() == Path(expected).expanduser()


def test_the_offline_sources_keep_what_the_build_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lc = "vendor/llama.cpp/"
    kept_llama = ["CMakeLists.txt", "src/llama-graph.cpp", "src/models/llama.cpp", "ggml/src/ggml.c",
                  "ggml/src/ggml-alloc.c", "ggml/src/ggml-cpu/ops.cpp", "ggml/src/ggml-rpc/ggml-rpc.cpp",
                  "ggml/src/ggml-blas/ggml-blas.cpp", "ggml/src/ggml-cuda/fattn.cu", "ggml/src/ggml-hip/CMakeLists.txt",
                  "tools/server/server.cpp", "tools/ui/CMakeLists.txt", "vendor/miniaudio/miniaudio.h"]
    dropped_llama = ["models/ggml-vocab.gguf", "docs/build.md", "tests/test-backend-ops.cpp", "examples/x/x.cpp",
                     "ggml/src/ggml-vulkan/ggml-vulkan.cpp", "ggml/src/ggml-metal/ggml-metal.m", ".git/HEAD"]
    python = ["pyproject.toml", "CMakeLists.txt", "llama_cpp/llama.py"]
    dropped_python = ["examples/high_level_api/x.py", ".git/HEAD", "vendor/llava/x.cpp"]
    sdist = fake_sdist(tmp_path / UPSTREAM["SDIST_NAME"],
                       [lc + f for f in kept_llama + dropped_llama] + python + dropped_python)

    llama_out, python_out = offline_source(monkeypatch, sdist).write(tmp_path / "out", ["hip"])  # hip builds cuda's

    top = UPSTREAM["SDIST_SUBDIR"].split("/")[0]
    with tarfile.open(llama_out) as tar:
        assert sorted(tar.getnames()) == sorted(f"{top}/{lc}{f}" for f in kept_llama)
    with tarfile.open(python_out) as tar:
        assert sorted(tar.getnames()) == sorted(f"{top}/{f}" for f in python)
    assert llama_out.name == f"llama.cpp-{UPSTREAM['LLAMA_CPP_COMMIT']}.tar.gz" and python_out.name == UPSTREAM["SDIST_NAME"]


def test_the_offline_llama_cpp_tarball_yields_the_patched_tree(project: Project, sdist: Path, source_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    llama_out, _ = offline_source(monkeypatch, sdist).write(tmp_path / "out", ["cuda"])
    assert llama_out.stat().st_size < sdist.stat().st_size / 5
    tree = project.prepare(llama_out)
    assert_prepared(tree, source_dir, tmp_path / "expected")
    assert (tree / "ggml" / "src" / "ggml-cuda" / "fattn.cu").is_file()
    assert not (tree / "ggml" / "src" / "ggml-vulkan").exists() and not (tree / "tests").exists()


# --- re-configuring ----------------------------------------------------------------------------------------------

def edit_first_added_line(patch: Path) -> str:
    """Append a comment to the first line ``patch`` adds (the patch still applies); returns that line's file."""
    lines = patch.read_text().splitlines(keepends=True)
    current = None
    for i, line in enumerate(lines):
        if line.startswith("+++ b/"):
            current = line[len("+++ b/"):].strip()
        elif line.startswith("+") and line.strip() != "+" and current:
            lines[i] = line.rstrip("\n") + " // edited\n"
            patch.write_text("".join(lines))
            return current
    raise AssertionError(f"{patch.name} adds no line")


def test_editing_one_patch_rewrites_only_the_file_whose_result_changed(project: Project,
                                                                       small_source: Path) -> None:
    others = ["CMakeLists.txt", "src/models/models.h"]
    project.prepare(small_source)
    project.age(ALL_TOUCHED + others)
    before = project.mtimes(ALL_TOUCHED + others)

    last = series()[-1]
    edited = edit_first_added_line(project.patches / last)
    project.prepare(small_source)

    after = project.mtimes(ALL_TOUCHED + others)
    assert [f for f in before if after[f] != before[f]] == [edited]
    assert "// edited" in (project.tree / edited).read_text()


def test_dropping_a_patch_from_the_series_restores_its_files(project: Project, small_source: Path) -> None:
    project.prepare(small_source)
    *kept, dropped = series()
    project.age(ALL_TOUCHED)
    before = project.mtimes(ALL_TOUCHED)
    (project.patches / "series").write_text("".join(f"{name}\n" for name in kept))
    project.prepare(small_source)

    after = project.mtimes(ALL_TOUCHED)
    dropped_files = touched(PATCHES / dropped)
    assert sorted(f for f in before if after[f] != before[f]) == sorted(dropped_files)
    for f in dropped_files:
        assert (project.tree / f).read_bytes() == (small_source / f).read_bytes()


def one_line(stderr: str) -> str:
    """CMake's error text with its line wrapping undone."""
    return " ".join(stderr.split())


NOT_THERE = """\
Subject: a hunk whose context is not in llama.cpp
---
--- a/src/llama-graph.cpp
+++ b/src/llama-graph.cpp
@@ -1,6 +1,7 @@
 this line is not in llama-graph.cpp
 nor this one
 nor this
+// nor will this one be
 and not this
 or this
 or this
"""


def fuzzy(source: Path) -> str:
    """A hunk whose middle context matches llama-graph.cpp's lines 3-4 but whose outer lines do not."""
    lines = (source / "src" / "llama-graph.cpp").read_text().splitlines()
    return ("Subject: a stale hunk that matches only with fuzz\n---\n"
            "--- a/src/llama-graph.cpp\n+++ b/src/llama-graph.cpp\n@@ -2,4 +2,5 @@\n"
            f" {lines[1]} // changed upstream\n {lines[2]}\n+// added\n {lines[3]}\n {lines[4]} // changed\n")


@pytest.mark.parametrize("hunk", ["context not in llama.cpp", "context matching only with fuzz"])
def test_a_patch_that_does_not_apply_stops_the_build_naming_it(project: Project, small_source: Path,
                                                               hunk: str) -> None:
    project.prepare(small_source)
    project.age(ALL_TOUCHED)
    before = project.mtimes(ALL_TOUCHED)
    text = NOT_THERE if hunk == "context not in llama.cpp" else fuzzy(small_source)
    (project.patches / "0099-does-not-apply.patch").write_text(text)
    with (project.patches / "series").open("a") as f:
        f.write("0099-does-not-apply.patch\n")

    done = project.configure(small_source)
    assert done.returncode != 0
    assert (f"selfext: patch 0099-does-not-apply.patch does not apply to llama.cpp "
            f"{UPSTREAM['LLAMA_CPP_COMMIT']}") in one_line(done.stderr)
    assert project.mtimes(ALL_TOUCHED) == before  # the tree keeps the last series that applied
