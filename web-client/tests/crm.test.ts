import { describe, expect, it } from "vitest";
import {
  activityCreateBody,
  activityFormErrors,
  applyActivityEvent,
  applyCrmCounters,
  applyRecordEvent,
  badgeView,
  CONVERSION_MODES,
  colourOf,
  crmNavBadge,
  describeCrmHistory,
  describeMatched,
  duplicateProbe,
  duplicatesOf,
  emptyActivityForm,
  emptyCrmBadge,
  emptyCrmCounters,
  emptyListFilter,
  emptyRecordForm,
  formFromRecord,
  indicatorView,
  isCounted,
  liveState,
  matchesFilter,
  mayConvert,
  mayMerge,
  applyBoardEvent,
  columnSummary,
  linkedNames,
  moveOnBoard,
  removeFromBoard,
  mergeDetail,
  plainRecord,
  probeKey,
  recordCreateBody,
  recordFormErrors,
  recordPatchBody,
  removeActivity,
  removeRecord,
  sortActivities,
  upsertActivity,
  upsertRecord,
  conversionBody,
} from "../src/core/crm";
import { ApiError } from "../src/core/problem";
import type { CrmActivity, CrmCounters, CrmRecord, CrmRecordDetail } from "../src/core/types";
import { oid } from "./fixtures";

function record(n: number, over: Partial<CrmRecord> = {}): CrmRecord {
  const at = new Date(Date.UTC(2026, 2, 1, 12, 0, n)).toISOString();
  return {
    id: oid(n),
    type: "deal",
    title: `Deal ${n}`,
    first_name: null,
    last_name: null,
    company_title: null,
    status: null,
    stage_id: "new",
    open: true,
    amount: null,
    currency: "USD",
    responsible_id: "mary",
    emails: [],
    phones: [],
    source: "",
    comments: "",
    custom_fields: {},
    company_ids: null,
    company_id: null,
    contact_ids: [],
    lead_id: null,
    converted: null,
    created_by: "mary",
    created_at: at,
    modified_by: "mary",
    modified_at: at,
    open_activities: 0,
    indicator: { number: 0, colour: "none", dot: null },
    ...over,
  };
}

function activity(n: number, over: Partial<CrmActivity> = {}): CrmActivity {
  const at = new Date(Date.UTC(2026, 2, 1, 12, 0, n)).toISOString();
  return {
    id: oid(100 + n),
    owner_type: "deal",
    owner_id: oid(1),
    owner_title: "Deal 1",
    type: "call",
    direction: "outgoing",
    missed: false,
    subject: `Activity ${n}`,
    description: "",
    responsible_id: "mary",
    deadline: null,
    completed: false,
    completed_at: null,
    state: "future",
    created_by: "mary",
    created_at: at,
    modified_at: at,
    ...over,
  };
}

