"""Pydantic configs shared by every layer, and where prefmill keeps its files."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL = "smollm2-135m"


def prefmill_home() -> Path:
    """`$PREFMILL_HOME`, else `~/.cache/prefmill`: models, the default catalog and run state live here."""
    return Path(os.environ.get("PREFMILL_HOME") or Path.home() / ".cache" / "prefmill").expanduser()


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """An advisory lock between processes on `path` (shared or exclusive), released on exit."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EngineConfig(BaseModel):
    """How to start one vLLM engine. `None` fields get the right value for the device (CPU or GPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="model spec the engine serves (`prefmill run` sets it to "
                                                          "models.assistant)")
    dtype: str | None = Field(default=None, description="None: float32 on CPU (no bf16 units here), bfloat16 on GPU")
    max_model_len: int = Field(default=4096, description="context window in tokens; a request whose prompt + "
                                                     "max_tokens exceeds it is answered `prompt_too_long`")
    kv_cache_fraction: float | None = Field(default=None, description="share of GPU memory the engine may take")
    cpu_kv_cache_gib: float = Field(default=1.0, description="KV-cache size on CPU, in GiB")
    cpu_cores: str | None = Field(default=None, description="cores the CPU engine binds, e.g. '0-1'; None: all")
    enforce_eager: bool | None = Field(default=None, description="skip graph compilation; True on CPU")
    tensor_parallel_size: int = Field(default=1, description="GPUs one engine spreads the model over (with backend "
                                                            "ray, set ray.gpus_per_actor to the same)")
    max_num_seqs: int = Field(default=256, description="most sequences in one engine step (the continuous batch)")
    seed: int = Field(default=0, description="the engine's seed (requests carry seeds of their own)")


def settings(operator: type, section: BaseModel) -> dict[str, Any]:
    """The values of `section` that the dataclass `operator` takes, by field name: a config section is its
    operator's settings (the operator's defaults are the section's), so a stage copies nothing by hand."""
    names = {f.name for f in dataclasses.fields(operator)}
    return {name: getattr(section, name) for name in type(section).model_fields if name in names}


def config_hash(config: BaseModel | dict) -> str:
    """A short stable hash of a config, for lineage and resume keys."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A pipeline config that does not validate: the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SeedsSection(_Section):
    """Where the seed questions come from."""

    path: str | None = Field(default=None, description="seed file (.jsonl/.csv/.parquet); None: the built-in set")
    limit: int | None = Field(default=None, ge=1, description="use the first `limit` seeds; None: all")


class ModelsSection(_Section):
    """Model specs (see `prefmill models`); simulator, scorer and critic default to the assistant."""

    assistant: str = Field(default=DEFAULT_MODEL, description="the model whose replies become the pairs")
    simulator: str | None = Field(default=None, description="plays the user in self-chat; None: the assistant")
    scorer: str | None = Field(default=None, description="scores follow-up likelihoods (FLR); None: the assistant")
    critic: str | None = Field(default=None, description="splits, judges and revises claims; None: the assistant")
    judge: str | None = Field(default=None, description="grades replies against a rubric ([judge]) and finds "
                                                       "the first wrong step of a solution (step_dpo.locator = "
                                                       "judge); None: the assistant")
    teacher: str | None = Field(default=None, description="adds one reply per context to the candidates, flagged "
                                                         "is_teacher (DNO); None: no teacher")
    teacher_url: str | None = Field(default=None, description="an OpenAI-compatible server (e.g. `prefmill serve`) "
                                                             "that serves the teacher under its spec, while the "
                                                             "other models run on the run's backend; None: the "
                                                             "teacher runs like the other models")
    embedder: str = Field(default="all-minilm-l6-v2", description="sentence-transformers model for dedup (the "
                                                                  "packaged all-MiniLM-L6-v2, a folder or a hub id)")

    @model_validator(mode="after")
    def _teacher_url_needs_teacher(self) -> ModelsSection:
        if self.teacher_url and not self.teacher:
            raise ValueError("models.teacher_url is set but models.teacher is not: name the model the server "
                             "serves, e.g. models.teacher = 'org/bigger-model'")
        return self

    def resolved(self) -> dict[str, str]:
        """Every role's model spec, defaults filled in (the teacher only when there is one)."""
        teacher = {"teacher": self.teacher} if self.teacher else {}
        return {"assistant": self.assistant, "simulator": self.simulator or self.assistant,
                "scorer": self.scorer or self.assistant, "critic": self.critic or self.assistant,
                "judge": self.judge or self.assistant, "embedder": self.embedder, **teacher}


