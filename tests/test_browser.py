"""The pack in the real ComfyUI frontend, in a real (headless) Chromium, against the live test server (the `comfyui`
fixture of tests/comfyui_server.py): the example workflows load with every node known and convert exactly as the
tests' own converter does; the train-then-test workflow trains on the tiny models with the loss chart filling and
a preview on the train node while it runs; the chart survives a re-opened workflow and a page reload; the block
picker and the text fields stay in sync and the queued prompt carries the picker's choice; light and dark themes;
and nothing is logged as an error in the browser console; the graph-built dataset example (LoadImage pictures and
their captions into Dataset from Images) trains with the pre-flight report on the node, and the checkpoint-grid
example shows its labelled grid (every saved step x strength) on its Save node. Screenshots go to a temporary folder;
with UPDATE_SCREENSHOTS=1 they replace docs/browser_*.png, docs/image_dataset.png and docs/checkpoint_grid.png (the
README shows them), which a plain run leaves alone.

Needs `playwright` (pip; only the Python package: its browser download does not work here) and Debian's
`chromium` at /usr/bin/chromium (or $CHROMIUM). Without either the module is skipped with one line, or fails when
CI=true.
"""

import json
import os
import random
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from comfyui_server import PACK_NAME, TINY_FILES, TINY_LOADERS

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # reported below
    sync_playwright = None

from packimport import REPO, pack  # noqa: E402

schema = pack("trainer.event_schema")
EXAMPLES = REPO / "example_workflows"
DOCS = REPO / "docs"
HELPERS = REPO / "tests" / "browser" / "page_helpers.js"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS", "").lower() in ("1", "true", "yes")
TRAINER_EVENTS = [schema.event_name(t) for t in schema.MESSAGES]  # the train node's websocket messages
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}
EXTENSION_URL = f"/extensions/{PACK_NAME}"  # where ComfyUI serves the pack's js/ (WEB_DIRECTORY)

TRAIN, NETWORK, MEMORY, DATASET = ("FluxLoraTrainerTrain", "FluxLoraTrainerNetwork", "FluxLoraTrainerMemory",
                                   "FluxLoraTrainerDataset")
IMAGE_SET, CHECKPOINTS, LABEL_GRID = ("FluxLoraTrainerImageDataset", "FluxLoraTrainerCheckpoints",
                                      "FluxLoraTrainerLabelGrid")
OUR_STATUS_NODES = ("FluxLoraTrainerModels", DATASET, "FluxLoraTrainerDatasetToml", "FluxLoraTrainerImageDataset",
                    NETWORK, "FluxLoraTrainerOptimizer", MEMORY, TRAIN, "FluxLoraTrainerCheckpoints")
STEPS = 20  # training steps of the browser run (0.05-1 s each on the tiny models, by CPU load), previews every 5
ENDS = ("execution_success", "execution_error", "execution_interrupted")
# The pictures the browser test loads into the images example's LoadImage nodes (in their order): a star, the shape
# the toy models never saw, in three colours, captioned with the example's trigger word.
STARS = (("red", "white"), ("blue", "gray"), ("yellow", "black"))
PICTURE_SIZE = 128

# Requests a fresh ComfyUI user directory answers with 404 and the browser logs as "Failed to load resource": the
# frontend asks for optional files (user.css, the legacy templates file, the saved-workflow and subgraph folders
# of a user who has none yet, a favicon). Nothing of ours; every other 404 or console error fails the test.
HARMLESS_404 = (r"/api/userdata/user\.css", r"/user\.css", r"/favicon\.ico", r"/api/userdata/comfy\.templates\.json",
                r"/api/userdata\?dir=workflows&.*", r"/api/userdata\?dir=subgraphs%2F&.*")
# Settings a new user's first page load writes itself: with them stored beforehand, frontend 1.27.10 skips its
# template dialog (TutorialCompleted) and a TypeError it throws on first start (the "legacy" canvas navigation mode
# sets these two before they are registered, GraphView settings onChange -> setting.id of undefined).
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Canvas.LeftMouseClickBehavior": "panning",
                      "Comfy.Canvas.MouseWheelScroll": "zoom"}

_missing = ("the Python package playwright is not installed (pip install playwright)" if sync_playwright is None
            else None if Path(CHROMIUM).is_file()
            else f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
if _missing:
    if CI:
        pytest.fail(f"browser tests: {_missing}; CI=true needs them", pytrace=False)
    pytest.skip(f"browser tests skipped: {_missing}", allow_module_level=True)



# ------------------------------------------------------------------------------------------------ fixtures


class Console:
    """Browser console errors, uncaught page errors and HTTP error answers of one page. (Playwright's
    'requestfailed' is not watched: Chromium reports a fetch whose body nobody reads, as the frontend's settings
    POSTs, as net::ERR_ABORTED after its 200 answer.)"""

    def __init__(self, page):
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}\n{getattr(e, 'stack', '')}"))
        page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.status} {r.url}"))

    @staticmethod
    def _harmless(url: str) -> bool:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return any(re.fullmatch(p, path) for p in HARMLESS_404)

    def _console(self, message) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        if message.text.startswith("Failed to load resource") and self._harmless(url):
            return
        self.errors.append(f"console.error: {message.text} ({url})")

    def check(self) -> None:
        failed = [f for f in self.failed if not self._harmless(f.split(" ", 1)[1])]
        problems, self.errors, self.failed = self.errors + failed, [], []
        assert problems == [], "browser console errors:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(page, url: str) -> None:
    page.goto(url)
    # the app is up, our extension's setup ran (it adds its style sheet) and the node definitions are registered
    page.wait_for_function("() => window.app?.graph && window.app.extensionManager && window.LiteGraph"
                           "?.registered_node_types?.FluxLoraTrainerTrain"
                           " && document.getElementById('flux-lora-trainer-style')", timeout=60_000)
    page.add_script_tag(path=str(HELPERS))
    page.evaluate("(types) => window.__fltTest.record(types)", TRAINER_EVENTS)


