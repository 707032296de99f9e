"""Which transformers class a component's model is, and the config of a head that exists only in the run.

A language-model component (kind ``hf_causal_lm``) is the run's task model: its class follows PEFT's ``task_type``
(from the adapter's config) or ``--auto-class``, else it is a causal LM. One table: another ``AutoModelFor...``
class is a row here, nothing else. A head the base folder does not have (a classifier on a masked-LM base, as
``roberta-base`` is on the hub) takes its size from the hyper-parameters (``num_labels``, ``id2label``) or, when
they do not say, from the checkpoint's head tensors; its weights are always the checkpoint's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConvertError
from .hparams import lookup

log = logging.getLogger(__name__)

# PEFT task_type -> the Auto class of the model the run trained.
TASK_CLASSES: dict[str, str] = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
LABELLED = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification")


def task_class(default: str, task_type: Any, override: str | None, base_config: Any = None) -> tuple[str, str]:
    """(Auto class, why): ``--auto-class``, else the adapter's ``task_type``, else the class of the table whose
    models include the base's own architecture (a T5 base: ``AutoModelForSeq2SeqLM``), else the layout's
    ``default``."""
    if override:
        import transformers

        if not override.startswith("Auto") or not hasattr(transformers, override):
            known = ", ".join(sorted(set(TASK_CLASSES.values())))
            raise ConvertError(f"--auto-class {override}: not a transformers Auto class; use one of {known}")
        return override, "--auto-class"
    task = getattr(task_type, "value", task_type)
    if isinstance(task, str) and task in TASK_CLASSES:
        return TASK_CLASSES[task], f"the adapter's task_type {task}"
    found = _class_of_architecture(base_config)
    if found is not None:
        return found, f"the base's architecture {base_config.architectures[0]}"
    return default, "the layout (a causal LM)" if default == "AutoModelForCausalLM" else "the layout"


def _class_of_architecture(config: Any) -> str | None:
    """The table's Auto class whose models (transformers' own mapping) include the base config's architecture."""
    import transformers

    architectures = set(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    for name in dict.fromkeys(v for v in TASK_CLASSES.values() if v != "AutoModel"):
        names = getattr(getattr(getattr(transformers, name), "_model_mapping", None), "_model_mapping", {})
        value = names.get(model_type) if isinstance(names, Mapping) else None
        if architectures & set(value if isinstance(value, (list, tuple)) else [value]):
            return name
    return None


def head_config(config: Any, auto_class: str, hparams: Mapping[str, Any], where: str) -> str | None:
    """Edit ``config`` for a labelled head (``num_labels``, ``id2label``, ``label2id`` from the hyper-parameters);
    return where they came from, or None when the hyper-parameters do not say."""
    if auto_class not in LABELLED:
        return None
    found = lookup(hparams, ("num_labels",), "num_labels", "--auto-class", where)
    labels = lookup(hparams, ("id2label",), "id2label", "--auto-class", where)
    problem = lookup(hparams, ("problem_type",), "problem_type", "--auto-class", where)
    if problem is not None and isinstance(problem[1], str):
        config.problem_type = problem[1]
    if labels is not None and isinstance(labels[1], Mapping):
        config.id2label = {int(k): str(v) for k, v in labels[1].items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    if found is not None and isinstance(found[1], int):
        config.num_labels = found[1]  # (id2label set from it when the run gave none)
        return f"hyper_parameters.{found[0]}"
    return f"hyper_parameters.{labels[0]}" if labels is not None else None


def head_size_from_tensors(
    config: Any, expected: Mapping[str, tuple[int, ...]], held: Callable[[str], tuple[int, ...] | None]
) -> int | None:
    """The label count the checkpoint's head has, when it differs from ``config.num_labels``: the tensors whose
    first dimension is the config's label count and which the checkpoint holds with another first dimension."""
    counts = set()
    for key, shape in expected.items():
        got = held(key)
        if got is not None and shape and shape[0] == config.num_labels and got[0] != shape[0] and got[1:] == shape[1:]:
            counts.add(got[0])
    return counts.pop() if len(counts) == 1 else None
