"""The placement planner (issue 23) on fake GPU inventories, with the published Llama-3 configs: no GPU, no
weights, no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.flows.placement import plan_for
from prefmill.schemas.config import EngineConfig, PipelineConfig, PlacementSection
from prefmill.serving.hosts import ModelHost
from prefmill.serving.placement import (
    Device,
    PlacementError,
    Role,
    ScorerLoad,
    parse_devices,
    plan_placement,
    read_model_size,
    size_from_config,
)

# config.json of meta-llama/Meta-Llama-3-8B-Instruct and Meta-Llama-3-70B-Instruct (the fields sizing reads)
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}
MINILM = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "intermediate_size": 1536,
          "num_hidden_layers": 6, "num_attention_heads": 12}
SIZES = {"llama-8b": size_from_config(LLAMA3_8B), "other-8b": size_from_config(LLAMA3_8B),
         "llama-70b": size_from_config(LLAMA3_70B), "minilm": size_from_config(MINILM)}
LOAD = ScorerLoad(rows=8 * 24, max_tokens=4096)  # flr.prefix_batch × the built-in follow-ups, flr.max_tokens


def plan(roles: list[tuple[str, str, str]], devices: str, section: PlacementSection = PlacementSection(),
         engine: EngineConfig = EngineConfig()):
    return plan_placement([Role(*r) for r in roles], parse_devices(devices), SIZES.__getitem__, engine, section, LOAD)


def run_roles(assistant: str, simulator: str, scorer: str) -> list[tuple[str, str, str]]:
    return [("assistant", assistant, "chat"), ("simulator", simulator, "chat"), ("scorer", scorer, "scorer"),
            ("embedder", "minilm", "embedder")]


def on_device(p, index: int) -> list:
    return [m for m in p.placements if index in m.devices]


def assert_fits(p) -> None:
    """What every GPU holds stays within its memory less the reserve, and each model gets at least its need."""
    for device in p.devices:
        held = sum(m.memory for m in on_device(p, device.index))
        assert held <= device.memory * (1 - PlacementSection().reserve_fraction)
        assert all(m.memory >= m.need > 0 for m in on_device(p, device.index))


def test_parameter_counts_match_the_published_model_sizes():
    assert round(SIZES["llama-8b"].parameters / 1e9, 2) == 8.03
    assert round(SIZES["llama-70b"].parameters / 1e9, 1) == 70.6
    assert 22e6 < SIZES["minilm"].parameters < 23e6  # all-MiniLM-L6-v2: 22.7M
    assert SIZES["llama-8b"].kv_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16


def test_a_safetensors_index_size_wins_over_the_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert read_model_size(tmp_path).source == "architecture"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 16060522496}}))
    size = read_model_size(tmp_path)
    assert (size.source, size.weights(2)) == ("safetensors index", 16060522496)


def test_one_80gb_gpu_8b_assistant_and_same_scorer_scores_through_the_engine():
    p = plan(run_roles("llama-8b", "llama-8b", "llama-8b"), "1x80GiB")
    engine = p.engine("llama-8b")
    assert engine.roles == ("assistant", "simulator", "scorer") and engine.devices == (0,)
    assert p.scorer_via_engine("llama-8b") and not [m for m in p.placements if m.kind == "scorer"]
    assert engine.need > SIZES["llama-8b"].weights(2) and engine.fraction <= 0.9
    assert p.device_of("embedder") == "cuda:0"
    assert_fits(p)


def test_one_80gb_gpu_two_different_8b_models_split_the_device():
    p = plan(run_roles("llama-8b", "other-8b", "llama-8b"), "1x80GiB")
    engines = [m for m in p.placements if m.kind == "engine"]
    assert [(e.spec, e.devices) for e in engines] == [("llama-8b", (0,)), ("other-8b", (0,))]
    assert sum(e.fraction for e in engines) < 0.9  # vLLM refuses a second engine when the shares exceed the GPU
    assert engines[0].fraction == engines[1].fraction  # what is left beyond their needs is split evenly
    assert_fits(p)


def test_two_80gb_gpus_put_the_roles_on_separate_devices():
    p = plan(run_roles("llama-8b", "other-8b", "llama-8b"), "2x80GiB")
    assert p.engine("llama-8b").devices != p.engine("other-8b").devices
    assert p.gpus == 2 and p.engine("other-8b").fraction == 0.9  # alone on its GPU: all but the reserve
    assert_fits(p)


def test_a_70b_model_on_four_gpus_is_tensor_parallel():
    p = plan(run_roles("llama-70b", "llama-70b", "llama-70b"), "4x80GiB")
    engine = p.engine("llama-70b")
    assert engine.tensor_parallel_size == 2 and 64 % engine.tensor_parallel_size == 0
    assert engine.need * 2 > SIZES["llama-70b"].weights(2)  # each GPU holds half the weights and KV cache
    assert_fits(p)
    forced = plan(run_roles("llama-70b", "llama-70b", "llama-70b"), "4x80GiB",
                  engine=EngineConfig(tensor_parallel_size=4))
    assert forced.engine("llama-70b").devices == (0, 1, 2, 3)


def test_an_impossible_plan_names_models_sizes_memory_and_what_to_change():
    with pytest.raises(PlacementError) as caught:
        plan(run_roles("llama-70b", "llama-70b", "llama-70b"), "1x80GiB")
    message = str(caught.value)
    for part in ("llama-70b", "70.55B parameters", "131.4 GiB of weights", "1 × 80.0 GiB", "72.0 GiB usable",
                 "more or larger GPUs", "engine.max_model_len"):
        assert part in message, part


def test_a_transformers_scorer_that_fits_no_gpu_is_refused_when_forced():
    roles = run_roles("llama-8b", "llama-8b", "other-8b")
    with pytest.raises(PlacementError, match="transformers FLR scorer of other-8b needs"):
        plan(roles, "1x80GiB", PlacementSection(flr_scorer="transformers"))
    auto = plan(roles, "2x80GiB")  # its prefix caches (192 rows × 4096 tokens) fit no GPU: an engine scores
    assert auto.scorer_via_engine("other-8b") and auto.engine("other-8b").roles == ("scorer",)


def test_the_embedder_goes_to_cpu_when_no_gpu_has_room_or_when_asked():
    tight = plan(run_roles("llama-8b", "other-8b", "llama-8b"), "1x40GiB")
    assert tight.device_of("embedder") == "cpu" and tight.device_of("scorer") is None
    asked = plan(run_roles("llama-8b", "llama-8b", "llama-8b"), "1x80GiB", PlacementSection(embedder_device="cpu"))
    assert asked.device_of("embedder") == "cpu"


def test_cpu_only_is_todays_behaviour():
    """No GPU: one engine for the chat roles, the transformers scorer and the embedder on CPU, and a host
    given the plan opens exactly what it opens without one."""
    p = plan(run_roles("llama-8b", "llama-8b", "llama-8b"), "cpu")
    assert [(m.kind, m.roles, m.devices, m.fraction) for m in p.placements] == [
        ("engine", ("assistant", "simulator"), (), None), ("scorer", ("scorer",), (), None),
        ("embedder", ("embedder",), (), None)]
    assert not p.scorer_via_engine("llama-8b") and p.device_of("embedder") is None and p.gpus == 0
    engine = EngineConfig(cpu_kv_cache_gib=0.5)
    assert ModelHost(engine, plan=p)._planned("llama-8b") == ModelHost(engine)._planned("llama-8b") == (engine, ())
    assert plan_for(PipelineConfig()).devices == ()  # this machine has no GPU


def test_a_host_gives_each_engine_the_plans_share_and_scores_through_it():
    p = plan(run_roles("llama-8b", "other-8b", "llama-8b"), "2x80GiB")
    fake = SimpleNamespace(name="llama-8b")
    host = ModelHost(EngineConfig(), preloaded={"llama-8b": fake}, plan=p)
    config, devices = host._planned("other-8b")
    assert (config.kv_cache_fraction, config.tensor_parallel_size, devices) == (0.9, 1, (1,))
    assert host.scorer("llama-8b").scorer.engine is fake  # prompt logprobs of the served engine, no second copy


def test_visible_devices_shows_an_engine_only_its_gpus_and_restores_the_environment(monkeypatch):
    from prefmill.serving.engine import visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    with visible_devices((1, 3)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    with visible_devices(()):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_prefmill_plan_prints_the_table_for_a_hypothetical_inventory(tmp_path):
    for name in ("assistant", "simulator"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = ["plan", "--devices", "2x80GiB", "--set", f"models.assistant={tmp_path / 'assistant'}",
            "--set", f"models.simulator={tmp_path / 'simulator'}", "--set", "critiques.enabled=false"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "cuda:0 80 GiB" in lines[0] and "GPUs per host: 2" in lines[0]
    rows = [line for line in lines if "engine" in line]
    assert len(rows) == 2 and "cuda:0" in rows[0] and "cuda:1" in rows[1] and "0.900" in rows[1]
    refused = CliRunner().invoke(app, [*args[:2], "1x16GiB", *args[3:]], env={"COLUMNS": "250"})
    assert refused.exit_code == 2 and "placement impossible" in refused.output


def two_model_run(model_path, tmp_path, *overrides):
    """A tiny run whose simulator is a second materialised copy of the embedded model under its own spec."""
    import shutil

    from prefmill.schemas.config import load_pipeline_config

    simulator = str(shutil.copytree(model_path, tmp_path / "simulator-copy"))
    return simulator, load_pipeline_config(None, [
        "seeds.limit=2", "shard_size=1", "selfchat.max_turns=2", "selfchat.max_tokens_per_turn=24",
        "selfchat.simulator_max_tokens=24", "candidates.n=2", "candidates.max_tokens=24", "critiques.enabled=false",
        f'models.simulator="{simulator}"', f'catalog="{tmp_path / "catalog"}"',
        f'result_storage="{tmp_path / "results"}"', *overrides])


def assert_both_engines_answered(cfg, result, simulator: str) -> None:
    from prefmill.storage.catalog import Catalog

    conversations = Catalog(cfg.catalog).read("conversations").to_pylist()
    assert len(conversations) == 2
    assert {(c["assistant_model"], c["simulator_model"]) for c in conversations} == {("smollm2-135m", simulator)}
    for c in conversations:  # each reached the simulator's engine: its turn was kept, refused by a gate, or ended it
        assert len(c["messages"]) > 2 or c["gates"] or c["ended_by"] == "user_ended", c
    assert result.stages["rollout"].requests > 0 and result.stages["rewards"].requests > 0


@pytest.mark.slow
def test_a_simulator_in_another_model_folder_gets_a_second_engine_in_the_same_host(engine, model_path, tmp_path):
    """Real end to end on CPU: the run's host holds two engines (assistant and simulator) and both answer; the
    CPU plan the host is given changes nothing."""
    from prefmill.flows.pipeline import pipeline_flow
    from prefmill.serving.engine import VLLMEngine
    from prefmill.serving.hosts import LocalPool

    simulator, cfg = two_model_run(model_path, tmp_path)
    plan = plan_for(cfg)
    assert [(p.kind, p.spec) for p in plan.placements if p.kind == "engine"] == [
        ("engine", "smollm2-135m"), ("engine", simulator)]
    host = ModelHost(EngineConfig(cpu_kv_cache_gib=0.25), preloaded={"smollm2-135m": engine}, plan=plan)
    try:
        result = pipeline_flow(pool=LocalPool(host))(cfg.model_dump(mode="json"))
        opened = host._models[simulator]
        assert isinstance(opened, VLLMEngine) and opened is not engine
    finally:
        host.close()
    assert_both_engines_answered(cfg, result, simulator)


@pytest.mark.slow
def test_on_ray_the_actor_holds_both_engines_and_both_answer(make_ray_pool, model_path, tmp_path):
    """The same run on the ray backend: one actor loads the assistant's engine at start and opens the
    simulator's second engine in its own process when the rollout asks for it."""
    from prefmill.flows.pipeline import pipeline_flow
    from prefmill.schemas.config import PoolConfig

    simulator, cfg = two_model_run(model_path, tmp_path, "backend=ray")
    pool = make_ray_pool(PoolConfig(engine=EngineConfig(cpu_kv_cache_gib=0.25), actors=1), plan=plan_for(cfg))
    result = pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))
    assert_both_engines_answered(cfg, result, simulator)


