"""How close does each direction search of `hf_collapse.msw` get to the max-sliced direction, on real hidden states?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/msw_directions.py --out outputs/msw_directions.json

For every layer of MiniLM-L6 (Rotten Tomatoes sentences, 16 per batch) and of SmolLM2-135M (Shakespeare,
4 blocks of 128 tokens per batch), the (input, output) token clouds of each batch are compared along
the direction each search returns, and the result is divided by a long search's value on the same
clouds: the best of 4096 random directions, then 50 power-iteration steps (keeping the best value
seen) from each of the 16 best. Reported per search: the median over layers of (MSW estimate /
long-search MSW), averaged over batches, on the last batch, and for the worst layer; and the median
time of one search call. Searches that remember directions (`keep_directions=True`) see the batches in
order, one `DirectionSearch` per method shared by all layers (keyed by layer), as in training.

Calls of the different searches are interleaved (the order rotates with every layer and batch) and
run on one thread: timings are comparable with each other, not with a multi-threaded run. The
models and data are the offline assets of `hf_collapse.assets` (SmolLM2 is the dequantised Q4_1 copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_collapse import assets
from hf_collapse.layers import LayerCapture
from hf_collapse.msw import DirectionSearch, random_directions, sliced_w2_squared


@dataclass(frozen=True)
class Method:
    mode: str
    num_projections: int
    refine_steps: int
    keep_directions: bool
    search_tokens: int = 512  # the DirectionSearch default: the clouds here have at most 512 tokens

    @property
    def name(self) -> str:
        steps = f", {self.refine_steps} step{'s' * (self.refine_steps != 1)}" if self.mode == "refine" else ""
        memory = ", kept" if self.keep_directions else ""
        subset = f", search on {self.search_tokens} tokens" if self.search_tokens < 512 else ""
        return f"{self.mode} k={self.num_projections}{steps}{memory}{subset}"


METHODS = (
    Method("random", 16, 0, False),
    Method("random", 64, 0, False),
    Method("random", 256, 0, False),
    Method("refine", 64, 1, False),
    Method("refine", 64, 3, False),
    Method("refine", 64, 5, False),
    Method("random", 64, 0, True),
    Method("refine", 16, 3, True),
    Method("refine", 16, 2, True),
    Method("refine", 16, 2, True, 256),
    Method("refine", 16, 3, True, 256),
    Method("refine", 64, 1, True),
    Method("refine", 64, 3, True),
    Method("refine", 64, 5, True),
)
BASELINE = Method("random", 64, 0, False)  # what the paper's code does (POT uses 50 directions)


@torch.no_grad()
def long_search(
    x: torch.Tensor, y: torch.Tensor, *, num_random: int, num_starts: int, steps: int, generator: torch.Generator
) -> float:
    """Squared W2 along the best direction found by a long search (random screening, then power iteration)."""
    candidates = random_directions(x.shape[1], num_random, generator=generator)
    values = sliced_w2_squared(x, y, candidates)
    top = torch.topk(values, num_starts)
    theta = candidates[:, top.indices]  # (d, starts)
    best = top.values.clone()
    for _ in range(steps):
        # One step of theta <- D^T D theta for all starts at once, with D the rank-paired differences
        # x[ix] - y[iy]. D theta is the difference of the sorted projections; D^T v is formed by sending
        # v back to each point's original position, which avoids materialising D (n x starts x d).
        sorted_x, ix = torch.sort(x @ theta, dim=0)
        sorted_y, iy = torch.sort(y @ theta, dim=0)
        gap = sorted_x - sorted_y  # (n, starts)
        theta = x.T @ torch.zeros_like(gap).scatter_(0, ix, gap) - y.T @ torch.zeros_like(gap).scatter_(0, iy, gap)
        theta = theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-12)
        best = torch.maximum(best, sliced_w2_squared(x, y, theta))
    return float(best.max())


def minilm_batches(num_batches: int, batch_size: int):
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = assets.rotten_tomatoes(max_train=num_batches * batch_size)["train"]["text"]
    batches = [
        tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        for i in range(0, len(texts), batch_size)
    ]
    return model, batches


def smollm2_batches(num_batches: int, batch_size: int, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    blocks = assets.shakespeare_lm(tokenizer, block_size=128)["train"].shuffle(seed=seed)
    blocks = blocks.select(range(num_batches * batch_size))
    batches = [
        {key: torch.tensor(blocks[i : i + batch_size][key]) for key in ("input_ids", "attention_mask")}
        for i in range(0, len(blocks), batch_size)
    ]
    return model, batches


def run_model(model, batches, methods, args) -> dict:
    """Run every search on every layer of every batch; return per-method summaries and raw ratios."""
    clouds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(stack, index, tokens_in, tokens_out):
        clouds[index] = (tokens_in.detach().float().clone(), tokens_out.detach().float().clone())

    searches = [
        DirectionSearch(
            m.num_projections,
            mode=m.mode,
            refine_steps=m.refine_steps,
            keep_directions=m.keep_directions,
            search_tokens=m.search_tokens,
            seed=args.seed,
        )
        for m in methods
    ]
    reference_generator = torch.Generator().manual_seed(args.seed + 1)
    ratios = [[] for _ in methods]  # per method: one list per batch of per-layer ratios
    times = [[] for _ in methods]
    forward_times, cloud_sizes = [], []
    with LayerCapture(model, keep) as capture:
        for batch_index, batch in enumerate(batches):
            clouds.clear()
            start = time.perf_counter()
            with torch.no_grad(), capture.armed(batch):
                model(**batch)
            forward_times.append(time.perf_counter() - start)
            for ratio_list in ratios:
                ratio_list.append([])
            for layer, (x, y) in sorted(clouds.items()):
                cloud_sizes.append(x.shape[0])
                reference = long_search(
                    x, y, num_random=args.reference_directions, num_starts=args.reference_starts,
                    steps=args.reference_steps, generator=reference_generator,
                )
                shift = (batch_index * len(clouds) + layer) % len(methods)
                for m in [*range(shift, len(methods)), *range(shift)]:
                    start = time.perf_counter()
                    theta = searches[m](x, y, key=layer)
                    times[m].append(time.perf_counter() - start)
                    estimate = float(sliced_w2_squared(x, y, theta[:, None])[0])
                    ratios[m][-1].append((estimate / reference) ** 0.5)

    num_layers = len(ratios[0][0])
    rows = []
    for method, per_batch, method_times in zip(methods, ratios, times):
        per_layer_mean = [statistics.fmean(b[layer] for b in per_batch) for layer in range(num_layers)]
        rows.append(
            {
                "method": method.name,
                **asdict(method),
                "ratio_median_over_layers": statistics.median(per_layer_mean),
                "ratio_last_batch_median_over_layers": statistics.median(per_batch[-1]),
                "ratio_worst_layer": min(per_layer_mean),
                "ratio_max_any_call": max(max(b) for b in per_batch),
                "ms_per_call_median": 1000 * statistics.median(method_times),
                "ratios_per_batch_per_layer": per_batch,
            }
        )
    baseline_ms = next(r["ms_per_call_median"] for r in rows if r["method"] == BASELINE.name)
    for row in rows:
        row["time_vs_random_64"] = row["ms_per_call_median"] / baseline_ms
    return {
        "layers": num_layers,
        "batches": len(batches),
        "tokens_per_cloud_median": statistics.median(cloud_sizes),
        "hidden_size": next(iter(clouds.values()))[0].shape[1],
        "forward_ms_median": 1000 * statistics.median(forward_times),
        "methods": rows,
    }


def markdown_table(name: str, result: dict) -> str:
    lines = [
        f"### {name}: {result['layers']} layers, d={result['hidden_size']}, "
        f"{result['tokens_per_cloud_median']:.0f} tokens per cloud (median), {result['batches']} batches; "
        f"no-grad forward {result['forward_ms_median']:.0f} ms",
        "",
        "| search | MSW / long search (median over layers) | last batch | worst layer "
        "| ms per call | time vs random k=64 | all layers, ms per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["methods"]:
        lines.append(
            f"| {row['method']} | {row['ratio_median_over_layers']:.3f} "
            f"| {row['ratio_last_batch_median_over_layers']:.3f} "
            f"| {row['ratio_worst_layer']:.3f} | {row['ms_per_call_median']:.2f} | {row['time_vs_random_64']:.1f}x "
            f"| {row['ms_per_call_median'] * result['layers']:.0f} |"
        )
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=("minilm", "smollm2"), default=["minilm", "smollm2"])
    parser.add_argument("--minilm-batches", type=int, default=8, help="batches of 16 Rotten Tomatoes sentences")
    parser.add_argument("--smollm2-batches", type=int, default=6, help="batches of 4 Shakespeare blocks of 128 tokens")
    parser.add_argument(
        "--reference-directions", type=int, default=4096, help="random directions screened by the long search"
    )
    parser.add_argument("--reference-starts", type=int, default=16, help="best directions refined by the long search")
    parser.add_argument(
        "--reference-steps", type=int, default=50, help="power-iteration steps per start in the long search"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/msw_directions.json"), help="where to write the JSON results"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    loaders = {
        "minilm": ("MiniLM-L6 (Rotten Tomatoes)", lambda: minilm_batches(args.minilm_batches, 16)),
        "smollm2": (
            "SmolLM2-135M, dequantised Q4_1 (Shakespeare)",
            lambda: smollm2_batches(args.smollm2_batches, 4, args.seed),
        ),
    }
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "models": {}}
    for key in args.models:
        title, load = loaders[key]
        model, batches = load()
        result = run_model(model, batches, METHODS, args)
        results["models"][key] = {"title": title, **result}
        print(markdown_table(title, result), end="\n\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
