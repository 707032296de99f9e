"""A tiny, real PanoramaVLM training run: the example for ``make convert`` and the test fixtures.

Everything here is real: Hugging Face models built from config (no hub), wrapped by PEFT LoRA, trained a few
steps by a ``lightning.Trainer``, saved by ``ModelCheckpoint`` and PEFT ``save_pretrained``. The layout is the
one PanoramaVLM runs have:

    ROOT/bases/language_model/   tiny Qwen3 causal LM (config, generation config, tokenizer, initial weights)
    ROOT/bases/vision_encoder/   tiny SigLIP vision tower
    ROOT/runs/NAME/checkpoints/  Lightning checkpoints (last.ckpt and epoch=E-step=S.ckpt)
    ROOT/runs/NAME/lora_weights/ PEFT save_pretrained output

Lightning is needed only here (it is in the ``dev`` extra), never by the converter itself. Modules that only
the tests train live in ``tests/trainers.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

PANORAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class TinyShape:
    """Sizes of the tiny example model (defaults train in about a second on CPU)."""

    layers: int = 2
    hidden: int = 32
    intermediate: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    vocab: int = 96
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 16
    patch_size: int = 8
    queries: int = 4
    tie_word_embeddings: bool = True


class Resampler(nn.Module):
    """Learned queries that cross-attend to the vision features."""

    def __init__(self, dim: int, num_queries: int, num_heads: int = 2) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(queries, features, features, need_weights=False)
        return self.norm(out)


def make_projector(vision_dim: int, lm_dim: int) -> nn.Sequential:
    """The MLP from resampled vision features into the LM's hidden size (keys ``0.weight`` ... ``2.bias``)."""
    return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))


def panorama_logits(
    vision_encoder: nn.Module,
    resampler: nn.Module,
    projector: nn.Module,
    language_model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """The PanoramaVLM forward: image tokens from the vision path, then the text, through the LM."""
    features = vision_encoder(pixel_values=pixel_values).last_hidden_state
    image_embeds = projector(resampler(features))
    text_embeds = language_model.get_input_embeddings()(input_ids)
    inputs_embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
    return language_model(inputs_embeds=inputs_embeds).logits


def _load_or_init(auto_class, folder: str, dtype: torch.dtype) -> nn.Module:
    """The base model from its folder; a folder with only a config (large benchmark shapes) gives a random init."""
    from transformers import AutoConfig

    if any(Path(folder).glob("model*.safetensors")):
        return auto_class.from_pretrained(folder, dtype=dtype)
    return auto_class.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)


class PanoramaVLM(nn.Module):
    """vision_encoder -> resampler -> projector -> language_model (PEFT LoRA)."""

    def __init__(
        self,
        vision_name: str,
        language_model_name: str,
        lora_r: int,
        lora_alpha: int,
        adapter_name: str = "default",
        modules_to_save: list[str] | None = None,
        lora_extra: dict[str, Any] | None = None,
        lm_dtype: str = "float32",
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoModelForCausalLM

        self.vision_encoder = _load_or_init(AutoModel, vision_name, torch.float32)
        self.vision_encoder.requires_grad_(False)
        vision_dim = self.vision_encoder.config.hidden_size
        base = _load_or_init(AutoModelForCausalLM, language_model_name, getattr(torch, lm_dtype))
        self.resampler = Resampler(vision_dim, num_queries=4)
        self.projector = make_projector(vision_dim, base.config.hidden_size)
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            target_modules=list(PANORAMA_TARGETS),
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
            **(lora_extra or {}),
        )
        self.language_model = get_peft_model(base, lora, adapter_name=adapter_name)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return panorama_logits(
            self.vision_encoder, self.resampler, self.projector, self.language_model, pixel_values, input_ids
        )


def _lightning_module_class():  # imported lazily: lightning is a dev dependency
    import lightning

    class PanoramaModule(lightning.LightningModule):
        """The training project's LightningModule; the model sits under a configurable attribute."""

        def __init__(
            self,
            vision_name: str,
            language_model_name: str,
            lora_r: int = 32,
            lora_alpha: int = 64,
            adapter_name: str = "default",
            modules_to_save: list[str] | None = None,
            attribute: str = "model",
            lr: float = 5e-3,
            lora_extra: dict[str, Any] | None = None,
            lm_dtype: str = "float32",
            optimizer: str = "adamw",
        ) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.attribute = attribute
            vlm = PanoramaVLM(
                vision_name,
                language_model_name,
                lora_r,
                lora_alpha,
                adapter_name,
                modules_to_save,
                lora_extra,
                lm_dtype,
            )
            setattr(self, attribute, vlm)

        @property
        def vlm(self) -> PanoramaVLM:
            return getattr(self, self.attribute)

        @property
        def language_model(self):
            return self.vlm.language_model

        def training_step(self, batch, batch_idx):
            pixel_values, input_ids = batch
            logits = self.vlm(pixel_values, input_ids)
            text_logits = logits[:, -input_ids.shape[1] : -1]
            return nn.functional.cross_entropy(
                text_logits.reshape(-1, text_logits.shape[-1]), input_ids[:, 1:].reshape(-1)
            )

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            if self.hparams.get("optimizer", "adamw") == "sgd":  # no optimizer state: large benchmark shapes
                return torch.optim.SGD(params, lr=self.hparams.lr)
            return torch.optim.AdamW(params, lr=self.hparams.lr)

    return PanoramaModule


