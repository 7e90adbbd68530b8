"""A schedule as a KubeRay RayCronJob manifest, for teams that schedule on KubeRay rather than with llmbatch's
scheduler. The RayJob it creates runs `llmbatch schedule run-slot`, which takes the slot due at that moment, so
each run still gets the slot's run id and paths; what RayCronJob itself lacks is said in the manifest."""
from __future__ import annotations

import base64

import yaml

from llmbatch.jobs.spec import JobSpec

GAPS = """\
# Exported by `llmbatch schedule export --kuberay`. Known gaps of RayCronJob (alpha in KubeRay 1.6/1.7)
# against llmbatch's scheduler:
#  - the RayCronJob feature gate is off by default (kuberay-operator --feature-gates=RayCronJob=true);
#  - after an operator outage missed slots are replayed one after another, and one tick has been seen to
#    create two RayJobs (kuberay#4849): llmbatch's run id per slot makes a duplicate find the run taken or
#    committed instead of running twice, but each RayJob still starts its submitter;
#  - no starting deadline, catch-up policy or max_active: {policies};
#  - no run history: `llmbatch schedule history` does not see these runs (`llmbatch list --address` does).
"""


def raycronjob_manifest(spec: JobSpec, image: str, cluster: str) -> str:
    schedule = spec.schedule
    assert schedule is not None
    job_b64 = base64.b64encode(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode()).decode()
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/managed-by": "llmbatch"}},
        "spec": {
            "schedule": schedule.cron,
            "timeZone": schedule.timezone,
            "suspend": schedule.paused,
            "jobTemplate": {
                "entrypoint": f"llmbatch schedule run-slot --job-base64 {job_b64}",
                "clusterSelector": {"ray.io/cluster": cluster},
                "submissionMode": "HTTPMode",
                "submitterPodTemplate": {"spec": {"restartPolicy": "Never", "containers": [{
                    "name": "submitter", "image": image}]}},
                "metadata": {"llmbatch": "1", "job": spec.name, "schedule": spec.name},
            },
        },
    }
    policies = (f"this schedule's catchup: {schedule.catchup}, concurrency: {schedule.concurrency}, "
                f"starting_deadline: {schedule.starting_deadline or 'none'} are not carried over")
    return GAPS.format(policies=policies) + yaml.safe_dump(manifest, sort_keys=False)