describe("applyCrmCounters", () => {
  it("merges a push field by field, keeping the numbers it leaves out", () => {
    let counters: CrmCounters = emptyCrmCounters();
    counters = applyCrmCounters(counters, { crm: { deal: { idle: 1 } } });
    counters = applyCrmCounters(counters, { crm: { deal: { incoming: 2, total: 3, colour: "red-green" } } });
    expect(counters.deal).toEqual({ incoming: 2, due: 0, overdue: 0, total: 3, idle: 1, colour: "red-green" });
    counters = applyCrmCounters(counters, { crm: { deal: { due: 1 } } });
    expect(counters.deal.incoming).toBe(2);
    expect(counters.deal.due).toBe(1);
    expect(counters.deal.idle).toBe(1);
    expect(counters.lead).toEqual(emptyCrmBadge());
  });

  it("leaves the CRM counters alone for im and tasks pushes", () => {
    const counters = applyCrmCounters(emptyCrmCounters(), { crm: { lead: { incoming: 1, total: 1, colour: "green" } } });
    expect(applyCrmCounters(counters, { im: { unread: 3, chats: {} } })).toBe(counters);
    expect(applyCrmCounters(counters, { tasks: {} })).toBe(counters);
    expect(applyCrmCounters(counters, null)).toBe(counters);
  });

  it("takes a whole snapshot the same way and ignores unknown types", () => {
    const snapshot = {
      crm: {
        deal: { incoming: 1, due: 0, overdue: 0, total: 1, idle: 0, colour: "green" },
        lead: { incoming: 0, due: 0, overdue: 2, total: 2, idle: 4, colour: "red" },
        contact: { incoming: 0, due: 0, overdue: 0, total: 0, idle: 0, colour: "none" },
        company: { incoming: 0, due: 0, overdue: 0, total: 0, idle: 0, colour: "none" },
        quote: { total: 9 },
      },
    };
    const counters = applyCrmCounters(emptyCrmCounters(), snapshot);
    expect(counters.deal.colour).toBe("green");
    expect(counters.lead).toEqual({ incoming: 0, due: 0, overdue: 2, total: 2, idle: 4, colour: "red" });
    expect(Object.keys(counters).sort()).toEqual(["company", "contact", "deal", "lead"]);
  });

  it("works the colour and total out when a push leaves them out", () => {
    const counters = applyCrmCounters(emptyCrmCounters(), { crm: { deal: { incoming: 1, overdue: 1 } } });
    expect(counters.deal.colour).toBe("red-green");
    expect(counters.deal.total).toBe(2);
  });

  it("drops back to zero", () => {
    let counters = applyCrmCounters(emptyCrmCounters(), { crm: { deal: { incoming: 1, due: 1, total: 2, colour: "red-green" } } });
    counters = applyCrmCounters(counters, { crm: { deal: { incoming: 0, due: 0, total: 0, colour: "none" } } });
    expect(counters.deal).toEqual(emptyCrmBadge());
  });
});

describe("badges", () => {
  it("colours a counter: green incoming, red due or overdue, split for both", () => {
    expect(colourOf(1, 0)).toBe("green");
    expect(colourOf(0, 2)).toBe("red");
    expect(colourOf(1, 1)).toBe("red-green");
    expect(colourOf(0, 0)).toBe("none");
    const green = badgeView({ ...emptyCrmBadge(), incoming: 1, total: 1, colour: "green" });
    expect(green).toMatchObject({ text: "1", colour: "green", cls: "crm-badge crm-badge-green" });
    const both = badgeView({ ...emptyCrmBadge(), incoming: 1, due: 1, total: 2, colour: "red-green" });
    expect(both).toMatchObject({ text: "2", colour: "red-green", cls: "crm-badge crm-badge-red-green" });
    expect(both.title).toBe("1 incoming, 1 due today");
    const red = badgeView({ ...emptyCrmBadge(), overdue: 3, total: 3, colour: "red" });
    expect(red.colour).toBe("red");
  });

  it("shows nothing for zero, whatever idle records there are", () => {
    const view = badgeView({ ...emptyCrmBadge(), idle: 5 });
    expect(view).toMatchObject({ text: "", colour: null, cls: "crm-badge crm-badge-none" });
  });

  it("caps the number at 99+", () => {
    expect(badgeView({ ...emptyCrmBadge(), overdue: 120, total: 120, colour: "red" }).text).toBe("99+");
  });

  it("adds the four types up on the nav item", () => {
    const counters = emptyCrmCounters();
    counters.deal = { ...emptyCrmBadge(), incoming: 1, total: 1, colour: "green" };
    counters.lead = { ...emptyCrmBadge(), due: 2, total: 2, colour: "red" };
    expect(crmNavBadge(counters)).toMatchObject({ text: "3", colour: "red-green" });
    expect(crmNavBadge(emptyCrmCounters())).toMatchObject({ text: "", colour: null });
  });
});

