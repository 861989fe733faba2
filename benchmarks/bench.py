"""What each fusion and attention mode costs, measured on this machine.

    python -m benchmarks.bench [--device cpu|cuda] [--shape tiny|paper|mini] [--json out.json]

One markdown table, one row per mode, every time also as a ratio to `llava` measured in the
same run. FLOPs per sample come from `torch.utils.flop_counter.FlopCounterMode` and are checked
against the closed form below (`closed_form_flops`); scaled_dot_product_attention counts 0 FLOPs
on CPU in torch 2.13, so attention always comes from the closed form. The machine limit is this
machine's dense matmul throughput (fp32 on CPU, bf16 on CUDA); MFU is a training row's achieved
FLOP/s over it. `--shape paper` keeps the paper's widths and token counts (CLIP ViT-L/14-336,
576 tokens per view; Vicuna-7B; 64 text tokens) with 1 ViT and 1 LLM layer so that it fits a
laptop, and adds the FLOPs at full depth (24 / 32 layers) in their own column.
"""

import dataclasses
import json
import platform
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from config import check_device, check_writable, parse_options, run_cli
from llm import KVCache, LLMConfig
from training.metrics import closed_form_flops
from model import SparseCut, SparseCutConfig
from vit import ViTConfig

MODES = {  # row name: (fusion, shortcuts, attention, visual_ffn)
    "llava": ("llava", "none", "causal", True),
    "concat": ("concat", "none", "causal", True),
    "deepstack": ("deepstack", "none", "causal", True),
    "llava+shortcuts": ("llava", "uniform", "causal", True),
    "fusion-only": ("sparsecut", "none", "causal", True),
    "sparsecut": ("sparsecut", "uniform", "causal", True),
    "llava+composite": ("llava", "none", "composite", True),
    "sparsecut+composite": ("sparsecut", "uniform", "composite", True),
    "llava+composite-noffn": ("llava", "none", "composite", False),
    "sparsecut+composite-noffn": ("sparsecut", "uniform", "composite", False),
}

SHAPES = {  # vit, llm, text tokens, batch, full depths (vit, llm) for the scaled FLOPs column
    "mini": (ViTConfig(image_size=16, patch_size=4, width=32, n_layer=2, n_head=2, mlp_dim=64),
             LLMConfig(vocab_size=64, width=32, n_layer=2, n_head=4, n_kv_head=2, mlp_dim=64),
             12, 2, None),
    "tiny": (ViTConfig(image_size=48, patch_size=8, width=96, n_layer=4, n_head=4, mlp_dim=384),
             LLMConfig(vocab_size=33, width=128, n_layer=4, n_head=4, n_kv_head=2, mlp_dim=384),
             25, 32, None),
    "paper": (ViTConfig(image_size=336, patch_size=14, width=1024, n_layer=1, n_head=16, mlp_dim=4096),
              LLMConfig(vocab_size=32000, width=4096, n_layer=1, n_head=32, n_kv_head=32, mlp_dim=11008,
                        tie_embeddings=False),
              64, 1, (24, 32)),
}


def mode_config(shape, mode, full_depth=False):
    """The config of a row; full_depth: at the shape's full depths (the paper: 24 / 32 layers)."""
    vit, llm, _, _, depths = SHAPES[shape]
    fusion, shortcuts, attention, visual_ffn = MODES[mode]
    if full_depth and depths:
        vit, llm = dataclasses.replace(vit, n_layer=depths[0]), dataclasses.replace(llm, n_layer=depths[1])
    return SparseCutConfig(vit=dataclasses.replace(vit), llm=dataclasses.replace(llm), fusion=fusion,
                           shortcuts=shortcuts, attention=attention, visual_ffn=visual_ffn,
                           input_layer=-1 if vit.n_layer == 1 else -2)


# --- FLOPs -------------------------------------------------------------------------------------

