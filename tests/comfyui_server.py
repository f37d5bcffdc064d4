"""A live, headless ComfyUI for tests: the session fixture `comfyui` and its client (ComfyUIClient).

    pytest_plugins = ["comfyui_server"]   # at module level of a test file (tests/ is on sys.path: pytest puts the
                                          # rootdir conftest's folder there); or once in tests/conftest.py
    def test_x(comfyui):
        events = comfyui.run(prompt)                       # queue + wait; fails unless execution_success

Use pytest_plugins, not `from comfyui_server import comfyui`: an imported fixture function is registered per
importing module, so each such module would start its own server.

ComfyUI is taken from $COMFYUI_DIR (a folder with main.py), else <repo>/.comfyui/ComfyUI (made by
`bash ../shared/comfyui/setup.sh .comfyui`); its Python is $COMFYUI_PYTHON or this one. Without ComfyUI the tests
that use the fixture are skipped, or fail when CI=true. One server runs per test session, on a free port, with a
fresh base directory (models/, custom_nodes/, input/, output/, temp/, user/, comfyui.log) holding this pack (linked
as custom_nodes/flux_lora_trainer), the test-only loaders of tests/comfyui/tiny_nodes (linked as
custom_nodes/flux_trainer_test_nodes) and tiny FLUX / CLIP-L / T5 / AE files (TINY_FILES) from trainer.models.tiny.

PYTEST_DONT_REWRITE: test modules import this before pytest_plugins registers it (it holds no asserts).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "flux_lora_trainer"
TEST_PACK_NAME = "flux_trainer_test_nodes"
TEST_PACK = REPO / "tests" / "comfyui" / "tiny_nodes"
SETUP_HINT = "run `bash ../shared/comfyui/setup.sh .comfyui` in the checkout or set COMFYUI_DIR"
START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", "120"))
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras", "checkpoints")
# {name: (models/ folder, file name)}; also the widget values the tiny loaders take
TINY_FILES = {
    "flux": ("diffusion_models", "tiny_flux.safetensors"),
    "clip_l": ("text_encoders", "tiny_clip_l.safetensors"),
    "t5xxl": ("text_encoders", "tiny_t5xxl.safetensors"),
    "ae": ("vae", "tiny_ae.safetensors"),
}
# stock loader -> test loader with the same widgets (for workflow_api.ui_to_api's replace_types)
TINY_LOADERS = {
    "UNETLoader": "FluxTrainerTestUNETLoader",
    "DualCLIPLoader": "FluxTrainerTestDualCLIPLoader",
    "VAELoader": "FluxTrainerTestVAELoader",
}
TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


def use_tiny_models(prompt: dict[str, Any]) -> dict[str, Any]:
    """Point the tiny loaders of an API prompt at the tiny files (in place; also returned)."""
    names = {"unet_name": TINY_FILES["flux"][1], "clip_name1": TINY_FILES["clip_l"][1],
             "clip_name2": TINY_FILES["t5xxl"][1], "vae_name": TINY_FILES["ae"][1]}
    for node in prompt.values():
        if node["class_type"] in TINY_LOADERS.values():
            for key, value in names.items():
                if key in node["inputs"]:
                    node["inputs"][key] = value
    return prompt


def _load_workflow_api():
    """tests/comfyui/workflow_api.py (the UI->API converter), importable as `workflow_api` afterwards."""
    if "workflow_api" not in sys.modules:
        spec = importlib.util.spec_from_file_location("workflow_api", REPO / "tests" / "comfyui" / "workflow_api.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["workflow_api"] = module
        spec.loader.exec_module(module)
    return sys.modules["workflow_api"]


workflow_api = _load_workflow_api()
ui_to_api = workflow_api.ui_to_api
WorkflowError = workflow_api.WorkflowError


def find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file():
            pytest.fail(f"COMFYUI_DIR={env} has no main.py: point it at a ComfyUI checkout or unset it")
        return path
    local = REPO / ".comfyui" / "ComfyUI"
    return local if (local / "main.py").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_models(models: Path) -> dict[str, Path]:
    """The tiny model files, in the real file layouts (BFL transformer and AE, text_model.* CLIP-L, fp16 T5)."""
    import torch

    from trainer.models import tiny

    writers = {"flux": tiny.write_flux, "clip_l": tiny.write_clip_l, "ae": tiny.write_ae,
               "t5xxl": lambda p: tiny.write_t5xxl(p, dtype=torch.float16)}
    out = {}
    for name, (folder, filename) in TINY_FILES.items():
        out[name] = writers[name](models / folder / filename)
    return out


def make_base_dir(base: Path) -> Path:
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / TEST_PACK_NAME).symlink_to(TEST_PACK, target_is_directory=True)
    write_tiny_models(base / "models")
    return base


class ComfyUIError(RuntimeError):
    pass


class ComfyUIClient:
    """HTTP + websocket client of one running server. Websocket events are collected from the start by a
    background thread (client_id = self.client_id; preview frames come with their node id, as in the browser)."""

    def __init__(self, url: str, base_dir: Path, log_path: Path, process: subprocess.Popen | None = None):
        self.url = url.rstrip("/")
        self.base_dir = Path(base_dir)
        self.log_path = Path(log_path)
        self.process = process
        self.client_id = uuid.uuid4().hex
        self.start_seconds: float | None = None  # from launch to the first /object_info answer
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ws_error: BaseException | None = None
        self._current_prompt: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyUIError(f"{method} {path}: HTTP {e.code}: {detail[:4000]}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))

    def prompt_from_ui(self, workflow: dict[str, Any], replace_types: dict[str, str] | None = None,
                       tiny_models: bool = False) -> dict[str, Any]:
        """A UI-format workflow (as the browser saves it) in the API format, against this server's /object_info.
        tiny_models=True: the stock UNETLoader / DualCLIPLoader / VAELoader become the tiny test loaders (plus any
        replace_types), with the tiny files (TINY_FILES) in their file widgets."""
        types = {**(TINY_LOADERS if tiny_models else {}), **(replace_types or {})}
        prompt = ui_to_api(workflow, self.object_info(), replace_types=types)
        if tiny_models:
            use_tiny_models(prompt)
        return prompt

    def template(self, name: str) -> dict[str, Any]:
        """A workflow template shipped with ComfyUI (the comfyui-workflow-templates package, GET /templates/...)."""
        return self.request("GET", f"/templates/{name}.json")

    def queue(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        """POST /prompt with this client's id; returns the prompt id. A prompt the server rejects raises
        ComfyUIError with its node_errors."""
        body = {"prompt": prompt, "client_id": self.client_id, "extra_data": extra_data or {}}
        reply = self.request("POST", "/prompt", body)
        if reply.get("node_errors"):
            raise ComfyUIError(f"prompt has node errors: {json.dumps(reply['node_errors'])[:4000]}")
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any]:
        """GET /history/<id>: {"prompt", "outputs", "status": {"status_str", "completed", "messages"}, "meta"}
        ({} while it runs)."""
        return self.request("GET", f"/history/{prompt_id}").get(prompt_id, {})

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stops the running prompt (only `prompt_id`, if given) at its next progress update."""
        self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def post_setting(self, key: str, value: Any) -> None:
        self.request("POST", f"/api/settings/{key}", value)

    # ----------------------------------------------------------------------------------------- websocket

    def connect(self, timeout: float = 30) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_ws, args=(ready,), name="comfyui-ws", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._ws_error is not None:
            raise ComfyUIError(f"websocket did not connect: {self._ws_error!r}")

    def _run_ws(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._ws_main(ready))
        except BaseException as e:  # noqa: BLE001 - reported through wait()
            self._ws_error = e
        finally:
            ready.set()
            with self._cond:
                self._cond.notify_all()
            self._loop.close()

    async def _ws_main(self, ready: threading.Event) -> None:
        import aiohttp

        self._stop = asyncio.Event()
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(ws_url, max_msg_size=0, heartbeat=None) as ws:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            ready.set()
            receiver = asyncio.ensure_future(self._receive(ws))
            stopper = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([receiver, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in (receiver, stopper):
                task.cancel()
            if receiver.done() and not receiver.cancelled() and receiver.exception():
                raise receiver.exception()

    async def _receive(self, ws) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                data = event.get("data") or {}
                if event.get("type") in ("execution_start", "executing") and data.get("prompt_id"):
                    self._current_prompt = data["prompt_id"]
                self._record(event)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self._record(self._binary(msg.data))
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break

    def _binary(self, payload: bytes) -> dict[str, Any]:
        """Binary frames: 4-byte event type (protocol.py BinaryEventTypes: 1 preview image, 3 text, 4 preview with
        metadata), then the payload; type 4 carries JSON metadata (node_id, prompt_id, ...) before the image."""
        kind = struct.unpack(">I", payload[:4])[0]
        record: dict[str, Any] = {"type": "binary", "event": kind, "size": len(payload) - 4,
                                  "data": {"prompt_id": self._current_prompt}}
        if kind == 4 and len(payload) >= 8:
            length = struct.unpack(">I", payload[4:8])[0]
            try:
                meta = json.loads(payload[8:8 + length])
            except ValueError:
                meta = {}
            record["data"] = {**meta, "prompt_id": meta.get("prompt_id") or self._current_prompt}
            record["node"] = meta.get("node_id")
            record["image_type"] = meta.get("image_type")
        elif kind == 1 and len(payload) >= 8:
            record["image_type"] = {1: "image/jpeg", 2: "image/png"}.get(struct.unpack(">I", payload[4:8])[0])
        return record

    def _record(self, event: dict[str, Any]) -> None:
        event["received"] = time.monotonic()
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def events(self, prompt_id: str | None = None) -> list[dict[str, Any]]:
        """Every event so far (of one prompt: those whose data carries its prompt_id; binary previews are
        attributed to the prompt that was executing)."""
        with self._cond:
            events = list(self._events)
        if prompt_id is None:
            return events
        return [e for e in events if (e.get("data") or {}).get("prompt_id") == prompt_id]

    def wait_for(self, prompt_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60
                 ) -> dict[str, Any]:
        """Block until an event of this prompt satisfies `predicate` (it may have arrived already); return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                mine = [e for e in self._events if (e.get("data") or {}).get("prompt_id") == prompt_id]
                for event in mine[seen:]:
                    if predicate(event):
                        return event
                seen = len(mine)
                if self._ws_error is not None or (self._thread is not None and not self._thread.is_alive()):
                    raise ComfyUIError(f"websocket closed: {self._ws_error!r}\n{self.log_tail()}")
                if self.process is not None and self.process.poll() is not None:
                    raise ComfyUIError(f"ComfyUI exited with {self.process.returncode}\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prompt {prompt_id}: no matching event within {timeout} s; events: "
                                       f"{[e['type'] for e in mine][-30:]}\n{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def wait(self, prompt_id: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Events of this prompt until it has finished: the `executing` event with node None that ComfyUI sends
        after the history entry is written (main.py prompt_worker). The list then holds execution_start, ...,
        one of execution_success / execution_error / execution_interrupted, and that `executing`."""
        self.wait_for(prompt_id, lambda e: e["type"] == "executing" and e["data"].get("node") is None, timeout)
        return self.events(prompt_id)

    def run(self, prompt: dict[str, Any], timeout: float = 60, expect: str = "execution_success"
            ) -> list[dict[str, Any]]:
        """queue + wait, failing with the error details (and the log tail) unless the prompt ends with `expect`."""
        prompt_id = self.queue(prompt)
        events = self.wait(prompt_id, timeout)
        ends = [e for e in events if e["type"] in TERMINAL]
        if not ends or ends[-1]["type"] != expect:
            detail = json.dumps(ends[-1]["data"], indent=1)[:6000] if ends else "no terminal event"
            raise ComfyUIError(f"prompt {prompt_id} ended with {ends[-1]['type'] if ends else None}, "
                               f"not {expect}: {detail}\n{self.log_tail()}")
        return events

    # --------------------------------------------------------------------------------------------- logs

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self, builtin: bool = False) -> list[str]:
        return import_failures(self.log_text(), builtin)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


def import_failures(log: str, builtin: bool = False) -> list[str]:
    """Custom-node folders ComfyUI's start-up log marks "(IMPORT FAILED)" (nodes.py:2241, in its "Import times for
    custom nodes" list), each followed by the "Cannot import ..." line that says why. builtin=True: the
    comfy_extras / comfy_api_nodes modules that failed instead ("IMPORT FAILED: nodes_audio.py", nodes.py:2413;
    here those need torchaudio, which the snapshot's setup does not install)."""
    lines = log.splitlines()
    if builtin:
        return [line.strip() for line in lines if line.startswith("IMPORT FAILED: ")]
    out = []
    for line in lines:
        if "(IMPORT FAILED):" in line:
            path = line.split("(IMPORT FAILED):", 1)[1].strip()
            out.append(path)
            out += [f"  {why.strip()}" for why in lines if why.startswith(f"Cannot import {path} ")]
    return out


def start_server(comfy_dir: Path, base: Path, python: str | None = None, extra_args: list[str] | None = None,
                 timeout: float = START_TIMEOUT) -> ComfyUIClient:
    """Launch ComfyUI on `base` (see make_base_dir), wait for /object_info (polling), skip the frontend's template
    dialog and connect the websocket. --preview-method latent2rgb: KSampler sends preview frames, as for most
    users (the default is none)."""
    port = free_port()
    log_path = base / "comfyui.log"
    args = [python or os.environ.get("COMFYUI_PYTHON") or sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", "--base-directory", str(base),
            "--disable-api-nodes", "--preview-method", "latent2rgb",
            # the default database is <ComfyUI>/user/comfyui.db whatever --base-directory says (comfy/cli_args.py:212)
            "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", *(extra_args or [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(args, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = ComfyUIClient(f"http://127.0.0.1:{port}", base, log_path, process)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if process.poll() is not None:
            raise ComfyUIError(f"ComfyUI exited with {process.returncode} while starting:\n{client.log_tail(80)}")
        try:
            client.request("GET", "/object_info", timeout=10)
            client.start_seconds = time.monotonic() - started
            break
        except (OSError, ComfyUIError):
            if time.monotonic() > deadline:
                stop_server(process)
                raise ComfyUIError(f"ComfyUI did not answer /object_info within {timeout} s:\n{client.log_tail(80)}")
            time.sleep(0.25)
    try:
        client.post_setting("Comfy.TutorialCompleted", True)
        client.connect()
    except BaseException:
        client.close()
        stop_server(process)
        raise
    return client


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory) -> Iterator[ComfyUIClient]:
    """A running ComfyUI (session-wide) with this pack, the tiny test loaders and tiny model files."""
    comfy_dir = find_comfyui()
    if comfy_dir is None:
        message = f"no ComfyUI: {SETUP_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: a missing ComfyUI is an error there)")
        pytest.skip(message)
    base = make_base_dir(tmp_path_factory.mktemp("comfyui_base"))
    client = start_server(comfy_dir, base)
    try:
        yield client
    finally:
        client.close()
        stop_server(client.process)
