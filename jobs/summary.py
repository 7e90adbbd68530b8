"""The one-screen summary printed when a run ends."""
from __future__ import annotations

from typing import Any


def render_summary(manifest: dict[str, Any]) -> str:
    rows, tokens = manifest["rows"], manifest["tokens"]
    wall = manifest["wall_seconds"]
    replicas = manifest["engine"]["replicas"]
    pool = f"{replicas[0]}-{replicas[1]}" if isinstance(replicas, list) else str(replicas)
    lines = [
        "",
        f"run {manifest['run_id']}: {manifest['status']}",
        f"  model        {manifest['model']['source']}  ({pool} x {manifest['engine']['accelerator']} replica)",
        f"  rows         {rows['in']} in, {rows['ok']} ok, {rows['error']} error",
        f"  tokens       {tokens['input']} input, {tokens['generated']} generated",
        f"  throughput   {manifest['output_tokens_per_second'] or 0:.1f} output tok/s",
        f"  wall time    {wall:.1f} s",
        f"  output       {manifest['output']['path']}",
        f"  manifest     {manifest['output']['path'].rstrip('/')}/_manifest.json",
    ]
    if manifest.get("problems"):
        lines.append("  problems     " + "; ".join(manifest["problems"]))
    return "\n".join(lines)