class SelfChatSection(_Section):
    """User-simulator self-chat: a simulated user and the assistant take turns from each seed question."""

    max_turns: int = Field(default=2, ge=1, description="assistant replies per conversation at most")
    token_budget: int = Field(default=1024, ge=1, description="generated tokens per conversation (both roles) "
                                                              "at most; the conversation ends when spent")
    max_tokens_per_turn: int = Field(default=96, ge=1, description="tokens of one assistant reply at most")
    simulator_max_tokens: int = Field(default=64, ge=1, description="tokens of one simulated-user turn at most")
    temperature: float = Field(default=0.7, ge=0.0, description="sampling temperature of both roles")
    top_p: float = Field(default=0.9, gt=0.0, le=1.0, description="nucleus sampling of both roles")
    seed: int = Field(default=0, description="base sampling seed; each turn and role derives its own from it")


class CandidatesSection(_Section):
    """The candidate replies sampled for each context (the replies pairs are mined from)."""

    n: int = Field(default=4, ge=2, description="replies per context (a pair needs two)")
    temperature: float = Field(default=0.7, ge=0.0, description="sampling temperature of the candidates")
    top_p: float = Field(default=0.9, gt=0.0, le=1.0, description="nucleus sampling of the candidates")
    max_tokens: int = Field(default=96, ge=1, description="tokens of one candidate reply at most")
    seed: int = Field(default=0, description="sample k of a context uses seed + k")
    contexts: Literal["last", "all"] = Field(default="last", description="which prefixes of a conversation get "
                                                                        "candidates: the last user turn, or every "
                                                                        "prefix ending in a user turn")


class FLRSection(_Section):
    """Follow-up likelihood rewards: how likely a satisfied vs a dissatisfied user follow-up is after a reply."""

    aggregation: Literal["mean", "sum"] = Field(default="mean", description="a follow-up's log-likelihood: "
                                                                           "mean per token, or the sum")
    followups: str | None = Field(default=None, description="follow-up set JSON; None: the built-in set")
    max_tokens: int = Field(default=4096, ge=16, description="tokens of one scored sequence (context + reply + "
                                                             "follow-up) at most; a longer context is cut from "
                                                             "the left")
    prefix_batch: int = Field(default=8, ge=1, description="prefixes per scorer forward pass (speed and memory "
                                                           "only: not part of the config hash)")


class CritiquesSection(_Section):
    """Claim-level critiques (FenCE-style): claims judged against evidence, flagged ones revised."""

    enabled: bool = Field(default=True, description="false: no critique stage, pairs ranked by FLR alone")
    rounds: int = Field(default=1, ge=0, le=5, description="revision rounds after the first judgement")
    select: Literal["all", "top_k"] = Field(default="top_k", description="critique every candidate or the "
                                                                         "top_k per context by FLR reward")
    top_k: int = Field(default=2, ge=1, description="candidates per context critiqued (with select = top_k)")
    evidence_k: int = Field(default=2, ge=0, description="passages retrieved from `documents` per claim")
    documents: str | None = Field(default=None, description="folder of .txt/.md passages to retrieve evidence "
                                                            "from (BM25), besides each seed's own documents")
    max_tokens: int = Field(default=256, ge=16, description="tokens of one critic answer at most (claims, verdict "
                                                            "or revision)")
    max_evidence_tokens: int = Field(default=2048, ge=64, description="evidence per claim is narrowed to its "
                                                                      "most relevant passages within this many tokens")
    seed: int = Field(default=0, description="sampling seed of the critic's calls")


JUDGE_ASPECTS = ("helpfulness", "harmlessness", "honesty")  # the built-in rubrics (operators/judge.py)


