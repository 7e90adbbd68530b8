"""llmbatch: distributed batch inference for open LLMs.

Layers, each importing only the ones below it:
- `llmbatch.jobs`: the job spec, the CLI and the control path of a run;
- `llmbatch.cluster`: models, replica resources, the Ray cluster;
- `llmbatch.pipelines`: the data path, the row contract, the run folder;
- `llmbatch` itself: what every layer shares (errors, storage, the manifest's shape).
"""
