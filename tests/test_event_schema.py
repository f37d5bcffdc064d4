"""trainer/event_schema.py, the websocket contract between the train node and the web extension: js/event_schema.js
is generated from it and current, payloads are checked field by field, and the extension's pure message handling
(js/lib/series.js) applied in Node.js to payloads built by the Python schema. The Node.js tests are skipped with one
line where `node` is not installed."""

import json
import math
import shutil
import subprocess

import pytest
from packimport import PACK, REPO, pack  # noqa: F401

schema = pack("trainer.event_schema")
errors = pack("trainer.errors")
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (the JS checks run in Node.js)")
GOOD_STEP = dict(step=2, total=10, epoch=1, loss=0.25, average_loss=0.4, lr=1e-4, eta_seconds=16.0)


def test_js_event_schema_is_generated_from_the_python_schema():
    js = REPO / "js" / "event_schema.js"
    assert js.is_file(), "js/event_schema.js is missing: run python -m trainer.event_schema"
    assert js.read_text(encoding="utf-8") == schema.js_module(), \
        "js/event_schema.js is out of date: run python -m trainer.event_schema"


def test_every_message_travels_as_its_own_event_with_the_envelope():
    assert schema.event_name("validation") == "flux_lora_trainer.validation"
    for message_type in schema.MESSAGES:
        fields = schema.fields_of(message_type)
        assert list(fields)[:2] == ["node", "prompt_id"], message_type
        assert all(set(types) <= {"integer", "number", "string", "boolean", "null", "string[]", "object"}
                   for types in fields.values()), message_type


def test_a_payload_has_exactly_the_schemas_fields():
    name, data = schema.payload("step", node="7", prompt_id="p", **GOOD_STEP)
    assert name == "flux_lora_trainer.step"
    assert data == {"node": "7", "prompt_id": "p", **GOOD_STEP}
    with pytest.raises(schema.EventSchemaError, match="'step'.*fields not in the schema: validation_loss"):
        schema.payload("step", node="7", prompt_id="p", validation_loss=0.3, **GOOD_STEP)
    with pytest.raises(schema.EventSchemaError, match="missing fields: eta_seconds"):
        schema.payload("step", node="7", prompt_id="p", **{k: v for k, v in GOOD_STEP.items() if k != "eta_seconds"})
    with pytest.raises(schema.EventSchemaError, match="message type 'memory'.*expected one of step, validation"):
        schema.payload("memory", node="7", prompt_id="p")
    assert issubclass(schema.EventSchemaError, errors.TrainerError)


@pytest.mark.parametrize("field, value, expected", [
    ("step", 2.0, "integer"), ("step", True, "integer"), ("total", "10", "integer"), ("loss", "0.1", "number or null"),
    ("epoch", None, "integer")])
def test_a_field_of_the_wrong_type_is_refused_with_its_name(field, value, expected):
    with pytest.raises(schema.EventSchemaError, match=f"field '{field}': expected {expected}, not"):
        schema.payload("step", node="7", prompt_id=None, **{**GOOD_STEP, field: value})


def test_lists_and_objects_are_checked_to_their_items():
    ok = dict(free_gib=23.5, guide_row=24, estimate_gib=14.6, settings={"fp8_base": True, "blocks_to_swap": None},
              lines=("auto: 23.5 GiB free",))
    assert schema.payload("memory_plan", node="3", prompt_id="p", **ok)[1]["lines"] == ["auto: 23.5 GiB free"]
    with pytest.raises(schema.EventSchemaError, match="field 'lines': expected string\\[\\]"):
        schema.payload("memory_plan", node="3", prompt_id="p", **{**ok, "lines": ["a", 2]})
    with pytest.raises(schema.EventSchemaError, match="field 'settings': expected object"):
        schema.payload("memory_plan", node="3", prompt_id="p", **{**ok, "settings": {"nested": {"a": 1}}})


def test_a_diverged_loss_is_sent_as_null_so_the_browser_can_parse_the_message():
    _, data = schema.payload("step", node="7", prompt_id="p", **{**GOOD_STEP, "loss": math.nan,
                                                                 "average_loss": math.inf})
    assert data["loss"] is None and data["average_loss"] is None
    json.dumps(data, allow_nan=False)  # what JSON.parse accepts
    with pytest.raises(schema.EventSchemaError, match="field 'free_gib': expected number, not nan"):
        schema.payload("memory_plan", node="3", prompt_id="p", free_gib=math.nan, guide_row=None, estimate_gib=None,
                       settings={}, lines=[])


