"""Scale-out on Ray (optional extra `llmkit[ray]`): the same passes and shards as the local runner.

`RayExecutor` is a drop-in for `runner.LocalExecutor`: each pass-0 task (an input file, or a stride
of its chunks) and each later per-shard task becomes a Ray task; the driver keeps the global dedup
decisions. Shards, completion markers and resume are the runner's, so the output is byte-identical
to a local run, and a killed Ray job resumes like a local one. `address=None` starts a local Ray
instance on this machine (loopback); pass `ray://host:10001` or "auto" for an existing cluster.
"""
from __future__ import annotations

from typing import Callable


class RayExecutor:
    def __init__(self, address: str | None = None, workers: int = 2, **init_kwargs):
        try:
            import ray
        except ImportError as e:
            raise ImportError("the Ray executor needs ray: pip install 'llmkit[ray]' (or pip install ray)") from e
        self.ray, self.workers = ray, max(1, int(workers))
        self.started = False
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
            if address is None:
                kw.setdefault("num_cpus", self.workers)
            ray.init(address=address, **kw)
            self.started = True
        self._remote: dict[Callable, object] = {}

    def map(self, fn: Callable, tasks: list) -> list:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=1)(fn)
        remote = self._remote[fn]
        return self.ray.get([remote.remote(t) for t in tasks])

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
