"""A PanoramaVLM run made by an older stack: PEFT 0.6.2 and transformers 4.36.2 (installed by the Makefile into
build/old-stack/, ahead of the project's own on PYTHONPATH), trained by the project's Lightning.

    PYTHONPATH=build/old-stack python tests/old_stack.py ROOT

PEFT 0.6 names an adapted module's own weight ``<module>.weight`` (no ``base_layer``), saves ``adapter_model.bin``
and an adapter_config.json with the fields of its time; transformers 4.36 names CLIP's keys ``vision_model.*`` and
writes its configs in its own format. Beside the run: the trained model's logits and PEFT 0.6's own
``merge_and_unload`` of the live language model (``merged_lm.pt``), which the tests compare the export with.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

NAME = "peft-0.6"


class OldVLM(nn.Module):
    """vision_encoder (CLIP) -> resampler -> projector -> language_model (Llama wrapped by PEFT 0.6 LoRA)."""

    def __init__(self, vision: nn.Module, language_model: nn.Module) -> None:
        super().__init__()
        dim = vision.config.hidden_size
        self.vision_encoder = vision
        self.resampler = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.projector = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, 32))
        self.language_model = language_model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.projector(self.resampler(self.vision_encoder(pixel_values=pixel_values).last_hidden_state))
        text = self.language_model.get_input_embeddings()(input_ids)
        return self.language_model(inputs_embeds=torch.cat([image, text], dim=1)).logits


def build(root: Path) -> Path:
    import lightning
    import peft
    import transformers
    from lightning.pytorch.callbacks import ModelCheckpoint
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    assert peft.__version__ == "0.6.2" and transformers.__version__ == "4.36.2", (peft.__version__, transformers)
    torch.manual_seed(0)
    lm_dir, vision_dir = root / "bases" / "language_model", root / "bases" / "vision_encoder"
    lm_config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(lm_config).save_pretrained(lm_dir)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(lm_dir)  # fmt: skip
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8)  # fmt: skip
    CLIPVisionModel(vision_config).save_pretrained(vision_dir)

    class OldModule(lightning.LightningModule):
        def __init__(self, vision_name: str, language_model_name: str, lora_r: int = 8, lora_alpha: int = 16):
            super().__init__()
            self.save_hyperparameters()
            vision = CLIPVisionModel.from_pretrained(vision_name).requires_grad_(False)
            lm = LlamaForCausalLM.from_pretrained(language_model_name)
            targets = ["q_proj", "v_proj", "down_proj"]
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                target_modules=targets, modules_to_save=["lm_head"])  # fmt: skip
            self.model = OldVLM(vision, get_peft_model(lm, config))

        def training_step(self, batch, batch_idx):
            pixel_values, input_ids = batch
            logits = self.model(pixel_values, input_ids)[:, -input_ids.shape[1] : -1]
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    run = root / "runs" / NAME
    lightning.seed_everything(0, verbose=False)
    module = OldModule(str(vision_dir), str(lm_dir))
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 16, 16, generator=generator), torch.randint(0, 96, (6,), generator=generator))
            for _ in range(6)]  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    lm = module.model.language_model
    lm.save_pretrained(run / "lora_weights", safe_serialization=False)  # adapter_model.bin, as PEFT 0.6 wrote it
    module.eval()
    probe = torch.Generator().manual_seed(7)
    pixels, ids = torch.randn(2, 3, 16, 16, generator=probe), torch.randint(0, 96, (2, 9), generator=probe)
    with torch.no_grad():
        logits = module.model(pixels, ids)
        merged = copy.deepcopy(lm).merge_and_unload()
    torch.save({"pixel_values": pixels, "input_ids": ids, "logits": logits}, run / "trained_logits.pt")
    torch.save({k: v.clone() for k, v in merged.state_dict().items()}, run / "merged_lm.pt")
    keys = sorted(module.state_dict())
    (run / "stack.json").write_text(json.dumps({"peft": peft.__version__, "transformers": transformers.__version__,
                                                "keys": keys}))  # fmt: skip
    return run


TUTORIAL = "pl-1.9-peft-0.10"


def build_tutorial(root: Path) -> Path:
    """The tutorial causal LM module as an older stack wrote it: ``pytorch_lightning`` 1.9 and PEFT 0.10 (with
    transformers 4.36), the PEFT model as ``self.model``, the base named by ``model_name``, ``lora_alpha`` saved as a
    hyper-parameter, only the ``.ckpt`` (no adapter folder). Beside it: the trained LM's logits and PEFT 0.10's own
    ``merge_and_unload`` of the live model (``merged_lm.pt``)."""
    import peft
    import pytorch_lightning as pl
    from peft import LoraConfig, get_peft_model
    from pytorch_lightning.callbacks import ModelCheckpoint
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    assert (pl.__version__, peft.__version__) == ("1.9.5", "0.10.0"), (pl.__version__, peft.__version__)
    torch.manual_seed(0)
    lm_dir = root / "bases" / "llama"
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(lm_dir)
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(lm_dir)  # fmt: skip

    class TutorialLM(pl.LightningModule):
        def __init__(self, model_name: str, lora_r: int = 8, lora_alpha: int = 32):
            super().__init__()
            self.save_hyperparameters()
            base = AutoModelForCausalLM.from_pretrained(model_name)
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
            self.model = get_peft_model(base, config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    run = root / "runs" / TUTORIAL
    pl.seed_everything(0)
    module = TutorialLM(str(lm_dir))
    generator = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 96, (6,), generator=generator) for _ in range(6)]
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    module.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits
        merged = copy.deepcopy(module.model).merge_and_unload()
    torch.save({"input_ids": ids, "lm_logits": logits}, run / "trained_logits.pt")
    torch.save({k: v.clone() for k, v in merged.state_dict().items()}, run / "merged_lm.pt")
    return run


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    if sys.argv[2:] == ["--tutorial"]:
        print(build_tutorial(Path(sys.argv[1])))
    else:
        print(build(Path(sys.argv[1])))
