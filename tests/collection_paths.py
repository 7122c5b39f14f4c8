"""Where the athome.voip collection lives in the repository (modules, module_utils, filters, roles)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "collections"
COLLECTION = COLLECTIONS / "ansible_collections" / "athome" / "voip"
MODULES = COLLECTION / "plugins" / "modules"
MODULE_UTILS = COLLECTION / "plugins" / "module_utils"
FILTERS = COLLECTION / "plugins" / "filter"
ROLES = COLLECTION / "roles"
UNIT_FIXTURES = COLLECTION / "tests" / "unit" / "plugins" / "module_utils" / "fixtures"
FQ_MODULE_UTILS = "ansible_collections.athome.voip.plugins.module_utils."


def load_module_utils(name: str):
    """plugins/module_utils/<name>.py imported from its file, registered under the name the
    modules import it by (so a module loaded with load_module finds it)."""
    import importlib.util
    import sys

    fq = FQ_MODULE_UTILS + name
    if fq not in sys.modules:
        spec = importlib.util.spec_from_file_location(fq, MODULE_UTILS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[fq] = mod
    return sys.modules[fq]


def load_module(name: str, *utils: str):
    """plugins/modules/<name>.py imported from its file, with its module_utils `utils` first."""
    import importlib.util

    for util in utils:
        load_module_utils(util)
    spec = importlib.util.spec_from_file_location(name, MODULES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
