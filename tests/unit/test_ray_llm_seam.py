"""The seam to ray.data.llm's private internals: it holds on the installed Ray, llmbatch's engine stage builds
on it, a moved piece fails with one message naming it, and no other module reaches past it.

No engine starts and no Ray cluster: building the processor is refused a `ray.init`."""
from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import ray

from llmbatch.pipelines import ray_llm_seam as seam
from llmbatch.pipelines.infer import EngineSettings, build_infer_stage, sampling_params
from llmbatch.pipelines.inprocess_engine import IN_PROCESS_ENV, in_process_wrapper_class

REPO = Path(__file__).resolve().parents[2]
OUR_UDF_KEYWORDS = {"progress_actor", "in_process", "ensure_model"}  # what build_infer_stage adds to the stage's constructor kwargs


def test_the_seam_holds_on_the_installed_ray():
    assert seam.seam_problems() == []
    seam.check_seam()
    assert issubclass(seam.vLLMEngineStageUDF, seam.StatefulStageUDF)
    assert seam.vLLMTaskType.GENERATE == "generate"


def test_the_seam_names_the_ray_version_pyproject_pins():
    pin = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None and pin.group(1) == seam.RAY_VERSION_WRITTEN_AGAINST


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """llmbatch's processor for an in-process CPU engine, built as a job builds it."""
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    plan = EngineSettings(model_path=str(model), engine_kwargs={"max_model_len": 512, "dtype": "float32"},
                      sampling_params=sampling_params(16, 0.0, 1.0, None, 0, []), replicas=(1, 2), batch_size=4,
                      bundle_per_replica={"CPU": 2.0}, progress_actor="progress", in_process=True, threads=2,
                      max_concurrent_batches=12)

    ray_inits = []
    with pytest.MonkeyPatch.context() as patch:
        # build_processor calls ray.init, which would start a local cluster: nothing here needs one
        patch.setattr(ray, "init", lambda *args, **kwargs: ray_inits.append(kwargs))
        processor = build_infer_stage(plan)
    assert ray_inits and not ray.is_initialized()
    return plan, processor


def test_llmbatch_builds_its_engine_stage_on_the_installed_ray(built):
    plan, processor = built
    assert seam.ENGINE_STAGE_NAME in processor.list_stage_names(), (
        f"ray.data.llm no longer names its engine stage {seam.ENGINE_STAGE_NAME!r}: {processor.list_stage_names()}")
    stage = processor.get_stage_by_name(seam.ENGINE_STAGE_NAME)
    assert issubclass(stage.fn, seam.vLLMEngineStageUDF), "the stage's UDF was not replaced with llmbatch's"
    assert "num_gpus" not in stage.map_batches_kwargs, (
        "replacing the stage's UDF re-ran its validator, which asks for a GPU per replica")
    assert stage.map_batches_kwargs["num_cpus"] == plan.bundle_per_replica["CPU"]
    assert stage.map_batches_kwargs["runtime_env"] == {"env_vars": {**IN_PROCESS_ENV, "OMP_NUM_THREADS": "2"}}

    map_kwargs = stage.get_dataset_map_batches_kwargs(batch_size=plan.batch_size, data_column=processor.DATA_COLUMN)
    constructor_kwargs = map_kwargs["fn_constructor_kwargs"]
    assert constructor_kwargs["max_concurrent_batches"] == 12
    assert {key: constructor_kwargs[key] for key in OUR_UDF_KEYWORDS} == {"progress_actor": "progress",
                                                                          "in_process": True, "ensure_model": None}
    rays_kwargs = {key: value for key, value in constructor_kwargs.items() if key not in OUR_UDF_KEYWORDS}
    in_process = inspect.signature(stage.fn._start_in_process)
    for takes, signature in (("ray.data.llm's engine stage UDF", inspect.signature(seam.vLLMEngineStageUDF.__init__)),
                             ("llmbatch's in-process set-up", in_process)):
        try:
            signature.bind(None, **rays_kwargs)
        except TypeError as exc:
            pytest.fail(f"{takes} no longer takes the keywords ray.data.llm's engine stage passes "
                        f"({sorted(rays_kwargs)}): {exc}")
    ignored = set(rays_kwargs) - set(in_process.parameters)
    assert ignored == {"log_engine_metrics"}, f"the in-process set-up would silently drop {sorted(ignored)}"