@pytest.fixture(scope="module")
def ui(comfyui, browser):
    """(page, console) of one ComfyUI tab, shared by this module's tests in order."""
    for key, value in FIRST_RUN_SETTINGS.items():
        comfyui.post_setting(key, value)
    page = browser.new_page(viewport=VIEWPORT)
    console = Console(page)
    page.set_default_timeout(30_000)
    open_app(page, comfyui.url)
    try:
        yield page, console
    finally:
        page.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots go: docs/ with UPDATE_SCREENSHOTS=1, else a temporary folder."""
    return DOCS if UPDATE_SCREENSHOTS else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def dataset(comfyui) -> str:
    from trainer.demo import write_dataset

    name = "flux_lora_browser_dataset"
    folder = comfyui.base_dir / "input" / name
    if not folder.is_dir():
        write_dataset(folder)
    return name


def load(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)


def by_type(page, node_type: str) -> list[int]:
    return page.evaluate("(t) => window.__fltTest.byType(t)", node_type)


def dataset_of(page, node_id: int, widget: str) -> dict:
    """The data attributes of one of our DOM widgets (loss_chart, block_picker, status)."""
    return page.evaluate("([id, name]) => ({...app.graph.getNodeById(id).widgets.find((w) => w.name === name)"
                         ".element.dataset})", [node_id, widget])


def text_of(page, node_id: int, widget: str = "status") -> str:
    return page.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name)"
                         ".element.textContent", [node_id, widget])


def queue(page) -> None:
    """Queue the graph as the Run button does; fail with the server's node errors if it refuses it."""
    errors = page.evaluate("async () => { await app.queuePrompt(0, 1); return app.lastNodeErrors ?? null; }")
    assert not errors, json.dumps(errors)[:3000]


def without_meta(prompt: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


def shot(page, folder: Path, name: str, nodes: list, scale: float, x: int = 30, y: int = 30) -> Path:
    page.evaluate("([ids, s, x, y]) => { window.__fltTest.makeRoom(); window.__fltTest.frame(ids, s, x, y); }",
                  [nodes, scale, x, y])
    page.wait_for_timeout(400)  # two frames: the canvas, then the DOM widgets follow it
    folder.mkdir(exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path))
    return path


# ------------------------------------------------------------------------------------------------ tests


def _provide_loaded_images(workflow: dict, input_dir: Path) -> None:
    """The pictures a workflow's LoadImage nodes name, as a user who loads it has them (the frontend fetches each
    one to show it; a missing one is a 404 in the console)."""
    from PIL import Image

    for node in workflow["nodes"]:
        if node["type"] == "LoadImage" and not (input_dir / node["widgets_values"][0]).is_file():
            Image.new("RGB", (64, 64), (200, 40, 40)).save(input_dir / node["widgets_values"][0])


def _write_stars(input_dir: Path) -> list[str]:
    """The STARS as pictures in the server's input folder (names of this test's own, which no other test writes);
    their names, in order."""
    from trainer.toy.shapes import named

    names = []
    for index, (colour, background) in enumerate(STARS):
        names.append(f"flux_lora_browser_star_{index + 1}.png")
        named(colour, "star", background, seed=index, size=PICTURE_SIZE).save(input_dir / names[-1])
    return names


def _star_captions() -> str:
    """The captions text of the STARS, one line per picture as the images example takes them."""
    return "\n".join(f"a {colour} sks star on a {background} background" for colour, background in STARS)


def _check_loaded_cleanly(page, name: str) -> None:
    """No missing-nodes dialog, and every node known to the frontend and without an error mark."""
    dialogs = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText)")
    assert not [d for d in dialogs if "missing" in d.lower()], (name, dialogs)
    unknown = page.evaluate("() => app.graph._nodes.filter((n) => !LiteGraph.registered_node_types[n.type]"
                            " || n.has_errors).map((n) => n.type)")
    assert unknown == [], (name, unknown)


