"""The QAT quantize stage: torchao's fake-quantized fine-tune, then llm-compressor's round-to-nearest
conversion of the trained weights into a compressed-tensors checkpoint like every other variant. Both use
symmetric min-max scales (max |w| / 7.5 for int4); they differ only where a group's largest weight is negative
and lands exactly on -7.5 steps (compressed-tensors rounds it to -8, torchao to -7)."""

from __future__ import annotations

import math
import time
from typing import Any

from farm.calibration import draw
from farm.methods.qat import QATConfig
from farm.stages.engines.registry import register_engine
from farm.stages.modelio import load_model, load_tokenizer, pick_device
from farm.stages.quantize import QuantizeRequest, QuantizeResult, calibrate, save


def train(model: Any, windows: list[list[int]], method: QATConfig, device: str) -> list[float]:
    """torchao's QAT: `prepare` swaps the decoder's Linear modules for fake-quantized ones (straight-through
    gradients into full-precision master weights), AdamW trains the decoder layers, `convert` puts plain Linear
    modules holding the trained weights back. Embeddings, lm_head and norms stay frozen (they are not
    quantized, and the tied table is most of a small model's optimizer state). Returns the loss per step."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat import QATConfig as TorchaoQAT

    prefix = next(n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith("layers.0"))
    grid = method.grid
    shape = {"group_size": grid.group_size} if grid.group_size else {"granularity": "per_channel"}
    fake = IntxFakeQuantizeConfig(getattr(torch, f"int{grid.bits}"), is_symmetric=True, **shape)

    def in_decoder(module: Any, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith(prefix + ".")

    quantize_(model, TorchaoQAT(weight_config=fake, step="prepare"), filter_fn=in_decoder)
    for p in model.parameters():
        p.requires_grad_(False)
    layer_params = [p for n, p in model.named_parameters() if n.startswith(prefix + ".")]
    for p in layer_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(layer_params, lr=method.learning_rate, weight_decay=method.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, method.warmup_steps)))
    gen = torch.Generator().manual_seed(0)
    data = torch.tensor(windows)
    losses = []
    model.train()
    try:
        for _ in range(method.steps):
            batch = data[torch.randint(len(data), (method.batch_size,), generator=gen)].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(layer_params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        quantize_(model, TorchaoQAT(step="convert"), filter_fn=in_decoder)
        for p in model.parameters():
            p.requires_grad_(False)
    return losses


@register_engine(QATConfig)
def quantize_qat(req: QuantizeRequest) -> QuantizeResult:
    import torch

    method = req.method
    if not isinstance(method, QATConfig):
        raise TypeError(f"quantize_qat needs a QATConfig, got {type(method).__name__}")
    device = pick_device()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(req.model_dir, req.trust_remote_code)
    model = load_model(req.model_dir, device, req.trust_remote_code)
    dtype = model.dtype
    model.to(torch.float32)  # full-precision master weights, also on GPUs
    cal = req.calibration
    windows = draw(cal.source, tokenizer, method.train_samples, cal.max_seq_length, cal.seed, expect_sha256=cal.sha256)
    t1 = time.perf_counter()
    losses = train(model, windows, method, device)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"QAT loss diverged (last {losses[-1]}); lower learning_rate")
    t2 = time.perf_counter()
    model.to(dtype)  # unquantized parts (embeddings, norms) are saved as the base has them, like other variants
    notes = calibrate(req, model, tokenizer, method.modifiers())
    recipe = save(model, tokenizer, req.out_dir)
    t3 = time.perf_counter()
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    notes.append(
        f"QAT: {method.steps} steps x {method.batch_size} windows of {cal.max_seq_length}; loss "
        f"{first:.3f} -> {last:.3f} (mean of first/last {k})"
    )
    return QuantizeResult(
        out_dir=req.out_dir,
        device=device,
        seconds_load=t1 - t0,
        seconds_oneshot=t3 - t1,
        seconds_save=0.0,
        recipe=recipe,
        notes=notes,
        calibration_report=dict(req.report),
        metrics={
            "qat.loss_first": first,
            "qat.loss_last": last,
            "qat.steps": float(method.steps),
            "qat.seconds_train": t2 - t1,
        },
        documents={
            "qat_losses.json": {
                "loss": losses,
                "steps": method.steps,
                "batch_size": method.batch_size,
                "learning_rate": method.learning_rate,
            }
        },
    )
