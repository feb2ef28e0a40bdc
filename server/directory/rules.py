"""Pure rules over the directory: the supervisor relation and who may see whom. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DepartmentNode:
    id: str
    parent_id: str | None
    head_id: str | None
    name: str = ""


@dataclass(frozen=True, slots=True)
class Person:
    id: str
    department_id: str | None
    is_external: bool = False
    is_active: bool = True


def ancestors(department_id: str | None, tree: Mapping[str, DepartmentNode]) -> list[str]:
    """The department itself, then its parent, up to the root. Cycles are cut, not followed."""
    chain: list[str] = []
    current = department_id
    while current is not None and current in tree and current not in chain:
        chain.append(current)
        current = tree[current].parent_id
    return chain


def descendants(department_id: str, tree: Mapping[str, DepartmentNode]) -> set[str]:
    """The department and every department below it."""
    children: dict[str, list[str]] = {}
    for node in tree.values():
        if node.parent_id is not None:
            children.setdefault(node.parent_id, []).append(node.id)
    found: set[str] = set()
    stack = [department_id]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.add(current)
        stack.extend(children.get(current, []))
    return found


def supervisors_of(person: Person, tree: Mapping[str, DepartmentNode]) -> list[str]:
    """Every head above ``person`` in the department tree, nearest first, without themself.

    The head of the person's own department supervises them unless it is the person; the
    heads of all departments above supervise them too.
    """
    heads: list[str] = []
    for dept_id in ancestors(person.department_id, tree):
        head = tree[dept_id].head_id
        if head is not None and head != person.id and head not in heads:
            heads.append(head)
    return heads


def is_supervisor(candidate_id: str, person: Person, tree: Mapping[str, DepartmentNode]) -> bool:
    return candidate_id in supervisors_of(person, tree)


def may_see_user(viewer: Person, other: Person, shared_workgroup_ids: Iterable[str]) -> bool:
    """Employees see every active colleague; extranet users see only their workgroups' members.

    The relation is symmetric: an employee sees an extranet user only through a shared
    workgroup, as Bitrix24's extranet does.
    """
    if viewer.id == other.id:
        return True
    if not other.is_active:
        return False
    if viewer.is_external or other.is_external:
        return any(True for _ in shared_workgroup_ids)
    return True


# --- directory search -----------------------------------------------------------------------

MAX_SEARCH_WORDS = 8
MIN_PHONE_DIGITS = 2
_PHONE_TEXT = re.compile(r"^\+?[\d\s().\/-]+$")


def search_words(text: str) -> list[str]:
    """The words of one search box, each of which must be found somewhere in a person's
    card (name, login, position, department, e-mail, phone); at most eight."""
    return list(dict.fromkeys(text.split()))[:MAX_SEARCH_WORDS]


def phone_search(text: str) -> str | None:
    """A search box holding a phone number written with spaces or punctuation ("0100 105",
    "+49 (30) 12"): its digits, to look for as one run in a person's numbers; else None."""
    stripped = text.strip()
    if not _PHONE_TEXT.match(stripped):
        return None
    digits = re.sub(r"\D", "", stripped)
    return digits if len(digits) >= MIN_PHONE_DIGITS else None


def departments_named(word: str, names: Mapping[str, str]) -> list[str]:
    """The ids of departments whose name contains ``word`` (case-insensitive)."""
    needle = word.casefold()
    return sorted(dept_id for dept_id, name in names.items() if needle in name.casefold())