class JudgeSection(_Section):
    """A rubric judge (Prometheus 2-style absolute grading): feedback then a 1-5 score per reply and aspect."""

    enabled: bool = Field(default=False, description="true: models.judge grades every self-chat candidate (critique "
                                                     "revisions included) into the judgements table")
    rubric_file: str | None = Field(default=None, description="JSON or TOML file of rubrics ({aspect: {criteria, "
                                                              "score1_description … score5_description}}) that "
                                                              "override or add to the built-in ones")
    aspects: list[str] = Field(default=list(JUDGE_ASPECTS), min_length=1, description="rubrics each reply is "
                                                                                      "graded on (built-in: "
                                                                                      "helpfulness, harmlessness, "
                                                                                      "honesty)")
    use_reference: bool = Field(default=True, description="show the seed's reference_answer as the score-5 "
                                                          "reference when the context is the seed question alone")
    max_tokens: int = Field(default=256, ge=16, description="tokens of one judge answer (feedback + score) at most")
    temperature: float = Field(default=0.0, ge=0.0, description="sampling temperature of the judge")
    seed: int = Field(default=0, description="sampling seed of the judge's calls")


class PairsSection(_Section):
    """Pair mining: composite scores per context and the chosen/rejected strategy."""

    strategy: Literal["best_worst", "best_vs_random_lower", "all_above_margin"] = Field(
        default="best_worst", description="best_worst: best vs worst per context; best_vs_random_lower: best vs a "
                                          "random lower-scored reply; all_above_margin: every pair over min_margin, "
                                          "largest margins first")
    flr_weight: float = Field(default=1.0, ge=0.0, description="weight of the FLR reward in the composite score")
    factuality_weight: float = Field(default=1.0, ge=0.0, description="ignored (0) when critiques are off")
    judge_weight: float = Field(default=0.0, ge=0.0, description="weight of the rubric judge's score ([judge]); "
                                                                 "0: the judge, when on, is recorded only")
    normalization: str = Field(default="pooled", description="pooled: centred per context, scaled by the run's "
                                                             "pooled spread; context: a z-score per context; none")
    min_margin: float = Field(default=0.25, ge=0.0, description="a context whose best margin is lower gives no "
                                                                "pair (a pair_rejects row)")
    max_pairs_per_context: int = Field(default=3, ge=1, description="pairs per context at most "
                                                                   "(all_above_margin)")
    seed: int = Field(default=0, description="seeds the random lower reply of best_vs_random_lower, per context")


DedupOn = Literal["pair", "prompt"]


class DedupSection(_Section):
    """Exact and embedding dedup of new pairs against each other and every published pair."""

    threshold: float = Field(default=0.9, gt=0.0, le=1.0, description="cosine similarity of two prompts that "
                                                                      "counts as a duplicate")
    reply_threshold: float = Field(default=0.85, gt=0.0, le=1.0,
                                   description="cosine similarity of two chosen replies that counts as a "
                                               "duplicate (with dedup.on = pair); an edited or reordered reply "
                                               "sits lower than a reworded prompt")
    neighbors: int = Field(default=16, ge=1, description="nearest neighbours searched per pair in the index")
    on: DedupOn = Field(default="pair", description="pair: a duplicate has a similar prompt and a similar chosen "
                                                    "reply; prompt: a similar prompt alone, whatever it answers")
    actor_embed_min_pairs: int = Field(default=2000, ge=0,
                                       description="with backend ray, a run that mined at least this many pairs "
                                                   "embeds them for dedup on its Ray actors, in chunks at once "
                                                   "(a resumed run starts them for it); fewer pairs embed in the "
                                                   "driver process on CPU. Backend engine embeds in the run's "
                                                   "process on the placement's embedder device, http on CPU")


class SourcesSection(_Section):
    """Where a run's pairs come from; several sources publish into the one pairs dataset (its `source` column)."""

    selfchat: bool = Field(default=True, description="self-chat candidates ranked by FLR and claim critiques")
    irpo: bool = Field(default=False, description="verifier-graded reasoning: correct vs wrong solutions of seeds "
                                                  "with a final_answer (IRPO)")
    step_dpo: bool = Field(default=False, description="first-wrong-step pairs from IRPO's wrong solutions "
                                                      "(Step-DPO); needs irpo")
    spin: bool = Field(default=False, description="the seed's reference_answer vs the policy's own reply (SPIN)")
    refuel: bool = Field(default=False, description="branched multi-turn rollouts: two futures of one self-chat "
                                                    "prefix, ranked by their summed per-turn rewards (REFUEL); "
                                                    "needs selfchat")


