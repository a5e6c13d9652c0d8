"""Test instrumentation for multi-process runs: records which files each process writes.

Loaded by Python at start-up when this folder is on PYTHONPATH. With MCPO_TEST_AUDIT_DIR and
MCPO_TEST_AUDIT_ROOT set, every file that Python code of this process opens for writing, creates,
renames or replaces under ROOT is recorded (relative to ROOT) and dumped at exit to
AUDIT_DIR/process_<MCPO_PROCESS_ID>.json (only in processes started by the launcher). Native writers (tensorstore inside orbax, safetensors'
Rust code) are not seen; their files are checked by listing the run folder instead.
"""

import atexit
import json
import os
import sys

_out = os.environ.get("MCPO_TEST_AUDIT_DIR")
_root = os.environ.get("MCPO_TEST_AUDIT_ROOT")
_process = os.environ.get("MCPO_PROCESS_ID")  # set by the launcher for its processes, not for itself

if _out and _root and _process is not None:
    _root = os.path.realpath(_root)
    _writes = set()
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(path):
        if isinstance(path, int):
            return
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if full == _root or full.startswith(_root + os.sep):
            _writes.add(os.path.relpath(full, _root))

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS):
                _record(path)
        elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
            _record(args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            _record(args[0])

    def _dump():
        os.makedirs(_out, exist_ok=True)
        with open(os.path.join(_out, f"process_{_process}.json"), "w") as f:
            json.dump(sorted(_writes), f)

    sys.addaudithook(_hook)
    atexit.register(_dump)
