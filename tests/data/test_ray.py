"""The same pipeline on Ray (issue item 7): a local Ray cluster on loopback gives output identical to
the local runner's."""
from __future__ import annotations

import json

import pytest

from llmkit.data.runner import clean

from _clean_helpers import CFG, data_bytes


@pytest.mark.slow
def test_ray_runner_identical_to_local(corpus, reference_run, tmp_path):  
    ray = pytest.importorskip("ray")
    from llmkit.data.ray_runner import RayExecutor

    import tempfile

    # a short temp dir: Ray's unix socket paths must stay under 108 bytes
    ex = RayExecutor(workers=2, _node_ip_address="127.0.0.1", _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
        out = tmp_path / "ray_out"
        stats = clean([str(corpus)], out, CFG, executor=ex)
    finally:
        ex.shutdown()
    assert data_bytes(out) == data_bytes(reference_run[0])
    assert stats == reference_run[1]
    assert json.loads((out / "stats.json").read_text()) == reference_run[1]
