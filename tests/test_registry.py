"""Plug-ins register themselves: a registry finds every module of its package, so a new method, architecture
or data set is one new file that nothing else lists."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

import trainables
from catrs.data import dataset_names
from catrs.errors import UserError
from catrs.models import model_names
from catrs.registry import Registry


@dataclass(frozen=True)
class Item:
    name: str


def test_a_new_module_in_the_package_is_found_without_being_listed(tmp_path, monkeypatch):
    package = tmp_path / "plugins_under_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text(
        textwrap.dedent(
            """
            from catrs.registry import Registry
            from tests.test_registry import Item

            ITEMS = Registry("widget", "plugins_under_test")
            """
        )
    )
    for name in ("alpha", "beta"):
        (package / f"{name}.py").write_text(
            f"from plugins_under_test.base import ITEMS\nfrom tests.test_registry import Item\n"
            f"ITEMS.add(Item({name!r}))\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    from plugins_under_test.base import ITEMS  # type: ignore[import-not-found]

    assert ITEMS.names() == ["alpha", "beta"]
    assert ITEMS.get("beta") == Item("beta")
    with pytest.raises(UserError, match="unknown widget 'gamma'; choose one of: alpha, beta"):
        ITEMS.get("gamma")
    for module in [m for m in sys.modules if m.startswith("plugins_under_test")]:
        monkeypatch.delitem(sys.modules, module)


def test_two_plug_ins_of_one_name_are_a_defect():
    registry: Registry[Item] = Registry("widget", "catrs")
    registry.add(Item("same"))
    with pytest.raises(ValueError, match="two widgets are named 'same'"):
        registry.add(Item("same"))


def test_the_shipped_plug_ins_register_themselves():
    assert trainables.names() == ["catrs", "consistency", "gaussian", "macer", "smoothadv", "smoothmix", "stability"]
    assert model_names() == ["cifar_resnet110", "cifar_resnet20", "digits_cnn", "digits_cnn_bn", "lenet", "resnet50"]
    assert {"digits", "digits_c", "synthetic", "mnist", "cifar10", "cifar10_c", "imagenet"} <= set(dataset_names())