def _swap_in_tiny_models(page) -> dict:
    """The stock loaders become the test-only tiny loaders (same widgets), inside the page's own graph; the widget
    values that put the tiny model files and small sizes into the graph's nodes."""
    page.evaluate("(pairs) => pairs.forEach(([a, b]) => window.__fltTest.swapType(a, b))", list(TINY_LOADERS.items()))
    tiny = {"flux": TINY_FILES["flux"][1], "clip_l": TINY_FILES["clip_l"][1], "t5xxl": TINY_FILES["t5xxl"][1],
            "ae": TINY_FILES["ae"][1]}
    return {
        "FluxTrainerTestUNETLoader": {"unet_name": tiny["flux"]},
        "FluxTrainerTestDualCLIPLoader": {"clip_name1": tiny["clip_l"], "clip_name2": tiny["t5xxl"]},
        "FluxTrainerTestVAELoader": {"vae_name": tiny["ae"]},
        "FluxLoraTrainerModels": {"transformer": tiny["flux"], "clip_l": tiny["clip_l"], "t5xxl": tiny["t5xxl"],
                                  "ae": tiny["ae"]},
        "FluxLoraTrainerOptimizer": {"learning_rate": 0.01},
        "KSampler": {"steps": 2},
        "EmptySD3LatentImage": {"width": 128, "height": 128},
    }


def _set_all(page, settings: dict) -> None:
    """Widget values {node type: {widget: value}} on every node of each type (each type must be in the graph)."""
    for node_type, values in settings.items():
        ids = by_type(page, node_type)
        assert ids, node_type
        for node_id in ids:
            page.evaluate("([id, v]) => window.__fltTest.set(id, v)", [node_id, values])


def _run(page, timeout_ms: int = 180_000) -> str:
    """Queue the graph as the Run button does and wait for its end, which must be a success; its prompt id."""
    seen = page.evaluate("() => window.__fltTest.events.length")
    queue(page)
    page.wait_for_function("([n, ends]) => window.__fltTest.events.slice(n).some((e) => ends.includes(e.type))",
                           arg=[seen, list(ENDS)], timeout=timeout_ms, polling=200)
    end = page.evaluate("([n, ends]) => window.__fltTest.events.slice(n).find((e) => ends.includes(e.type))",
                        [seen, list(ENDS)])
    assert end["type"] == "execution_success", json.dumps(end)[:3000]
    return end["detail"]["prompt_id"]


def _wait_for_pictures(page, node_ids: list[int]) -> list[list[int]]:
    """Wait until each node shows one loaded picture (the frontend loads them when the node is drawn: frame the
    nodes first); their natural [width, height]s, one list per node."""
    page.wait_for_function("(ids) => ids.every((id) => { const imgs = app.graph.getNodeById(id).imgs ?? [];"
                           " return imgs.length === 1 && imgs[0].complete && imgs[0].naturalWidth > 0; })",
                           arg=node_ids)
    return page.evaluate("(ids) => ids.map((id) => app.graph.getNodeById(id).imgs.map((i) =>"
                         " [i.naturalWidth, i.naturalHeight]))", node_ids)


@contextmanager
def _plain_canvas(page):
    """No minimap and no canvas statistics (frame time, node counts) over the graph, for a screenshot. (The minimap
    is hidden by a style sheet: switching it off by its setting after a loadGraphData logs a frontend error.)"""
    shown = page.evaluate("() => app.extensionManager.setting.get('Comfy.Graph.CanvasInfo')")
    page.evaluate("() => app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false)")
    page.evaluate("() => { const s = document.createElement('style'); s.id = 'flt-test-no-minimap';"
                  " s.textContent = '.minimap-main-container { display: none !important; }';"
                  " document.head.appendChild(s); }")
    try:
        yield
    finally:
        page.evaluate("(shown) => { document.getElementById('flt-test-no-minimap')?.remove();"
                      " return app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', shown); }", shown)


def test_example_workflows_load_with_every_node_and_convert_like_the_tests_converter(comfyui, ui):
    page, console = ui
    files = sorted(EXAMPLES.glob("*.json"))
    assert files
    for path in files:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        _provide_loaded_images(workflow, comfyui.base_dir / "input")
        load(page, workflow)
        _check_loaded_cleanly(page, path.name)
        # our nodes carry our widgets, and nothing of ours is saved in widgets_values or sent in the prompt
        widgets = page.evaluate("() => Object.fromEntries(app.graph._nodes.map((n) => [n.id, (n.widgets ?? [])"
                                ".filter((w) => w.name && w.type.startsWith('flux_lora_trainer_'))"
                                ".map((w) => w.name)]))")
        for node in workflow["nodes"]:
            expected = {TRAIN: ["loss_chart", "status"], NETWORK: ["block_picker", "status"]}.get(
                node["type"], ["status"] if node["type"] in OUR_STATUS_NODES else [])
            assert widgets[str(node["id"])] == expected, (path.name, node["type"], widgets[str(node["id"])])
        saved = page.evaluate("() => app.graph.serialize().nodes.map((n) => [n.id, n.widgets_values ?? []])")
        assert dict(map(tuple, saved)) == {n["id"]: n.get("widgets_values") or [] for n in workflow["nodes"]}, path.name

        got = page.evaluate("() => window.__fltTest.prompt()")  # graphToPrompt, through JSON like the wire
        want = comfyui.prompt_from_ui(workflow)
        assert without_meta(got) == without_meta(want), path.name
        # _meta.title (ignored by the server): the frontend names untitled nodes by their display name
        for node in workflow["nodes"]:
            if node.get("title") and str(node["id"]) in got:
                assert got[str(node["id"])]["_meta"]["title"] == node["title"]
    console.check()


