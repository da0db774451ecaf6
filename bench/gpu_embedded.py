"""The embedded model (SmolLM2-135M, real weights) on the GPU engine, per quant checkpoint, against the CPU
reference numerics of the same checkpoint.

Per scheme: greedy answer to "What is the capital of France?" on the GPU (CUDA-graph decode) and on the CPU
through ``quant.reference.reference_decoder`` (token agreement of the two greedy runs), then
``quant.evaluate.compare`` on held-out Wikipedia windows with the CPU reference as the reference and the
GPU engine as the candidate (perplexity of both, argmax agreement, KL). Inputs are prepared here, where the
model package and the text are (``--prepare``): checkpoint folders (``quant.build``), the eval windows and
the prompt ids, so the device needs no tokenizer run and no data package.

    python -m bench.gpu_embedded --prepare DIR             # here: writes DIR/{windows.safetensors, prompt.json}
    python -m bench.gpu_embedded --run DIR --out OUT       # device: DIR holds windows.safetensors, prompt.json,
                                                           # ckpt-*/
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quant.schemes import BF16, W8A8_FP8, W8A8_INT8, W8A16_INT8

SCHEMES = (BF16, W8A16_INT8, W8A8_INT8, W8A8_FP8)
QUESTION = "What is the capital of France?"
NEW_TOKENS = 24


def prepare(out: Path, windows: int, window: int) -> None:
    from models.chat import load_tokenizer
    from models.registry import DEFAULT_MODEL, resolve
    from quant import build
    from quant.data import eval_windows

    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(resolve(DEFAULT_MODEL))
    save_file({"windows": eval_windows(tok, windows, window).contiguous()}, out / "windows.safetensors")
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    (out / "prompt.json").write_text(json.dumps({"question": QUESTION, "ids": list(map(int, ids))}))
    for s in SCHEMES:
        print(s, build(DEFAULT_MODEL, s), flush=True)


PART = 60 * 1024 * 1024


def _embed_range(raw: bytes) -> tuple[int, int]:
    import struct

    n = struct.unpack("<Q", raw[:8])[0]
    lo, hi = json.loads(raw[8 : 8 + n])["model.embed_tokens.weight"]["data_offsets"]
    return 8 + n + lo, 8 + n + hi


def pack(folders: dict[str, Path], out: Path) -> int:
    """Checkpoint folders -> out/cNN/part (< 60 MiB each) + out/cNN/index.json in the last: the device takes one
    carried folder per call. The BF16 embedding (the same in every checkpoint) travels once; BF16 tensors are
    xz-compressed (8-bit ones barely compress). Byte-exact: load_checkpoint's sha256 checks verify it there."""
    import lzma

    blobs, index, embed = [], [], None
    for scheme, folder in folders.items():
        for f in sorted(folder.iterdir()):
            raw = f.read_bytes()
            entry = {"path": f"ckpt-{scheme}/{f.name}", "xz": False}
            if f.name == "model.safetensors":
                lo, hi = _embed_range(raw)
                if embed is None:
                    embed = raw[lo:hi]
                    blobs.append(lzma.compress(embed, preset=0))
                    index.append({"path": "embed", "xz": True, "len": len(blobs[-1])})
                assert raw[lo:hi] == embed, f"{f}: embedding differs"
                raw, entry["embed_at"] = raw[:lo] + raw[hi:], lo
                if scheme == BF16:
                    raw, entry["xz"] = lzma.compress(raw, preset=0), True
            blobs.append(raw)
            entry["len"] = len(raw)
            index.append(entry)
    data = b"".join(blobs)
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    for i, p in enumerate(parts):
        (out / f"c{i:02d}").mkdir(parents=True, exist_ok=True)
        (out / f"c{i:02d}" / "part").write_bytes(p)
    (out / f"c{len(parts) - 1:02d}" / "index.json").write_text(json.dumps({"parts": len(parts), "files": index}))
    return len(parts)