SOLVE_INSTRUCTION = ("Solve the problem step by step. Write each step on its own line, then end with a last line "
                     "of the form \"Final answer: <answer>\".")


class IRPOSection(_Section):
    """Verifier-graded reasoning pairs (IRPO): N solutions per question, checked against its final_answer."""

    samples: int = Field(default=8, ge=2, description="chain-of-thought solutions sampled per question")
    max_pairs: int = Field(default=4, ge=1, description="pairs per question at most (each solution in one pair)")
    temperature: float = Field(default=0.8, ge=0.0, description="sampling temperature of the solutions")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="nucleus sampling of the solutions")
    max_tokens: int = Field(default=256, ge=1, description="tokens of one solution at most")
    seed: int = Field(default=0, description="solution k of a question uses seed + k")
    instruction: str = Field(default=SOLVE_INSTRUCTION, description="appended to each question; must ask for a "
                                                                    "last line 'Final answer: …'")
    numeric_tolerance: float = Field(default=1e-6, ge=0.0, description="relative tolerance of answer_type "
                                                                       "numeric")


class StepDPOSection(_Section):
    """First-wrong-step pairs (Step-DPO) from IRPO's wrong solutions: locate the step, resample it."""

    locator: Literal["rollouts", "judge"] = Field(default="rollouts", description="rollouts: Math-Shepherd-style "
                                                  "continuations from each step prefix, checked by the verifier; "
                                                  "judge: models.judge reads the seed's gold_solution (rollouts "
                                                  "when it has none or the answer does not parse)")
    solutions_per_question: int = Field(default=2, ge=1, description="wrong solutions examined per question")
    rollouts: int = Field(default=4, ge=1, description="continuations sampled from each step prefix")
    max_rollouts: int = Field(default=32, ge=1, description="rollout budget per solution (prefixes probed = "
                                                            "max_rollouts // rollouts)")
    wrong_rate: float = Field(default=0.0, ge=0.0, lt=1.0, description="a step is wrong when at most this share "
                                                                       "of the continuations after it verify")
    rectify_samples: int = Field(default=8, ge=1, description="continuations sampled from the prefix before the "
                                                              "wrong step to find a verified rectification")
    temperature: float = Field(default=0.8, ge=0.0, description="sampling temperature of rollouts and "
                                                                "rectifications")
    max_tokens: int = Field(default=256, ge=1, description="tokens of one continuation at most")
    seed: int = Field(default=0, description="base sampling seed of rollouts and rectifications")


class SPINSection(_Section):
    """Gold-vs-own pairs (SPIN): the seed's reference_answer against the policy's own reply."""

    temperature: float = Field(default=1.0, ge=0.0, description="sampling temperature of the policy's reply")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling of the policy's reply")
    max_tokens: int = Field(default=256, ge=1, description="tokens of the policy's reply at most")
    seed: int = Field(default=0, description="sampling seed of the policy's replies")


class BranchingSection(_Section):
    """Branched rollouts (REFUEL, with sources.refuel): a self-chat conversation's future resampled from one of
    its turns, the two futures scored turn by turn (FLR, or the rubric judge)."""

    turns: Literal["uniform", "every"] = Field(default="uniform", description="where a conversation branches: one "
                                                                              "assistant turn picked uniformly at "
                                                                              "random (seeded per conversation), or "
                                                                              "every assistant turn")
    margin: float = Field(default=0.1, ge=0.0, description="two futures whose summed turn rewards differ by less "
                                                           "give no pair (a pair_rejects row)")
    seed_offset: int = Field(default=100_003, ge=1, description="a branch samples every turn with the self-chat "
                                                                "seed of that turn plus this offset")
    seed: int = Field(default=0, description="seeds the choice of the branch turn (turns = uniform)")
    reward: Literal["flr", "judge"] = Field(default="flr", description="what scores each assistant turn: flr (the "
                                                                       "scorer model), or judge: models.judge "
                                                                       "grades it on the [judge] rubrics (mean "
                                                                       "over judge.aspects, 1-5)")


