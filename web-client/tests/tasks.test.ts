import { describe, expect, it } from "vitest";
import {
  actionButtons,
  applyTaskCounters,
  describeHistory,
  emptyRoleCounters,
  emptyTaskCounters,
  emptyTaskForm,
  filterTasks,
  formatDuration,
  groupTasks,
  isOverdue,
  localToIso,
  matchesSearch,
  mergeComments,
  NO_WORKGROUP,
  normalizeTaskCounters,
  removeTask,
  replaceTasks,
  roleAttention,
  statusCount,
  subtasksOf,
  suggestPeople,
  taskColour,
  taskCreateBody,
  taskFormErrors,
  tasksBadge,
  timeSpent,
  upsertTask,
  type TaskMap,
  type Touch,
  deadlineInPast,
  editFormOf,
  isoToLocal,
  mayEdit,
  taskPatchBody,
} from "../src/core/tasks";
import type { RoleCounters, Task, TaskComment, TaskCounters, TaskStatusName, User } from "../src/core/types";
import { task } from "./fixtures";

const NOW = Date.parse("2026-03-10T12:00:00Z");
const STATUS_CODES: Record<TaskStatusName, number> = {
  new: 1,
  pending: 2,
  in_progress: 3,
  awaiting_control: 4,
  completed: 5,
  deferred: 6,
  declined: 7,
};

function inStatus(status_name: TaskStatusName, over: Partial<Task> = {}): Task {
  return task(`t-${status_name}`, { status_name, status: STATUS_CODES[status_name], ...over });
}

describe("taskColour", () => {
  it("colours each state", () => {
    expect(taskColour(inStatus("new"), NOW)).toBe("new");
    expect(taskColour(inStatus("pending"), NOW)).toBe("accepted");
    expect(taskColour(inStatus("in_progress"), NOW)).toBe("in-progress");
    expect(taskColour(inStatus("awaiting_control"), NOW)).toBe("awaiting");
    expect(taskColour(inStatus("completed"), NOW)).toBe("done");
    expect(taskColour(inStatus("deferred"), NOW)).toBe("done");
    expect(taskColour(inStatus("declined"), NOW)).toBe("declined");
  });

  it("shows an open task past its deadline as overdue, whatever its status", () => {
    const past = "2026-03-10T11:59:59Z";
    for (const s of ["new", "pending", "in_progress"] as const) {
      expect(taskColour(inStatus(s, { deadline: past }), NOW)).toBe("overdue");
    }
    // the deadline itself is already late (rules.is_overdue: now >= deadline)
    expect(taskColour(inStatus("pending", { deadline: "2026-03-10T12:00:00Z" }), NOW)).toBe("overdue");
    expect(taskColour(inStatus("pending", { deadline: "2026-03-10T12:00:01Z" }), NOW)).toBe("accepted");
  });

  it("trusts the hub's overdue flag for open tasks only", () => {
    expect(taskColour(inStatus("in_progress", { overdue: true }), NOW)).toBe("overdue");
    // a stale flag on work that is finished, handed in or deferred does not make it late
    for (const s of ["awaiting_control", "completed", "deferred", "declined"] as const) {
      const t = inStatus(s, { overdue: true, deadline: "2026-01-01T00:00:00Z" });
      expect(isOverdue(t, NOW)).toBe(false);
      expect(taskColour(t, NOW)).not.toBe("overdue");
    }
  });
});

