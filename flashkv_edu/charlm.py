"""A small character-level model trained on the Python standard library's own source.

    python -m flashkv_edu.charlm train            # about 10 minutes on a 2-core CPU; writes data/char_model.pt
    python -m flashkv_edu.charlm train --draft    # the 1-layer draft model of notebook 14: data/char_draft.pt

The text is available offline everywhere Python is: the ``.py`` files at the top level of the
standard library directory, sorted by name. Characters outside printable ASCII map to ``?``.
The checkpoint (fp16 weights, about 1.5 MB) ships with the package; notebook 08 loads it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from .cli import float_in
from .model import ModelConfig, TinyDecoder

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "DRAFT_CHECKPOINT",
    "DRAFT_CONFIG",
    "VOCAB",
    "decode",
    "encode",
    "load",
    "stdlib_text",
    "train",
]

CHECKPOINT = Path(__file__).with_name("data") / "char_model.pt"
DRAFT_CHECKPOINT = Path(__file__).with_name("data") / "char_draft.pt"
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols
CONFIG = ModelConfig(vocab_size=len(VOCAB), dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seqlen=1024)
DRAFT_CONFIG = ModelConfig(vocab_size=len(VOCAB), dim=128, n_layers=1, n_heads=4, n_kv_heads=2, max_seqlen=1024)
"""The draft model of speculative decoding (notebook 14): the same vocabulary and width, one layer."""
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    """Characters to token ids (tabs become 4 spaces, anything else unknown becomes ``?``)."""
    text = text.replace("\t", "    ")
    return [_INDEX.get(ch, _INDEX["?"]) for ch in text]


def decode(ids) -> str:
    """Token ids back to text."""
    return "".join(VOCAB[int(i)] for i in ids)


def stdlib_text(max_chars: int = 6_000_000) -> str:
    """Concatenated source of the standard library's top-level modules (sorted by name)."""
    root = Path(os.__file__).parent
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def train(
    minutes: float = 10.0,
    batch: int = 32,
    seqlen: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    out: Path = CHECKPOINT,
    config: ModelConfig = CONFIG,
) -> dict:
    """Train ``config`` on :func:`stdlib_text` for about ``minutes`` and save the checkpoint."""
    torch.manual_seed(seed)
    data = torch.tensor(encode(stdlib_text()), dtype=torch.long)
    split = int(0.98 * len(data))
    train_data, val_data = data[:split], data[split:]
    model = TinyDecoder(config, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)

    def batch_of(src):
        idx = torch.randint(0, len(src) - seqlen - 1, (batch,), generator=gen)
        return torch.stack([src[i : i + seqlen + 1] for i in idx.tolist()])

    start, step, budget = time.time(), 0, minutes * 60
    est_steps = None
    while True:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        if step == 20:
            est_steps = int(budget / (elapsed / 20))
        total = est_steps or 10_000
        frac = min(step / total, 1.0)
        for group in opt.param_groups:  # warmup, then cosine decay to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model.loss(batch_of(train_data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed:5.0f} s", flush=True)
        step += 1
    model.eval()
    with torch.no_grad():
        val = sum(model.loss(batch_of(val_data)).item() for _ in range(10)) / 10
    meta = {"steps": step, "val_loss": val, "minutes": minutes, "batch": batch, "seqlen": seqlen, "chars": len(data),
            "n_layers": config.n_layers}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}, "meta": meta}, out)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB): {step} steps, validation loss {val:.3f}")
    return meta


def load(path: Path = CHECKPOINT, dtype=torch.float32) -> tuple[TinyDecoder, dict]:
    """The trained model (in ``dtype``, eval mode) and its training metadata; ``path`` =
    :data:`DRAFT_CHECKPOINT` gives the 1-layer draft model."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyDecoder(DRAFT_CONFIG if ckpt["meta"].get("n_layers") == 1 else CONFIG)
    model.load_state_dict({k: v.to(dtype) for k, v in ckpt["state_dict"].items()})
    return model.to(dtype).eval(), ckpt["meta"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flashkv_edu.charlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["train"])
    parser.add_argument("--minutes", type=float_in(0.0, 24 * 60.0), default=10.0, help="training time (default 10)")
    parser.add_argument("--draft", action="store_true", help="the 1-layer draft model (data/char_draft.pt)")
    args = parser.parse_args(argv)
    if args.draft:
        train(args.minutes, out=DRAFT_CHECKPOINT, config=DRAFT_CONFIG)
    else:
        train(args.minutes)


if __name__ == "__main__":
    main()
