"""Where nearline models train (``STREAMREC_TRAINER_DEVICE``): checked before any training,
never a silent fall-back, and a version always served from the CPU."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError

from infra.settings import Settings
from online_models.base import torch_device
from online_models.registry import build
from online_models.signals import SignalMapper
from stream.simulator import UserSimulator
from stream.trainer import Trainer


def test_devices_are_resolved_or_refused_with_the_reason():
    assert torch_device("cpu").type == "cpu"
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="CUDA GPU"):
        torch_device("cuda:99")  # no machine has a hundredth GPU
    with pytest.raises(ValueError, match="only cpu, cuda"):
        torch_device("meta")


@pytest.mark.parametrize("name", ["two_tower", "gru4rec", "sasrec"])
def test_a_model_trains_where_asked_and_publishes_on_the_cpu(name):
    events = list(UserSimulator(30, 80, seed=3).events(600, time.time() - 600, 1.0))
    sequential = {"hidden": 16, "epochs": 1, "n_sample": 32}
    small = {"two_tower": {"epochs": 1}, "gru4rec": sequential, "sasrec": sequential}
    model = build(name, device="auto", min_examples=300, **small[name])
    model.learn(SignalMapper().map(events))
    assert model.version == 1
    state, *_ = model.export_version()
    assert {t.device.type for t in state.values()} == {"cpu"}
    bad = build(name, device="cuda:99", min_examples=300, **small[name])
    with pytest.raises(ValueError, match="cuda:99"):
        bad.learn(SignalMapper().map(events))
    assert bad.version == 0


def test_the_trainer_refuses_a_device_it_cannot_use_before_consuming():
    settings = Settings(kafka_bootstrap="unused:9092", redis_url="redis://unused",
                        trainer_dir="/tmp/unused", trainer_device="cuda:99")
    with pytest.raises(ValueError, match="cuda:99"):
        Trainer(settings, "gru4rec")
    assert Trainer(settings.model_copy(update={"trainer_device": "cpu"}),
                   "two_tower").model.device == "cpu"
    with pytest.raises(ValidationError, match="trainer_device"):
        Settings(trainer_device="gpu")
