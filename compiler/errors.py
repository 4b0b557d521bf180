"""The error hierarchy of the public API: every error cfsc raises is a `CfscError`.

    CfscError                 str(e) is one line: WHERE: WHAT; e.where, e.what; e.exit_code
    ├── InputError            a source, an image or an option is not acceptable
    │   ├── UsageError        bad options or option combinations
    │   ├── DumpfileError     a dumpfile line breaks a rule (e.line, e.field)
    │   ├── TreeError         the tree breaks a composefs limit (e.path)
    │   ├── ImageError        an image is truncated, corrupt or hostile (also an OSError: EIO)
    │   └── StoreError        a content store is not laid out as one
    ├── LookupFailed          no such path in an image (also an OSError: ENOENT)
    ├── IntegrityError        data does not match its fs-verity digest (also an OSError: EIO)
    └── OutputError           writing an image or store object failed; nothing partial is left

The classes live in `cfsc.base.errors` (every layer raises them); this module is the name
library users import them by.
"""

from cfsc.base.errors import (
    CfscError,
    DumpfileError,
    ImageError,
    InputError,
    InputErrors,
    IntegrityError,
    LookupFailed,
    OutputError,
    StoreError,
    TreeError,
    UsageError,
)

__all__ = ["CfscError", "DumpfileError", "ImageError", "InputError", "InputErrors", "IntegrityError",
           "LookupFailed", "OutputError", "StoreError", "TreeError", "UsageError"]
