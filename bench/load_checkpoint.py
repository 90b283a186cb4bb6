"""Peak host memory while loading a sharded bfloat16 checkpoint (target: < 1.5x the checkpoint's bytes).

`python bench/load_checkpoint.py [--layers 24] [--hidden 1024] [--shard_mb 256] [--legacy]`

Builds a Qwen-VL-shaped model in bfloat16 (default ~0.78 GB: hidden 1024, 24 decoder layers,
32,000-token vocabulary, a 4-layer 512-wide ViT), saves it as safetensors shards, then loads it
with `MgenVLForCausalLM.from_pretrained(dir, dtype="bfloat16")` in a fresh process and reports
the peak resident set size of that process during the load (VmHWM) minus its RSS just before
(after `import paddle`), divided by the checkpoint's bytes. The load must also reproduce every tensor bit
for bit. `--legacy` loads the way the kit did before issue 14 (build in float32, read every shard
into one host dict with the `safetensors` package, cast into the model) for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, command_line, machine_info, write_report


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that across fork+exec, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_config(layers: int, hidden: int, vocab: int):
    from paddle_caption.model.config import MgenVLConfig

    heads = max(1, hidden // 128)
    return MgenVLConfig.from_dict({
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "kv_channels": hidden // heads, "intermediate_size": hidden * 43 // 8,
        "visual": {"image_size": 448, "patch_size": 14, "width": 512, "layers": 4, "heads": 4,
                   "mlp_ratio": 4.9231, "output_dim": hidden, "image_start_id": 151857}})


def digests(model) -> dict:
    """sha1 of every tensor's bytes, read in place (no copy: hashing must not raise the peak)."""
    import hashlib

    from paddle_caption.model.numpy_bridge import byte_view

    return {name: hashlib.sha1(byte_view(t)).hexdigest() for name, t in model.state_dict().items()}


def write_model(directory: Path, layers: int, hidden: int, vocab: int, shard_bytes: int) -> tuple[int, dict]:
    """Save a random bfloat16 model; returns (the checkpoint's tensor bytes, tensor digests)."""
    import paddle

    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(0)
    model = MgenVLForCausalLM.from_config(bench_config(layers, hidden, vocab), dtype="bfloat16")
    model.save_pretrained(directory, max_shard_bytes=shard_bytes)
    return sum(int(p.numel()) * p.element_size() for p in model.parameters()), digests(model)


def child(directory: str, legacy: bool) -> dict:
    """Runs in a fresh process: load the model, report RSS and a checksum per tensor."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM  # imports paddle before the measurement

    before = rss_bytes()
    start = time.perf_counter()
    if legacy:
        from paddle_caption.model.weights_io import load_model_state
        from paddle_caption.model.config import MgenVLConfig

        model = MgenVLForCausalLM(MgenVLConfig.from_pretrained(directory))
        state = load_model_state(directory)
        for key, target in model.state_dict().items():
            target.set_value(state[key].astype(target.dtype))
        del state
        model.to(dtype="bfloat16")
    else:
        model = MgenVLForCausalLM.from_pretrained(directory, dtype="bfloat16")
    seconds = time.perf_counter() - start
    after = rss_bytes()
    peak = peak_rss_bytes()
    return {"rss_before": before, "rss_after": after, "peak_rss": peak, "seconds": seconds,
            "digests": digests(model)}


def measure(directory: Path, legacy: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", str(directory)] + (["--legacy"] if legacy else []),
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard_mb", type=float, default=256)
    parser.add_argument("--legacy", action="store_true", help="also measure the pre-issue-14 loader")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS_DIR / "load_checkpoint.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.legacy)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        checkpoint_bytes, expected = write_model(directory, args.layers, args.hidden, args.vocab,
                                                 int(args.shard_mb * 2 ** 20))
        shards = len(list(directory.glob("*.safetensors")))
        rows = []
        for legacy in ([False, True] if args.legacy else [False]):
            r = measure(directory, legacy)
            delta = r["peak_rss"] - r["rss_before"]
            rows.append({"loader": "legacy (float32 build, one dict)" if legacy else "from_pretrained (lazy, shard by shard)",
                         "peak_rss_delta_bytes": delta, "ratio": delta / checkpoint_bytes,
                         "resident_after_bytes": r["rss_after"] - r["rss_before"], "seconds": r["seconds"],
                         "gb_per_s": checkpoint_bytes / r["seconds"] / 1e9,
                         "bit_identical": r["digests"] == expected})
    report = {"command": command_line(), "machine": machine_info(), "checkpoint_bytes": checkpoint_bytes,
              "shards": shards, "dtype": "bfloat16", "rows": rows, "target_ratio": 1.5}
    write_report(Path(args.out), report)
    print(f"checkpoint {checkpoint_bytes / 1e9:.3f} GB bfloat16 in {shards} shard(s)")
    for row in rows:
        print(f"{row['loader']:<42} peak RSS +{row['peak_rss_delta_bytes'] / 1e9:.3f} GB = {row['ratio']:.2f}x "
              f"(resident after {row['resident_after_bytes'] / 1e9:.3f} GB), {row['seconds']:.2f} s, "
              f"{row['gb_per_s']:.2f} GB/s, bit-identical: {row['bit_identical']}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
