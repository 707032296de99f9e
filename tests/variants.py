"""PanoramaVLM runs made the ways real VLM projects make them: tokens added in training, LoRA on the embeddings,
trainable token rows, QLoRA, half precision, PEFT around the whole VLM, other model families.

Everything is real: tiny models built from config (no hub), a real tokenizer (``tokenizers``) extended with special
tokens and saved beside the adapter, embeddings resized by transformers, PEFT wrapping, a real ``lightning.Trainer``
(bf16-true precision included), bitsandbytes 4-bit on the CPU, PEFT ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from converter.example import PANORAMA_TARGETS, Resampler, make_projector

ADDED = ("<image>", "<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    lm: str = "qwen3"  # qwen3 | llama | mistral | qwen2 | gemma
    vision: str = "siglip"  # siglip | clip | siglip2
    tie: bool = True  # tie_word_embeddings of the LM's base config
    added_tokens: tuple[str, ...] = ()  # added to the tokenizer; embeddings resized (pad_to_multiple_of=64)
    tokenizer_in: str = "adapter"  # where the run saves its tokenizer: adapter (lora_weights/), run (tokenizer/)
    targets: tuple[str, ...] = tuple(PANORAMA_TARGETS)
    modules_to_save: tuple[str, ...] | None = ("embed_tokens", "lm_head")
    trainable_tokens: bool = False  # PEFT trainable_token_indices: the added tokens' rows of embed_tokens
    scope: str = "language_model"  # "vlm": PEFT around the whole VLM (LLaVA-style), projector in modules_to_save
    vision_lora: bool = False  # (scope "vlm") LoRA on the vision tower's attention projections too
    qlora: bool = False  # the base LM loaded in 4-bit NF4 with double quantization
    precision: str = "32-true"
    hidden: int = 32  # the LM's hidden size (bitsandbytes' 4-bit blocks need in_features >= 64 on the CPU)
    hparams: str = "dict"  # how save_hyperparameters saw them: dict | hydra | hydra-env | namespace | dataclass
    lr: float = 5e-3
    optimizer: str = "adamw"  # "sgd": AdamW's eps of 1e-8 is 0 in float16, which turns its update into NaN
    steps: int = 3


# --- bases -------------------------------------------------------------------------------------------------------
def _lm_config(family: str, tie: bool, hidden: int) -> Any:
    import transformers

    common = dict(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family in ("qwen3", "gemma"):
        common["head_dim"] = hidden // 4
    name = {"qwen3": "Qwen3Config", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
            "gemma": "GemmaConfig"}[family]  # fmt: skip
    return getattr(transformers, name)(**common)


def _vision_config(family: str) -> Any:
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
    if family == "siglip2":
        return transformers.Siglip2VisionConfig(num_patches=4, **common)
    name = {"siglip": "SiglipVisionConfig", "clip": "CLIPVisionConfig"}[family]
    return getattr(transformers, name)(image_size=16, **common)


def build_variant_bases(root: Path, lm: str, vision: str, tie: bool, hidden: int = 32) -> tuple[Path, Path]:
    """Base models for a variant (config, weights, tokenizer, generation config), built once per combination."""
    from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from converter.example import _tiny_tokenizer

    folder = root / "bases" / f"{lm}{hidden}-{vision}-{'tied' if tie else 'untied'}"
    lm_dir, vision_dir = folder / "language_model", folder / "vision_encoder"
    if (lm_dir / "config.json").is_file():
        return vision_dir, lm_dir
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_lm_config(lm, tie, hidden)).save_pretrained(lm_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(lm_dir)
    _tiny_tokenizer(96, PreTrainedTokenizerFast).save_pretrained(lm_dir)
    AutoModel.from_config(_vision_config(vision)).save_pretrained(vision_dir)
    return vision_dir, lm_dir


# --- the model -------------------------------------------------------------------------------------------------
class VLM(nn.Module):
    """vision_encoder -> resampler -> projector -> language_model, for any vision family (SigLIP2 takes patches)."""

    def __init__(self, vision: nn.Module, language_model: nn.Module) -> None:
        super().__init__()
        dim = vision.config.hidden_size
        self.vision_encoder = vision
        self.resampler = Resampler(dim, num_queries=4)
        self.projector = make_projector(dim, language_model.config.hidden_size)
        self.language_model = language_model

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if type(self.vision_encoder).__name__ == "Siglip2VisionModel":
            patch = self.vision_encoder.config.patch_size
            b, c, h, w = pixel_values.shape
            patches = pixel_values.unfold(2, patch, patch).unfold(3, patch, patch)  # b c gh gw p p
            grid = (h // patch) * (w // patch)
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, grid, c * patch * patch)
            mask = torch.ones(patches.shape[:2], dtype=torch.long)
            shapes = torch.tensor([[h // patch, w // patch]] * b)
            return self.vision_encoder(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)[0]
        return self.vision_encoder(pixel_values=pixel_values).last_hidden_state

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.projector(self.resampler(self.features(pixel_values.to(self.resampler.queries.dtype))))
        text = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([image.to(text.dtype), text], dim=1)
        return self.language_model(inputs_embeds=embeds).logits


@torch.no_grad()
def export_logits(out: Path, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The VLM rebuilt from an export's folders, no PEFT involved: its logits on the inputs."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM

    vision = AutoModel.from_pretrained(out / "vision_encoder").eval()
    lm = AutoModelForCausalLM.from_pretrained(out / "language_model", dtype=torch.float32).eval()
    vlm = VLM(vision, lm)
    vlm.resampler.load_state_dict(load_file(out / "resampler" / "model.safetensors"))
    vlm.projector.load_state_dict(load_file(out / "projector" / "model.safetensors"))
    return vlm.eval()(pixel_values, input_ids)


@dataclasses.dataclass
class PanoSettings:
    """A project's settings as a dataclass, saved whole by ``save_hyperparameters``. Unpickling it for real would
    leave a marker file: ckpt2hf must read it without ever constructing it."""

    vision_name: str
    language_model_name: str
    variant: dict
    marker: str = ""

    def __setstate__(self, state: dict) -> None:
        if state.get("marker"):
            Path(state["marker"]).touch()
        self.__dict__.update(state)


def _modules():
    import functools

    import lightning

    class Base(lightning.LightningModule):
        def _setup(self, variant: dict, vision_name: str, language_model_name: str, tokenizer_name: str | None):
            self.variant = Variant(**{**variant, "added_tokens": tuple(variant["added_tokens"])})
            self.model = _build(self.variant, vision_name, language_model_name, tokenizer_name)

        @property
        def language_model(self):
            return self.model if self.variant.scope == "vlm" else self.model.language_model

        def training_step(self, batch, batch_idx):
            pixel_values, input_ids = batch
            logits = self.model(pixel_values, input_ids)
            text = logits[:, -input_ids.shape[1] : -1].float()
            return nn.functional.cross_entropy(text.reshape(-1, text.shape[-1]), input_ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            if self.variant.optimizer == "sgd":
                return torch.optim.SGD(params, lr=self.variant.lr)
            return torch.optim.AdamW(params, lr=self.variant.lr)

    class VariantModule(Base):
        """Hyper-parameters as a plain dict of the init arguments."""

        def __init__(
            self, vision_name: str, language_model_name: str, variant: dict, tokenizer_name: str | None = None
        ):
            super().__init__()
            self.save_hyperparameters()
            self._setup(variant, vision_name, language_model_name, tokenizer_name)

    class HydraModule(Base):
        """The lightning-hydra-template way: an OmegaConf config and a partial optimizer, saved as they are."""

        def __init__(self, cfg: Any, optimizer: functools.partial):
            super().__init__()
            self.save_hyperparameters(logger=False)
            net = cfg.model.net
            from omegaconf import OmegaConf

            self._setup(OmegaConf.to_container(cfg.model.variant), net.vision_name, net.language_model_name, None)

        def configure_optimizers(self):
            return self.hparams.optimizer(params=[p for p in self.parameters() if p.requires_grad])

    class NamespaceModule(Base):
        """An argparse.Namespace passed whole."""

        def __init__(self, args: Any):
            super().__init__()
            self.save_hyperparameters()
            self._setup(args.variant, args.vision_name, args.language_model_name, None)

    class DataclassModule(Base):
        """A dataclass passed whole."""

        def __init__(self, settings: PanoSettings):
            super().__init__()
            self.save_hyperparameters()
            self._setup(settings.variant, settings.vision_name, settings.language_model_name, None)

    return {"dict": VariantModule, "hydra": HydraModule, "namespace": NamespaceModule, "dataclass": DataclassModule}


def _module(variant: Variant, vision_dir: Path, lm_dir: Path, tokenizer_dir: Path | None, root: Path):
    """The LightningModule for ``variant``, with its hyper-parameters saved the way ``variant.hparams`` says."""
    import argparse
    import functools

    modules = _modules()
    fields = dataclasses.asdict(variant)
    if variant.hparams == "dict":
        return modules["dict"](str(vision_dir), str(lm_dir), fields, str(tokenizer_dir) if tokenizer_dir else None)
    if variant.hparams == "namespace":
        args = argparse.Namespace(vision_name=str(vision_dir), language_model_name=str(lm_dir), variant=fields)
        return modules["namespace"](args)
    if variant.hparams == "dataclass":
        marker = str(root / "constructed")
        return modules["dataclass"](PanoSettings(str(vision_dir), str(lm_dir), fields, marker))
    from omegaconf import OmegaConf

    bases = str(vision_dir.parent)
    if variant.hparams == "hydra-env":  # the bases named through an environment variable, and an ambiguous name
        os.environ["PANO_BASES"], bases = bases, "${oc.env:PANO_BASES}"
    cfg = OmegaConf.create(
        {
            "paths": {"bases": bases, "output_dir": "${oc.env:HOME}/outputs"},  # a resolver nothing needs
            "model": {
                "_target_": "variants.HydraModule",
                "base_dir": "${paths.bases}",
                "net": {  # relative interpolations: ".." is the enclosing group, "." this one
                    "vision_name": "${..base_dir}/vision_encoder",
                    "language_model_name": "${.vision_name}/../language_model",
                },
                "lora": {"rank": 8, "lora_r": "${.rank}", "lora_alpha": 16},  # as _build's LoraConfig
                "variant": {**fields, "added_tokens": list(fields["added_tokens"]), "targets": list(variant.targets)},
            },
            "trainer": {"max_steps": variant.steps, "default_root_dir": "${paths.output_dir}"},
            "tags": ["pano", "${model.variant.name}"],
        }
    )
    if variant.hparams == "hydra-env":
        cfg.model.net.language_model_name = str(lm_dir)
        cfg.evaluation = {"language_model_name": "someorg/other-base"}
    optimizer = functools.partial(torch.optim.AdamW, lr=variant.lr)
    return modules["hydra"](cfg, optimizer)


def _build(variant: Variant, vision_name: str, lm_name: str, tokenizer_name: str | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    vision = AutoModel.from_pretrained(vision_name).requires_grad_(False)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if variant.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    lm = AutoModelForCausalLM.from_pretrained(lm_name, **kwargs)
    if tokenizer_name is not None:  # the run's tokenizer, with the tokens it added
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    targets = list(variant.targets)
    extra: dict[str, Any] = {}
    if variant.trainable_tokens:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        extra["trainable_token_indices"] = {"embed_tokens": tokenizer.convert_tokens_to_ids(list(variant.added_tokens))}
    saved = list(variant.modules_to_save) if variant.modules_to_save else None
    if variant.scope == "vlm":
        model = VLM(vision, lm)
        names = "|".join(targets)
        pattern = rf".*language_model\..*\.({names})"
        if variant.vision_lora:
            pattern = rf"({pattern}|.*vision_encoder\..*\.(q_proj|v_proj))"
        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=pattern, modules_to_save=saved, **extra
        )
        return get_peft_model(model, config)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, modules_to_save=saved, task_type="CAUSAL_LM",
        **extra,
    )  # fmt: skip
    return VLM(vision, get_peft_model(lm, config))


# --- a run -----------------------------------------------------------------------------------------------------
def build_variant_run(root: Path, variant: Variant) -> Path:
    """Train ``variant`` a few steps with a real Trainer; return ROOT/runs/NAME."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import AutoTokenizer

    vision_dir, lm_dir = build_variant_bases(root, variant.lm, variant.vision, variant.tie, variant.hidden)
    run = root / "runs" / variant.name
    tokenizer_dir = None
    if variant.added_tokens:
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": list(variant.added_tokens)})
        tokenizer_dir = run / ("lora_weights" if variant.tokenizer_in == "adapter" else "tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)
    lightning.seed_everything(0, verbose=False)
    module = _module(variant, vision_dir, lm_dir, tokenizer_dir, root)
    vocab = 96 + len(variant.added_tokens)
    size = json.loads((vision_dir / "config.json").read_text()).get("image_size", 16)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, size, size, generator=generator), torch.randint(0, vocab, (6,), generator=generator))
            for _ in range(2 * variant.steps)]  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=variant.steps,
        accelerator="cpu",
        devices=1,
        precision=variant.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)],
        default_root_dir=run,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    module.language_model.save_pretrained(run / "lora_weights")
    probe = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, size, size, generator=probe)
    ids = torch.randint(0, vocab, (2, 9), generator=probe)
    # In eval mode bitsandbytes' CPU kernel repacks 4-bit weights and computes in bf16; the run trained on weights
    # dequantized to float32, so a QLoRA run's logits are taken that way (every dropout here is 0).
    module.train(variant.qlora)
    with torch.no_grad():
        logits = module.model(pixels.to(next(module.parameters()).dtype), ids).float()
    torch.save({"pixel_values": pixels, "input_ids": ids, "logits": logits}, run / "trained_logits.pt")
    return run


