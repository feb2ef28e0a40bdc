// Tasks: the rules of the task list and the task page, as plain functions. No Vue, no DOM.
//
// - the colour of a task name follows its state (`taskColour`);
// - the list is filtered by role and status the way the hub's `GET /tasks?role=&status=`
//   filters (`filterTasks`), grouped by workgroup with subtasks folded under their parent
//   (`groupTasks`);
// - live events (`task.updated`, `task.removed`) and full reloads are merged so that an
//   older copy never replaces a newer one (`upsertTask`, `removeTask`, `replaceTasks`);
// - the counters beside the filters and on the Tasks badge come from the hub's task counters
//   (server/tasks/rules.py `counters_for`), never from counting the list (`tasksBadge`,
//   `roleAttention`, `statusCount`).

import type {
  RoleCounters,
  Task,
  TaskComment,
  TaskCounters,
  TaskCreate,
  TaskHistoryEntry,
  TaskPriority,
  TaskStatusName,
  TaskUpdate,
  User,
} from "./types";

// --- state and colour ------------------------------------------------------------------------

/** The statuses in which the work is still to do: only these can be overdue (rules.OPEN_STATUSES). */
export const OPEN_STATUSES: ReadonlySet<TaskStatusName> = new Set(["new", "pending", "in_progress"]);

export const STATUS_LABELS: Record<TaskStatusName, string> = {
  new: "New (not accepted)",
  pending: "Accepted",
  in_progress: "In progress",
  awaiting_control: "Awaiting control",
  completed: "Completed",
  deferred: "Deferred",
  declined: "Declined",
};

export const PRIORITY_LABELS: Record<TaskPriority, string> = { low: "Low", medium: "Medium", high: "High" };

export function isOpen(task: Task): boolean {
  return OPEN_STATUSES.has(task.status_name);
}

/**
 * Whether the task is late now: the hub's `overdue` flag, or - between the hub's own
 * notices - an open task whose deadline has passed on the clock (rules.is_overdue).
 */
export function isOverdue(task: Task, now: number): boolean {
  if (!isOpen(task)) return false;
  if (task.overdue) return true;
  return task.deadline !== null && now >= Date.parse(task.deadline);
}

export type TaskColour = "new" | "accepted" | "in-progress" | "overdue" | "awaiting" | "done" | "declined";

/**
 * The colour of a task's name:
 *
 * - red: overdue (an open task past its deadline) - before any of the others;
 * - green: new, not accepted yet;
 * - blue: accepted (pending), not started, or returned for completion;
 * - black: in progress;
 * - violet: handed in, awaiting the author's control (neither in work nor finished);
 * - grey: completed or deferred;
 * - orange: declined.
 */
export function taskColour(task: Task, now: number): TaskColour {
  if (isOverdue(task, now)) return "overdue";
  switch (task.status_name) {
    case "new":
      return "new";
    case "pending":
      return "accepted";
    case "in_progress":
      return "in-progress";
    case "awaiting_control":
      return "awaiting";
    case "declined":
      return "declined";
    default:
      return "done";
  }
}

export const COLOUR_LEGEND: { colour: TaskColour; label: string }[] = [
  { colour: "new", label: "new, not accepted" },
  { colour: "accepted", label: "accepted" },
  { colour: "in-progress", label: "in progress" },
  { colour: "awaiting", label: "awaiting control" },
  { colour: "overdue", label: "overdue" },
  { colour: "done", label: "completed or deferred" },
  { colour: "declined", label: "declined" },
];

// --- filters ---------------------------------------------------------------------------------

export type RoleFilter = "responsible" | "participant" | "observer" | "author" | "all";

export const ROLE_FILTERS: { key: RoleFilter; label: string }[] = [
  { key: "responsible", label: "Doing" },
  { key: "participant", label: "Helping" },
  { key: "observer", label: "Following" },
  { key: "author", label: "Set by me" },
  { key: "all", label: "All" },
];

