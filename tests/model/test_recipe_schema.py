"""The dataclasses are the recipes' schema: every YAML file under recipes/ holds only what it changes.

For each file, the recipe that selects it is composed twice: as shipped, and with the file's own values removed
(its `defaults:` kept). A value that composes the same either way restates what the file inherits (a dataclass
default, or the group file it extends) and fails the test; a key no dataclass field names fails too. Entries the
composition has no default for (a reward function in a list, the optional judge, an environment's options) are
compared with their class's defaults.
"""

import dataclasses
import functools
import inspect
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from latentforge.model.recipes import GROUP_SCHEMAS, RECIPES_DIR, compose, group_values, schema_class
from latentforge.model.schema import SchemaError, defaults_of, from_dict

ROOT_GROUPS = ("model", "parallel", "precision", "data", "optim", "train")  # recipes/config.yaml's defaults
FILES = sorted(p.relative_to(RECIPES_DIR) for p in RECIPES_DIR.glob("*/*.yaml"))


def selection(file: Path) -> list:
    group, name = file.parent.name, file.stem
    if group == "recipe":
        return [f"recipe={name}"]
    return [f"{group}={name}" if group in ROOT_GROUPS else f"+{group}={name}"]


def own_values(file: Path, root: Path = RECIPES_DIR) -> dict:
    """The file's values by package: a recipe's body is global, a group file's sits under its group."""
    body = yaml.safe_load((root / file).read_text()) or {}
    body.pop("defaults", None)
    return body if file.parent.name == "recipe" else {file.parent.name: body}


def leaves(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def without_own_values(file: Path, root: Path, scratch: Path) -> Path:
    """A copy of the recipes tree in which `file` keeps only its package header and `defaults:` list."""
    tree = scratch / "stripped"
    shutil.copytree(root, tree)
    text = (root / file).read_text()
    header = [line for line in text.splitlines() if line.startswith("# @package")]
    defaults = (yaml.safe_load(text) or {}).get("defaults")
    stripped = yaml.safe_dump({"defaults": defaults}) if defaults else ""
    (tree / file).write_text("\n".join(header + [stripped]))
    return tree


@functools.lru_cache(maxsize=None)
def composed(file: Path, root: Path) -> dict:
    """The plain config that selecting `file` composes from the tree at `root` (cached: each test reads it)."""
    return OmegaConf.to_container(compose(selection(file), config_dir=root), resolve=True)


def restatements(file: Path, root: Path, scratch: Path) -> dict:
    """The values of `file` that compose the same without it: what it inherits anyway."""
    shipped = leaves(composed(file, root))
    inherited = leaves(
        OmegaConf.to_container(
            compose(selection(file), config_dir=without_own_values(file, root, scratch)), resolve=True
        )
    )
    return {
        key: value
        for key, value in leaves(own_values(file, root)).items()
        if key in inherited and inherited[key] == shipped[key]
    }


@pytest.mark.parametrize("file", FILES, ids=str)
def test_yaml_holds_only_what_it_changes(file, tmp_path):
    restated = restatements(file, RECIPES_DIR, tmp_path)
    assert not restated, (
        f"recipes/{file} restates values it already inherits (a dataclass default or the file it "
        f"extends): {restated}; delete those lines"
    )


@pytest.mark.parametrize("file", FILES, ids=str)
def test_yaml_names_only_dataclass_fields_and_composes_into_valid_configs(file):
    for group in own_values(file):
        assert group in GROUP_SCHEMAS, f"recipes/{file}: `{group}` is not a recipe group ({sorted(GROUP_SCHEMAS)})"
    for group, values in composed(
        file, RECIPES_DIR
    ).items():  # every group the selection composes, not only the file's own
        if group != "recipe":
            from_dict(schema_class(group), values, group)  # raises naming an unknown key or a bad value


def test_every_group_file_composes_onto_its_schema():
    groups = {p.name for p in RECIPES_DIR.iterdir() if p.is_dir() and p.name != "recipe" and any(p.glob("*.yaml"))}
    assert groups == set(GROUP_SCHEMAS), "each recipes/<group>/ needs its dataclass in model/recipes.py GROUP_SCHEMAS"
    for file in FILES:
        group = file.parent.name
        if group == "recipe":
            continue
        defaults = (yaml.safe_load((RECIPES_DIR / file).read_text()) or {}).get("defaults") or []
        assert defaults and defaults[-1] == "_self_", f"recipes/{file} must start with defaults: [schema, _self_]"
        # every field is present after composition, so `group.field=value` overrides need no `+`
        assert set(defaults_of(schema_class(group))) <= set(group_values(group, file.stem)), f"recipes/{file}"


def test_the_checks_catch_a_restated_default_a_restated_parent_value_and_an_unknown_key(tmp_path):
    tree = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, tree)
    train, child = Path("train/default.yaml"), Path("recipe/child.yaml")
    (tree / train).write_text((tree / train).read_text() + "\nseq_len: 256\nsteps: 7\n")
    (tree / child).write_text(
        "# @package _global_\ndefaults: [super_120b, _self_]\ntrain: {checkpoint_interval: 1000, keep_last: 4}\n"
    )
    assert restatements(train, tree, tmp_path / "a") == {"train.seq_len": 256}  # the dataclass default
    assert restatements(child, tree, tmp_path / "b") == {"train.checkpoint_interval": 1000}  # the parent recipe's
    (tree / train).write_text((tree / train).read_text() + "sequence_len: 128\n")
    with pytest.raises(SchemaError, match=r"unknown train config key\(s\) \['sequence_len'\]"):
        from_dict(schema_class("train"), compose([], config_dir=tree).train, "train")


