"""Lightning runs as projects really leave them, for the layout-discovery tests: the tutorial causal LM module (the
PEFT model as ``self.model``, only the ``.ckpt``), checkpoints that keep only what trained or drop the frozen vision
tower (an ``on_save_checkpoint`` hook, as projects write it), and a PanoramaVLM whose language model was compiled
with ``torch.compile`` inside the module.

Everything is real: tiny models built from config, PEFT wrapping, a real ``lightning.Trainer`` and ModelCheckpoint.
Beside each run the training process writes what the tests compare with: the trained model's logits and PEFT's own
``merge_and_unload`` of the live language model, written by ``save_pretrained`` (``merged_lm/``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from converter.example import PANORAMA_TARGETS

from variants import VLM, build_variant_bases

TUTORIAL_ALPHA = 24  # the tutorial runs' lora_alpha (r 8): neither r nor a default, so a guess would be caught


@dataclasses.dataclass(frozen=True)
class LayoutRun:
    name: str
    module: str  # "tutorial": the causal LM module; "vlm": a PanoramaVLM-like module; "classifier": SEQ_CLS
    hparams: str = "none"  # (tutorial) how lora_alpha is saved: "none" (not at all) | "nested" (lora.alpha)
    keep: str = "all"  # what on_save_checkpoint keeps: all | trainable | no-vision
    compile_lm: bool = False  # (vlm) the language model wrapped by torch.compile inside the module
    adapter_folder: bool = True  # (vlm) PEFT save_pretrained into lora_weights/
    family: str = ""  # (task) the base: phi3 | gemma2 | t5
    lora: tuple = ()  # (task) LoraConfig fields, as the hyper-parameters hold them


RUNS = {
    r.name: r
    for r in (
        LayoutRun("tutorial", "tutorial", hparams="nested", adapter_folder=False),
        LayoutRun("tutorial-no-alpha", "tutorial", adapter_folder=False),
        LayoutRun("trainable-only", "vlm", keep="trainable"),
        LayoutRun("vision-dropped", "vlm", keep="no-vision"),
        LayoutRun("compiled-inner", "vlm", compile_lm=True),
        LayoutRun("roberta-classifier", "classifier"),
        LayoutRun("roberta-token-classifier", "classifier", family="token"),
        # decoder families and an encoder-decoder, the tutorial module around each (task_type in the adapter config)
        LayoutRun(
            "phi3-fused",
            "task",
            family="phi3",
            lora=(("task_type", "CAUSAL_LM"), ("target_modules", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
        ),
        LayoutRun(
            "gemma2-trained-embeddings",
            "task",
            family="gemma2",
            lora=(
                ("task_type", "CAUSAL_LM"),
                ("target_modules", ["q_proj", "v_proj"]),
                ("modules_to_save", ["embed_tokens", "lm_head"]),
            ),
        ),
        LayoutRun(
            "t5-seq2seq", "task", family="t5", lora=(("task_type", "SEQ_2_SEQ_LM"), ("target_modules", ["q", "v"]))
        ),
    )
}


def _modules() -> dict[str, Any]:
    import lightning
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    class TutorialLM(lightning.LightningModule):
        """The module of the tutorials: a causal LM wrapped by PEFT, the base named by a hyper-parameter."""

        def __init__(self, model_name: str, lora: dict | None = None):
            super().__init__()
            self.save_hyperparameters()
            base = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
            config = LoraConfig(r=8, lora_alpha=TUTORIAL_ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                task_type="CAUSAL_LM")  # fmt: skip
            self.model = get_peft_model(base, config)

        @property
        def language_model(self):
            return self.model

        def training_step(self, batch, batch_idx):
            _, input_ids = batch
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    class VLMModule(lightning.LightningModule):
        """A PanoramaVLM-like module whose checkpoint hook keeps what ``keep`` says."""

        def __init__(self, vision_name: str, language_model_name: str, keep: str = "all", compile_lm: bool = False):
            super().__init__()
            self.save_hyperparameters()
            vision = AutoModel.from_pretrained(vision_name).requires_grad_(False)
            lm = AutoModelForCausalLM.from_pretrained(language_model_name, dtype=torch.float32)
            config = LoraConfig(r=8, lora_alpha=16, target_modules=list(PANORAMA_TARGETS), lora_dropout=0.0,
                                modules_to_save=["lm_head"], task_type="CAUSAL_LM")  # fmt: skip
            self.model = VLM(vision, get_peft_model(lm, config))
            if compile_lm:  # the eager backend: the same module tree and keys as inductor, without a compiler
                self.model.language_model = torch.compile(self.model.language_model, backend="eager")

        @property
        def language_model(self):
            lm = self.model.language_model
            return getattr(lm, "_orig_mod", lm)

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            state = checkpoint["state_dict"]
            if self.hparams.keep == "trainable":  # keep checkpoints small: only what the optimizer changes
                trained = {name for name, p in self.named_parameters() if p.requires_grad}
                checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trained}
            elif self.hparams.keep == "no-vision":  # the frozen tower is the base's anyway
                checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("model.vision_encoder.")}

        def training_step(self, batch, batch_idx):
            pixel_values, input_ids = batch
            logits = self.model(pixel_values, input_ids)
            text = logits[:, -input_ids.shape[1] : -1]
            return torch.nn.functional.cross_entropy(text.reshape(-1, text.shape[-1]), input_ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    class Classifier(lightning.LightningModule):
        """The text-classification tutorial: a sequence classifier from a masked-LM base, PEFT's SEQ_CLS task (it
        keeps the new head in modules_to_save), the labels in the hyper-parameters."""

        def __init__(self, model_name: str, num_labels: int, id2label: dict, task: str = "SEQ_CLS"):
            super().__init__()
            self.save_hyperparameters()
            import transformers

            cls = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}
            base = getattr(transformers, cls[task]).from_pretrained(
                model_name, num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()}
            )
            config = LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0,
                                target_modules=["query", "value"])  # fmt: skip
            self.model = get_peft_model(base, config)

        @property
        def language_model(self):
            return self.model

        def training_step(self, batch, batch_idx):
            _, input_ids = batch
            labels = (input_ids if self.hparams.task == "TOKEN_CLS" else input_ids[:, 0]) % self.hparams.num_labels
            return self.model(input_ids=input_ids, labels=labels).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    class TaskModule(lightning.LightningModule):
        """The tutorial module for any task: the Auto class, the base's name and the LoRA settings as
        hyper-parameters, PEFT around the model."""

        def __init__(self, model_name: str, auto_class: str, lora: dict):
            super().__init__()
            self.save_hyperparameters()
            import transformers

            base = getattr(transformers, auto_class).from_pretrained(model_name, dtype=torch.float32)
            self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **lora))

        @property
        def language_model(self):
            return self.model

        def training_step(self, batch, batch_idx):
            _, ids = batch
            if self.hparams.auto_class == "AutoModelForSeq2SeqLM":
                return self.model(input_ids=ids, labels=ids[:, :4].contiguous()).loss
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)

    return {"tutorial": TutorialLM, "vlm": VLMModule, "classifier": Classifier, "task": TaskModule}


def build_family_base(root: Path, family: str) -> tuple[Path, str]:
    """A tiny base of ``family`` as save_pretrained writes it, with a tokenizer; (folder, the Auto class)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    from converter.example import _tiny_tokenizer

    common = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "phi3": ("Phi3Config", "AutoModelForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)),
        "gemma2": ("Gemma2Config", "AutoModelForCausalLM", dict(hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128, sliding_window=8, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, tie_word_embeddings=True)),
        "t5": ("T5Config", "AutoModelForSeq2SeqLM", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
               decoder_start_token_id=0, tie_word_embeddings=True)),
    }  # fmt: skip
    name, auto_class, fields = configs[family]
    folder = root / "bases" / family
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = getattr(transformers, name)(**common, **fields)
        getattr(transformers, auto_class).from_config(config).save_pretrained(folder)
        _tiny_tokenizer(96, PreTrainedTokenizerFast).save_pretrained(folder)
    return folder, auto_class