export type StatusFilter =
  | "all"
  | "open"
  | "overdue"
  | "awaiting_control"
  | "deferred"
  | "completed"
  | "declined";

export const STATUS_FILTERS: { key: StatusFilter; label: string }[] = [
  { key: "all", label: "All statuses" },
  { key: "open", label: "Open" },
  { key: "overdue", label: "Overdue" },
  { key: "awaiting_control", label: "Awaiting control" },
  { key: "deferred", label: "Deferred" },
  { key: "completed", label: "Completed" },
  { key: "declined", label: "Declined" },
];

/**
 * Whether the hub tells me of the task's changes: it sends `task.updated` to the people on
 * the task, the heads above its responsible person and the members of a workgroup that shows
 * its tasks (server/tasks/service.py `viewers_of`) - not to an administrator who is none of
 * these. Such tasks would go stale in a live list, so "All" leaves them out.
 */
export function isFollowedLive(task: Task): boolean {
  return task.my_roles.some((r) => r !== "admin");
}

/**
 * The role filter as the hub's `role=` applies it: the stored role, whoever else one is.
 * "All" is every task I am on, head above or see through a workgroup (see `isFollowedLive`).
 */
export function hasRole(task: Task, role: RoleFilter): boolean {
  return role === "all" ? isFollowedLive(task) : task.my_roles.includes(role);
}

/** The status filter as the hub's `status=` applies it (`open`: new, pending, in progress). */
export function hasStatus(task: Task, status: StatusFilter, now: number): boolean {
  switch (status) {
    case "all":
      return true;
    case "open":
      return isOpen(task);
    case "overdue":
      return isOverdue(task, now);
    default:
      return task.status_name === status;
  }
}

/** A search in the list: every word of the query in the title (case and accents ignored). */
export function matchesSearch(task: Task, query: string): boolean {
  const words = fold(query).split(/\s+/).filter(Boolean);
  if (!words.length) return true;
  const title = fold(task.title);
  return words.every((w) => title.includes(w));
}

function fold(text: string): string {
  return text.normalize("NFD").replace(/[\u0300-\u036f]/g, "").toLowerCase();
}

export function filterTasks(tasks: Iterable<Task>, role: RoleFilter, status: StatusFilter, now: number): Task[] {
  const out: Task[] = [];
  for (const t of tasks) if (hasRole(t, role) && hasStatus(t, status, now)) out.push(t);
  return out;
}

// --- counters --------------------------------------------------------------------------------

type Counter = keyof RoleCounters;

const ALL_COUNTERS: Counter[] = [
  "new",
  "in_progress",
  "awaiting_control",
  "overdue",
  "expiring_soon",
  "without_deadline",
  "deferred",
  "new_comments",
];

/** Which counters mean something in which role (rules.COUNTERS_BY_ROLE); `all` reads `total`. */
export const COUNTERS_BY_ROLE: Record<RoleFilter, ReadonlySet<Counter>> = {
  responsible: new Set(ALL_COUNTERS.filter((c) => c !== "awaiting_control")),
  participant: new Set(ALL_COUNTERS.filter((c) => c !== "awaiting_control")),
  observer: new Set<Counter>(["new", "in_progress", "overdue", "new_comments"]),
  author: new Set<Counter>(["in_progress", "awaiting_control", "overdue", "deferred", "new_comments"]),
  all: new Set(ALL_COUNTERS),
};

export function emptyRoleCounters(): RoleCounters {
  return {
    new: 0,
    in_progress: 0,
    awaiting_control: 0,
    overdue: 0,
    expiring_soon: 0,
    without_deadline: 0,
    deferred: 0,
    new_comments: 0,
  };
}

export function emptyTaskCounters(): TaskCounters {
  return {
    responsible: emptyRoleCounters(),
    participant: emptyRoleCounters(),
    observer: emptyRoleCounters(),
    author: emptyRoleCounters(),
    total: emptyRoleCounters(),
  };
}

