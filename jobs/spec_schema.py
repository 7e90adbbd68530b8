"""The job file's JSON Schema, for editors (`llmbatch spec --json-schema`)."""
from __future__ import annotations

from typing import Any

from llmbatch.jobs.spec import JobSpec

DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "llmbatch job file"


def job_json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    schema.pop("title", None)
    return {"$schema": DIALECT, "title": TITLE, **schema}
