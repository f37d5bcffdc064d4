"""The NaN stop of a real run names what is unusual in its settings (trainer/nonfinite_diagnosis.py): full_fp16 with
AdamW stops at step 1 because AdamW's moments are fp16, not because of the learning rate."""

import pytest

from trainer.errors import NonFiniteError
from trainer.events import SilentReporter
from trainer.loop import train

from trainspace import config, make_workspace


def test_full_fp16_with_adamw_stops_at_step_1_naming_the_fp16_moments(tmp_path, tokenizer_dirs):
    ws = make_workspace(tmp_path / "ws")
    with pytest.raises(NonFiniteError) as raised:
        train(config(ws, tokenizer_dirs, tmp_path / "out", max_train_steps=3, mixed_precision="fp16",
                     full_fp16=True, learning_rate=1e-4), SilentReporter())
    message = str(raised.value)
    assert message.startswith("step 1: the LoRA weights became NaN or infinite in the optimizer step")
    assert "Likely causes: full_fp16 keeps the LoRA weights, and so AdamW's moments, in fp16" in message
    assert "the learning rate is not the cause" in message and "too high" not in message
