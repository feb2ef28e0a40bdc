"""Pure rules over the directory: the supervisor relation and who may see whom. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DepartmentNode:
    id: str
    parent_id: str | None
    head_id: str | None


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
