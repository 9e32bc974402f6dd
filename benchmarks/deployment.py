"""Deployment study: collapsed exports run in llama.cpp (GGUF) and ONNX Runtime, checked against transformers and timed.

llama.cpp: SmolLM2-135M (offline asset; 30 → 22 layers, layers 20–27 removed) and a tiny random Gemma-3 (6 → 5
layers, layer 2 removed; SmolLM2's tokenizer), and the same at Gemma-3 27B's shape (62 → 61 layers; llama.cpp takes
the query scale from the layer count), are exported by `hf-collapse collapse`, converted by llama.cpp's own
`convert_hf_to_gguf.py` and run by its runtime (`llama-cpp-python`). Parity: f32 GGUF, f32 KV cache, one thread;
the largest logit difference to transformers over a prompt, the argmax agreement, and greedy generation token for
token. The collapsed Gemma-3 files run with and without `hf-collapse gguf-metadata` (the window pattern; at the
27B shape, the query scale folded into the query norms). Speed (SmolLM2, full vs collapsed):
prompt and generation tokens/s with 1 thread, f16 and Q4_0 (llama.cpp's quantize API), repeats interleaved, medians;
the speed-up is set against the ideal FLOP ratio (`benchmarks.inference_speed.flops_per_token`). Gemma-3's gap:
`gelu_study` runs transformers with llama.cpp's CPU GELU emulated (`GgmlGelu`: ggml's fp16 table) in float32 and
float64 and sets llama.cpp's logits against both (the transformers side runs with `--quick` too).

ONNX Runtime: all-MiniLM-L6-v2 (offline asset; 6 → 4 layers, layers 2–3 removed) exported with `torch.onnx.export`
from this environment (optimum-onnx pins transformers < 4.58); outputs against transformers, and the speed-up at
batch 1 × 64 tokens (1 thread, interleaved medians) against the ideal FLOP ratio.

    python -m benchmarks.deployment --llama-cpp-dir PATH/vendor/llama.cpp   # ~10 min on one core
    python -m benchmarks.deployment --quick                                  # CI: plan, exports, references

`PATH` is the unpacked `llama-cpp-python` source package (`pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36`), whose `vendor/llama.cpp` holds the converter and `gguf-py`; the runtime is the wheel
built from the same package. `--quick` needs neither runtime: it makes the exports, the transformers references and
the FLOP ratios on tiny models, checks what each export needs in llama.cpp, and runs a runtime only if it is installed.
Results go to `benchmarks/records/deployment/results.json` (`outputs/benchmarks/deployment-quick` with --quick);
the full run replaces its section of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks.inference_speed import flops_per_token
from benchmarks.outputs import default_output, default_work
from benchmarks.sections import OWNED_SECTIONS, publish_section
from hf_collapse import assets
from hf_collapse.cli import main as hf_collapse
from hf_collapse.gguf_meta import llama_cpp_fit

SECTION_BEGIN, SECTION_END = next(pair for pair in OWNED_SECTIONS if pair[0].startswith("<!-- deployment:"))
RESULTS_MD = Path("benchmarks/RESULTS.md")
PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships that passed far "
    "out at sea never knew his name, but they trusted the light that he kept burning through every storm."
)


def tiny_gemma3(folder: Path, tokenizer, layers: int = 6, head_dim: int = 16) -> Path:
    """A random Gemma-3 with SmolLM2's tokenizer (the converter needs a tokenizer it knows): window 8, every 6th
    layer global, query_pre_attn_scalar hidden / heads = 16 as in Gemma-3 27B. With head_dim 16 that is also
    llama.cpp's query scale at any layer count; with another head_dim, llama.cpp uses it only at 62 layers (27B)."""
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, query_pre_attn_scalar=16, sliding_window=8,
        max_position_embeddings=256, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    transformers.Gemma3ForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assets.write_portable_tokenizer_class(folder)
    return folder


