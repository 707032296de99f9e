"""The adapter's PEFT config, whichever tuner: read as PEFT reads it, from wherever the run kept it.

In order: the adapter folder's ``adapter_config.json`` (any PEFT version's: PEFT's own ``check_kwargs`` and
``from_peft_type`` fill in fields an older PEFT did not write and drop ones a newer one added); else a PEFT config
saved in the hyper-parameters (a config object passed to ``save_hyperparameters``, its ``to_dict()``, or a Hydra node
whose ``_target_`` is a PEFT config class); else, for LoRA, the ``lora_r``/``lora_alpha`` hyper-parameters with the
targets read from the tensors. A config must describe the tensors the checkpoint holds, and a tuner PEFT cannot merge
is refused here, before anything is read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConvertError, preview, untrusted
from ..hparams import Opaque, Unresolved, find, lookup
from ..names import ADAPTER_CONFIG
from . import registry
from .keys import PEFT_PREFIX, PeftLayout, plain_module

log = logging.getLogger(__name__)

ADVICE = "pass --adapter-dir with the run's adapter folder"
# Fields of a config that say nothing about the weights (how it was saved, where the base came from).
BOOKKEEPING = ("peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode")


@contextlib.contextmanager
def library_warnings_to_log() -> Iterator[None]:
    """What PEFT and transformers warn about while ckpt2hf drives them goes to the debug log, not to the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("PEFT/transformers: %s", w.message)


def build_config(raw: Mapping[str, Any], layout: PeftLayout | None, where: object, what: str) -> Any:
    """A PEFT config from its fields, as PEFT's ``PeftConfig.from_pretrained`` builds one (``what``: where the fields
    come from, for messages). The type is ``peft_type``, else the tuner the tensors point to."""
    raw = dict(raw)
    peft_type = raw.get("peft_type") or (layout.tuner if layout is not None else None)
    if not isinstance(peft_type, str):
        raise ConvertError(f"{where}: {what} has no peft_type and the tensors name no tuner; {ADVICE}")
    try:
        tuner = registry.tuner(peft_type)
    except KeyError:
        import peft

        raise ConvertError(
            f"{where}: {what} is a {peft_type} adapter, a PEFT type this PEFT ({peft.__version__}) does not know; "
            "upgrade PEFT"
        ) from None
    raw["peft_type"] = tuner.peft_type
    raw.pop("runtime_config", None)  # only valid at run time (PEFT drops it too)
    with untrusted(where, f"PEFT rejects {what}", "re-save the adapter"), library_warnings_to_log():
        config = tuner.config_cls.from_peft_type(**tuner.config_cls.check_kwargs(**raw))
    config.inference_mode = True
    return config


@dataclasses.dataclass(frozen=True)
class GivenConfig:
    """What the command line says of the adapter's config, for runs that saved none: a whole PEFT config file
    (``--adapter-config``), or LoRA's rank and alpha (``--lora-r``, ``--lora-alpha``)."""

    file: Path | None = None
    r: int | None = None
    alpha: float | None = None

    @property
    def lora(self) -> dict[str, Any]:
        return {k: v for k, v in (("lora_r", self.r), ("lora_alpha", self.alpha)) if v is not None}


def adapter_config(
    layout: PeftLayout,
    folder: Any,
    hparams: Mapping[str, Any],
    where: str,
    given: GivenConfig = GivenConfig(),  # noqa: B008 - frozen
    shape_of: Callable[[str], tuple[int, ...]] | None = None,
) -> tuple[Any, str]:
    """The config to rebuild the PEFT model with, and where it came from (``folder``: the run's AdapterFolder;
    ``shape_of``: a component key's shape, from which LoRA's ranks are read when nothing saved them)."""
    if given.file is not None:
        found: tuple[Any, str] = (_from_file(given.file, layout), f"--adapter-config {given.file}")
    elif folder is not None:
        if given.lora:
            flags = " and ".join(f"--{k.replace('_', '-')}" for k in given.lora)
            raise ConvertError(
                f"{folder.path / ADAPTER_CONFIG}: the run's adapter config already gives the LoRA settings; drop "
                f"{flags} (they are for runs that saved none), or pass --adapter-config FILE to replace it"
            )
        config = build_config(folder.config, layout, folder.path / ADAPTER_CONFIG, ADAPTER_CONFIG)
        _warn_hparams_disagree(config, hparams, folder.path / ADAPTER_CONFIG, where)
        found = (config, ADAPTER_CONFIG)
    else:
        found = _from_hparams(layout, hparams, where, given, shape_of)
    check_tensors_fit(found[0], layout, where, found[1])
    refuse_unmergeable(found[0], where)
    return found


