"""The data path, composed: read -> render -> infer -> score -> write."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data.datasource import FilenameProvider

from llmbatch.pipelines.columns import INFERENCE_ERROR, StageColumns, check_chain
from llmbatch.errors import UserError
from llmbatch.pipelines.infer import STAGE_CPUS, EngineSettings, build_infer_stage, engine_columns
from llmbatch.pipelines.judge import JudgeRenderStage, after_judge, after_judge_columns
from llmbatch.pipelines.run_files import output_parts, part_name
from llmbatch.pipelines.run_lock import Fence
from llmbatch.pipelines.output import conform_columns, conform_output, output_row_columns, to_output_row
from llmbatch.pipelines.read import (
    InputFile, ReadShards, ShardScan, ShardTask, id_hashes, input_shape_problems, mark_duplicate_ids, plan_shard_tasks,
    read_task_rows, scan_shard, shard_task_rows, split_tasks, unify_input_schema,
)
from llmbatch.pipelines.render import RenderSettings, RenderStage, render_columns
from llmbatch.pipelines.result_cache import CacheLookupStage
from llmbatch.pipelines.schema import output_names_for_inputs, output_schema, task_fields
from llmbatch.pipelines.scorer_specs import score_fields
from llmbatch.pipelines.scorers import ScoreStage
from llmbatch.storage import filesystem_for, is_s3, join, storage_errors

CPU_STAGE_CPUS = STAGE_CPUS
REPLICAS_PER_CPU_ACTOR = 2  # engine replicas one render, cache-lookup or score actor keeps fed at most


def cpu_stage_pool(engine: EngineSettings) -> ray.data.ActorPoolStrategy:
    """The actors of a CPU stage beside an engine pool: one, growing with the backlog to one per
    REPLICAS_PER_CPU_ACTOR engine replicas, so that prefill-heavy jobs (task: score, short outputs) on many GPUs
    are not held back by one tokenizing process."""
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, -(-engine.replicas[1] // REPLICAS_PER_CPU_ACTOR)))


@dataclass(frozen=True)
class ScannedInput:
    files: list[InputFile]
    rows_per_file: dict[str, int]
    schema: pa.Schema
    tasks: list[ShardTask]
    duplicate_ids: int = 0   # rows whose id repeats an earlier row's (error rows, never inferred)

    @property
    def rows(self) -> int:
        return task_rows(self.tasks, self.rows_per_file)


def task_rows(tasks: list[ShardTask], rows_per_file: dict[str, int]) -> int:
    """Rows the read tasks cover: each its `take`, or its whole file."""
    return sum(t.take if t.take is not None else rows_per_file[t.uri] for t in tasks)


@ray.remote(num_cpus=CPU_STAGE_CPUS)
def _scan_remote(uri: str, fmt: str) -> ShardScan:
    return scan_shard(uri, fmt)


@ray.remote(num_cpus=CPU_STAGE_CPUS)
def _id_hashes_remote(task: ShardTask, schema_bytes: bytes, id_column: str):
    return id_hashes(task, pa.ipc.read_schema(pa.py_buffer(schema_bytes)), id_column)


def scan_inputs(files: list[InputFile], limit: int | None, required_columns: dict[str, str],
                id_column: str | None = None, rows_per_task: int | None = None) -> ScannedInput:
    """The cheap pass before any engine starts: every shard readable, row counts, one schema, and with an
    id column, the rows whose id repeats an earlier one. Read tasks cover `rows_per_task` rows each, or more
    when that would make more than MAX_READ_TASKS of them. `required_columns`: column -> the field naming it."""
    scans = ray.get([_scan_remote.remote(f.uri, f.format) for f in files])
    broken = [s for s in scans if s.error]
    if broken:
        lines = [f"input.path: cannot read {s.uri}: {s.error}" for s in broken]
        raise UserError(lines[0], lines=lines)
    rows = sum(s.rows for s in scans)
    schema = unify_input_schema(scans, id_column) if rows else None
    problems = input_shape_problems(len(files), rows, schema, required_columns)
    if problems:
        raise UserError(problems[0], lines=problems)
    rows_per_file = {s.uri: s.rows for s in scans}
    tasks = plan_shard_tasks(files, rows_per_file, limit)
    if not tasks:
        raise UserError(f"input.path: the input holds no rows ({len(files)} file(s), all empty)")
    duplicates = 0
    if id_column:
        schema_bytes = schema.serialize().to_pybytes()
        hashes = ray.get([_id_hashes_remote.remote(t, schema_bytes, id_column) for t in tasks])
        tasks, duplicates = mark_duplicate_ids(tasks, hashes)
    if rows_per_task:
        tasks = split_tasks(tasks, read_task_rows(task_rows(tasks, rows_per_file), rows_per_task),
                            {s.uri: s for s in scans})
    return ScannedInput(files, rows_per_file, schema, tasks, duplicates)


@dataclass(frozen=True)
class OutputContext:
    run_id: str
    model_label: str
    max_model_len: int | None
    task: str = "generate"
    logprobs: int | None = None                        # sampling.logprobs: keep the top K per position
    scorers: tuple[Any, ...] = ()                       # scoring section: scorer specs (pipelines/scorer_specs.py)
    cache_uri: str | None = None                        # result cache namespace: look rows up before the engine

    def extra_fields(self) -> list[pa.Field]:
        return (task_fields(self.task, bool(self.logprobs), self.cache_uri is not None)
                + score_fields(list(self.scorers)))


def output_schema_for(inputs: "ScannedInput", output: OutputContext) -> pa.Schema:
    return output_schema(inputs.schema, output.extra_fields())


def first_pass_columns(inputs: ScannedInput, render: RenderSettings, engine: EngineSettings,
                       output: OutputContext) -> list[StageColumns]:
    """The first pass's stages, in order, as each declares the columns it reads and adds."""
    out_schema = output_schema_for(inputs, output)
    row_scorers = [s for s in output.scorers if not s.needs_engine]
    scored = {s.column for s in output.scorers} | {f.name for s in output.scorers for f in s.output_fields()}
    return [
        ReadShards.columns,
        render_columns(render.task),
        *([CacheLookupStage.columns] if output.cache_uri is not None else []),
        engine_columns(engine.engine, output.task),
        output_row_columns(output.task, [n for n in out_schema.names if n not in scored]),
        *([ScoreStage.columns_for(row_scorers)] if row_scorers else []),
        conform_columns(out_schema),
    ]