def make_exports(work: Path, quick: bool) -> dict[str, dict]:
    """The full and collapsed folders of each model: name → {"full", "collapsed", "removed"}."""
    smollm2 = assets.smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    cases = {"gemma3": (tiny_gemma3(work / "gemma3-full", tokenizer), [2])}
    if not quick:
        cases["smollm2"] = (smollm2, list(range(20, 28)))
        # Gemma-3 27B's shape (62 layers, head_dim ≠ hidden / heads), its last layer removed: the window period holds
        cases["gemma3-27b-shape"] = (tiny_gemma3(work / "gemma3-27b-shape-full", tokenizer, 62, head_dim=32), [61])
    cases["minilm"] = (assets.minilm_path(), [2, 3])
    exports = {}
    for name, (full, removed) in cases.items():
        collapsed = work / f"{name}-collapsed"
        if not (collapsed / "config.json").is_file():
            if hf_collapse(["collapse", str(full), str(collapsed), "--layers", ",".join(map(str, removed))]) != 0:
                raise RuntimeError(f"hf-collapse collapse failed for {name}")
        exports[name] = {"full": Path(full), "collapsed": collapsed, "removed": removed}
    return exports


def ideal_ratios(full, collapsed, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Full over collapsed FLOPs: a prefill of `prompt_tokens` (output head once), and decoding `new_tokens` after it."""

    def prefill(model) -> float:
        head = flops_per_token(model) - flops_per_token(model, output_head=False)
        return prompt_tokens * flops_per_token(model, context_length=(prompt_tokens + 1) / 2, output_head=False) + head

    def decode(model) -> float:
        return sum(flops_per_token(model, context_length=prompt_tokens + i + 1) for i in range(new_tokens))

    return {"prompt": prefill(full) / prefill(collapsed), "generation": decode(full) / decode(collapsed)}


def reference(folder: Path, ids: list[int], new_tokens: int) -> dict:
    """transformers' logits over `ids` (float32) and its greedy continuation."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return {"logits": logits, "greedy": out[0, len(ids):].tolist(), "model": model}


def ggml_gelu_table() -> torch.Tensor:
    """The GELU llama.cpp's CPU backend applies to f32 tensors, indexed by the fp16 bit pattern of the input.

    ggml compiles with GGML_GELU_FP16 (a define in ggml-cpu/vec.h, no runtime switch): for |x| < 10 it rounds x to
    fp16 and reads a table it filled at start with the tanh approximation, evaluated in float32 at each fp16 value
    and stored as fp16. So both the input and the output of every GELU carry an fp16 rounding (relative 2^-11).
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    half, one = np.float32(0.5), np.float32(1.0)
    with np.errstate(all="ignore"):  # NaN and infinite patterns: ggml never looks them up (|x| < 10)
        inner = np.float32(np.sqrt(2 / np.pi)) * x * (one + np.float32(0.044715) * x * x)
        values = (half * x * (one + np.tanh(inner))).astype(np.float16)
    return torch.from_numpy(values.astype(np.float32))


class GgmlGelu(torch.nn.Module):
    """tanh GELU as llama.cpp computes it on CPU for f32 (see `ggml_gelu_table`): 0 below -10, x above 10."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", ggml_gelu_table(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        looked_up = self.table[x.half().view(torch.int16).long() & 0xFFFF].to(x.dtype)
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, looked_up))


