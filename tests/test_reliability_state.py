"""Resume states are checked first: a manifest of what a state was made with and of every tensor, checked from the
safetensors headers alone; every damage is a StateError naming the file and what matches; a save stopped between
its two renames is recovered."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from trainer import session as session_module
from trainer.checkpoint import (
    Position,
    capture_rng,
    check_state_folder,
    load_state,
    network_shapes,
    restoring,
    save_state,
    state_position,
)
from trainer.errors import StateError
from trainer.events import SilentReporter
from trainer.loop import train
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.models.flux import Flux
from trainer.models.tiny import TINY_FLUX

from trainspace import config, make_workspace


def _network(device: str = "cpu", **options) -> LoRANetwork:
    options = {"network_dim": 4, "network_alpha": 4, "network_train_unet_only": True, **options}
    with torch.device(device):
        torch.manual_seed(0)
        return LoRANetwork.create(LoRAConfig(**options), Flux(TINY_FLUX))


def _expected(**options) -> dict:
    """What preflight passes: the names and shapes of the network a run builds, from a meta-device network."""
    return network_shapes(_network("meta", **options))


def _make_state(folder, step: int = 4, **options):
    network = _network(**options)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for p in network.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    parts = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **capture_rng(),
             "losses": [0.5, 0.25], "seed": 3}
    save_state(folder, network.kohya_state_dict(torch.float32), parts, Position(step, 0, step),
               optimizer=type(optimizer).__name__, network_config=asdict(network.config))
    return network, optimizer


@pytest.fixture
def state(tmp_path):
    folder = tmp_path / "run-state"
    _make_state(folder)
    return folder


def _document(folder):
    return json.loads((folder / "state.json").read_text())


def _rewrite(folder, change):
    document = _document(folder)
    change(document)
    (folder / "state.json").write_text(json.dumps(document))


def _without_part(name):
    def change(document):
        document["parts"]["__dict__"] = [kv for kv in document["parts"]["__dict__"] if kv[0] != name]
    return change


def _truncate(name, keep=0.5):
    def damage(folder):
        path = folder / name
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
    return damage


def _swap_network(folder):  # the LoRA of another save (rank 8) in place of this one's
    other = folder.parent / "other-state"
    _make_state(other, network_dim=8, network_alpha=8)
    os.replace(other / "network.safetensors", folder / "network.safetensors")


def _swap_state_tensors(folder):
    other = folder.parent / "other-state"
    _make_state(other, network_dim=8, network_alpha=8)
    os.replace(other / "state.safetensors", folder / "state.safetensors")


def _append(name):
    def damage(folder):
        with open(folder / name, "ab") as f:
            f.write(b"junk")
    return damage


def _remove(name):
    return lambda folder: (folder / name).unlink()


def _foreign_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "network.safetensors")
    tensors["something_else.weight"] = torch.zeros(2)
    save_file(tensors, folder / "network.safetensors")
    _rewrite(folder, lambda d: d.pop("manifest") and d.update(format=1))


DAMAGES = {
    "network.safetensors truncated": (_truncate("network.safetensors"), "network.safetensors: is truncated"),
    "state.safetensors truncated": (_truncate("state.safetensors"), "state.safetensors: is truncated"),
    "state.safetensors cut to its header length": (_truncate("state.safetensors", 0.0), "state.safetensors"),
    "state.json truncated": (_truncate("state.json"), "state.json cannot be read"),
    "state.json not an object": (lambda f: (f / "state.json").write_text("[1, 2]"), "not a JSON object"),
    "network.safetensors missing": (_remove("network.safetensors"), "missing network.safetensors"),
    "optimizer part missing": (lambda f: _rewrite(f, _without_part("optimizer")), "lacks the part(s) optimizer"),
    "rng part missing": (lambda f: _rewrite(f, _without_part("torch_rng")), "lacks the part(s) torch_rng"),
    "position missing": (lambda f: _rewrite(f, lambda d: d.pop("position")), "the position is missing or damaged"),
    "position damaged": (lambda f: _rewrite(f, lambda d: d["position"].update(global_step="4")), "position"),
    "manifest missing": (lambda f: _rewrite(f, lambda d: d.pop("manifest")), "no manifest"),
    "format from a newer trainer": (lambda f: _rewrite(f, lambda d: d.update(format=9)),
                                    "state format 9 (written by a newer trainer)"),
    "network.safetensors from another save": (_swap_network, "network.safetensors does not match the manifest"),
    "state.safetensors from another save": (_swap_state_tensors, "state.safetensors does not match the manifest"),
    "bytes appended": (_append("state.safetensors"), "state.safetensors is"),
    "a tensor that is not LoRA": (_foreign_tensor, "'something_else.weight', not a LoRA tensor"),
    "a tensor reference into nothing": (lambda f: _rewrite(f, lambda d: d["parts"]["__dict__"][2][1].update(
        __tensor__="t999")), "refers to 1 tensor(s) state.safetensors does not hold (e.g. t999"),
}


def test_a_state_holds_a_manifest_and_round_trips(state):
    document = _document(state)
    assert document["format"] == 2
    manifest = document["manifest"]
    assert manifest["optimizer"] == "AdamW"
    assert manifest["network"]["network_dim"] == 4 and manifest["network"]["network_alpha"] == 4.0
    assert manifest["network"]["options"]["network_train_unet_only"] is True
    assert manifest["network"]["tensors"]["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == {
        "shape": [4, 64], "dtype": "F32"}
    assert len(manifest["state_tensors"]) > 0 and set(manifest["sizes"]) == {"network.safetensors",
                                                                              "state.safetensors"}
    network, parts, position = load_state(state, _expected(), optimizer="AdamW")
    assert position == Position(4, 0, 4) and parts["losses"] == [0.5, 0.25] and parts["seed"] == 3
    fresh = _network()
    fresh.load_kohya(network)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with restoring(state, "optimizer"):
        optimizer.load_state_dict(parts["optimizer"])


def test_the_check_reads_no_tensor(state, monkeypatch):
    import safetensors.torch

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensor_reads)
    monkeypatch.setattr("trainer.checkpoint.load_file", no_tensor_reads)
    assert check_state_folder(state, _expected(), optimizer="AdamW")["position"]["global_step"] == 4


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_state_is_refused_with_a_message_naming_the_file(state, damage):
    apply, expected_text = DAMAGES[damage]
    apply(state)
    for attempt in (check_state_folder, load_state):
        with pytest.raises(StateError) as caught:
            attempt(state)
        message = str(caught.value)
        assert message.startswith(f"resume: {state}") and expected_text in message, message


def test_a_state_of_another_rank_says_which_rank_it_holds(tmp_path):
    folder = tmp_path / "run-state"
    _make_state(folder, network_dim=8, network_alpha=8)
    with pytest.raises(StateError) as caught:
        check_state_folder(folder, _expected(network_dim=4, network_alpha=4))
    message = str(caught.value)
    assert "network.safetensors holds rank 8 LoRA layers (lora_unet_double_blocks_0_img_attn_proj: [8, 64]) but " \
           "this run builds rank 4 ([4, 64])" in message
    assert "the state was made with network_dim 8, network_alpha 8.0" in message
    assert "the 26 layer names match" in message and "--network_dim 8" in message
    with pytest.raises(StateError, match="rank 8"):
        load_state(folder, _expected(network_dim=4, network_alpha=4))


def test_a_state_of_other_layers_says_how_many_match(tmp_path):
    folder = tmp_path / "run-state"
    _make_state(folder, train_double_block_indices="0")
    with pytest.raises(StateError) as caught:
        check_state_folder(folder, _expected())
    message = str(caught.value)
    assert "network.safetensors holds 16 LoRA layers, this run builds 26" in message
    assert "10 layers this run builds are not in it (e.g. lora_unet_double_blocks_1_" in message
    assert "16 layers match" in message and "train_double_block_indices 0" in message


def test_a_state_of_another_optimizer_is_refused(state):
    with pytest.raises(StateError, match="the optimizer state is AdamW's but this run uses Lion; resume with "
                                         "--optimizer_type AdamW"):
        check_state_folder(state, optimizer="Lion")


def test_an_optimizer_state_that_does_not_fit_is_a_state_error(state):
    _, parts, _ = load_state(state)
    other = torch.optim.AdamW(_network(train_double_block_indices="0").parameters())
    with pytest.raises(StateError, match="the optimizer state does not fit this run"):
        with restoring(state, "optimizer"):
            other.load_state_dict(parts["optimizer"])


def test_format_1_states_without_a_manifest_still_load(state):
    _rewrite(state, lambda d: d.pop("manifest") and d.update(format=1))
    network, parts, position = load_state(state, _expected())
    assert position == Position(4, 0, 4) and len(network) == 78
    _truncate("network.safetensors")(state)
    with pytest.raises(StateError, match="network.safetensors: is truncated"):
        check_state_folder(state)


def test_load_state_never_raises_anything_but_a_state_error(tmp_path):
    """Cut every file of a state at many points, and break its JSON in many places: load_state either loads or
    raises a StateError, never a raw KeyError, RuntimeError or SafetensorError; a cut file never loads."""
    source = tmp_path / "source-state"
    _make_state(source)
    files = {name: (source / name).read_bytes() for name in ("network.safetensors", "state.safetensors",
                                                             "state.json")}
    folder = tmp_path / "run-state"
    folder.mkdir()

    def outcome(broken: str, content: bytes, expected=None) -> str:
        for other, data in files.items():
            (folder / other).write_bytes(data)
        (folder / broken).write_bytes(content)
        try:
            load_state(folder, expected)
        except StateError:
            return "refused"
        return "loaded"

    cuts = {(name, cut, expected is None): outcome(name, data[:cut], expected)
            for name, data in files.items()
            for cut in sorted({0, 1, 7, 8, 9, 64, len(data) // 3, len(data) // 2, len(data) - 1})
            for expected in (None, _expected())}
    assert len(cuts) == 54 and set(cuts.values()) == {"refused"}, [k for k, v in cuts.items() if v != "refused"]
    text = files["state.json"].decode()
    edits = (('"t1"', '"t"'), ('"__tensor__"', '"__tensr__"'), ('"epoch"', '"epoh"'), ("[", "{"),
             ('"__dict__"', '"__dikt__"'), ('"__tuple__"', '"__list__"'), ('"state"', '"stat"'),
             ('"param_groups"', '"groups"'), ('"format": 2', '"format": "2"'), ('"F32"', '"F99"'))
    assert all(old in text for old, _ in edits)  # each edit really changes the file
    edited = {old: outcome("state.json", text.replace(old, new, 1).encode()) for old, new in edits}
    assert set(edited.values()) == {"refused"}, edited


# ------------------------------------------------------------------------------------------ a save stopped midway


def _stopped_between_renames(tmp_path, partial: bool = True, old: bool = True):
    """<folder> moved to <folder>.old, the new state in <folder>.partial not yet moved in: a kill at that point."""
    folder = tmp_path / "run-state"
    if old:
        _make_state(tmp_path / "run-state.old", step=4)
    if partial:
        _make_state(tmp_path / "run-state.partial", step=6)
    return folder


def test_a_state_stopped_between_its_renames_resumes_from_the_newer_complete_one(tmp_path):
    folder = _stopped_between_renames(tmp_path)
    notes = []
    assert check_state_folder(folder, _expected(), warn=notes.append)["position"]["global_step"] == 6
    assert len(notes) == 1 and "run-state is missing" in notes[0] and "resuming from run-state.partial" in notes[0]
    assert "at step 6" in notes[0] and "run-state.old holds step 4" in notes[0]
    assert load_state(folder, _expected(), warn=notes.append)[2] == Position(6, 0, 6)
    assert state_position(folder) == Position(6, 0, 6)


def test_an_incomplete_partial_leaves_the_old_state(tmp_path):
    folder = _stopped_between_renames(tmp_path)
    _truncate("state.safetensors")(tmp_path / "run-state.partial")
    notes = []
    assert load_state(folder, warn=notes.append)[2] == Position(4, 0, 4)
    assert "resuming from run-state.old" in notes[0] and "at step 4" in notes[0]


def test_only_an_old_state_is_used_and_nothing_says_no_such_folder(tmp_path):
    folder = _stopped_between_renames(tmp_path, partial=False)
    assert state_position(folder) == Position(4, 0, 4)
    with pytest.raises(StateError, match="elsewhere-state: no such folder"):
        check_state_folder(tmp_path / "elsewhere-state")


def test_a_damaged_state_is_refused_before_any_model_loads(tmp_path, tokenizer_dirs, monkeypatch):
    ws = make_workspace(tmp_path / "ws", batch_size=4)
    folder = tmp_path / "out" / "test_lora-state"
    _make_state(folder)
    _truncate("state.safetensors")(folder)
    loaded = []
    for name in ("load_autoencoder", "load_clip_l", "load_t5xxl", "load_flux"):
        monkeypatch.setattr(session_module, name, lambda *a, _n=name, **k: loaded.append(_n))
    with pytest.raises(StateError, match="state.safetensors: is truncated"):
        train(config(ws, tokenizer_dirs, tmp_path / "out", resume=str(folder)), SilentReporter())
    assert loaded == []


def test_the_next_save_after_a_stopped_one_leaves_one_folder(tmp_path):
    folder = _stopped_between_renames(tmp_path)
    network, optimizer = _make_state(folder, step=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]
    assert state_position(folder) == Position(8, 0, 8)


def test_a_transformer_only_expectation_can_leave_the_text_encoder_layers_aside(tmp_path):
    """Preflight builds the network on the transformer alone (no text encoder models): `scope` compares only the
    transformer's layers of a state that also trains CLIP-L."""
    network = _network()
    tensors = network.kohya_state_dict(torch.float32)
    te = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    tensors.update({f"{te}.lora_down.weight": torch.zeros(4, 64), f"{te}.lora_up.weight": torch.zeros(128, 4),
                    f"{te}.alpha": torch.tensor(4.0)})
    parts = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, **capture_rng(), "losses": []}
    folder = tmp_path / "run-state"
    save_state(folder, tensors, parts, Position(2, 0, 2))
    check_state_folder(folder, _expected(), scope="lora_unet_")
    with pytest.raises(StateError, match="1 of its layers are not built by this run"):
        check_state_folder(folder, _expected())
