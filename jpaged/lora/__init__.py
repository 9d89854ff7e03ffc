"""Multi-LoRA serving: PEFT adapters loaded from disk (`peft`), kept in device slots (`manager`), named by
requests (`request`). The per-token delta itself is models/lora.py over pallas_kernels/lora.py."""
from jpaged.lora.manager import LoRAManager
from jpaged.lora.peft import TARGETS, LoRAAdapter, load_peft_adapter
from jpaged.lora.request import LoRARequest

__all__ = ["TARGETS", "LoRAAdapter", "LoRAManager", "LoRARequest", "load_peft_adapter"]