def gelu_study(folder: Path, ids: list[int], llama_logits: np.ndarray | None = None) -> dict:
    """How much of a Gemma model's llama.cpp gap is ggml's fp16 GELU table: transformers' logits over `ids` with its
    own GELU and with `GgmlGelu` in every MLP, each in float32 and float64, against each other and llama.cpp's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    logits = {}
    for gelu in ("exact", "table"):
        if gelu == "table":
            for layer in model.model.layers:
                layer.mlp.act_fn = GgmlGelu()
        for dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                logits[gelu, dtype] = model.to(dtype)(torch.tensor([ids])).logits[0].double().numpy()
    exact, table = logits["exact", torch.float32], logits["table", torch.float32]

    def gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max())

    row = {
        "logit_std": float(exact.std()), "logit_absmax": float(np.abs(exact).max()),
        "exact_f32_vs_f64": gap(exact, logits["exact", torch.float64]),  # transformers' own f32 rounding
        "table_vs_exact": gap(table, exact),  # what the table alone does to transformers' logits
        "table_f32_vs_f64": gap(table, logits["table", torch.float64]),  # the table's floor: a flip of one fp16 step
    }
    if llama_logits is not None:
        row.update(llama_vs_exact=gap(llama_logits, exact), llama_vs_table=gap(llama_logits, table))
    return row


def convert(llama_cpp_dir: Path, folder: Path, target: Path, outtype: str) -> Path:
    """llama.cpp's converter, run with this Python and the converter's own gguf-py."""
    if target.is_file():
        return target
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_dir / "gguf-py"), NO_LOCAL_GGUF="")
    command = [sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(target),
               "--outtype", outtype]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}:\n{result.stderr[-2000:]}")
    return target


def quantize(source: Path, target: Path, ftype: int) -> Path:
    import llama_cpp

    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source}")
    return target


def load(path: Path, *, logits_all: bool = False):
    import llama_cpp

    f32 = 0  # GGML_TYPE_F32: an f32 KV cache, for parity
    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=1, n_threads_batch=1, logits_all=logits_all,
                           type_k=f32, type_v=f32, verbose=False)


def parity(gguf: Path, ids: list[int], ref: dict) -> tuple[dict, np.ndarray]:
    """llama.cpp against transformers: largest logit difference, argmax agreement, greedy tokens equal; and llama.cpp's
    logits over `ids`."""
    llm = load(gguf, logits_all=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    greedy = []
    for _ in range(len(ref["greedy"])):  # greedy on llama.cpp's own logits, token by token
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    llm.close()
    return {
        "max_abs_logit_diff": float(np.abs(logits - ref["logits"]).max()),
        "argmax_agree": int((logits.argmax(-1) == ref["logits"].argmax(-1)).sum()),
        "positions": len(ids),
        "greedy_equal": greedy == ref["greedy"],
    }, logits


def time_llama(paths: dict[str, Path], ids: list[int], new_tokens: int, repeats: int) -> dict[str, dict[str, list]]:
    """Prompt and generation tokens/s of each model, 1 thread, per round; the models take turns within a round (the
    order alternating), so a ratio within a round compares runs under the same load."""
    models = {name: load(path) for name, path in paths.items()}
    rates = {name: {"prompt": [], "generation": []} for name in models}
    for repeat in range(repeats + 1):  # the first round warms up
        for name in list(models)[:: 1 if repeat % 2 else -1]:
            llm = models[name]
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prompt = time.perf_counter() - start
            start = time.perf_counter()
            for token in ids[:new_tokens]:  # decoding cost does not depend on which token it is
                llm.eval([token])
            generation = time.perf_counter() - start
            if repeat:
                rates[name]["prompt"].append(len(ids) / prompt)
                rates[name]["generation"].append(new_tokens / generation)
    for llm in models.values():
        llm.close()
    return rates


def paired(rates: dict[str, dict[str, list]]) -> tuple[dict, dict]:
    """Median tokens/s of each model, and the median over rounds of collapsed / full (the speed-up)."""
    medians = {name: {mode: statistics.median(values) for mode, values in modes.items()} for name, modes in rates.items()}
    speedup = {
        mode: statistics.median(c / f for c, f in zip(rates["collapsed"][mode], rates["full"][mode]))
        for mode in ("prompt", "generation")
    }
    return medians, speedup


class _LastHiddenState(torch.nn.Module):
    """The encoder as a function of (input_ids, attention_mask), for the ONNX exporter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def onnx_study(exports: dict, work: Path, tokens: int, repeats: int) -> dict:
    """MiniLM full vs collapsed in ONNX Runtime: largest output difference to transformers, and the speed-up at
    batch 1 × `tokens` (1 thread, interleaved medians)."""
    import onnxruntime

    case = exports["minilm"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(case["full"])
    batch = tokenizer([PROMPT * 4], truncation=True, max_length=tokens, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions, result, models = {}, {}, {}
    for name in ("full", "collapsed"):
        model = transformers.AutoModel.from_pretrained(case[name], attn_implementation="eager").eval()
        path = work / f"minilm-{name}.onnx"
        if not path.is_file():
            torch.onnx.export(_LastHiddenState(model), inputs, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], dynamo=True)
        sessions[name] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
        with torch.no_grad():
            expected = model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state.numpy()
        result[f"{name}_max_abs_diff"] = float(np.abs(sessions[name].run(None, feed)[0] - expected).max())
        models[name] = model
    times = {name: [] for name in sessions}
    for repeat in range(repeats + 1):
        for name in list(sessions)[:: 1 if repeat % 2 else -1]:  # turns within a round, the order alternating
            start = time.perf_counter()
            sessions[name].run(None, feed)
            if repeat:
                times[name].append(time.perf_counter() - start)
    length = inputs[0].shape[1]
    ideal = flops_per_token(models["full"], context_length=length, output_head=False) / flops_per_token(
        models["collapsed"], context_length=length, output_head=False
    )
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    speedup = statistics.median(f / c for f, c in zip(times["full"], times["collapsed"]))  # paired within a round
    result.update(tokens=int(length), median_ms=medians, speedup=speedup, ideal=ideal)
    return result


def prompt_ids(tokenizer, tokens: int | None = None) -> list[int]:
    """The prompt's token ids, repeated and cut to `tokens` when given."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return ids if tokens is None else (ids * (tokens // len(ids) + 1))[:tokens]


def llama_parity(exports: dict, work: Path, llama_cpp_dir: Path, new_tokens: int) -> tuple[dict, dict]:
    """Each model converted to an f32 GGUF and run in llama.cpp against transformers; the collapsed Gemma-3 also with
    `hf-collapse gguf-metadata`. Returns the rows and llama.cpp's logits of the Gemma-3 files ("gemma3 full", ...;
    the collapsed one with its metadata), for `gelu_study`."""
    rows, gemma3_logits = {}, {}
    for name in [n for n in ("smollm2", "gemma3", "gemma3-27b-shape") if n in exports]:
        case = exports[name]
        ids = prompt_ids(transformers.AutoTokenizer.from_pretrained(case["collapsed"]))
        for kind in ("full", "collapsed"):
            ref = reference(case[kind], ids, new_tokens)
            gguf = convert(llama_cpp_dir, case[kind], work / f"{name}-{kind}-f32.gguf", "f32")
            rows[f"{name} {kind}"], logits = parity(gguf, ids, ref)
            if kind == "collapsed" and llama_cpp_fit(json.loads((case[kind] / "config.json").read_text())).needs_metadata:
                fixed = work / f"{name}-{kind}-f32-layers.gguf"
                if not fixed.is_file() and hf_collapse(["gguf-metadata", str(gguf), "--from", str(case[kind])]) != 0:
                    raise RuntimeError(f"hf-collapse gguf-metadata failed on {gguf}")
                rows[f"{name} {kind} + gguf-metadata"], logits = parity(fixed, ids, ref)
            if name.startswith("gemma3"):
                gemma3_logits[f"{name} {kind}"] = logits
    return rows, gemma3_logits


def llama_speed(exports: dict, work: Path, llama_cpp_dir: Path, args) -> dict:
    """SmolLM2 full vs collapsed in llama.cpp, f16 and Q4_0: tokens/s and the speed-up against the FLOP ratio."""
    import llama_cpp

    case = exports["smollm2"]
    ids = prompt_ids(transformers.AutoTokenizer.from_pretrained(case["full"]), args.prompt_tokens)
    models = {k: transformers.AutoModelForCausalLM.from_pretrained(case[k]) for k in ("full", "collapsed")}
    ideal = ideal_ratios(models["full"], models["collapsed"], args.prompt_tokens, args.new_tokens)
    speed = {}
    for quant, ftype in (("f16", None), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        paths = {}
        for kind in ("full", "collapsed"):
            f16 = convert(llama_cpp_dir, case[kind], work / f"smollm2-{kind}-f16.gguf", "f16")
            paths[kind] = f16 if ftype is None else quantize(f16, work / f"smollm2-{kind}-{quant}.gguf", ftype)
        rates, ratio = paired(time_llama(paths, ids, args.new_tokens, args.repeats))
        speed[quant] = {"tokens_per_s": rates, "speedup": ratio, "ideal": ideal,
                        "of_ideal": {mode: ratio[mode] / ideal[mode] for mode in ratio}}
    return speed


def run(args) -> dict:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    exports = make_exports(work, args.quick)
    results = {"quick": args.quick, "removed": {name: case["removed"] for name, case in exports.items()}}
    results["llama_cpp_fit"] = {
        f"{name} {kind}": vars(llama_cpp_fit(json.loads((case[kind] / "config.json").read_text())) or {})
        for name, case in exports.items() if name != "minilm" for kind in ("full", "collapsed")
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(exports["gemma3"]["full"])
    models = {k: transformers.AutoModelForCausalLM.from_pretrained(exports["gemma3"][k]) for k in ("full", "collapsed")}
    results["gemma3_ideal"] = ideal_ratios(models["full"], models["collapsed"], len(prompt_ids(tokenizer)), args.new_tokens)
    runtimes, gemma3_logits = not args.no_runtimes, {}
    if runtimes and importlib.util.find_spec("llama_cpp") is not None and args.llama_cpp_dir is not None:
        results["parity"], gemma3_logits = llama_parity(exports, work, args.llama_cpp_dir, args.new_tokens)
        if "smollm2" in exports:
            results["speed"] = llama_speed(exports, work, args.llama_cpp_dir, args)
    studied = [("gemma3", "full"), ("gemma3", "collapsed")]
    if "gemma3-27b-shape" in exports:
        studied.append(("gemma3-27b-shape", "full"))
    results["gemma3_gelu"] = {
        f"{name} {kind}": gelu_study(exports[name][kind], prompt_ids(tokenizer), gemma3_logits.get(f"{name} {kind}"))
        for name, kind in studied
    }
    if runtimes and importlib.util.find_spec("onnxruntime") is not None:
        results["onnx"] = onnx_study(exports, work, args.onnx_tokens, args.onnx_repeats)
    versions = ("transformers", "torch", "llama_cpp_python", "onnxruntime", "gguf")
    results["versions"] = {name: _version(name) for name in versions}
    results["load_average"] = {"after": os.getloadavg()[0], "cores": os.cpu_count()}  # how shared the machine was
    return results


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _num(value: float) -> str:
    return f"{value:.1e}" if abs(value) < 0.1 else f"{value:.2f}"


def _deep_gelu(study: dict) -> str:
    row = study.get("gemma3-27b-shape full", {})
    if "llama_vs_table" not in row:
        return ""
    return (f" The full 62-layer file's gap ({_num(row['llama_vs_exact'])}) is the GELU table again, over more layers: "
            f"transformers with the table is {_num(row['llama_vs_table'])} from llama.cpp, within the table's own "
            f"float32/float64 spread ({_num(row['table_f32_vs_f64'])}).")


def _deep_paragraph(results: dict) -> str:
    """The 27B-shape rows: llama.cpp's query scale after the cut, and what `gguf-metadata` makes of it."""
    parity, fit = results["parity"], results["llama_cpp_fit"]["gemma3-27b-shape collapsed"]
    text = ("gemma3-27b-shape: the tiny Gemma-3 at Gemma-3 27B's shape (62 layers, query_pre_attn_scalar hidden / heads "
            "= 16, head_dim 32), its last layer removed (the window period still holds). llama.cpp ignores "
            "query_pre_attn_scalar and takes the query scale from the layer count (hidden / heads only at the 27B's "
            "count: 62 for Gemma-3, 46 for Gemma-2), so the converted collapsed file runs with 1/sqrt(head_dim) "
            f"({_num(parity['gemma3-27b-shape collapsed']['max_abs_logit_diff'])} off).")
    fixed = parity.get("gemma3-27b-shape collapsed + gguf-metadata")
    if fixed is not None and fit.get("query_scale"):
        wanted, used = fit["query_scale"]
        text += (f" `hf-collapse gguf-metadata` multiplies each layer's query norm by sqrt({used:g} / {wanted:g}), "
                 f"so that llama.cpp's scale times it is the model's: {_num(fixed['max_abs_logit_diff'])} off, argmax "
                 f"{fixed['argmax_agree']}/{fixed['positions']}, greedy generation "
                 f"{'equal' if fixed['greedy_equal'] else 'different'} (the full 62-layer file: "
                 f"{_num(parity['gemma3-27b-shape full']['max_abs_logit_diff'])}).")
    return text + _deep_gelu(results.get("gemma3_gelu", {}))


