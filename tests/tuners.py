"""PanoramaVLM runs trained with PEFT's other tuners: LoHa, LoKr, IA3, OFT, BOFT, VeRA, AdaLoRA, FourierFT, HRA, MiSS
and the rest of the PEFT types that merge, plus the ones that cannot be merged (prompt tuning, aLoRA).

Each run is real: the tiny Qwen3 LM of ``variants`` wrapped by ``get_peft_model`` with the tuner's own config class,
trained a few steps by a ``lightning.Trainer`` (AdaLoRA's rank allocation called as PEFT's recipe says), the PEFT
config object saved in the hyper-parameters as ``save_hyperparameters`` sees it, the adapter saved by PEFT's
``save_pretrained``. Beside the run the training process writes what the tests compare with: the trained VLM's
logits, and PEFT's own ``merge_and_unload`` of the live language model written by ``save_pretrained``
(``merged_lm/``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from variants import VLM, build_variant_bases

TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class TunerRun:
    name: str
    peft_type: str
    settings: dict[str, Any]
    hparams: str = "object"  # how the PEFT config is saved: object (the config itself), dict (no config at all)
    modules_to_save: tuple[str, ...] | None = None
    steps: int = 3
    tie: bool = True
    streaming: bool = True  # False: its layers keep state PEFT computes from the base weights (full engine only)
    lm: str = "qwen3"  # qwen3, or qwen3-moe: a mixture-of-experts LM (transformers fuses its experts in memory)


def _runs() -> dict[str, TunerRun]:
    t = TARGETS
    runs = [
        TunerRun(
            "loha", "LOHA", {"r": 4, "alpha": 16, "target_modules": t}, modules_to_save=("embed_tokens", "lm_head")
        ),
        TunerRun("lokr", "LOKR", {"r": 4, "alpha": 16, "target_modules": t}),
        TunerRun("ia3", "IA3", {"target_modules": t, "feedforward_modules": ["down_proj"]}),
        TunerRun("oft", "OFT", {"r": 0, "oft_block_size": 8, "target_modules": t}),
        TunerRun("boft", "BOFT", {"boft_block_size": 4, "target_modules": t}),
        TunerRun("vera", "VERA", {"r": 8, "target_modules": t}),
        TunerRun("vera-regenerated", "VERA", {"r": 8, "target_modules": t, "save_projection": False}),
        TunerRun(
            "adalora",
            "ADALORA",
            {
                "init_r": 6,
                "target_r": 2,
                "tinit": 1,
                "tfinal": 1,
                "deltaT": 1,
                "total_step": 4,
                "lora_alpha": 8,
                "target_modules": t,
            },
            steps=4,
        ),  # fmt: skip
        TunerRun("fourierft", "FOURIERFT", {"n_frequency": 64, "scaling": 10.0, "target_modules": t}),
        TunerRun("hra", "HRA", {"r": 4, "target_modules": t}),
        TunerRun("miss", "MISS", {"r": 8, "target_modules": t}),
        TunerRun("c3a", "C3A", {"block_size": 8, "target_modules": t}),
        TunerRun("road", "ROAD", {"group_size": 8, "target_modules": t}),
        TunerRun("shira", "SHIRA", {"r": 2, "target_modules": t}),
        TunerRun("vblora", "VBLORA", {"r": 2, "vector_length": 8, "num_vectors": 16, "target_modules": t}),
        TunerRun("randlora", "RANDLORA", {"r": 8, "target_modules": t}),
        TunerRun("delora", "DELORA", {"r": 4, "target_modules": t}),
        TunerRun("gralora", "GRALORA", {"r": 8, "gralora_k": 2, "target_modules": t}),
        TunerRun("hira", "HIRA", {"r": 4, "target_modules": t}),
        TunerRun("glora", "GLORA", {"r": 4, "target_modules": t}),
        TunerRun("psoft", "PSOFT", {"r": 8, "target_modules": ["q_proj", "down_proj"]}, streaming=False),
        TunerRun("deft", "DEFT", {"target_modules": t}),
        TunerRun("tinylora", "TINYLORA", {"target_modules": t}),
        TunerRun("osf", "OSF", {"target_modules": t}, streaming=False),
        TunerRun("unilora", "UNILORA", {"r": 4, "target_modules": t}),
        TunerRun("waveft", "WAVEFT", {"n_frequency": 32, "target_modules": t}),
        TunerRun("supertuning", "SUPERTUNING", {"target_modules": t}),
        TunerRun("peanut", "PEANUT", {"r": 4, "target_modules": t}),
        TunerRun("ln-tuning", "LN_TUNING", {"target_modules": ["input_layernorm", "post_attention_layernorm"]}),
        TunerRun("trainable-tokens", "TRAINABLE_TOKENS", {"target_modules": ["embed_tokens"], "token_indices": [3, 5]}),
        # Mixture-of-experts LMs: LoRA on attention, on the router, and on the fused experts (target_parameters).
        TunerRun(
            "moe-attention", "LORA", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, lm="qwen3-moe"
        ),
        TunerRun("moe-router", "LORA", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "gate"]}, lm="qwen3-moe"),
        TunerRun(
            "moe-experts",
            "LORA",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj"],
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            },
            lm="qwen3-moe",
        ),  # fmt: skip
        # Not merged: the refusals are tested on these.
        TunerRun(
            "adalora-bare",
            "ADALORA",
            {
                "init_r": 6,
                "target_r": 2,
                "tinit": 1,
                "tfinal": 1,
                "deltaT": 1,
                "total_step": 4,
                "lora_alpha": 8,
                "target_modules": t,
            },
            hparams="dict",
            steps=4,
        ),  # fmt: skip
        TunerRun("prompt-tuning", "PROMPT_TUNING", {"num_virtual_tokens": 4}),
        TunerRun("alora", "LORA", {"r": 4, "lora_alpha": 8, "target_modules": t, "alora_invocation_tokens": [5, 6]}),
    ]
    return {r.name: r for r in runs}


TUNERS = _runs()
REFUSED = ("adalora-bare", "prompt-tuning", "alora")
MERGED = tuple(n for n in TUNERS if n not in REFUSED)


def peft_config(run: TunerRun) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = next(c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if t.value == run.peft_type)
    kwargs = dict(run.settings)
    if run.modules_to_save:
        kwargs["modules_to_save"] = list(run.modules_to_save)
    if "task_type" in {f.name for f in dataclasses.fields(config_cls)}:
        kwargs["task_type"] = "CAUSAL_LM"
    return config_cls(**kwargs)


def tuner_module_class():
    import lightning
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    class TunerModule(lightning.LightningModule):
        """A PanoramaVLM whose LM is wrapped by ``peft_config``; the config object is a hyper-parameter."""

        def __init__(self, vision_name: str, language_model_name: str, peft_config: Any = None, spec: dict = None):
            super().__init__()
            self.save_hyperparameters()
            config = peft_config if peft_config is not None else _config_from_spec(spec)
            vision = AutoModel.from_pretrained(vision_name).requires_grad_(False)
            lm = AutoModelForCausalLM.from_pretrained(language_model_name, dtype=torch.float32)
            self.model = VLM(vision, get_peft_model(lm, config))
            self.adalora = config.peft_type.value == "ADALORA"

        @property
        def language_model(self):
            return self.model.language_model

        def training_step(self, batch, batch_idx):
            pixel_values, input_ids = batch
            logits = self.model(pixel_values, input_ids)
            text = logits[:, -input_ids.shape[1] : -1]
            return torch.nn.functional.cross_entropy(text.reshape(-1, text.shape[-1]), input_ids[:, 1:].reshape(-1))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.adalora:  # AdaLoRA's recipe: after the optimizer step, before the gradients are cleared
                self.language_model.base_model.update_and_allocate(self.global_step)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    return TunerModule


def _config_from_spec(spec: dict) -> Any:
    return peft_config(TunerRun(spec["name"], spec["method"], spec["settings"], steps=spec["steps"]))


def bases(root: Path, run: TunerRun) -> tuple[Path, Path]:
    """The run's base models (built once): the variants' Qwen3 and SigLIP, or a Qwen3-MoE as transformers saves it
    (one tensor per expert)."""
    if run.lm == "qwen3":
        return build_variant_bases(root, "qwen3", "siglip", run.tie)
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen3MoeConfig

    from converter.example import _tiny_tokenizer

    vision_dir, _ = build_variant_bases(root, "qwen3", "siglip", run.tie)
    lm_dir = root / "bases" / "qwen3-moe"
    if not (lm_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                tie_word_embeddings=run.tie, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)  # fmt: skip
        AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(lm_dir)
        _tiny_tokenizer(96, PreTrainedTokenizerFast).save_pretrained(lm_dir)
    return vision_dir, lm_dir


def build_tuner_run(root: Path, run: TunerRun) -> Path:
    """Train ``run`` with a real Trainer; return ROOT/runs/NAME with what the tests compare against beside it."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    vision_dir, lm_dir = bases(root, run)
    folder = root / "runs" / run.name
    lightning.seed_everything(0, verbose=False)
    module_cls = tuner_module_class()
    if run.hparams == "object":
        module = module_cls(str(vision_dir), str(lm_dir), peft_config=peft_config(run))
    else:
        spec = {"name": run.name, "method": run.peft_type, "settings": run.settings, "steps": run.steps}
        module = module_cls(str(vision_dir), str(lm_dir), spec=spec)
    size = json.loads((vision_dir / "config.json").read_text())["image_size"]
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, size, size, generator=generator), torch.randint(0, 96, (6,), generator=generator))
            for _ in range(2 * run.steps)]  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=run.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, save_top_k=0)],
        default_root_dir=folder,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    module.language_model.save_pretrained(folder / "lora_weights")
    module.eval()
    probe = torch.Generator().manual_seed(7)
    pixels, ids = torch.randn(2, 3, size, size, generator=probe), torch.randint(0, 96, (2, 9), generator=probe)
    with torch.no_grad():
        logits = module.model(pixels, ids)
        lm_logits = module.language_model(input_ids=ids).logits
    record = {"pixel_values": pixels, "input_ids": ids, "logits": logits, "lm_logits": lm_logits}
    torch.save(record, folder / "trained_logits.pt")
    if run.name not in REFUSED:
        with torch.no_grad():  # PEFT's own merge of the live model, as save_pretrained writes it: the export's tensors
            merged = copy.deepcopy(module.language_model).merge_and_unload()
        merged.save_pretrained(folder / "merged_lm")
    return folder


def build_all(root: str) -> None:
    """Train every tuner run (in a background process: see tests/background.py)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for run in TUNERS.values():
        build_tuner_run(Path(root), run)


def tested() -> dict[str, str]:
    """PEFT type -> the runs of the test suite that convert it (the README's table names them)."""
    found: dict[str, list[str]] = {"LORA": ["the LoRA runs of tests/variants.py"]}
    for name in MERGED:
        found.setdefault(TUNERS[name].peft_type, []).append(f"`{name}`")
    return {t: ", ".join(v) for t, v in found.items()}


if __name__ == "__main__":  # python tests/tuners.py: the README's table of PEFT types
    from converter.peft.registry import supported_table

    print(supported_table(tested()))
