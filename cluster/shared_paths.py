"""On a cluster every node reads the input, writes parts and reads the cache: a local path must be one that
every node sees (storage they all mount), or the parts scatter over the nodes' own disks. Before any engine
starts, each alive node is asked whether it sees the run's local paths as the driver does."""
from __future__ import annotations

import os
from dataclasses import dataclass

from llmbatch.errors import UserError


ANSWER_SECONDS = 120.0


@dataclass(frozen=True)
class PathCheck:
    field: str            # the job file's field the path comes from, e.g. output.path
    path: str             # a local file the driver sees
    size: int             # its size there


def unseen(checks: list[PathCheck]) -> list[str]:
    """The checks this machine fails, each as '<field>: <path> (why)'."""
    problems = []
    for check in checks:
        try:
            size = os.stat(check.path).st_size
        except OSError:
            problems.append(f"{check.field}: {check.path} (not there)")
            continue
        if size != check.size:
            problems.append(f"{check.field}: {check.path} ({size} bytes there, {check.size} on the driver's node)")
    return problems


def refusal(blind: dict[str, list[str]]) -> UserError:
    """The error for nodes (by address) that do not see the run's local paths."""
    lines = [f"node {node} does not see {problem}" for node, problems in sorted(blind.items()) for problem in problems]
    advice = ("use s3:// (or storage every node mounts at the same place) for input.path, output.path, "
              "cache.path and a model.source folder")
    return UserError(f"{lines[0]}: a run on a cluster needs paths every node sees; {advice}",
                     lines=[*lines, advice])


def check_nodes_see(checks: list[PathCheck], node_ids: list[str]) -> None:
    """Ask every node in `node_ids` for `checks`; raise `refusal` naming each node that fails one."""
    if not checks or not node_ids:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def look(wanted: list[PathCheck]) -> tuple[str, list[str]]:
        return ray.util.get_node_ip_address(), unseen(wanted)

    refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(checks)
            for node in node_ids]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ANSWER_SECONDS)
    if len(ready) < len(refs):
        silent = [node[:8] for node, ref in zip(node_ids, refs) if ref not in ready]
        raise UserError(f"node(s) {', '.join(silent)} did not say within {ANSWER_SECONDS:.0f} s whether they see the "
                        "run's paths (a node that is busy or going away); `ray status` shows the nodes; submit again")
    answers = ray.get(refs)
    blind = {f"{address} ({node[:8]})": problems for node, (address, problems) in zip(node_ids, answers) if problems}
    if blind:
        raise refusal(blind)