def test_the_in_process_set_ups_set_every_attribute_the_constructors_they_replace_set(built):
    _, processor = built
    udf = processor.get_stage_by_name(seam.ENGINE_STAGE_NAME).fn
    for ours, rays in ((udf._start_in_process, seam.vLLMEngineStageUDF.__init__),
                       (in_process_wrapper_class().__init__, seam.vLLMEngineWrapper.__init__)):
        unset = seam.attributes_set_in(rays) - seam.attributes_set_in(ours)
        assert not unset, f"{ours.__qualname__} does not set {sorted(unset)}, which {rays.__qualname__} sets"


def test_a_moved_piece_fails_with_one_message_naming_the_versions_and_each_piece(monkeypatch):
    def reshaped_init(self, data_column, expected_input_keys, batch_size, max_concurrent_batches, model_source,
                      engine_kwargs, task_type=None, max_pending_requests=None, dynamic_lora_loading_path=None,
                      should_continue_on_error=False):
        self.engine_pool = None

    monkeypatch.setattr(ray, "__version__", "9.9.9")
    monkeypatch.delattr(seam.vLLMEngineStageUDF, "normalize_engine_kwargs")
    monkeypatch.setattr(seam.vLLMEngineStageUDF, "__init__", reshaped_init)
    with pytest.raises(seam.RayLlmSeamError) as raised:
        seam.check_seam()
    stage = seam.ENGINE_STAGE_MODULE
    assert isinstance(raised.value, ImportError)
    assert str(raised.value) == (
        "llmbatch was written against Ray 2.60.0; the installed Ray 9.9.9 lacks these private ray.llm pieces it "
        "relies on (missing or changed):\n"
        f"  - {stage}.vLLMEngineStageUDF.normalize_engine_kwargs\n"
        f"  - {stage}.vLLMEngineStageUDF.__init__ parameter 'model'\n"
        f"  - {stage}.vLLMEngineStageUDF.__init__ sets attributes the in-process set-up does not: engine_pool\n"
        "Install ray==2.60.0 (the pin in pyproject.toml) or adapt pipelines/ray_llm_seam.py and its users to "
        "this Ray.")


def test_a_moved_module_is_named_with_its_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, seam.STAGE_BASE_MODULE, None)
    problems = seam.seam_problems()
    assert problems == [f"module {seam.STAGE_BASE_MODULE} (ModuleNotFoundError: import of {seam.STAGE_BASE_MODULE} "
                        "halted; None in sys.modules)"]


def test_only_the_seam_names_ray_llm_internals():
    naming = sorted(str(path.relative_to(REPO)) for folder in ("jobs", "pipelines", "cluster", "llmbatch")
                    for path in (REPO / folder).rglob("*")
                    if path.is_file() and "__pycache__" not in path.parts
                    and b"ray.llm._internal" in path.read_bytes())
    assert naming == ["pipelines/ray_llm_seam.py"]


def test_the_placement_groups_of_multi_gpu_replicas_are_removed_after_their_pass(tmp_path, monkeypatch):
    """ray.data.llm places each replica of a TP>1 engine in a placement group it never removes
    (ray-project/ray#64035); llmbatch records each one and removes it once the pass is over."""
    import ray.util

    from llmbatch.pipelines.infer import release_placement_groups

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    plan = EngineSettings(model_path=str(tmp_path), engine_kwargs={"max_model_len": 512, "tensor_parallel_size": 2},
                          sampling_params=sampling_params(16, 0.0, 1.0, None, 0, []), replicas=(1, 1), batch_size=4,
                          bundle_per_replica={"GPU": 1.0, "CPU": 1.0})
    created, removed = [], []
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray.util, "placement_group", lambda *a, **k: created.append(object()) or created[-1])
    monkeypatch.setattr(ray.util, "remove_placement_group", removed.append)
    stage = build_infer_stage(plan).get_stage_by_name(seam.ENGINE_STAGE_NAME)
    place = stage.map_batches_kwargs["ray_remote_args_fn"]
    place(), place()                      # two replicas started
    assert len(created) == 2
    assert release_placement_groups() == 2 and sorted(map(id, removed)) == sorted(map(id, created))
    assert release_placement_groups() == 0