describe("indicatorView", () => {
  it("shows the number, the colour and the dot", () => {
    expect(indicatorView({ number: 1, colour: "green", dot: null })).toMatchObject({
      text: "1",
      colour: "green",
      dot: null,
      cls: "crm-indicator crm-indicator-green",
    });
    expect(indicatorView({ number: 2, colour: "red-green", dot: null }).cls).toBe("crm-indicator crm-indicator-red-green");
    const planned = indicatorView({ number: 0, colour: "gray", dot: "blue" });
    expect(planned).toMatchObject({ text: "0", colour: "gray", dot: "blue" });
    expect(planned.title).toContain("you have planned work");
    expect(indicatorView({ number: 0, colour: "gray", dot: "gray" }).title).toContain("someone else");
    expect(indicatorView({ number: 3, colour: "gray", dot: null }).title).toBe("3 for someone else");
  });

  it("treats a missing or odd indicator as nothing", () => {
    expect(indicatorView(undefined)).toMatchObject({ text: "0", colour: "none", dot: null });
    expect(indicatorView({ number: -2, colour: "purple" as never, dot: "red" as never })).toMatchObject({ text: "0", colour: "none", dot: null });
  });

  it("counts only coloured numbers as counted", () => {
    expect(isCounted({ number: 1, colour: "green", dot: null })).toBe(true);
    expect(isCounted({ number: 2, colour: "gray", dot: null })).toBe(false);
    expect(isCounted({ number: 0, colour: "none", dot: null })).toBe(false);
  });
});

describe("record lists and live events", () => {
  it("upserts newest first and removes", () => {
    let list: CrmRecord[] = [];
    list = upsertRecord(list, record(1));
    list = upsertRecord(list, record(3));
    list = upsertRecord(list, record(2));
    expect(list.map((r) => r.title)).toEqual(["Deal 3", "Deal 2", "Deal 1"]);
    const renamed = record(2, { title: "Renamed", modified_at: new Date(Date.UTC(2026, 2, 2)).toISOString() });
    list = upsertRecord(list, renamed);
    expect(list.map((r) => r.title)).toEqual(["Deal 3", "Renamed", "Deal 1"]);
    expect(removeRecord(list, oid(3)).map((r) => r.id)).toEqual([oid(2), oid(1)]);
    expect(removeRecord(list, "nope")).toBe(list);
  });

  it("keeps a newer copy but takes the indicator of an older one", () => {
    const newer = record(1, { title: "New title", modified_at: new Date(Date.UTC(2026, 2, 5)).toISOString() });
    const older = record(1, { indicator: { number: 1, colour: "green", dot: null } });
    const [kept] = upsertRecord([newer], older);
    expect(kept?.title).toBe("New title");
    expect(kept?.indicator.colour).toBe("green");
  });

  it("applies an update to a filtered list: added, kept, dropped", () => {
    const filter = { ...emptyListFilter(), counted: true };
    const green = record(1, { indicator: { number: 1, colour: "green", dot: null } });
    let result = applyRecordEvent([], green, filter);
    expect(result.list.map((r) => r.id)).toEqual([oid(1)]);
    result = applyRecordEvent(result.list, record(1), filter);
    expect(result.list).toEqual([]);
    expect(result.needsReload).toBe(false);
  });

  it("searches like the hub: names, an e-mail, phone digits", () => {
    const contact = record(4, {
      type: "contact",
      title: "Zoë Adams",
      first_name: "Zoë",
      last_name: "Adams",
      emails: [{ type: "work", value: "zoe@example.test" }],
      phones: [{ type: "work", number: "+49 30 1234567" }],
    });
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "zoe ad" })).toBe(true);
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "ZOE@example.test" })).toBe(true);
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "030 1234567" })).toBe(true);
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "smith" })).toBe(false);
    // part of an e-mail, a phone's digits in order as typed
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "example" })).toBe(true);
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "30 123" })).toBe(true);
    expect(matchesFilter(contact, { ...emptyListFilter(), q: "999" })).toBe(false);
    // a contact of a company may be found by the company's name: only the hub can tell
    const linked = { ...contact, company_ids: ["co1"] };
    expect(matchesFilter(linked, { ...emptyListFilter(), q: "acme" })).toBeUndefined();
    expect(matchesFilter({ ...linked, type: "company" }, { ...emptyListFilter(), q: "acme" })).toBe(false);
  });

  it("leaves new records to the hub when only it can tell (activity responsible)", () => {
    const filter = { ...emptyListFilter(), activityResponsibleId: "bob" };
    const known = [record(1)];
    const updated = applyRecordEvent(known, record(1, { title: "Changed" }), filter);
    expect(updated.list[0]?.title).toBe("Changed");
    expect(updated.needsReload).toBe(false);
    const fresh = applyRecordEvent(known, record(2), filter);
    expect(fresh.list).toBe(known);
    expect(fresh.needsReload).toBe(true);
  });

  it("lays a live copy over the record page, links kept", () => {
    const detail: CrmRecordDetail = { ...record(1), links: { contact: [{ type: "contact", id: "c1", title: "Ann" }] } };
    const merged = mergeDetail(detail, record(1, { indicator: { number: 2, colour: "red-green", dot: null } }));
    expect(merged.indicator.colour).toBe("red-green");
    expect(merged.links.contact?.[0]?.title).toBe("Ann");
    expect(mergeDetail(detail, record(2))).toBe(detail);
    expect("links" in plainRecord(detail)).toBe(false);
    expect("links" in detail).toBe(true);
  });
});

