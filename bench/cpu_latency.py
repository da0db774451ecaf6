"""CPU latency in one run, alone on the machine: our engine's schemes vs transformers and llama.cpp.

Embedded model (SmolLM2-135M): TTFT for 128- and 512-token prompts (real Wikipedia text) and
decode TPOT over 128 new tokens, batch 1, greedy, for transformers `generate` (BF16), our BF16 /
W8A16 / W8A8-SQ engines (checkpoints from the shared pipeline) and llama.cpp (llama-cpp-python in
its own venv, the same weights requantized to Q8_0, plus the shipped Q4_1). A ~1.1B-parameter
Llama shape with random weights (larger than L3: the bandwidth regime) gives TPOT beside its
floor = bytes read per token / measured read bandwidth. Same thread count everywhere; engines
interleaved round by round so all see the same noise; medians over --runs rounds.

    python bench/cpu_latency.py [--runs 5] [--threads N] [--llama-python .venv-llama/bin/python]

Writes bench/results/cpu_latency.{json,md} and bench/results/cpu_kernels.md (oneDNN verbose summary).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from bench.common import RESULTS, ROOT, cpu_info, median, versions, write_results
from cpu_backend.engine import CPUEngine, CPUGenerator, cpp_step_runs, pack_bf16
from cpu_backend.linear import BF16Linear, Int8Linear, Int8WeightOnlyLinear, fuse_int8
from cpu_backend.threads import configure_threads
from models.backend import SamplingParams
from models.config import DecoderConfig
from models.decoder import Decoder
from models.registry import DEFAULT_MODEL, cache_dir, embedded_gguf, resolve
from quant.schemes import BF16, W8A8_INT8, W8A16_INT8

NEW_TOKENS = 128
SCHEMES = (BF16, W8A16_INT8, W8A8_INT8)
# TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA 32/4, vocab 32000, untied LM head.
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_layers=22,
    num_heads=32,
    num_kv_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def wiki_prompts(tokenizer) -> dict[str, list[int]]:
    from quant.data import wiki_split

    _, held_out = wiki_split()
    text = " ".join(a.text for a in held_out[:40])
    ids = tokenizer.encode(text, add_special_tokens=False)
    return {"p128": ids[:128], "p512": ids[:512]}


class Ours:
    def __init__(self, scheme: str, threads: int, prompts: dict) -> None:
        self.key, self.prompts = ("q8chat", scheme), prompts
        self.engine = CPUEngine(DEFAULT_MODEL, scheme, threads=threads)
        self.engine.generator.reuses_prefix = False  # TTFT here: a cold prefill of the whole prompt, every round

    def round(self) -> dict:
        *_, last = self.engine.generate_ids(
            self.prompts["p128"], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        )
        *_, first512 = self.engine.generate_ids(self.prompts["p512"], SamplingParams(max_new_tokens=1, ignore_eos=True))
        return {
            "ttft_ms_128": last.timings.ttft_ms,
            "tpot_ms": last.timings.tpot_ms,
            "ttft_ms_512": first512.timings.ttft_ms,
        }


class Intel(Ours):
    """The OpenVINO / IPEX engines (worker processes in their own venvs), timed through the same Backend API."""

    def __init__(self, runtime: str, scheme: str, threads: int, prompts: dict) -> None:
        from serving.service import backend_class

        self.key, self.prompts = (runtime, scheme), prompts
        self.engine = backend_class(runtime)(DEFAULT_MODEL, scheme, threads=threads)


class Stamps:
    """A transformers streamer that timestamps each new token (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class Transformers:
    def __init__(self, prompts: dict) -> None:
        from transformers import AutoModelForCausalLM

        self.key, self.prompts = ("transformers", BF16), prompts
        self.model = AutoModelForCausalLM.from_pretrained(resolve(DEFAULT_MODEL), dtype=torch.bfloat16).eval()

    def _generate(self, prompt: list[int], n: int) -> list[float]:
        ids = torch.tensor([prompt])
        stamps, start = Stamps(), time.perf_counter()
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=stamps,
        )
        return [t - start for t in stamps.times]

    def round(self) -> dict:
        t = self._generate(self.prompts["p128"], NEW_TOKENS)
        t512 = self._generate(self.prompts["p512"], 1)
        return {
            "ttft_ms_128": t[0] * 1000,
            "tpot_ms": (t[-1] - t[0]) * 1000 / (len(t) - 1),
            "ttft_ms_512": t512[0] * 1000,
        }


