#!/usr/bin/env python3
"""PyTorch peer of xax's character-level GPT: nanoGPT's model and training loop on the same text.

The model is nanoGPT's GPT (token and position embeddings, pre-LayerNorm blocks of causal self-attention and a
GELU(tanh) MLP, final LayerNorm, head tied to the token embedding, biases on, no dropout) with nanoGPT's
initialisation. Training is nanoGPT's train_shakespeare_char on CPU: AdamW(betas=(0.9, 0.99), weight decay 0.1
on 2-D parameters only), linear warm-up over 100 steps then cosine decay to lr/10, gradient clipping at 1.0,
random windows of the first 90 % of the text. ``--policy mixed`` runs forward and loss under
``torch.autocast('cpu', dtype=torch.bfloat16)`` with fp32 parameters.

The validation loss is measured on the same windows as xax's (non-overlapping, spread evenly over the last
10 %), so the two figures compare the models, not the samples.

Command line (xax's benchmark binary invokes this script):

    python3 torch_char_gpt.py --text FILE [--threads T] [--policy default|mixed] [--steps N]
        [--batch-size B] [--block-size T] [--n-layer L] [--n-head H] [--n-embd C] [--lr LR]
        [--eval-batches E] [--seed S] [--json OUT] [--system-malloc]

Output: ``median_step_ms=<float>`` and ``val_loss=<float>`` lines on stdout; the JSON object has ``policy``,
``threads``, ``steps``, ``median_step_ms``, ``step_ms``, ``val_loss``, ``final_train_loss``, ``vocabulary``,
``torch_version``. Exit status: 0 on success, 2 on bad arguments, 3 when torch cannot be imported, 4 when the
text is missing or too short.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="the corpus (any text file)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--policy", choices=("default", "mixed"), default="default")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default allocator settings")
    args = p.parse_args(argv)
    for name in ("threads", "steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_embd % args.n_head != 0:
        p.error("--n-embd must be a multiple of --n-head")
    return args


# As torch_mlp.py: glibc's defaults hand PyTorch's freed activations back to the kernel, so every step pays
# first-touch page faults again; keep freed memory in the process (--system-malloc keeps the defaults).
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(1 << 28),
}
TUNED_MARKER = "XAX_TORCH_CHAR_GPT_MALLOC_TUNED"


def main(argv):
    args = parse_args(argv)
    if not args.system_malloc and os.environ.get(TUNED_MARKER) != "1":
        environment = dict(os.environ, **TUNED_MALLOC, **{TUNED_MARKER: "1"})
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], environment)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError as error:
        print(f"torch_char_gpt.py: cannot import torch ({error}); run /usr/bin/python3 with python3-torch",
              file=sys.stderr)
        return 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    try:
        with open(args.text, "rb") as f:
            data = f.read()
    except OSError as error:
        print(f"torch_char_gpt.py: cannot read --text: {error}", file=sys.stderr)
        return 4
    vocabulary = sorted(set(data))
    index = {b: i for i, b in enumerate(vocabulary)}
    n_train = len(data) * 9 // 10
    if n_train < args.block_size + 1 or len(data) - n_train < args.block_size + 1:
        print("torch_char_gpt.py: the text is too short for one window per split", file=sys.stderr)
        return 4
    ids = torch.tensor([index[b] for b in data], dtype=torch.long)
    train, val = ids[:n_train], ids[n_train:]

    class Block(nn.Module):
        def __init__(self, c, heads):
            super().__init__()
            self.heads = heads
            self.ln_1 = nn.LayerNorm(c)
            self.c_attn = nn.Linear(c, 3 * c)
            self.c_proj = nn.Linear(c, c)
            self.ln_2 = nn.LayerNorm(c)
            self.c_fc = nn.Linear(c, 4 * c)
            self.mlp_proj = nn.Linear(4 * c, c)
            mask = torch.tril(torch.ones(args.block_size, args.block_size)).view(1, 1, args.block_size,
                                                                                 args.block_size)
            self.register_buffer("mask", mask)

        def attention(self, x):
            b, t, c = x.size()
            q, k, v = self.c_attn(x).split(c, dim=2)
            q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            # nanoGPT's path without flash attention (PyTorch < 2.0).
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
            return self.c_proj(y)

        def forward(self, x):
            x = x + self.attention(self.ln_1(x))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            c = args.n_embd
            self.wte = nn.Embedding(len(vocabulary), c)
            self.wpe = nn.Embedding(args.block_size, c)
            self.blocks = nn.ModuleList([Block(c, args.n_head) for _ in range(args.n_layer)])
            self.ln_f = nn.LayerNorm(c)
            self.lm_head = nn.Linear(c, len(vocabulary), bias=False)
            self.wte.weight = self.lm_head.weight  # weight tying
            self.apply(self._init)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layer))

        @staticmethod
        def _init(module):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets):
            t = idx.size(1)
            x = self.wte(idx) + self.wpe(torch.arange(t, dtype=torch.long))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    warmup, min_lr = 100, args.lr / 10

    def learning_rate(step):
        if step < warmup:
            return args.lr * (step + 1) / (warmup + 1)
        if step > args.steps:
            return min_lr
        ratio = min((step - warmup) / max(args.steps - warmup, 1), 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - min_lr)

    def batch(split, starts):
        x = torch.stack([split[s:s + args.block_size] for s in starts])
        y = torch.stack([split[s + 1:s + 1 + args.block_size] for s in starts])
        return x, y

    def loss_of(x, y):
        if args.policy == "mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, y)
        return model(x, y)

    step_ms, losses = [], []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        starts = torch.randint(len(train) - args.block_size - 1, (args.batch_size,)).tolist()
        x, y = batch(train, starts)
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step_ms.append((time.perf_counter() - begin) * 1e3)
        losses.append(float(loss))

    # xax's spread_window_starts: up to eval_batches * batch_size non-overlapping windows, evenly spread.
    windows = (len(val) - 1) // args.block_size
    n = min(windows, args.eval_batches * args.batch_size)
    stride = (windows // n) * args.block_size if n > 0 else args.block_size
    starts = [k * stride for k in range(n)]
    model.eval()
    total, batches = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(starts) - args.batch_size + 1, args.batch_size):
            total += float(loss_of(*batch(val, starts[first:first + args.batch_size])))
            batches += 1
    val_loss = total / max(batches, 1)
    print(f"val_loss_full={val_loss!r}", file=sys.stderr)

    steady = step_ms[min(len(step_ms) // 10, 5):] or step_ms
    tail = max(1, len(losses) // 10)
    result = {
        "policy": args.policy,
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "vocabulary": len(vocabulary),
        "median_step_ms": statistics.median(steady),
        "step_ms": step_ms,
        "val_loss": val_loss,
        "final_train_loss": statistics.fmean(losses[-tail:]),
        "torch_version": torch.__version__,
    }
    print(f"median_step_ms={result['median_step_ms']:.4f}")
    print(f"val_loss={val_loss:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