describe("activities", () => {
  it("orders a timeline: incoming, then by deadline, then completed (latest first)", () => {
    const list = sortActivities([
      activity(1, { completed: true, state: "completed", completed_at: "2026-03-01T10:00:00Z" }),
      activity(2, { deadline: "2026-03-02T10:00:00Z", state: "future" }),
      activity(3, { state: "incoming", direction: "incoming" }),
      activity(4, { deadline: "2026-03-01T15:00:00Z", state: "due" }),
      activity(5, { completed: true, state: "completed", completed_at: "2026-03-01T11:00:00Z" }),
      activity(6, { state: "future" }),
    ]);
    expect(list.map((a) => a.subject)).toEqual(["Activity 3", "Activity 4", "Activity 2", "Activity 6", "Activity 5", "Activity 1"]);
  });

  it("upserts and removes", () => {
    let list = upsertActivity([], activity(1));
    list = upsertActivity(list, activity(1, { subject: "Changed", modified_at: "2026-03-02T00:00:00Z" }));
    expect(list.map((a) => a.subject)).toEqual(["Changed"]);
    // an older copy arriving late does not win
    expect(upsertActivity(list, activity(1))[0]?.subject).toBe("Changed");
    expect(removeActivity(list, activity(1).id)).toEqual([]);
  });

  it("keeps 'my open activities' to what belongs there", () => {
    const mineOpen = (a: CrmActivity) => a.responsible_id === "mary" && !a.completed;
    let list = applyActivityEvent([], activity(1), mineOpen);
    expect(list).toHaveLength(1);
    list = applyActivityEvent(list, activity(1, { completed: true, state: "completed", modified_at: "2026-03-03T00:00:00Z" }), mineOpen);
    expect(list).toHaveLength(0);
    list = applyActivityEvent(list, activity(2, { responsible_id: "bob" }), mineOpen);
    expect(list).toHaveLength(0);
  });

  it("moves a passed deadline to overdue on the clock", () => {
    const due = activity(1, { state: "due", deadline: "2026-03-01T12:00:00Z" });
    expect(liveState(due, Date.parse("2026-03-01T11:59:00Z"))).toBe("due");
    expect(liveState(due, Date.parse("2026-03-01T12:00:00Z"))).toBe("overdue");
    expect(liveState({ ...due, state: "incoming" }, Date.parse("2026-03-02T00:00:00Z"))).toBe("incoming");
    expect(liveState({ ...due, completed: true }, 0)).toBe("completed");
  });

  it("builds the create body: direction only where it means something", () => {
    const form = emptyActivityForm({ type: "meeting", direction: "incoming", subject: " Demo ", deadline: "2026-03-01T15:30", responsibleId: "bob" });
    const body = activityCreateBody({ type: "deal", id: "d1" }, form);
    expect(body).toMatchObject({ owner_type: "deal", owner_id: "d1", type: "meeting", direction: "outgoing", subject: "Demo", responsible_id: "bob" });
    expect(body.deadline).toBe(new Date("2026-03-01T15:30").toISOString());
    const call = activityCreateBody({ type: "lead", id: "l1" }, emptyActivityForm({ direction: "incoming", subject: "Hi" }));
    expect(call.direction).toBe("incoming");
    expect(call.deadline).toBeUndefined();
    expect(activityFormErrors(emptyActivityForm())).toEqual(["Give the activity a subject."]);
  });
});