class LlamaCpp:
    """llama.cpp through llama-cpp-python, in its own venv and process (a fresh process per round)."""

    def __init__(self, python: str, quant: str, threads: int, prompts: dict) -> None:
        self.key, self.python, self.threads = ("llama.cpp", quant), python, threads
        src = embedded_gguf(DEFAULT_MODEL)
        if quant == "Q8_0":
            self.gguf = cache_dir() / "models" / "smollm2-135m-q8_0.gguf"
            if not self.gguf.exists():
                self._run(["--quantize-q8", str(src), str(self.gguf)])
        else:
            self.gguf = src
        self.prompt_file = Path(tempfile.mkstemp(suffix=".json")[1])
        self.prompt_file.write_text(json.dumps(prompts))

    def _run(self, args: list[str]) -> str:
        cmd = [self.python, str(ROOT / "bench" / "llama_cpp_runner.py"), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"llama.cpp runner failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def round(self) -> dict:
        out = self._run(
            [
                "--gguf",
                str(self.gguf),
                "--threads",
                str(self.threads),
                "--prompt",
                str(self.prompt_file),
                "--new-tokens",
                str(NEW_TOKENS),
            ]
        )
        return json.loads(out.strip().splitlines()[-1])


def read_bandwidth_gbs() -> float:
    """Streaming read bandwidth (fp32 sum over 1 GiB, all threads), median of 5."""
    buf = torch.ones(1 << 28)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / median(times[1:]) / 1e9


def release_memory() -> None:
    """Collect, then hand freed heap back to the OS (glibc keeps it otherwise: ~7 GB after a 1.1B model here)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def random_decoder(scheme: str) -> tuple[Decoder, int]:
    """The 1.1B shape with random weights on our kernels; returns (model, bytes read per decode step)."""
    from quant.reference import quantize_weight

    cfg = DecoderConfig(**LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data = (
            (torch.randn(p.shape) * 0.02).to(torch.bfloat16)
            if p.dim() > 1
            else torch.ones(p.shape, dtype=torch.bfloat16)
        )
    from models.decoder import rope_inv_freq

    model.inv_freq = rope_inv_freq(cfg)
    weight_bytes = sum(model.get_submodule(n).weight.numel() for n in model.linear_names())
    weight_bytes = weight_bytes * (2 if scheme == BF16 else 1) + model.lm_head.weight.numel() * 2
    if scheme == BF16:
        pack_bf16(model)
        return model.eval(), weight_bytes
    for name in model.linear_names():
        q, s = quantize_weight(model.get_submodule(name).weight.float(), "int")
        model.replace_linear(name, Int8WeightOnlyLinear(q, s) if scheme == W8A16_INT8 else Int8Linear(q, s))
    model.fuse_projections(fuse_int8)
    model.lm_head = BF16Linear.from_linear(model.lm_head)
    return model.eval(), weight_bytes


def random_model_tpot(model: Decoder, steps: int = 32, prompt: int = 128) -> float:
    """The engine's decode step (CPUGenerator: the C++ step where it runs) on ``model``, ms per token."""
    cache_dtype = torch.bfloat16 if cpp_step_runs(model) else torch.float32
    gen = CPUGenerator(model, prompt + steps + 1, cache_dtype=cache_dtype)
    with torch.inference_mode():
        token = int(gen.prefill(torch.randint(0, 32000, (1, prompt))).argmax())
        start = time.perf_counter()
        for i in range(steps):
            token = int(gen.decode(token, prompt + i).argmax())
    return (time.perf_counter() - start) * 1000 / steps


def kernel_log(threads: int) -> str:
    """oneDNN verbose of one decode step and one 128-token prefill per scheme: which kernels run."""
    code = (
        "import torch, sys\n"
        "from cpu_backend.engine import CPUEngine\n"
        "from models.backend import SamplingParams\n"
        f"e = CPUEngine('smollm2-135m', sys.argv[1], threads={threads})\n"
        "list(e.generate_ids(list(range(1000, 1128)), SamplingParams(max_new_tokens=2, ignore_eos=True)))\n"
    )
    lines = [
        "# oneDNN kernels per scheme (ONEDNN_VERBOSE=1: a 128-token prefill + 1 decode step)",
        "",
        f"- cpu: {cpu_info()['cpu']}; isa flags: {', '.join(cpu_info()['isa'])}",
        "",
    ]
    for scheme in SCHEMES:
        env = {**os.environ, "ONEDNN_VERBOSE": "1"}
        out = subprocess.run([sys.executable, "-c", code, scheme], cwd=ROOT, env=env, capture_output=True, text=True)
        counts = collections.Counter()
        for line in out.stdout.splitlines():
            f = line.split(",")
            if len(f) > 9 and f[2] == "primitive" and f[3] == "exec" and f[5] in ("matmul", "inner_product"):
                src = f[8].split()[0].split(":")[1] if f[8] else "?"
                wei = f[8].split()[1].split(":")[1] if len(f[8].split()) > 1 else "?"
                counts[(f"{f[5]}: {f[6]}", f"{src} x {wei}")] += 1
        lines += [f"## {scheme}", "", "| implementation | src x weights | calls |", "|---|---|---|"]
        lines += [f"| {impl} | {types} | {n} |" for (impl, types), n in counts.most_common()]
        if not counts:
            lines.append("| (no oneDNN matmul/inner product: ATen kernels) | | |")
        lines.append("")
    return "\n".join(lines)


def decode_profile(runners: list) -> str:
    """Where a decode step's time goes, per scheme (torch profiler, 20 steps at ~200 tokens of context)."""
    from torch.profiler import ProfilerActivity, profile

    lines = ["# CPU decode profile (torch.profiler, 20 decode steps after a 128-token prompt)", ""]
    for r in runners:
        if type(r) is not Ours:  # the Intel engines run in other processes
            continue
        gen = r.engine.generator
        with torch.inference_mode():
            gen.prefill(torch.tensor([r.prompts["p128"]]))
            for i in range(4):
                gen.decode(5, 128 + i)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(20):
                    gen.decode(5, 132 + i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        lines += [f"## {r.key[1]}", "", "```", table, "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--llama-python",
        default=str(ROOT / ".venv-llama" / "bin" / "python"),
        help="python of a venv with llama-cpp-python (make bench-cpu builds it); missing = skipped",
    )
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--no-intel", action="store_true", help="leave out the OpenVINO and IPEX engines")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    tokenizer_engine = CPUEngine(DEFAULT_MODEL, BF16, threads=threads)
    prompts = wiki_prompts(tokenizer_engine.tokenizer)
    del tokenizer_engine
    runners = [Transformers(prompts)] + [Ours(s, threads, prompts) for s in SCHEMES]
    notes = []
    if Path(args.llama_python).exists():
        runners += [LlamaCpp(args.llama_python, q, threads, prompts) for q in ("Q8_0", "Q4_1")]
    else:
        notes.append(f"llama.cpp skipped: no {args.llama_python} (make bench-cpu builds it)")
    if not args.no_intel:
        from serving.service import backend_availability

        for runtime in ("openvino", "ipex"):
            ok, reason = backend_availability(runtime)
            if ok:
                runners += [Intel(runtime, s, threads, prompts) for s in SCHEMES]
            else:
                notes.append(f"{runtime} skipped: {reason}")
    working = []
    for r in runners:  # warm-up round, not counted; an engine that fails here is left out with the reason
        try:
            r.round()
            working.append(r)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{' '.join(r.key)} left out: {str(e)[-300:]}")
            print(notes[-1], flush=True)
    runners = working
    samples: dict[tuple, list[dict]] = {r.key: [] for r in runners}
    for i in range(args.runs):
        for r in runners:
            time.sleep(0.5)  # the previous engine's OpenMP threads stop spinning before this one is timed
            samples[r.key].append(r.round())
            s = samples[r.key][-1]
            print(
                f"round {i} {r.key}: ttft128 {s['ttft_ms_128']:.1f} ttft512 {s['ttft_ms_512']:.1f} "
                f"tpot {s['tpot_ms']:.2f} ms",
                flush=True,
            )
    records = []
    for (engine, scheme), runs in samples.items():
        rec = {"engine": engine, "scheme": scheme, "model": DEFAULT_MODEL, "runs": len(runs)}
        for f in ("ttft_ms_128", "ttft_ms_512", "tpot_ms"):
            rec[f] = median([r[f] for r in runs])
        records.append(rec)
    by = {(r["engine"], r["scheme"]): r for r in records}
    bf16 = by[("q8chat", BF16)]
    for r in records:
        r["tpot_vs_our_bf16"] = r["tpot_ms"] / bf16["tpot_ms"]
        r["ttft512_vs_our_bf16"] = r["ttft_ms_512"] / bf16["ttft_ms_512"]

    # the 1.1B models need the memory: stop the Intel worker processes, keep only our engines (for the profile)
    intel_versions = {r.key[0]: r.engine.info.get("versions") for r in runners if isinstance(r, Intel)}
    for r in runners:
        if isinstance(r, Intel):
            r.engine.close()
    runners = [r for r in runners if type(r) is Ours]
    del working
    release_memory()
    bandwidth = None
    if not args.skip_1b:
        bandwidth = read_bandwidth_gbs()
        for scheme in SCHEMES:
            model, nbytes = random_decoder(scheme)
            random_model_tpot(model, steps=4)  # warm-up
            tpots = [random_model_tpot(model) for _ in range(args.runs)]
            floor = nbytes / (bandwidth * 1e9) * 1000
            records.append(
                {
                    "engine": "q8chat",
                    "scheme": scheme,
                    "model": "llama-1.1b-shape (random)",
                    "runs": args.runs,
                    "tpot_ms": median(tpots),
                    "floor_ms": floor,
                    "tpot_vs_floor": median(tpots) / floor,
                    "weight_bytes": nbytes,
                }
            )
            print(f"1.1B {scheme}: tpot {median(tpots):.1f} ms, floor {floor:.1f} ms", flush=True)
            del model
            release_memory()

    sq, wo = by[("q8chat", W8A8_INT8)], by[("q8chat", W8A16_INT8)]
    notes += [
        f"W8A8-SQ decode TPOT = {sq['tpot_vs_our_bf16']:.2f}x our BF16 (goal <= 0.6x); "
        f"W8A16 = {wo['tpot_vs_our_bf16']:.2f}x",
        f"W8A8-SQ TTFT at 512 tokens = {sq['ttft512_vs_our_bf16']:.2f}x our BF16 (goal <= 0.7x)",
        f"our BF16 decode TPOT = {bf16['tpot_ms'] / by[('transformers', 'bf16')]['tpot_ms']:.2f}x transformers' "
        "generate (goal <= 0.5x)",
    ]
    for runtime in ("openvino", "ipex"):
        if (runtime, W8A8_INT8) in by:
            peer = by[(runtime, W8A8_INT8)]
            notes.append(f"our W8A8-SQ TPOT / {runtime} W8A8-INT8 TPOT = {sq['tpot_ms'] / peer['tpot_ms']:.2f} "
                         "(goal <= 1.0)")
    if ("llama.cpp", "Q8_0") in by:
        q8 = by[("llama.cpp", "Q8_0")]
        notes.append(f"W8A8-SQ TPOT / llama.cpp Q8_0 TPOT = {sq['tpot_ms'] / q8['tpot_ms']:.2f} (goal <= 1.0)")
    if bandwidth:
        notes.append(
            f"measured read bandwidth {bandwidth:.1f} GB/s (fp32 sum over 1 GiB, {threads} threads); "
            "floor = weight bytes per token (int8 or bf16 linears + bf16 LM head) / bandwidth"
        )
    notes.append(
        "medians over rounds; engines interleaved round by round; TPOT = (last token - first) / (n - 1); "
        "TTFT includes the prompt's prefill and the first sample"
    )
    meta = {
        **cpu_info(),
        "threads": threads,
        "new_tokens": NEW_TOKENS,
        "versions": versions("torch", "transformers", "llama_cpp_python"),
        "intel_engines": intel_versions,
        "llama.cpp build": "llama-cpp-python 0.3.36 from PyPI source, AVX-512 + VNNI + BF16, no AMX (Makefile)",
    }
    write_results(
        "cpu_latency",
        meta,
        records,
        [
            "engine",
            "scheme",
            "model",
            "ttft_ms_128",
            "ttft_ms_512",
            "tpot_ms",
            "tpot_vs_our_bf16",
            "floor_ms",
            "tpot_vs_floor",
            "runs",
        ],
        notes,
    )
    (RESULTS / "cpu_profile.md").write_text(decode_profile(runners) + "\n")
    (RESULTS / "cpu_kernels.md").write_text(kernel_log(threads) + "\n")


if __name__ == "__main__":
    main()
