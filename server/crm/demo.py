"""The demo company's CRM: roles, a few companies, contacts, deals and leads, and activities
in every counter state, so the counters and indicators have something to show. Seeded once."""

from __future__ import annotations

from datetime import timedelta

from server.crm.models import (
    ActivityCreate,
    CompanyCreate,
    ContactCreate,
    DealCreate,
    LeadCreate,
    RoleGrantIn,
    TypedEmail,
    TypedPhone,
)
from server.crm.service import Crm
from server.store.database import utcnow

ROLES = {"ceo": "chief", "mike": "head", "emma": "head"}
COMPANIES = [
    ("Northwind Traders", "sarah", [("Nancy", "Davolio"), ("Andrew", "Fuller")]),
    ("Contoso Ltd", "david", [("Janet", "Leverling"), ("Steven", "Buchanan")]),
    ("Globex Corporation", "marco", [("Hank", "Scorpio"), ("Laura", "Callahan")]),
]
# (title, responsible, company index, amount); a manager links only companies they see
DEALS: list[tuple[str, str, int | None, float]] = [
    ("Northwind: 40 licences", "sarah", 0, 48_000.0),
    ("Northwind: support renewal", "sarah", 0, 12_000.0),
    ("Contoso: pilot", "david", 1, 9_500.0),
    ("Globex: EU roll-out", "marco", 2, 120_000.0),
    ("Initech: training", "ines", None, 6_000.0),
]
LEADS = [
    ("Website enquiry: pricing", "sarah", "Robert", "King", "Initech"),
    ("Trade fair contact", "marco", "Anne", "Dodsworth", "Umbrella GmbH"),
    ("Call-back request", "david", "Michael", "Suyama", ""),
]


async def seed_crm_demo(crm: Crm, user_ids: dict[str, str]) -> None:
    store = crm.records.core.store
    if await store["crm_records"].find_one({}) is not None:
        return
    for login, role in ROLES.items():
        await crm.config.grant(
            RoleGrantIn(role=role, subject_kind="user", subject_id=user_ids[login])
        )
    companies: list[str] = []
    for index, (title, owner, people) in enumerate(COMPANIES):
        slug = title.split()[0].lower()
        company = await crm.records.create(
            user_ids[owner],
            "company",
            CompanyCreate(
                title=title,
                emails=[TypedEmail(value=f"office@{slug}.example")],
                phones=[TypedPhone(number=f"+1 555 02{index}0 000")],
                source="partner",
            ),
        )
        companies.append(company.id)
        for first, last in people:
            await crm.records.create(
                user_ids[owner],
                "contact",
                ContactCreate(
                    first_name=first,
                    last_name=last,
                    emails=[TypedEmail(value=f"{first.lower()}.{last.lower()}@{slug}.example")],
                    company_ids=[company.id],
                ),
            )
    deals = []
    for title, owner, company_index, amount in DEALS:
        deals.append(
            await crm.records.create(
                user_ids[owner],
                "deal",
                DealCreate(
                    title=title,
                    amount=amount,
                    currency="USD",
                    company_id=companies[company_index] if company_index is not None else None,
                ),
            )
        )
    leads = []
    for title, owner, first, last, company_title in LEADS:
        leads.append(
            await crm.records.create(
                user_ids[owner],
                "lead",
                LeadCreate(
                    title=title,
                    first_name=first,
                    last_name=last,
                    company_title=company_title,
                    emails=[TypedEmail(value=f"{first.lower()}@{last.lower()}.example")],
                    source="website",
                ),
            )
        )
    now = utcnow()
    plan = [
        # (record, actor, type, direction, subject, deadline offset, assigned to)
        (deals[0], "mike", "call", "incoming", "Asked for a quote update", None, None),
        (deals[0], "sarah", "meeting", "outgoing", "Contract review", timedelta(hours=2), None),
        (deals[1], "sarah", "task", "outgoing", "Send renewal terms", timedelta(days=-1), None),
        (deals[2], "david", "meeting", "outgoing", "Pilot kick-off", timedelta(days=3), None),
        (deals[3], "emma", "email", "incoming", "Re: roll-out schedule", None, None),
        (deals[3], "marco", "call", "outgoing", "Follow up with IT", timedelta(days=5), "ines"),
        (leads[0], "sarah", "email", "incoming", "Pricing for 50 seats?", None, None),
        (leads[1], "marco", "call", "outgoing", "Qualify the lead", timedelta(hours=-3), None),
    ]
    for record, actor, type_, direction, subject, offset, assignee in plan:
        await crm.activities.create(
            user_ids[actor],
            ActivityCreate(
                owner_type=record.type,
                owner_id=record.id,
                type=type_,
                direction=direction,
                subject=subject,
                deadline=now + offset if offset is not None else None,
                responsible_id=user_ids[assignee] if assignee else record.responsible_id,
            ),
        )