describe("duplicates", () => {
  it("probes only complete values, and nothing for deals", () => {
    expect(duplicateProbe("lead", emptyRecordForm({ email: "ann@exa" }))).toBeNull();
    expect(duplicateProbe("lead", emptyRecordForm({ firstName: "Ann" }))).toBeNull();
    const probe = duplicateProbe("lead", emptyRecordForm({ email: "Ann@Example.test ", firstName: "Ann", lastName: "Lee", companyTitle: "Acme" }));
    expect(probe).toEqual({
      type: "lead",
      first_name: "Ann",
      last_name: "Lee",
      title: "",
      company_title: "Acme",
      emails: ["ann@example.test"],
      phones: [],
    });
    expect(duplicateProbe("company", emptyRecordForm({ title: "Acme" }), "c9")).toMatchObject({ title: "Acme", exclude_id: "c9" });
    expect(duplicateProbe("deal", emptyRecordForm({ title: "Acme" }))).toBeNull();
    expect(duplicateProbe("contact", emptyRecordForm({ phone: "12" }))).toBeNull();
    expect(duplicateProbe("contact", emptyRecordForm({ phone: "+49 30 12345" }))?.phones).toEqual(["+49 30 12345"]);
  });

  it("gives the same key for the same question, so a pause asks once", () => {
    const a = duplicateProbe("lead", emptyRecordForm({ email: "ann@example.test", title: "Website" }));
    const b = duplicateProbe("lead", emptyRecordForm({ email: "ANN@example.test", title: "Website, rework" }));
    expect(probeKey(a)).toBe(probeKey(b)); // the lead's own title is not compared
    const c = duplicateProbe("lead", emptyRecordForm({ email: "bob@example.test" }));
    expect(probeKey(c)).not.toBe(probeKey(a));
    expect(probeKey(null)).toBe("");
  });

  it("reads the duplicates of a 409 answer", () => {
    const match = { type: "lead", id: "l1", title: "Ann", responsible_id: "mary", matched: ["email"] };
    const error = new ApiError(409, { type: "urn:portalhub:problem:possible-duplicates", duplicates: [match], hidden: true } as never);
    expect(duplicatesOf(error)).toEqual({ duplicates: [match], hidden: true });
    // only records the caller may not see match: nothing listed, but still a refusal to show
    const onlyHidden = new ApiError(409, { type: "urn:portalhub:problem:possible-duplicates", duplicates: [], hidden: true } as never);
    expect(duplicatesOf(onlyHidden)).toEqual({ duplicates: [], hidden: true });
    const bare = new ApiError(409, { type: "urn:portalhub:problem:possible-duplicates" } as never);
    expect(duplicatesOf(bare)).toEqual({ duplicates: [], hidden: false });
    expect(duplicatesOf(new ApiError(409, { type: "urn:portalhub:problem:conflict" }))).toBeNull();
    expect(duplicatesOf(new Error("x"))).toBeNull();
    expect(describeMatched(["email", "phone"])).toBe("same e-mail, same phone");
  });
});

