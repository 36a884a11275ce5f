"""Worker processes: one start method for every pool of workers the library starts.

``forkserver`` with the heavy modules preloaded (``spawn`` where there is no fork server: Windows):
workers start in milliseconds once the server is up and never inherit LanceDB's or pyarrow's
threads as a plain ``fork`` would. Either way a new worker re-imports the caller's script as
``__mp_main__`` before it starts work, so an entry point called at a script's top level runs again
in every worker; :func:`in_worker_import` lets such entry points return at once there, so a user's
script needs no ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context

PRELOAD = ["torch", "open_clip", "curation_platform.embedding.loader", "curation_platform.validation"]


def worker_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def in_worker_import() -> bool:
    """True while this process is a new worker importing the caller's script (multiprocessing marks
    that phase ``_inheriting``); the script's top-level calls must do nothing then."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))
