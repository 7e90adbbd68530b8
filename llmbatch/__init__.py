"""llmbatch: distributed batch inference for open LLMs.

Layers, each importing only the ones below it:
- `llmbatch.jobs`: the job spec, the CLI and the control path of a run;
- `llmbatch.pipelines` (the data path) and `llmbatch.cluster` (models, resources, the Ray cluster);
- `llmbatch` itself: what every layer shares (errors, storage).
"""
