"""The CLI smoke commands, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

PREFMILL = str(Path(sys.executable).with_name("prefmill"))


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFMILL, *args], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "250", **(env or {})}, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_models_lists_the_embedded_default_and_where_it_lives(model_path):
    out = run("models").stdout
    assert "smollm2-135m" in out and "yes" in out
    assert model_path in out


@pytest.mark.slow
def test_chat_answers_with_the_real_model(model_path):
    out = run("chat", "What color is the sky on a clear day?", "--n", "2", "--max-tokens", "24", "--seed", "3").stdout
    assert out.count("reply ") == 2
    assert "tokens" in out


def test_chat_with_a_bad_model_spec_fails_clearly():
    result = run("chat", "hi", "--model", "./no-such-folder", check=False)
    assert result.returncode == 2
    assert "neither an embedded model" in result.stdout


def test_sql_datasets_and_export_commands(tmp_path):
    from prefmill.storage.catalog import Catalog
    from tests.test_storage import pairs

    catalog = tmp_path / "catalog"
    v1 = Catalog(catalog).publish(pairs(2), "pairs", {"run_id": "cli"})
    Catalog(catalog).publish(pairs(1, offset=5), "pairs")
    listing = run("datasets", "--catalog", str(catalog)).stdout
    assert "pairs" in listing and "3" in listing

    as_json = run("sql", f"SELECT pair_id FROM pairs AT (VERSION => {v1.version}) ORDER BY 1", "--format", "json",
                  "--catalog", str(catalog)).stdout
    assert [json.loads(line)["pair_id"] for line in as_json.splitlines()] == ["p0", "p1"]
    csv = run("sql", "SELECT count(*) AS n FROM pairs", "--format", "csv", "--catalog", str(catalog)).stdout
    assert csv.split() == ['"n"', "3"]
    nested = run("sql", "SELECT pair_id, chosen FROM pairs ORDER BY 1 LIMIT 1", "--format", "csv",
                 "--catalog", str(catalog)).stdout
    assert '"[{""role"": ""assistant"", ""content"": ""4""}]"' in nested
    shown = run("sql", "SHOW TABLES", "--format", "json", "--catalog", str(catalog)).stdout
    assert "pairs" in shown
    out = tmp_path / "pairs.parquet"
    run("sql", "SELECT * FROM pairs", "--format", "parquet", "--output", str(out), "--catalog", str(catalog))
    assert pq.read_table(out).num_rows == 3

    refused = run("sql", "DROP TABLE pairs", "--catalog", str(catalog), check=False)
    assert refused.returncode == 2 and "read-only" in refused.stdout
    bad = run("sql", "SELECT nope FROM pairs", "--catalog", str(catalog), check=False)
    assert bad.returncode == 2 and "nope" in bad.stdout

    exported = tmp_path / "export.jsonl"
    run("export", "pairs", "--format", "jsonl", "--output", str(exported), "--catalog", str(catalog))
    assert len(exported.read_text().splitlines()) == 3


def test_run_with_an_invalid_config_fails_before_anything_starts(tmp_path):
    started = time.monotonic()
    result = run("run", "--set", "candidates.n=1", "--set", "backend=tpu", "--catalog", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "candidates.n = 1: Input should be greater than or equal to 2" in result.stdout
    assert "backend = 'tpu'" in result.stdout
    assert time.monotonic() - started < 60 and not (tmp_path / "meta.ducklake").exists()


def test_run_against_a_prefect_api_that_is_down_fails_in_one_line_before_anything_starts(tmp_path):
    from tests.test_flow_deploy import free_port

    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    started = time.monotonic()
    result = run("run", "--catalog", str(tmp_path / "catalog"), check=False,
                 env={"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect")})
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2
    assert out.splitlines() == [f"error: no Prefect API answers at {api} (ConnectError: [Errno 111] Connection "
                                "refused); start it (prefect server start), fix PREFECT_API_URL, or unset "
                                "PREFECT_API_URL to run with a temporary API"], out[-3000:]
    assert time.monotonic() - started < 60 and not (tmp_path / "catalog").exists()


def test_run_refuses_a_summary_file_it_could_not_write_before_anything_starts(tmp_path):
    started = time.monotonic()
    summary = tmp_path / "missing" / "summary.json"
    result = run("run", "--catalog", str(tmp_path / "catalog"), "--summary-json", str(summary), check=False)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [f"error: --summary-json {summary}: not a file in a folder that "
                                                  "exists and can be written"], result.stdout + result.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "catalog").exists()


def test_the_summary_json_is_the_stage_table_counts_and_versions_as_plain_data():
    import pyarrow as pa

    from prefmill.flows.report import summary_dict
    from prefmill.flows.results import RunResult, StageStats

    stats = StageStats(shards=2, cached=1, seconds=3.0, requests=5, tokens=40, spans=[(0.0, 2.0)])
    result = RunResult("r1", "c1", stages={"rollout": stats}, tables={"pairs": pa.table({"x": [1, 2]})},
                       versions={"pairs": 3}, wall_seconds=9.87, stage_wall={"rollout": 2.5, "publish": 0.31},
                       embedding={"on": "actors", "texts": 4, "seconds": 0.5})
    assert json.loads(json.dumps(summary_dict(result, "pairs"))) == {
        "run_id": "r1", "config_hash": "c1", "already_published": False,
        "stages": {"rollout": {"shards": 2, "cached": 1, "compute_s": 3.0, "wall_s": 2.5, "requests": 5,
                               "tokens": 40, "tokens_per_s": 20.0}},
        "step_wall_s": {"rollout": 2.5, "publish": 0.3},
        "dedup_embedding": {"on": "actors", "texts": 4, "seconds": 0.5},
        "counts": {"pairs": 2}, "versions": {"pairs": 3}, "placement": {}, "wall_s": 9.9}


@pytest.mark.parametrize("configured", ["http://LOCALHOST:80/api", "http://localhost/api/"])
def test_a_connection_error_is_recognised_as_the_prefect_apis_however_its_url_is_written(configured):
    """httpx writes a request's URL lower-cased and without a default port; PREFECT_API_URL may not be."""
    import httpx

    from prefmill.flows.runner import api_connection_error

    def refused(url: str) -> httpx.ConnectError:
        return httpx.ConnectError("[Errno 111] Connection refused", request=httpx.Request("POST", url))

    assert api_connection_error(refused("http://localhost/api/flow_runs/filter"), configured) is not None
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = refused("http://localhost/api/artifacts/")
    assert api_connection_error(wrapped, configured) is wrapped.__cause__
    assert api_connection_error(refused("http://localhost/apix/flow_runs"), configured) is None
    assert api_connection_error(refused("http://127.0.0.1:8000/v1/completions"), configured) is None  # the http backend


@pytest.mark.slow
def test_run_shows_progress_and_a_summary_without_engine_logs(tmp_path, model_path):
    from prefmill.storage.catalog import Catalog

    catalog = tmp_path / "catalog"
    result = run("run", "--set", "seeds.limit=1", "--set", "selfchat.max_turns=1", "--set", "candidates.n=2",
                 "--set", "candidates.max_tokens=32", "--set", "selfchat.max_tokens_per_turn=32",
                 "--set", "critiques.enabled=false", "--set", f'result_storage="{tmp_path / "results"}"',
                 "--catalog", str(catalog), "--summary-json", str(tmp_path / "summary.json"))
    out = result.stdout + result.stderr
    assert "self-chat + candidates" in out and "FLR rewards" in out
    assert "prefmill sql" in out and "tok/s" in out
    assert " INFO " not in out and "Traceback" not in out
    pairs = Catalog(catalog).versions("pairs")[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run_id"] == pairs.lineage["run_id"] and summary["versions"]["pairs"] == pairs.version
    assert list(summary["stages"]) == ["rollout", "rewards"] and summary["counts"]["pairs"] == pairs.row_count
    assert summary["stages"]["rollout"]["tokens"] > 0 and not summary["already_published"]