def test_block_picker_and_the_text_fields_stay_in_sync_and_the_prompt_carries_the_picks(ui):
    page, console = ui
    load(page, json.loads((EXAMPLES / "flux_lora_train_then_test.json").read_text(encoding="utf-8")))
    net = by_type(page, NETWORK)[0]
    # the example keeps this node collapsed in a column: open it in a free place below the graph
    page.evaluate("(id) => window.__fltTest.openApart(id)", net)
    page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find((w) => w.name === 'block_picker').element.id ="
                  " 'picker-under-test'; }", net)
    page.evaluate("(id) => window.__fltTest.frame([id], 1, 420, 20)", net)
    page.wait_for_timeout(300)
    picker = page.locator("#picker-under-test")
    picker.wait_for(state="visible")

    def cell(kind: str, index: int):
        return picker.locator(f".flt-picker-grid[data-kind={kind}] .flt-cell[data-index='{index}']")

    def fields() -> tuple:
        v = page.evaluate("(id) => window.__fltTest.widgetValues(id)", net)
        return v["block_preset"], v["double_blocks"], v["single_blocks"]

    def lit(kind: str) -> list[int]:
        return page.evaluate("(k) => [...document.querySelectorAll(`#picker-under-test .flt-picker-grid[data-kind=${k}]"
                             " .flt-cell.flt-on`)].map((c) => +c.dataset.index)", kind)

    assert fields() == ("custom", "all", "all") and len(lit("double")) == 19 and len(lit("single")) == 38
    picker.locator("button[data-preset=custom][data-double=none]").click()  # "none"
    assert fields() == ("custom", "none", "none") and lit("double") == lit("single") == []
    cell("double", 3).click()
    assert fields() == ("custom", "3", "none") and lit("double") == [3]
    # drag over double 5..9 (a real mouse: press on 5, move across, release on 9)
    box5, box9 = cell("double", 5).bounding_box(), cell("double", 9).bounding_box()
    page.mouse.move(box5["x"] + 4, box5["y"] + 5)
    page.mouse.down()
    page.mouse.move(box9["x"] + 4, box9["y"] + 5, steps=8)
    page.mouse.up()
    assert fields() == ("custom", "3,5-9", "none") and lit("double") == [3, 5, 6, 7, 8, 9]
    # dragging from a selected block clears
    box6, box7 = cell("double", 6).bounding_box(), cell("double", 7).bounding_box()
    page.mouse.move(box6["x"] + 4, box6["y"] + 5)
    page.mouse.down()
    page.mouse.move(box7["x"] + 4, box7["y"] + 5, steps=4)
    page.mouse.up()
    assert fields()[1] == "3,5,8-9"
    cell("single", 37).click()
    assert fields() == ("custom", "3,5,8-9", "37")

    # a preset button sets the node's block_preset and writes its fields; a click then goes back to custom
    picker.locator("button[data-preset='single 10-20']").click()
    assert fields() == ("single 10-20", "none", "10-20") and lit("single") == list(range(10, 21))
    cell("single", 0).click()
    assert fields() == ("custom", "none", "0,10-20")
    # the combo itself (a user's pick) also writes the fields and redraws the grid
    page.evaluate("(id) => window.__fltTest.set(id, {block_preset: 'double blocks only'})", net)
    assert fields() == ("double blocks only", "all", "none") and len(lit("double")) == 19 and lit("single") == []
    # typed text (as a user's edit of the text widget) redraws the grid; the core's syntax, spaces included
    page.evaluate("(id) => window.__fltTest.set(id, {block_preset: 'custom', double_blocks: ' 0-2, 7 ,18',"
                  " single_blocks: 'ALL'})", net)
    assert lit("double") == [0, 1, 2, 7, 18] and len(lit("single")) == 38
    # text set behind the picker's back (another extension, a script) shows on the next canvas frame
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.widgets.find((w) => w.name === 'single_blocks')"
                  ".value = '1-3'; app.graph.setDirtyCanvas(true, true); }", net)
    page.wait_for_function("() => document.querySelectorAll('#picker-under-test .flt-picker-grid[data-kind=single]"
                           " .flt-cell.flt-on').length === 3")
    page.evaluate("(id) => window.__fltTest.set(id, {double_blocks: '0-25'})", net)
    assert "out of range" in dataset_of(page, net, "block_picker")["error"]
    page.evaluate("(id) => window.__fltTest.set(id, {double_blocks: '0-5,10'})", net)
    assert dataset_of(page, net, "block_picker")["error"] == "" and lit("double") == [0, 1, 2, 3, 4, 5, 10]

    # the per-layer ranks that apply are shown, and which kind train_blocks leaves out
    page.evaluate("(id) => window.__fltTest.set(id, {img_attn_dim: 8, txt_mod_dim: 0})", net)
    head = picker.locator(".flt-picker-head").first.inner_text()
    assert "img attn 8" in head and "txt mod off" in head and "txt attn 16" in head, head
    assert "double block 4: LoRA (img attn 8" in cell("double", 4).get_attribute("title")
    page.evaluate("(id) => window.__fltTest.set(id, {train_blocks: 'single'})", net)
    assert "flt-off" in picker.locator(".flt-picker-grid[data-kind=double]").get_attribute("class")
    assert "train_blocks = single" in picker.locator(".flt-picker-head").first.inner_text()
    page.evaluate("(id) => window.__fltTest.set(id, {train_blocks: 'all', img_attn_dim: -1, txt_mod_dim: -1})", net)

    cell("double", 10).click()  # back to a click: 0-5
    prompt = page.evaluate("() => window.__fltTest.prompt()")
    inputs = prompt[str(net)]["inputs"]
    assert (inputs["block_preset"], inputs["double_blocks"], inputs["single_blocks"]) == ("custom", "0-5", "1-3")
    assert "block_picker" not in inputs and "status" not in inputs
    console.check()


