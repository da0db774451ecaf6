"""Worker process for the Intel engines: runs inside `.venv-ipex` or `.venv-openvino`, never in the app's venv.

    python -m cpu_backend.intel_worker --runtime ipex|openvino --recipe R --folder DIR --work DIR [--threads N]

It loads and quantizes the model for its runtime, then speaks JSON lines: stdin gets requests, stdout answers.
    -> {"ready": {...}} | {"error": "..."}                    once, after loading
    <- {"op": "generate", "ids": [...], "eos": [...], "max_new_tokens": N, "temperature": ..., "top_p": ...,
        "top_k": ..., "repetition_penalty": ..., "seed": ..., "ignore_eos": ...}
    -> {"token": id} ... {"done": "eos" | "length" | "cancelled"} | {"error": "..."}
    <- {"op": "cancel"}                                       any time: the running generation stops
    <- {"op": "score", "ids": [[...], ...]}                   quality: per window NLL sum and argmax
    -> {"nll": [...], "argmax": [[...], ...]}
The app's process renders and tokenizes (its tokenizer is the reference); this process sees token ids only.
Only the standard library is imported at module level: torch and the runtime come from the worker's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path

RECIPES = ("float", "weight-int8", "static-int8")  # chosen by cpu_backend.intel from the scheme's formats
CALIBRATION_FILE = "calibration.safetensors"  # written by quant.export (the shared pipeline's calibration ids)


class Protocol:
    """stdout belongs to the protocol: library prints are sent to stderr (the app keeps them in a log)."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.lock = threading.Lock()

    def send(self, **message) -> None:
        with self.lock:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()


def calibration_ids(folder: Path, samples: int):
    from safetensors.torch import load_file

    path = folder / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: W8A8 needs the shared pipeline's export (quant.export)")
    return load_file(str(path))["input_ids"][:samples]


def load_hf(folder: Path, dtype):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    config.architectures = config.architectures or ["LlamaForCausalLM"]  # IPEX dispatches on it
    rope = json.loads((folder / "config.json").read_text()).get("rope_parameters")
    if isinstance(rope, dict) and transformers.__version__.startswith("4."):
        # A transformers-5 config keeps RoPE under rope_parameters; 4.x would silently use rope_theta=10000
        # (SmolLM2's is 100000: +7.5% perplexity through IPEX before this).
        config.rope_theta = rope.get("rope_theta", config.rope_theta)
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, config=config, torch_dtype=dtype, trust_remote_code=False, low_cpu_mem_usage=True)
    return model.eval()


# --- IPEX (legacy) -------------------------------------------------------------------------------------------

def load_ipex(recipe: str, folder: Path, work: Path, samples: int):
    import intel_extension_for_pytorch as ipex
    import torch

    if recipe == "float":
        return ipex.llm.optimize(load_hf(folder, torch.bfloat16), dtype=torch.bfloat16, inplace=True,
                                 deployment_mode=True), {}
    if recipe == "weight-int8":
        from intel_extension_for_pytorch.quantization import WoqLowpMode, WoqWeightDtype

        qconfig = ipex.quantization.get_weight_only_quant_qconfig_mapping(
            weight_dtype=WoqWeightDtype.INT8, lowp_mode=WoqLowpMode.BF16)
        return ipex.llm.optimize(load_hf(folder, torch.bfloat16), dtype=torch.bfloat16,
                                 quantization_config=qconfig, inplace=True, deployment_mode=True), {}
    # static-int8: `folder` already has our SmoothQuant folded in, so IPEX runs its plain static INT8 recipe
    # (per-tensor u8 activations with histogram-calibrated ranges, per-channel s8 weights) on our calibration
    # ids: no second smoothing.
    qconfig = ipex.quantization.default_static_qconfig_mapping
    summary = work / f"ipex-qconf-{samples}.json"
    info = {"calibration_samples": samples, "qconf_summary": str(summary)}
    if not summary.is_file():
        from intel_extension_for_pytorch.quantization import prepare
        from intel_extension_for_pytorch.transformers.optimize import get_dummy_input

        t0 = time.perf_counter()
        model = ipex.llm.optimize(load_hf(folder, torch.float32), dtype=torch.float32,
                                  quantization_config=qconfig, inplace=True, deployment_mode=False)
        example = get_dummy_input(model, return_dict=True)
        prepared = prepare(model, qconfig, example_kwarg_inputs=example, inplace=True)
        with torch.no_grad():
            for row in calibration_ids(folder, samples):
                ids = row.unsqueeze(0)
                inputs = dict(example, input_ids=ids, attention_mask=torch.ones_like(ids),
                              position_ids=torch.arange(ids.shape[1]).unsqueeze(0))
                prepared(**inputs)
        tmp = summary.with_suffix(".tmp")
        prepared.save_qconf_summary(qconf_summary=str(tmp))
        keep_float(tmp, "lm_head")
        os.replace(tmp, summary)
        info["calibration_seconds"] = round(time.perf_counter() - t0, 1)
        del model, prepared
    model = ipex.llm.optimize(load_hf(folder, torch.float32), dtype=torch.bfloat16, quantization_config=qconfig,
                              qconfig_summary_file=str(summary), inplace=True, deployment_mode=True)
    model.q8chat_amp = True
    return model, info