describe("record forms", () => {
  it("checks what each type needs", () => {
    expect(recordFormErrors("contact", emptyRecordForm())).toEqual(["Give the contact a first or last name."]);
    expect(recordFormErrors("deal", emptyRecordForm())).toEqual(["Give the deal a title."]);
    expect(recordFormErrors("lead", emptyRecordForm({ companyTitle: "Acme" }))).toEqual([]);
    expect(recordFormErrors("lead", emptyRecordForm({ title: "x", email: "nope" }))).toEqual(["The e-mail address is not valid."]);
    expect(recordFormErrors("deal", emptyRecordForm({ title: "x", amount: "-3" }))).toEqual(["The amount must be a positive number."]);
  });

  it("builds create bodies with only the type's fields", () => {
    const form = emptyRecordForm({ title: "Website", firstName: "Ann", email: "ann@example.test", amount: "1200", responsibleId: "mary" });
    expect(recordCreateBody("lead", form)).toEqual({
      title: "Website",
      first_name: "Ann",
      emails: [{ type: "work", value: "ann@example.test" }],
      amount: 1200,
      currency: "USD",
      status: "new",
      responsible_id: "mary",
    });
    const deal = recordCreateBody("deal", emptyRecordForm({ title: "Big", companyId: "co1", contactIds: ["c1", "c1"], stageId: "new" }), true);
    expect(deal).toEqual({ title: "Big", currency: "USD", stage_id: "new", company_id: "co1", contact_ids: ["c1"], ignore_duplicates: true });
  });

  it("patches only what changed, keeping extra e-mails", () => {
    const lead = record(1, {
      type: "lead",
      title: "Website",
      status: "new",
      stage_id: null,
      contact_ids: null,
      emails: [
        { type: "home", value: "a@example.test" },
        { type: "other", value: "b@example.test" },
      ],
    });
    const form = formFromRecord(lead);
    expect(recordPatchBody(lead, form)).toEqual({});
    form.title = "Website v2";
    form.email = "c@example.test";
    expect(recordPatchBody(lead, form)).toEqual({
      title: "Website v2",
      emails: [
        { type: "home", value: "c@example.test" },
        { type: "other", value: "b@example.test" },
      ],
    });
    const deal = record(2, { company_id: "co1", contact_ids: ["c1"] });
    const dealForm = formFromRecord(deal);
    dealForm.companyId = null;
    expect(recordPatchBody(deal, dealForm)).toEqual({ company_id: null });
  });
});

describe("conversion", () => {
  it("offers the six modes", () => {
    expect(CONVERSION_MODES.map((m) => m.mode)).toEqual([
      "contact",
      "company",
      "contact+company",
      "deal",
      "deal+contact",
      "deal+contact+company",
    ]);
    expect(CONVERSION_MODES.find((m) => m.mode === "deal+contact")?.creates).toEqual(["deal", "contact"]);
  });

  it("converts open leads only", () => {
    expect(mayConvert(record(1, { type: "lead", status: "in_progress" }))).toBe(true);
    expect(mayConvert(record(1, { type: "lead", status: "converted" }))).toBe(false);
    expect(mayConvert(record(1, { type: "lead", status: "junk" }))).toBe(false);
    expect(mayConvert(record(1))).toBe(false);
  });
});

describe("history", () => {
  it("describes the entries", () => {
    const base = { id: "h", record_type: "deal" as const, record_id: "d", user_id: "mary", at: "2026-03-01T00:00:00Z" };
    expect(describeCrmHistory({ ...base, kind: "created" })).toBe("created the record");
    expect(describeCrmHistory({ ...base, kind: "field", field: "title", before: "A", after: "B" })).toBe("changed the title: A → B");
    expect(describeCrmHistory({ ...base, kind: "field", field: "responsible_id", before: "u1", after: "u2" }, (id) => id.toUpperCase())).toBe(
      "changed the responsible person: U1 → U2",
    );
    expect(describeCrmHistory({ ...base, kind: "activity_added", after: { id: "a", type: "call" } })).toBe("added a call");
    expect(describeCrmHistory({ ...base, kind: "activity_completed", after: { id: "a", type: "meeting" } })).toBe("completed a meeting");
    expect(describeCrmHistory({ ...base, kind: "activity_reopened", after: { id: "a", type: "email" } })).toBe("reopened an e-mail");
  });

  it("names the sender of a received e-mail, which no person added", () => {
    const base = { id: "h", record_type: "lead" as const, record_id: "l", user_id: null, at: "2026-03-01T00:00:00Z" };
    const after = { id: "a", type: "email", from: "Nora Newman", from_address: "nora@new.example" };
    expect(describeCrmHistory({ ...base, kind: "activity_added", after })).toBe("E-mail received from Nora Newman <nora@new.example>");
    expect(describeCrmHistory({ ...base, kind: "activity_added", after: { ...after, from: "nora@new.example" } })).toBe(
      "E-mail received from nora@new.example",
    );
    // a person who added it is named by the page; the line stays as it was
    expect(describeCrmHistory({ ...base, user_id: "mary", kind: "activity_added", after })).toBe("added an e-mail");
  });

  it("says where a moved e-mail went, on both records", () => {
    const moved = {
      id: "h",
      record_type: "contact" as const,
      user_id: "mary",
      at: "2026-03-01T00:00:00Z",
      kind: "activity_moved",
      field: "activity",
      before: { record: { type: "contact", id: "c", title: "Carl Client" }, activity: { id: "a", type: "email" } },
      after: { record: { type: "deal", id: "d", title: "Big order" }, activity: { id: "a", type: "email" } },
    };
    expect(describeCrmHistory({ ...moved, record_id: "c" })).toBe("moved an e-mail to deal “Big order”");
    expect(describeCrmHistory({ ...moved, record_type: "deal", record_id: "d" })).toBe("moved an e-mail here from contact “Carl Client”");
    expect(describeCrmHistory({ ...moved, record_id: "c", kind: "linked", field: "lead_id", before: null, after: "l" })).toBe(
      "took over a lead converted into this record",
    );
  });
});

