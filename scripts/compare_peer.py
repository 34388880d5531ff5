"""The Python side of `cargo xtask compare --peer`: one method on one task in Hugging Face PEFT
(versions in shared DESIGN.md), on exactly the examples, batches, hyper-parameters and method
settings of the Rust run, f32 on the CPU with the same threads.

    compare_peer.py SPEC.json     # prints {"trainable":..,"total":..,"step_ms":..,"step_peak_rss":..,"metrics":{..}}

SPEC (written by crates/xtask/src/compare.rs): task ("sentiment" | "chat"), model (a folder or
a .gguf), method ("full", "bitfit" or a PEFT method), adapter_config (the config the Rust run
saved, PEFT's own format; null for full and bitfit), num_labels, train / test (token ids with a
label, or tokens with a loss mask), batches (the example indices of every step), pad, lr,
warmup, steps, weight_decay, max_grad_norm, threads.
"""
import json
import math
import os
import sys
import time

import torch


def rss_peak_reset():
    """Reset the process's peak RSS (Linux: write 5 to clear_refs), return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss("VmRSS")


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_model(spec):
    """The task's model in f32; for QLoRA saved and loaded back 4-bit by transformers +
    bitsandbytes (NF4, double quantization, f32 compute, the head kept f32), as a QLoRA user
    loads a model."""
    import tempfile

    from transformers import AutoModelForCausalLM, BertForSequenceClassification, BitsAndBytesConfig

    path, cls = spec["model"], spec["task"] == "sentiment"
    if cls:
        model = BertForSequenceClassification.from_pretrained(path, num_labels=spec["num_labels"], dtype=torch.float32,
                                                              ignore_mismatched_sizes=True)
    elif path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if spec["method"] != "qlora":
        return model
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=["classifier"] if cls else ["lm_head"])
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model.save_pretrained(d)
        kind = BertForSequenceClassification if cls else AutoModelForCausalLM
        return kind.from_pretrained(d, quantization_config=cfg, device_map="cpu", dtype=torch.float32)


def apply_method(model, spec):
    method = spec["method"]
    if method == "full":
        return model
    if method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(".bias") or name.startswith("classifier.")
        return model
    from peft import PeftConfig, get_peft_model

    config = dict(spec["adapter_config"])
    for k in ("peft_version", "base_model_name_or_path", "auto_mapping"):
        config.pop(k, None)
    config["inference_mode"] = False  # saved configs say true; this one trains
    return get_peft_model(model, PeftConfig.from_peft_type(**config))


def schedule(spec, step):
    """Our default schedule (cosine-floor): warmup from peak/warmup, cosine to 10% of the peak."""
    peak, warmup, total = spec["lr"], spec["warmup"], spec["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sentiment_batch(rows):
    width = max(len(r["ids"]) for r in rows)
    ids = torch.tensor([r["ids"] + [0] * (width - len(r["ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["ids"]) + [0] * (width - len(r["ids"])) for r in rows])
    return ids, mask, torch.tensor([r["label"] for r in rows])


def chat_batch(rows, pad):
    width = max(len(r["tokens"]) for r in rows)
    ids = torch.tensor([r["tokens"] + [pad] * (width - len(r["tokens"])) for r in rows])
    mask = torch.tensor([r["loss_mask"] + [0.0] * (width - len(r["loss_mask"])) for r in rows])
    return ids, mask


def chat_loss(model, ids, mask):
    """Mean cross-entropy over the predicted positions whose mask is 1 (as the Rust loss)."""
    logits = model(input_ids=ids[:, :-1]).logits
    logits = logits[:, logits.shape[1] - (ids.shape[1] - 1):]  # prompt tuning adds virtual positions
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").reshape(ids.shape[0], -1)
    m = mask[:, 1:]
    return (nll * m).sum() / m.sum().clamp(min=1)


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = apply_method(load_model(spec), spec).train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=spec["weight_decay"])
    train = spec["train"]
    times, peak = [], 0
    for step, idx in enumerate(spec["batches"]):
        rows = [train[i] for i in idx]
        for g in opt.param_groups:
            g["lr"] = schedule(spec, step)
        before = rss_peak_reset()
        t = time.perf_counter()
        if spec["task"] == "sentiment":
            ids, mask, labels = sentiment_batch(rows)
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        else:
            ids, mask = chat_batch(rows, spec["pad"])
            loss = chat_loss(model, ids, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
        opt.step()
        if spec["method"] == "adalora":
            # AdaLoRA's rank allocation runs after each optimizer step, as PEFT documents.
            model.base_model.update_and_allocate(step)
        times.append((time.perf_counter() - t) * 1e3)
        peak = max(peak, rss("VmHWM") - before)
    model.eval()
    with torch.no_grad():
        if spec["task"] == "sentiment":
            n = spec["num_labels"]
            confusion = [[0] * n for _ in range(n)]
            for i in range(0, len(spec["test"]), 64):
                rows = spec["test"][i:i + 64]
                ids, mask, labels = sentiment_batch(rows)
                pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
                for p, y in zip(pred.tolist(), labels.tolist()):
                    confusion[y][p] += 1
            total_n = sum(map(sum, confusion))
            acc = sum(confusion[c][c] for c in range(n)) / total_n
            f1 = sum(0.0 if confusion[c][c] == 0 else 2 * confusion[c][c] / (sum(r[c] for r in confusion) + sum(confusion[c]))
                     for c in range(n)) / n
            metrics = {"accuracy": acc, "macro_f1": f1}
        else:
            total_loss, count = 0.0, 0.0
            for i in range(0, len(spec["test"]), 8):
                rows = spec["test"][i:i + 8]
                ids, mask = chat_batch(rows, spec["pad"])
                k = float(sum(sum(r["loss_mask"][1:]) for r in rows))
                total_loss += chat_loss(model, ids, mask).item() * k
                count += k
            metrics = {"held_out_loss": total_loss / max(count, 1.0)}
    steady = sorted(times[1:] or times)
    print(json.dumps({"trainable": trainable, "total": total, "step_ms": steady[len(steady) // 2],
                      "step_peak_rss": peak, "metrics": metrics}))


if __name__ == "__main__":
    main(sys.argv[1])
