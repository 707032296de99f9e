"""LightningModules that only the tests train (the example PanoramaVLM lives in converter/example.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from converter.example import load_panorama_module


def causal_lm_module(lm_dir: Path, lora_r: int = 8, lora_alpha: int = 16, modules_to_save=None):
    """A plain Lightning + PEFT causal LM (the layout of configs/causal_lm.yaml), LoRA on q_proj and v_proj."""
    return _causal_lm_class()(str(lm_dir), lora_r, lora_alpha, modules_to_save=modules_to_save)


def _causal_lm_class():
    import lightning

    class CausalLMModule(lightning.LightningModule):
        def __init__(
            self,
            language_model_name: str,
            lora_r: int = 8,
            lora_alpha: int = 16,
            lr: float = 5e-3,
            modules_to_save: list[str] | None = None,
        ) -> None:
            super().__init__()
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            self.save_hyperparameters()
            base = AutoModelForCausalLM.from_pretrained(language_model_name, dtype=torch.float32)
            lora = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=modules_to_save,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)

        @property
        def language_model(self):
            return self.model

        def training_step(self, batch, batch_idx):
            _, input_ids = batch
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    return CausalLMModule


def load_trained_module(run_dir: Path, ckpt: str = "last.ckpt"):
    """Rebuild the trained LightningModule from a run's checkpoint (for tests that compare against it)."""
    path = Path(run_dir) / "checkpoints" / ckpt
    hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    if "vision_name" in hparams:
        return load_panorama_module(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module = _causal_lm_class()(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