function roleCountersFrom(value: unknown): RoleCounters {
  const out = emptyRoleCounters();
  if (typeof value !== "object" || value === null) return out;
  const raw = value as Record<string, unknown>;
  for (const c of ALL_COUNTERS) {
    const n = Number(raw[c]);
    out[c] = Number.isFinite(n) && n > 0 ? n : 0;
  }
  return out;
}

/** The hub's task counters as they are, every field present (missing ones are 0). */
export function normalizeTaskCounters(value: unknown): TaskCounters {
  const raw = (typeof value === "object" && value !== null ? value : {}) as Record<string, unknown>;
  return {
    responsible: roleCountersFrom(raw.responsible),
    participant: roleCountersFrom(raw.participant),
    observer: roleCountersFrom(raw.observer),
    author: roleCountersFrom(raw.author),
    total: roleCountersFrom(raw.total),
  };
}

/**
 * `counters.changed` (or the snapshot's `counters`) carries one key per module - `im`,
 * `tasks` - and a push for one module leaves the others out: take `tasks` when it is there,
 * keep what we have otherwise.
 */
export function applyTaskCounters(current: TaskCounters, payload: unknown): TaskCounters {
  if (typeof payload !== "object" || payload === null) return current;
  const tasks = (payload as Record<string, unknown>).tasks;
  if (typeof tasks !== "object" || tasks === null) return current;
  return normalizeTaskCounters(tasks);
}

function countersOf(counters: TaskCounters, role: RoleFilter): RoleCounters {
  return role === "all" ? counters.total : counters[role];
}

/**
 * The Tasks badge in the top bar: what waits for me to act -
 * tasks I am responsible for and have not opened yet (`responsible.new`),
 * + tasks I am responsible for that are past their deadline (`responsible.overdue`),
 * + work handed in to me for approval (`author.awaiting_control`).
 * A task both unseen and late counts twice, as the hub's counters count it in both.
 * Helping, following and the lateness of what I set for others stay on the filters.
 */
export function tasksBadge(counters: TaskCounters): number {
  return counters.responsible.new + counters.responsible.overdue + counters.author.awaiting_control;
}

/**
 * The number beside a role filter: what needs attention in that role - unseen tasks, late
 * ones and work awaiting my control (the hub keeps the counters that do not apply to a role
 * at 0, e.g. `new` for the author, `awaiting_control` for the responsible person).
 */
export function roleAttention(counters: TaskCounters, role: RoleFilter): number {
  const c = countersOf(counters, role);
  return c.new + c.overdue + c.awaiting_control;
}

/** Which counter stands beside a status filter, if any. */
const STATUS_COUNTER: Partial<Record<StatusFilter, Counter>> = {
  open: "in_progress", // the hub's "in progress" counter counts all open tasks
  overdue: "overdue",
  awaiting_control: "awaiting_control",
  deferred: "deferred",
};

/**
 * The number beside a status filter, from the selected role's counters; undefined where
 * no counter exists (completed, declined, all) or it means nothing in that role.
 */
export function statusCount(counters: TaskCounters, role: RoleFilter, status: StatusFilter): number | undefined {
  const counter = STATUS_COUNTER[status];
  if (!counter || !COUNTERS_BY_ROLE[role].has(counter)) return undefined;
  return countersOf(counters, role)[counter];
}

// --- the list: live events and reloads -------------------------------------------------------

export type TaskMap = Record<string, Task>;

function time(iso: string): number {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? 0 : t;
}

/**
 * A task arrived (task.updated, a REST answer): it replaces the known copy unless that one
 * is newer. At the same `updated_at` the later arrival wins: it may carry a change that
 * does not move `updated_at` (seen marks, the deadline passing).
 */
export function upsertTask(tasks: TaskMap, task: Task): TaskMap {
  const known = tasks[task.id];
  if (known && time(known.updated_at) > time(task.updated_at)) return tasks;
  return { ...tasks, [task.id]: task };
}