def test_block_syntax_and_presets_match_the_core(ui):
    """The picker's parser and writer against trainer/config/lora.py parse_block_selection, and its presets
    against nodes/translate.py BLOCK_PRESETS."""
    page, console = ui
    from trainer.config.lora import parse_block_selection

    cases = ["all", "ALL", " none ", "", "0", "0-5,10", "0,1,8-12,18", " 3 - 7 , 9", "18", "0-18", "5-3", "a",
             "1,,2", "1-", "-1", "0-40", "19", "10-20", "07", "0 - 0", "1;2", "0-5,4-6"]
    rng = random.Random(11)
    chosen_sets = [[rng.random() < p for _ in range(19)] for p in (0.1, 0.5, 0.9) for _ in range(5)]
    got = page.evaluate(f"""async ([cases, sets]) => {{
        const b = await import('{EXTENSION_URL}/lib/blocks.js');
        return {{
          parsed: cases.map((c) => b.parseBlockSelection(c, 19, 'double_blocks')),
          roundTrip: sets.map((s) => [b.formatBlockSelection(s),
                                      b.parseBlockSelection(b.formatBlockSelection(s), 19).chosen]),
          presets: b.BLOCK_PRESETS,
        }}; }}""", [cases, chosen_sets])
    for case, js in zip(cases, got["parsed"]):
        try:
            want, error = parse_block_selection(case, 19, "double_blocks"), None
        except Exception as e:  # noqa: BLE001 - the core's LoRAConfigError
            want, error = [False] * 19, str(e)
        assert (js["chosen"], js["error"]) == (want, error), case
    for chosen, (text, back) in zip(chosen_sets, got["roundTrip"]):
        assert back == chosen and parse_block_selection(text, 19, "x") == chosen, text
    presets = pack("nodes.translate").BLOCK_PRESETS
    assert got["presets"] == {k: list(v) if v else None for k, v in presets.items()}
    console.check()


