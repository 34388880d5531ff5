"""The Python side of `cargo xtask bench --peer`: the workloads of crates/peft-bench under the
same ids, on Hugging Face PEFT, transformers and bitsandbytes (versions in shared DESIGN.md),
f32 on the CPU with 2 threads. It speaks the protocol of `peft-bench`:

    bench_peer.py serve          # stdin `ID ITERATIONS`, stdout {"id": .., "ms": [..]}
    bench_peer.py memory ID      # {"id": .., "rss_before": .., "rss_peak": ..} (bytes)
    bench_peer.py list

Each workload builds exactly what its Rust twin builds (crates/peft-bench/src/lib.rs): the
random Llama (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8192), batch 4 x 128,
LoRA r=16 alpha 32 on q_proj and v_proj, AdamW lr 1e-4 with gradient clipping at 1.0, the
4096 x 4096 matrix built from the same formula.
"""
import json
import math
import os
import re
import sys
import tempfile
import time

import torch

THREADS = int(os.environ.get("PEFT_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

BATCH, SEQ, RANK, ALPHA = 4, 128, 16, 32
QUANT_DIM, PROMPT, NEW_TOKENS = 4096, 16, 32


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def random_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).float()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def wave(n, freq):
    return torch.sin(torch.arange(n, dtype=torch.float32) * freq)


def quant_matrix():
    return (wave(QUANT_DIM * QUANT_DIM, 0.618) * 0.05).reshape(QUANT_DIM, QUANT_DIM)


def linear(wid):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(1)
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(512, 512, bias=False)
    torch.nn.init.normal_(holder.lin.weight, std=0.02)
    holder.lin.weight.requires_grad_(False)
    if "lora" in wid:
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"], init_lora_weights=False)
        holder = inject_adapter_in_model(cfg, holder)
    x = torch.randn(BATCH * SEQ, 512)
    params = [p for p in holder.parameters() if p.requires_grad]
    if wid.endswith("bwd"):
        def run():
            for p in params:
                p.grad = None
            xg = x.clone().requires_grad_(True)
            holder.lin(xg).sum().backward()
            assert xg.grad is not None
    else:
        def run():
            with torch.no_grad():
                holder.lin(x)
    return run


def attention():
    """Causal attention as transformers' Llama runs it (SDPA, `is_causal`), forward + backward."""
    torch.manual_seed(1)
    heads, head_dim = 8, 64
    # Heads-first views of token-major tensors, as the model passes them.
    q, k, v = (torch.randn(BATCH, SEQ, heads, head_dim) for _ in range(3))

    def run():
        qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), is_causal=True
        )
        out.sum().backward()
        assert qs.grad is not None and ks.grad is not None and vs.grad is not None
    return run


def one_thread(run):
    """`run` on one thread, the others' count restored after (`linear/plain_fwd_1t`)."""
    def single():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run()
        finally:
            torch.set_num_threads(threads)
    return single


def merge():
    from peft import get_peft_model

    model = get_peft_model(random_llama(), lora_config())

    def run():
        with torch.no_grad():
            model.merge_adapter()
            model.unmerge_adapter()
    return run


def nf4(wid):
    import bitsandbytes.functional as F

    w = quant_matrix()
    if wid == "nf4/quantize":
        return lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    if wid == "nf4/dequantize":
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return lambda: F.dequantize_4bit(q, st)
    src = torch.ones(QUANT_DIM * QUANT_DIM * 4, dtype=torch.uint8)
    return lambda: src.clone()


