"""Image → JSON lines: the dump's fields as one JSON object per entry, for scripts.

Same walk and same facts as the dumpfile backend (`cfsc dump --json`).  Byte strings (path,
hard-link target, payload, content, xattr keys and values) follow `cfsc.base.jsonbytes`: a plain
string when they are UTF-8, else a readable stand-in plus an exact `<key>_b64` twin.

    {"path": "/a", "type": "reg", "mode": 33188, "size": 3, "nlink": 1, "uid": 0, "gid": 0,
     "mtime": 1633950376, "mtime_nsec": 0, "content": "abc",
     "xattrs": [{"key": "user.a", "value": "1"}]}

`hardlink` (the first occurrence's path) marks a second or later name of an inode; `rdev`
appears for devices, `payload` (symlink target or backing file), `content` and `digest`
(64 hex digits) when present.
"""

from __future__ import annotations

from typing import BinaryIO

import orjson
from cfsc.backends.dumpfile import write_lines
from cfsc.backends.erofs.entries import Entries, Entry, walk
from cfsc.backends.erofs.reader import Image
from cfsc.base.jsonbytes import put
from cfsc.base.tree import FILE_TYPES, S_IFBLK, S_IFCHR, S_IFMT


def entry_object(path: bytes, e: Entry, first: bytes | None) -> dict:
    obj: dict = {}
    put(obj, "path", path)
    if first is not None:
        put(obj, "hardlink", first)
    ftype = e.mode & S_IFMT
    obj["type"] = FILE_TYPES[ftype]
    obj["mode"] = e.mode
    obj["size"] = e.size
    obj["nlink"] = e.nlink
    obj["uid"] = e.uid
    obj["gid"] = e.gid
    if ftype == S_IFCHR or ftype == S_IFBLK:
        obj["rdev"] = e.rdev
    obj["mtime"] = e.mtime
    obj["mtime_nsec"] = e.mtime_nsec
    if e.payload is not None:
        put(obj, "payload", e.payload)
    if e.content is not None:
        put(obj, "content", e.content[:e.size])
    if e.digest is not None:
        obj["digest"] = e.digest.hex()
    if e.xattrs:
        items = []
        for key, value in e.xattrs:
            item: dict = {}
            put(item, "key", key)
            put(item, "value", value)
            items.append(item)
        obj["xattrs"] = items
    return obj


def dump_image(image: Image, out: BinaryIO, names: frozenset[bytes] | None = None) -> None:
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    write_lines(out, (dumps(entry_object(path, e, first), option=newline)
                      for path, e, first in walk(image, names, Entries(image))))