def gelu_paragraph(study: dict) -> str:
    """Where the tiny Gemma-3's llama.cpp gap comes from, from `gelu_study`'s rows ("full", "collapsed")."""
    full, collapsed = study["gemma3 full"], study["gemma3 collapsed"]
    text = (
        "Where the Gemma-3 gap comes from: Gemma's MLP uses the tanh GELU, and llama.cpp's CPU backend computes GELU "
        "on f32 tensors from an fp16 table (the define GGML_GELU_FP16, compiled in: input and output rounded to fp16; "
        "SmolLM2's SiLU is computed in f32). The tiny Gemma-3's logits have a standard deviation of "
        f"{full['logit_std']:.2f} (largest {full['logit_absmax']:.1f}). In transformers, that table alone (`GgmlGelu` "
        f"in every MLP) moves the logits by {_num(full['table_vs_exact'])} (full) / {_num(collapsed['table_vs_exact'])} "
        f"(collapsed), where float32 against float64 moves them by {_num(full['exact_f32_vs_f64'])}"
    )
    if "llama_vs_table" in full:
        text += (
            f". llama.cpp is {_num(full['llama_vs_exact'])} / {_num(collapsed['llama_vs_exact'])} from transformers "
            f"({full['llama_vs_exact'] / full['logit_std']:.1e} times the logits' standard deviation) and "
            f"{_num(full['llama_vs_table'])} / {_num(collapsed['llama_vs_table'])} from transformers with the table"
        )
    return text + (
        f". The table is not a smooth function: the same table-GELU model in float32 and float64 differs by "
        f"{_num(full['table_f32_vs_f64'])} / {_num(collapsed['table_f32_vs_f64'])} (an input a rounding away from an "
        "fp16 step lands on the other side), so no two implementations of it agree much closer than that. No runtime "
        "option, converter flag or GGUF key turns the table off (llama.cpp's CUDA backend computes GELU in f32; not "
        "measured here). The gap is the runtime's, the same with and without the removed layer; the table's error is "
        "relative (2^-11 per rounding), so it scales with the activations and the logits."
    )


