"""Runs the copies of one SyncMaster pass, each on its own thread, collecting results and errors."""

from __future__ import annotations

import collections
import threading


def run_copies(master, pipes, make_message, passes=1):
    """Runs copy 0 on this thread and every pipe on its own; returns {copy_id: [results]} and {copy_id: error}."""
    results: dict[int, list] = collections.defaultdict(list)
    errors: dict[int, BaseException] = {}

    def run(copy_id, step):
        try:
            for index in range(passes):
                results[copy_id].append(step(make_message(copy_id, index)))
        except BaseException as error:
            errors[copy_id] = error

    threads = [threading.Thread(target=run, args=(pipe.identifier, pipe.run_slave)) for pipe in pipes]
    for thread in threads:
        thread.start()
    run(0, master.run_master)
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a replica thread hung"
    return results, errors