class RaySection(_Section):
    """The Ray actor pool of `backend = "ray"`: each actor holds the run's models."""

    address: str | None = Field(default=None, description="a Ray cluster to join; None: a local runtime")
    actors: int = Field(default=1, ge=1, description="model actors (each loads the models once per run)")
    cpus_per_actor: float = Field(default=1.0, gt=0.0, description="CPUs Ray reserves for each actor")
    gpus_per_actor: float = Field(default=0.0, ge=0.0, description="GPUs Ray reserves for each actor (1: one actor "
                                                                   "per GPU)")
    steps_per_actor: int = Field(default=4, ge=1, description="shard steps an actor runs at once; their requests "
                                                              "share its engine's continuous batch")


class PlacementSection(_Section):
    """How a run's models share GPUs (`prefmill plan` prints the plan); on a machine without GPUs nothing changes."""

    reserve_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="share of every GPU kept free (CUDA "
                                                                             "context, NCCL buffers, fragmentation; "
                                                                             "vLLM's own default leaves 0.1)")
    activation_gib: float = Field(default=2.0, ge=0.0, description="GPU memory per model for its forward passes "
                                                                   "(vLLM's profile run and CUDA graphs, a scorer's "
                                                                   "or the embedder's batch), besides weights and "
                                                                   "KV cache")
    flr_scorer: Literal["auto", "engine", "transformers"] = Field(
        default="auto", description="on GPU, how FLR scores: engine (vLLM prompt logprobs, no second copy of the "
                                    "weights), transformers (prefix-shared scorer), auto: the engine when one "
                                    "serves the scorer's spec or the transformers scorer fits no GPU. CPU: always "
                                    "transformers")
    embedder_device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: a GPU with room "
                                                                                        "left, else CPU")


class PoolConfig(RaySection):
    """A pool of Ray actors, each hosting the run's models: the `[ray]` settings plus what each actor loads."""

    engine: EngineConfig = EngineConfig()
    prefix_batch: int = Field(default=FLRSection().prefix_batch, ge=1, description="prefixes per FLR scorer "
                                                                                   "forward pass on an actor")


class PipelineConfig(_Section):
    """Everything one pipeline run depends on; its canonical hash goes into every version's lineage."""

    seeds: SeedsSection = SeedsSection()
    models: ModelsSection = ModelsSection()
    selfchat: SelfChatSection = SelfChatSection()
    candidates: CandidatesSection = CandidatesSection()
    flr: FLRSection = FLRSection()
    critiques: CritiquesSection = CritiquesSection()
    judge: JudgeSection = JudgeSection()
    pairs: PairsSection = PairsSection()
    dedup: DedupSection = DedupSection()
    sources: SourcesSection = SourcesSection()
    irpo: IRPOSection = IRPOSection()
    step_dpo: StepDPOSection = StepDPOSection()
    spin: SPINSection = SPINSection()
    branching: BranchingSection = BranchingSection()
    iteration: int = Field(default=0, ge=0, description="the round of an iterative method (SPIN/IRPO): recorded "
                                                        "in every pair with the policy model's identity")
    dataset: str = Field(default="pairs", pattern=r"^[a-z][a-z0-9_]{0,40}$", description="name of the pairs dataset")
    shard_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto", description="seeds per shard (the unit of fan-out and resume); auto: 4 for small runs, "
                                    "growing with the seeds up to 64 while every actor keeps 4 shards to balance "
                                    "(each stage task costs ~18 ms of orchestration: see the benchmarks page)")
    backend: Literal["engine", "ray", "http"] = Field(default="engine", description="where the model work runs: "
                                                                                   "engine in process, ray on Ray "
                                                                                   "actors, http on a server at url")
    url: str | None = Field(default=None, description="OpenAI-compatible server (backend http)")
    ray: RaySection = RaySection()
    placement: PlacementSection = PlacementSection()
    engine: EngineConfig = EngineConfig()
    catalog: str | None = Field(default=None, description="catalog folder, or a PostgreSQL target (postgres:…); "
                                                          "None: $PREFMILL_HOME/catalog")
    result_storage: str | None = Field(default=None, description="where shard results persist (resume); "
                                                                 "None: $PREFMILL_HOME/results")
    run_id: str | None = Field(default=None, description="the id in lineage and pair rows; None: a hash of the "
                                                         "config, the seeds and (deployments) the scheduled time")

    @model_validator(mode="after")
    def _http_needs_url(self) -> PipelineConfig:
        if self.backend == "http" and not self.url:
            raise ValueError("backend 'http' needs url (an OpenAI-compatible server): set url = "
                             "'http://127.0.0.1:8000/v1' or --set url=http://127.0.0.1:8000/v1")
        return self

    @model_validator(mode="after")
    def _sources_make_pairs(self) -> PipelineConfig:
        if not any(self.sources.model_dump().values()):
            raise ValueError("sources: every source is off; turn one on, e.g. sources.selfchat = true")
        if self.sources.step_dpo and not self.sources.irpo:
            raise ValueError("sources.step_dpo needs sources.irpo = true: it starts from IRPO's wrong solutions")
        if self.sources.refuel and not self.sources.selfchat:
            raise ValueError("sources.refuel needs sources.selfchat = true: it branches self-chat conversations")
        return self

    @model_validator(mode="after")
    def _judge_weight_needs_judge(self) -> PipelineConfig:
        if self.pairs.judge_weight and not self.judge.enabled:
            raise ValueError(f"pairs.judge_weight = {self.pairs.judge_weight} needs judge.enabled = true (no reply "
                             "would have a judge score): turn the judge on, or set pairs.judge_weight = 0")
        return self

    def fingerprint(self) -> str:
        """The hash of everything that shapes the data (not where it is stored or which backend runs it)."""
        return config_hash(self.model_dump(mode="json", exclude=_NOT_HASHED))

    def results_path(self) -> Path:
        return Path(self.result_storage).expanduser() if self.result_storage else prefmill_home() / "results"


