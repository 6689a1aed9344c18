"""stabilizer: numerical-stability diagnostics for Q-Former LoRA fine-tuning."""

__version__ = "0.1.0"
