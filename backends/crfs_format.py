"""The CRFS TOC conventions both directions share (`cfsc schema crfs-toc` is the contract).

The writer (`cfsc.backends.crfs`) and the reader (`cfsc.frontends.crfs.toc`) spell entry types,
base64 twin keys and Go's "no time" from here, so a TOC written is a TOC read the same way.
"""

from __future__ import annotations

from cfsc.base import rfc3339
from cfsc.base.tree import FILE_TYPE_BITS

HARDLINK = -1  # not a file type: one more name for the inode at `linkName`
CHUNK = -2  # not a file type: a later piece of the preceding (or named) regular file
# Entry `type` -> mode bits: CRFS names the file types as the tree does (`socket` is a
# composefs extension: tar has none).
TYPES = {**FILE_TYPE_BITS, "hardlink": HARDLINK, "chunk": CHUNK}
TYPE_NAMES = {bits: name for name, bits in TYPES.items()}
GO_ZERO_TIME = (rfc3339.FIRST, 0)  # 0001-01-01T00:00:00Z, Go's zero time.Time: "no time"


def twin(key: str) -> str:
    """The key holding `key`'s exact bytes in base64: `x-name-b64`, `x-payload-b64`."""
    return key + "-b64" if key.startswith("x-") else f"x-{key}-b64"