VARIANTS = {
    v.name: v
    for v in (
        Variant("added-tokens", added_tokens=ADDED),
        Variant("tokenizer-folder", added_tokens=ADDED, tokenizer_in="run"),
        Variant("embedding-lora", targets=("q_proj", "v_proj", "embed_tokens", "lm_head"), modules_to_save=None),
        Variant(
            "embedding-lora-untied", tie=False, targets=("q_proj", "v_proj", "embed_tokens", "lm_head"),
            modules_to_save=None,
        ),
        Variant("trainable-tokens", added_tokens=ADDED, trainable_tokens=True, modules_to_save=None),
        Variant("whole-vlm", scope="vlm", modules_to_save=("projector",), vision_lora=True),
        Variant("qlora", qlora=True, tie=False, hidden=64),
        Variant("bf16-true", precision="bf16-true"),
        Variant("fp16-true", precision="16-true", optimizer="sgd", lr=0.5),
        Variant("llama-clip", lm="llama", tie=False, vision="clip"),
        Variant("mistral", lm="mistral", tie=False),
        Variant("qwen2-siglip2", lm="qwen2", vision="siglip2"),
        Variant("gemma-siglip2", lm="gemma", vision="siglip2"),
        Variant("hydra", hparams="hydra", modules_to_save=None),
        Variant("hydra-env", hparams="hydra-env", modules_to_save=None),
        Variant("namespace", hparams="namespace", modules_to_save=None),
        Variant("dataclass", hparams="dataclass", modules_to_save=None),
        Variant("tiny-delta", lr=1e-6, modules_to_save=None),  # a delta below bfloat16's resolution of the weights
    )
}  # fmt: skip


def build_all(root: str) -> None:
    """Train every variant (in a process of its own: see tests/background.py)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # it shares the machine's cores with the test process
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for variant in VARIANTS.values():
        build_variant_run(Path(root), variant)
