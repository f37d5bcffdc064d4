"""UI-format ComfyUI workflows (what the browser saves: nodes with widgets_values, links) to the API format
(what POST /prompt takes), for tests that queue a saved workflow without a browser.

It follows the frontend's own conversion (ComfyUI_frontend 1.27, the version ComfyUI v0.3.64 pins):
`graphToPrompt` (src/utils/executionUtil.ts) and link resolution (ExecutableNodeDTO.resolveInput/resolveOutput):

- widget values are assigned in order to the node's widget inputs in /object_info order (required, then optional;
  INT, FLOAT, STRING, BOOLEAN, COMBO and list-typed inputs, not forceInput ones), as LGraphNode.configure does. The
  frontend adds widgets that are saved in widgets_values but never sent: after an INT with `control_after_generate`
  (or, when the flag is absent, one named seed / noise_seed) the "control_after_generate" value ("fixed",
  "randomize", ...); after a COMBO with `control_after_generate` that value and a filter string; after an
  image/video upload combo the upload button's value. Widgets the saved list does not reach keep their defaults;
  values past the last widget (widgets a frontend extension added) are ignored. Workflows saved before frontend
  1.16 also hold a value for each forceInput input: recognised by their count and dropped;
- inputs with a link (a socket, or a widget converted to an input) take the link instead of the widget value;
- muted nodes (mode 2) and bypassed nodes (mode 4) are left out; a link from a bypassed node is followed to that
  node's input of the same slot (if its type fits) or else its first input of a matching type; inputs left pointing
  at a left-out node are dropped, as the frontend does;
- Reroute nodes are followed; Note / MarkdownNote are skipped; a PrimitiveNode's value goes into the widget it
  feeds;
- list values are wrapped as {"__value__": [...]} (a bare list would read as a link).

Widget values saved as a dict (some third-party nodes' frontends do that) and subgraphs are refused with a clear
error. `replace_types` swaps class types (e.g. the stock loaders for test loaders taking the same widgets).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MUTED, BYPASSED = 2, 4
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
SKIPPED_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"


class WorkflowError(ValueError):
    """The UI workflow can't be converted against this server's /object_info."""


def ui_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any],
              replace_types: Mapping[str, str] | None = None,
              widget_types: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The API prompt ({node_id: {"class_type", "inputs", "_meta"}}) of a UI-format workflow.

    object_info: the server's GET /object_info. replace_types: {class type in the workflow: class type to queue};
    the widgets are matched against the original type's definition when the server has it, else the replacement's.
    widget_types: extra input types that a frontend extension renders as a widget (saved in widgets_values)."""
    replace_types = dict(replace_types or {})
    widget_kinds = WIDGET_TYPES | set(widget_types)
    if not isinstance(workflow, Mapping) or "nodes" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes'); an API-format prompt needs no conversion")
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow.get("links") or [])

    for node in nodes.values():
        if node.get("type") in subgraphs:
            raise WorkflowError(f"node {node['id']} is a subgraph ({node['type']}): subgraphs are not supported")

    def resolve_output(node_id: str, slot: int, want: str, seen: set) -> tuple | None:
        """('link', node_id, slot) | ('value', v) | None, as ExecutableNodeDTO.resolveOutput."""
        key = (node_id, "out", slot)
        if key in seen:
            raise WorkflowError(f"circular links through node {node_id}")
        seen.add(key)
        node = nodes.get(node_id)
        if node is None:
            raise WorkflowError(f"a link comes from node {node_id}, which is not in the workflow")
        ntype = node.get("type")
        if node.get("mode", 0) == BYPASSED:
            outputs = node.get("outputs") or []
            out_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"
            index = _bypass_slot(node.get("inputs") or [], slot, out_type, want)
            return None if index < 0 else resolve_input(node_id, index, want, seen)
        if ntype == REROUTE:
            return resolve_input(node_id, 0, want, seen)
        if ntype == PRIMITIVE:
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if ntype in SKIPPED_TYPES:
            return None
        return ("link", node_id, slot)

    def resolve_input(node_id: str, index: int, want: str | None, seen: set) -> tuple | None:
        key = (node_id, "in", index)
        if key in seen:
            raise WorkflowError(f"circular links through node {node_id}")
        seen.add(key)
        inputs = nodes[node_id].get("inputs") or []
        if index >= len(inputs) or inputs[index].get("link") is None:
            return None
        link_id = inputs[index]["link"]
        if link_id not in links:
            raise WorkflowError(f"node {node_id} input {inputs[index].get('name')!r} names link {link_id}, "
                                f"which is not in the workflow's links")
        origin_id, origin_slot = links[link_id]
        return resolve_output(origin_id, origin_slot, want or inputs[index].get("type", "*"), seen)

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in nodes.items():
        ntype = node.get("type")
        if ntype in SKIPPED_TYPES or ntype in (REROUTE, PRIMITIVE) or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        queued = replace_types.get(ntype, ntype)
        definition = object_info.get(ntype) or object_info.get(queued)
        if definition is None:
            raise WorkflowError(f"node {node_id}: the server has no node type {ntype!r}"
                                + (f" (nor {queued!r})" if queued != ntype else ""))
        if queued not in object_info:
            raise WorkflowError(f"node {node_id}: the server has no node type {queued!r} (replacing {ntype!r})")
        inputs: dict[str, Any] = {}
        for name, value in _widget_values(node_id, node, definition, widget_kinds).items():
            inputs[name] = _wrap(value)
        for index, slot in enumerate(node.get("inputs") or []):
            resolved = resolve_input(node_id, index, None, set())
            if resolved is None:
                continue
            if resolved[0] == "value":
                inputs[slot["name"]] = _wrap(resolved[1])
            else:
                inputs[slot["name"]] = [resolved[1], int(resolved[2])]
        prompt[node_id] = {"inputs": inputs, "class_type": queued, "_meta": {"title": node.get("title") or ntype}}

    for entry in prompt.values():  # as graphToPrompt: drop inputs linked to nodes that were left out
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _links(raw: list) -> dict[Any, tuple[str, int]]:
    """{link id: (origin node id, origin slot)} from either link format: [id, origin, slot, target, slot, type]
    (schema 0.4) or {"id", "origin_id", "origin_slot", ...} (schema 1)."""
    out = {}
    for link in raw:
        if isinstance(link, Mapping):
            out[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))
        else:
            out[link[0]] = (str(link[1]), int(link[2]))
    return out


