"""Reference fixtures from AdapterHub `adapters` 1.3.0 (transformers 4.57.6; its own venv,
made by scripts/adapters_venv.sh, see shared formats.md §B).

    python scripts/adapterhub_fixtures.py                          # write fixtures/adapterhub_tiny/
    python scripts/adapterhub_fixtures.py --verify DIR EXPECTED    # load a Rust-saved adapter
    python scripts/adapterhub_fixtures.py --verify-fusion A B FUSION EXPECTED   # and a fusion

fixtures/adapterhub_tiny/<case>/: a bottleneck adapter saved by AdapterHub
(`save_adapter(..., use_safetensors=True)`) on the tiny Llama (lora_tiny/base_plain) or the tiny
BERT classifier (bert_tiny/model), its weights moved by noise so that it changes the output,
with the input ids, AdapterHub's logits and, for the Llama, 8 greedy tokens after the first row.
fixtures/adapterhub_tiny/fusion_*/: two Pfeiffer adapters (a/, b/) and their AdapterFusion
(fusion/), dynamic, static and dynamic with temperature, with the fused model's outputs.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")

from fixture_paths import portable_configs  # noqa: E402  (scripts/ is on the path)


CASES = {
    # name: (model, config builder)
    "seq_bn_llama": ("llama", lambda a: a.SeqBnConfig()),
    "double_seq_bn_llama": ("llama", lambda a: a.DoubleSeqBnConfig()),
    "par_bn_llama": ("llama", lambda a: a.ParBnConfig()),
    # The options beyond the presets: per-layer reduction factor, adapter norms, channel
    # scaling, the residual after the norm, gelu, an attention adapter left out of layer 1. (`ln_before`
    # cannot be saved as safetensors by AdapterHub 1.3.0: its norm is registered under two names;
    # the Rust tests load our own ln_before files in AdapterHub instead. `post_add` fails in
    # AdapterHub where the sub-layer has no norm, as on Llama, so it is tested on BERT.)
    "custom_llama": ("llama", lambda a: a.BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor={"0": 4, "default": 8},
        non_linearity="gelu", ln_after=True, scaling="channel",
        original_ln_before=True, residual_before_ln=False, leave_out=[1])),
    "seq_bn_bert": ("bert", lambda a: a.SeqBnConfig(reduction_factor=4)),
    "double_seq_bn_bert": ("bert", lambda a: a.DoubleSeqBnConfig(reduction_factor=4)),
    "par_bn_bert": ("bert", lambda a: a.ParBnConfig(scaling="learned")),
    "custom_bert": ("bert", lambda a: a.BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=8, non_linearity="tanh",
        residual_before_ln="post_add", original_ln_before=True, adapter_residual_before_ln=True,
        ln_after=True)),
}


def base_model(kind):
    import adapters
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    if kind == "llama":
        model = LlamaForCausalLM.from_pretrained(os.path.join(FIX, "lora_tiny", "base_plain"), dtype=torch.float32)
    else:
        model = BertForSequenceClassification.from_pretrained(os.path.join(FIX, "bert_tiny", "model"),
                                                              dtype=torch.float32)
    adapters.init(model)
    return model.eval()


def outputs(model, kind, ids):
    """Logits (and for the Llama, 8 greedy tokens after the first row) of `model` on `ids`."""
    with torch.no_grad():
        if kind == "llama":
            logits = model(input_ids=ids).logits
            seq = ids[:1]
            new = []
            for _ in range(8):  # greedy by hand: generate() with adapters adds nothing here
                nxt = model(input_ids=seq).logits[0, -1].argmax().item()
                if nxt == model.config.eos_token_id:
                    break
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
            return {"logits": logits.contiguous(), "greedy": torch.tensor(new, dtype=torch.int64)}
        return {"logits": model(input_ids=ids, attention_mask=(ids != 0).long()).logits.contiguous()}


def inputs(kind):
    if kind == "llama":
        return load_file(os.path.join(FIX, "lora_tiny", "list_rslora", "expected.safetensors"))["input_ids"]
    return load_file(os.path.join(FIX, "bert_tiny", "expected.safetensors"))["input_ids"]


def make(cases=None):
    import adapters

    for i, (case, (kind, build)) in enumerate(CASES.items()):
        if cases and case not in cases:
            continue
        torch.manual_seed(4000 + i)
        model = base_model(kind)
        model.add_adapter(case, config=build(adapters))
        model.set_active_adapters(case)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f"adapters.{case}." in n:
                    p.add_(0.1 * torch.randn_like(p))  # a trained adapter is not at its init
        model.eval()
        ids = inputs(kind)
        d = os.path.join(FIX, "adapterhub_tiny", case)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        model.save_adapter(os.path.join(d, "adapter"), case, use_safetensors=True)
        if kind == "llama":
            # The frozen output head AdapterHub saves beside a causal LM's adapter is the base's.
            for f in ("model_head.safetensors", "head_config.json"):
                os.remove(os.path.join(d, "adapter", f))
        save_file({"input_ids": ids.to(torch.int64).contiguous(), **outputs(model, kind, ids)},
                  os.path.join(d, "expected.safetensors"))
        portable_configs(d)
        print(case, "->", d)


FUSION_CASES = {
    # name: (model, fusion preset); two seq_bn adapters `a` and `b` fused.
    "fusion_llama": ("llama", "dynamic"),
    "fusion_bert": ("bert", "dynamic"),
    "fusion_static_llama": ("llama", "static"),
    # dynamic with temperature=True: the scores are divided by T = 50, 49.95, ... down to 1
    # (logits at T = 50, 25 and 1).
    "fusion_temperature_llama": ("llama", "temperature"),
}

# Forward passes before `logits_floor` in a temperature case: T has reached 1 by then.
TEMPERATURE_PASSES = 1000


def make_fusions(cases=None):
    """AdapterFusion of two Pfeiffer adapters (`a`, `b`), every weight moved by noise: the two
    adapters and the fusion saved as AdapterHub saves them, with the fused model's logits."""
    import adapters
    from adapters.composition import Fuse

    for i, (case, (kind, preset)) in enumerate(FUSION_CASES.items()):
        if cases and case not in cases:
            continue
        torch.manual_seed(5000 + i)
        model = base_model(kind)
        for name in ("a", "b"):
            model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=4))
        config = adapters.DynamicAdapterFusionConfig(temperature=True) if preset == "temperature" else preset
        model.add_adapter_fusion(Fuse("a", "b"), config=config)
        model.set_active_adapters(Fuse("a", "b"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".adapters." in n or "adapter_fusion_layer" in n:
                    p.add_(0.1 * torch.randn_like(p))
        model.eval()
        ids = inputs(kind)
        d = os.path.join(FIX, "adapterhub_tiny", case)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name in ("a", "b"):
            model.save_adapter(os.path.join(d, name), name, use_safetensors=True, with_head=False)
        model.save_adapter_fusion(os.path.join(d, "fusion"), "a,b", use_safetensors=True, with_head=False)
        if preset == "temperature":
            # Every forward pass lowers T by 0.05: the logits at T = 50 (the first pass),
            # 25 (pass 501) and 1 (pass 1001; T reaches 1 at pass 981).
            with torch.no_grad():
                passes = []
                for part in range(3):
                    if part:
                        for _ in range(TEMPERATURE_PASSES // 2 - 1):
                            model(input_ids=ids[:1, :1])
                    passes.append(model(input_ids=ids).logits.contiguous())
            expected = dict(zip(("logits", "logits_mid", "logits_floor"), passes))
        else:
            expected = outputs(model, kind, ids)
        save_file({"input_ids": ids.to(torch.int64).contiguous(), **expected},
                  os.path.join(d, "expected.safetensors"))
        portable_configs(d)
        print(case, "->", d)


def verify_fusion(a_dir, b_dir, fusion_dir, expected, tol="1e-4"):
    """Load two adapters and a fusion written by Rust into AdapterHub; compare as `verify`."""
    from adapters.composition import Fuse

    exp = load_file(expected)
    with open(os.path.join(fusion_dir, "adapter_fusion_config.json")) as f:
        cfg = json.load(f)
    kind = "bert" if cfg.get("model_type") == "bert" else "llama"
    model = base_model(kind)
    for d in (a_dir, b_dir):
        model.load_adapter(d, use_safetensors=True, with_head=False)
    model.load_adapter_fusion(fusion_dir, use_safetensors=True, with_head=False)
    model.set_active_adapters(Fuse(*cfg["adapter_names"]))
    model.eval()
    got = outputs(model, kind, exp["input_ids"])
    err = (got["logits"] - exp["logits"]).abs().max().item()
    same = "greedy" not in exp or torch.equal(got["greedy"], exp["greedy"])
    print(f"AdapterHub loaded the fusion {fusion_dir}; max |logits - ours| = {err:.2e}; greedy equal: {same}")
    return err < float(tol) and same


def verify(adapter_dir, expected, tol="1e-4"):
    """Load an adapter folder written by Rust into AdapterHub on the tiny base it was made for;
    its logits must match `expected` (written by Rust) within `tol` and its greedy tokens exactly."""
    exp = load_file(expected)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    kind = "bert" if cfg.get("model_type") == "bert" else "llama"
    model = base_model(kind)
    name = model.load_adapter(adapter_dir, set_active=True, use_safetensors=True)
    model.eval()
    got = outputs(model, kind, exp["input_ids"])
    err = (got["logits"] - exp["logits"]).abs().max().item()
    same = "greedy" not in exp or torch.equal(got["greedy"], exp["greedy"])
    print(f"AdapterHub loaded {adapter_dir} as `{name}`; max |logits - ours| = {err:.2e}; greedy equal: {same}")
    return err < float(tol) and same


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", nargs="+", metavar="ARG", help="ADAPTER_DIR EXPECTED [TOLERANCE]")
    ap.add_argument("--verify-fusion", nargs="+", metavar="ARG",
                    help="A_DIR B_DIR FUSION_DIR EXPECTED [TOLERANCE]")
    ap.add_argument("--only", nargs="+", choices=list(CASES) + list(FUSION_CASES))
    a = ap.parse_args()
    if a.verify:
        sys.exit(0 if verify(*a.verify) else 1)
    if a.verify_fusion:
        sys.exit(0 if verify_fusion(*a.verify_fusion) else 1)
    make(a.only)
    make_fusions(a.only)
