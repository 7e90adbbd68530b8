"""Turn a GGUF file into a Hugging Face checkpoint directory that vLLM loads."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize `gguf_file` into a safetensors checkpoint at `target` (atomically: all or nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        source_dir, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
        # transformers marks GGUF-loaded weights as quantized and refuses to save them;
        # they are already dequantized, so the marker is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