def keep_float(summary: Path, fqn: str) -> None:
    """Like our W8A8 scheme, the LM head stays in float: IPEX's recipe ignores per-module qconfigs, so the
    calibrated summary is edited (an op whose inference dtype is its original dtype is not quantized)."""
    recipe = json.loads(summary.read_text())
    found = 0
    for part in recipe.values():
        for op in part.get("q_op_infos", {}).values():
            if op.get("fqn") == fqn:
                for info in op.get("input_tensor_infos", []) + op.get("weight_tensor_infos", []):
                    info["inf_dtype"] = info["orig_dtype"]
                    info["force_dtype"] = info["orig_dtype"]
                found += 1
    if not found:
        raise RuntimeError(f"{fqn} is not in IPEX's quantization summary {summary}")
    summary.write_text(json.dumps(recipe, indent=2))


# --- OpenVINO through optimum-intel ---------------------------------------------------------------------------

def load_openvino(recipe: str, folder: Path, work: Path, samples: int):
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    ov_config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
    ir = work / f"openvino-{recipe}" if recipe != "static-int8" else work / f"openvino-{recipe}-{samples}"
    info = {"ir": str(ir)}
    if not (ir / "openvino_model.xml").is_file():
        t0 = time.perf_counter()
        if recipe == "float":
            model = OVModelForCausalLM.from_pretrained(folder, export=True, load_in_8bit=False, compile=False)
        elif recipe == "weight-int8":
            model = OVModelForCausalLM.from_pretrained(
                folder, export=True, compile=False,
                quantization_config=OVWeightQuantizationConfig(bits=8))  # per-channel asymmetric, OV default
        else:
            model = OVModelForCausalLM.from_pretrained(folder, export=True, load_in_8bit=False, compile=False)
            quantize_openvino_static(model, calibration_ids(folder, samples))
            info["calibration_samples"] = samples
        tmp = ir.with_name(ir.name + ".tmp")
        model.save_pretrained(tmp)
        if ir.exists():
            import shutil

            shutil.rmtree(ir)
        os.replace(tmp, ir)
        info["export_seconds"] = round(time.perf_counter() - t0, 1)
        del model
    model = OVModelForCausalLM.from_pretrained(ir, ov_config=ov_config, compile=True)
    return model, info


def quantize_openvino_static(model, calibration) -> None:
    """Full INT8 (weights per channel, activations static per tensor) of the exported IR with NNCF, calibrated
    on our calibration ids. NNCF's SmoothQuant is off: the folder already has ours folded in."""
    import nncf
    import numpy as np
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    names = [i.get_any_name() for i in model.model.inputs]
    inputs = []
    for row in calibration:
        n = row.shape[0]
        item = {"input_ids": row.numpy()[None].astype(np.int64),
                "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None],
                "beam_idx": np.zeros((1,), dtype=np.int32)}
        inputs.append({k: v for k, v in item.items() if k in names})
    model.model = nncf.quantize(
        model.model, nncf.Dataset(inputs), subset_size=len(inputs), model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations, symmetric weights (like IPEX's recipe)
        # Like our W8A8 scheme: the LM head stays in float; and a FakeQuantize on the query moves the CPU plugin
        # off its fused attention kernel (2.7x slower decode).
        ignored_scope=nncf.IgnoredScope(patterns=[".*lm_head.*"], types=["ScaledDotProductAttention"],
                                        validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1, convolution=-1)))


# --- serving ----------------------------------------------------------------------------------------------------

class Streamer:
    """transformers streamer: the first put() is the prompt; every later one is one new token."""

    def __init__(self, proto: Protocol) -> None:
        self.proto, self.prompt_seen, self.last = proto, False, None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.last = token
            self.proto.send(token=token)  # EOS too: the app times it like any step, and does not show it

    def end(self) -> None:
        pass


