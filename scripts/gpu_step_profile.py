"""Where a BERT-base bf16 training step's time goes on one CUDA GPU: the bare step (bf16 autocast, our loss,
clipping and fused AdamW; no data loading, fixed length 128), eager at batch 64/128/256 and compiled at 256.
Wall time per step against the GPU's busy time (torch.profiler) tells a launch-bound step from a GPU-bound one.

    PYTHONPATH=. python scripts/gpu_step_profile.py [--top]

Random weights, random token ids; needs only torch, transformers and this project. The compiled rows take a
minute or two each to compile.
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertForSequenceClassification

from bert_finetune import optim

LENGTH = 128
NON_EMBEDDING = 12 * (4 * 768 ** 2 + 2 * 768 * 3072)  # BERT-base's weight matrices


def make(device):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2)).to(device)


def bench(name, model, batch, peak, steps=30, compile_kw=None, top=False):
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if compile_kw is not None:
        model.forward = torch.compile(model.forward, **compile_kw)

    def step(ids, mask, labels):
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(logits.float(), labels).backward()
        optim.clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, LENGTH), generator=g).to(device)
    mask = torch.ones(batch, LENGTH, dtype=torch.long, device=device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step(ids, mask, labels)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step(ids, mask, labels)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(ids, mask, labels)
        torch.cuda.synchronize()
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e6
    mfu = batch * LENGTH * 6 * NON_EMBEDDING / seconds / peak
    print(f"| {name} | {batch} | {seconds * 1e3:.1f} ms | {busy * 1e3:.1f} ms | {batch / seconds:,.0f} | {mfu:.1%} | "
          f"{warm:.0f} s |", flush=True)
    if top:
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_step_profile: no CUDA GPU here")
    from bert_finetune import reporting
    device = torch.device("cuda")
    peak = reporting.matmul_peak_flops(device, "bf16")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 peak {peak / 1e12:.0f} TFLOP/s\n")
    print("| step | batch | wall per step | GPU busy | samples/s | MFU | warm-up |\n|---|---|---|---|---|---|---|")
    top = "--top" in sys.argv
    for batch in (64, 128, 256):
        bench("eager", make(device), batch, peak, top=top and batch == 256)
    bench("torch.compile", make(device), 256, peak, compile_kw={"dynamic": False})


if __name__ == "__main__":
    main()