def _warn_hparams_disagree(config: Any, hparams: Mapping[str, Any], path: object, where: str) -> None:
    said = {name: _hparam(hparams, name, where) for name in ("lora_r", "lora_alpha")}
    has = {"lora_r": getattr(config, "r", None), "lora_alpha": getattr(config, "lora_alpha", None)}
    if any(v is not None and has[k] is not None and v != has[k] for k, v in said.items()):
        log.warning(
            "hyper_parameters say lora_r=%s lora_alpha=%s but %s says r=%s alpha=%s; using the adapter config",
            said["lora_r"],
            said["lora_alpha"],
            path,
            has["lora_r"],
            has["lora_alpha"],
        )


def _hparam(hparams: Mapping[str, Any], name: str, where: str) -> Any:
    found = lookup(hparams, (name,), name, ADVICE, where)
    return found[1] if found else None


def _peft_nodes(tree: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Nodes of the hyper-parameters that are PEFT configs: a ``peft_type`` PEFT registers, or a Hydra ``_target_``
    naming a PEFT config class."""
    if isinstance(tree, dict):
        peft_type, target = tree.get("peft_type"), tree.get("_target_")
        if isinstance(peft_type, str) and peft_type in registry.tuners():
            yield path, tree
            return
        if isinstance(target, str) and (cls := registry.config_class(target)) is not None:
            fields = {k: v for k, v in tree.items() if k != "_target_"}
            yield path, {**fields, "peft_type": _type_of(cls)}
            return
        for key, value in tree.items():
            yield from _peft_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _peft_nodes(value, f"{path}[{i}]")


def _without_default_objects(node: dict[str, Any]) -> dict[str, Any]:
    """Only the config class's fields: what a pickled config holds beside them (SHiRA's ``mask_fn``, a function its
    config sets from ``mask_type``) is set again by the class, as when PEFT reads adapter_config.json."""
    fields = {f.name for f in dataclasses.fields(registry.tuner(node["peft_type"]).config_cls)}
    dropped = sorted(k for k in node if k not in fields)
    if dropped:
        log.debug("a PEFT config's attributes that are not its fields, left to the config class: %s", dropped)
    return {k: v for k, v in node.items() if k in fields}


def _type_of(config_cls: type) -> str:
    return next(t.peft_type for t in registry.tuners().values() if t.config_cls is config_cls)


def _from_file(path: Path, layout: PeftLayout) -> Any:
    import json

    if not path.is_file():
        raise ConvertError(f"{path}: no such file (given with --adapter-config); pass a PEFT adapter_config.json")
    with untrusted(path, "not a PEFT adapter config", "pass the adapter_config.json PEFT wrote for the run"):
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
    return build_config(raw, layout, path, path.name)


def _from_hparams(
    layout: PeftLayout,
    hparams: Mapping[str, Any],
    where: str,
    given: GivenConfig = GivenConfig(),  # noqa: B008 - frozen
    shape_of: Callable[[str], tuple[int, ...]] | None = None,
) -> tuple[Any, str]:
    if given.lora and layout.tuner != "LORA":
        raise ConvertError(
            f"{where}: --lora-r/--lora-alpha describe a LoRA adapter, but the checkpoint holds "
            f"{registry.tuner(layout.tuner).article if layout.tuner else 'a'} "
            f"{registry.tuner(layout.tuner).title if layout.tuner else 'PEFT'} adapter; pass --adapter-config FILE"
        )
    nodes = list(_peft_nodes(hparams))
    distinct = {repr(sorted(n.items(), key=lambda kv: kv[0])) for _, n in nodes}
    if len(distinct) > 1:
        shown = ", ".join(f"hyper_parameters.{p}" for p, _ in nodes)
        raise ConvertError(f"{where}: the hyper-parameters hold several PEFT configs ({shown}); {ADVICE}")
    if nodes:
        path, node = nodes[0]
        node = _without_default_objects(node)
        unreadable = sorted(k for k, v in node.items() if isinstance(v, (Opaque, Unresolved)))
        if unreadable:
            raise ConvertError(
                f"{where}: hyper_parameters.{path} holds a PEFT config whose {preview(unreadable, 3)} cannot be read "
                f"as plain values; {ADVICE}"
            )
        return build_config(node, layout, where, f"hyper_parameters.{path}"), f"hyper_parameters.{path}"
    if layout.tuner == "LORA":
        return _lora_from_hparams(layout, hparams, where, given, shape_of)
    named = f"{registry.tuner(layout.tuner).article} {registry.tuner(layout.tuner).title}" if layout.tuner else "a PEFT"
    raise ConvertError(
        f"{where}: the checkpoint holds {named} adapter ({preview(sorted(layout.segments), 3)}) but not its config: "
        "no adapter_config.json (lora_weights/) and no PEFT config in the hyper-parameters; its tensors do not record "
        f"the settings its merge needs (scaling, rank allocation, ...); {ADVICE}"
    )


# Where projects keep LoRA's alpha when no PEFT config was saved: ``lora_alpha`` at any depth, or ``alpha`` in a node
# whose name says it is the adapter's (``lora.alpha``, ``peft_config.alpha``); a bare ``alpha`` elsewhere is some
# other alpha (a loss's, an optimizer's) and is never taken.
ADAPTER_NODES = re.compile(r"(^|[._])(lora|peft|adapter)", re.IGNORECASE)


def _lora_setting(hparams: Mapping[str, Any], names: tuple[str, ...], short: tuple[str, ...], where: str):
    """(path, value) of a LoRA setting in the hyper-parameters, or None."""
    found = lookup(hparams, names, names[0], ADVICE, where)
    if found is not None:
        return found
    for name in short:
        nodes = [(p, v) for p, v in find(hparams, name) if v is not None and ADAPTER_NODES.search(p.rpartition(".")[0])]
        values = {repr(v) for _, v in nodes}
        if len(values) > 1:
            shown = ", ".join(f"hyper_parameters.{p} = {v!r}" for p, v in nodes)
            raise ConvertError(f"{where}: {names[0]} is ambiguous: {shown}; pass --{names[0].replace('_', '-')}")
        if nodes:
            return nodes[0]
    return None


def lora_ranks(layout: PeftLayout, shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, int]:
    """Each adapted module's rank, read from its ``lora_A`` (or ``lora_embedding_A``) tensor."""
    ranks = {}
    for module in layout.adapted:
        for key in (f"{PEFT_PREFIX}{module}.lora_A.{layout.adapter_name}.weight",
                    f"{PEFT_PREFIX}{module}.lora_embedding_A.{layout.adapter_name}"):  # fmt: skip
            with contextlib.suppress(KeyError):
                ranks[plain_module(module)] = int(shape_of(key)[0])
                break
    return ranks


