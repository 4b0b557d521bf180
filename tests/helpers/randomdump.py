"""Random composefs dumpfiles that exercise the image layout's corner cases.

Used by the property tests and by `bench/differential.py` (which compares cfsc with an
upstream mkcomposefs binary when one is available).  Everything here is valid input for
upstream's strict parser, except where `lenient=True` asks for lenient-only quirks.
"""

from __future__ import annotations

import random

U32 = (1 << 32) - 1


def escape(data: bytes, xattr_key: bool = False) -> bytes:
    out = bytearray()
    for b in data:
        if b == 0x5C:
            out += b"\\\\"
        elif b in (0x20, 0x0A, 0x00) or (xattr_key and b == 0x3D) or b < 0x20 or b >= 0x7F:
            out += b"\\x%02x" % b
        else:
            out.append(b)
    return bytes(out)


def _name(rng: random.Random, taken: set[bytes]) -> bytes:
    while True:
        kind = rng.random()
        if kind < 0.5:
            n = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789._-") for _ in range(rng.randint(1, 12)))
        elif kind < 0.8:
            n = bytes(rng.randint(1, 255) for _ in range(rng.randint(1, 40)))
        elif kind < 0.9:
            n = bytes(rng.choice(b"xyz") for _ in range(rng.randint(200, 255)))
        else:
            n = b"%02x" % rng.randint(0, 255)  # collides with the root whiteouts
        n = n.replace(b"/", b"_")
        if n in (b".", b"..") or n in taken:
            continue
        taken.add(n)
        return n


def random_dump(seed: int, size: int = 60, lenient: bool = False) -> bytes:
    rng = random.Random(seed)
    shared_pool = [(b"user.shared%d" % i, b"v" * rng.randint(0, 30)) for i in range(rng.choice([3, 140]))]
    key_pool = [b"user.a", b"user.b", b"trusted.overlay.opaque", b"trusted.overlay.redirect",
                b"trusted.overlay.overlay.x", b"security.selinux", b"system.posix_acl_access",
                b"trusted.foo", b"lustre.x", b"xfs.other", b"user.overlay.opaque",
                b"system.posix_acl_defaultX", b"user.=eq"]
    base_time = rng.choice([0, 1633950376, -5])
    lines: list[bytes] = []
    files: list[bytes] = []  # non-directory paths, for hardlinks
    externals: list[tuple[bytes, bytes]] = []  # (payload, digest) of external files

    def mtime() -> bytes:
        if rng.random() < 0.7:
            return b"%d.0" % base_time
        return b"%d.%d" % (base_time + rng.randint(-10, 10), rng.randint(0, 999999999))

    def xattrs() -> bytes:
        out = []
        used = set()
        for _ in range(rng.choice([0, 0, 1, 2, 3, 130])):
            if rng.random() < 0.5:
                k, v = rng.choice(shared_pool)
            else:
                k = rng.choice(key_pool)
                v = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 40)))
            if k in used:
                continue
            used.add(k)
            out.append(escape(k, xattr_key=True) + b"=" + escape(v))
        return (b" " + b" ".join(out)) if out else b""

    def owner() -> bytes:
        uid = rng.choice([0, 0, 1000, 70000])
        gid = rng.choice([0, 0, 100, 70000])
        return b"%d %d" % (uid, gid)

    def add_dir(path: bytes, depth: int) -> None:
        n_children = rng.choice([0, 1, 3, 8, 300]) if depth < 3 else rng.randint(0, 3)
        if size < 20:
            n_children = min(n_children, 8)
        taken: set[bytes] = set()
        sub = []
        for _ in range(n_children):
            name = _name(rng, taken)
            child = (path.rstrip(b"/") + b"/" + name)
            kind = rng.random()
            if kind < 0.12 and depth < 4:
                lines.append(b"%s 0 %o 2 %s 0 %s - - -%s" % (escape(child), 0o40000 | rng.choice([0o755, 0o700, 0o1777]), owner(), mtime(), xattrs()))
                sub.append(child)
            elif kind < 0.45:
                r = rng.random()
                if r < 0.3:
                    sz = 0
                    content = b"-"
                elif r < 0.6:
                    sz = rng.choice([1, 15, 64, 2048, 2049, 4095, 4096, 4097, 5000])
                    content = escape(bytes(rng.randint(0, 255) for _ in range(sz)))
                else:
                    sz = rng.choice([65, 4096, 1 << 20, (1 << 43) + 1, 1 << 50, 123456789])
                    content = b"-"
                payload = b"-"
                digest = b"-"
                if content == b"-" and sz:
                    if externals and rng.random() < 0.3:  # same content as an earlier file
                        payload, digest = rng.choice(externals)
                    else:
                        h = bytes(rng.randint(0, 255) for _ in range(32)).hex().encode()
                        payload = rng.choice([h[:2] + b"/" + h[2:], b"-", b"/abs/" + h[:8]])
                        digest = rng.choice([h, b"-"])
                        externals.append((payload, digest))
                nlink = rng.choice([1, 1, 2, 70000])
                lines.append(b"%s %d %o %d %s 0 %s %s %s %s%s" % (escape(child), sz, 0o100000 | rng.choice([0o644, 0o755, 0o4755]), nlink, owner(), mtime(), escape(payload) if payload != b"-" else b"-", content, digest, xattrs()))
                files.append(child)
            elif kind < 0.6:
                target = bytes(rng.choice(b"abc/.") for _ in range(rng.choice([1, 10, 100, 1000, 3000, 4000, 4095])))
                lines.append(b"%s %d 120777 1 %s 0 %s %s - -%s" % (escape(child), len(target), owner(), mtime(), escape(target), xattrs()))
                files.append(child)
            elif kind < 0.75:
                t = rng.choice([0o20000, 0o60000])
                rdev = rng.choice([0, 0, 259, 1 << 20, U32])
                sz = rng.choice([0, 0, 10])
                lines.append(b"%s %d %o 1 %s %d %s - - -%s" % (escape(child), sz, t | 0o644, owner(), rdev, mtime(), xattrs()))
                files.append(child)
            elif kind < 0.85:
                t = rng.choice([0o10000, 0o140000])
                lines.append(b"%s 0 %o 1 %s 0 %s - - -%s" % (escape(child), t | 0o644, owner(), mtime(), xattrs()))
                files.append(child)
            elif files:
                target = rng.choice(files)
                lines.append(b"%s 0 @100644 0 0 0 0 0.0 %s - -" % (escape(child), escape(target)))
            if len(lines) > size * 20:
                break
        for s in sub:
            add_dir(s, depth + 1)

    root_x = xattrs()
    if rng.random() < 0.3:
        root_x += b" security.selinux=system_u:object_r:root_t:s0"
    lines.append(b"/ 0 40755 2 %s 0 %s - - -%s" % (owner(), mtime(), root_x))
    add_dir(b"/", 0)
    return b"\n".join(lines) + b"\n"