/** task.removed: deleted, or no longer visible to me. */
export function removeTask(tasks: TaskMap, taskId: string): TaskMap {
  if (!(taskId in tasks)) return tasks;
  const next = { ...tasks };
  delete next[taskId];
  return next;
}

/** What live events did to a task while a full reload was on its way. */
export type Touch = { kind: "updated"; task: Task } | { kind: "removed" };

/**
 * A full reload: the loaded list is the truth, except for what live events changed while it
 * was loading - a task updated (or created) meanwhile keeps its newer copy, one removed
 * meanwhile stays removed.
 */
export function replaceTasks(loaded: readonly Task[], touched: ReadonlyMap<string, Touch>): TaskMap {
  let tasks: TaskMap = {};
  for (const t of loaded) tasks[t.id] = t;
  for (const [id, touch] of touched) {
    tasks = touch.kind === "removed" ? removeTask(tasks, id) : upsertTask(tasks, touch.task);
  }
  return tasks;
}

// --- grouping and folding --------------------------------------------------------------------

export const NO_WORKGROUP = "No workgroup";

export interface TaskRow {
  task: Task;
  /** 0 for a top-level task, 1 for its subtasks, ... */
  depth: number;
  /** Its subtasks among the tasks shown. */
  childCount: number;
  expanded: boolean;
}

export interface TaskGroup {
  /** The workgroup id; null for "No workgroup". */
  id: string | null;
  name: string;
  rows: TaskRow[];
  /** Every task in the group, folded ones included. */
  count: number;
}

function newestFirst(a: Task, b: Task): number {
  return time(b.created_at) - time(a.created_at) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0);
}

function oldestFirst(a: Task, b: Task): number {
  return -newestFirst(a, b);
}

/**
 * The shown tasks grouped by workgroup (by name; "No workgroup" last). A subtask is folded
 * under its parent when the parent is shown too, and listed at the top level otherwise (its
 * parent filtered out or not visible to me); it goes with its top-level task's workgroup.
 * Top-level tasks newest first, subtasks in the order they were made. Only the subtasks of
 * `expanded` tasks are in `rows`.
 */
export function groupTasks(
  tasks: readonly Task[],
  groupNames: Record<string, string>,
  expanded: ReadonlySet<string>,
): TaskGroup[] {
  const shown = new Map(tasks.map((t) => [t.id, t]));
  const children = new Map<string, Task[]>();
  const roots: Task[] = [];
  for (const t of tasks) {
    const parent = t.parent_id;
    if (parent && parent !== t.id && shown.has(parent) && !inCycle(t, shown)) {
      const list = children.get(parent) ?? [];
      list.push(t);
      children.set(parent, list);
    } else {
      roots.push(t);
    }
  }
  roots.sort(newestFirst);
  for (const list of children.values()) list.sort(oldestFirst);

  const groups = new Map<string, TaskGroup>();
  for (const root of roots) {
    const key = root.group_id ?? "";
    let group = groups.get(key);
    if (!group) {
      const name = root.group_id ? (groupNames[root.group_id] ?? "Other workgroup") : NO_WORKGROUP;
      group = { id: root.group_id, name, rows: [], count: 0 };
      groups.set(key, group);
    }
    const walk = (task: Task, depth: number, visible: boolean) => {
      const kids = children.get(task.id) ?? [];
      const open = expanded.has(task.id);
      group.count += 1;
      if (visible) group.rows.push({ task, depth, childCount: kids.length, expanded: open });
      for (const kid of kids) walk(kid, depth + 1, visible && open);
    };
    walk(root, 0, true);
  }
  return [...groups.values()].sort((a, b) => {
    if (a.id === null || b.id === null) return a.id === null ? (b.id === null ? 0 : 1) : -1;
    return a.name.localeCompare(b.name) || (a.id < b.id ? -1 : 1);
  });
}

/** Whether following the parents from `task` (within the shown ones) comes back to it: such
 * a task is listed at the top level, so that a broken parent chain cannot hide it. */