def test_a_field_without_yaml_is_overridable_without_plus():
    cfg = compose(["recipe=tiny", "train.eval_limit=3", "data.tokenizer.train_max_mb=1.5"])
    assert cfg.train.eval_limit == 3 and cfg.data.tokenizer.train_max_mb == 1.5


def field_defaults(cls) -> dict:
    """`cls`'s field defaults as plain values, without constructing `cls` (a JudgeConfig needs a checkpoint)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            out[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
    return out


def same_as_default(values: dict, defaults: dict, prefix: str) -> dict:
    known = leaves(defaults)
    return {f"{prefix}.{k}": v for k, v in leaves(values).items() if k in known and known[k] == v}


def entry_restatements(rl: dict) -> dict:
    """Values of a composed `rl` group equal to the default of the class that reads them, where the composition
    has none to compare with: reward functions, the judge, each task's env_options (the environment's arguments)."""
    from latentforge.rl.envs.base import env_class
    from latentforge.rl.rewards.judge import JudgeConfig
    from latentforge.rl.rewards.scorer import RewardFunctionConfig

    reward, prompts, found = rl.get("reward") or {}, rl.get("prompts") or {}, {}
    for i, function in enumerate(reward.get("functions") or []):
        found.update(same_as_default(function, field_defaults(RewardFunctionConfig), f"rl.reward.functions[{i}]"))
    if reward.get("judge"):
        found.update(same_as_default(reward["judge"], field_defaults(JudgeConfig), "rl.reward.judge"))
    for key in ("tasks", "eval_tasks"):
        for i, task in enumerate(prompts.get(key) or []):
            if task.get("env_options"):
                parameters = inspect.signature(env_class(task["name"])).parameters.values()
                defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
                found.update(same_as_default(task["env_options"], defaults, f"rl.prompts.{key}[{i}].env_options"))
    return found


def test_list_entries_and_optional_configs_hold_only_what_they_change():
    rl_files = [file for file in FILES if "rl" in composed(file, RECIPES_DIR)]
    assert rl_files, "no recipe composes the rl group"
    for file in rl_files:
        restated = entry_restatements(composed(file, RECIPES_DIR)["rl"])
        assert not restated, f"recipes/{file} restates class defaults: {restated}; delete them"


def test_the_entry_check_catches_restated_function_judge_and_environment_defaults():
    rl = {
        "reward": {
            "functions": [{"target": "m:f", "weight": 1.0, "isolation": "inline"}],
            "judge": {
                "checkpoint": "j",
                "sampling": {"temperature": 0.0, "max_new_tokens": 8},
                "engine": {"max_batch": 4},
            },
        },
        "prompts": {"tasks": [{"name": "python_tool", "num": 5, "env_options": {"timeout_s": 2, "memory_mb": 256}}]},
    }
    assert entry_restatements(rl) == {
        "rl.reward.functions[0].weight": 1.0,
        "rl.reward.judge.sampling.temperature": 0.0,  # the judge's default factory's, not SamplingParams' 1.0
        "rl.prompts.tasks[0].env_options.memory_mb": 256,
    }
