"""`export --format trl` and a real TRL training step on what it writes (embedded SmolLM2-135M, CPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import List, Value, load_dataset

from prefmill.flows.training import export_trl, split_prompts
from prefmill.storage.catalog import Catalog, CatalogError
from tests.pair_rows import PROMPTS, publish_pairs

PREFMILL = str(Path(sys.executable).with_name("prefmill"))
MESSAGE_LIST = List({"role": Value("string"), "content": Value("string")})


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog")
    publish_pairs(catalog)
    return catalog


def test_cli_trl_export_loads_with_datasets_in_train_and_test_splits(catalog, tmp_path):
    out = tmp_path / "trl"
    result = subprocess.run([PREFMILL, "export", "pairs", "--format", "trl", "--test-size", "0.34", "--seed", "3",
                             "--output", str(out), "--catalog", str(catalog.root)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train: 8 pairs from 4 prompts" in result.stdout and "test: 4 pairs from 2 prompts" in result.stdout

    splits = load_dataset("parquet", data_dir=str(out))
    assert sorted(splits) == ["test", "train"]
    assert (splits["train"].num_rows, splits["test"].num_rows) == (8, 4)
    features = splits["train"].features
    assert [features[c] for c in ("prompt", "chosen", "rejected")] == [MESSAGE_LIST] * 3
    assert list(features)[:3] == ["prompt", "chosen", "rejected"]
    assert features["margin"] == Value("float64") and features["pair_id"] == Value("string")
    row = splits["train"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    train, test = (set(splits[s]["prompt_id"]) for s in ("train", "test"))
    assert not train & test, "a prompt leaked across splits"
    assert sorted([*splits["train"]["pair_id"], *splits["test"]["pair_id"]]) == sorted(
        catalog.read("pairs").column("pair_id").to_pylist())

    bad = subprocess.run([PREFMILL, "export", "pairs", "--format", "csv", "--output", str(out), "--catalog",
                          str(catalog.root)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "use parquet, jsonl or trl" in bad.stdout


def test_split_is_deterministic_for_a_seed_and_independent_of_row_order():
    ids = [f"prompt-{i}" for i in range(50)]
    first = split_prompts(ids, 0.2, seed=7)
    assert first == split_prompts(list(reversed(ids)) * 2, 0.2, seed=7)
    assert len(first) == 10
    assert len({frozenset(split_prompts(ids, 0.2, seed=s)) for s in range(5)}) > 1
    assert split_prompts(ids, 0.0, seed=7) == set()
    assert len(split_prompts(["a", "b"], 0.9, seed=0)) == 1, "train must keep at least one prompt"


def test_reexport_replaces_old_splits_and_checks_its_arguments(catalog, tmp_path):
    out = tmp_path / "trl"
    first = export_trl(catalog, "pairs", out, test_size=0.5, seed=1)
    assert first.rows == {"train": 6, "test": 6} and first.prompts == {"train": 3, "test": 3}
    again = export_trl(catalog, "pairs", out, test_size=0.5, seed=1)
    assert again == first
    only_train = export_trl(catalog, "pairs", out, test_size=0.0)
    assert only_train.rows == {"train": 2 * len(PROMPTS), "test": 0}
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    assert list(load_dataset("parquet", data_dir=str(out))) == ["train"]
    with pytest.raises(CatalogError, match="test-size"):
        export_trl(catalog, "pairs", out, test_size=1.0)
    with pytest.raises(CatalogError, match="not a pairs table"):
        export_trl(catalog, "critiques", tmp_path / "bad")


def test_default_jsonl_export_still_works(catalog, tmp_path):
    path = catalog.export("pairs", tmp_path / "pairs.jsonl", "jsonl")
    assert load_dataset("json", data_files=str(path))["train"].num_rows == 2 * len(PROMPTS)


def _policy(model_path: str):
    """A fresh float32 copy of the embedded model (these CPUs have no bf16 units)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


def _train_one_step(trainer) -> float:
    """Run one optimizer step; return its loss after checking that some weights moved."""
    import torch

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "no parameter changed after a training step"
    return next(log["loss"] for log in trainer.state.log_history if "loss" in log)


def _common_args(tmp_path: Path) -> dict:
    return dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1, max_length=128,
                learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0)


@pytest.fixture
def one_torch_thread():
    """Train on one intra-op thread: on 2 shared cores, two OpenMP threads spin against other processes
    (measured here under load: one DPO step 23 s wall on one thread, 91 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def exported_train(catalog, tmp_path):
    export_trl(catalog, "pairs", tmp_path / "trl", test_size=0.2, seed=0)
    return load_dataset("parquet", data_dir=str(tmp_path / "trl"))["train"].select(range(2))


@pytest.mark.slow
def test_dpo_step_on_exported_pairs_changes_the_weights(exported_train, model_path, tmp_path, one_torch_thread):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=_policy(model_path), args=DPOConfig(**_common_args(tmp_path)),
                         train_dataset=exported_train, processing_class=AutoTokenizer.from_pretrained(model_path))
    loss = _train_one_step(trainer)
    # the policy starts equal to the reference, so the first sigmoid DPO loss is -log σ(0) = log 2
    assert math.isfinite(loss) and loss == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow
def test_reference_free_simpo_step_on_exported_pairs(exported_train, model_path, tmp_path, one_torch_thread):
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(**_common_args(tmp_path), loss_type="simpo", cpo_alpha=0.0)
    trainer = CPOTrainer(model=_policy(model_path), args=args,
                         train_dataset=exported_train, processing_class=AutoTokenizer.from_pretrained(model_path))
    loss = _train_one_step(trainer)
    assert math.isfinite(loss) and loss > 0