def build_masked_lm_base(root: Path) -> Path:
    """A tiny RoBERTa base as the hub has ``roberta-base``: the masked-LM model, its tokenizer."""
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

    from converter.example import _tiny_tokenizer

    folder = root / "bases" / "roberta"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)  # fmt: skip
        RobertaForMaskedLM(config).save_pretrained(folder)
        _tiny_tokenizer(96, PreTrainedTokenizerFast).save_pretrained(folder)
    return folder


def build_layout_run(root: Path, run: LayoutRun) -> Path:
    """Train ``run`` with a real Trainer; return ROOT/runs/NAME with what the tests compare against beside it."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    vision_dir, lm_dir = build_variant_bases(root, "qwen3", "siglip", True)
    folder = root / "runs" / run.name
    lightning.seed_everything(0, verbose=False)
    modules = _modules()
    if run.module == "tutorial":
        lora = {"r": 8, "alpha": TUTORIAL_ALPHA} if run.hparams == "nested" else None
        module = modules["tutorial"](str(lm_dir), lora=lora)
    elif run.module == "task":
        base_dir, auto_class = build_family_base(root, run.family)
        module = modules["task"](str(base_dir), auto_class, dict(run.lora))
    elif run.module == "classifier":
        labels = {0: "negative", 1: "neutral", 2: "positive"} if run.family != "token" else {0: "O", 1: "B-X", 2: "I-X"}
        task = "TOKEN_CLS" if run.family == "token" else "SEQ_CLS"
        module = modules["classifier"](str(build_masked_lm_base(root)), 3, labels, task)
    else:
        module = modules["vlm"](str(vision_dir), str(lm_dir), keep=run.keep, compile_lm=run.compile_lm)
    size = json.loads((vision_dir / "config.json").read_text())["image_size"]
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, size, size, generator=generator), torch.randint(0, 96, (6,), generator=generator))
            for _ in range(6)]  # fmt: skip
    trainer = lightning.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, save_top_k=0)],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    if run.module in ("vlm", "classifier", "task") and run.adapter_folder:
        module.language_model.save_pretrained(folder / "lora_weights")
    module.eval()
    probe = torch.Generator().manual_seed(7)
    pixels, ids = torch.randn(2, 3, size, size, generator=probe), torch.randint(0, 96, (2, 9), generator=probe)
    with torch.no_grad():
        record = {"pixel_values": pixels, "input_ids": ids}
        if run.family == "t5":  # an encoder-decoder: logits for decoder inputs
            record["decoder_input_ids"] = ids[:, :5].contiguous()
        lm_inputs = {k: v for k, v in record.items() if k != "pixel_values"}
        record["lm_logits"] = module.language_model(**lm_inputs).logits
        if run.module == "vlm":
            record["logits"] = module.model(pixels, ids)
        merged = copy.deepcopy(module.language_model).merge_and_unload()  # PEFT's own merge of the live model
    torch.save(record, folder / "trained_logits.pt")
    merged.save_pretrained(folder / "merged_lm")
    return folder


def build_all(root: str) -> None:
    """Train every run (in a background process: see tests/background.py)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # it shares the machine's cores with the test process
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for run in RUNS.values():
        build_layout_run(Path(root), run)