function inCycle(task: Task, shown: ReadonlyMap<string, Task>): boolean {
  const seen = new Set<string>([task.id]);
  let parent = task.parent_id ? shown.get(task.parent_id) : undefined;
  while (parent) {
    if (seen.has(parent.id)) return parent.id === task.id;
    seen.add(parent.id);
    parent = parent.parent_id ? shown.get(parent.parent_id) : undefined;
  }
  return false;
}

/** The direct subtasks of a task among the known ones, in the order they were made. */
export function subtasksOf(tasks: Iterable<Task>, taskId: string): Task[] {
  const out: Task[] = [];
  for (const t of tasks) if (t.parent_id === taskId && t.id !== taskId) out.push(t);
  return out.sort(oldestFirst);
}

// --- the task page ---------------------------------------------------------------------------

export interface ActionButton {
  action: string;
  label: string;
  kind: "primary" | "normal" | "danger";
}

const ACTIONS: ActionButton[] = [
  { action: "accept", label: "Accept", kind: "primary" },
  { action: "start", label: "Start", kind: "primary" },
  { action: "resume", label: "Resume", kind: "primary" },
  { action: "complete", label: "Complete", kind: "primary" },
  { action: "approve", label: "Approve", kind: "primary" },
  { action: "return", label: "Return for completion", kind: "normal" },
  { action: "pause", label: "Pause", kind: "normal" },
  { action: "decline", label: "Decline", kind: "normal" },
  { action: "defer", label: "Defer", kind: "normal" },
  { action: "reopen", label: "Reopen", kind: "normal" },
  { action: "copy", label: "Copy", kind: "normal" },
  { action: "delete", label: "Delete", kind: "danger" },
];

/**
 * The buttons of the task page: exactly the actions the hub allows me now
 * (`allowed_actions`), in workflow order. `edit` and `comment` are not actions to press
 * (they are the edit form and the comment box); unknown ones are left out.
 */
export function actionButtons(allowed: readonly string[]): ActionButton[] {
  const set = new Set(allowed);
  return ACTIONS.filter((a) => set.has(a.action));
}

/** Seconds spent on the task: the stored total plus the running timer. */
export function timeSpent(task: Task, now: number): number {
  let seconds = task.time_spent_seconds;
  if (task.timer_started_at) seconds += Math.max(0, Math.floor((now - time(task.timer_started_at)) / 1000));
  return seconds;
}

/** "0:00:00": hours, minutes, seconds. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}

/** Comments in the order they were posted, each once (history loads and live events meet). */
export function mergeComments(known: readonly TaskComment[], incoming: readonly TaskComment[]): TaskComment[] {
  const byId = new Map(known.map((c) => [c.id, c]));
  for (const c of incoming) byId.set(c.id, c);
  return [...byId.values()].sort((a, b) => time(a.created_at) - time(b.created_at) || (a.id < b.id ? -1 : 1));
}

const ACTION_DONE: Record<string, string> = {
  accept: "accepted the task",
  decline: "declined the task",
  start: "started work on the task",
  pause: "paused the work",
  resume: "resumed the task",
  complete: "completed the task",
  approve: "approved the result",
  return: "returned the task for completion",
  reopen: "reopened the task",
  defer: "deferred the task",
};

const FIELD_LABELS: Record<string, string> = {
  title: "the title",
  description: "the description",
  priority: "the priority",
  tags: "the tags",
  participant_ids: "the participants",
  observer_ids: "the observers",
  responsible_id: "the responsible person",
  group_id: "the workgroup",
  deadline: "the deadline",
  planned_start: "the planned start",
  planned_end: "the planned end",
  require_approval: "approval of the result",
  responsible_may_change_deadline: "who may move the deadline",
  include_in_report: "the report setting",
  rating: "the rating",
};