def _lora_from_hparams(
    layout: PeftLayout,
    hparams: Mapping[str, Any],
    where: str,
    given: GivenConfig = GivenConfig(),  # noqa: B008 - frozen
    shape_of: Callable[[str], tuple[int, ...]] | None = None,
) -> tuple[Any, str]:
    """A LoRA config for a run that saved none: alpha from ``--lora-alpha`` or the hyper-parameters (``lora_alpha``,
    ``lora.alpha``, ...), never guessed; r from ``--lora-r``, the hyper-parameters or the tensors; targets and DoRA
    from the tensors."""
    found = {
        "lora_r": _lora_setting(hparams, ("lora_r",), ("r", "rank"), where),
        "lora_alpha": _lora_setting(hparams, ("lora_alpha",), ("alpha", "lora_alpha"), where),
        "use_rslora": lookup(hparams, ("use_rslora",), "use_rslora", ADVICE, where),
    }
    for name, value in given.lora.items():
        found[name] = (f"--{name.replace('_', '-')}", value)
    ranks = lora_ranks(layout, shape_of) if shape_of is not None else {}
    if found["lora_r"] is None and ranks:
        found["lora_r"] = ("the tensors", max(set(ranks.values()), key=list(ranks.values()).count))
    r, alpha = (found[name][1] if found[name] else None for name in ("lora_r", "lora_alpha"))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ConvertError(
            f"{where}: the LoRA scaling is unknown: the run saved no adapter_config.json (lora_weights/) and no "
            "lora_alpha in its hyper-parameters, and the tensors do not record it; pass --lora-alpha N (the "
            "lora_alpha the run trained with), or --adapter-config FILE with its PEFT config"
        )
    if not isinstance(r, int) or isinstance(r, bool):
        raise ConvertError(f"{where}: the LoRA rank is unknown; pass --lora-r N, or --adapter-config FILE")
    pattern = {m: n for m, n in ranks.items() if n != r}
    raw = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {f"^{re.escape(m)}$": n for m, n in pattern.items()},
        "target_modules": layout.target_names,
        "modules_to_save": layout.saved_names or None,
        "use_dora": "lora_magnitude_vector" in layout.segments,
        "use_rslora": bool(found["use_rslora"][1]) if found["use_rslora"] else False,
        "lora_dropout": 0.0,
    }
    said = [found[name][0] for name in ("lora_r", "lora_alpha")]
    in_hparams = [p for p in said if not p.startswith("--") and p != "the tensors"]
    others = sorted(f"r from {p}" if p == "the tensors" else p for p in said if p not in in_hparams)  # flags first
    config_from = ", ".join([f"hyper_parameters ({', '.join(in_hparams)})"] * bool(in_hparams) + others)
    return build_config(raw, layout, where, "the hyper-parameters"), config_from