def test_train_then_test_in_the_browser_chart_preview_status_reload(comfyui, ui, dataset, screenshots):
    page, console = ui
    workflow = json.loads((EXAMPLES / "flux_lora_train_then_test.json").read_text(encoding="utf-8"))
    load(page, workflow)
    name = f"browser_{uuid.uuid4().hex[:8]}"
    _set_all(page, {
        **_swap_in_tiny_models(page),
        DATASET: {"image_folder": dataset, "resolution": 64, "num_repeats": 1, "min_bucket_reso": 64},
        TRAIN: {"output_name": name, "max_train_steps": STEPS, "seed": 7, "save_every_n_steps": 0,
                "sample_prompts": "a red circle on a white background --w 64 --h 64 --s 2 --d 3",
                "sample_every_n_steps": 5},
    })
    train, net, memory, data = (by_type(page, t)[0] for t in (TRAIN, NETWORK, MEMORY, DATASET))
    save_with = page.evaluate("() => app.graph._nodes.find((n) => n.title === 'Save (with LoRA)').id")
    # blocks picked with the mouse go with the queued prompt (the tiny model has 2 double and 2 single blocks)
    place = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return [[...n.pos], !!n.flags?.collapsed]; }",
                          net)
    page.evaluate("(id) => { window.__fltTest.openApart(id); window.__fltTest.frame([id], 1, 420, 20);"
                  " app.graph.getNodeById(id).widgets.find((w) => w.name === 'block_picker').element.id ="
                  " 'picker-in-run'; }", net)
    picker = page.locator("#picker-in-run")
    picker.locator("button[data-preset=custom][data-double=none]").click()
    for kind, index in (("double", 1), ("single", 0), ("single", 1)):
        picker.locator(f".flt-picker-grid[data-kind={kind}] .flt-cell[data-index='{index}']").click()
    page.evaluate("([id, [pos, collapsed]]) => { const n = app.graph.getNodeById(id); n.pos = pos;"
                  " if (collapsed) n.collapse(); app.graph.setDirtyCanvas(true, true); }", [net, place])
    prompt = page.evaluate("() => window.__fltTest.prompt()")
    assert (prompt[str(net)]["inputs"]["double_blocks"], prompt[str(net)]["inputs"]["single_blocks"]) == ("1", "0-1")
    assert {n["class_type"] for n in prompt.values()} >= set(TINY_LOADERS.values())
    assert not {n["class_type"] for n in prompt.values()} & set(TINY_LOADERS)

    started = time.monotonic()
    queue(page)  # the page queues (app.queuePrompt, as the Run button): its client id gets the events
    # frame the nodes of the mid-training screenshot now (a headless canvas redrawing 26 nodes on every event takes
    # CPU from the training), the train node tall enough for the chart and the preview below it
    page.evaluate("([ids, train]) => { const n = app.graph.getNodeById(train); n.setSize([n.size[0],"
                  " Math.max(n.size[1], n.computeSize()[1] + 240)]); window.__fltTest.makeRoom();"
                  " window.__fltTest.frame(ids, 0.75, 20, 10); }", [[data, train], train])
    # while it trains: the chart has points and the train node shows a preview image
    page.wait_for_function(
        """(id) => { const n = app.graph.getNodeById(id);
                     const d = n.widgets.find((w) => w.name === 'loss_chart').element.dataset;
                     const done = window.__fltTest.events.some((e) => e.type.startsWith('execution_') &&
                        e.type !== 'execution_start' && e.type !== 'execution_cached');
                     return done || (+d.points >= 6 && d.state === 'running' &&
                        (app.nodePreviewImages?.[String(id)]?.length ?? 0) > 0 && (n.imgs?.length ?? 0) > 0); }""",
        arg=train, timeout=120_000, polling=100)
    running = dataset_of(page, train, "loss_chart")
    shot(page, screenshots, "browser_training.png", [data, train], 0.75, 20, 10)
    assert running["state"] == "running", "training ended before the chart and a preview were seen"
    assert 6 <= int(running["points"]) < STEPS and int(running["lrPoints"]) == int(running["points"])
    assert int(running["total"]) == STEPS
    assert page.evaluate("(id) => app.graph.getNodeById(id).properties.flux_lora_trainer_chart.steps.length",
                         train) >= 3
    status_line = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loss_chart')"
                                ".element.querySelector('.flt-chart-status').textContent", train)
    assert re.match(rf"step \d+/{STEPS} \(\d+%\) · [\d.]+ (it/s|s/it) · ETA \d+:\d\d", status_line), status_line

    page.wait_for_function("() => window.__fltTest.events.some((e) => ['execution_success', 'execution_error',"
                           " 'execution_interrupted'].includes(e.type))", timeout=120_000, polling=200)
    events = page.evaluate("() => window.__fltTest.events")
    ends = [e for e in events if e["type"] in ("execution_success", "execution_error", "execution_interrupted")]
    assert ends[-1]["type"] == "execution_success", json.dumps(ends[-1])[:3000]
    prompt_id = ends[-1]["detail"]["prompt_id"]
    steps = [e["detail"] for e in events if e["type"] == "flux_lora_trainer.step"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) and {s["prompt_id"] for s in steps} == {prompt_id}
    page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'loss_chart')"
                           ".element.dataset.state === 'finished'", arg=train)
    final = dataset_of(page, train, "loss_chart")
    assert (final["points"], final["lastStep"], final["promptId"]) == (str(STEPS), str(STEPS), prompt_id)
    history = comfyui.history(prompt_id)["outputs"]
    losses = history[str(train)]["loss"]
    stored = page.evaluate("(id) => app.graph.getNodeById(id).properties.flux_lora_trainer_chart", train)
    assert stored["loss"] == pytest.approx(losses) and stored["lr"] == pytest.approx([s["lr"] for s in steps])
    # the nodes' status text: pre-flight report, what auto picked (node and train node), the train summary
    assert "8 images" in text_of(page, data) and "batch size 1" in text_of(page, data)
    plans = [e["detail"] for e in events if e["type"] == schema.event_name("memory_plan")]
    assert [p["prompt_id"] for p in plans] == [prompt_id] and plans[0]["lines"][0].startswith("auto:")
    assert text_of(page, memory).startswith("auto:")  # the memory node's own preview, then the train node's plan
    assert text_of(page, memory).endswith("picked by the train node (last run):\n" + "\n".join(plans[0]["lines"]))
    assert f"LoRA: {name}.safetensors" in text_of(page, train)
    assert "double blocks 1, single blocks 0-1" in text_of(page, net)  # what the server got from the picker
    queued = comfyui.history(prompt_id)["prompt"][2][str(net)]["inputs"]
    assert (queued["block_preset"], queued["double_blocks"], queued["single_blocks"]) == ("custom", "1", "0-1")
    images = page.evaluate("(id) => app.graph.getNodeById(id).imgs?.length ?? 0", save_with)
    assert images == 1 and history[str(save_with)]["images"][0]["filename"].endswith(".png")
    shot(page, screenshots, "browser_finished.png", [], 0.7, 10, 10)
    elapsed = time.monotonic() - started

    # queued again unchanged: everything is cached, the train node re-sends its output, the chart stays whole
    queue(page)
    page.wait_for_function("(n) => window.__fltTest.events.filter((e) => e.type === 'execution_success').length"
                           " === n", arg=2, timeout=60_000)
    assert dataset_of(page, train, "loss_chart")["points"] == str(STEPS)

    # a saved and re-opened workflow draws the same chart and status texts
    saved = page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    assert len(saved["nodes"][[n["id"] for n in saved["nodes"]].index(train)]["properties"]
               ["flux_lora_trainer_chart"]["loss"]) == STEPS
    load(page, workflow)  # the example again: an empty chart
    assert dataset_of(page, train, "loss_chart")["points"] == "0"
    load(page, saved)
    assert dataset_of(page, train, "loss_chart")["points"] == str(STEPS)
    assert "8 images" in text_of(page, data)
    # a page reload restores the open workflow (ComfyUI keeps it in the browser's storage): chart included
    page.reload()
    open_app(page, comfyui.url)
    page.wait_for_function("(id) => app.graph.getNodeById(id)?.widgets?.find((w) => w.name === 'loss_chart')"
                           f"?.element.dataset.points === '{STEPS}'", arg=train)
    assert dataset_of(page, train, "loss_chart")["state"] == "finished"
    assert text_of(page, memory).startswith("auto:")

    # a new run (a step message of another prompt id) starts a new chart; its validation message draws a point.
    # Both are built by the server's own schema, as the reporter builds them.
    for message_type, fields in (("step", dict(step=1, total=4, epoch=1, loss=0.5, average_loss=0.5, lr=1e-4,
                                                eta_seconds=3.0)),
                                 ("validation", dict(step=1, epoch=1, loss=0.45, per_epoch=False))):
        name, data = schema.payload(message_type, node=str(train), prompt_id="another-run", **fields)
        page.evaluate("([name, d]) => window.comfyAPI.api.api.dispatchCustomEvent(name, d)", [name, data])
    after = dataset_of(page, train, "loss_chart")
    assert (after["points"], after["promptId"], after["validationPoints"], after["state"]) == \
        ("1", "another-run", "1", "running")
    assert page.evaluate("(id) => app.graph.getNodeById(id).properties.flux_lora_trainer_chart.val", train) == [0.45]
    load(page, saved)  # leave the trained chart on screen for the theme test
    console.check()
    step_times = [e["t"] for e in events if e["type"] == "flux_lora_trainer.step"]
    start = next(e["t"] for e in events if e["type"] == "execution_start")
    first, steps_s = (step_times[0] - start) / 1000, (step_times[-1] - step_times[0]) / 1000
    print(f"\nbrowser run: {elapsed:.1f} s from queue to the finished screenshot: {first:.1f} s to the first step "
          f"(models, caches), {STEPS} steps in {steps_s:.1f} s")