def counted_flops(model, images, input_ids):
    """FlopCounterMode per part, without scaled_dot_product_attention (added from the closed form)."""
    flops = {}
    with FlopCounterMode(display=False) as counter:
        model(images, input_ids)
    by_module = counter.get_flop_counts()
    total = lambda prefix: sum(by_module.get(prefix, {}).values())
    flops["vision"] = total("SparseCut.vit")
    flops["fusion"] = total("SparseCut.fusion")
    flops["llm"] = total("SparseCut") - flops["vision"] - flops["fusion"]  # incl. the head
    return flops


# --- timing and memory -------------------------------------------------------------------------

def timed(fn, device):
    """Seconds fn takes, waiting for the GPU where there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_time(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


class LiveTensorBytes(TorchDispatchMode):
    """CPU peak memory: bytes of tensor storages created inside the mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, key, storage.nbytes())

    def release(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.track(tensor)
        return out


def peak_memory(fn, device, baseline_bytes):
    """Peak bytes during fn: CUDA's allocator peak, or live tensors on CPU plus the baseline
    (parameters and optimizer state that exist before the step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    with LiveTensorBytes() as tracker:
        fn()
    return baseline_bytes + tracker.peak


def matmul_peak(device, dtype):
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, repeats=10)
    return 2 * n ** 3 / seconds


# --- one row -----------------------------------------------------------------------------------

def greedy_decode(llm, token, cache, steps):
    """steps greedy tokens with the KV cache, one at a time (the decode phase)."""
    for _ in range(steps):
        token = llm(token, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    return token


class Testbed:
    """One model and optimizer per fusion: the rows of a fusion differ only in attention mode,
    which the model reads at forward time, so they share weights and the warmed-up optimizer."""

    def __init__(self, shape, mode, device):
        self.config = mode_config(shape, mode)
        _, _, self.text_tokens, batch, _ = SHAPES[shape]
        torch.manual_seed(0)
        self.model = SparseCut(self.config).to(device)
        R = self.config.vit.image_size
        self.images = torch.rand(batch, 3, 2 * R, 2 * R, device=device)
        self.input_ids = torch.randint(4, self.config.llm.vocab_size, (batch, self.text_tokens), device=device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=True)   # as train.py
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model.train()
        self.train_step()                                        # creates the optimizer state

    def train_step(self):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            _, loss = self.model(self.images, self.input_ids, self.input_ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bench_mode(testbed, mode, shape, repeats, decode_tokens):
    _, _, attention, visual_ffn = MODES[mode]
    model, config, device = testbed.model, testbed.config, testbed.device
    config.attention, config.visual_ffn = attention, visual_ffn
    text_tokens, full_depth = testbed.text_tokens, SHAPES[shape][4]
    model.train()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for s in testbed.optimizer.state.values()
                       for t in s.values() if torch.is_tensor(t))
    started = time.perf_counter()
    peak = peak_memory(testbed.train_step, device, state_bytes)
    tracked_s = time.perf_counter() - started
    # One repeat (the paper shape, seconds per step): the memory-tracked step is the timed one;
    # tracking adds per-op overhead that only matters for the tiny shapes' millisecond steps.
    train_s = tracked_s if repeats == 1 else median_time(testbed.train_step, device, repeats, warmup=0)

    model.eval()
    images, input_ids = testbed.images[:1], testbed.input_ids[:1]
    flops = counted_flops(model, images, input_ids)
    closed = closed_form_flops(config, text_tokens)
    flops["vision"] += closed["vision_attention"]
    flops["llm"] += closed["llm_attention"]
    warmup = int(repeats > 1)
    prompt = [[1] * text_tokens]
    with torch.no_grad():
        prefill_s = median_time(lambda: model.generate(images, prompt, max_new_tokens=1), device,
                                repeats, warmup)
        visual, injected = model.encode_images(images)
        N = visual.shape[1]
        h = torch.cat([visual, model.llm.embed_tokens(input_ids)], dim=1)
        decode_times = []
        for _ in range(repeats + warmup):                         # each after an untimed prefill
            cache = KVCache(config.llm, 1, N + text_tokens + decode_tokens, device, h.dtype)
            model.llm(inputs_embeds=h, kv_cache=cache, injections=injected, image_span=(0, N),
                      attention=attention, visual_ffn=visual_ffn, return_hidden=True)
            decode_times.append(timed(lambda: greedy_decode(model.llm, input_ids[:, -1:], cache,
                                                            decode_tokens), device))
        decode_s = statistics.median(decode_times[warmup:])
    deep = mode_config(shape, mode, full_depth=True)            # the paper: 24 / 32 layers
    prefill = closed_form_flops(deep, text_tokens, head_rows=1)
    row = {"mode": mode, "params": sum(p.numel() for p in testbed.params),
           "llm_seq_len": config.n_image_tokens + text_tokens,
           "flops": {k: flops[k] for k in ("vision", "fusion", "llm")},
           "flops_closed_form": {k: closed[k] for k in ("vision", "fusion", "llm")},
           "train_step_s": train_s, "prefill_s": prefill_s,
           "decode_tokens_per_s": decode_tokens / decode_s, "peak_mem_bytes": peak,
           "prefill_llm_flops": prefill["llm"]}
    if full_depth:
        at_depth = closed_form_flops(deep, text_tokens)
        row["flops_full_depth"] = {k: at_depth[k] for k in ("vision", "fusion", "llm")}
    return row


# --- the reference: transformers' Llama with the same weights ----------------------------------

def bench_reference(shape, device, repeats, decode_tokens):
    """Our LLM against transformers' LlamaForCausalLM, same config and weights."""
    try:
        import transformers
    except ImportError:
        return None
    from llm import LLM
    _, l, text_tokens, batch, _ = SHAPES[shape]
    l = dataclasses.replace(l, n_layer=l.n_layer, tie_embeddings=False)
    torch.manual_seed(0)
    ours = LLM(l).to(device)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=l.vocab_size, hidden_size=l.width, intermediate_size=l.mlp_dim,
        num_hidden_layers=l.n_layer, num_attention_heads=l.n_head, num_key_value_heads=l.n_kv_head,
        rope_theta=l.rope_theta, rms_norm_eps=l.norm_eps, tie_word_embeddings=False,
        attn_implementation="sdpa")).to(device)
    theirs.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                            for k, v in ours.state_dict().items()})
    seq = 64 + text_tokens
    ids = torch.randint(0, l.vocab_size, (batch, seq), device=device)
    results = {}
    for name, model, logits_of in (("ours", ours, lambda out: out), ("transformers", theirs, lambda out: out.logits)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            logits = logits_of(model(ids))
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()                                                   # creates the optimizer state
        results[name] = {"train_step_s": median_time(step, device, repeats, warmup=0)}
    prompt = ids[:1, :seq // 2]

    @torch.no_grad()
    def ours_generate():                 # as SparseCut.generate: the head on the last row only
        cache = KVCache(l, 1, prompt.shape[1] + decode_tokens, device, torch.float32)
        token = ours.lm_head(ours(prompt, kv_cache=cache, return_hidden=True)[:, -1]).argmax(-1, keepdim=True)
        greedy_decode(ours, token, cache, decode_tokens - 1)

    @torch.no_grad()
    def theirs_generate():
        theirs.generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                        do_sample=False, pad_token_id=0)

    ours.eval(), theirs.eval()
    results["ours"]["generate_tokens_per_s"] = decode_tokens / median_time(ours_generate, device, repeats, 1)
    results["transformers"]["generate_tokens_per_s"] = decode_tokens / median_time(theirs_generate, device, repeats, 1)
    return {"train_step_ratio": results["ours"]["train_step_s"] / results["transformers"]["train_step_s"],
            "decode_ratio": results["ours"]["generate_tokens_per_s"] / results["transformers"]["generate_tokens_per_s"],
            **{f"{k}_{name}": v for name, r in results.items() for k, v in r.items()}}


# --- report ------------------------------------------------------------------------------------

def table(report):
    rows = report["rows"]
    base = rows[0]
    full = "flops_full_depth" in base
    header = ["mode", "params", "LLM seq", "GFLOP vision / fusion / LLM"]
    header += ["LLM GFLOP at full depth"] if full else []
    header += ["train step s (x llava)", "MFU", "prefill LLM GFLOP (x llava)", "prefill s (x llava)", "decode tok/s (x llava)",
               "peak MiB (x llava)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        f = r["flops"]
        cells = [r["mode"], f"{r['params'] / 1e6:.2f}M", str(r["llm_seq_len"]),
                 f"{f['vision'] / 1e9:.3f} / {f['fusion'] / 1e9:.3f} / {f['llm'] / 1e9:.3f}"]
        cells += [f"{r['flops_full_depth']['llm'] / 1e9:.1f}"] if full else []
        cells += [f"{r['train_step_s']:.4f} ({r['train_step_s'] / base['train_step_s']:.2f})",
                  f"{r['mfu']:.1%}",
                  f"{r['prefill_llm_flops'] / 1e9:.2f} ({r['prefill_llm_flops'] / base['prefill_llm_flops']:.2f})",
                  f"{r['prefill_s']:.4f} ({r['prefill_s'] / base['prefill_s']:.2f})",
                  f"{r['decode_tokens_per_s']:.1f} ({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f})",
                  f"{r['peak_mem_bytes'] / 2**20:.0f} ({r['peak_mem_bytes'] / base['peak_mem_bytes']:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(shape, device, repeats, decode_tokens, reference=True):
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    batch = SHAPES[shape][3]
    rows, testbeds = [], {}
    for mode in MODES:
        fusion = MODES[mode][:2]
        if fusion not in testbeds:
            testbeds = {fusion: Testbed(shape, mode, device)}          # one model in memory at a time
        row = bench_mode(testbeds[fusion], mode, shape, repeats, decode_tokens)
        train_flops = 3 * batch * sum(row["flops"].values())    # backward ~ 2x forward
        row["mfu"] = train_flops / row["train_step_s"] / peak
        rows.append(row)
        print(f"measured {mode}", file=sys.stderr, flush=True)
    machine = {"device": str(device), "platform": platform.platform(), "processor": platform.processor(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    return {"machine": machine, "shape": shape, "peak_flops": peak, "rows": rows,
            "reference": bench_reference(shape, device, repeats, decode_tokens) if reference else None}


@dataclasses.dataclass
class BenchOptions:
    device: str = "cpu"               # cpu | cuda
    shape: str = "tiny"               # tiny | paper | mini
    json: str = ""                    # also write the report here
    repeats: int = 0                  # 0: 5 (paper: 1)
    decode_tokens: int = 0            # 0: 32 (paper: 4)


def main(argv):
    options = BenchOptions()
    parse_options(options, argv, __doc__)
    if options.shape not in SHAPES:
        raise ValueError(f"--shape takes {', '.join(SHAPES)}, not {options.shape!r}")
    if options.device not in ("cpu", "cuda"):
        raise ValueError(f"--device takes cpu or cuda, not {options.device!r}")
    check_device(options.device)
    if options.json:
        check_writable(options.json)
    paper = options.shape == "paper"                # seconds per step on a CPU: measure once
    repeats = options.repeats or (1 if paper else 5)
    decode_tokens = options.decode_tokens or (4 if paper else 32)
    report = run(options.shape, options.device, repeats, decode_tokens)
    print(f"machine: {report['machine']}; matmul peak {report['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(table(report))
    if report["reference"]:
        ref = report["reference"]
        print(f"reference (transformers LlamaForCausalLM, same weights): train step ratio "
              f"{ref['train_step_ratio']:.2f} (ours / theirs time), greedy decode ratio "
              f"{ref['decode_ratio']:.2f} (ours / theirs tokens/s)")
    if options.json:
        with open(options.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
