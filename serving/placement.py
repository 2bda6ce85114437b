"""The placement plan: which engines a run opens, on which GPUs, and what share of each GPU every model gets,
computed from the models' `config.json` before anything loads (so planning needs no weights and no GPU).

The rule, per GPU: each model's weights (its shard of them under tensor parallelism) + `activation_gib` for
its forward passes, each engine's KV cache for at least one full context (`engine.max_model_len` tokens), the
transformers FLR scorer's working memory (its repeated prefix caches and continuation logits), and
`reserve_gib` must fit; what is left goes to the engines' KV caches, split evenly. The FLR scorer goes
through an engine's prompt logprobs when an engine on that GPU serves its spec (no second copy of the
weights). On a machine without GPUs the plan changes nothing: every model runs as it always did on CPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from prefmill.schemas.config import EngineConfig, PlacementSection

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GPU_DTYPE = "bfloat16"  # what engines and the prefix scorer load on a GPU unless engine.dtype says otherwise
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet"}  # no output head: the embeddings count once
UNGATED_MLP = ENCODERS | {"gpt2", "gpt_neox", "opt"}
_DEVICES = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+(?:\.\d+)?)\s*(GiB|GB)\s*$", re.IGNORECASE)


class PlacementError(ValueError):
    """A run whose models cannot fit the devices: the message names the models, their sizes and the devices."""


@dataclass(frozen=True)
class Device:
    """One GPU: its index among the devices a host sees, its memory in bytes, and its node (Ray)."""

    index: int
    memory: int
    node: str = "local"


@dataclass(frozen=True)
class Role:
    """A model a run needs: the role's name, its spec, and how it is used (chat, scorer or embedder)."""

    name: str
    spec: str
    kind: str


@dataclass(frozen=True)
class ModelSize:
    """What placement needs to know of a model, read from its config: parameters, and the per-token KV cache
    and vocabulary that size its working memory."""

    parameters: int
    kv_per_token: int  # bytes per token at 2 bytes per value (K and V, every layer)
    vocab: int
    heads: int
    source: str  # "safetensors index" or "architecture"
    stored_bytes: int | None = None  # the weight index's total size, when there is one

    def weights(self, dtype_bytes: int) -> int:
        """Bytes of the weights at `dtype_bytes` per parameter (the index's own size at its own dtype)."""
        return self.stored_bytes if self.stored_bytes and dtype_bytes == 2 else self.parameters * dtype_bytes


@dataclass(frozen=True)
class ScorerLoad:
    """The transformers FLR scorer's batch: rows = prefixes per pass × follow-ups, each prefix up to
    `max_tokens`, each follow-up up to `continuation_tokens`."""

    rows: int
    max_tokens: int
    continuation_tokens: int = 64


@dataclass(frozen=True)
class Placement:
    """One model of the plan: an engine (for its chat roles, and the scorer role when it scores), the
    transformers scorer, or the embedder; `devices` empty means CPU."""

    kind: str  # "engine" | "scorer" | "embedder"
    spec: str
    roles: tuple[str, ...]
    devices: tuple[int, ...] = ()
    need: int = 0  # bytes per device it cannot start without
    memory: int = 0  # bytes per device it may take (an engine: need + its share of what is left)
    fraction: float | None = None  # an engine's gpu_memory_utilization
    scores: bool = False  # an engine that also serves the FLR scorer (prompt logprobs)
    optional: bool = False  # goes to CPU when no GPU has room (the embedder with embedder_device = auto)
    note: str = ""

    @property
    def tensor_parallel_size(self) -> int:
        return max(len(self.devices), 1)

    def device_name(self) -> str:
        return ",".join(f"cuda:{d}" for d in self.devices) or "cpu"