def unpack(parts_dir: Path, index_file: Path, out: Path) -> None:
    """Device side of ``pack``: parts_dir/cNN (the carried parts, gathered) -> out/ckpt-SCHEME/ folders."""
    import lzma

    index = json.loads(index_file.read_text())
    data = b"".join((parts_dir / f"c{i:02d}").read_bytes() for i in range(index["parts"]))
    at, embed = 0, None
    for e in index["files"]:
        raw = data[at : at + e["len"]]
        at += e["len"]
        if e["xz"]:
            raw = lzma.decompress(raw)
        if e["path"] == "embed":
            embed = raw
            continue
        if "embed_at" in e:
            raw = raw[: e["embed_at"]] + embed + raw[e["embed_at"] :]
        path = out / e["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    cache = model.new_cache(1, len(ids) + n)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache, 0, last_only=True)[:, -1]
        out = []
        for i in range(n):
            t = int(logits.argmax(-1))
            out.append(t)
            logits = model(torch.tensor([[t]]), cache, len(ids) + i)[:, -1]
    return out


def greedy_gpu(dec, ids: list[int], n: int) -> tuple[list[int], float]:
    with torch.inference_mode():
        logits = dec.prefill(torch.tensor([ids], device="cuda"))
        out = []
        tok = torch.zeros(1, dtype=torch.long, device="cuda")
        pos = torch.zeros(1, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            t = int(logits[0].argmax(-1))
            out.append(t)
            tok.fill_(t)
            pos.fill_(len(ids) + i)
            logits = dec.decode(tok, pos)
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1000 / n


def run(src: Path, out: Path) -> None:
    from gpu_backend.model import EvalView
    from gpu_backend.weights import build_from_checkpoint
    from quant.checkpoint import load_checkpoint
    from quant.evaluate import compare
    from quant.reference import reference_decoder

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(16, torch.get_num_threads()))
    windows = load_file(src / "windows.safetensors")["windows"]  # safetensors: nothing is unpickled
    prompt = json.loads((src / "prompt.json").read_text())
    ids = prompt["ids"]
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python"] + sys.argv),
        "windows": list(windows.shape),
        "question": QUESTION,
        "schemes": {},
    }
    tokenizer = None
    try:
        from models.chat import load_tokenizer

        tokenizer = load_tokenizer(src / "ckpt-bf16")
    except Exception as e:  # the text is a convenience; token ids are the result
        print("tokenizer unavailable:", repr(e)[:200], flush=True)
    for scheme in SCHEMES:
        folder = src / f"ckpt-{scheme}"
        if not folder.is_dir():
            continue
        t0 = time.time()
        ckpt = load_checkpoint(folder)
        ref = reference_decoder(ckpt, torch.bfloat16, "cpu")
        dec = build_from_checkpoint(ckpt)
        dec.allocate(2, max(windows.shape[1], len(ids) + NEW_TOKENS + 8))
        dec.decode_graph(1)
        gpu_ids, tpot = greedy_gpu(dec, ids, NEW_TOKENS)
        ref_ids = greedy_reference(ref, ids, NEW_TOKENS)
        same = next((i for i, (a, b) in enumerate(zip(gpu_ids, ref_ids, strict=True)) if a != b), NEW_TOKENS)
        q = compare(ref, {"gpu": EvalView(dec)}, windows, batch_size=2, progress=False)
        row = {
            "kv_cache": ckpt.scheme.kv_cache,
            "gpu_ids": gpu_ids,
            "cpu_reference_ids": ref_ids,
            "greedy_prefix_agreement": same,
            "gpu_tpot_ms": tpot,
            "cpu_reference_ppl": q["reference"]["perplexity"],
            "gpu_ppl": q["gpu"]["perplexity"],
            "gpu_vs_reference_agreement": q["gpu"]["agreement"],
            "gpu_vs_reference_kl": q["gpu"]["kl"],
            "tokens": q["gpu"]["tokens"],
            "seconds": round(time.time() - t0, 1),
        }
        if tokenizer is not None:
            row["gpu_text"] = tokenizer.decode(gpu_ids, skip_special_tokens=True)
            row["cpu_reference_text"] = tokenizer.decode(ref_ids, skip_special_tokens=True)
        res["schemes"][scheme] = row
        print(json.dumps({scheme: row})[:1500], flush=True)
        (out / "gpu_embedded.json").write_text(json.dumps(res, indent=1))
        del dec, ref
        torch.cuda.empty_cache()
    (out / "gpu_embedded.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = [
        f"# Embedded model (SmolLM2-135M, real weights) on GPU — {res['device']}",
        "",
        f"torch {res['torch']}; command `{res['command']}`. Held-out windows {res['windows']} "
        "(quant.data.eval_windows). Reference = quant.reference.reference_decoder on the CPU (the scheme's "
        "numerics); GPU = our engine (CUDA graphs) on the same quant.build checkpoint.",
        "",
        f"| scheme | KV | greedy tokens equal (of {NEW_TOKENS}) | CPU-ref ppl | GPU ppl | argmax agreement | KL "
        "| GPU answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, r in res["schemes"].items():
        text = r.get("gpu_text", "").replace("\n", " ").replace("|", "/")
        lines.append(
            f"| {s} | {r['kv_cache']} | {r['greedy_prefix_agreement']} | {r['cpu_reference_ppl']:.3f} | "
            f"{r['gpu_ppl']:.3f} | {r['gpu_vs_reference_agreement']:.4f} | {r['gpu_vs_reference_kl']:.5f} | "
            f"{text} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--pack", type=Path, help="write the built checkpoints as transfer parts into this folder")
    ap.add_argument("--unpack", nargs=2, type=Path, metavar=("PARTS_DIR", "INDEX"), help="rebuild into --run DIR")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    a = ap.parse_args()
    if a.prepare:
        prepare(a.prepare, a.windows, a.window)
    if a.pack:
        from models.registry import DEFAULT_MODEL
        from quant import build

        print(pack({s: Path(build(DEFAULT_MODEL, s)) for s in SCHEMES}, a.pack), "parts")
    if a.unpack:
        unpack(a.unpack[0], a.unpack[1], a.run)
    if a.run:
        run(a.run, a.out)


if __name__ == "__main__":
    main()
