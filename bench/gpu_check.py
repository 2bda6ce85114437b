"""What a GPU machine can check without vLLM: the prefix-shared FLR scorer and the embedder on CUDA, with
randomly initialised models built from realistic configs (Llama-3-8B, all-MiniLM-L6-v2 shapes), so no weights
are needed. Reports prefixes/s and texts/s, and each one's peak GPU memory against the placement plan's
estimate for the same load (`serving/placement.py`). `--tiny`: tiny configs on CPU (what the test runs).

    python bench/gpu_check.py --tokenizer TOKENIZER_FOLDER       # on a GPU (prefmill installed --no-deps)
    python bench/gpu_check.py --tiny                             # CPU smoke run, ~10 s

The tokenizer (default: the embedded model's) only turns text into ids below the model's vocabulary; the
weights are random, so scores mean nothing and only speed and memory count. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefmill.schemas.config import EngineConfig, PlacementSection  # noqa: E402
from prefmill.serving.placement import Device, GiB, Role, ScorerLoad, plan_placement, size_from_config  # noqa: E402

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
MINILM = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "intermediate_size": 1536,
          "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 512}
TINY = {"scorer": {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
        "embedder": {**MINILM, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2}}
FULL = {"scorer": LLAMA3_8B, "embedder": MINILM}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke test)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the embedded model's)")
    parser.add_argument("--prefixes", type=int, default=64, help="prefixes scored")
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="tokens of each prefix")
    parser.add_argument("--followups", type=int, default=24, help="continuations scored after each prefix")
    parser.add_argument("--prefix-batch", type=int, default=8, help="prefixes per scorer forward pass")
    parser.add_argument("--texts", type=int, default=4096, help="texts embedded")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prefixes, args.prefix_tokens, args.followups, args.prefix_batch, args.texts = 8, 64, 4, 4, 64
    return args


def words(n: int, salt: int) -> str:
    """About `n` tokens of varied plain text."""
    vocabulary = "the model answers a question about rivers cities numbers history light water stone".split()
    return " ".join(vocabulary[(salt * 7 + i * 3) % len(vocabulary)] for i in range(n))


def random_model(config: dict, tokenizer, kind: str):
    """A randomly initialised transformers model of `config`'s shape, its vocabulary made to cover the
    tokenizer's ids."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    shape = {**config, "vocab_size": max(config["vocab_size"], len(tokenizer))}
    model_type = shape.pop("model_type")
    built = AutoConfig.for_model(model_type, **shape)
    return (AutoModelForCausalLM if kind == "scorer" else AutoModel).from_config(built)


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / GiB, 3) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def planned_gib(role: Role, config: dict, load: ScorerLoad, memory: int) -> float:
    """The plan's estimate for this one model on a GPU of `memory` bytes: what it needs there."""
    section = PlacementSection(flr_scorer="transformers", embedder_device="cuda")
    plan = plan_placement([role], (Device(0, memory),), lambda _: size_from_config(config), EngineConfig(),
                          section, load)
    return round(plan.placements[0].need / GiB, 3)


def scorer_check(args, config: dict, tokenizer, device: str, memory: int) -> dict:
    """Prefixes/s of the prefix-shared scorer on `args.prefixes` prefixes × `args.followups` follow-ups."""
    from prefmill.serving.prefix_scorer import SharedPrefixScorer

    reset_peak(device)
    scorer = SharedPrefixScorer("random-llama", device, prefix_batch=args.prefix_batch,
                                loaded=(random_model(config, tokenizer, "scorer"), tokenizer))
    prefixes = [[{"role": "user", "content": words(args.prefix_tokens // 2, i)},
                 {"role": "assistant", "content": words(args.prefix_tokens // 2, i + 1)}] for i in range(args.prefixes)]
    followups = [{"role": "user", "content": words(12, k)} for k in range(args.followups)]
    scorer.score_continuations(prefixes[:1], followups)  # warm-up (kernels, allocator)
    started = time.perf_counter()
    scored = scorer.score_continuations(prefixes, followups)
    seconds = time.perf_counter() - started
    assert len(scored) == args.prefixes and all(len(s.logprobs) == args.followups for s in scored)
    load = ScorerLoad(args.prefix_batch * args.followups, args.prefix_tokens + 64, 16)
    return {"prefixes_per_s": round(args.prefixes / seconds, 2), "seconds": round(seconds, 3),
            "peak_gib": peak_gib(device), "plan_gib": planned_gib(Role("scorer", "s", "scorer"), config, load, memory)}


def embedder_check(args, config: dict, tokenizer, device: str, memory: int) -> dict:
    """Texts/s of `SentenceTransformerEmbedder` on a random BERT saved with the tokenizer to a temp folder."""
    from prefmill.serving.embedder import SentenceTransformerEmbedder

    reset_peak(device)
    with tempfile.TemporaryDirectory() as folder:
        random_model(config, tokenizer, "embedder").save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        embedder = SentenceTransformerEmbedder(folder, device=device)
        texts = [words(24 + i % 40, i) for i in range(args.texts)]
        embedder.embed(texts[:8])
        started = time.perf_counter()
        vectors = embedder.embed(texts)
        seconds = time.perf_counter() - started
    assert vectors.shape == (args.texts, config["hidden_size"])
    plan = planned_gib(Role("embedder", "e", "embedder"), config, ScorerLoad(1, 1), memory)
    return {"texts_per_s": round(args.texts / seconds, 1), "seconds": round(seconds, 3), "peak_gib": peak_gib(device),
            "plan_gib": plan}


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from prefmill.serving.models import EMBEDDED, resolve_model

    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():  # `make bench` on a CPU machine: say so, do not fail
        result = {"device": None, "skipped": "no CUDA device: run with --tiny for the CPU smoke run"}
        print(json.dumps(result))
        return result
    device = "cpu" if args.tiny else "cuda"
    memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 80 * GiB
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model(EMBEDDED))
    configs = TINY if args.tiny else FULL
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "tiny": args.tiny,
              "scorer": scorer_check(args, configs["scorer"], tokenizer, device, memory),
              "embedder": embedder_check(args, configs["embedder"], tokenizer, device, memory)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