/** One line of the task's history, after the name of who did it. */
export function describeHistory(entry: TaskHistoryEntry): string {
  switch (entry.kind) {
    case "created":
      return "created the task";
    case "comment":
      return "commented";
    case "overdue":
      return "The deadline passed";
    case "action": {
      if (entry.action === "complete" && entry.after === "awaiting_control") return "handed the task in for approval";
      return ACTION_DONE[entry.action ?? ""] ?? `did “${entry.action ?? "something"}”`;
    }
    case "field": {
      const label = FIELD_LABELS[entry.field ?? ""] ?? (entry.field ?? "a field");
      if (entry.field === "title" && typeof entry.after === "string") return `renamed the task to “${entry.after}”`;
      if (entry.field === "priority" && typeof entry.after === "string") {
        return `set the priority to ${PRIORITY_LABELS[entry.after as TaskPriority] ?? entry.after}`;
      }
      if (entry.field === "rating") return entry.after ? `rated the result ${String(entry.after)}` : "removed the rating";
      return `changed ${label}`;
    }
    default:
      return entry.kind;
  }
}

// --- the new-task form -----------------------------------------------------------------------

export interface TaskForm {
  title: string;
  description: string;
  responsibleIds: string[];
  participantIds: string[];
  observerIds: string[];
  /** "" for no workgroup */
  groupId: string;
  /** the value of an <input type="datetime-local">, in the browser's time zone; "" for none */
  deadline: string;
  priority: TaskPriority;
  requireApproval: boolean;
  parentId: string | null;
}

export function emptyTaskForm(over: Partial<TaskForm> = {}): TaskForm {
  return {
    title: "",
    description: "",
    responsibleIds: [],
    participantIds: [],
    observerIds: [],
    groupId: "",
    deadline: "",
    priority: "medium",
    requireApproval: false,
    parentId: null,
    ...over,
  };
}

/** A datetime-local value ("2026-05-01T18:00", local time) as ISO 8601 with a zone (UTC). */
export function localToIso(value: string): string | null {
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$/.test(value)) return null;
  const d = new Date(value); // without a zone: the browser's local time
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

/** What is wrong with the form, one line each; empty when it can be sent. */
export function taskFormErrors(form: TaskForm): string[] {
  const errors: string[] = [];
  if (!form.title.trim()) errors.push("Give the task a title.");
  if (form.title.trim().length > 250) errors.push("The title is longer than 250 characters.");
  if (form.responsibleIds.length === 0) errors.push("Choose who is responsible.");
  if (form.deadline && localToIso(form.deadline) === null) errors.push("The deadline is not a valid date and time.");
  return errors;
}

/** The body of `POST /tasks` for a valid form. */
export function taskCreateBody(form: TaskForm): TaskCreate {
  const unique = (ids: string[]) => [...new Set(ids)];
  const body: TaskCreate = {
    title: form.title.trim(),
    description: form.description,
    responsible_ids: unique(form.responsibleIds),
    participant_ids: unique(form.participantIds),
    observer_ids: unique(form.observerIds),
    group_id: form.groupId || null,
    priority: form.priority,
    require_approval: form.requireApproval,
  };
  if (form.deadline) body.deadline = localToIso(form.deadline);
  if (form.parentId) body.parent_id = form.parentId;
  return body;
}

/**
 * People to offer in a picker of the form: active users whose name, login or e-mail holds
 * every word typed, not already chosen; by name, at most `limit`.
 */
export function suggestPeople(
  users: Iterable<User>,
  query: string,
  chosen: readonly string[],
  limit = 8,
): User[] {
  const words = fold(query).split(/\s+/).filter(Boolean);
  const taken = new Set(chosen);
  const out: User[] = [];
  for (const u of users) {
    if (!u.is_active || taken.has(u.id)) continue;
    const text = fold(`${u.name} ${u.login} ${u.email}`);
    if (words.every((w) => text.includes(w))) out.push(u);
  }
  return out.sort((a, b) => a.name.localeCompare(b.name)).slice(0, limit);
}

// --- editing a task -----------------------------------------------------------------------------

