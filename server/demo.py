"""The demo company: a department tree, ~20 employees with heads, one workgroup. Idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from server.crm.demo import seed_crm_demo
from server.crm.service import Crm
from server.directory.models import DepartmentIn, Phone, UserCreate, WorkgroupIn
from server.directory.service import DirectoryService
from server.store.database import Store

DEFAULT_PASSWORD = "demo-pass"

# (department, parent)
DEPARTMENTS: list[tuple[str, str | None]] = [
    ("Demo Company", None),
    ("New York finance", "Demo Company"),
    ("Berlin accounts", "Demo Company"),
    ("Paris finance", "Demo Company"),
    ("Sales", "Demo Company"),
    ("Sales Europe", "Sales"),
]


@dataclass(frozen=True)
class DemoPerson:
    login: str
    first: str
    last: str
    position: str
    department: str
    head: bool = False
    admin: bool = False


PEOPLE: list[DemoPerson] = [
    DemoPerson("admin", "Ada", "Admin", "Portal administrator", "Demo Company", admin=True),
    DemoPerson("ceo", "Catherine", "Ellis", "Chief executive", "Demo Company", head=True),
    DemoPerson(
        "john", "John", "Carter", "Head of finance, New York", "New York finance", head=True
    ),
    DemoPerson("mary", "Mary", "Lopez", "Accountant", "New York finance"),
    DemoPerson("peter", "Peter", "Nguyen", "Financial analyst", "New York finance"),
    DemoPerson("linda", "Linda", "Brooks", "Payroll specialist", "New York finance"),
    DemoPerson(
        "klaus", "Klaus", "Becker", "Head of accounts, Berlin", "Berlin accounts", head=True
    ),
    DemoPerson("anna", "Anna", "Schmidt", "Accountant", "Berlin accounts"),
    DemoPerson("jonas", "Jonas", "Weber", "Accounts clerk", "Berlin accounts"),
    DemoPerson("sophie", "Sophie", "Martin", "Head of finance, Paris", "Paris finance", head=True),
    DemoPerson("lucas", "Lucas", "Bernard", "Controller", "Paris finance"),
    DemoPerson("chloe", "Chloe", "Dubois", "Treasury analyst", "Paris finance"),
    DemoPerson("mike", "Michael", "Reed", "Head of sales", "Sales", head=True),
    DemoPerson("sarah", "Sarah", "Kim", "Account executive", "Sales"),
    DemoPerson("david", "David", "Olsen", "Sales manager", "Sales"),
    DemoPerson("emma", "Emma", "Rossi", "Head of sales, Europe", "Sales Europe", head=True),
    DemoPerson("marco", "Marco", "Bianchi", "Sales manager", "Sales Europe"),
    DemoPerson("ines", "Ines", "Garcia", "Sales manager", "Sales Europe"),
    DemoPerson("tom", "Tom", "Walsh", "Sales assistant", "Sales Europe"),
    DemoPerson("olga", "Olga", "Ivanova", "Office manager", "Demo Company"),
]

WORKGROUP = "Website relaunch"
WORKGROUP_MEMBERS = ["mike", "sarah", "emma", "marco", "olga"]


async def seed_demo(
    store: Store,
    directory: DirectoryService,
    password: str | None = None,
    crm: Crm | None = None,
) -> list[tuple[str, str]]:
    """Create what is missing of the demo company; returns (login, position) pairs.

    Existing users keep their passwords unless ``password`` is given.
    """
    dept_ids: dict[str, str] = {}
    for name, parent in DEPARTMENTS:
        parent_id = dept_ids.get(parent) if parent else None
        existing = await store.departments.find_one({"name": name, "parent_id": parent_id})
        if existing is None:
            created = await directory.create_department(
                DepartmentIn(name=name, parent_id=parent_id)
            )
            dept_ids[name] = created.id
        else:
            dept_ids[name] = str(existing["_id"])

    user_ids: dict[str, str] = {}
    for index, p in enumerate(PEOPLE):
        existing = await directory.user_by_login(p.login)
        if existing is None:
            user = await directory.create_user(
                UserCreate(
                    login=p.login,
                    email=f"{p.login}@demo.portalhub.test",
                    first_name=p.first,
                    last_name=p.last,
                    position=p.position,
                    department_id=dept_ids[p.department],
                    is_admin=p.admin,
                    password=password or DEFAULT_PASSWORD,
                    phones=[Phone(type="work", number=f"+1 555 0100 {100 + index}")],
                )
            )
            user_ids[p.login] = user.id
        else:
            user_ids[p.login] = str(existing["_id"])
            if password:
                await directory.set_password(user_ids[p.login], password)
        if p.head:
            await store.departments.update_one(
                {"_id": dept_ids[p.department]}, {"$set": {"head_id": user_ids[p.login]}}
            )

    if await store.workgroups.find_one({"name": WORKGROUP}) is None:
        members = [user_ids[login] for login in WORKGROUP_MEMBERS]
        await directory.create_workgroup(
            members[0],
            WorkgroupIn(
                name=WORKGROUP, description="Relaunch of the company website", member_ids=members
            ),
        )
    if crm is not None:
        await seed_crm_demo(crm, user_ids)
    return [(p.login, p.position) for p in PEOPLE]