@dataclass(frozen=True)
class Plan:
    """Where every model of a run goes. `devices` empty: a CPU-only plan, today's behaviour exactly."""

    devices: tuple[Device, ...]
    placements: tuple[Placement, ...]
    sizes: dict[str, ModelSize] = field(default_factory=dict)

    def engine(self, spec: str) -> Placement | None:
        return next((p for p in self.placements if p.kind == "engine" and p.spec == spec), None)

    def scorer_via_engine(self, spec: str) -> bool:
        """True when the FLR scorer of `spec` reads an engine's prompt logprobs instead of loading a copy."""
        engine = self.engine(spec)
        return engine is not None and engine.scores

    def device_of(self, kind: str, spec: str | None = None) -> str | None:
        """The torch device of the scorer or embedder ("cuda:k", "cpu"); None when the plan has no say (CPU)."""
        if not self.devices:
            return None
        found = next((p for p in self.placements if p.kind == kind and spec in (None, p.spec)), None)
        return found.device_name() if found else None

    @property
    def gpus(self) -> int:
        """GPUs one host of this plan uses (a Ray actor reserves that many)."""
        return len({d for p in self.placements for d in p.devices})

    def actors_per_node(self) -> dict[str, int]:
        """How many hosts of this plan each node holds (Ray places one actor per host)."""
        nodes: dict[str, int] = {}
        for device in self.devices:
            nodes[device.node] = nodes.get(device.node, 0) + 1
        return {node: (count // self.gpus if self.gpus else 0) for node, count in nodes.items()}

    def summary(self) -> dict:
        """The plan as plain data, for the run summary and lineage."""
        return {"devices": [{"index": d.index, "memory_gib": round(d.memory / GiB, 1), "node": d.node}
                            for d in self.devices],
                "gpus_per_host": self.gpus, "actors_per_node": self.actors_per_node(),
                "models": [_placement_row(p) for p in self.placements]}


def _placement_row(p: Placement) -> dict:
    return {"kind": p.kind, "spec": p.spec, "roles": list(p.roles), "device": p.device_name(),
            "tensor_parallel_size": p.tensor_parallel_size, "need_gib": round(p.need / GiB, 2),
            "memory_gib": round(p.memory / GiB, 2), "fraction": p.fraction, "note": p.note}


def parse_devices(text: str, node: str = "local") -> tuple[Device, ...]:
    """A hypothetical inventory, "2x80GiB" (or "4x80GB"); "0" or "cpu" for none."""
    if text.strip().lower() in {"", "0", "cpu", "none"}:
        return ()
    match = _DEVICES.match(text)
    if not match:
        raise PlacementError(f"--devices {text!r}: write COUNTxMEMORY, e.g. 2x80GiB or 8x40GB (or cpu for none)")
    count, amount, unit = int(match[1]), float(match[2]), match[3].lower()
    memory = int(amount * (GiB if unit == "gib" else 10**9))
    return tuple(Device(i, memory, node) for i in range(count))


def cuda_devices() -> tuple[Device, ...]:
    """This machine's GPUs as torch sees them (none on a CPU-only machine)."""
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(Device(i, torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count()))


def read_model_size(model: str | Path | dict) -> ModelSize:
    """A model's size from a config dict or a folder holding config.json (and maybe a safetensors index)."""
    if isinstance(model, dict):
        return size_from_config(model)
    folder = Path(model)
    config = json.loads((folder / "config.json").read_text())
    index = folder / "model.safetensors.index.json"
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.exists() else None
    return size_from_config(config, total)


def size_from_config(config: dict, stored_bytes: int | None = None) -> ModelSize:
    """Parameters from the architecture (embeddings, attention with grouped KV heads, the MLP, norms, an
    untied output head), KV bytes per token, vocabulary and heads."""
    c = config.get("text_config", config)
    hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    experts = c.get("num_local_experts") or c.get("num_experts") or 1
    mlp = (2 if c.get("model_type") in UNGATED_MLP else 3) * hidden * c.get("intermediate_size", 4 * hidden)
    layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + experts * mlp + 2 * hidden
    tied = c.get("tie_word_embeddings", c.get("model_type") in ENCODERS)
    embeddings = c["vocab_size"] * hidden * (1 if tied else 2)
    parameters = layers * layer + embeddings + hidden
    return ModelSize(parameters, 2 * layers * kv_heads * head_dim * 2, c["vocab_size"], heads,
                     "safetensors index" if stored_bytes else "architecture", stored_bytes)


def plan_placement(roles: Iterable[Role], devices: tuple[Device, ...], size: Callable[[str], ModelSize],
                   engine: EngineConfig, section: PlacementSection, load: ScorerLoad) -> Plan:
    """Place `roles` on `devices` (see the module docstring for the rule); raises PlacementError when they
    cannot fit. Without devices: one CPU engine per chat spec, the transformers scorer, the embedder on CPU."""
    roles = list(roles)
    if not devices:
        return Plan((), tuple(_cpu_placements(roles)))
    sizes = {spec: size(spec) for spec in dict.fromkeys(r.spec for r in roles)}
    budget = _Budget(host_devices(devices), sizes, engine, section, load)
    wanted = budget.models(roles)
    placed = _pack(wanted, budget)
    return Plan(devices, tuple(_with_shares(placed, budget)), sizes)


def host_devices(devices: tuple[Device, ...]) -> tuple[Device, ...]:
    """The GPUs one host of the plan may use, numbered from 0: those of the node with the fewest (the
    smallest memory breaking ties), so the plan fits every node a Ray actor may land on."""
    nodes: dict[str, list[Device]] = {}
    for device in devices:
        nodes.setdefault(device.node, []).append(device)
    smallest = min(nodes.values(), key=lambda ds: (len(ds), min(d.memory for d in ds)))
    return tuple(Device(i, d.memory, d.node) for i, d in enumerate(smallest))


def model_size(location: str) -> ModelSize:
    """The size of a resolved model (a folder, or a hub id whose config.json comes from the Hugging Face
    cache or hub: the config only, never the weights)."""
    if Path(location).is_dir():
        return read_model_size(location)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    config = json.loads(Path(hf_hub_download(location, "config.json")).read_text())
    try:
        index = json.loads(Path(hf_hub_download(location, "model.safetensors.index.json")).read_text())
    except EntryNotFoundError:  # a single-file model: its size comes from the architecture
        index = {}
    return size_from_config(config, index.get("metadata", {}).get("total_size"))


def _cpu_placements(roles: list[Role]) -> list[Placement]:
    """Today's CPU layout: one engine per chat spec, a transformers scorer per scorer spec, the embedder."""
    kinds = {"chat": "engine", "scorer": "scorer", "embedder": "embedder"}
    grouped: dict[tuple[str, str], list[str]] = {}
    for role in roles:
        grouped.setdefault((kinds[role.kind], role.spec), []).append(role.name)
    return [Placement(kind, spec, tuple(names)) for (kind, spec), names in grouped.items()]


@dataclass
class _Budget:
    """The memory arithmetic of one plan: what each model needs per GPU."""

    devices: tuple[Device, ...]
    sizes: dict[str, ModelSize]
    engine: EngineConfig
    section: PlacementSection
    load: ScorerLoad

    @property
    def usable(self) -> int:
        """What a GPU offers after the reserve (the smallest GPU: a plan must fit whichever it lands on)."""
        return int(min(d.memory for d in self.devices) * (1 - self.section.reserve_fraction))

    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.engine.dtype or GPU_DTYPE]

    def activation(self) -> int:
        return int(self.section.activation_gib * GiB)

    def engine_need(self, spec: str, tp: int) -> int:
        """Per GPU: a 1/tp shard of the weights and of one full context's KV cache, plus activations."""
        size = self.sizes[spec]
        kv = size.kv_per_token * self.dtype_bytes() // 2 * self.engine.max_model_len
        return math.ceil((size.weights(self.dtype_bytes()) + kv) / tp) + self.activation()

    def scorer_need(self, spec: str) -> int:
        """The transformers scorer: its own bf16 weights, every row's prefix cache and continuation logits."""
        size, load = self.sizes[spec], self.load
        caches = load.rows * load.max_tokens * size.kv_per_token
        logits = load.rows * load.continuation_tokens * size.vocab * 2
        return size.weights(2) + caches + logits + self.activation()

    def embedder_need(self, spec: str) -> int:
        return self.sizes[spec].weights(4) + self.activation()  # sentence-transformers loads float32

    def tensor_parallel(self, spec: str) -> int:
        """The engine's tensor_parallel_size: the config's when set above 1, else the fewest GPUs (a power of
        two dividing the attention heads, as vLLM requires) whose shards fit one GPU each."""
        if self.engine.tensor_parallel_size > 1:
            return self.engine.tensor_parallel_size
        tp = 1
        while tp <= len(self.devices):
            if self.sizes[spec].heads % tp == 0 and self.engine_need(spec, tp) <= self.usable:
                return tp
            tp *= 2
        raise PlacementError(self.refusal(f"engine {spec} does not fit even spread over all "
                                          f"{len(self.devices)} GPUs"))

    def models(self, roles: list[Role]) -> list[Placement]:
        """The engines (one per chat spec), then the scorer (through an engine when one serves its spec and
        the config allows, else transformers, or an engine of its own when its working memory fits no GPU),
        then the embedder, each with its need per GPU."""
        engines: dict[str, list[str]] = {}
        for role in roles:
            if role.kind == "chat":
                engines.setdefault(role.spec, []).append(role.name)
        scoring: set[str] = set()
        others: list[Placement] = []
        for role in roles:
            if role.kind == "scorer":
                others += self._scorer(role, engines, scoring)
            elif role.kind == "embedder":
                others += self._embedder(role)
        return [self._engine(spec, names, spec in scoring) for spec, names in engines.items()] + others

    def _engine(self, spec: str, names: list[str], scores: bool) -> Placement:
        tp = self.tensor_parallel(spec)
        note = "FLR scorer through its prompt logprobs" if scores else ""
        return Placement("engine", spec, tuple(dict.fromkeys(names)), tuple(range(tp)), self.engine_need(spec, tp),
                         scores=scores, note=note)

    def _scorer(self, role: Role, engines: dict[str, list[str]], scoring: set[str]) -> list[Placement]:
        """Through the engine of its spec (the role joins that engine, opened for it if need be), or a
        transformers scorer of its own."""
        mode = self.section.flr_scorer
        fits = self.scorer_need(role.spec) <= self.usable
        if mode == "transformers" and not fits:
            raise PlacementError(self.refusal(f"the transformers FLR scorer of {role.spec} needs "
                                              f"{_gib(self.scorer_need(role.spec))} on one GPU"))
        if mode == "engine" or (mode == "auto" and (role.spec in engines or not fits)):
            engines.setdefault(role.spec, []).append(role.name)
            scoring.add(role.spec)
            return []
        return [Placement("scorer", role.spec, (role.name,), (0,), self.scorer_need(role.spec),
                          note="transformers, prefix-shared")]

    def _embedder(self, role: Role) -> list[Placement]:
        if self.section.embedder_device == "cpu":
            return [Placement("embedder", role.spec, (role.name,))]
        return [Placement("embedder", role.spec, (role.name,), (0,), self.embedder_need(role.spec),
                          optional=self.section.embedder_device == "auto")]

    def refusal(self, what: str) -> str:
        """An impossible plan's message: what does not fit, every model's size, the GPUs, what to change."""
        models = "; ".join(f"{spec}: {self.sizes[spec].parameters / 1e9:.2f}B parameters, "
                           f"{_gib(self.sizes[spec].weights(self.dtype_bytes()))} of weights "
                           f"(from its {self.sizes[spec].source})" for spec in self.sizes)
        return (f"placement impossible: {what}. GPUs: {len(self.devices)} × {_gib(self.devices[0].memory)} "
                f"({_gib(self.usable)} usable each after placement.reserve_fraction). Models: {models}. Change: more "
                "or larger GPUs, smaller models (or one model for several roles), a smaller engine.max_model_len, "
                "placement.flr_scorer = 'engine', placement.embedder_device = 'cpu', or engine.dtype.")


def _pack(wanted: list[Placement], budget: _Budget) -> list[Placement]:
    """Assign devices: multi-GPU engines first, then the rest largest first, each onto the GPUs with the most
    free memory (so roles spread over GPUs); an optional model (the embedder) that fits nowhere goes to CPU."""
    free = {d.index: budget.usable for d in budget.devices}
    placed: list[Placement] = []
    for p in sorted(wanted, key=lambda p: (-p.tensor_parallel_size, -p.need)):
        if not p.devices:
            placed.append(p)
            continue
        chosen = sorted(free, key=lambda d: (-free[d], d))[:p.tensor_parallel_size]
        if any(free[d] < p.need for d in chosen):
            if p.optional:
                placed.append(Placement(p.kind, p.spec, p.roles, note="no GPU room left: CPU"))
                continue
            raise PlacementError(budget.refusal(f"{p.kind} {p.spec} ({', '.join(p.roles)}) needs {_gib(p.need)} "
                                                f"per GPU and the most any GPU has left is "
                                                f"{_gib(max(free[d] for d in chosen))}"))
        for d in chosen:
            free[d] -= p.need
        placed.append(replace(p, devices=tuple(sorted(chosen)), memory=p.need))
    return placed


def _with_shares(placed: list[Placement], budget: _Budget) -> list[Placement]:
    """Give each engine its need plus an even share of what is left on its GPUs (a multi-GPU engine the
    smallest share over its GPUs), as a fraction of the GPU for vLLM's gpu_memory_utilization."""
    left = {d.index: budget.usable for d in budget.devices}
    engines_on = {d.index: 0 for d in budget.devices}
    for p in placed:
        for d in p.devices:
            left[d] -= p.need
            engines_on[d] += p.kind == "engine"
    memory = {d.index: d.memory for d in budget.devices}
    return [_shared(p, left, engines_on, memory) if p.kind == "engine" else p for p in placed]


def _shared(p: Placement, left: dict, engines_on: dict, memory: dict) -> Placement:
    total = p.need + min(left[d] // engines_on[d] for d in p.devices)
    fraction = math.floor(total / min(memory[d] for d in p.devices) * 1000) / 1000
    return replace(p, memory=total, fraction=fraction)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"
