"""Run the documentation's Python blocks (used by test_docs.py): ``python _docs_runner.py < blocks.json``.

Input: a JSON list of ``{"id", "code", "cwd"}``. Each block runs as a fresh ``__main__`` module in its own working
directory, as a reader would paste it into a new file; one process serves all blocks so that torch & co. are
imported once. Between blocks accelerate's process-wide state is reset (as ``fresh_accelerate_state`` does for
tests). Output: one line per block, ``MARK`` + JSON ``{"id", "ok", "seconds", "error"}``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

MARK = "@@docs-test@@ "  # prefix of the result lines (blocks print too)


def _reset_accelerate() -> None:
    if "accelerate" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def main() -> None:
    blocks = json.load(sys.stdin)
    for block in blocks:
        os.chdir(block["cwd"])
        sys.path.insert(0, block["cwd"])
        start, error = time.perf_counter(), None
        try:
            exec(compile(block["code"], block["id"], "exec"), {"__name__": "__main__"})
        except BaseException:  # noqa: BLE001 -- report SystemExit and KeyboardInterrupt of a block too
            error = traceback.format_exc(limit=-8)
        finally:
            sys.path.remove(block["cwd"])
            _reset_accelerate()
        print(MARK + json.dumps({"id": block["id"], "ok": error is None, "seconds": time.perf_counter() - start,
                          "error": error}), flush=True)


if __name__ == "__main__":
    main()