def test_the_generator_rewrites_a_stale_js_module_and_check_says_so(tmp_path, monkeypatch, capsys):
    target = tmp_path / "event_schema.js"
    monkeypatch.setattr(schema, "JS_MODULE", target)
    assert schema.main(["x", "--check"]) == 1 and "out of date" in capsys.readouterr().out
    assert schema.main(["x"]) == 0 and target.read_text(encoding="utf-8") == schema.js_module()
    assert schema.main(["x", "--check"]) == 0 and "current" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the JS, in Node.js

RUN_MESSAGES = """
import { EVENTS, FIELDS } from "./event_schema.js";
import { applyMessage, emptyHistory } from "./lib/series.js";
const messages = JSON.parse(process.argv[2]);
const history = emptyHistory();
const after = messages.map(([type, detail]) => {
  const reset = applyMessage(history, type, detail);
  return { reset, history: JSON.parse(JSON.stringify(history)) };
});
console.log(JSON.stringify({ EVENTS, FIELDS, after }));
"""


def run_in_node(tmp_path, messages: list) -> dict:
    """The extension's event_schema.js and lib/series.js as an ES module package; RUN_MESSAGES over `messages`."""
    (tmp_path / "lib").mkdir()
    for name in ("event_schema.js", "lib/series.js"):
        shutil.copy(REPO / "js" / name, tmp_path / name)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "run.js").write_text(RUN_MESSAGES)
    done = subprocess.run([NODE, str(tmp_path / "run.js"), json.dumps(messages)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def message(message_type: str, prompt_id: str = "run-1", **fields) -> list:
    name, data = schema.payload(message_type, node="7", prompt_id=prompt_id, **fields)
    assert name == schema.event_name(message_type)
    return [message_type, data]


@needs_node
def test_the_js_constants_are_the_python_schema(tmp_path):
    got = run_in_node(tmp_path, [])
    assert got["EVENTS"] == {t: schema.event_name(t) for t in schema.MESSAGES}
    assert got["FIELDS"] == {t: {k: list(v) for k, v in schema.fields_of(t).items()} for t in schema.MESSAGES}


@needs_node
def test_the_chart_takes_every_message_the_train_node_sends(tmp_path):
    messages = [
        message("phase", phase="caching latents", done=2, total=8),
        message("status", text="careful", level="warning"),
        message("step", **{**GOOD_STEP, "step": 1}),
        message("step", **{**GOOD_STEP, "step": 2, "loss": math.nan}),
        message("validation", step=2, epoch=1, loss=0.31, per_epoch=False),
        message("validation", step=4, epoch=2, loss=0.29, per_epoch=True),  # an epoch's end without its step yet
        message("previews", step=2, paths=["/out/run/sample/a.png"]),
        message("saved", path="/out/run/lora-000002.safetensors", kind="lora", step=2),
        message("finished", steps=2, stopped_early=True),
        message("step", prompt_id="run-2", **{**GOOD_STEP, "step": 1}),
    ]
    after = run_in_node(tmp_path, messages)["after"]
    states = [a["history"] for a in after]
    assert [a["reset"] for a in after] == [True] + [False] * 8 + [True]
    assert states[0]["message"] == "caching latents 2/8" and states[0]["state"] == "running"
    assert states[1]["message"] == "warning: careful"
    assert (states[3]["steps"], states[3]["loss"], states[3]["lr"]) == ([1, 2], [0.25, None], [1e-4, 1e-4])
    assert states[3]["total"] == 10 and states[3]["eta"] == 16.0 and states[3]["epoch"] == 1
    assert states[4]["val"] == [None, 0.31]  # validation reaches the chart, at its step
    assert (states[5]["steps"], states[5]["loss"], states[5]["val"]) == ([1, 2, 4], [0.25, None, None],
                                                                        [None, 0.31, 0.29])
    assert states[6]["message"] == "previews at step 2"
    assert states[7]["message"] == "saved lora: lora-000002.safetensors"
    assert (states[8]["message"], states[8]["state"]) == ("stopped", "stopped")
    assert (states[9]["prompt_id"], states[9]["steps"], states[9]["val"]) == ("run-2", [1], [None])


def test_the_extension_reads_no_message_field_the_schema_lacks():
    """The fields the old extension read but the server never sent stay gone, and the memory plan is read as data,
    not parsed out of status text."""
    main = (REPO / "js" / "flux_lora_trainer.js").read_text(encoding="utf-8")
    series = (REPO / "js" / "lib" / "series.js").read_text(encoding="utf-8")
    for gone in ("validation_loss", "d.memory", "settings:", "startsWith(\"auto:\")", "autoLines"):
        assert gone not in main + series, gone
    assert "plan.lines" in main and 'type === "memory_plan"' in main