def test_a_run_whose_plan_cannot_fit_fails_before_any_model_loads(monkeypatch, tmp_path):
    from prefmill.flows import pipeline

    class NoPool:
        def run(self, *args):
            raise AssertionError("no model may be used when the plan fails")

    monkeypatch.setattr(pipeline, "plan_for", lambda cfg, stages: plan_for(cfg, "1x1GiB", stages))
    cfg = PipelineConfig(catalog=str(tmp_path / "catalog"), result_storage=str(tmp_path / "results"))
    with pytest.raises(PlacementError, match="GiB"):
        pipeline.run_pipeline(cfg, pool=NoPool())
    assert not (tmp_path / "results").exists()


TWO_GPU_NODES = """
import json
import ray
from ray.cluster_utils import Cluster
from prefmill.serving.ray_pool import cluster_devices

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "include_dashboard": False})
cluster.add_node(num_cpus=1, num_gpus=1)
cluster.wait_for_nodes()
head = cluster.head_node.node_id

@ray.remote(num_gpus=1, num_cpus=0)
def gpu_memory():  # what torch would read there: 80 GiB on the head's GPUs, 40 GiB on the other node's
    return (80 if ray.get_runtime_context().get_node_id() == head else 40) * 2**30

try:
    devices = cluster_devices(cluster.address, gpu_memory)
    print(json.dumps({"head": head[:12], "devices": [[d.index, d.memory // 2**30, d.node] for d in devices]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_cluster_devices_reads_every_gpu_node_of_a_real_two_node_cluster_and_the_plan_fits_the_smallest():
    """Two Ray nodes (Ray's own multi-node test cluster, GPUs declared as resources): every GPU of each node
    comes back with the memory read on that node, and a plan over them sizes every actor for the smaller node
    and counts one actor per GPU on each. Run in its own process, away from the suite's Ray runtime."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's sockets need a short path; its files stay here
    try:
        done = subprocess.run([sys.executable, "-c", TWO_GPU_NODES], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    by_node: dict[str, list] = {}
    for index, gib, node in found["devices"]:
        by_node.setdefault(node, []).append((index, gib))
    assert len(by_node) == 2 and sorted(by_node.pop(found["head"])) == [(0, 80), (1, 80)]
    [(other, gpus)] = by_node.items()
    assert gpus == [(0, 40)]
    devices = tuple(Device(index, gib * 2**30, node) for index, gib, node in found["devices"])
    placed = plan_placement([Role(*r) for r in run_roles("llama-8b", "llama-8b", "llama-8b")], devices,
                            SIZES.__getitem__, EngineConfig(), PlacementSection(), LOAD)
    assert placed.gpus == 1 and placed.actors_per_node() == {found["head"]: 2, other: 1}  # sized for 40 GiB
    assert_fits(placed)


def test_a_ray_plan_puts_the_actors_embedder_on_their_gpu_and_an_http_run_embeds_on_the_drivers_cpu():
    """On ray the plan's devices are the actors' (they embed a big run's dedup); with http only the driver
    embeds, and a driver need not have a GPU."""
    assert plan_for(PipelineConfig(backend="ray"), "1x80GiB").device_of("embedder") == "cuda:0"
    http = PipelineConfig(backend="http", url="http://127.0.0.1:8000/v1")
    assert plan_for(http, "1x80GiB").device_of("embedder") == "cpu"
