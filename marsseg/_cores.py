"""Spare cores for Ray fold tasks: the running folds of a node share its CPUs evenly.

`train_one_fold` stays Ray-free: it only calls a `threads_fn` at each epoch start;
orchestrate.py builds that function around the `CoreShare` actor below.
"""

from __future__ import annotations


def share_threads(node_cpus: float, running: int, base: int) -> int:
    """Torch threads for each of `running` fold tasks on a node with `node_cpus` CPUs.

    The node's CPUs split evenly over the folds running there, never below the
    task's own `base` threads: 3 folds on 2 CPUs run 2 at 1 thread, then the last
    one alone at 2.
    """
    return max(base, int(node_cpus) // max(1, running))


class CoreShare:
    """A tiny Ray actor: which fold tasks run on which node, for `share_threads`.

    Keyed by (member, fold), so a retried task replaces its dead attempt instead of
    counting twice.
    """

    def __init__(self, node_cpus: dict[str, float]):
        self.node_cpus = dict(node_cpus)
        self.running: dict[str, str] = {}  # task key -> node id

    def start(self, key: str, node: str) -> None:
        self.running[key] = node

    def finish(self, key: str) -> None:
        self.running.pop(key, None)

    def threads(self, node: str, base: int) -> int:
        n = sum(1 for v in self.running.values() if v == node)
        return share_threads(self.node_cpus.get(node, base), n, base)
