"""Every upstream conformance case, through the installed `cfsc` command."""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers.data import CONFORMANCE, cases, read_input

VERSION_ARGS = {"default": [], "v0": ["--min-version", "0", "--max-version", "0"],
                "v1": ["--min-version", "1", "--max-version", "1"]}
GOOD = [c for c in cases() if c.get("expect") != "error"]
BAD = [c for c in cases() if c.get("expect") == "error"]


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
@pytest.mark.parametrize("variant", list(VERSION_ARGS))
def test_image_digest(case, variant, cfsc, tmp_path):
    src = tmp_path / "in.dump"
    src.write_bytes(read_input(case["input"]))
    out = tmp_path / "out.cfs"
    strict = ["--strict"] if case["strict"] else []
    cfsc("compile", str(src), "-o", str(out), *strict, *VERSION_ARGS[variant], check=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == case["sha256"][variant]


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
def test_dropin_matches_upstream_invocation(case, cfsc, tmp_path):
    """The drop-in verb, called exactly as upstream's test suite calls mkcomposefs."""
    src = tmp_path / "in.dump"
    src.write_bytes(read_input(case["input"]))
    out = tmp_path / "out.cfs"
    args = ["--from-file"]
    if case["upstream_version_args"] is not None:
        v = case["upstream_version_args"]
        args += [f"--min-version={v}", f"--max-version={v}"]
    env = {"CFS_PARSE_STRICT": "1"} if case["strict"] else {}
    cfsc("mkcomposefs", *args, str(src), str(out), env=env, check=True)
    expected = (CONFORMANCE / "upstream" / (case["input"] + ".sha256")).read_text().split()[0]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected == case["upstream_expected_sha256"]


# Which line each should-fail input breaks, and a word its message must contain.
EXPECTED_ERRORS = {
    "should-fail-big-inline.dump": (2, "5000"),
    "should-fail-dir-hardlink.dump": (2, "hardlink"),
    "should-fail-dot-name.dump": (2, "'.'"),
    "should-fail-dotdot-name.dump": (2, "'..'"),
    "should-fail-empty-link-name.dump": (2, "symlink"),
    "should-fail-empty-name.dump": (2, "empty file name"),
    "should-fail-empty-xattr-key.dump": (2, "xattr key"),
    "should-fail-honggfuzz-long-xattr.dump": (1, "budget"),
    "should-fail-long-link.dump": (2, "symlink target"),
    "should-fail-long-xattr-key.dump": (2, "xattr"),
    # upstream's case fails on its mode before any xattr rule: see test_xattr_value_length_rule
    "should-fail-long-xattr-value.dump": (2, "mode"),
    "should-fail-no-ftype.dump": (2, "mode"),
    "should-fail-self-hardlink.dump": (2, "itself"),
    "should-fail-too-big.dump": (2, "2^53"),
}


@pytest.mark.parametrize("case", BAD, ids=[c["input"] for c in BAD])
@pytest.mark.parametrize("strict", [False, True])
def test_rejected_with_located_message(case, strict, cfsc, tmp_path):
    src = tmp_path / case["input"]
    src.write_bytes(read_input(case["input"]))
    out = tmp_path / "out.cfs"
    p = cfsc("compile", str(src), "-o", str(out), *(["--strict"] if strict else []))
    assert p.returncode == 2
    message = p.stderr.decode()
    assert message.count("\n") == 1 and message.startswith("error: "), message
    line, word = EXPECTED_ERRORS[case["input"]]
    data = src.read_bytes()
    if strict and not data.endswith(b"\n") and line == data.count(b"\n") + 1:
        word = "trailing newline"  # strict mode never parses an unterminated last line
    assert f"{src}:{line}:" in message, message
    assert word in message, message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src], "a temporary file was left behind"
    p = cfsc("mkcomposefs", "--from-file", str(src), str(out), env={"CFS_PARSE_STRICT": "1"} if strict else {})
    assert p.returncode == 2 and not out.exists()


def test_xattr_value_length_rule(cfsc, tmp_path):
    """The value-length rule itself (at most 65535 bytes, libcomposefs' `value_len > UINT16_MAX`).

    Upstream's should-fail-long-xattr-value case stops on its mode first, and no dumpfile line
    can reach the rule: mkcomposefs refuses any xattr text over 65535 bytes as "Too many xattrs"
    before it looks at a value.  A tar PAX record can carry such a value, so the rule is
    exercised there: 65536 bytes fail it, named as such; 65535 bytes pass it and then fail the
    per-inode budget of external input (32767 bytes, key and header counted)."""
    from tests.helpers.tarcraft import archive, member

    for size, want in ((65536, "xattr value of 65536 bytes: expected at most 65535"),
                       (65535, "per-inode budget")):
        layer = tmp_path / f"v{size}.tar"
        layer.write_bytes(archive(member(b"v", b"", pax=[(b"SCHILY.xattr.user.v", b"a" * size)])))
        out = tmp_path / "out.cfs"
        p = cfsc("compile", str(layer), "-o", str(out))
        message = p.stderr.decode()
        assert p.returncode == 2 and message.count("\n") == 1, message
        assert want in message and "v" in message, message
        assert not out.exists()
