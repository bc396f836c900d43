"""Run `selfext` with a fault that a test cannot cause for real on a shared machine (no tiny tmpfs here):

    python faults.py disk-full SELFEXT-ARGS...    the disk fills up after the first 4 KiB a download writes (ENOSPC)
    python faults.py no-free-space SELFEXT-ARGS...  every disk reports 0 bytes free before a download starts

Both act below huggingface_hub (the file object it writes to, shutil.disk_usage), so everything above, ours
included, runs as it would on a full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from typing import Any

FILL_AT = 4096


class FullDisk:
    """A writable file that takes FILL_AT bytes, then fails every write as a full disk does."""

    def __init__(self, f: Any) -> None:
        self._f, self._written = f, 0

    def write(self, data: bytes) -> int:
        if self._written + len(data) > FILL_AT:
            room = FILL_AT - self._written
            self._f.write(data[:room])
            self._written = FILL_AT
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def disk_full() -> None:
    from huggingface_hub import file_download

    http_get = file_download.http_get

    def full_http_get(url: str, temp_file: Any, *args: Any, **kwargs: Any) -> Any:
        return http_get(url, FullDisk(temp_file), *args, **kwargs)

    file_download.http_get = full_http_get


def no_free_space() -> None:
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0)  # type: ignore[attr-defined]


FAULTS = {"disk-full": disk_full, "no-free-space": no_free_space}

if __name__ == "__main__":
    FAULTS[sys.argv[1]]()
    sys.argv = ["selfext", *sys.argv[2:]]
    from selfext_cpp.cli.app import main

    main()