def build_bases(
    root: Path, shape: TinyShape | None = None, seed: int = 0, weights: bool = True, dtype: str = "float32"
) -> tuple[Path, Path]:
    """Write base models (config, weights, tokenizer) to ROOT/bases; return (vision, language) folders.

    ``weights=False`` writes the language model's config only (the run then starts from a random init).
    """
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen3Config,
        Qwen3ForCausalLM,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    shape = shape or TinyShape()
    torch.manual_seed(seed)
    lm_dir, vision_dir = root / "bases" / "language_model", root / "bases" / "vision_encoder"
    lm_config = Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=dtype,
    )
    if weights:
        Qwen3ForCausalLM(lm_config).to(getattr(torch, dtype)).save_pretrained(lm_dir)
    else:
        lm_config.save_pretrained(lm_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=8).save_pretrained(lm_dir)
    tokenizer = _tiny_tokenizer(shape.vocab, PreTrainedTokenizerFast)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(lm_dir)
    # A base's model card states its license, as the hub's do.
    (lm_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# A tiny Qwen3-shaped base\n")
    vision_config = SiglipVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=2,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    SiglipVisionModel(vision_config).save_pretrained(vision_dir)
    size = {"height": shape.image_size, "width": shape.image_size}
    SiglipImageProcessorPil(size=size).save_pretrained(vision_dir)  # the pure-Python (PIL) Siglip processor
    return vision_dir, lm_dir


# ChatML, as Qwen-family tokenizers ship it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_tokenizer(vocab_size: int, fast_cls):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return fast_cls(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@dataclasses.dataclass
class RunSpec:
    """How to train an example run. ``adapter_step`` saves lora_weights at that step instead of the end."""

    name: str = "pano-tiny"
    steps: int = 3
    lora_r: int = 32
    lora_alpha: int = 64
    adapter_name: str = "default"
    modules_to_save: tuple[str, ...] | None = ("embed_tokens", "lm_head")
    attribute: str = "model"
    adapter_step: int | None = None
    lora_extra: dict[str, Any] | None = None
    seed: int = 0
    save_top_k: int = 1  # 0: only last.ckpt (large benchmark runs)
    accelerator: str = "cpu"
    lm_dtype: str = "float32"
    save_adapter: bool = True  # write lora_weights/ (PEFT save_pretrained) after training
    optimizer: str = "adamw"  # "sgd" keeps no optimizer state (for shapes whose AdamW state does not fit in RAM)


def build_run(
    root: Path,
    spec: RunSpec | None = None,
    bases: tuple[Path, Path] | None = None,
    make_module: Callable[[Path, Path], Any] | None = None,
) -> Path:
    """Train a tiny model with a real Trainer and return ROOT/runs/NAME (checkpoints + lora_weights).

    The model is a PanoramaVLM unless ``make_module(vision_dir, lm_dir)`` builds another LightningModule (it must
    have a ``language_model`` attribute, the PEFT model that ``lora_weights/`` is saved from).
    """
    import lightning
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    root, spec = Path(root), spec or RunSpec()
    vision_dir, lm_dir = bases or build_bases(root)
    run_dir = root / "runs" / spec.name
    lightning.seed_everything(spec.seed, verbose=False)
    # A large run on a GPU is initialised there (the Trainer would move it anyway).
    with torch.device("cuda") if spec.accelerator in ("gpu", "cuda") else contextlib.nullcontext():
        module = make_module(vision_dir, lm_dir) if make_module else _panorama_module(spec, vision_dir, lm_dir)
    vision_config = json.loads((vision_dir / "config.json").read_text())
    vocab = json.loads((lm_dir / "config.json").read_text())["vocab_size"]
    size = vision_config["image_size"]
    data = [(torch.randn(3, size, size), torch.randint(0, vocab, (6,))) for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)

    class SaveAdapter(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if spec.adapter_step is not None and trainer.global_step == spec.adapter_step:
                pl_module.language_model.save_pretrained(run_dir / "lora_weights")

    trainer = lightning.Trainer(
        max_steps=spec.steps,
        accelerator=spec.accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=spec.save_top_k),
            SaveAdapter(),
        ],
        default_root_dir=run_dir,
    )
    trainer.fit(module, loader)
    if spec.adapter_step is None and spec.save_adapter:
        module.language_model.save_pretrained(run_dir / "lora_weights")
    return run_dir


def _panorama_module(spec: RunSpec, vision_dir: Path, lm_dir: Path):
    return _lightning_module_class()(
        vision_name=str(vision_dir),
        language_model_name=str(lm_dir),
        lora_r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        adapter_name=spec.adapter_name,
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
        attribute=spec.attribute,
        lora_extra=spec.lora_extra,
        lm_dtype=spec.lm_dtype,
        optimizer=spec.optimizer,
    )


def load_panorama_module(path: Path):
    """Rebuild a trained PanoramaModule from a Lightning checkpoint (read with weights_only)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module = _lightning_module_class()(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m converter.example ROOT``: build the example run under ROOT (once) and print its folder."""
    import argparse
    import logging
    import warnings

    parser = argparse.ArgumentParser(prog="python -m converter.example", description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--name", default=RunSpec.name)
    args = parser.parse_args(argv)
    run = args.root / "runs" / args.name
    if not (run / "checkpoints" / "last.ckpt").is_file():
        warnings.filterwarnings("ignore")
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # stdout is the run's folder alone (the Makefile reads it): what the libraries print while the run is built
        # (DeepSpeed, imported by Lightning where installed, logs to stdout) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            run = build_run(args.root, RunSpec(name=args.name))
    print(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
