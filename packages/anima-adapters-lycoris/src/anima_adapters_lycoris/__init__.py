"""LoKr, LoHa and LoCon adapters (lycoris-lora) for anima."""

__version__ = "0.1.0"
