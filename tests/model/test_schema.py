"""The one typed from_dict: recipe values are checked against the config dataclasses, errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import pytest

from latentforge.model.recipes import compose
from latentforge.model.schema import SchemaError, from_dict


@dataclass
class Inner:
    size: int = 1


@dataclass
class Outer:
    steps: int = 10
    lr: float = 1e-3
    resume: bool = True
    name: str = "run"
    limit: Optional[int] = None
    betas: Tuple[float, float] = (0.9, 0.95)
    paths: List[str] = field(default_factory=list)
    checkpoint: Union[str, List[str]] = "none"
    inner: Inner = field(default_factory=Inner)
    maybe: Optional[Inner] = None


def test_good_values_convert_losslessly():
    out = from_dict(
        Outer,
        {
            "steps": 3,
            "lr": 1,
            "betas": [0.8, 0.9],
            "limit": None,
            "name": 7,
            "paths": ["a", "b"],
            "checkpoint": ["attention"],
            "inner": {"size": 4},
        },
        "train",
    )
    assert out == Outer(
        steps=3, lr=1.0, betas=(0.8, 0.9), name="7", paths=["a", "b"], checkpoint=["attention"], inner=Inner(4)
    )
    assert isinstance(out.lr, float) and isinstance(out.betas, tuple)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"steps": 2.5}, r"train\.steps must be an integer, got 2\.5"),
        ({"steps": "ten"}, r"train\.steps must be an integer, got 'ten'"),
        ({"steps": True}, r"train\.steps must be an integer, got True"),
        ({"resume": "no"}, r"train\.resume must be true or false, got 'no'"),
        ({"lr": "fast"}, r"train\.lr must be a number"),
        ({"limit": "x"}, r"train\.limit must be int or null"),
        ({"betas": [0.9]}, r"train\.betas must have 2 items"),
        ({"paths": "a"}, r"train\.paths must be a list"),
        ({"paths": ["a", 3.5j]}, r"train\.paths\[1\] must be a string"),
        ({"inner": {"size": "big"}}, r"train\.inner\.size must be an integer"),
        ({"inner": {"sise": 1}}, r"unknown train\.inner config key\(s\) \['sise'\]"),
        ({"maybe": {"size": "big"}}, r"train\.maybe\.size must be an integer"),
        ({"stpes": 1}, r"unknown train config key\(s\) \['stpes'\]; valid keys: .*'steps'"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(SchemaError, match=message):
        from_dict(Outer, values, "train")


@pytest.mark.parametrize(
    "override,config,message",
    [
        ("train.steps=2.5", "train", r"train\.steps must be an integer, got 2\.5"),
        ("train.resume=no", "train", r"train\.resume must be true or false, got 'no'"),
        ("optim.lr=fast", "optim", r"optim\.lr must be a number, got 'fast'"),
        ("model.hidden_size=big", "model", r"model\.hidden_size must be an integer, got 'big'"),
        ("parallel.tp=two", "parallel", r"parallel\.tp must be an integer, got 'two'"),
    ],
)
def test_recipe_overrides_of_the_wrong_type_are_named(override, config, message):
    from latentforge.model.config import ConfigError, ModelConfig
    from latentforge.train.config import OptimConfig, TrainConfig, TrainConfigError
    from latentforge.train.parallel import ParallelConfig
    from latentforge.train.parallel.config import LayoutError

    cfg = compose(["recipe=tiny", override])
    build = {
        "train": (TrainConfig, TrainConfigError),
        "optim": (OptimConfig, TrainConfigError),
        "model": (ModelConfig, ConfigError),
        "parallel": (ParallelConfig, LayoutError),
    }
    cls, error = build[config]
    with pytest.raises(error, match=message):
        cls.from_dict(cfg[config])


@dataclass
class Checked:
    size: int = 1

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


@dataclass
class Holder:
    checked: Checked = field(default_factory=Checked)


def test_a_dataclass_own_check_becomes_a_user_error_naming_where():
    from latentforge.model.errors import UserError

    with pytest.raises(SchemaError, match=r"^train\.checked: size must be >= 1, got 0$") as caught:
        from_dict(Holder, {"checked": {"size": 0}}, "train")
    assert isinstance(caught.value, UserError)  # entry points print it as one line, no traceback
    with pytest.raises(SchemaError, match=r"^size must be >= 1, got 0$"):
        from_dict(Checked, {"size": 0}, "")  # a command's own options: no prefix