def test_light_and_dark_themes(ui, screenshots):
    page, console = ui
    if not by_type(page, TRAIN):  # run alone: the example (an empty chart) instead of the trained graph
        load(page, json.loads((EXAMPLES / "flux_lora_train_then_test.json").read_text(encoding="utf-8")))
    train = by_type(page, TRAIN)[0]
    trained = dataset_of(page, train, "loss_chart")["points"] == str(STEPS)
    colors = f"""async (id) => {{
        const {{ chartColors }} = await import('{EXTENSION_URL}/lib/chart.js');
        const n = app.graph.getNodeById(id);
        const el = n.widgets.find((w) => w.name === 'loss_chart').element;
        const status = n.widgets.find((w) => w.name === 'status').element;
        const c = chartColors(el);
        return {{ light: c.light, canvas: getComputedStyle(el.querySelector('canvas')).backgroundColor,
                  text: getComputedStyle(status).color, line: c.average }}; }}"""
    setting = "(v) => app.extensionManager.setting.set('Comfy.ColorPalette', v)"
    dark = page.evaluate(colors, train)
    assert dark["light"] is False and dark["canvas"] == "rgb(34, 34, 34)"  # dark palette: --comfy-input-bg #222
    try:
        page.evaluate(setting, "light")
        page.wait_for_function("() => getComputedStyle(document.documentElement)"
                               ".getPropertyValue('--comfy-input-bg').trim().toLowerCase() === '#c9c9c9'")
        light = page.evaluate(colors, train)
        assert light["light"] is True and light["canvas"] == "rgb(201, 201, 201)" and light["text"] != dark["text"]
        assert light["line"] != dark["line"]  # the series colours follow the theme too
        page.evaluate("() => window.__fltTest.onlyOurs()")  # the pack's nodes side by side, none collapsed
        if trained:  # the screenshot in docs/ shows a trained chart
            assert dataset_of(page, train, "loss_chart")["points"] == str(STEPS)
            shot(page, screenshots, "browser_light.png", [], 0.8, 20, 10)
    finally:
        page.evaluate(setting, "dark")
    console.check()


