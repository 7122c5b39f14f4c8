"""Where the athome.voip collection lives in the repository (modules, module_utils, filters, roles)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / "collections"
COLLECTION = COLLECTIONS / "ansible_collections" / "athome" / "voip"
MODULES = COLLECTION / "plugins" / "modules"
MODULE_UTILS = COLLECTION / "plugins" / "module_utils"
FILTERS = COLLECTION / "plugins" / "filter"
ROLES = COLLECTION / "roles"