def _types_match(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection: equal, a wildcard, or overlapping comma-separated lists."""
    a, b = str(a or "*").upper(), str(b or "*").upper()
    if a in ("*", "") or b in ("*", "") or a == b:
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _bypass_slot(inputs: list, slot: int, out_type: str, want: str) -> int:
    """ExecutableNodeDTO#getBypassSlotIndex: the input a bypassed node passes through to output `slot`."""
    if want in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and _types_match(inputs[slot].get("type"), out_type) \
            and _types_match(inputs[slot].get("type"), want):
        return slot
    for i, slot_info in enumerate(inputs):
        if slot_info.get("type") == want:
            return i
    for i, slot_info in enumerate(inputs):
        if _types_match(slot_info.get("type"), out_type) and _types_match(slot_info.get("type"), want):
            return i
    return -1


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


def _widget_specs(definition: Mapping[str, Any], widget_kinds: set) -> list[tuple[str, int, bool, Any]]:
    """[(name, extra saved values, forceInput, default)] of the inputs that a frontend shows as widgets (plus the
    forceInput ones that workflows from before frontend 1.16 still hold a value for), in /object_info order."""
    spec_in = definition.get("input") or {}
    order = definition.get("input_order") or {s: list(spec_in.get(s) or {}) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section) or []:
            spec = (spec_in.get(section) or {}).get(name)
            if spec is None:
                continue
            kind = spec[0] if spec else None
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if not (is_combo or kind in widget_kinds):
                continue
            control = options.get("control_after_generate")
            extra = 0
            if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                extra = 1
            elif is_combo and control:
                extra = 2
            elif is_combo and any(options.get(flag) for flag in UPLOAD_FLAGS):
                extra = 1
            out.append((name, extra, bool(options.get("forceInput")), _default(kind, options)))
    return out


def _default(kind: Any, options: Mapping[str, Any]) -> Any:
    """The value a new widget starts with in the frontend (use*Widget.ts: default, else the first option, 0, "",
    false)."""
    if options.get("default") is not None and options.get("default") != "":
        return options["default"]
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(kind, options.get("default"))


def _widget_values(node_id: str, node: Mapping[str, Any], definition: Mapping[str, Any],
                   widget_kinds: set) -> dict[str, Any]:
    """As the frontend loads a node (LGraphNode.configure): every widget starts at its default, then the saved
    values are assigned in order to the widgets that are saved (each widget, then its extra ones); values past
    the last widget are ignored. A workflow from before 1.16 that holds one value per forceInput input too is
    recognised by its length and those values are dropped (litegraphUtil.ts migrateWidgetsValues)."""
    values = node.get("widgets_values")
    if values is None:
        values = []
    if not isinstance(values, list):
        raise WorkflowError(f"node {node_id} ({node.get('type')}): widgets_values is a {type(values).__name__}, "
                            "not a list; this converter handles list-valued widgets only")
    specs = _widget_specs(definition, widget_kinds)
    widgets = [s for s in specs if not s[2]]
    if len(widgets) != len(specs) and sum(1 + extra for _, extra, _, _ in specs) == len(values):
        widgets = specs  # legacy layout: forceInput dummies are read past below
    out, i = {}, 0
    for name, extra, force, default in widgets:
        if not force:
            out[name] = values[i] if i < len(values) else default
        i += 1 + extra
    return {name: value for name, value in out.items() if value is not None}