describe("filters", () => {
  const list = [
    task("a", { my_roles: ["responsible"], status_name: "in_progress", status: 3 }),
    task("b", { my_roles: ["author", "responsible"], status_name: "pending", status: 2, deadline: "2026-03-01T00:00:00Z" }),
    task("c", { my_roles: ["author"], status_name: "awaiting_control", status: 4 }),
    task("d", { my_roles: ["observer"], status_name: "completed", status: 5 }),
    task("e", { my_roles: ["participant"], status_name: "deferred", status: 6 }),
    task("f", { my_roles: ["supervisor"], status_name: "new", status: 1 }),
  ];
  const ids = (ts: Task[]) => ts.map((t) => t.id).sort();

  it("filters by my role as the hub does (any role I hold)", () => {
    expect(ids(filterTasks(list, "responsible", "all", NOW))).toEqual(["a", "b"]);
    expect(ids(filterTasks(list, "author", "all", NOW))).toEqual(["b", "c"]);
    expect(ids(filterTasks(list, "participant", "all", NOW))).toEqual(["e"]);
    expect(ids(filterTasks(list, "observer", "all", NOW))).toEqual(["d"]);
    expect(ids(filterTasks(list, "all", "all", NOW))).toEqual(["a", "b", "c", "d", "e", "f"]);
  });

  it("leaves out of All what only an administrator sees (the hub sends no changes of it)", () => {
    const adminOnly = task("z", { my_roles: ["admin"] });
    const adminAndAuthor = task("y", { my_roles: ["admin", "author"] });
    expect(ids(filterTasks([...list, adminOnly, adminAndAuthor], "all", "all", NOW))).toEqual([
      "a",
      "b",
      "c",
      "d",
      "e",
      "f",
      "y",
    ]);
  });

  it("filters by status; open means new, pending or in progress", () => {
    expect(ids(filterTasks(list, "all", "open", NOW))).toEqual(["a", "b", "f"]);
    expect(ids(filterTasks(list, "all", "overdue", NOW))).toEqual(["b"]);
    expect(ids(filterTasks(list, "all", "awaiting_control", NOW))).toEqual(["c"]);
    expect(ids(filterTasks(list, "all", "completed", NOW))).toEqual(["d"]);
    expect(ids(filterTasks(list, "all", "deferred", NOW))).toEqual(["e"]);
    expect(ids(filterTasks(list, "all", "declined", NOW))).toEqual([]);
    expect(ids(filterTasks(list, "author", "overdue", NOW))).toEqual(["b"]);
  });

  it("finds a task by the words of its title", () => {
    const t = task("x", { title: "Prepare the Q3 réport for Berlin" });
    expect(matchesSearch(t, "")).toBe(true);
    expect(matchesSearch(t, "report berlin")).toBe(true);
    expect(matchesSearch(t, "q3 paris")).toBe(false);
  });
});

function counters(over: Partial<Record<keyof TaskCounters, Partial<RoleCounters>>>): TaskCounters {
  const c = emptyTaskCounters();
  for (const [role, values] of Object.entries(over)) Object.assign(c[role as keyof TaskCounters], values);
  return c;
}

describe("counters", () => {
  it("the badge is responsible new + responsible overdue + author awaiting control", () => {
    const c = counters({
      responsible: { new: 2, overdue: 1, in_progress: 9, expiring_soon: 4 },
      author: { awaiting_control: 3, overdue: 5, in_progress: 7 },
      participant: { new: 6, overdue: 6 },
      observer: { new: 8 },
      total: { new: 10, overdue: 10, awaiting_control: 10 },
    });
    expect(tasksBadge(c)).toBe(6);
    expect(tasksBadge(emptyTaskCounters())).toBe(0);
  });

  it("a role filter shows what needs attention in that role", () => {
    const c = counters({
      responsible: { new: 2, overdue: 1, in_progress: 9 },
      author: { awaiting_control: 3, overdue: 5 },
      total: { new: 2, overdue: 6, awaiting_control: 3 },
    });
    expect(roleAttention(c, "responsible")).toBe(3);
    expect(roleAttention(c, "author")).toBe(8);
    expect(roleAttention(c, "observer")).toBe(0);
    expect(roleAttention(c, "all")).toBe(11);
  });

  it("a status filter shows the selected role's counter, where there is one for it", () => {
    const c = counters({
      responsible: { in_progress: 4, overdue: 1, deferred: 2 },
      author: { in_progress: 3, awaiting_control: 2, deferred: 1 },
      observer: { in_progress: 5, overdue: 2 },
      total: { in_progress: 12, awaiting_control: 2, overdue: 3, deferred: 3 },
    });
    expect(statusCount(c, "responsible", "open")).toBe(4);
    expect(statusCount(c, "responsible", "overdue")).toBe(1);
    expect(statusCount(c, "responsible", "awaiting_control")).toBeUndefined(); // not the doer's counter
    expect(statusCount(c, "author", "awaiting_control")).toBe(2);
    expect(statusCount(c, "observer", "deferred")).toBeUndefined();
    expect(statusCount(c, "all", "open")).toBe(12);
    expect(statusCount(c, "all", "completed")).toBeUndefined(); // no counter for finished work
    expect(statusCount(c, "all", "all")).toBeUndefined();
  });

  it("takes the tasks part of counters.changed and keeps it when only im comes", () => {
    const start = counters({ responsible: { new: 1 } });
    const imOnly = applyTaskCounters(start, { im: { unread: 3, chats: { c: 3 } } });
    expect(imOnly).toBe(start);
    const pushed = applyTaskCounters(start, { tasks: { responsible: { new: 0, overdue: 2 }, author: {}, total: { overdue: 2 } } });
    expect(pushed.responsible).toEqual({ ...emptyRoleCounters(), overdue: 2 });
    expect(pushed.total.overdue).toBe(2);
    expect(pushed.participant).toEqual(emptyRoleCounters()); // missing parts are zero, not undefined
    expect(applyTaskCounters(start, undefined)).toBe(start);
    expect(normalizeTaskCounters({ total: { new: -1, overdue: "x" } }).total).toEqual(emptyRoleCounters());
  });
});

