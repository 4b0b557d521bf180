"""The EROFS layout declarations: field offsets derived from each struct agree with the struct
itself and with the kernel's `erofs_fs.h`, so code reading single fields of raw bytes
(diff, explain, the reader's error locations) reads what the reader's unpacking reads."""

from __future__ import annotations

import pytest
from cfsc.backends.erofs import layout as L

LAYOUTS = [L.COMPOSEFS_HEADER, L.EROFS_SUPER_BLOCK, L.EROFS_INODE_COMPACT, L.EROFS_INODE_EXTENDED,
           L.EROFS_XATTR_IBODY_HEADER, L.EROFS_XATTR_ENTRY, L.EROFS_DIRENT]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_each_field_read_alone_is_the_field_the_struct_reads(layout):
    data = bytes((i * 7 + 1) & 0xFF for i in range(layout.size))  # every byte different nearby
    whole = layout.read(data)
    for name in layout.fields:
        assert layout.field(name).unpack_from(data)[0] == getattr(whole, name), name
        assert layout.end(name) - layout.offset(name) == layout.offsets[name][1]


def test_offsets_are_the_kernels():
    # erofs_fs.h: fields the tools read from raw bytes, and the superblock's error locations.
    assert [L.EROFS_SUPER_BLOCK.offset(f) for f in ("blkszbits", "blocks", "meta_blkaddr", "xattr_blkaddr",
                                                    "feature_incompat", "dirblkbits")] == [12, 36, 40, 44, 80, 90]
    assert [L.EROFS_INODE_COMPACT.offset(f) for f in ("i_mode", "i_nlink", "i_size", "i_u", "i_ino")] == [4, 6, 8, 16, 20]
    assert [L.EROFS_INODE_EXTENDED.offset(f) for f in ("i_size", "i_u", "i_ino", "i_nlink")] == [8, 16, 20, 44]
    assert L.EROFS_XATTR_IBODY_HEADER.offset("h_shared_count") == 4
    assert [L.xattr_ibody_size(n) for n in (0, 1, 3)] == [0, 12, 20]


def test_written_out_xattr_body_sizes_are_xattr_ibody_size():
    """The reader and explain's `inode_head` compute the xattr body size inline (per inode)."""
    import gzip

    from cfsc.backends.erofs.reader import Image
    from cfsc.tools.explain import inode_head
    from test_overlay import raw_inodes

    from tests.helpers.data import CONFORMANCE

    for path in sorted((CONFORMANCE / "upstream-images").glob("*.cfs.gz"))[:4]:
        image = Image(gzip.decompress(path.read_bytes()), path.name)
        raws = list(raw_inodes(image))
        for raw in raws:
            assert raw.xattr_size == L.xattr_ibody_size(raw.xattr_count) == inode_head(image, raw.nid)[2]
            size = (L.EROFS_INODE_EXTENDED if raw.extended else L.EROFS_INODE_COMPACT).size
            assert inode_head(image, raw.nid)[:2] == (raw.offset, size)
        assert len(raws) > 1


def test_struct_formats_are_read_as_the_pattern_reads_them():
    """`_items` tokenises a struct format by hand (no `re` at start-up); every declared layout,
    and formats with counts and strings, read as `(\\d*)([xsBbHhIiQq])` reads them."""
    import re

    from cfsc.backends.erofs import layout

    formats = {v.struct.format for v in vars(layout).values() if isinstance(v, layout.Layout)}
    assert len(formats) >= 8
    for fmt in formats | {"<IIII16x", "<2H3I16s4x", "<HBBIQ", "<12x", "<b"}:
        expected = [(int(c) if c else 1, k) for c, k in re.findall(r"(\d*)([xsBbHhIiQq])", fmt)]
        assert list(layout._items(fmt)) == expected, fmt
