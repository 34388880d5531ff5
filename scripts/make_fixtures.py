"""Reference fixtures from Hugging Face transformers + PEFT (versions in shared DESIGN.md).

    scripts/make_fixtures.sh                 # write fixtures/
    scripts/make_fixtures.sh --verify DIR    # load a Rust-saved adapter folder in Python PEFT

fixtures/lora_tiny/: a small random Llama saved with save_pretrained, and for each case an
adapter saved by PEFT with the inputs and the logits PEFT computes.
fixtures/smollm2/: prompt token ids and logits of SmolLM2-135M-Instruct loaded from the GGUF
by transformers.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
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


def make_bert():
    """A tiny BertForSequenceClassification (3 labels) with a word-level BERT-style tokenizer,
    and its logits on a padded batch."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification

    root = os.path.join(FIX, "bert_tiny")
    shutil.rmtree(root, ignore_errors=True)
    out = os.path.join(root, "model")
    torch.manual_seed(5)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS[: 64 - len(vocab)]:
        vocab[w] = len(vocab)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
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
    ap.add_argument("--only", choices=["tiny", "bert", "bnb", "smollm2"])
    a = ap.parse_args()
    if a.verify:
        sys.exit(0 if verify(*a.verify) else 1)
    if a.only in (None, "tiny"):
        make_tiny()
    if a.only in (None, "bert"):
        make_bert()
    if a.only in (None, "bnb"):
        make_bnb()
    if a.only in (None, "smollm2"):
        make_smollm2()