describe("applying events to the list", () => {
  const base = task("a", { updated_at: "2026-03-01T10:00:00.000Z" });

  it("task.updated inserts a task and replaces an older copy", () => {
    let m: TaskMap = {};
    m = upsertTask(m, base);
    expect(m.a).toBe(base);
    const started = { ...base, status_name: "in_progress" as const, status: 3, updated_at: "2026-03-01T10:05:00.000Z" };
    m = upsertTask(m, started);
    expect(m.a?.status_name).toBe("in_progress");
  });

  it("never lets an older copy replace a newer one", () => {
    const newer = { ...base, title: "renamed", updated_at: "2026-03-01T11:00:00.000Z" };
    const m = upsertTask({ a: newer }, base);
    expect(m.a?.title).toBe("renamed");
  });

  it("takes the later arrival at the same updated_at (seen marks, the deadline passing)", () => {
    const seen = { ...base, unseen_updates: 0 };
    const m = upsertTask({ a: { ...base, unseen_updates: 2 } }, seen);
    expect(m.a?.unseen_updates).toBe(0);
    const late = upsertTask(m, { ...base, overdue: true });
    expect(late.a?.overdue).toBe(true);
  });

  it("task.removed drops the task; unknown ids change nothing", () => {
    const m = { a: base, b: task("b") };
    expect(Object.keys(removeTask(m, "a"))).toEqual(["b"]);
    expect(removeTask(m, "zzz")).toBe(m);
  });

  it("a full reload keeps what live events changed while it loaded", () => {
    const loaded = [base, task("b"), task("c")];
    const touched = new Map<string, Touch>([
      ["a", { kind: "updated", task: { ...base, title: "live", updated_at: "2026-03-01T12:00:00.000Z" } }],
      ["b", { kind: "removed" }],
      ["n", { kind: "updated", task: task("n") }], // created meanwhile
    ]);
    const m = replaceTasks(loaded, touched);
    expect(Object.keys(m).sort()).toEqual(["a", "c", "n"]);
    expect(m.a?.title).toBe("live");
    // tasks no longer in the answer are gone
    expect(replaceTasks([task("c")], new Map())).toEqual({ c: task("c") });
  });

  it("a reload newer than a live copy wins", () => {
    const fresh = { ...base, title: "fresh", updated_at: "2026-03-02T00:00:00.000Z" };
    const m = replaceTasks([fresh], new Map([["a", { kind: "updated", task: base } as Touch]]));
    expect(m.a?.title).toBe("fresh");
  });

  it("merges comments from loads and events once each, in order", () => {
    const c = (id: string, at: string): TaskComment => ({ id, task_id: "a", author_id: "u", text: id, created_at: at });
    const one = c("1", "2026-03-01T10:00:00Z");
    const two = c("2", "2026-03-01T10:01:00Z");
    const three = c("3", "2026-03-01T10:02:00Z");
    expect(mergeComments([one, three], [two, three]).map((x) => x.id)).toEqual(["1", "2", "3"]);
  });
});