_PLACEMENT = {"backend", "url", "ray", "placement", "catalog", "result_storage", "run_id"}
_NOT_HASHED = ({key: True for key in _PLACEMENT}  # where and how fast, not what
               | {"flr": {"prefix_batch"}, "models": {"teacher_url"}, "dedup": {"actor_embed_min_pairs"}})


def load_pipeline_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """A `PipelineConfig` from a TOML file (optional) plus `key.sub=value` overrides; raises ConfigError."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return validate_pipeline_config(data)


def validate_pipeline_config(data: dict) -> PipelineConfig:
    """Validate a config dict, turning pydantic's errors into one message per bad key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid config:\n" + "\n".join(_lines(exc.errors()))) from None


_UNION_TAG = re.compile(r"^(constrained-\w+|literal\[.*\]|int|str|float|bool|none)$")  # pydantic's union members


def _lines(errors: list[dict]) -> list[str]:
    """One line per bad key: pydantic's union-member tags leave the key, and what each member of a union
    (`int | "auto"`) asks for is said on that one line."""
    by_key: dict[tuple, list[dict]] = {}
    for error in errors:
        union_member = error["type"] != "extra_forbidden" and len(error["loc"]) > 1
        loc = tuple(p for p in error["loc"] if not (union_member and _UNION_TAG.match(str(p))))
        by_key.setdefault(loc, []).append(error | {"loc": loc})
    return [_describe(first) + (f" (or: {'; '.join(e['msg'] for e in rest)})" if rest else "")
            for first, *rest in by_key.values()]


def parse_override(item: str) -> tuple[str, object]:
    """`a.b=value` → ("a.b", value); the value is read as a TOML value (number, bool, string, array) and
    falls back to the plain string, so `--set models.assistant=org/name` needs no quotes."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. selfchat.max_turns=2), got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    node[last] = value


_HINTS = {"string_pattern_mismatch": "use lowercase letters, digits and '_', starting with a letter"}


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if not key:
        return f"  {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key (value {error['input']!r}){_did_you_mean(error['loc'])}"
    hint = _HINTS.get(error["type"])
    return f"  {key} = {error['input']!r}: {error['msg']}{'; ' + hint if hint else ''}"


def _did_you_mean(loc: tuple) -> str:
    """'; did you mean …?' with the closest known keys of the section the unknown key sits in."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=2, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    names = [f"{prefix}.{k}" if prefix else k for k in close]
    return f"; did you mean {' or '.join(names)}?" if names else f"; known keys: {', '.join(known)}"