def build_dataset(inputs: ScannedInput, id_column: str | None, render: RenderSettings, engine: EngineSettings,
                  output: OutputContext, counter=None, done=None) -> ray.data.Dataset:
    """The first pass. `done`: sorted key hashes of rows an earlier attempt wrote, which are not read again."""
    check_chain(first_pass_columns(inputs, render, engine, output))
    schema_bytes = inputs.schema.serialize().to_pybytes()
    out_schema = output_schema_for(inputs, output)
    columns = output_names_for_inputs(inputs.schema.names, [f.name for f in output.extra_fields()])
    ds = ray.data.from_items(shard_task_rows(inputs.tasks), override_num_blocks=len(inputs.tasks))
    ds = ds.map_batches(_read_shards, fn_kwargs={"schema_bytes": schema_bytes, "id_column": id_column, "done": done},
                        batch_size=1, batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS)
    ds = ds.map_batches(RenderStage, fn_constructor_args=(engine.model_path, render, engine.ensure_model),
                        batch_size=engine.batch_size,
                        batch_format="pyarrow", compute=cpu_stage_pool(engine), num_cpus=CPU_STAGE_CPUS)
    if output.cache_uri is not None:
        ds = ds.map_batches(CacheLookupStage, fn_constructor_args=(output.cache_uri,), batch_size=engine.batch_size,
                            batch_format="pyarrow", compute=cpu_stage_pool(engine),
                            num_cpus=CPU_STAGE_CPUS)
    ds = build_infer_stage(engine)(ds)
    ds = ds.map(to_output_row, fn_kwargs=dict(
        input_columns=columns, model=output.model_label, run_id=output.run_id,
        max_tokens=engine.sampling_params["max_tokens"], max_model_len=output.max_model_len,
        task=output.task, logprobs=output.logprobs,
    ), num_cpus=CPU_STAGE_CPUS)
    row_scorers = [s for s in output.scorers if not s.needs_engine]
    if row_scorers:
        ds = ds.map_batches(ScoreStage, fn_constructor_args=(row_scorers, columns), batch_format="pyarrow",
                            compute=cpu_stage_pool(engine), num_cpus=CPU_STAGE_CPUS)
    ds = ds.map_batches(conform_output, fn_kwargs={"schema_bytes": out_schema.serialize().to_pybytes(),
                                                   "counter": counter},
                        batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS)
    return ds


