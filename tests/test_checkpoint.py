"""Checkpoints: round trip with weights_only=True, and refusal of everything that is not a catrs checkpoint."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from catrs.checkpoint import check_matches, load_checkpoint, save_checkpoint
from catrs.errors import UserError
from tests.helpers import make_card


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_round_trip_rebuilds_the_same_model(tmp_path):
    card = make_card("cifar10", sigma=0.25, arch="cifar_resnet20")
    model = card.build_model().eval()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, card, training_state={"next_epoch": 3})
    loaded = load_checkpoint(path)
    assert loaded.card == card
    assert loaded.card.normalization.mean == (0.4914, 0.4822, 0.4465)
    assert loaded.training_state == {"next_epoch": 3}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model()(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_numpy_scalars_in_the_card_or_state_are_written_as_python_numbers_so_the_checkpoint_loads(tmp_path):
    # A seed from np.arange or a value a sampler drew is a NumPy scalar, which weights_only=True refuses.
    card = replace(make_card("digits", sigma=0.5), config={"seed": np.int64(3), "lbd": np.float64(0.5)})
    state = {"next_epoch": np.int64(2), "history": [{"acr": np.float32(0.25)}]}
    path = save_checkpoint(tmp_path / "ckpt.pt", card.build_model(), card, training_state=state)
    loaded = load_checkpoint(path)
    assert loaded.card.config == {"seed": 3, "lbd": 0.5} and type(loaded.card.config["seed"]) is int
    assert loaded.training_state == {"next_epoch": 2, "history": [{"acr": 0.25}]}
    assert type(loaded.training_state["history"][0]["acr"]) is float


def test_mismatched_dataset_or_sigma_is_an_error(tmp_path):
    card = make_card("digits", sigma=0.5)
    check_matches(card, "ckpt.pt", dataset="digits", sigma=0.5)
    with pytest.raises(UserError, match="trained on 'digits', not 'mnist'"):
        check_matches(card, "ckpt.pt", dataset="mnist", sigma=0.5)
    with pytest.raises(UserError, match="sigma=0.5, not 0.25"):
        check_matches(card, "ckpt.pt", dataset="digits", sigma=0.25)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path, digits_checkpoint):
    torn = tmp_path / "torn.pt"
    torn.write_bytes(digits_checkpoint.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(torn)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="not a catrs checkpoint"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "catrs-checkpoint", "card": _Exploit()}, path)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UserError):
        load_checkpoint(plain)
    assert "this must never run" not in capsys.readouterr().out


def test_weights_of_another_architecture_are_refused(tmp_path):
    card = make_card("digits")
    other = make_card("digits", arch="lenet")
    path = save_checkpoint(tmp_path / "x.pt", card.build_model(), other)
    with pytest.raises(UserError, match="do not fit architecture lenet"):
        load_checkpoint(path).model()