describe("grouping and folding", () => {
  const names = { g1: "Website relaunch", g2: "Audit" };
  const at = (min: number) => new Date(Date.UTC(2026, 2, 1, 9, min)).toISOString();
  const master = task("m", { group_id: "g1", created_at: at(1), title: "Master" });
  const copy1 = task("c1", { group_id: "g1", parent_id: "m", created_at: at(2) });
  const copy2 = task("c2", { group_id: "g1", parent_id: "m", created_at: at(3) });
  const grandchild = task("gc", { group_id: "g1", parent_id: "c1", created_at: at(4) });
  const audit = task("au", { group_id: "g2", created_at: at(5) });
  const loose = task("lo", { created_at: at(6) });
  const older = task("ol", { created_at: at(0) });
  const all = [copy2, grandchild, loose, master, copy1, audit, older];

  it("groups by workgroup name, No workgroup last", () => {
    const groups = groupTasks(all, names, new Set());
    expect(groups.map((g) => g.name)).toEqual(["Audit", "Website relaunch", NO_WORKGROUP]);
    expect(groups.map((g) => g.count)).toEqual([1, 4, 2]);
    // newest first at the top level
    expect(groups[2]?.rows.map((r) => r.task.id)).toEqual(["lo", "ol"]);
  });

  it("folds subtasks under their parent until it is expanded", () => {
    const folded = groupTasks(all, names, new Set())[1];
    expect(folded?.rows.map((r) => [r.task.id, r.depth, r.childCount, r.expanded])).toEqual([["m", 0, 2, false]]);
    const open = groupTasks(all, names, new Set(["m"]))[1];
    expect(open?.rows.map((r) => [r.task.id, r.depth, r.childCount])).toEqual([
      ["m", 0, 2],
      ["c1", 1, 1],
      ["c2", 1, 0],
    ]);
    const deep = groupTasks(all, names, new Set(["m", "c1"]))[1];
    expect(deep?.rows.map((r) => [r.task.id, r.depth])).toEqual([
      ["m", 0],
      ["c1", 1],
      ["gc", 2],
      ["c2", 1],
    ]);
    // an expanded child under a folded parent stays hidden
    const hidden = groupTasks(all, names, new Set(["c1"]))[1];
    expect(hidden?.rows.map((r) => r.task.id)).toEqual(["m"]);
  });

  it("lists a subtask at the top level when its parent is not shown", () => {
    const groups = groupTasks([copy1, copy2, audit], names, new Set());
    const relaunch = groups.find((g) => g.id === "g1");
    expect(relaunch?.rows.map((r) => [r.task.id, r.depth])).toEqual([
      ["c2", 0],
      ["c1", 0],
    ]);
  });

  it("puts a subtask in its top-level task's group, and names unknown groups", () => {
    const child = task("x", { group_id: null, parent_id: "au", created_at: at(9) });
    const unknown = task("u", { group_id: "g9" });
    const groups = groupTasks([audit, child, unknown], names, new Set(["au"]));
    expect(groups.map((g) => [g.name, g.rows.map((r) => r.task.id)])).toEqual([
      ["Audit", ["au", "x"]],
      ["Other workgroup", ["u"]],
    ]);
  });

  it("survives a parent cycle without losing a task", () => {
    const a = task("a", { parent_id: "b" });
    const b = task("b", { parent_id: "a" });
    const c = task("c", { parent_id: "a" });
    const rows = groupTasks([a, b, c], {}, new Set(["a", "b"]))[0]?.rows.map((r) => r.task.id) ?? [];
    expect([...rows].sort()).toEqual(["a", "b", "c"]);
  });

  it("lists a task's subtasks in the order they were made", () => {
    expect(subtasksOf(all, "m").map((t) => t.id)).toEqual(["c1", "c2"]);
  });
});

describe("the task page", () => {
  it("offers exactly the allowed actions, in workflow order, without edit and comment", () => {
    expect(actionButtons(["start", "comment", "copy", "accept", "edit", "decline"]).map((b) => b.action)).toEqual([
      "accept",
      "start",
      "decline",
      "copy",
    ]);
    expect(actionButtons(["approve", "return", "delete"]).map((b) => b.action)).toEqual(["approve", "return", "delete"]);
    expect(actionButtons(["comment", "frobnicate"])).toEqual([]);
  });

  it("adds the running timer to the time spent", () => {
    const t = task("a", { time_spent_seconds: 3600, timer_started_at: "2026-03-10T11:58:30Z" });
    expect(timeSpent(t, NOW)).toBe(3690);
    expect(timeSpent({ ...t, timer_started_at: null }, NOW)).toBe(3600);
    expect(formatDuration(3690)).toBe("1:01:30");
    expect(formatDuration(59)).toBe("0:00:59");
    expect(formatDuration(-5)).toBe("0:00:00");
  });

  it("describes the history", () => {
    const h = { id: "1", task_id: "a", user_id: "u", at: "2026-03-01T10:00:00Z" };
    expect(describeHistory({ ...h, kind: "created" })).toBe("created the task");
    expect(describeHistory({ ...h, kind: "action", action: "start", before: "pending", after: "in_progress" })).toBe(
      "started work on the task",
    );
    expect(describeHistory({ ...h, kind: "action", action: "complete", after: "awaiting_control" })).toBe(
      "handed the task in for approval",
    );
    expect(describeHistory({ ...h, kind: "action", action: "complete", after: "completed" })).toBe("completed the task");
    expect(describeHistory({ ...h, kind: "field", field: "deadline", after: "2026-04-01T00:00:00Z" })).toBe(
      "changed the deadline",
    );
    expect(describeHistory({ ...h, kind: "field", field: "priority", after: "high" })).toBe("set the priority to High");
    expect(describeHistory({ ...h, user_id: null, kind: "overdue" })).toBe("The deadline passed");
  });
});

