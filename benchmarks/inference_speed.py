"""Does a collapsed model's inference time track the ideal? Measured speed-up against the ratio of analytic FLOPs.

Requirement: measured speed-up >= 0.95 x the ratio of per-token FLOPs (full / collapsed), for prefill and for
decode (SmolLM2-135M, 8 of 30 layers removed) and for batch classification (MiniLM-L6, 2 of 6 layers removed).

Each model is loaded twice from the offline assets; one copy is collapsed with `collapse_layers` (which layers
does not matter for speed). The two copies are timed interleaved (a, b, b, a, ...) on the same inputs and
compared by their medians:

- classification: one forward of a batch of Rotten Tomatoes snippets, padded to the longest of the batch;
- prefill: generation's first step on a Shakespeare prompt (fresh KV cache, logits of the last position only);
- decode: greedy generation with the KV cache after that prompt, time per generated token after the first.

The FLOPs ratio comes from `flops_per_token` at the context each mode sees; for prefill the output head runs
once per sequence, not once per token, and is counted so. Fp32 on CPU, one thread by default: on the 2-core
development machine two threads per process were at times 3-4x slower because of contention outside it.

    OMP_NUM_THREADS=1 python benchmarks/inference_speed.py
    OMP_NUM_THREADS=1 python benchmarks/inference_speed.py --models smollm2 --repeats 30 --out outputs/speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from hf_collapse import assets
from hf_collapse.evaluation import compare_latency
from hf_collapse.layers import find_layer_stacks, unwrap_model
from hf_collapse.surgery import collapse_layers

TARGET = 0.95  # measured speed-up / FLOPs ratio the requirement asks for


def flops_per_token(model: nn.Module, *, context_length: float = 0.0, output_head: bool = True) -> float:
    """Analytic forward FLOPs for one token, for comparing a model with its collapsed version.

    `FLOPs = 2 * (W_layers + W_head) + 4 * L * context_length * A`, where `W_layers` counts every weight of the
    transformer blocks (a token meets each once, as one multiply-add), `W_head` the output projection to the
    vocabulary (counted even when tied to the input embeddings, since the token is multiplied by it), `L` the
    number of blocks and `A` the attention width (heads * head dim): the second term is the query-key scores and
    the weighted sum of values over `context_length` positions. Left out: embedding look-ups, norms and
    activations (no matrix product), heads applied once per sequence (pooler, classifier), sliding windows.
    For an encoder-decoder model the blocks of both stacks are counted (one encoder and one decoder token).

    For a causal prefill of `n` tokens the mean context is `(n + 1) / 2`; for decoding at position `p` it is
    `p + 1`; for a bidirectional encoder over `n` tokens it is `n`. A generation prefill computes the output
    head for the last position only: count it as `n * flops_per_token(model, context_length=(n + 1) / 2,
    output_head=False)` plus the head once.

    Args:
        model (`nn.Module`): a transformers model (wrappers are looked through).
        context_length (`float`, defaults to 0): the number of positions each token attends to; 0 leaves the
            attention term out.
        output_head (`bool`, defaults to `True`): count the output projection (`get_output_embeddings()`).

    Returns:
        `float`: FLOPs per token.

    Raises:
        `ValueError`: a mixture-of-experts model (a token meets only some experts' weights), or a negative
            `context_length`.
    """
    if context_length < 0:
        raise ValueError(f"context_length must be 0 or more, got {context_length}")
    inner = unwrap_model(model)
    stacks = find_layer_stacks(inner)
    for stack in stacks:
        experts = getattr(stack.config, "num_experts_per_tok", None)
        if experts:
            raise ValueError(
                f"{type(inner).__name__} is a mixture-of-experts model (num_experts_per_tok={experts}): a token "
                "meets only some experts' weights, which flops_per_token does not model"
            )
    weights = sum(p.numel() for stack in stacks for p in stack.layers.parameters())
    head = inner.get_output_embeddings() if output_head else None
    if head is not None:
        weights += head.weight.numel()
    attention = sum(4 * len(stack) * context_length * _attention_width(stack.config) for stack in stacks)
    return 2.0 * weights + attention


def _attention_width(config) -> int:
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["minilm", "smollm2"], default=["minilm", "smollm2"])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per model and mode (interleaved)")
    parser.add_argument("--decode-repeats", type=int, default=10, help="timed generate calls per model for decode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model and mode first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    parser.add_argument("--minilm-drop", type=int, nargs="+", default=[2, 3], help="0-based MiniLM layers to remove")
    parser.add_argument("--classify-batch", type=int, default=32, help="snippets per classification batch")
    parser.add_argument(
        "--smollm2-drop", type=int, nargs="+", default=list(range(20, 28)), help="0-based SmolLM2 layers to remove"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill and decode")
    parser.add_argument("--lm-batch", type=int, default=1, help="prompts per prefill/decode batch")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run")
    parser.add_argument("--out", default="outputs/inference_speed.json", help="where to write the JSON results")
    return parser


def _row(name: str, comparison, flops_ratio: float, **details) -> dict:
    speedup = comparison.speedup
    return {
        "mode": name,
        "median_full_ms": comparison.a.median_ms,
        "median_collapsed_ms": comparison.b.median_ms,
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "speedup_over_flops_ratio": speedup / flops_ratio,
        "meets_target": speedup / flops_ratio >= TARGET,
        "details": details,
        "timings": comparison.to_dict(),
    }


def bench_minilm(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    collapsed = copy.deepcopy(full)
    collapse_layers(collapsed, args.minilm_drop)
    texts = list(assets.rotten_tomatoes(max_test=args.classify_batch)["test"]["text"])
    batch = dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
    length = batch["input_ids"].shape[1]
    # Every padded position is computed and attended to, so the context of a token is the padded length.
    ratio = flops_per_token(full, context_length=length) / flops_per_token(collapsed, context_length=length)
    comparison = compare_latency(full, collapsed, batch, mode="forward", repeats=args.repeats, warmup=args.warmup)
    details = dict(
        model="all-MiniLM-L6-v2 (+ random 2-label head)",
        dtype=str(full.dtype),
        layers=f"{full.config.num_hidden_layers} -> {collapsed.config.num_hidden_layers}",
        dropped=args.minilm_drop,
        batch=list(batch["input_ids"].shape),
    )
    return [_row(f"classification MiniLM ({args.classify_batch} x {length} tokens)", comparison, ratio, **details)]


def _prefill_flops(model, tokens: int) -> float:
    head = flops_per_token(model) - flops_per_token(model, output_head=False)
    return tokens * flops_per_token(model, context_length=(tokens + 1) / 2, output_head=False) + head


def bench_smollm2(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = AutoModelForCausalLM.from_pretrained(path).eval()
    collapsed = copy.deepcopy(full)
    collapse_layers(collapsed, args.smollm2_drop)
    blocks = assets.shakespeare_lm(
        tokenizer, block_size=args.prompt_tokens, max_train=0, max_validation=args.lm_batch
    )["validation"]
    batch = {key: torch.tensor(blocks[key]) for key in ("input_ids", "attention_mask")}
    details = dict(
        model="SmolLM2-135M-Instruct (dequantised Q4_1)",
        dtype=str(full.dtype),
        layers=f"{full.config.num_hidden_layers} -> {collapsed.config.num_hidden_layers}",
        dropped=args.smollm2_drop,
        batch=list(batch["input_ids"].shape),
    )
    n = args.prompt_tokens
    rows = []

    prefill = compare_latency(full, collapsed, batch, mode="prefill", repeats=args.repeats, warmup=args.warmup)
    rows.append(
        _row(f"prefill SmolLM2 ({args.lm_batch} x {n} tokens)", prefill, _prefill_flops(full, n) / _prefill_flops(collapsed, n), **details)
    )

    # The timed steps feed tokens at positions n .. n + new_tokens - 2: on average n + new_tokens / 2 keys.
    context = n + args.new_tokens / 2
    decode = compare_latency(
        full, collapsed, batch, mode="decode", repeats=args.decode_repeats, warmup=1, new_tokens=args.new_tokens
    )
    ratio = flops_per_token(full, context_length=context) / flops_per_token(collapsed, context_length=context)
    rows.append(
        _row(f"decode SmolLM2 ({args.lm_batch} x {args.new_tokens} new tokens, ms/token)", decode, ratio, **details, new_tokens=args.new_tokens)
    )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | median full (ms) | median collapsed (ms) | measured speed-up | FLOPs ratio | speed-up / FLOPs ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        verdict = "" if row["meets_target"] else f" (< {TARGET})"
        lines.append(
            f"| {row['mode']} | {row['median_full_ms']:.1f} | {row['median_collapsed_ms']:.1f} | "
            f"{row['speedup']:.3f} | {row['flops_ratio']:.3f} | {row['speedup_over_flops_ratio']:.3f}{verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    if "minilm" in args.models:
        rows += bench_minilm(args)
    if "smollm2" in args.models:
        rows += bench_smollm2(args)
    result = {
        "rows": rows,
        "target": TARGET,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "decode_repeats": args.decode_repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.platform(),
        "seconds": time.perf_counter() - start,
    }
    print(markdown(rows))
    print(f"\n{torch.get_num_threads()} thread(s), {platform.machine()}; {result['seconds']:.0f} s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
