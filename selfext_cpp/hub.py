"""GGUF models from the Hugging Face Hub: references, quant selection, cached downloads.

References:
    owner/repo/path/file.gguf   one file
    owner/repo:Q4_K_M           the repo's GGUF whose name carries that quant label (all shards if split)
    owner/repo                  the repo's only GGUF

Downloads go through ``huggingface_hub`` into its cache (``HF_HOME``/``HF_HUB_CACHE``): a connection dropped
mid-file resumes with a Range request, its progress bar shows, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the saved
token or ``HF_TOKEN`` apply, and a file only appears in the cache once complete. A disk without room for a file
stops its download before the first byte (huggingface_hub would only warn, then fill the disk); one that fills up
anyway ends in one line, with the partial file removed. ``huggingface_hub`` is imported on first use.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError, ParameterError

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"  # the Hub's owner and repo names
_REF = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:(?P<file>/[^:]+)|:(?P<quant>[A-Za-z0-9._-]+))?$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
REF_FORMS = "owner/repo/file.gguf or owner/repo:QUANT"


@dataclass(frozen=True)
class HubRef:
    """A parsed reference: ``filename`` or ``quant`` or neither (the repo's only GGUF)."""

    repo_id: str
    filename: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        if self.filename:
            return f"{self.repo_id}/{self.filename}"
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def looks_like_ref(spec: str) -> bool:
    """True when ``spec`` is meant as a Hub reference rather than a local path: ``owner/repo``,
    ``owner/repo:QUANT`` or ``owner/repo/.../file``, not absolute or relative-dotted, and not an existing file.
    ``dir/file.gguf`` (one slash, a GGUF name) stays a local path."""
    if not spec or Path(spec).exists() or spec.startswith(("/", ".", "~", "\\")) or "\\" in spec:
        return False
    head = spec.split(":", 1)[0]
    n = head.count("/")
    return ":" in spec or n >= 2 or (n == 1 and not head.lower().endswith(".gguf"))


def parse_ref(spec: str) -> HubRef:
    """Parse a Hub reference; ParameterError (a usage error) names the form expected."""
    m = _REF.match(spec)
    if not m or "--" in m["repo"] or ".." in m["repo"]:
        raise ParameterError(f"invalid Hugging Face reference {spec!r}: use {REF_FORMS}")
    filename = m["file"][1:] if m["file"] else None
    if filename is not None:
        parts = filename.split("/")
        if not filename.lower().endswith(".gguf") or any(p in ("", ".", "..") for p in parts):
            raise ParameterError(f"invalid Hugging Face reference {spec!r}: the file must be a .gguf path inside "
                                 f"the repo; use {REF_FORMS}")
    return HubRef(m["repo"], filename, m["quant"])


def select_files(ref: HubRef, files: list[str]) -> list[str]:
    """The repo files to download for ``ref`` (shards of one model in order; the first is the one to load)."""
    if ref.filename:
        return [ref.filename]
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and not Path(f).name.lower().startswith("mmproj"))
    if ref.quant:
        label = re.compile(rf"(?:^|[-._]){re.escape(ref.quant)}(?:[-.]|$)", re.IGNORECASE)
        ggufs = [f for f in ggufs if label.search(Path(f).name[: -len(".gguf")])]
    models = _group_shards(ggufs)
    if len(models) == 1:
        return models[0]
    what = f"no GGUF file labelled {ref.quant}" if ref.quant else "no GGUF file"
    if not models:
        available = ", ".join(_quant_labels(files)) or "none"
        raise HubError(f"{ref.repo_id} has {what} (quants there: {available}); use {REF_FORMS}")
    names = ", ".join(m[0] for m in models[:6]) + (", ..." if len(models) > 6 else "")
    raise HubError(f"{ref} matches {len(models)} GGUF files ({names}): name one as {ref.repo_id}/FILE"
                   + ("" if ref.quant else " or pick a quant as owner/repo:QUANT"))


