"""Each role's meta/argument_specs.yml states its defaults exactly, and its README names them.

ansible-core validates a role's inputs against the spec before the role runs. A
variable that is `required: true` but also defaulted in defaults/main.yml is never
missing, so that check does nothing; an option without `default:` documents less
than the role does. So, for every role: each default is an option of the `main`
entry point with the same `default:` and not required; each option that is not
required has a default; a required option has none; every other entry point
names only variables the role knows, with the same defaults; the README mentions
every variable.
"""

from __future__ import annotations

import pytest
import yaml

from tests.collection_paths import ROLES

ROLE_DIRS = sorted(p for p in ROLES.iterdir() if (p / "meta" / "argument_specs.yml").is_file())


def _load(role):
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    return defaults, specs


def test_every_role_has_a_spec():
    assert {p.name for p in ROLE_DIRS} == {"endpoint_mac", "fail2ban_whitelist", "recordings"}


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_main_spec_matches_the_defaults_exactly(role):
    defaults, specs = _load(role)
    options = specs["main"]["options"]
    problems = []
    for name, value in defaults.items():
        if name.startswith(f"{role.name}__"):
            continue  # internal
        option = options.get(name)
        if option is None:
            problems.append(f"{name}: defaulted but not in the spec")
            continue
        if option.get("required"):
            problems.append(f"{name}: required but defaulted, so never missing")
        if "default" not in option:
            problems.append(f"{name}: no default: in the spec (defaults/main.yml has {value!r})")
        elif option["default"] != value:
            problems.append(f"{name}: spec default {option['default']!r} != {value!r}")
    for name, option in options.items():
        if name not in defaults and not option.get("required"):
            problems.append(f"{name}: optional but neither defaulted nor given a default")
        if option.get("required") and "default" in option:
            problems.append(f"{name}: required with a default")
    assert problems == []


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_other_entry_points_agree_with_main(role):
    defaults, specs = _load(role)
    main = specs["main"]["options"]
    for entry, spec in specs.items():
        for name, option in (spec.get("options") or {}).items():
            assert name in main, f"{entry}: {name} unknown to main"
            assert option.get("default") == main[name].get("default"), f"{entry}: {name}"


@pytest.mark.parametrize("role", ROLE_DIRS, ids=lambda p: p.name)
def test_readme_names_every_variable(role):
    _defaults, specs = _load(role)
    readme = (role / "README.md").read_text()
    missing = [name for name in specs["main"]["options"] if name not in readme]
    assert missing == []
