"""Worker processes: one start method for every pool of workers the library starts.

``forkserver`` with the heavy modules preloaded: workers start in milliseconds once the server is up,
never inherit LanceDB's or pyarrow's threads as a plain ``fork`` would, and never re-import the
caller's ``__main__`` (as ``spawn`` does), so a user's script that calls the library at top level
needs no ``if __name__ == "__main__":`` guard. Where ``forkserver`` does not exist (Windows) it is
``spawn``, and there such a script must keep the guard (:func:`refuse_in_worker_import` says so).
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


def refuse_in_worker_import(entry_point: str) -> None:
    """Raise a clear error when ``entry_point`` runs inside a worker that is importing the user's script
    (``spawn`` re-runs a script's top level in every worker), instead of a cascade of broken workers."""
    process = multiprocessing.current_process()
    if multiprocessing.parent_process() is not None and getattr(process, "_inheriting", False):
        raise RuntimeError(f"{entry_point} was called while a worker process was importing your script: "
                           "put the call under `if __name__ == \"__main__\":`")
