"""Spare cores for Ray fold tasks: the running folds of a node share its CPUs evenly.

`train_one_fold` stays Ray-free: it only calls a `threads_fn` at each epoch start.
The fold tasks of one train-folds job count each other through marker files in a
node-local folder (one per Ray job and node), so asking costs no Ray call: a blocking
`ray.get` inside a task makes Ray lend the task's CPU to the next queued fold, and
an earlier actor-based version ran 3 folds at once on 2 CPUs that way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def share_threads(node_cpus: float, running: int, base: int) -> int:
    """Torch threads for each of `running` fold tasks on a node with `node_cpus` CPUs.

    The node's CPUs split evenly over the folds running there, never below the
    task's own `base` threads: 3 folds on 2 CPUs run 2 at 1 thread, then the last
    one alone at 2.
    """
    return max(base, int(node_cpus) // max(1, running))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


def share_folder(job: str, node: str) -> Path:
    """The node-local folder where the fold tasks of Ray job `job` on node `node` leave
    their markers. Job ids restart at 01000000 in every Ray cluster, so two train-folds
    runs with their own local clusters on one machine would share a folder keyed by the
    job alone (and each count the other's folds); the node id is new with every raylet."""
    return Path(tempfile.gettempdir()) / "marsseg-cores" / f"{node[:16]}-{job}"


class CoreShare:
    """One fold task's place among the running folds of its node (a context manager).

    Entering leaves a marker `<key>@<pid>` in `folder`; `threads()` counts the markers
    of live processes (a killed task's marker is removed by the next count) and returns
    `share_threads(node_cpus, running, base)`; leaving removes the marker.
    """

    def __init__(self, folder: Path, key: str, node_cpus: float, base: int):
        self.folder, self.node_cpus, self.base = Path(folder), node_cpus, base
        self.marker = self.folder / f"{key.replace(os.sep, '-')}@{os.getpid()}"

    def __enter__(self) -> CoreShare:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        except OSError:  # no writable temp folder: this fold keeps its own threads
            self.marker = None
        return self

    def __exit__(self, *exc) -> None:
        if self.marker is None:
            return
        self.marker.unlink(missing_ok=True)
        try:
            self.folder.rmdir()  # the last fold out removes the job's folder
        except OSError:
            pass

    def running(self) -> int:
        n = 0
        for p in self.folder.glob("*@*"):
            pid = p.name.rsplit("@", 1)[1]
            if pid.isdigit() and _alive(int(pid)):
                n += 1
            else:
                p.unlink(missing_ok=True)
        return max(1, n)

    def threads(self) -> int:
        if self.marker is None:
            return self.base
        try:
            return share_threads(self.node_cpus, self.running(), self.base)
        except OSError:  # an unreadable folder must not fail a fold: keep the base
            return self.base