def section(results: dict) -> str:
    lines = [SECTION_BEGIN, "## Deployment: llama.cpp and ONNX Runtime", ""]
    lines.append(
        "`python -m benchmarks.deployment` (see its docstring). Removed layers: "
        + "; ".join(f"{name} {removed}" for name, removed in results["removed"].items())
        + ". Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v) + "."
    )
    if "parity" in results:
        lines += ["", "llama.cpp against transformers (f32 GGUF from `convert_hf_to_gguf.py`, f32 KV cache, 1 thread):", "",
                  "| model | max abs logit difference | argmax agreement | greedy generation equal |", "|---|---:|---:|---|"]
        for name, row in results["parity"].items():
            lines.append(f"| {name} | {_num(row['max_abs_logit_diff'])} | {row['argmax_agree']}/{row['positions']} | "
                         f"{'yes' if row['greedy_equal'] else 'no'} |")
    if "gemma3-27b-shape collapsed" in results.get("parity", {}):
        lines += ["", _deep_paragraph(results)]
    if "gemma3_gelu" in results:
        lines += ["", gelu_paragraph(results["gemma3_gelu"])]
    if "speed" in results:
        lines += ["", "SmolLM2-135M in llama.cpp, full (30 layers) vs collapsed (22), 1 thread; tokens/s are medians over rounds, "
                  "the speed-up the median over rounds of collapsed / full (the two take turns within a round):", "",
                  "| weights | phase | full tokens/s | collapsed tokens/s | speed-up | ideal (FLOPs) | of ideal |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for quant, row in results["speed"].items():
            for mode in ("prompt", "generation"):
                rates = row["tokens_per_s"]
                lines.append(f"| {quant} | {mode} | {rates['full'][mode]:.1f} | {rates['collapsed'][mode]:.1f} | "
                             f"×{row['speedup'][mode]:.2f} | ×{row['ideal'][mode]:.2f} | {row['of_ideal'][mode]:.2f} |")
    if "onnx" in results:
        onnx = results["onnx"]
        lines += ["", f"all-MiniLM-L6-v2 in ONNX Runtime ({'torch.onnx.export'}, 1 thread, batch 1 × {onnx['tokens']}): "
                  f"largest output difference to transformers {_num(onnx['full_max_abs_diff'])} (full), "
                  f"{_num(onnx['collapsed_max_abs_diff'])} (collapsed); median {onnx['median_ms']['full']:.2f} ms → "
                  f"{onnx['median_ms']['collapsed']:.2f} ms, paired speed-up ×{onnx['speedup']:.2f} against an ideal ×{onnx['ideal']:.2f} "
                  f"({onnx['speedup'] / onnx['ideal']:.2f} of ideal)."]
    if "load_average" in results:
        load = results["load_average"]
        lines += ["", f"Load average (1 min) at the end of the run: {load['after']:.1f} on {load['cores']} cores; timings on a "
                  "shared machine vary from run to run, more than the paired ratios do."]
    if results["quick"]:
        lines += ["", "QUICK smoke run: tiny models and few repeats; says nothing about speed."]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models only; the runtimes only if installed")
    parser.add_argument("--no-runtimes", action="store_true",
                        help="with --quick: leave llama.cpp and ONNX Runtime out even where installed (exports, plan, references)")
    parser.add_argument("--llama-cpp-dir", type=Path, help="vendor/llama.cpp of the llama-cpp-python source package")
    parser.add_argument("--repeats", type=int, default=15, help="timed llama.cpp rounds (interleaved; one more warms up)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the llama.cpp timing")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens (greedy check and timing)")
    parser.add_argument("--onnx-tokens", type=int, default=64, help="sequence length for ONNX Runtime")
    parser.add_argument("--onnx-repeats", type=int, default=200, help="timed ONNX Runtime rounds (interleaved)")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/deployment; outputs/benchmarks/deployment-quick with --quick)")
    parser.add_argument("--results", type=Path, help=f"markdown file whose section is replaced (default {RESULTS_MD}; none with --quick)")
    return parser


