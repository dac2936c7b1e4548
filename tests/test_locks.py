from __future__ import annotations

import threading
from pathlib import Path

from radtrt.errors import RadtrtError
from radtrt.locks import lock_file, lock_holder


def test_a_probe_of_the_lock_does_not_refuse_a_run_taking_it(tmp_path: Path) -> None:
    """lock_holder takes the lock for an instant to see whether anyone holds it: a run landing then was refused as
    'another process is training right now' with nobody training (about 1 in 3 against a loop of probes)."""
    path = tmp_path / "run.lock"
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            lock_holder(path, "no locks here")

    prober = threading.Thread(target=probe)
    prober.start()
    refused = []
    try:
        for _ in range(200):
            try:
                lock_file(path, "another process is training right now", "no locks here").release()
            except RadtrtError as e:
                refused.append(str(e))
    finally:
        stop.set()
        prober.join()
    assert refused == []