describe("conversion with existing records", () => {
  it("uses the chosen existing contact and company of the types the mode makes", () => {
    expect(conversionBody("deal+contact+company", { contact: "c1", company: "k1" }, "contact")).toEqual({
      mode: "deal+contact+company",
      contact_id: "c1",
      company_id: "k1",
      emails_to: "contact",
      ignore_duplicates: true,
    });
    // a company chosen before the mode changed to one without a company is not sent
    expect(conversionBody("deal+contact", { contact: "", company: "k1" }, "company")).toEqual({
      mode: "deal+contact",
      ignore_duplicates: true,
    });
  });
});

describe("the deals' Kanban board", () => {
  const board = () => ({ new: [record(2), record(1)], won: [record(3, { stage_id: "won" })], lost: [] as CrmRecord[] });

  it("moves a deal to the column of its new stage when it changes, live", () => {
    const next = applyBoardEvent(board(), record(1, { stage_id: "won", modified_at: "2026-03-02T00:00:00.000Z" }), emptyListFilter());
    expect(next.new?.map((r) => r.id)).toEqual([oid(2)]);
    expect(next.won?.map((r) => r.id)).toEqual([oid(3), oid(1)]);
  });

  it("takes a deal off that no longer matches, or whose stage has no column", () => {
    const filter = { ...emptyListFilter(), q: "Deal 2" };
    expect(applyBoardEvent(board(), record(1), filter).new?.map((r) => r.id)).toEqual([oid(2)]);
    const gone = applyBoardEvent(board(), record(2, { stage_id: "archived" }), emptyListFilter());
    expect(Object.values(gone).flat().map((r) => r.id)).not.toContain(oid(2));
    expect(applyBoardEvent(board(), record(9, { type: "lead" }), emptyListFilter())).toEqual(board());
  });

  it("shows a dragged deal in its new column at once, and only in known columns", () => {
    const moved = moveOnBoard(board(), record(2), "lost");
    expect(moved.lost?.map((r) => [r.id, r.stage_id])).toEqual([[oid(2), "lost"]]);
    expect(moved.new?.map((r) => r.id)).toEqual([oid(1)]);
    expect(moveOnBoard(board(), record(2), "nowhere")).toEqual(board());
    expect(removeFromBoard(board(), oid(7))).toEqual(board());
  });

  it("sums a column per currency, and names linked records", () => {
    const column = [record(1, { amount: 100 }), record(2, { amount: 50.5 }), record(3, { amount: 10, currency: "EUR" }), record(4)];
    expect(columnSummary(column)).toBe("4 deals · 150.5 USD + 10 EUR");
    expect(columnSummary([])).toBe("0 deals");
    expect(linkedNames(["a", null, "b"], { a: "Acme" })).toBe("Acme, …");
  });

  it("merges leads, contacts and companies, not deals", () => {
    expect(mayMerge(record(1))).toBe(false);
    expect(mayMerge(record(1, { type: "contact" }))).toBe(true);
  });
});