def _missing(args) -> str | None:
    """Why the full study cannot run here, or None."""
    if args.llama_cpp_dir is None or not (args.llama_cpp_dir / "convert_hf_to_gguf.py").is_file():
        return ("--llama-cpp-dir must be the vendor/llama.cpp folder of the llama-cpp-python source package (it holds "
                "convert_hf_to_gguf.py): pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36, then untar")
    for module, install in (("llama_cpp", "pip install llama-cpp-python==0.3.36"), ("onnxruntime", "pip install onnxruntime onnxscript")):
        if importlib.util.find_spec(module) is None:
            return f"the full study needs {module}: {install}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if min(args.repeats, args.onnx_repeats, args.new_tokens) < 1 or args.prompt_tokens < 2:
        print("error: --repeats, --onnx-repeats and --new-tokens must be at least 1, --prompt-tokens at least 2",
              file=sys.stderr)
        return 2
    if args.no_runtimes and not args.quick:
        print("error: --no-runtimes goes with --quick (the full study is the runtimes)", file=sys.stderr)
        return 2
    if not args.quick and (reason := _missing(args)) is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    # exported models are working files: inside a folder the caller named, else under outputs/ (never recorded)
    args.work = args.output / "work" if args.output else default_work("deployment", args.quick)
    args.output = args.output or default_output("deployment", args.quick)
    args.output.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    text = section(results)
    publish_section(text, args.output, args.results, args.quick, SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
