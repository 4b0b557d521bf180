"""The `cfsc` command line: a thin typer skin over the library.

Commands live in the modules of this package, grouped by what they do; each registers
itself on `app` with the `command` decorator below.

Each command parses options, calls the same public functions a library user would, and
prints.  Errors are one line on stderr (`error: WHERE: WHAT`), exit 2 for bad input and 1
for "differs"; `--traceback` shows the whole story.  The environment (CFS_PARSE_STRICT,
SOURCE_DATE_EPOCH) is read here and nowhere below.

Start-up: typer (with click, ~30 ms) is imported only when a verb needs it; the verbs
`cfsc.cli.direct` runs on plain arguments (`compile SRC… -o IMAGE`, the `mkcomposefs`
drop-in) never load it.  `app` is made on first use (`cfsc.cli.app` still works).
"""

from __future__ import annotations

import functools
import _signal as signal  # (`signal` builds its enums at import: ~5 ms of every command)
import sys

from cfsc.base.errors import CfscError, UsageError

_state = {"traceback": False}
_made: dict = {}  # "app" -> the typer app, made on first use


def _app():
    app = _made.get("app")
    if app is None:
        import typer

        app = _made["app"] = typer.Typer(
            add_completion=False,
            no_args_is_help=True,
            pretty_exceptions_enable=False,
            context_settings={"help_option_names": ["-h", "--help"]},
            help="cfsc: a declarative compiler for composefs images (byte-identical with mkcomposefs 1.0.8).",
        )

        @app.callback()
        def _main_options(
            traceback: bool = typer.Option(False, "--traceback", help="Show a full traceback on errors."),
        ) -> None:
            _state["traceback"] = traceback

    return app


def __getattr__(name: str):
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def report(err: BaseException, code: int) -> int:
    """Print an error as one line per problem (the traceback too with --traceback); `code`."""
    if _state["traceback"]:
        import traceback

        traceback.print_exception(err)
    for line in str(err).splitlines() or [""]:  # several problems: one line each
        print(f"error: {line}", file=sys.stderr)
    return code


def guarded(func, *a, **kw) -> int | None:
    """Run a verb: None when it returns, else the exit code its error maps to (reported)."""
    try:
        func(*a, **kw)
        return None
    except CfscError as e:
        return report(e, e.exit_code)
    except Terminated:
        return _report_terminated()
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except OSError as e:
        return report(e, 1)
    except MemoryError:
        # (the `with` blocks on the way out removed partial outputs, as for any error)
        return report(CfscError("out of memory: a limit on memory (ulimit -v, a cgroup's memory.max) is reached"), 1)
    except RuntimeError as e:
        if str(e) != "can't start new thread":  # (threading's words for pthread_create failing)
            raise
        return report(CfscError("cannot start a thread: a limit on processes and threads (ulimit -u, a cgroup's"
                                " pids.max) or on memory is reached"), 1)


def command(*args, **kwargs):
    """`app.command` that turns cfsc errors into one-line messages and exit codes."""

    def wrap(func):
        @functools.wraps(func)
        def run(*a, **kw):
            code = guarded(func, *a, **kw)
            if code is not None:
                import typer

                raise typer.Exit(code)

        return _app().command(*args, **kwargs)(run)

    return wrap


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `with` block cleans up on the way out
    (temporary outputs and store objects), as it does for Ctrl-C."""


def _terminated(_signum, _frame) -> None:
    raise Terminated


def _report_terminated() -> int:
    print("error: terminated by SIGTERM", file=sys.stderr)
    return 128 + signal.SIGTERM


def source_date_epoch() -> int:
    """$SOURCE_DATE_EPOCH (reproducible-builds.org) as an integer, for `--clamp-mtime`."""
    import os

    text = os.environ.get("SOURCE_DATE_EPOCH")
    if text is None:
        raise UsageError("--clamp-mtime needs SOURCE_DATE_EPOCH in the environment (seconds since the epoch)")
    if not text.strip().isdigit():
        raise UsageError(f"expected a non-negative integer (seconds since the epoch), got {text!r}", "SOURCE_DATE_EPOCH")
    return int(text)


def renamed(value, old_value, flag: str, old_flag: str):
    """The value of an option given by its name or by its old (hidden) name, not both differently."""
    if value is not None and old_value is not None and value != old_value:
        raise UsageError(f"{old_flag} is the old name of {flag}: give one of them", flag)
    return value if value is not None else old_value


def digest_line(digest: bytes) -> None:
    sys.stdout.write(digest.hex() + "\n")
    sys.stdout.flush()


# command name -> module that defines it.  `main` imports only the module of the command
# being run: typer builds click commands for every registered function on each start, which
# would cost ~5 ms per command on every invocation.
COMMANDS = {
    "compile": "compile",
    "measure": "compile",
    "mkcomposefs": "dropins",
    "composefs-info": "dropins",
    "composefs-dump": "dropins",
    "dump": "inspect",
    "ls": "inspect",
    "objects": "inspect",
    "missing-objects": "inspect",
    "info": "inspect",
    "fsck-store": "inspect",
    "gc": "gc",
    "schema": "schema",
    "diff": "diff",
    "check": "diff",
    "mount": "mount",
    "umount": "mount",
    "composefs-fuse": "mount",
    "mount.composefs": "mount",
    "export": "export",
}


def _leave(code: int) -> None:
    """End the `cfsc` process now that its verb is done, without the interpreter's teardown.

    Its output is closed and renamed into place; what is left is freeing every object one
    by one (a million-entry tree: ~0.3 s) and the modules, work the kernel does at once by
    dropping the address space.  Only the standard streams hold data yet to write: they are
    flushed first, and a flush that fails takes the ordinary exit, which reports it."""
    import os

    from cfsc.base.output import flush_standard_streams

    try:
        flush_standard_streams()
    except (OSError, ValueError):
        return
    os._exit(code)


def main(argv: list[str] | None = None, direct: bool = True) -> None:
    """The `cfsc` command.  `direct=False` sends every verb through typer (tests compare)."""
    import importlib

    from cfsc.base.output import stand_in_for_closed_stdout

    stand_in_for_closed_stdout()
    args = sys.argv[1:] if argv is None else argv
    # Only where SIGTERM would kill us outright: a caller that ignores it keeps it ignored,
    # and the FUSE server installs its own handlers (it unmounts on SIGTERM).
    if direct and args and args[0] in ("compile", "mkcomposefs"):
        handled = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if handled:
            signal.signal(signal.SIGTERM, _terminated)
        # The compile's tree (and plan) stay here until `_leave`: the kernel frees them with the
        # address space, not object by object (64k entries: 15-20 ms).  Not for a caller in
        # this process (`argv` given), who goes on living with whatever it keeps.
        kept: list | None = [] if argv is None else None
        try:
            from cfsc.cli.direct import run

            code = run(args, kept)
        except Terminated:  # outside the verb (importing, exiting)
            sys.exit(_report_terminated())
        if code is not None:
            if argv is None:
                if handled:  # the output is in place: a SIGTERM while flushing just ends us
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _leave(code)
            sys.exit(code)
    wanted = next((a for a in args if not a.startswith("-")), None)
    modules = {COMMANDS[wanted]} if wanted in COMMANDS else sorted(set(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"{__name__}.{name}")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        _app()(args=args, prog_name="cfsc")
    except Terminated:  # outside a command (parsing options, exiting)
        sys.exit(_report_terminated())