def judge_pass_columns(scorer: Any, judge: EngineSettings, inputs: ScannedInput,
                       output: OutputContext) -> list[StageColumns]:
    out_schema = output_schema_for(inputs, output)
    return [StageColumns("earlier pass", adds=tuple(out_schema.names), keeps=False), JudgeRenderStage.columns,
            engine_columns(judge.engine), after_judge_columns(scorer, out_schema.names), conform_columns(out_schema)]


def build_judge_pass(ds: ray.data.Dataset, scorer: Any, judge: EngineSettings, inputs: ScannedInput,
                     output: OutputContext, judge_max_len: int | None, counter=None) -> ray.data.Dataset:
    """A second pass over finished output rows: the judge model grades each one into score_<name>."""
    check_chain(judge_pass_columns(scorer, judge, inputs, output))
    columns = output_names_for_inputs(inputs.schema.names, [f.name for f in output.extra_fields()])
    ds = ds.map_batches(JudgeRenderStage, fn_constructor_args=(judge.model_path, scorer, columns, judge_max_len,
                                                               bool(judge.engine_kwargs.get("trust_remote_code")),
                                                               judge.ensure_model),
                        batch_size=judge.batch_size, batch_format="pyarrow",
                        compute=cpu_stage_pool(judge), num_cpus=CPU_STAGE_CPUS)
    ds = build_infer_stage(judge)(ds)
    ds = ds.map(after_judge, fn_kwargs={"scorer": scorer, "inference_error": INFERENCE_ERROR}, num_cpus=CPU_STAGE_CPUS)
    return ds.map_batches(conform_output, fn_kwargs={"schema_bytes": output_schema_for(inputs, output).serialize()
                                                     .to_pybytes(), "counter": counter},
                          batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS)


def read_output_parts(uri: str) -> ray.data.Dataset:
    """Parquet parts an earlier pass of this run wrote (to be judged), one read task per part.

    Read with our own light tasks: ray.data.read_parquet starts a metadata task that asks for a whole CPU,
    which the engines beside it may hold.
    """
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, "read back the first pass from"):
        parts = output_parts(fs, inner)
    if not parts:
        raise UserError(f"{uri}: the first pass wrote no output parts")
    ds = ray.data.from_items([{"part": join(uri, p[len(inner):].lstrip("/"))} for p in parts],
                             override_num_blocks=len(parts))
    return ds.map_batches(_read_part, batch_size=1, batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS)


def _read_part(batch: pa.Table):
    import pyarrow.parquet as pq

    for uri in batch.column("part").to_pylist():
        fs, inner = filesystem_for(uri)
        with storage_errors(uri, "read back the first pass from"), fs.open(inner, "rb") as handle:
            yield from (pa.Table.from_batches([b]) for b in pq.ParquetFile(handle).iter_batches(batch_size=1024))


def _read_shards(batch: pa.Table, *, schema_bytes: bytes, id_column: str | None, done=None):
    yield from ReadShards(schema_bytes, id_column, done)(batch.to_pydict())


class PartNames(FilenameProvider):
    """Parts named for the lock generation that writes them (run_files.PART_NAME)."""

    def __init__(self, generation: int):
        super().__init__(file_format="parquet")
        self.generation = generation

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return part_name(self.generation, write_uuid.replace("-", ""), task_index)


def _fenced(batch: pa.Table, *, fence: Fence) -> pa.Table:
    fence.check()
    return batch


def write_dataset(ds: ray.data.Dataset, target: str, fence: Fence, rows_per_part: int | None = None) -> None:
    """Write parquet parts as rows finish; a part is written once it holds `rows_per_part` rows (the last
    one may be smaller), so a crash loses at most the parts not yet written. A write that finds the run taken
    by a later lock generation than `fence`'s stops the pass."""
    fs, inner = filesystem_for(target)
    # At Ray's default of a whole CPU a write task waits until the engines give theirs back, so on a small
    # machine no part would be written before the last row is generated.
    light = {"num_cpus": CPU_STAGE_CPUS}
    ds = ds.map_batches(_fenced, fn_kwargs={"fence": fence}, batch_size=None, batch_format="pyarrow", **light)
    names = PartNames(fence.generation)
    with storage_errors(target, "write output to"):
        if is_s3(target):
            import pyarrow.fs as pafs

            ds.write_parquet(inner, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), filename_provider=names,
                             min_rows_per_file=rows_per_part, ray_remote_args=light)
        else:
            ds.write_parquet(inner, filename_provider=names, min_rows_per_file=rows_per_part, ray_remote_args=light)