describe("the new-task form", () => {
  it("needs a title and someone responsible", () => {
    expect(taskFormErrors(emptyTaskForm())).toEqual(["Give the task a title.", "Choose who is responsible."]);
    expect(taskFormErrors(emptyTaskForm({ title: "  x ", responsibleIds: ["u"] }))).toEqual([]);
    expect(taskFormErrors(emptyTaskForm({ title: "x", responsibleIds: ["u"], deadline: "tomorrow" }))).toEqual([
      "The deadline is not a valid date and time.",
    ]);
  });

  it("sends the deadline as an instant with a zone", () => {
    const iso = localToIso("2026-05-01T18:30");
    expect(iso).toMatch(/Z$/);
    expect(Date.parse(iso ?? "")).toBe(new Date(2026, 4, 1, 18, 30).getTime());
    expect(localToIso("")).toBeNull();
  });

  it("builds the body of POST /tasks", () => {
    const body = taskCreateBody(
      emptyTaskForm({
        title: "  Launch page  ",
        description: "Copy and images",
        responsibleIds: ["u1", "u2", "u1"],
        participantIds: ["u3"],
        observerIds: ["u4"],
        groupId: "g1",
        deadline: "2026-05-01T18:30",
        priority: "high",
        requireApproval: true,
      }),
    );
    expect(body).toEqual({
      title: "Launch page",
      description: "Copy and images",
      responsible_ids: ["u1", "u2"],
      participant_ids: ["u3"],
      observer_ids: ["u4"],
      group_id: "g1",
      priority: "high",
      require_approval: true,
      deadline: new Date(2026, 4, 1, 18, 30).toISOString(),
    });
    const plain = taskCreateBody(emptyTaskForm({ title: "x", responsibleIds: ["u"], parentId: "p" }));
    expect(plain.group_id).toBeNull();
    expect(plain.parent_id).toBe("p");
    expect("deadline" in plain).toBe(false);
  });

  it("suggests active people not chosen yet, by name", () => {
    const u = (id: string, name: string, is_active = true) =>
      ({ id, name, login: id, email: `${id}@x.test`, is_active }) as User;
    const users = [u("m", "Marco Bianchi"), u("s", "Sarah Kim"), u("o", "Old Marco", false), u("n", "Ana Márquez")];
    expect(suggestPeople(users, "mar", []).map((x) => x.id)).toEqual(["n", "m"]);
    expect(suggestPeople(users, "mar", ["m"]).map((x) => x.id)).toEqual(["n"]);
    expect(suggestPeople(users, "", [], 2).map((x) => x.id)).toEqual(["n", "m"]);
  });
});

describe("editing a task", () => {
  const everything = [
    "deadline", "description", "group_id", "include_in_report", "observer_ids", "participant_ids",
    "planned_end", "planned_start", "priority", "rating", "require_approval", "responsible_id",
    "responsible_may_change_deadline", "tags", "title",
  ];

  it("sends only what changed, and only what the caller may change", () => {
    const t = task("t1", { editable_fields: everything, deadline: "2026-05-01T16:00:00.000Z", participant_ids: ["a"] });
    const form = editFormOf(t);
    expect(taskPatchBody(t, form)).toEqual({});
    form.title = "  New title ";
    form.participantIds = ["a", "b", "b"];
    form.deadline = "";
    expect(taskPatchBody(t, form)).toEqual({ title: "New title", participant_ids: ["a", "b"], deadline: null });
  });

  it("lets a responsible person move the deadline only, when allowed", () => {
    const t = task("t1", { editable_fields: ["deadline"], deadline: null });
    const form = editFormOf(t);
    form.title = "Mine now";
    form.deadline = "2026-06-01T10:30";
    expect(mayEdit(t, "title")).toBe(false);
    expect(mayEdit(t, "deadline")).toBe(true);
    expect(taskPatchBody(t, form)).toEqual({ deadline: new Date("2026-06-01T10:30").toISOString() });
    expect(taskPatchBody(task("t1", { editable_fields: [] }), form)).toEqual({});
  });

  it("sees a deadline that has passed", () => {
    const now = Date.parse("2026-05-01T12:00:00.000Z");
    expect(deadlineInPast(isoToLocal("2026-05-01T11:59:00.000Z"), now)).toBe(true);
    expect(deadlineInPast(isoToLocal("2026-05-01T12:01:00.000Z"), now)).toBe(false);
    expect(deadlineInPast("", now)).toBe(false);
    expect(deadlineInPast("nonsense", now)).toBe(false);
  });
});