def test_a_dataset_built_in_the_graph_trains_with_its_report_on_the_node(comfyui, ui, screenshots):
    """The images example as a user runs it: three pictures picked in its LoadImage nodes, one caption line each
    typed in its text node, queued: Dataset from Images reports the three pictures and the run trains on them."""
    page, console = ui
    workflow = json.loads((EXAMPLES / "flux_lora_images_train_then_test.json").read_text(encoding="utf-8"))
    _provide_loaded_images(workflow, comfyui.base_dir / "input")  # the example's own names, until the user picks
    load(page, workflow)
    _check_loaded_cleanly(page, "flux_lora_images_train_then_test.json")
    pictures = _write_stars(comfyui.base_dir / "input")
    loaders = sorted(by_type(page, "LoadImage"))
    assert len(loaders) == len(pictures)
    for node_id, picture in zip(loaders, pictures):
        page.evaluate("([id, v]) => window.__fltTest.set(id, v)", [node_id, {"image": picture}])
    name = f"browser_images_{uuid.uuid4().hex[:8]}"
    _set_all(page, {
        **_swap_in_tiny_models(page),
        "PrimitiveStringMultiline": {"value": _star_captions()},
        IMAGE_SET: {"class_tokens": "sks star", "resolution": 64, "num_repeats": 1, "min_bucket_reso": 64},
        TRAIN: {"output_name": name, "max_train_steps": 2, "seed": 7, "save_every_n_steps": 0, "sample_prompts": "",
                "sample_every_n_steps": 0},
        "CLIPTextEncode": {"text": "a green sks star on a white background"},
    })
    prompt_id = _run(page)
    image_set, train = by_type(page, IMAGE_SET)[0], by_type(page, TRAIN)[0]
    report = text_of(page, image_set)
    for line in (f"images from the graph: 3 (3 x {PICTURE_SIZE}x{PICTURE_SIZE})", "captions: 3 given, 0 missing",
                 "bucket 64x64: 3 images"):
        assert line in report, report
    assert f"LoRA: {name}.safetensors" in text_of(page, train)
    saves = by_type(page, "SaveImage")
    outputs = comfyui.history(prompt_id)["outputs"]
    assert [len(outputs[str(s)]["images"]) for s in saves] == [1, 1]

    # the pictures, their captions, the dataset node and the train node, side by side for the screenshot
    columns = [loaders, sorted(by_type(page, "ImageBatch")) + by_type(page, "PrimitiveStringMultiline")
               + [by_type(page, t)[0] for t in ("FluxLoraTrainerModels", NETWORK, "FluxLoraTrainerOptimizer", MEMORY)],
               [image_set], [train]]
    width, height = page.evaluate("(id) => [...app.graph.getNodeById(id).size]", image_set)
    sizes = {**{i: [280, 280] for i in loaders}, by_type(page, "PrimitiveStringMultiline")[0]: [400, 150],
             image_set: [max(width, 700), height]}  # wide: the report's paths on one line, all of it in view
    page.evaluate("([columns, sizes]) => window.__fltTest.arrange(columns, sizes)", [columns, sizes])
    with _plain_canvas(page):
        frame = [loaders[0]]
        page.evaluate("(ids) => window.__fltTest.frame(ids, 0.76, 20, 24)", frame)
        assert _wait_for_pictures(page, loaders) == [[[PICTURE_SIZE, PICTURE_SIZE]]] * len(pictures)
        assert report == text_of(page, image_set)  # the arranged copy keeps the report
        shot(page, screenshots, "image_dataset.png", frame, 0.76, 20, 24)
    console.check()


def test_the_checkpoint_grid_shows_every_saved_step_at_each_strength(comfyui, ui, dataset, screenshots):
    """The checkpoint-grid example queued in the page: the train node saves every 2 of 6 steps, LoRA Checkpoints
    lists each save at strengths 0.5 and 1.0, and the labelled grid of the six renders shows on its Save node."""
    page, console = ui
    workflow = json.loads((EXAMPLES / "flux_lora_checkpoint_grid.json").read_text(encoding="utf-8"))
    load(page, workflow)
    _check_loaded_cleanly(page, "flux_lora_checkpoint_grid.json")
    name = f"browser_grid_{uuid.uuid4().hex[:8]}"
    _set_all(page, {
        **_swap_in_tiny_models(page),
        DATASET: {"image_folder": dataset, "resolution": 64, "num_repeats": 1, "min_bucket_reso": 64},
        TRAIN: {"output_name": name, "max_train_steps": 6, "seed": 7, "save_every_n_steps": 2},
    })
    prompt_id = _run(page)
    sampler, checkpoints, grid, save = (by_type(page, t)[0] for t in ("KSampler", CHECKPOINTS, LABEL_GRID, "SaveImage"))
    labels = [f"step {step}, strength {strength}" for step in ("2", "4", "6 (final)") for strength in ("0.5", "1")]
    assert text_of(page, checkpoints).splitlines() == labels

    saved = comfyui.history(prompt_id)["outputs"][str(save)]["images"]
    assert len(saved) == 1  # one grid, not one picture per checkpoint
    from PIL import Image

    with Image.open(comfyui.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"]) as picture:
        width, height = picture.size
    pad = pack("nodes.grid_image").PAD
    assert (width - pad) % 2 == (height - pad) % 3 == 0  # 2 strengths a row, 3 checkpoints
    assert (height - pad) // 3 - pad > 128 and (width - pad) // 2 - pad >= 128  # 128 px renders under their labels

    # the sampling end of the graph, zoomed in (the grid shows at its own size on the node): the sampler, LoRA
    # Checkpoints with its labels and Label Grid in the next column, the grid on its Save node, sized to the grid
    page.evaluate("([sampler, checkpoints, grid, save]) => { const g = app.graph; const s = g.getNodeById(sampler);"
                  " const c = g.getNodeById(checkpoints); c.pos = [s.pos[0] + s.size[0] + 40, s.pos[1]];"
                  " g.getNodeById(grid).pos = [c.pos[0], c.pos[1] + c.size[1] + 80];"
                  " const v = g.getNodeById(save); v.setSize([300, 560]);"
                  " v.pos = [c.pos[0] + c.size[0] + 40, s.pos[1]]; g.setDirtyCanvas(true, true); }",
                  [sampler, checkpoints, grid, save])
    with _plain_canvas(page):
        frame = [sampler, checkpoints, grid, save]
        page.evaluate("(ids) => window.__fltTest.frame(ids, 1.35, 20, 20)", frame)
        assert _wait_for_pictures(page, [save]) == [[[width, height]]]
        shot(page, screenshots, "checkpoint_grid.png", frame, 1.35, 20, 20)
    console.check()