def _group_shards(ggufs: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for f in ggufs:
        m = _SHARD.search(f)
        groups.setdefault(f[: m.start()] if m else f, []).append(f)
    return [sorted(g) for _, g in sorted(groups.items())]


def _quant_labels(files: list[str]) -> list[str]:
    labels = (re.search(r"(?:^|[-._])(I?Q\d[A-Z0-9_]*|F16|BF16|F32)(?:[-.]|$)", Path(f).name[:-5], re.IGNORECASE)
              for f in files if f.lower().endswith(".gguf"))
    return sorted({m[1].upper() for m in labels if m})


def resolve_model(spec: str | None, *, progress: bool = False) -> Path:
    """A local GGUF path for ``spec``: the path itself, the cached download of a Hub reference, a packaged model's
    file for its name (``gemma3-270m``, see :data:`selfext_cpp.models.PACKAGED_MODELS`), or for None the default
    model (see :func:`selfext_cpp.models.default_model_path`)."""
    if spec is None:
        from .models import default_model_path

        return default_model_path()
    from .models import PACKAGED_MODELS, packaged_model_path

    if spec in PACKAGED_MODELS and not Path(spec).exists():  # a model shipped by a package, e.g. gemma3-270m
        return packaged_model_path(spec)
    if not looks_like_ref(spec):
        return Path(spec).expanduser()
    return download(parse_ref(spec), progress=progress, local_hint=spec)[0]


def download(ref: HubRef, *, progress: bool = False, local_hint: str | None = None) -> list[Path]:
    """Download (or find in the cache) the files of ``ref``: their cached paths, the one to load first (the
    other shards follow). Raises HubError."""
    import huggingface_hub as hf
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from huggingface_hub.utils import logging as hf_logging

    (enable_progress_bars if progress else disable_progress_bars)()
    if not progress:  # its retry warnings too: stderr stays one line unless it is a terminal or -v
        hf_logging.set_verbosity_error()
    with _hub_errors(ref, local_hint), warnings.catch_warnings():
        # huggingface_hub only warns when the disk lacks room for a file, then fills it; stop before that
        warnings.filterwarnings("error", message=_NO_ROOM.pattern, category=UserWarning)
        if ref.filename:
            files = [ref.filename]
        elif _offline():
            files = select_files(ref, _cached_files(ref.repo_id))
        else:
            files = select_files(ref, hf.list_repo_files(ref.repo_id))
        paths = [hf.hf_hub_download(ref.repo_id, f) for f in files]
    return [Path(p) for p in paths]


_NO_ROOM = re.compile(r"Not enough free disk space to download the file")
_ROOM = re.compile(r"expected file size is: ([\d.]+ MB)\. The target location (.+) only has ([\d.]+ MB) free")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_files(repo_id: str) -> list[str]:
    """Files of the repo's cached main snapshot (what offline quant selection can choose from)."""
    from huggingface_hub import snapshot_download

    root = Path(snapshot_download(repo_id, local_files_only=True))
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextmanager
def _hub_errors(ref: HubRef, local_hint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions (multi-line, sometimes tracebacks) into one-line HubErrors."""
    try:
        from huggingface_hub import errors as e
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub import utils as e
    remote_404 = getattr(e, "RemoteEntryNotFoundError", e.EntryNotFoundError)  # the name before 1.0
    metadata_error = getattr(e, "FileMetadataError", ())

    nofile = f"no local file {local_hint!r} and " if local_hint and ":" not in local_hint else ""
    try:
        yield
    except (HubError, ParameterError):
        raise
    except e.GatedRepoError as exc:
        raise HubError(f"{ref.repo_id} is gated: accept its conditions on the Hub, then log in "
                       "(hf auth login) or set HF_TOKEN") from exc
    except e.RepositoryNotFoundError as exc:
        raise HubError(f"{nofile}no repository {ref.repo_id} on the Hugging Face Hub (if it is private, log in "
                       "with hf auth login or set HF_TOKEN)") from exc
    except e.RevisionNotFoundError as exc:
        raise HubError(f"{ref.repo_id} has no such revision") from exc
    except e.LocalEntryNotFoundError as exc:  # offline, or the Hub failed, and not in the cache
        cause = exc.__cause__
        if _offline():
            raise HubError(f"{ref} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: "
                           "unset it to download") from exc
        if isinstance(cause, e.HfHubHTTPError):
            raise HubError(f"the Hugging Face Hub answered HTTP {_status(cause)} for {ref}, and it is not cached; "
                           "check the token (HF_TOKEN) or try again later") from exc
        if isinstance(cause, metadata_error):
            raise HubError(f"{_endpoint()} does not answer like the Hugging Face Hub (no X-Repo-Commit/ETag); "
                           "check HF_ENDPOINT") from exc
        raise HubError(f"could not reach the Hugging Face Hub ({_endpoint()}) and {ref} is not cached: "
                       f"check the connection{_cause(exc)}") from exc
    except remote_404 as exc:
        name = ref.filename or str(ref)
        raise HubError(f"{nofile}{ref.repo_id} has no file {name} (HTTP 404)" if ref.filename else
                       f"{ref.repo_id}: a file of {name} is missing on the Hub (HTTP 404)") from exc
    except e.HfHubHTTPError as exc:
        raise HubError(f"the Hugging Face Hub answered HTTP {_status(exc)} for {ref}: check the token (HF_TOKEN) "
                       "or try again later") from exc
    except OSError as exc:  # also requests' ConnectionError, in huggingface_hub < 1.0
        if _is_connection_error(exc):
            raise HubError(f"could not reach the Hugging Face Hub ({_endpoint()}): check the connection, or set "
                           f"HF_HUB_OFFLINE=1 to use the cache{_cause(exc)}") from exc
        if exc.errno in _DISK_FULL:  # the snapshot never gets the partial file
            raise HubError(f"the disk of the Hugging Face cache {_cache_dir()} filled up while downloading {ref} "
                           f"({exc.strerror}): free some space, or set HF_HOME to a folder on a larger disk") from exc
        folder = _hf_folder_of(exc)
        if folder:
            raise HubError(f"cannot write the Hugging Face cache {folder}: {exc.strerror or exc}; set HF_HOME "
                           "to a writable folder") from exc
        if "Consistency check failed" in str(exc):
            raise HubError(f"the download of {ref} was cut short: run the command again") from exc
        raise HubError(f"could not download {ref}: {exc.strerror or exc}") from exc
    except UserWarning as exc:  # only the one made an error in download()
        room = _ROOM.search(str(exc))
        detail = f"it takes {room[1]} and {room[2]} has {room[3]} free" if room else str(exc).strip()
        raise HubError(f"not enough disk space for {ref}: {detail}; free some space, or set HF_HOME to a folder on "
                       "a larger disk") from exc
    except Exception as exc:
        if _is_connection_error(exc):
            raise HubError(f"could not reach the Hugging Face Hub ({_endpoint()}): check the connection, or set "
                           f"HF_HUB_OFFLINE=1 to use the cache{_cause(exc)}") from exc
        raise


def _status(exc: BaseException) -> str:
    return str(getattr(getattr(exc, "response", None), "status_code", "?"))


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _hf_folder_of(exc: OSError) -> str | None:
    """The Hugging Face folder (HF_HUB_CACHE, else HF_HOME) that the failed path is in or above, if any."""
    from huggingface_hub import constants

    names = [os.path.realpath(str(n)) for n in (exc.filename, getattr(exc, "filename2", None)) if n]
    for folder in (str(constants.HF_HUB_CACHE), str(constants.HF_HOME)):
        real = os.path.realpath(folder)
        if any(n == real or n.startswith(real + os.sep) or real.startswith(n + os.sep) for n in names):
            return folder
    return None


def _is_connection_error(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (
                "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError",
                "ReadError", "NetworkError", "ProxyError"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc.__context__
    first = str(inner).strip().splitlines()[0] if inner is not None and str(inner).strip() else ""
    return f" ({first})" if first else ""