def matmul_4bit(m):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(quant_matrix(), blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.cos(wave(m * QUANT_DIM, 0.377)).reshape(m, QUANT_DIM)

    def run():
        with torch.no_grad():
            bnb.matmul_4bit(x, q.t(), quant_state=st)
    return run


def qlora_base():
    """The random Llama saved and loaded back 4-bit by transformers + bitsandbytes, as a QLoRA
    user loads a model (NF4, double quantization, f32 compute; the head stays f32)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        random_llama().save_pretrained(d)
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        return LlamaForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu", dtype=torch.float32)


def adamw_steps(model, after_step=None, on_gradients=None):
    """One training step of `model`'s trainable parameters per call, as the Rust twin's
    `Trainer`: AdamW lr 1e-4, gradient clipping at 1.0, the fixed batch of token ids.
    `on_gradients(params)` runs between the backward pass and clipping; `after_step(opt,
    step)` after each optimizer step, gradients still in place."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor([[(i * 31 + b * 977) % 8192 for i in range(SEQ)] for b in range(BATCH)])
    step = [0]

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if on_gradients is not None:
            on_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step[0] += 1
        if after_step is not None:
            after_step(opt, step[0])
        loss.item()
    return run


RELORA_STEPS, RELORA_WARMUP, RELORA_PRUNE = 10, 2, 0.99


def train_step_relora():
    """ReLoRA as the paper's code does it, on PEFT's LoRA layers (PEFT has no ReLoRA): every
    RELORA_STEPS steps merge s·B·A into the base weight, re-initialise A and B, prune each
    Adam moment of A and B by magnitude; the learning rate warms up again over
    RELORA_WARMUP steps."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(random_llama(), lora_config())
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def prune(t):
        threshold = torch.quantile(t.abs().flatten().float(), RELORA_PRUNE)
        t.mul_(t.abs() > threshold)

    @torch.no_grad()
    def after_step(opt, step):
        if step % RELORA_STEPS == 0:
            for layer in layers:
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                layer.get_base_layer().weight += layer.scaling["default"] * (b @ a)
                layer.reset_lora_parameters("default", True)
                for p in (a, b):
                    for key in ("exp_avg", "exp_avg_sq"):
                        prune(opt.state[p][key])
        since = step % RELORA_STEPS
        for g in opt.param_groups:
            g["lr"] = 1e-4 * min(1.0, (since + 1) / RELORA_WARMUP)

    return adamw_steps(model, after_step)


def train_step_adalora():
    """PEFT's AdaLoRA with its defaults (init_r 12, target_r 8, alpha 8) on q and v, the rank
    allocator after every optimizer step (masking from step 0: tinit 0, deltaT 1)."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                        total_step=1_000_000)
    model = get_peft_model(random_llama(), cfg)
    return adamw_steps(model, lambda opt, step: model.base_model.update_and_allocate(step))


def init_pissa(method):
    """PEFT's PiSSA initialisation (`pissa_init`, the base weight replaced by its residual) of
    every q and v LoRA layer of the Llama."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(random_llama(), lora_config())
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def run():
        for layer in layers:
            layer.pissa_init("default", method)
    return run


def train_step(method):
    from peft import get_peft_model

    from peft import BeftConfig, IA3Config, LNTuningConfig, PrefixTuningConfig, PromptTuningConfig

    from peft import SupertuningConfig

    others = {"ia3": IA3Config, "ln_tuning": LNTuningConfig, "beft": BeftConfig,
              # PaFi: the smallest-magnitude 6.25% of q and v, as many values as LoRA r=16.
              "pafi": lambda: SupertuningConfig(sparsity=0.9375, select_top=False,
                                                target_modules=["q_proj", "v_proj"]),
              # 20 virtual tokens, as the Rust twin's default.
              "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
              "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)}
    if method == "full":
        model = random_llama()
    elif method == "qlora":
        model = get_peft_model(qlora_base(), lora_config())
    elif method == "dora":
        cfg = lora_config()
        cfg.use_dora = True
        model = get_peft_model(random_llama(), cfg)
    elif method in others:
        # Hugging Face's defaults for Llama, as the Rust twin uses them.
        model = get_peft_model(random_llama(), others[method]())
    else:
        model = get_peft_model(random_llama(), lora_config())
    return adamw_steps(model)


def train_step_select(child_tuning_f):
    """Selective fine-tuning in plain PyTorch (PEFT has none), as the Rust twin: the last of
    the four layers trained whole; or, for Child-Tuning-F, every layer and the final norm, each
    gradient entry kept with probability 0.3 and scaled by 1/0.3 (the paper's
    ChildTuningAdamW mask)."""
    model = random_llama()
    for name, p in model.named_parameters():
        if child_tuning_f:
            p.requires_grad_(".layers." in name or name == "model.norm.weight")
        else:
            p.requires_grad_(name.startswith("model.layers.3."))
    density = 0.3

    @torch.no_grad()
    def mask(params):
        for p in params:
            p.grad.mul_(torch.bernoulli(torch.full_like(p.grad, density)) / density)

    return adamw_steps(model, on_gradients=mask if child_tuning_f else None)


def train_step_adapterhub_fusion():
    """AdapterFusion (dynamic) over two Pfeiffer adapters in AdapterHub, only the fusion
    trainable (`train_adapter_fusion`)."""
    import adapters
    from adapters.composition import Fuse

    model = random_llama()
    adapters.init(model)
    for name in ("a", "b"):
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(Fuse("a", "b"))
    model.train_adapter_fusion(Fuse("a", "b"))
    model.set_active_adapters(Fuse("a", "b"))
    return adamw_steps(model)


def train_step_adapterhub(preset):
    """A bottleneck adapter step in AdapterHub `adapters` 1.3.0: this runs in its own venv
    (transformers 4.57.6, scripts/adapters_venv.sh), which `cargo xtask bench --peer` uses for
    these workloads."""
    import adapters

    model = random_llama()
    adapters.init(model)
    model.add_adapter("bench", config=preset)
    model.train_adapter("bench")  # freezes the rest; in 1.3.0 it does not activate the adapter
    model.set_active_adapters("bench")
    return adamw_steps(model)


def generate(variant):
    from peft import get_peft_model

    from peft import PrefixTuningConfig

    model = random_llama()
    if variant == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    elif variant != "base":
        model = get_peft_model(model, lora_config())
        if variant == "merged":
            model.merge_adapter()
    model.eval()
    prompt = torch.tensor([[(i * 131 + 7) % 8192 for i in range(PROMPT)]])

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == PROMPT + NEW_TOKENS
    return run


MIXED_PROMPTS, MIXED_ADAPTERS = 8, 4


def generate_mixed(batched):
    """8 prompts over 4 random LoRA adapters: one `generate(adapter_names=...)` call, or one
    `set_adapter` + `generate` per prompt."""
    from peft import get_peft_model

    cfg = lora_config()
    cfg.init_lora_weights = False
    names = [f"a{a}" for a in range(MIXED_ADAPTERS)]
    model = get_peft_model(random_llama(), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    model.eval()
    rows = [names[p % MIXED_ADAPTERS] for p in range(MIXED_PROMPTS)]
    prompts = torch.tensor([[(i * 131 + 7 + p * 17) % 8192 for i in range(PROMPT)] for p in range(MIXED_PROMPTS)])
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
              eos_token_id=None)

    def run():
        with torch.no_grad():
            if batched:
                out = model.generate(input_ids=prompts, adapter_names=rows, **kw)
                assert out.shape == (MIXED_PROMPTS, PROMPT + NEW_TOKENS)
            else:
                for p, name in enumerate(rows):
                    model.set_adapter(name)
                    out = model.generate(input_ids=prompts[p:p + 1], **kw)
                    assert out.shape[1] == PROMPT + NEW_TOKENS
    return run


WORKLOADS = {
    "linear/plain_fwd": lambda: linear("linear/plain_fwd"),
    "linear/plain_fwd_1t": lambda: one_thread(linear("linear/plain_fwd")),
    "linear/lora_fwd": lambda: linear("linear/lora_fwd"),
    "linear/plain_fwd_bwd": lambda: linear("linear/plain_fwd_bwd"),
    "linear/lora_fwd_bwd": lambda: linear("linear/lora_fwd_bwd"),
    "attention/causal_fwd_bwd": attention,
    "merge/merge_unmerge": merge,
    "nf4/quantize": lambda: nf4("nf4/quantize"),
    "nf4/dequantize": lambda: nf4("nf4/dequantize"),
    "nf4/copy": lambda: nf4("nf4/copy"),
    "matmul_4bit/batch1": lambda: matmul_4bit(1),
    "matmul_4bit/batch8": lambda: matmul_4bit(8),
    "matmul_4bit/batch128": lambda: matmul_4bit(128),
    "generate/mixed_batch": lambda: generate_mixed(True),
    "generate/one_by_one": lambda: generate_mixed(False),
    "train_step/lora": lambda: train_step("lora"),
    "train_step/full": lambda: train_step("full"),
    "train_step/qlora": lambda: train_step("qlora"),
    "train_step/dora": lambda: train_step("dora"),
    "train_step/adalora": train_step_adalora,
    "train_step/relora": train_step_relora,
    "train_step/select": lambda: train_step_select(False),
    "train_step/child_tuning_f": lambda: train_step_select(True),
    "train_step/pafi": lambda: train_step("pafi"),
    "init/pissa": lambda: init_pissa("pissa"),
    "init/pissa_niter_4": lambda: init_pissa("pissa_niter_4"),
    "train_step/ia3": lambda: train_step("ia3"),
    "train_step/ln_tuning": lambda: train_step("ln_tuning"),
    "train_step/beft": lambda: train_step("beft"),
    "train_step/prompt_tuning": lambda: train_step("prompt_tuning"),
    "train_step/prefix_tuning": lambda: train_step("prefix_tuning"),
    "train_step/pfeiffer": lambda: train_step_adapterhub("seq_bn"),
    "train_step/houlsby": lambda: train_step_adapterhub("double_seq_bn"),
    "train_step/parallel_adapter": lambda: train_step_adapterhub("par_bn"),
    "train_step/fusion": train_step_adapterhub_fusion,
    "generate/base": lambda: generate("base"),
    "generate/unmerged": lambda: generate("unmerged"),
    "generate/merged": lambda: generate("merged"),
    "generate/prefix": lambda: generate("prefix"),
}


def prepare(wid):
    if wid not in WORKLOADS:
        raise SystemExit(f"unknown workload `{wid}` (known: {', '.join(WORKLOADS)})")
    return WORKLOADS[wid]()


def rss():
    status = open("/proc/self/status").read()
    field = lambda name: int(re.search(name + r":\s+(\d+) kB", status).group(1)) * 1024
    return field("VmRSS"), field("VmHWM")


def serve():
    ready = {}
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 2:
            raise SystemExit(f"expected `ID ITERATIONS`, got `{line.strip()}`")
        wid, iters = parts[0], int(parts[1])
        if wid not in ready:
            ready[wid] = prepare(wid)
            ready[wid]()
        run, ms = ready[wid], []
        for _ in range(iters):
            t = time.perf_counter()
            run()
            ms.append((time.perf_counter() - t) * 1e3)
        print(json.dumps({"id": wid, "ms": ms}), flush=True)


def memory(wid):
    run = prepare(wid)
    run()
    run()
    before, _ = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    _, peak = rss()
    print(json.dumps({"id": wid, "rss_before": before, "rss_peak": peak}))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "serve":
        serve()
    elif cmd == "memory" and len(sys.argv) == 3:
        memory(sys.argv[2])
    elif cmd == "isa":
        # What caps the instruction sets: ATen's dispatch reports its own; MKL and oneDNN only
        # follow their environment variables (`cargo xtask bench --isa avx2` sets them).
        print(json.dumps({
            "ATen kernels": torch.backends.cpu.get_cpu_capability(),
            "MKL": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "auto"),
            "oneDNN": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
        }))
    elif cmd == "list":
        print("\n".join(WORKLOADS))
    else:
        raise SystemExit("usage: bench_peer.py <serve | memory ID | list | isa>")
