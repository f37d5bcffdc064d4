"""How the options each front end was given become one TrainConfig: decided here once, for the command line and the
ComfyUI nodes alike.

A front end hands over its options as `Source`s, each the flat options (sd-scripts' names, FlowConfig's fields, and
`network` holding a LoRAConfig) that one place set explicitly, in order: a later source wins, and every value it
replaces is reported. Under them lie `defaults` (sd-scripts' for the CLI, the recommended values for the nodes).
On top, the rules no single source can apply: a text-encoder learning rate left None is the learning rate; default
caches give way to datasets that change images or captions every step (a cache someone chose keeps the core's error);
--model_type chroma turns on what Chroma needs; `--memory auto` fills what nobody set from the measured machine,
leaving out what the explicit options rule out. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .flow import FlowConfig
from .lora import LoRAConfig
from .memory_auto import auto_memory
from .memory_plan import MemoryPlan, TransformerSize, drop_impossible_caches
from .model_type import chroma_fields
from .resolve import resolve_datasets
from .sections import OptimizerConfig
from .train import FLAG_SECTIONS, TrainConfig

FLOW_FIELDS = tuple(f.name for f in fields(FlowConfig))
NETWORK = "network"  # the one option that is a whole section (a LoRAConfig), not a flat value
CACHE_PAIRS = (("cache_latents", "cache_latents_to_disk"),
               ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"))
assert not set(FLOW_FIELDS) & set(FLAG_SECTIONS), "a flow field would shadow a flat flag"


@dataclass(frozen=True)
class Source:
    """Options one place set explicitly: `name` says where, as the user reads it ("the command line", "the optimizer
    node", "extra_options"); `flags` maps option names to values."""
    name: str
    flags: Mapping[str, Any]


@dataclass(frozen=True)
class Machine:
    """What `--memory auto` plans for: the training device's free memory, the host memory block swap may pin (None:
    not limited) and the transformer's size."""
    free_bytes: float
    device_type: str
    host_free_bytes: float | None
    size: TransformerSize


@dataclass(frozen=True)
class Resolved:
    config: TrainConfig
    notes: tuple[str, ...]  # every value replaced or left out, and why, for the user
    memory: MemoryPlan | None  # the memory plan, with --memory auto


def option_names() -> frozenset[str]:
    """Every option a Source may set."""
    return frozenset((*FLAG_SECTIONS, *FLOW_FIELDS, NETWORK))


def combine(sources: Sequence[Source], *, defaults: Mapping[str, Any] | None = None,
            measure: Callable[[TrainConfig], Machine] | None = None) -> Resolved:
    """The config the sources describe. `defaults`: flat options (and `flow`/`network` sections) under every source;
    `measure`: with --memory auto, reads the machine the draft config would train on."""
    chosen, notes = layer(sources)
    values = {**flat_defaults(defaults or {}), **chosen}
    values["text_encoder_lr"] = text_encoder_lrs(values)
    if values.get("model_type") == "chroma":
        extra, chroma_notes = chroma_fields(chosen)
        values.update(extra)
        notes += chroma_notes
    network = values.pop(NETWORK, None) or LoRAConfig()
    notes += drop_default_caches(values, chosen, network)
    draft = build(values, network)
    if measure is None:
        return Resolved(draft, tuple(notes), None)
    machine = measure(draft)
    auto = auto_memory(machine.free_bytes, machine.device_type, datasets=resolve_datasets(draft), given=chosen,
                       train_t5xxl=network.train_t5xxl, size=machine.size, host_free_bytes=machine.host_free_bytes)
    return Resolved(draft.with_flags(**auto.fields), (*notes, *auto.notes), auto.plan)


def layer(sources: Sequence[Source]) -> tuple[dict[str, Any], list[str]]:
    """Later sources over earlier ones -> (the options set, a note for each value a later source replaced)."""
    known = option_names()
    chosen: dict[str, Any] = {}
    setter: dict[str, str] = {}
    notes = []
    for source in sources:
        for name, value in source.flags.items():
            if name not in known:
                raise KeyError(f"{source.name}: {name} is not an option")  # a front end's bug, not the user's input
            if name in chosen and chosen[name] != value:
                notes.append(f"--{name} {shown(value)} ({source.name}) overrides {setter[name]}'s "
                             f"{shown(chosen[name])}")
            chosen[name], setter[name] = value, source.name
    return chosen, notes


def shown(value) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def flat_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` with a `flow` section spread into its fields (sources set flow options one by one)."""
    values = dict(defaults)
    flow = values.pop("flow", None)
    if flow is not None:
        values.update(asdict(flow))
    return values


def text_encoder_lrs(values: Mapping[str, Any]) -> tuple[float, ...] | None:
    """A text-encoder learning rate given as None (the network node's "0 = the learning rate") is the final
    learning rate, whichever source set it."""
    rates = values.get("text_encoder_lr")
    if rates is None:
        return None
    learning_rate = values.get("learning_rate", OptimizerConfig().learning_rate)
    return tuple(learning_rate if v is None else float(v) for v in rates) or None


def drop_default_caches(values: dict, chosen: Mapping[str, Any], network: LoRAConfig) -> list[str]:
    """Caches that are on by default (nobody chose them) are turned off where a dataset changes images or captions
    every step, or where T5-XXL trains, instead of failing after the models have loaded; a cache someone chose keeps
    the core's error. Only typed datasets are looked at here (the CLI's defaults cache nothing)."""
    defaulted = {name: values.get(name, False) for pair in CACHE_PAIRS if not set(pair) & set(chosen)
                 for name in pair}
    if not any(defaulted.values()):
        return []
    notes = drop_impossible_caches(defaulted, values.get("datasets") or (), network.train_t5xxl)
    values.update(defaulted)
    return notes


def build(values: Mapping[str, Any], network: LoRAConfig) -> TrainConfig:
    flow = FlowConfig(**{name: values[name] for name in FLOW_FIELDS if name in values})
    flags = {name: value for name, value in values.items() if name in FLAG_SECTIONS}
    return TrainConfig.from_flags(network=network, flow=flow, **flags)
