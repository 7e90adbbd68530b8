"""The row contract between stages: each stage declares what it reads and adds, and every pass llmbatch
composes holds together (no Ray, no engine)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from llmbatch.jobs.spec import validate_spec
from llmbatch.pipelines.columns import StageColumns, check_chain
from llmbatch.pipelines.infer import EngineSettings, engine_columns
from llmbatch.pipelines.output import output_row_columns, to_output_row
from llmbatch.pipelines.pipeline import OutputContext, ScannedInput, first_pass_columns, judge_pass_columns
from llmbatch.pipelines.read import InputFile, ReadShards, ShardTask, shard_task_rows
from llmbatch.pipelines.render import RenderSettings, render_columns
from llmbatch.pipelines.result_cache import CacheLookupStage
from llmbatch.pipelines.schema import output_names_for_inputs
from llmbatch.pipelines.scorers import ScoreStage
from test_render import make_batch, make_stage

SCHEMA = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
BASE = {"name": "j", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"}}


def scorers(*items: dict) -> tuple:
    return tuple(validate_spec({**BASE, "scoring": list(items)}).scoring)


def inputs() -> ScannedInput:
    return ScannedInput([InputFile("a.jsonl", "a.jsonl", 1, "jsonl")], {"a.jsonl": 2}, SCHEMA,
                        [ShardTask("a.jsonl", "a.jsonl", "jsonl", None)])


def engine(kind: str = "vllm") -> EngineSettings:
    return EngineSettings("m", {}, {"max_tokens": 4}, (1, 1), 8, {"CPU": 1}, engine=kind)


@pytest.mark.parametrize("task,kind,cache,scoring", [
    ("generate", "vllm", None, ()),
    ("generate", "vllm", "out/cache", ({"name": "a", "kind": "exact_match", "reference_column": "answer"},)),
    ("generate", "seq2seq", None, ({"name": "r", "kind": "regex", "pattern": "x"},
                                   {"name": "q", "kind": "judge", "rubric": "{generated_text}"})),
    ("score", "vllm", None, ()),
])
def test_every_first_pass_composition_holds_together(task, kind, cache, scoring):
    output = OutputContext("r", "m", 64, task=task, scorers=scorers(*scoring), cache_uri=cache)
    chain = first_pass_columns(inputs(), RenderSettings(task=task), engine(kind), output)
    check_chain(chain)
    assert chain[-1].adds[:2] == ("id", "input_prompt") and {"prompt", "answer", "error"} <= set(chain[-1].adds)


def test_the_judge_pass_holds_together_over_the_first_passes_output():
    (judge,) = scorers({"name": "q", "kind": "judge", "rubric": "{answer}: {generated_text}"})
    output = OutputContext("r", "m", 64, scorers=(judge,))
    chain = judge_pass_columns(judge.grading(), engine(), inputs(), output)
    check_chain(chain)
    assert {"score_q", "score_q_raw"} <= set(chain[-2].adds)


def test_a_pass_out_of_order_is_refused_naming_the_stage_and_the_columns():
    with pytest.raises(RuntimeError, match="the engine stage needs column.s. prompt, tokenized_prompt, which no "
                                           "stage before it adds .they add: _input, _row_error, id."):
        check_chain([ReadShards.columns, engine_columns("vllm"), render_columns("generate")])
    with pytest.raises(RuntimeError, match="the output stage needs .*_choices, _choice_results"):
        check_chain([ReadShards.columns, render_columns("generate"), engine_columns("vllm"),
                     output_row_columns("score", ["id"])])


def test_a_stage_that_builds_a_new_row_passes_on_only_what_it_adds():
    read = StageColumns("read", adds=("id", "_x"), keeps=False)
    with pytest.raises(RuntimeError, match="the later stage needs column.s. _x"):
        check_chain([read, StageColumns("new row", needs=("id",), adds=("id",), keeps=False),
                     StageColumns("later", needs=("_x",))])


def test_each_stage_adds_what_it_declares_and_refuses_a_batch_without_its_needs(tmp_path):
    shard = tmp_path / "a.jsonl"
    shard.write_text(json.dumps({"prompt": "hi", "answer": "yes"}) + "\n")
    task = shard_task_rows([ShardTask(str(shard), "a.jsonl", "jsonl", None)])[0]
    read = pa.concat_tables(ReadShards(SCHEMA.serialize().to_pybytes(), None)({k: [v] for k, v in task.items()}))
    assert set(read.column_names) == set(ReadShards.columns.adds)

    for task in ("generate", "score"):
        rows = [{"prompt": "hi", "completion": "yes"}] if task == "score" else [{"prompt": "hi"}]
        struct = pa.struct([(k, pa.string()) for k in rows[0]])
        settings = RenderSettings(task=task, completion_column="completion" if task == "score" else None)
        rendered = make_stage(settings)(make_batch(rows, struct_type=struct))
        assert set(render_columns(task).adds) <= set(rendered.column_names)
        with pytest.raises(KeyError, match=r"render: missing input column\(s\) \['_row_error'\]"):
            make_stage(settings)(make_batch(rows, struct_type=struct).drop_columns(["_row_error"]))

    lookup = CacheLookupStage.__new__(CacheLookupStage)
    lookup.index = {}
    looked_up = lookup(pa.table({"prompt": ["p"], "_row_error": pa.array([None], pa.string())}))
    assert set(CacheLookupStage.columns.adds) <= set(looked_up.column_names)

    names = output_names_for_inputs(SCHEMA.names)
    engine_row = {"id": "a#0", "_input": {"prompt": "hi", "answer": "yes"}, "_rendered_prompt": "hi",
                  "__inference_error__": "", "generated_text": "yes", "num_input_tokens": 1,
                  "num_generated_tokens": 1, "tokenized_prompt": [1]}
    out = to_output_row(engine_row, input_columns=names, model="m", run_id="r", max_tokens=4, max_model_len=64)
    declared = output_row_columns("generate", ["id", *names.values(), "prompt", "generated_text", "finish_reason",
                                               "num_input_tokens", "num_generated_tokens", "cumulative_logprob",
                                               "mean_logprob", "perplexity", "error", "model", "run_id"])
    assert set(out) == set(declared.adds)

    (exact,) = scorers({"name": "a", "kind": "exact_match", "reference_column": "answer"})
    scored = ScoreStage([exact], names)(pa.Table.from_pylist([out]))
    assert set(ScoreStage.columns_for([exact]).adds) <= set(scored.column_names)


def test_cpu_stages_grow_with_the_engine_pool():
    from llmbatch.pipelines.infer import EngineSettings
    from llmbatch.pipelines.pipeline import cpu_stage_pool

    def pool(replicas):
        return cpu_stage_pool(EngineSettings(model_path="m", engine_kwargs={}, sampling_params={}, replicas=replicas,
                                             batch_size=32, bundle_per_replica={"GPU": 1.0}))

    assert (pool((1, 1)).min_size, pool((1, 1)).max_size) == (1, 1)
    assert (pool((2, 16)).min_size, pool((2, 16)).max_size) == (1, 8)
    assert pool((3, 3)).max_size == 2