/** A deadline (datetime-local value) that has already passed: the task would be late at once. */
export function deadlineInPast(deadline: string, now: number): boolean {
  const iso = deadline ? localToIso(deadline) : null;
  return iso !== null && Date.parse(iso) <= now;
}

/** An ISO moment as the value of an <input type="datetime-local"> in the browser's time. */
export function isoToLocal(iso: string | null | undefined): string {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export interface TaskEditForm {
  title: string;
  description: string;
  responsibleId: string;
  participantIds: string[];
  observerIds: string[];
  groupId: string;
  deadline: string;
  priority: TaskPriority;
  requireApproval: boolean;
  responsibleMayChangeDeadline: boolean;
}

/** The edit form of a task, filled from it. */
export function editFormOf(task: Task): TaskEditForm {
  return {
    title: task.title,
    description: task.description,
    responsibleId: task.responsible_id,
    participantIds: [...task.participant_ids],
    observerIds: [...task.observer_ids],
    groupId: task.group_id ?? "",
    deadline: isoToLocal(task.deadline),
    priority: task.priority,
    requireApproval: task.require_approval,
    responsibleMayChangeDeadline: task.responsible_may_change_deadline,
  };
}

/** Which PATCH field each form field is (the hub's `editable_fields` names). */
export const EDIT_FIELDS: Record<keyof TaskEditForm, string> = {
  title: "title",
  description: "description",
  responsibleId: "responsible_id",
  participantIds: "participant_ids",
  observerIds: "observer_ids",
  groupId: "group_id",
  deadline: "deadline",
  priority: "priority",
  requireApproval: "require_approval",
  responsibleMayChangeDeadline: "responsible_may_change_deadline",
};

/** Whether the caller may change a form field: the hub says so, field by field. */
export function mayEdit(task: Task, field: keyof TaskEditForm): boolean {
  return (task.editable_fields ?? []).includes(EDIT_FIELDS[field]);
}

export function editFormErrors(form: TaskEditForm): string[] {
  const errors: string[] = [];
  if (!form.title.trim()) errors.push("Give the task a title.");
  if (form.title.trim().length > 250) errors.push("The title is longer than 250 characters.");
  if (!form.responsibleId) errors.push("Choose who is responsible.");
  if (form.deadline && localToIso(form.deadline) === null) errors.push("The deadline is not a valid date and time.");
  return errors;
}

function sameIds(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * The body of `PATCH /tasks/{id}`: the fields the form changed that the caller may change.
 * A deadline the form shows unchanged (to the minute) is left as it is.
 */
export function taskPatchBody(task: Task, form: TaskEditForm): TaskUpdate {
  const body: TaskUpdate = {};
  const may = (f: keyof TaskEditForm) => mayEdit(task, f);
  if (may("title") && form.title.trim() !== task.title) body.title = form.title.trim();
  if (may("description") && form.description !== task.description) body.description = form.description;
  if (may("responsibleId") && form.responsibleId && form.responsibleId !== task.responsible_id) {
    body.responsible_id = form.responsibleId;
  }
  const participants = [...new Set(form.participantIds)];
  if (may("participantIds") && !sameIds(participants, task.participant_ids)) body.participant_ids = participants;
  const observers = [...new Set(form.observerIds)];
  if (may("observerIds") && !sameIds(observers, task.observer_ids)) body.observer_ids = observers;
  if (may("groupId") && (form.groupId || null) !== task.group_id) body.group_id = form.groupId || null;
  if (may("deadline") && form.deadline !== isoToLocal(task.deadline)) {
    body.deadline = form.deadline ? localToIso(form.deadline) : null;
  }
  if (may("priority") && form.priority !== task.priority) body.priority = form.priority;
  if (may("requireApproval") && form.requireApproval !== task.require_approval) {
    body.require_approval = form.requireApproval;
  }
  if (may("responsibleMayChangeDeadline") && form.responsibleMayChangeDeadline !== task.responsible_may_change_deadline) {
    body.responsible_may_change_deadline = form.responsibleMayChangeDeadline;
  }
  return body;
}
