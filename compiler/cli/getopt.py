"""GNU `getopt_long` semantics for the drop-in verbs (`cfsc mkcomposefs …`).

Scripts written for the C tools pass options the way glibc parses them: `--opt=value` or
`--opt value`, unambiguous prefixes (`--from` for `--from-file`), options after operands
(argument permutation), `--` to end options.  click does not do prefixes or permutation the
same way, so the drop-ins parse their raw arguments here.
"""

from __future__ import annotations

from cfsc.base.errors import UsageError


def getopt_long(argv: list[str], longopts: dict[str, bool], shortopts: str = "",
                program: str = "") -> tuple[list[tuple[str, str | None]], list[str]]:
    """Parse `argv`; `longopts` maps a long name to "takes an argument".

    Returns `([(name, value), ...], operands)`; short options come back as `-X`.
    """
    options: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    where = program or "options"
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name in longopts:
                match = name
            else:
                candidates = [n for n in longopts if n.startswith(name)]
                if len(candidates) != 1:
                    if candidates:
                        raise UsageError(f"option '--{name}' is ambiguous; possibilities: "
                                         + " ".join("--" + c for c in sorted(candidates)), where)
                    raise UsageError(f"unrecognized option '--{name}'", where)
                match = candidates[0]
            if longopts[match]:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option '--{match}' requires an argument", where)
                    value = argv[i]
                    i += 1
                options.append((match, value))
            else:
                if eq:
                    raise UsageError(f"option '--{match}' doesn't allow an argument", where)
                options.append((match, None))
        elif arg.startswith("-") and arg != "-":
            for j, ch in enumerate(arg[1:], 1):
                pos = shortopts.find(ch)
                if pos < 0 or ch == ":":
                    raise UsageError(f"invalid option -- '{ch}'", where)
                if pos + 1 < len(shortopts) and shortopts[pos + 1] == ":":
                    value = arg[j + 1:]
                    if not value:
                        if i >= len(argv):
                            raise UsageError(f"option requires an argument -- '{ch}'", where)
                        value = argv[i]
                        i += 1
                    options.append(("-" + ch, value))
                    break
                options.append(("-" + ch, None))
        else:
            operands.append(arg)
    return options, operands


def strtol(text: str, what: str, where: str) -> int:
    """C `strtol(text, &end, 10)` with upstream's check (`*text == 0 || *end != 0` fails)."""
    stripped = text.lstrip(" \t\n\v\f\r")
    body = stripped[1:] if stripped[:1] in ("+", "-") else stripped
    if not body.isdigit() or not body.isascii():
        raise UsageError(f"invalid {what} {text!r}: expected a base-10 number", where)
    return int(stripped)