def autocast(model):
    """IPEX's static INT8 graph was traced under BF16 autocast (its recipe); everything else runs as loaded."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=getattr(model, "q8chat_amp", False))


def generate(model, request: dict, proto: Protocol, cancel: threading.Event) -> None:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return cancel.is_set()

    ids = torch.tensor([request["ids"]], dtype=torch.long)
    eos = set(request["eos"])
    streamer = Streamer(proto)
    sampling = request["temperature"] > 0
    kwargs = dict(max_new_tokens=request["max_new_tokens"], do_sample=sampling,
                  repetition_penalty=request["repetition_penalty"], eos_token_id=sorted(eos),
                  pad_token_id=min(eos), streamer=streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]))
    if sampling:
        kwargs.update(temperature=request["temperature"], top_p=request["top_p"], top_k=request["top_k"] or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if request["ignore_eos"]:
        kwargs["min_new_tokens"] = request["max_new_tokens"]
    if request.get("seed") is not None:
        torch.manual_seed(request["seed"])
    with torch.inference_mode(), autocast(model):
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    if cancel.is_set():
        proto.send(done="cancelled")
    elif streamer.last in eos and not request["ignore_eos"]:
        proto.send(done="eos")
    else:
        proto.send(done="length")


def score(model, request: dict, proto: Protocol) -> None:
    import torch
    import torch.nn.functional as F

    nll, argmax = [], []
    with torch.inference_mode(), autocast(model):
        for row in request["ids"]:
            ids = torch.tensor([row], dtype=torch.long)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = (out.logits if hasattr(out, "logits") else out[0])[0, :-1].float()  # IPEX's graphs: a tuple
            if hasattr(model, "request") and hasattr(model.request, "reset_state"):
                model.request.reset_state()  # OpenVINO's stateful model keeps the window's KV otherwise
            nll.append(float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")))
            argmax.append(logits.argmax(-1).tolist())
    proto.send(nll=nll, argmax=argmax)


def warm_up(model) -> None:
    """IPEX's TorchScript graphs are profiled and fused over their first runs (the first answer would take ~10x
    longer per token); OpenVINO compiles its kernels lazily. Two short greedy runs settle both."""
    import torch

    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.inference_mode(), autocast(model):
        for _ in range(2):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", choices=("ipex", "openvino"), required=True)
    ap.add_argument("--recipe", choices=RECIPES, required=True,
                    help="float (BF16), weight-int8 (INT8 weights), static-int8 (INT8 weights and activations)")
    ap.add_argument("--folder", required=True, help="HF model folder (for static-int8: quant.export's smoothed one)")
    ap.add_argument("--work", required=True, help="folder for this runtime's converted model / calibration summary")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--calibration-samples", type=int, default=32)
    args = ap.parse_args()
    proto = Protocol()
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        load = load_ipex if args.runtime == "ipex" else load_openvino
        model, info = load(args.recipe, Path(args.folder), work, args.calibration_samples)
        t1 = time.perf_counter()
        warm_up(model)
        info["warm_up_seconds"] = round(time.perf_counter() - t1, 1)
        proto.send(ready={"load_seconds": round(time.perf_counter() - t0, 1), "versions": versions(args.runtime),
                          "threads": torch.get_num_threads(), **info})
    except Exception as e:
        traceback.print_exc()
        proto.send(error=f"{type(e).__name__}: {e}")
        return

    # Requests run on the main thread (the thread that warmed up: IPEX's fused graphs and the OpenMP pool are
    # its own; the same loop on another thread decoded ~2x slower); a reader thread only watches for cancel.
    cancel = threading.Event()
    requests: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("op") == "cancel":
                cancel.set()
            else:
                requests.put(request)
        requests.put({"op": "quit"})

    threading.Thread(target=read, daemon=True).start()
    while (request := requests.get())["op"] != "quit":
        cancel.clear()
        try:
            if request["op"] == "generate":
                generate(model, request, proto, cancel)
            elif request["op"] == "score":
                score(model, request, proto)
            else:
                proto.send(error=f"unknown op {request['op']!r}")
        except Exception as e:
            traceback.print_exc()
            proto.send(error=f"{type(e).__name__}: {e}")


def versions(runtime: str) -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers"] + (["intel-extension-for-pytorch"] if runtime == "ipex"
                                         else ["openvino", "optimum-intel", "nncf"])
    return {n: version(n) for n in names}


if __name__ == "__main__":
    main()
