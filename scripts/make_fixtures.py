"""Reference fixtures from Hugging Face transformers + PEFT (versions in shared DESIGN.md).

    scripts/make_fixtures.sh                 # write fixtures/
    scripts/make_fixtures.sh --verify DIR    # load a Rust-saved adapter folder in Python PEFT

fixtures/lora_tiny/: a small random Llama saved with save_pretrained, and for each case an
adapter saved by PEFT with the inputs and the logits PEFT computes.
fixtures/lora_train/: five LoRA training steps on the tiny Llama in PyTorch (torch AdamW, global-norm
clipping, our warmup + cosine schedule): the initial and trained adapters, the batch, the losses,
gradient norms, learning rates, and the LoRA gradients of the first step.
fixtures/bnb_llama/: that Llama quantized to 4 bits by transformers + bitsandbytes and saved
pre-quantized, with its logits and those of a LoRA adapter on the 4-bit base.
    scripts/make_fixtures.sh --verify-4bit DIR CASE   # load a Rust-written 4-bit folder (CASE nf4_dq, fp4 or bert)
fixtures/bnb_bert/: a tiny BERT classifier (base/) and the same model quantized by transformers +
bitsandbytes (nf4_dq/), with the 4-bit model's logits.
fixtures/methods_tiny/: IA3 and LN tuning adapters saved by PEFT on the tiny Llama (base_plain of
lora_tiny) and the tiny BERT classifier (bert_tiny), with the inputs, PEFT's logits and, for the
Llama, 8 greedy tokens after the first row of input ids.
    scripts/make_fixtures.sh --verify-method ADAPTER_DIR EXPECTED [BASE.gguf [TOL]]   # a Rust-saved adapter
fixtures/proxy_tiny/: proxy-tuning's combined logits and greedy tokens in PyTorch (tiny Llamas).
fixtures/smollm2/: prompt token ids and logits of SmolLM2-135M-Instruct loaded from the GGUF
by transformers.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")

from fixture_paths import portable_configs  # noqa: E402  (scripts/ is on the path)


GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "What is the capital of France?"


def tiny_base(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1 if bias else 0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        attention_bias=bias, mlp_bias=bias,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # make the norm scales matter
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


CASES = {
    "list_rslora": dict(base="plain", cfg=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               use_rslora=True)),
    "regex_patterns": dict(base="plain", cfg=dict(r=4, lora_alpha=16, target_modules=r".*\.(q|k)_proj",
                                                  rank_pattern={"layers.1.self_attn.q_proj": 2},
                                                  alpha_pattern={"k_proj": 3})),
    "all_linear_bias_all": dict(base="bias", cfg=dict(r=2, lora_alpha=4, target_modules="all-linear", bias="all")),
    "layers_bias_lora_only": dict(base="bias", cfg=dict(r=3, lora_alpha=6, target_modules=["up_proj", "down_proj"],
                                                        layers_to_transform=[1], layers_pattern="layers",
                                                        bias="lora_only")),
}


WORDS = ("the a an is are was be to of and in on at for with what who where when why how you i it "
         "this that do does can will not yes no hello hi good bad day night cat dog sun moon red blue green "
         "one two three four five big small hot cold fast slow happy sad like love eat drink run walk talk "
         "read write book tree water fire earth air music song game play work home city country france paris "
         "capital name my your his her our their time today tomorrow yesterday please thanks sorry ok sure "
         "question answer think know see look come go make take give get find tell ask help try "
         "keep feel need want use new old long short first last").split()


def tiny_tokenizer(path):
    """A word-level tokenizer over the tiny model's 128 ids, so CLI tests can run on text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS[: 128 - len(vocab)]:
        vocab[w] = len(vocab)
    assert len(vocab) == 128, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def make_tiny():
    from peft import LoraConfig, get_peft_model

    out = os.path.join(FIX, "lora_tiny")
    shutil.rmtree(out, ignore_errors=True)
    bases = {"plain": tiny_base(False), "bias": tiny_base(True)}
    for name, model in bases.items():
        model.save_pretrained(os.path.join(out, f"base_{name}"), safe_serialization=True)
        tiny_tokenizer(os.path.join(out, f"base_{name}", "tokenizer.json"))
    torch.manual_seed(123)
    input_ids = torch.randint(0, 128, (2, 7))
    for case, spec in CASES.items():
        base = tiny_base(spec["base"] == "bias")
        torch.manual_seed(1000 + list(CASES).index(case))
        # init_lora_weights=False: B is random too, so the adapter changes the output.
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **spec["cfg"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)  # trained biases differ from the base
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        d = os.path.join(out, case)
        model.save_pretrained(os.path.join(d, "adapter"))
        save_file({"input_ids": input_ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
                  os.path.join(d, "expected.safetensors"))
        with open(os.path.join(d, "case.json"), "w") as f:
            json.dump({"base": f"base_{spec['base']}"}, f)
        print(case, "->", d, tuple(logits.shape))


# The training reference: settings shared with crates/peft-lora/tests/hf_lora_training.rs.
TRAIN = dict(lr=1e-2, weight_decay=0.01, warmup=2, steps=5, final_fraction=0.1, max_grad_norm=0.5)


def train_lr(step):
    """Our Trainer's schedule (peft_core::optim::LrSchedule): linear warmup that reaches the
    peak on the last warmup step, then cosine to final_fraction * peak."""
    import math

    t = TRAIN
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    progress = min((step - t["warmup"]) / max(t["steps"] - t["warmup"], 1), 1.0)
    return t["lr"] * (t["final_fraction"] + (1 - t["final_fraction"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_train():
    """A few LoRA training steps in PyTorch: the loss, the LoRA gradients of the first batch,
    and after torch AdamW (eps 1e-8) with global-norm clipping, the trained adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = os.path.join(FIX, "lora_train")
    shutil.rmtree(out, ignore_errors=True)
    base = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "lora_tiny", "base_plain"), dtype=torch.float32)
    torch.manual_seed(2024)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg)
    model.save_pretrained(os.path.join(out, "adapter_init"))
    # Two rows: a full one, and a short one with its first 4 tokens (a prompt) out of the
    # loss, padded on the right with id 0.
    seq, short, prompt = 16, 11, 4
    ids = torch.randint(3, 128, (2, seq))
    ids[1, short:] = 0
    loss_mask = torch.ones(2, seq)
    loss_mask[1, :prompt] = 0
    loss_mask[1, short:] = 0
    attention = torch.ones(2, seq, dtype=torch.int64)
    attention[1, short:] = 0
    labels = ids.masked_fill(loss_mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=TRAIN["weight_decay"])
    model.train()
    losses, norms, lrs, grads = [], [], [], {}
    for step in range(TRAIN["steps"]):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        if step == 0:
            grads = {n.replace(".default", ""): p.grad.detach().clone().contiguous()
                     for n, p in model.named_parameters() if p.requires_grad}
        norm = torch.nn.utils.clip_grad_norm_(params, TRAIN["max_grad_norm"])
        lr = train_lr(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
        lrs.append(lr)
        print(f"step {step} loss {loss.item():.6f} |g| {norm.item():.4f} lr {lr:.5f}")
    model.save_pretrained(os.path.join(out, "adapter_final"))
    tensors = {"input_ids": ids.to(torch.int64).contiguous(), "loss_mask": loss_mask.contiguous(),
               "losses": torch.tensor(losses, dtype=torch.float64), "grad_norms": torch.tensor(norms, dtype=torch.float64),
               "learning_rates": torch.tensor(lrs, dtype=torch.float64)}
    tensors.update({f"grad.{n}": g for n, g in grads.items()})
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump(TRAIN, f, indent=1)
    portable_configs(out)
    print("lora_train ->", out)


def tiny_bert(hidden):
    """A random 2-layer BertForSequenceClassification (3 labels, vocab 64) of width `hidden`."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    # BERT's 0.02 init leaves a random model's [CLS] state almost input-independent; unit-scale
    # weights make the tiny model respond to its input like a trained one does.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" in name:
                p.normal_(0, 1.0)
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def make_bert():
    """A tiny BertForSequenceClassification (3 labels) with a word-level BERT-style tokenizer,
    and its logits on a padded batch."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = os.path.join(FIX, "bert_tiny")
    shutil.rmtree(root, ignore_errors=True)
    out = os.path.join(root, "model")
    torch.manual_seed(5)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS[: 64 - len(vocab)]:
        vocab[w] = len(vocab)
    model = tiny_bert(hidden=32)
    model.save_pretrained(out, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(os.path.join(out, "tokenizer.json"))
    ids = torch.tensor([[2, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, os.path.join(root, "expected.safetensors"))
    print("bert_tiny ->", root, tuple(logits.shape))


BNB_CASES = [  # name, shape, dtype, quant type, blocksize, double quantization
    ("nf4_f32_64x64_b64_dq", (64, 64), torch.float32, "nf4", 64, True),
    ("nf4_f32_33x70_b64", (33, 70), torch.float32, "nf4", 64, False),
    ("nf4_f32_33x70_b64_dq", (33, 70), torch.float32, "nf4", 64, True),
    ("nf4_f16_129_b32", (129,), torch.float16, "nf4", 32, False),
    ("nf4_bf16_5x300_b128_dq", (5, 300), torch.bfloat16, "nf4", 128, True),
    ("fp4_f32_40x50_b64", (40, 50), torch.float32, "fp4", 64, False),
    ("fp4_f16_130x300_b256_dq", (130, 300), torch.float16, "fp4", 256, True),
    ("nf4_f32_96x700_b4096_dq", (96, 700), torch.float32, "nf4", 4096, True),
]


def make_bnb():
    """bitsandbytes 0.50.2 4-bit quantization of several tensors (odd sizes, zeros, f16/bf16)."""
    import bitsandbytes.functional as F

    out = os.path.join(FIX, "bnb")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.manual_seed(11)
    for name, shape, dtype, qt, bs, dq in BNB_CASES:
        x = (torch.randn(shape) * torch.rand(shape).pow(3) * 3).to(dtype)
        x.view(-1)[:7] = 0  # a block with zeros, and exact ties at zero
        q, st = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=dq)
        deq = F.dequantize_4bit(q, st)
        t = {"input": x.float().contiguous(), "packed": q.view(-1).contiguous(), "dequantized": deq.float().contiguous()}
        if dq:
            t["absmax_q"] = st.absmax.contiguous()
            t["nested_absmax"] = st.state2.absmax.float().contiguous()
            t["offset"] = st.offset.float().reshape(1)
        else:
            t["absmax"] = st.absmax.float().contiguous()
        save_file(t, os.path.join(out, f"{name}.safetensors"))
        with open(os.path.join(out, f"{name}.json"), "w") as fh:
            json.dump({"shape": list(shape), "dtype": str(dtype).split(".")[1], "quant_type": qt, "blocksize": bs,
                       "double_quant": dq}, fh)
    save_file({"dynamic_map": F.create_dynamic_map(signed=True)}, os.path.join(out, "dynamic_map.safetensors"))
    # The 8-bit blockwise quantization that codes the scales, on enough values (blocks of
    # different magnitudes, an all-zero block) to reach the values near midpoints between codes.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g).pow(2) * 10
    x[3] = 0
    q8, st8 = F.quantize_blockwise(x.reshape(-1), blocksize=256)
    save_file({"input": x.reshape(-1).contiguous(), "codes": q8.contiguous(), "absmax": st8.absmax.float().contiguous()},
              os.path.join(out, "blockwise8.safetensors"))
    # torch's f32 sum order (the double-quantization offset is torch.mean of the scales), on
    # values both sides can generate exactly: ((i * 2654435761 + seed) mod 2^24) / 2^24.
    sums = []
    for n in [1, 7, 8, 31, 32, 33, 100, 127, 128, 129, 1000, 4095, 4096, 5000, 13824, 16384, 20000, 32767]:
        i = torch.arange(n, dtype=torch.int64)
        x = ((i * 2654435761 + n) % (1 << 24)).to(torch.float32) / (1 << 24)
        sums.append({"n": n, "sum_bits": int(torch.tensor([x.sum().item()], dtype=torch.float32).view(torch.int32).item()) & 0xffffffff})
    with open(os.path.join(out, "torch_sums.json"), "w") as fh:
        json.dump(sums, fh)
    print("bnb ->", out)


def make_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(GGUF):
        sys.exit(f"{GGUF} missing: run `cargo xtask fetch` first")
    d, f = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    out = os.path.join(FIX, "smollm2")
    os.makedirs(out, exist_ok=True)
    # Every position's first 2048 logits and the full last row keep the file small.
    save_file({"input_ids": ids[0].to(torch.int64).contiguous(),
               "logits_head": logits[:, :2048].contiguous(),
               "logits_last": logits[-1].contiguous()},
              os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as fh:
        json.dump({"chat_text": text, "greedy_answer": answer}, fh, indent=1)
    print("smollm2:", ids.shape[1], "tokens; answer:", repr(answer))


BNB_LLAMA_CASES = {"nf4_dq": ("nf4", True), "fp4": ("fp4", False)}


def load_4bit(path, qt, dq, model_class=None):
    """The model at `path` loaded 4-bit by transformers + bitsandbytes (f32 compute), as a
    `model_class` (default LlamaForCausalLM)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                             bnb_4bit_compute_dtype=torch.float32)
    model = (model_class or LlamaForCausalLM).from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    return exact_4bit(model).eval()


def exact_4bit(model):
    """bitsandbytes' CPU inference shortcut (on AVX512-BF16 machines) turns the scales to bf16
    and computes in bf16; training and GPUs dequantize to the compute dtype. Use that exact
    path so the reference does not depend on the CPU."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def make_bnb_llama():
    """The tiny Llama quantized by transformers + bitsandbytes and saved pre-quantized, its
    logits, and the logits of a LoRA adapter on top of the 4-bit base (QLoRA inference)."""
    from peft import PeftModel

    base_dir = os.path.join(FIX, "lora_tiny", "base_plain")
    ids = load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    for case, (qt, dq) in BNB_LLAMA_CASES.items():
        out = os.path.join(FIX, "bnb_llama", case)
        shutil.rmtree(out, ignore_errors=True)
        model = load_4bit(base_dir, qt, dq)
        model.save_pretrained(out)
        shutil.copy(os.path.join(base_dir, "tokenizer.json"), out)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            lora = PeftModel.from_pretrained(model, os.path.join(FIX, "lora_tiny", "list_rslora", "adapter")).eval()
            lora_logits = lora(input_ids=ids).logits
        save_file({"input_ids": ids, "logits": logits.contiguous(), "lora_logits": lora_logits.contiguous()},
                  os.path.join(FIX, "bnb_llama", f"{case}.expected.safetensors"))
        print("bnb_llama", case, "->", out)


def make_bnb_bert():
    """A tiny BERT classifier (width 64) and the same model quantized by transformers +
    bitsandbytes (NF4, double quantization) and saved pre-quantized, with the 4-bit model's
    logits on the bert_tiny batch. Width 64 keeps every weight row a whole number of 64-value
    blocks: bitsandbytes 0.50.2's AVX-512 CPU dequantize indexes the scales per row and gets
    rows shorter than a block wrong (e.g. [32, 32] weights), which would poison the reference."""
    from transformers import BertForSequenceClassification

    root = os.path.join(FIX, "bnb_bert")
    shutil.rmtree(root, ignore_errors=True)
    base, out = os.path.join(root, "base"), os.path.join(root, "nf4_dq")
    torch.manual_seed(6)
    tiny_bert(hidden=64).save_pretrained(base, safe_serialization=True)
    shutil.copy(os.path.join(FIX, "bert_tiny", "model", "tokenizer.json"), base)
    model = load_4bit(base, "nf4", True, BertForSequenceClassification)
    model.save_pretrained(out)
    shutil.copy(os.path.join(base, "tokenizer.json"), out)
    ids = load_file(os.path.join(FIX, "bert_tiny", "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, os.path.join(root, "nf4_dq.expected.safetensors"))
    print("bnb_bert ->", root, tuple(logits.shape))


def verify_4bit_bert(model_dir):
    """Load a 4-bit BERT folder written by Rust (`peft quantize fixtures/bnb_bert/base`) in
    transformers; its logits must equal those of the bitsandbytes-quantized fixture with the
    dense head of the base (ours keeps the head in full precision)."""
    from transformers import BertForSequenceClassification

    ours = exact_4bit(BertForSequenceClassification.from_pretrained(model_dir, device_map="cpu")).eval()
    ref = exact_4bit(BertForSequenceClassification.from_pretrained(os.path.join(FIX, "bnb_bert", "nf4_dq"), device_map="cpu")).eval()
    dense = BertForSequenceClassification.from_pretrained(os.path.join(FIX, "bnb_bert", "base")).eval()
    ref.classifier = dense.classifier
    ids = load_file(os.path.join(FIX, "bert_tiny", "expected.safetensors"))["input_ids"]
    mask = (ids != 0).long()
    with torch.no_grad():
        err = (ours(input_ids=ids, attention_mask=mask).logits - ref(input_ids=ids, attention_mask=mask).logits).abs().max().item()
    kinds = sorted({type(m).__name__ for m in ours.modules() if "Linear" in type(m).__name__})
    print(f"bert: transformers loaded {model_dir} pre-quantized ({kinds}); max |logits - bitsandbytes| = {err:.2e}")
    return err < 1e-5


def verify_4bit(model_dir, case):
    """Load a 4-bit folder written by Rust in transformers; compare its logits and packed
    tensors with the bitsandbytes-quantized fixture of the same setting (case `bert`: see
    verify_4bit_bert)."""
    from transformers import LlamaForCausalLM

    if case == "bert":
        return verify_4bit_bert(model_dir)

    model = exact_4bit(LlamaForCausalLM.from_pretrained(model_dir, device_map="cpu")).eval()
    exp = load_file(os.path.join(FIX, "bnb_llama", f"{case}.expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"]).logits
    err = (logits - exp["logits"]).abs().max().item()
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    ref = load_file(os.path.join(FIX, "bnb_llama", case, "model.safetensors"))
    differing = {k: int((ours[k] != ref[k]).sum()) for k in ref if k in ours and ours[k].shape == ref[k].shape
                 and ours[k].dtype == torch.uint8 and "quant_state" not in k}
    missing = sorted(set(ref) ^ set(ours))
    print(f"{case}: transformers loaded {model_dir} pre-quantized; max |logits - bitsandbytes| = {err:.2e}; "
          f"differing bytes {sum(differing.values())} of {sum(ref[k].numel() for k in differing)}; key mismatch {missing}")
    return err < 1e-3 and not missing


METHOD_CASES = {
    "ia3_llama": dict(model="llama", cfg=lambda: __import__("peft").IA3Config(init_ia3_weights=False)),
    "ln_tuning_llama": dict(model="llama", cfg=lambda: __import__("peft").LNTuningConfig()),
    "ia3_bert": dict(model="bert", cfg=lambda: __import__("peft").IA3Config(task_type="SEQ_CLS", init_ia3_weights=False)),
    "ln_tuning_bert": dict(model="bert", cfg=lambda: __import__("peft").LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    "beft_llama": dict(model="llama", cfg=lambda: __import__("peft").BeftConfig()),
    # DoRA: random A and B (so B·A is not zero) and magnitudes moved off the norms (so m/‖W'‖ is
    # not 1); the Llama also has the gradients of its loss (grads.safetensors).
    "dora_llama": dict(model="llama", cfg=lambda: __import__("peft").LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "down_proj"])),
    # PiSSA and OLoRA: A and B from the base's SVD / QR, the residual left in the base; then
    # moved by noise, as training would.
    "pissa_llama": dict(model="llama", cfg=lambda: __import__("peft").LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "down_proj"])),
    "olora_llama": dict(model="llama", cfg=lambda: __import__("peft").LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora_bert": dict(model="bert", cfg=lambda: __import__("peft").LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
        target_modules=["query", "value", "output.dense"])),
    # LoftQ: the base becomes its NF4 values, A and B the rank-4 SVD of what NF4 lost (one and
    # two rounds). PEFT's loftq_init runs on CUDA only; `cpu_loftq` runs the same code on the CPU.
    "loftq_llama": dict(model="llama", cfg=lambda: __import__("peft").LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="loftq", target_modules=["q_proj", "v_proj", "down_proj"],
        loftq_config=__import__("peft").LoftQConfig(loftq_bits=4, loftq_iter=1))),
    "loftq2_llama": dict(model="llama", cfg=lambda: __import__("peft").LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="loftq", target_modules=["q_proj", "v_proj", "down_proj"],
        loftq_config=__import__("peft").LoftQConfig(loftq_bits=4, loftq_iter=2))),
    # Sparse deltas (PEFT's SUPERTUNING; our PaFi is its select_top=False): random values, so
    # the delta changes the output; the Llama also has the gradients of its loss.
    "pafi_llama": dict(model="llama", cfg=lambda: __import__("peft").SupertuningConfig(
        sparsity=0.9, select_top=False, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])),
    "supertuning_bert": dict(model="bert", cfg=lambda: __import__("peft").SupertuningConfig(
        task_type="SEQ_CLS", sparsity=0.95, init_weights=False, target_modules=["query", "value", "output.dense"])),
}


def method_base(kind, base=None):
    from transformers import AutoModelForCausalLM, BertForSequenceClassification, LlamaForCausalLM

    if base is not None and base.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(base), gguf_file=os.path.basename(base),
                                                    torch_dtype=torch.float32).eval()
    if kind == "llama":
        return LlamaForCausalLM.from_pretrained(os.path.join(FIX, "lora_tiny", "base_plain"), dtype=torch.float32).eval()
    return BertForSequenceClassification.from_pretrained(os.path.join(FIX, "bert_tiny", "model"), dtype=torch.float32).eval()


def method_outputs(model, kind, ids):
    """Logits (and for the Llama, 8 greedy tokens after the first row) of `model` on `ids`."""
    with torch.no_grad():
        if kind == "llama":
            logits = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
            new = gen[0, ids.shape[1]:].tolist()
            # Like the Rust greedy: stop before the first end-of-sequence token.
            eos = model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
            new = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
            return {"logits": logits.contiguous(), "greedy": torch.tensor(new, dtype=torch.int64)}
        return {"logits": model(input_ids=ids, attention_mask=(ids != 0).long()).logits.contiguous()}


def method_grads(model, ids):
    """The causal-LM loss of `model` on `ids` (labels = ids) and the gradient of every trainable
    parameter (named as in `named_parameters`, adapter name `default`), in training mode."""
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = p.grad.detach().contiguous()
    model.zero_grad()
    return out


def strip_machine_paths(adapter_dir):
    """No machine paths in committed fixtures: null the base model path and drop the model card."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = None
    if cfg.get("tokenizer_name_or_path"):
        cfg["tokenizer_name_or_path"] = None
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)


def smollm2_gguf():
    models = os.environ.get("PEFT_MODELS_DIR", os.path.join(ROOT, "models"))
    return os.path.join(models, os.path.basename(GGUF))


def make_methods_smollm2():
    """IA3 and LN tuning on SmolLM2-135M-Instruct (the GGUF `cargo xtask fetch` downloads),
    vectors and norm copies moved by 10% noise, with the chat prompt's ids, the logits of its
    last position and 8 greedy tokens (the full logits would be megabytes)."""
    from peft import IA3Config, LNTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    for i, (case, cfg) in enumerate({"ia3_smollm2": IA3Config(), "ln_tuning_smollm2": LNTuningConfig()}.items()):
        torch.manual_seed(3000 + i)
        model = get_peft_model(method_base("llama", gguf), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
        model.eval()
        out = method_outputs(model, "llama", ids)
        d = os.path.join(FIX, "methods_tiny", case)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(os.path.join(d, "adapter"))
        strip_machine_paths(os.path.join(d, "adapter"))
        save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": out["logits"][:, -1:].contiguous(),
                   "greedy": out["greedy"]}, os.path.join(d, "expected.safetensors"))
        print(case, "->", d, tok.decode(out["greedy"]))


class cpu_loftq:
    """PEFT's `loftq_init` moves the weight to "cuda" (or "xpu") to quantize it; while this is
    entered, such moves stay on the CPU, where bitsandbytes quantizes as well."""

    def __enter__(self):
        import bitsandbytes as bnb

        self.saved = (torch.Tensor.to, bnb.nn.Params4bit.to)
        tensor_to, params_to = self.saved

        def cpu(args, kwargs):
            args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
            if kwargs.get("device") in ("cuda", "xpu"):
                kwargs = {**kwargs, "device": "cpu"}
            return args, kwargs

        def t_to(self_, *args, **kwargs):
            args, kwargs = cpu(args, kwargs)
            return tensor_to(self_, *args, **kwargs)

        def p_to(self_, *args, **kwargs):
            args, kwargs = cpu(args, kwargs)
            return params_to(self_, *args, **kwargs)

        torch.Tensor.to, bnb.nn.Params4bit.to = t_to, p_to

    def __exit__(self, *exc):
        import bitsandbytes as bnb

        torch.Tensor.to, bnb.nn.Params4bit.to = self.saved


def lora_products(model):
    """`B·A` of every LoRA module (Hugging Face key of its A, `.lora_A` cut off)."""
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            out[n] = (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().contiguous()
    return out


def make_methods(cases=None):
    """IA3, LN tuning and BEFT adapters with changed weights (so they change the output), saved
    by PEFT (`cases`: only these, keeping the others' folders)."""
    from peft import get_peft_model

    out = os.path.join(FIX, "methods_tiny")
    llama_ids = load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    bert_ids = load_file(os.path.join(FIX, "bert_tiny", "expected.safetensors"))["input_ids"]
    for i, (case, spec) in enumerate(METHOD_CASES.items()):
        if cases is not None and case not in cases:
            continue
        kind = spec["model"]
        torch.manual_seed(2000 + i)
        if case.startswith("loftq"):
            with cpu_loftq():
                model = get_peft_model(method_base(kind), spec["cfg"]())
            # The initialisation itself: the NF4 base and B·A before any training.
            init = {f"{n}.base": m.get_base_layer().weight.detach().contiguous()
                    for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
            init.update({f"{n}.ba": t for n, t in lora_products(model).items()})
        else:
            model = get_peft_model(method_base(kind), spec["cfg"]())
            init = None
        d = os.path.join(out, case)
        shutil.rmtree(d, ignore_errors=True)
        converts = case in ("pissa_llama", "olora_llama")
        if converts:
            # PEFT's recipe for converting to plain LoRA: the initial adapter, saved before
            # training as `init_lora_weights=True` (so loading it leaves the base alone).
            cfg = model.peft_config["default"]
            init_flag, cfg.init_lora_weights = cfg.init_lora_weights, True
            model.save_pretrained(os.path.join(d, "initial"))
            cfg.init_lora_weights = init_flag
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "ln_tuning_layers" in n:
                    p.mul_(1 + 0.3 * torch.randn_like(p))  # trained copies differ from the base
                elif p.requires_grad and "beft_bias" in n:
                    p.add_(0.1 * torch.randn_like(p))  # trained biases are not zero
                elif p.requires_grad and case in ("pissa_llama", "olora_llama", "loftq_llama", "loftq2_llama"):
                    p.add_(0.05 * p.abs().mean() * torch.randn_like(p))  # trained factors moved
                elif p.requires_grad and "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn_like(p))  # trained magnitudes are not the norms
        grads = method_grads(model, llama_ids) if case in ("dora_llama", "pafi_llama") else None
        model.eval()
        ids = llama_ids if kind == "llama" else bert_ids
        model.save_pretrained(os.path.join(d, "adapter"))
        strip_machine_paths(os.path.join(d, "adapter"))
        if converts:
            # The trained adapter as a rank-2r LoRA of the original base.
            model.save_pretrained(os.path.join(d, "converted"),
                                  path_initial_model_for_weight_conversion=os.path.join(d, "initial"))
            strip_machine_paths(os.path.join(d, "converted"))
            strip_machine_paths(os.path.join(d, "initial"))
        save_file({"input_ids": ids.to(torch.int64).contiguous(), **method_outputs(model, kind, ids)},
                  os.path.join(d, "expected.safetensors"))
        if grads is not None:
            save_file(grads, os.path.join(d, "grads.safetensors"))
        if init is not None:
            save_file(init, os.path.join(d, "init.safetensors"))
        print(case, "->", d)


PROMPT_CASES = {
    # name: (peft config class, kwargs); num_virtual_tokens 5 unless given.
    "prompt_random_llama": ("PromptTuningConfig", dict()),
    "prompt_text_llama": ("PromptTuningConfig", dict(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                      prompt_tuning_init_text="what is the capital of france")),
    "p_tuning_mlp_llama": ("PromptEncoderConfig", dict(encoder_hidden_size=32)),
    "p_tuning_lstm_llama": ("PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM",
                                                         encoder_hidden_size=16, encoder_num_layers=2)),
    "prefix_llama": ("PrefixTuningConfig", dict()),
    "prefix_proj_llama": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=32)),
    "prompt_random_bert": ("PromptTuningConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=4)),
    "prefix_bert": ("PrefixTuningConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "p_tuning_mlp_bert": ("PromptEncoderConfig", dict(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                      encoder_hidden_size=16)),
}


def make_prompts(cases=None):
    """Prompt tuning (random and text init), P-tuning (MLP, LSTM) and prefix tuning (with and
    without the projection) on the tiny Llama, saved by PEFT in training mode (so the file holds
    the encoder's output), with the logits of the real positions, 8 greedy tokens, and the
    encoder's own weights (`encoder.safetensors`, PEFT's names under `prompt_encoder.default.`) so
    the Rust encoders can be checked against torch's."""
    import peft
    from peft import get_peft_model

    base_dir = os.path.join(FIX, "lora_tiny", "base_plain")
    llama_ids = load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    bert_ids = load_file(os.path.join(FIX, "bert_tiny", "expected.safetensors"))["input_ids"]
    for i, (case, (cls, kw)) in enumerate(PROMPT_CASES.items()):
        if cases is not None and case not in cases:
            continue
        kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 5, **kw}
        kind = "bert" if kw["task_type"] == "SEQ_CLS" else "llama"
        ids = bert_ids if kind == "bert" else llama_ids
        if kw.get("prompt_tuning_init") == "TEXT":
            kw["tokenizer_name_or_path"] = base_dir
        torch.manual_seed(4000 + i)
        model = get_peft_model(method_base(kind), getattr(peft, cls)(**kw))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "classifier" in n:
                    p.add_(0.1 * torch.randn_like(p))  # the trained head differs from the base's
        model.eval()
        n_v = kw["num_virtual_tokens"]
        out = method_outputs(model, kind, ids)
        if cls != "PrefixTuningConfig" and kind == "llama":
            out["logits"] = out["logits"][:, n_v:].contiguous()  # the real positions
        d = os.path.join(FIX, "prompts_tiny", case)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(os.path.join(d, "adapter"))
        strip_machine_paths(os.path.join(d, "adapter"))
        encoder = {n: p.detach().contiguous() for n, p in model.named_parameters() if "prompt_encoder" in n}
        save_file(encoder, os.path.join(d, "encoder.safetensors"))
        save_file({"input_ids": ids.to(torch.int64).contiguous(), **out}, os.path.join(d, "expected.safetensors"))
        print(case, "->", d, sorted(encoder), tuple(out["logits"].shape), out.get("greedy"))


def make_prompts_smollm2():
    """Prompt tuning and prefix tuning (grouped-query attention: 3 key/value heads of 64) on
    SmolLM2-135M-Instruct, with the chat prompt's ids, the logits of its last position and 8
    greedy tokens. The random virtual tokens are scaled to the model's embedding scale so the
    answer stays text."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    cases = {"prompt_smollm2": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
             "prefix_smollm2": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)}
    for i, (case, cfg) in enumerate(cases.items()):
        torch.manual_seed(5000 + i)
        model = get_peft_model(method_base("llama", gguf), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.mul_(0.05)
        model.eval()
        out = method_outputs(model, "llama", ids)
        d = os.path.join(FIX, "prompts_tiny", case)
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(os.path.join(d, "adapter"))
        strip_machine_paths(os.path.join(d, "adapter"))
        save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": out["logits"][:, -1:].contiguous(),
                   "greedy": out["greedy"]}, os.path.join(d, "expected.safetensors"))
        print(case, "->", d, tok.decode(out["greedy"]))


COMBINE_CASES = {
    # case: (combination_type, adapters, weights, extra add_weighted_adapter arguments)
    **{t: (t, ["a", "b"], [0.7, -0.4], dict(density=0.5)) for t in [
        "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
        "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]},
    "ties_frequency": ("ties", ["a", "b"], [0.6, 0.5], dict(density=0.3, majority_sign_method="frequency")),
    "cat_three_ranks": ("cat", ["a", "b", "c"], [0.5, 0.3, 0.2], {}),
    "svd_three_rank2": ("svd", ["a", "b", "c"], [0.5, 0.3, 0.2], dict(svd_rank=2)),
    "svd_clamp": ("svd", ["a", "b"], [0.7, 0.3], dict(svd_clamp=0.9)),
    "single_linear": ("svd", ["b"], [0.8], {}),
}


def make_combine():
    """Three random LoRA adapters on the tiny Llama (a: r 4, alpha 8; b: r 4, alpha 16,
    rsLoRA; c: r 2, alpha 4) and PEFT's `add_weighted_adapter` of them for every combination
    type, each saved as PEFT saves it, with the arguments (`case.json`) and DARE's Bernoulli
    masks in the order torch drew them (`masks.safetensors`)."""
    from peft import LoraConfig, get_peft_model

    out = os.path.join(FIX, "combine_tiny")
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(4000)
    targets = ["q_proj", "v_proj"]
    cfgs = {
        "a": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets),
        "b": LoraConfig(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False, target_modules=targets),
        "c": LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=targets),
    }
    model = get_peft_model(method_base("llama"), cfgs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, cfgs[name])
    model.save_pretrained(os.path.join(out, "adapters"), selected_adapters=["a", "b", "c"])
    os.remove(os.path.join(out, "adapters", "README.md"))
    for name in ("a", "b", "c"):
        strip_machine_paths(os.path.join(out, "adapters", name))
    real_bernoulli = torch.bernoulli
    for case, (ctype, adapters, weights, extra) in COMBINE_CASES.items():
        drawn = []

        def recording(t, *args, **kwargs):
            m = real_bernoulli(t, *args, **kwargs)
            drawn.append(m.detach().to(torch.uint8).contiguous())
            return m
        torch.manual_seed(5000)
        torch.bernoulli = recording
        try:
            model.add_weighted_adapter(adapters, weights, case, combination_type=ctype, **extra)
        finally:
            torch.bernoulli = real_bernoulli
        d = os.path.join(out, case)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, selected_adapters=[case])
            shutil.copytree(os.path.join(tmp, case), d)
        strip_machine_paths(d)
        with open(os.path.join(d, "case.json"), "w") as f:
            json.dump(dict(combination_type=ctype, adapters=adapters, weights=weights, **extra), f, indent=2)
        if drawn:
            save_file({f"mask_{i}": m for i, m in enumerate(drawn)}, os.path.join(d, "masks.safetensors"))
        model.delete_adapter(case)
        print(case, "->", d, f"({len(drawn)} masks)")


ADALORA = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, lora_alpha=8,
               beta1=0.85, beta2=0.85, orth_reg_weight=0.5, target_modules=["q_proj", "v_proj"])


def make_adalora():
    """A 12-step AdaLoRA run of PEFT on the tiny Llama (the settings in ADALORA; AdamW lr 1e-2
    without weight decay or clipping, the same two rows every step, `update_and_allocate(step)`
    after each optimizer step): the initial and final A, E, B (`initial.safetensors`,
    `final.safetensors`, PEFT's parameter names), each step's loss and budget and the final
    `rank_pattern` (`trace.json`), the adapter as PEFT saves it (cut to the kept ranks) and the
    trained model's logits and greedy tokens."""
    from peft import AdaLoraConfig, get_peft_model

    d = os.path.join(FIX, "adalora_tiny")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    ids = load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    torch.manual_seed(6000)
    model = get_peft_model(method_base("llama"), AdaLoraConfig(**ADALORA))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_file({n: p.detach().clone().contiguous() for n, p in params.items()},
              os.path.join(d, "initial.safetensors"))
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.0)
    model.train()
    trace = {"losses": [], "budgets": []}
    for step in range(ADALORA["total_step"]):
        loss = model(input_ids=ids, labels=ids).loss  # the orthogonality penalty included
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        trace["budgets"].append(model.base_model.rankallocator.budget_schedule(step)[0])
        opt.zero_grad()
        trace["losses"].append(loss.item())
    trace["rank_pattern"] = model.peft_config["default"].rank_pattern
    save_file({n: p.detach().clone().contiguous() for n, p in params.items()},
              os.path.join(d, "final.safetensors"))
    with open(os.path.join(d, "trace.json"), "w") as f:
        json.dump(trace, f, indent=1)
    model.eval()
    model.save_pretrained(os.path.join(d, "adapter"))
    strip_machine_paths(os.path.join(d, "adapter"))
    save_file({"input_ids": ids.to(torch.int64).contiguous(), **method_outputs(model, "llama", ids)},
              os.path.join(d, "expected.safetensors"))
    print("adalora_tiny ->", d, trace["budgets"], trace["rank_pattern"])


def make_proxy():
    """Proxy-tuning in PyTorch: the tiny Llama with biases (base_bias) steered by the tiny
    Llama without (base_plain) plus its list_rslora LoRA adapter (expert) against base_plain
    alone (anti-expert), alpha 0.5: the combined logits of the list_rslora ids and 8 greedy
    tokens decoded from the combined logits (each step a full forward of the three models)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    load = lambda name: LlamaForCausalLM.from_pretrained(os.path.join(FIX, "lora_tiny", name),
                                                         dtype=torch.float32).eval()
    base, anti = load("base_bias"), load("base_plain")
    expert = PeftModel.from_pretrained(load("base_plain"), os.path.join(FIX, "lora_tiny", "list_rslora", "adapter")).eval()
    ids = load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    alpha = 0.5
    combined = lambda x: base(input_ids=x).logits + alpha * (expert(input_ids=x).logits - anti(input_ids=x).logits)
    with torch.no_grad():
        logits = combined(ids)
        seq, new = ids[:1], []
        for _ in range(8):
            nxt = combined(seq)[0, -1].argmax().item()
            if nxt == 2:
                break
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    d = os.path.join(FIX, "proxy_tiny")
    os.makedirs(d, exist_ok=True)
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous(),
               "greedy": torch.tensor(new, dtype=torch.int64), "alpha": torch.tensor([alpha])},
              os.path.join(d, "expected.safetensors"))
    print("proxy_tiny ->", d, new)


def verify_method(adapter_dir, expected, base=None, tol="1e-4"):
    """Load an adapter folder written by Rust (any method) into Python PEFT on the base it was
    made for (the tiny fixture, or `base`: a .gguf such as SmolLM2); its logits must match
    `expected` (written by Rust) within `tol` and its greedy tokens exactly."""
    from peft import PeftConfig, PeftModel

    exp = load_file(expected)
    cfg = PeftConfig.from_pretrained(adapter_dir)
    kind = "bert" if cfg.task_type == "SEQ_CLS" else "llama"
    model = PeftModel.from_pretrained(method_base(kind, base), adapter_dir).eval()
    got = method_outputs(model, kind, exp["input_ids"])
    if kind == "llama" and cfg.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        got["logits"] = got["logits"][:, cfg.num_virtual_tokens:]  # the real positions, as ours
    err = (got["logits"] - exp["logits"]).abs().max().item()
    same = "greedy" not in exp or torch.equal(got["greedy"], exp["greedy"])
    print(f"{cfg.peft_type}: Python PEFT loaded {adapter_dir}; max |logits - ours| = {err:.2e}; greedy equal: {same}")
    return err < float(tol) and same


def verify(adapter_dir, case):
    """Load an adapter folder written by Rust into Python PEFT and compare logits."""
    from peft import PeftModel

    spec = CASES[case]
    base = tiny_base(spec["base"] == "bias")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    exp = load_file(os.path.join(FIX, "lora_tiny", case, "expected.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=exp["input_ids"]).logits
    err = (logits - exp["logits"]).abs().max().item()
    print(f"{case}: Python PEFT loaded {adapter_dir}; max |logits - expected| = {err:.2e}")
    return err < 1e-5


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", nargs=2, metavar=("ADAPTER_DIR", "CASE"))
    ap.add_argument("--verify-4bit", nargs=2, metavar=("MODEL_DIR", "CASE"))
    ap.add_argument("--verify-method", nargs="+", metavar="ARG",
                    help="ADAPTER_DIR EXPECTED [BASE.gguf [TOLERANCE]]")
    ap.add_argument("--only", choices=["tiny", "train", "bert", "bnb", "bnb_llama", "bnb_bert", "smollm2", "methods", "prompts", "prompts_smollm2", "proxy", "dora", "combine", "pissa", "loftq", "adalora", "sparse"])
    a = ap.parse_args()
    if a.verify:
        sys.exit(0 if verify(*a.verify) else 1)
    if a.verify_4bit:
        sys.exit(0 if verify_4bit(*a.verify_4bit) else 1)
    if a.verify_method:
        sys.exit(0 if verify_method(*a.verify_method) else 1)
    if a.only in (None, "tiny"):
        make_tiny()
    if a.only in (None, "train"):
        make_train()
    if a.only in (None, "bert"):
        make_bert()
    if a.only in (None, "bnb"):
        make_bnb()
    if a.only in (None, "bnb_llama"):
        make_bnb_llama()
    if a.only in (None, "bnb_bert"):
        make_bnb_bert()
    if a.only in (None, "smollm2"):
        make_smollm2()
    if a.only in (None, "methods"):
        make_methods()
        make_methods_smollm2()
    if a.only in (None, "prompts"):
        make_prompts()
        make_prompts_smollm2()
    if a.only == "prompts_smollm2":
        make_prompts_smollm2()
    if a.only in (None, "adalora"):
        make_adalora()
    if a.only in (None, "combine"):
        make_combine()
    if a.only == "dora":
        make_methods(["dora_llama", "dora_bert"])
    if a.only == "pissa":
        make_methods(["pissa_llama", "olora_llama"])
    if a.only == "loftq":
        make_methods(["loftq_llama", "loftq2_llama"])
    if a.only == "sparse":
        make_methods(["pafi_llama", "supertuning_bert"])
    if a.only in (None, "proxy"):
        make_proxy()