def check_tensors_fit(config: Any, layout: PeftLayout, where: str, source: str) -> None:
    """The checkpoint's adapter tensors must be of the config's tuner."""
    tuner = registry.tuner(config.peft_type)
    foreign = sorted(layout.segments - tuner.names)
    if foreign:
        held = registry.tuner(layout.tuner).title if layout.tuner else "other"
        raise ConvertError(
            f"{where}: the checkpoint holds {held} tensors ({preview(foreign, 3)}) but {source} describes a "
            f"{tuner.title} adapter; the config belongs to another run; {ADVICE}"
        )


def refuse_unmergeable(config: Any, where: str) -> None:
    """A tuner (or a tuner's mode) that PEFT cannot merge into plain weights stops the conversion, saying why."""
    tuner = registry.tuner(config.peft_type)
    why = tuner.refusal
    if why is None:
        why = next((text for f, text in registry.INPUT_DEPENDENT_FIELDS.items() if getattr(config, f, None)), None)
    if why is not None:
        raise ConvertError(
            f"{where}: {tuner.article} {tuner.title} adapter ({tuner.peft_type}) cannot be merged into plain weights: "
            f"{why}; serve it with PEFT instead (PeftModel.from_pretrained on the base model)"
        )


def component_config(config: Any, layout: PeftLayout, prefix: str) -> Any:
    """A whole-model adapter's config restated for one component's model (PEFT wrapped the whole VLM): the
    component's adapted modules as exact targets, its modules_to_save, and each module's rank and alpha as PEFT's own
    pattern matching gives them for the module's full name (``prefix`` + its path in the component)."""
    from peft.utils.other import get_pattern_key

    restated = copy.deepcopy(config)
    modules = [m for m in layout.merged_modules if m not in layout.token_modules]
    for field, default_field in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha"), ("alpha_pattern", "alpha")):
        pattern, default = getattr(config, field, None), getattr(config, default_field, None)
        if pattern is None or default is None:
            continue
        own = {}
        for module in modules:
            value = pattern.get(get_pattern_key(list(pattern), prefix + module), default) if pattern else default
            if value != default:
                own[re.escape(module)] = value
        setattr(restated, field, own)
    restated.target_modules = set(modules)
    restated.modules_to_save = layout.saved_names or None
    for field in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if hasattr(restated, field):
            setattr(restated, field, None)
    return restated


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(getattr(value, "value", value))


def parameters(config: Any) -> dict[str, Any]:
    """The config's settings that differ from its class's defaults (what the manifest and inspect show)."""
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    found = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in BOOKKEEPING or (f.name in defaults and _plain(value) == _plain(defaults[f.name])):
            continue
        found[f.name] = _plain(value)
    return found
