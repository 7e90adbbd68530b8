"""Every node that may host a replica gets the model files into its own cache, once, before engines start."""
from __future__ import annotations

from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmbatch.errors import UserError


@ray.remote(num_cpus=0)
def _resolve_on_node(source: str, revision: str | None) -> tuple[str, str]:
    from llmbatch.cluster.model_store import resolve_local

    return ray.get_runtime_context().get_node_id(), str(resolve_local(source, revision=revision))


def ensure_model_on_nodes(source: str, driver_path: str, node_ids: list[str]) -> dict[str, str]:
    """Prepare (catalog), copy (s3://), download (a hub id, at the commit the driver resolved) or find (a local
    directory) the model on each node; every node must see it at the same path, since all replicas get one
    model path."""
    from llmbatch.cluster.model_store import cache_home, classify_source

    kind = classify_source(source).kind
    revision = Path(driver_path).name if kind == "hub" else None   # .../snapshots/<commit>
    refs = [_resolve_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(source, revision) for node in node_ids]
    paths = dict(ray.get(refs))
    elsewhere = {node: path for node, path in paths.items() if path != driver_path}
    if elsewhere:
        node, path = next(iter(elsewhere.items()))
        raise UserError(f"model.source: node {node[:12]} keeps the model at {path}, the driver at {driver_path}; "
                        f"give every node the same {cache_home(kind)}")
    return paths
