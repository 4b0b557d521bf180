"""Running a command as the unprivileged user `nobody` (root reads and writes everything, so
permission errors are only seen without it)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The argv prefix that runs a command as nobody (uid and gid 65534, no supplementary groups).
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@contextlib.contextmanager
def nobody_dir(prefix: str, mode: int = 0o777) -> Iterator[Path]:
    """A directory outside pytest's tmp_path (nobody cannot reach into it), `mode` (0o777:
    nobody writes there too), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        base.chmod(mode)
        yield base
    finally:
        shutil.rmtree(base)
