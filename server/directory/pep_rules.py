"""Rules of personal eventing (XEP-0163 PEP): a user's nodes, their configuration and who may
read them. Pure functions; the service (``server/directory/pep.py``) stores, the XMPP module
(``server/xmpp/modules/pep.py``) translates.

A node's configuration is a small dict of XEP-0060 fields, kept as the strings a data form
carries: ``pubsub#access_model`` (``presence``: every colleague who may see the owner, since
everyone is on everyone's roster here; ``open``: the same here, no one outside the portal can
ask; ``whitelist``: the owner only), ``pubsub#persist_items`` (``false`` keeps only the last
item), ``pubsub#max_items`` (a number or ``max``, never more than ``MAX_ITEMS_PER_NODE``) and
``pubsub#send_last_published_item`` (``never`` spares the node from the last-item delivery
when a client comes online).
"""

from __future__ import annotations

from collections.abc import Mapping

ACCESS = "pubsub#access_model"
PERSIST = "pubsub#persist_items"
MAX_ITEMS = "pubsub#max_items"
SEND_LAST = "pubsub#send_last_published_item"
NOTIFY_RETRACT = "pubsub#notify_retract"
NOTIFY_DELETE = "pubsub#notify_delete"
DELIVER_PAYLOADS = "pubsub#deliver_payloads"
ACCESS_MODELS = ("open", "presence", "whitelist")
SEND_LAST_VALUES = ("never", "on_sub", "on_sub_and_presence")
BOOLEAN_FIELDS = (PERSIST, NOTIFY_RETRACT, NOTIFY_DELETE, DELIVER_PAYLOADS)
FIELDS = (ACCESS, PERSIST, MAX_ITEMS, SEND_LAST, NOTIFY_RETRACT, NOTIFY_DELETE, DELIVER_PAYLOADS)

MAX_ITEMS_PER_NODE = 1000  # what "max" means: a few hundred bookmarks fit, with room
DEFAULT_MAX_ITEMS = 256
MAX_NODES_PER_USER = 100  # OMEMO takes one per device, the rest a handful
MAX_ITEM_CHARS = 64 * 1024  # as a private storage fragment
MAX_NAME_CHARS = 256  # a node name or an item id

BOOKMARKS = "urn:xmpp:bookmarks:1"

DEFAULTS: dict[str, str] = {
    ACCESS: "presence",
    PERSIST: "true",
    MAX_ITEMS: str(DEFAULT_MAX_ITEMS),
    SEND_LAST: "on_sub_and_presence",
    NOTIFY_RETRACT: "true",
    NOTIFY_DELETE: "true",
    DELIVER_PAYLOADS: "true",
}
# Nodes whose content is private by their specification (XEP-0402 section 3: whitelist, all
# items kept), unless the publish that creates them asks otherwise.
NODE_DEFAULTS: dict[str, dict[str, str]] = {
    BOOKMARKS: {ACCESS: "whitelist", MAX_ITEMS: "max", SEND_LAST: "never"},
    # XEP-0048 over PEP: the whole list (room passwords included) in one item
    "storage:bookmarks": {ACCESS: "whitelist", SEND_LAST: "never"},
}


class ConfigError(ValueError):
    """A configuration the server does not take (XEP-0060: not-acceptable)."""


def boolean(value: str) -> str:
    """XML Schema boolean, normalised to ``true``/``false``."""
    if value in ("1", "true"):
        return "true"
    if value in ("0", "false"):
        return "false"
    raise ConfigError(f"not a boolean: {value!r}")


def normalize(fields: Mapping[str, list[str]]) -> dict[str, str]:
    """The known fields of a submitted form (node_config or publish-options), checked and in
    canonical form; unknown fields are left out (the server has no such option)."""
    out: dict[str, str] = {}
    for name, values in fields.items():
        if name not in FIELDS:
            continue
        value = values[0].strip() if values else ""
        if name == ACCESS:
            if value not in ACCESS_MODELS:
                raise ConfigError(f"access model {value!r}: one of {', '.join(ACCESS_MODELS)}")
        elif name == MAX_ITEMS:
            if value != "max":
                if not value.isascii() or not value.isdigit() or len(value) > 9:
                    raise ConfigError("max_items is a number or 'max'")
                number = int(value)
                if number < 1 or number > MAX_ITEMS_PER_NODE:
                    raise ConfigError(f"max_items is between 1 and {MAX_ITEMS_PER_NODE}")
                value = str(number)
        elif name == SEND_LAST:
            if value not in SEND_LAST_VALUES:
                raise ConfigError(f"send_last_published_item: one of {SEND_LAST_VALUES}")
        else:
            value = boolean(value)
        out[name] = value
    return out


def initial_config(node: str, options: Mapping[str, str]) -> dict[str, str]:
    """A new node's configuration: the defaults, the node's own, then what was asked."""
    return {**DEFAULTS, **NODE_DEFAULTS.get(node, {}), **options}


def conflicts(config: Mapping[str, str], options: Mapping[str, str]) -> list[str]:
    """The publish-options that an existing node's configuration does not match (XEP-0060
    7.1.5: each is a precondition). ``max`` and the number it stands for are the same."""
    wrong = []
    for name, wanted in options.items():
        held = config.get(name, DEFAULTS.get(name, ""))
        if name == MAX_ITEMS and item_limit(held) == item_limit(wanted):
            continue
        if held != wanted:
            wrong.append(name)
    return wrong


def item_limit(max_items: str) -> int:
    """How many items a node keeps."""
    if max_items == "max":
        return MAX_ITEMS_PER_NODE
    try:
        return max(1, min(int(max_items), MAX_ITEMS_PER_NODE))
    except ValueError:
        return DEFAULT_MAX_ITEMS


def kept_items(config: Mapping[str, str]) -> int:
    """How many of a node's items are stored: all up to its limit, or only the last one when
    items are not persisted (still needed for the last-item delivery)."""
    if config.get(PERSIST, "true") == "false":
        return 1
    return item_limit(config.get(MAX_ITEMS, str(DEFAULT_MAX_ITEMS)))


def may_read(access_model: str, *, is_owner: bool, sees_owner: bool) -> bool:
    """Whether someone reads a node (and gets its notifications). ``sees_owner``: the reader
    is a colleague who may see the owner in the directory, and the owner is active."""
    if is_owner:
        return True
    if access_model in ("presence", "open"):
        return sees_owner
    return False


def valid_name(name: str) -> bool:
    """A node name or item id: non-empty, bounded, printable (XML 1.0 rules are the parser's)."""
    return 0 < len(name) <= MAX_NAME_CHARS and all(ord(c) >= 32 for c in name)


def notify_feature(node: str) -> str:
    """XEP-0163 section 4: the disco feature a client announces to get a node's events."""
    return f"{node}+notify"
