"""The local Ray instance the jobs start: its workers must address their own cluster."""
from __future__ import annotations

import os


def test_workers_address_their_own_cluster(ray_session):
    """Train V2's placement-group cleaner queries the State API without an address; with a
    second Ray instance on the machine it used to find the other one, conclude the run's
    controller was dead and remove the run's placement group."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    def worker_view():
        from ray.util.state import list_nodes

        return os.environ.get("RAY_ADDRESS"), [n.node_id for n in list_nodes()]

    address, nodes = ray.get(worker_view.remote())
    assert address == ray.get_runtime_context().gcs_address
    assert nodes == [ray.get_runtime_context().get_node_id()]  # the State API answers for this cluster
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # a Ray started by a child picks its own port
