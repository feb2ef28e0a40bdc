// CRM: the rules of the CRM screens, as plain functions. No Vue, no DOM.
//
// - the CRM counters (server/counters/crm.py) arrive whole in the snapshot and in
//   GET /counters, but `counters.changed` carries only the numbers that changed, per record
//   type: they are merged field by field (`applyCrmCounters`), never replacing the object;
// - a counter is shown as a coloured badge - green: incoming, red: due or overdue,
//   red-and-green: both (`badgeView`, `crmNavBadge`);
// - each record of a list shows its activity indicator (`indicatorView`);
// - live events (`crm.record.updated/removed`, `crm.activity.updated/removed`) are applied to
//   the lists on screen, which stay newest first (`applyRecordEvent`, `upsertActivity`, ...);
// - the forms: duplicate probes while typing (`duplicateProbe`, `probeKey`), the bodies of
//   create / update requests, and lead conversion (`CONVERSION_MODES`).

import { ApiError } from "./problem";
import type {
  CrmActivity,
  CrmActivityCreate,
  CrmActivityState,
  CrmActivityType,
  CrmBadge,
  CrmColour,
  CrmConversionMode,
  CrmConvertBody,
  CrmCounters,
  CrmDuplicateMatch,
  CrmDuplicateProbe,
  CrmDuplicates,
  CrmHistoryEntry,
  CrmIndicator,
  CrmMatched,
  CrmRecord,
  CrmRecordBody,
  CrmRecordType,
  CrmStage,
  TypedEmail,
  TypedPhone,
} from "./types";

// --- record types --------------------------------------------------------------------------

/** In the order the CRM shows them (deals first, as the counters do). */
export const RECORD_TYPES: readonly CrmRecordType[] = ["deal", "lead", "contact", "company"];

export const PLURAL: Record<CrmRecordType, string> = {
  lead: "leads",
  contact: "contacts",
  company: "companies",
  deal: "deals",
};

export const TYPE_LABELS: Record<CrmRecordType, string> = {
  lead: "Lead",
  contact: "Contact",
  company: "Company",
  deal: "Deal",
};

export const TYPE_LABELS_PLURAL: Record<CrmRecordType, string> = {
  lead: "Leads",
  contact: "Contacts",
  company: "Companies",
  deal: "Deals",
};

export function isRecordType(value: unknown): value is CrmRecordType {
  return value === "lead" || value === "contact" || value === "company" || value === "deal";
}

export const LEAD_STATUSES: { id: string; name: string }[] = [
  { id: "new", name: "New" },
  { id: "in_progress", name: "In progress" },
  { id: "processed", name: "Processed" },
  { id: "converted", name: "Converted" },
  { id: "junk", name: "Junk" },
];

/** The lead statuses a user may pick; `converted` is set by conversion only. */
export const LEAD_STATUS_CHOICES = LEAD_STATUSES.filter((s) => s.id !== "converted");

export function leadStatusName(status: string | null | undefined): string {
  return LEAD_STATUSES.find((s) => s.id === status)?.name ?? status ?? "";
}

export function stageName(stages: readonly CrmStage[], stageId: string | null | undefined): string {
  if (!stageId) return "";
  return stages.find((s) => s.id === stageId)?.name ?? stageId;
}

/** The status column: a lead's status or a deal's stage; nothing for contacts and companies. */
export function recordStatus(record: CrmRecord, stages: readonly CrmStage[]): string {
  if (record.type === "lead") return leadStatusName(record.status);
  if (record.type === "deal") return stageName(stages, record.stage_id);
  return "";
}

export function formatAmount(amount: number | null | undefined, currency: string | null | undefined): string {
  if (amount === null || amount === undefined) return "";
  const n = amount.toLocaleString("en-US", { maximumFractionDigits: 2 });
  return currency ? `${n} ${currency}` : n;
}

// --- counters ------------------------------------------------------------------------------

export function emptyCrmBadge(): CrmBadge {
  return { incoming: 0, due: 0, overdue: 0, total: 0, idle: 0, colour: "none" };
}

export function emptyCrmCounters(): CrmCounters {
  return { deal: emptyCrmBadge(), lead: emptyCrmBadge(), contact: emptyCrmBadge(), company: emptyCrmBadge() };
}

const NUMBER_FIELDS = ["incoming", "due", "overdue", "total", "idle"] as const;
const COLOURS: readonly CrmColour[] = ["none", "green", "red", "red-green", "gray"];

export function isColour(value: unknown): value is CrmColour {
  return typeof value === "string" && (COLOURS as readonly string[]).includes(value);
}

/** The colour of a number made of `incoming` activities and `red` due or overdue ones. */
export function colourOf(incoming: number, red: number): CrmColour {
  if (incoming > 0 && red > 0) return "red-green";
  if (incoming > 0) return "green";
  if (red > 0) return "red";
  return "none";
}

/** One record type's numbers, with a part of them (a push) laid over: field by field. */
export function mergeBadge(current: CrmBadge, part: unknown): CrmBadge {
  if (typeof part !== "object" || part === null) return current;
  const raw = part as Record<string, unknown>;
  const next: CrmBadge = { ...current };
  let touched = false;
  for (const field of NUMBER_FIELDS) {
    if (!(field in raw)) continue;
    const n = Number(raw[field]);
    next[field] = Number.isFinite(n) && n > 0 ? Math.floor(n) : 0;
    touched = true;
  }
  if (isColour(raw.colour)) {
    next.colour = raw.colour;
    touched = true;
  } else if (touched && ("incoming" in raw || "due" in raw || "overdue" in raw)) {
    // a push without the colour: what the numbers say
    next.colour = colourOf(next.incoming, next.due + next.overdue);
  }
  if (touched && !("total" in raw) && ("incoming" in raw || "due" in raw || "overdue" in raw)) {
    next.total = next.incoming + next.due + next.overdue;
  }
  return touched ? next : current;
}

/**
 * `counters.changed` (or the snapshot's / GET /counters' `counters`) may hold a `crm` key:
 * per record type, the numbers that changed. Merge them into what we have, field by field;
 * a payload without `crm` (an im or tasks push) leaves the CRM counters as they are.
 */
export function applyCrmCounters(current: CrmCounters, payload: unknown): CrmCounters {
  if (typeof payload !== "object" || payload === null) return current;
  const crm = (payload as Record<string, unknown>).crm;
  if (typeof crm !== "object" || crm === null) return current;
  let next = current;
  for (const [type, part] of Object.entries(crm as Record<string, unknown>)) {
    if (!isRecordType(type)) continue;
    const merged = mergeBadge(next[type], part);
    if (merged !== next[type]) next = { ...next, [type]: merged };
  }
  return next;
}

export type BadgeColour = "green" | "red" | "red-green";

export interface BadgeView {
  /** The number to show; "" when there is nothing to count. */
  text: string;
  /** null: no badge (nothing counted). */
  colour: BadgeColour | null;
  /** CSS class of the badge. */
  cls: string;
  title: string;
}

function countText(n: number): string {
  if (n <= 0) return "";
  return n > 99 ? "99+" : String(n);
}

function badgeTitle(incoming: number, due: number, overdue: number): string {
  const parts: string[] = [];
  if (incoming) parts.push(`${incoming} incoming`);
  if (due) parts.push(`${due} due today`);
  if (overdue) parts.push(`${overdue} overdue`);
  return parts.join(", ");
}

/** The badge of one record type's counter: the total, green / red / red-and-green. */
export function badgeView(badge: CrmBadge): BadgeView {
  const red = badge.due + badge.overdue;
  const total = badge.total || badge.incoming + red;
  let colour: BadgeColour | null = null;
  if (total > 0) {
    const c = isColour(badge.colour) && badge.colour !== "none" && badge.colour !== "gray" ? badge.colour : colourOf(badge.incoming, red);
    colour = c === "none" || c === "gray" ? "red" : c;
  }
  return {
    text: countText(total),
    colour,
    cls: colour ? `crm-badge crm-badge-${colour}` : "crm-badge crm-badge-none",
    title: badgeTitle(badge.incoming, badge.due, badge.overdue),
  };
}

/** The CRM item of the top bar: all four types together. */
export function crmNavBadge(counters: CrmCounters): BadgeView {
  const sum = emptyCrmBadge();
  for (const t of RECORD_TYPES) {
    const b = counters[t];
    sum.incoming += b.incoming;
    sum.due += b.due;
    sum.overdue += b.overdue;
    sum.total += b.total || b.incoming + b.due + b.overdue;
  }
  sum.colour = colourOf(sum.incoming, sum.due + sum.overdue);
  return badgeView(sum);
}

// --- indicators ----------------------------------------------------------------------------

export interface IndicatorView {
  text: string;
  colour: CrmColour;
  dot: "blue" | "gray" | null;
  cls: string;
  title: string;
}

/** The activity column of one record: the number, its colour, and a dot for planned work. */
export function indicatorView(indicator: CrmIndicator | null | undefined): IndicatorView {
  const number = Math.max(0, Math.floor(Number(indicator?.number ?? 0)) || 0);
  const colour: CrmColour = isColour(indicator?.colour) ? indicator.colour : "none";
  const dot = indicator?.dot === "blue" || indicator?.dot === "gray" ? indicator.dot : null;
  let title: string;
  switch (colour) {
    case "green":
      title = `${number} incoming, waiting for an answer`;
      break;
    case "red":
      title = `${number} due today or overdue`;
      break;
    case "red-green":
      title = `${number}: incoming, and due today or overdue`;
      break;
    case "gray":
      title = number > 0 ? `${number} for someone else` : "Planned activities only";
      break;
    default:
      title = "No open activities";
  }
  if (dot === "blue") title += " · you have planned work";
  else if (dot === "gray") title += " · planned by someone else";
  return { text: String(number), colour, dot, cls: `crm-indicator crm-indicator-${colour}`, title };
}

/** Whether the record is counted for the caller: a coloured number (the list's "counted" filter). */
export function isCounted(indicator: CrmIndicator | null | undefined): boolean {
  if (!indicator || indicator.number <= 0) return false;
  return indicator.colour === "green" || indicator.colour === "red" || indicator.colour === "red-green";
}

// --- lists and live events -----------------------------------------------------------------

export interface CrmListFilter {
  q: string;
  /** Records with an open activity assigned to this person (cannot be told client-side). */
  activityResponsibleId: string | null;
  counted: boolean;
}

export function emptyListFilter(): CrmListFilter {
  return { q: "", activityResponsibleId: null, counted: false };
}

function fold(text: string): string {
  return text.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase();
}

function digits(text: string): string {
  return text.replace(/\D/g, "");
}

const PHONE_TEXT = /^\+?[\d\s().\/-]+$/;

/**
 * The search box, as the hub's `q` reads it: a part of the title or names, a part of an
 * e-mail address ("acme" finds hans@acme.example), a phone number's digits in order ("555 12"
 * finds 555-1234), or its last seven digits.
 */
export function matchesSearch(record: CrmRecord, query: string): boolean {
  const q = query.trim();
  if (!q) return true;
  const names = [record.title, [record.first_name, record.last_name].filter(Boolean).join(" "), record.company_title ?? ""];
  const text = fold(names.join(" "));
  if (text.includes(fold(q))) return true;
  if (record.emails.some((e) => e.value.toLowerCase().includes(q.toLowerCase()))) return true;
  const d = digits(q);
  if (d.length >= 3 && PHONE_TEXT.test(q) && record.phones.some((p) => digits(p.number).includes(d))) return true;
  if (d.length >= 5 && record.phones.some((p) => digits(p.number).endsWith(d.replace(/^0+/, "").slice(-7)))) return true;
  return false;
}

/**
 * Whether a record belongs in a list with `filter`: true / false, or undefined when only the
 * hub can tell (the activity-responsible filter, and a contact or deal that may be found by
 * the name of its company).
 */
export function matchesFilter(record: CrmRecord, filter: CrmListFilter): boolean | undefined {
  if (!matchesSearch(record, filter.q)) {
    const linked = Boolean(record.company_id) || Boolean(record.company_ids?.length);
    return linked && (record.type === "contact" || record.type === "deal") ? undefined : false;
  }
  if (filter.counted && !isCounted(record.indicator)) return false;
  if (filter.activityResponsibleId) return undefined;
  return true;
}

function time(iso: string): number {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? 0 : t;
}

/** Newest first, as the hub lists them: by creation, then by id (ids grow with time). */
export function compareNewestFirst(a: CrmRecord, b: CrmRecord): number {
  const byTime = time(b.created_at) - time(a.created_at);
  if (byTime !== 0) return byTime;
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
}

export function sortRecords(records: readonly CrmRecord[]): CrmRecord[] {
  return [...records].sort(compareNewestFirst);
}

/** A record into a list: replaces the known copy (unless that one is newer), or is added; newest first. */
export function upsertRecord(list: readonly CrmRecord[], record: CrmRecord): CrmRecord[] {
  const at = list.findIndex((r) => r.id === record.id);
  if (at >= 0) {
    const known = list[at] as CrmRecord;
    if (time(known.modified_at) > time(record.modified_at)) {
      // an older copy of the record; its indicator is still the newer news
      const next = [...list];
      next[at] = { ...known, indicator: record.indicator };
      return next;
    }
    const next = [...list];
    next[at] = record;
    return next;
  }
  return sortRecords([...list, record]);
}

export function removeRecord(list: readonly CrmRecord[], recordId: string): CrmRecord[] {
  if (!list.some((r) => r.id === recordId)) return list as CrmRecord[];
  return list.filter((r) => r.id !== recordId);
}

/**
 * `crm.record.updated` on a list shown with `filter`: added or replaced when it matches,
 * dropped when it no longer does. When only the hub can tell (undefined), a record already
 * listed is updated in place and a new one is left to the next load - `needsReload` says so.
 */
export function applyRecordEvent(
  list: readonly CrmRecord[],
  record: CrmRecord,
  filter: CrmListFilter,
): { list: CrmRecord[]; needsReload: boolean } {
  const known = list.some((r) => r.id === record.id);
  const verdict = matchesFilter(record, filter);
  if (verdict === true) return { list: upsertRecord(list, record), needsReload: false };
  if (verdict === false) return { list: removeRecord(list, record.id), needsReload: false };
  return known ? { list: upsertRecord(list, record), needsReload: false } : { list: list as CrmRecord[], needsReload: true };
}

/** A record page's detail as a list entry: without its links. */
export function plainRecord(detail: CrmRecord & { links?: unknown }): CrmRecord {
  const copy: CrmRecord & { links?: unknown } = { ...detail };
  delete copy.links;
  return copy;
}

/** A live copy of a record laid over the detail on screen: links stay until they are reloaded. */
export function mergeDetail<T extends CrmRecord>(detail: T, record: CrmRecord): T {
  if (detail.id !== record.id) return detail;
  if (time(detail.modified_at) > time(record.modified_at)) return { ...detail, indicator: record.indicator };
  return { ...detail, ...record };
}

// --- activities ----------------------------------------------------------------------------

export const ACTIVITY_TYPES: { type: CrmActivityType; label: string; icon: string }[] = [
  { type: "call", label: "Call", icon: "☎" },
  { type: "meeting", label: "Meeting", icon: "◷" },
  { type: "email", label: "E-mail", icon: "✉" },
  { type: "task", label: "Task", icon: "☑" },
  { type: "message", label: "Message", icon: "✎" },
];

export function activityTypeLabel(type: CrmActivityType): string {
  return ACTIVITY_TYPES.find((t) => t.type === type)?.label ?? type;
}

/** "a call", "an e-mail". */
export function withArticle(type: CrmActivityType): string {
  const label = activityTypeLabel(type).toLowerCase();
  return /^[aeiou]/.test(label) ? `an ${label}` : `a ${label}`;
}

export function activityIcon(type: CrmActivityType): string {
  return ACTIVITY_TYPES.find((t) => t.type === type)?.icon ?? "•";
}

/** Calls, e-mails and messages have a direction; meetings and tasks are always "outgoing". */
export function hasDirection(type: CrmActivityType): boolean {
  return type === "call" || type === "email" || type === "message";
}

export const STATE_LABELS: Record<CrmActivityState, string> = {
  incoming: "Incoming",
  overdue: "Overdue",
  due: "Due today",
  future: "Planned",
  completed: "Completed",
};

/**
 * A record's timeline: open activities first (incoming, then by deadline, soonest first,
 * those without one last), then the completed ones, most recently completed first.
 */
export function compareTimeline(a: CrmActivity, b: CrmActivity): number {
  if (a.completed !== b.completed) return a.completed ? 1 : -1;
  if (a.completed) {
    const byDone = time(b.completed_at ?? b.modified_at) - time(a.completed_at ?? a.modified_at);
    return byDone || (a.id < b.id ? 1 : -1);
  }
  const ai = a.state === "incoming" ? 0 : 1;
  const bi = b.state === "incoming" ? 0 : 1;
  if (ai !== bi) return ai - bi;
  const ad = a.deadline ? time(a.deadline) : Number.POSITIVE_INFINITY;
  const bd = b.deadline ? time(b.deadline) : Number.POSITIVE_INFINITY;
  if (ad !== bd) return ad < bd ? -1 : 1;
  return time(b.created_at) - time(a.created_at) || (a.id < b.id ? 1 : -1);
}

export function sortActivities(list: readonly CrmActivity[]): CrmActivity[] {
  return [...list].sort(compareTimeline);
}

/** An activity into a list (replacing the known copy unless that one is newer); sorted. */
export function upsertActivity(list: readonly CrmActivity[], activity: CrmActivity): CrmActivity[] {
  const known = list.find((a) => a.id === activity.id);
  if (known && time(known.modified_at) > time(activity.modified_at)) return list as CrmActivity[];
  return sortActivities([...list.filter((a) => a.id !== activity.id), activity]);
}

export function removeActivity(list: readonly CrmActivity[], activityId: string): CrmActivity[] {
  if (!list.some((a) => a.id === activityId)) return list as CrmActivity[];
  return list.filter((a) => a.id !== activityId);
}

/**
 * `crm.activity.updated` on a list that holds only activities passing `accepts` (a record's
 * timeline: its owner; "my activities": mine and open): kept up to date, or dropped when it
 * no longer belongs.
 */
export function applyActivityEvent(
  list: readonly CrmActivity[],
  activity: CrmActivity,
  accepts: (a: CrmActivity) => boolean,
): CrmActivity[] {
  if (accepts(activity)) return upsertActivity(list, activity);
  return removeActivity(list, activity.id);
}

export interface ActivityForm {
  type: CrmActivityType;
  direction: "incoming" | "outgoing";
  subject: string;
  description: string;
  /** the value of an <input type="datetime-local">, browser time; "" for none */
  deadline: string;
  responsibleId: string | null;
  /** log something that already happened (a call taken): created completed */
  completed: boolean;
}

export function emptyActivityForm(over: Partial<ActivityForm> = {}): ActivityForm {
  return {
    type: "call",
    direction: "outgoing",
    subject: "",
    description: "",
    deadline: "",
    responsibleId: null,
    completed: false,
    ...over,
  };
}

/** A datetime-local value ("2026-05-01T18:00", local time) as ISO 8601 with a zone (UTC). */
export function localToIso(value: string): string | null {
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$/.test(value)) return null;
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

/** An ISO moment as the value of an <input type="datetime-local"> in the browser's time. */
export function isoToLocal(iso: string | null | undefined): string {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function activityFormErrors(form: ActivityForm): string[] {
  const errors: string[] = [];
  if (!form.subject.trim()) errors.push("Give the activity a subject.");
  if (form.subject.trim().length > 250) errors.push("The subject is longer than 250 characters.");
  if (form.deadline && localToIso(form.deadline) === null) errors.push("The deadline is not a valid date and time.");
  return errors;
}

export function activityCreateBody(owner: { type: CrmRecordType; id: string }, form: ActivityForm): CrmActivityCreate {
  const body: CrmActivityCreate = {
    owner_type: owner.type,
    owner_id: owner.id,
    type: form.type,
    direction: hasDirection(form.type) ? form.direction : "outgoing",
    subject: form.subject.trim(),
    description: form.description,
  };
  if (form.responsibleId) body.responsible_id = form.responsibleId;
  if (form.deadline) body.deadline = localToIso(form.deadline);
  if (form.completed) body.completed = true;
  return body;
}

// --- record forms and duplicates -----------------------------------------------------------

export interface RecordForm {
  title: string;
  firstName: string;
  lastName: string;
  companyTitle: string;
  email: string;
  phone: string;
  /** "" for none */
  amount: string;
  currency: string;
  status: string;
  stageId: string;
  responsibleId: string | null;
  companyId: string | null;
  contactIds: string[];
  companyIds: string[];
  source: string;
  comments: string;
}

export function emptyRecordForm(over: Partial<RecordForm> = {}): RecordForm {
  return {
    title: "",
    firstName: "",
    lastName: "",
    companyTitle: "",
    email: "",
    phone: "",
    amount: "",
    currency: "USD",
    status: "new",
    stageId: "",
    responsibleId: null,
    companyId: null,
    contactIds: [],
    companyIds: [],
    source: "",
    comments: "",
    ...over,
  };
}

/** The edit form of a record, filled from it. */
export function formFromRecord(record: CrmRecord): RecordForm {
  return emptyRecordForm({
    title: record.type === "contact" ? "" : record.title,
    firstName: record.first_name ?? "",
    lastName: record.last_name ?? "",
    companyTitle: record.company_title ?? "",
    email: record.emails[0]?.value ?? "",
    phone: record.phones[0]?.number ?? "",
    amount: record.amount === null || record.amount === undefined ? "" : String(record.amount),
    currency: record.currency ?? "USD",
    status: record.status ?? "new",
    stageId: record.stage_id ?? "",
    responsibleId: record.responsible_id,
    companyId: record.company_id ?? null,
    contactIds: [...(record.contact_ids ?? [])],
    companyIds: [...(record.company_ids ?? [])],
    source: record.source,
    comments: record.comments,
  });
}

/** Which fields a record type's form has. */
export const FORM_FIELDS: Record<CrmRecordType, ReadonlySet<keyof RecordForm>> = {
  lead: new Set(["title", "firstName", "lastName", "companyTitle", "email", "phone", "amount", "currency", "status", "responsibleId", "source", "comments"]),
  contact: new Set(["firstName", "lastName", "email", "phone", "responsibleId", "companyIds", "source", "comments"]),
  company: new Set(["title", "email", "phone", "responsibleId", "contactIds", "source", "comments"]),
  deal: new Set(["title", "amount", "currency", "stageId", "responsibleId", "companyId", "contactIds", "source", "comments"]),
};

export function hasField(type: CrmRecordType, field: keyof RecordForm): boolean {
  return FORM_FIELDS[type].has(field);
}

const EMAIL = /^[^@\s]+@[^@\s]+\.[^@\s]+$/;
const PHONE = /^\+?[0-9 ()./-]+$/;

/** An e-mail the hub accepts (server/directory/models.py `Email`). */
export function isEmail(value: string): boolean {
  return EMAIL.test(value.trim());
}

/** A phone number the hub accepts (`PhoneNumber`): 3 to 32 of digits, spaces and ()./- . */
export function isPhone(value: string): boolean {
  const v = value.trim();
  return v.length >= 3 && v.length <= 32 && PHONE.test(v) && digits(v).length >= 3;
}

export function recordFormErrors(type: CrmRecordType, form: RecordForm): string[] {
  const errors: string[] = [];
  const named = form.firstName.trim() || form.lastName.trim();
  if (type === "contact" && !named) errors.push("Give the contact a first or last name.");
  if ((type === "company" || type === "deal") && !form.title.trim()) errors.push(`Give the ${type} a title.`);
  if (type === "lead" && !form.title.trim() && !named && !form.companyTitle.trim()) {
    errors.push("Give the lead a title, a name or a company.");
  }
  if (form.email.trim() && !isEmail(form.email)) errors.push("The e-mail address is not valid.");
  if (form.phone.trim() && !isPhone(form.phone)) errors.push("The phone number is not valid.");
  if (hasField(type, "amount") && form.amount.trim()) {
    const n = Number(form.amount);
    if (!Number.isFinite(n) || n < 0) errors.push("The amount must be a positive number.");
  }
  if (hasField(type, "currency") && form.currency.trim() && !/^[A-Za-z]{3}$/.test(form.currency.trim())) {
    errors.push("The currency is three letters, such as USD.");
  }
  return errors;
}

function emailsOf(form: RecordForm): TypedEmail[] {
  return form.email.trim() ? [{ type: "work", value: form.email.trim() }] : [];
}

function phonesOf(form: RecordForm): TypedPhone[] {
  return form.phone.trim() ? [{ type: "work", number: form.phone.trim() }] : [];
}

/** The full body of a record of `type` from a valid form (create; the patch picks from it). */
export function recordBody(type: CrmRecordType, form: RecordForm): CrmRecordBody {
  const body: CrmRecordBody = {
    source: form.source.trim(),
    comments: form.comments,
  };
  if (form.responsibleId) body.responsible_id = form.responsibleId;
  if (hasField(type, "title")) body.title = form.title.trim();
  if (hasField(type, "firstName")) body.first_name = form.firstName.trim();
  if (hasField(type, "lastName")) body.last_name = form.lastName.trim();
  if (hasField(type, "companyTitle")) body.company_title = form.companyTitle.trim();
  if (hasField(type, "email")) body.emails = emailsOf(form);
  if (hasField(type, "phone")) body.phones = phonesOf(form);
  if (hasField(type, "amount")) body.amount = form.amount.trim() ? Number(form.amount) : null;
  if (hasField(type, "currency") && form.currency.trim()) body.currency = form.currency.trim().toUpperCase();
  if (hasField(type, "status") && form.status && form.status !== "converted") body.status = form.status;
  if (hasField(type, "stageId") && form.stageId) body.stage_id = form.stageId;
  if (hasField(type, "companyId")) body.company_id = form.companyId;
  if (hasField(type, "contactIds")) body.contact_ids = [...new Set(form.contactIds)];
  if (hasField(type, "companyIds")) body.company_ids = [...new Set(form.companyIds)];
  return body;
}

/** The body of `POST /crm/{plural}`: nulls and empty values left out. */
export function recordCreateBody(type: CrmRecordType, form: RecordForm, ignoreDuplicates = false): CrmRecordBody {
  const full = recordBody(type, form);
  const body: CrmRecordBody = {};
  for (const [key, value] of Object.entries(full) as [keyof CrmRecordBody, unknown][]) {
    if (value === null || value === "" || (Array.isArray(value) && value.length === 0)) continue;
    (body as Record<string, unknown>)[key] = value;
  }
  if (ignoreDuplicates) body.ignore_duplicates = true;
  return body;
}

function same(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/**
 * The body of `PATCH /crm/{plural}/{id}`: only what the form changed. The record's other
 * e-mails and phones (beyond the first, which the form edits) are kept.
 */
export function recordPatchBody(record: CrmRecord, form: RecordForm): CrmRecordBody {
  const full = recordBody(record.type, form);
  const patch: CrmRecordBody = {};
  const set = (key: keyof CrmRecordBody, value: unknown) => ((patch as Record<string, unknown>)[key] = value);
  const current: Record<string, unknown> = {
    title: record.title,
    first_name: record.first_name ?? "",
    last_name: record.last_name ?? "",
    company_title: record.company_title ?? "",
    amount: record.amount ?? null,
    currency: record.currency ?? "",
    status: record.status ?? "",
    stage_id: record.stage_id ?? "",
    responsible_id: record.responsible_id,
    source: record.source,
    comments: record.comments,
    company_id: record.company_id ?? null,
    contact_ids: record.contact_ids ?? [],
    company_ids: record.company_ids ?? [],
  };
  for (const [key, value] of Object.entries(full) as [keyof CrmRecordBody, unknown][]) {
    if (key === "emails" || key === "phones") continue;
    if (key === "title" && record.type === "contact") continue;
    if (key === "status" && record.status === "converted") continue;
    if (!same(current[key], value)) set(key, value);
  }
  if (full.emails) {
    const first = full.emails[0];
    const rest = record.emails.slice(1);
    const emails = first ? [{ ...first, type: record.emails[0]?.type ?? "work" }, ...rest] : rest;
    if (!same(emails, record.emails)) set("emails", emails);
  }
  if (full.phones) {
    const first = full.phones[0];
    const rest = record.phones.slice(1);
    const phones = first ? [{ ...first, type: record.phones[0]?.type ?? "work" }, ...rest] : rest;
    if (!same(phones, record.phones)) set("phones", phones);
  }
  return patch;
}

/**
 * What to ask `POST /crm/duplicates` about the form being typed: its names, company title,
 * e-mail and phone - only values complete enough to be compared (a half-typed e-mail would
 * be refused). null when there is nothing to look for yet, or for deals (no duplicate control).
 */
export function duplicateProbe(type: CrmRecordType, form: RecordForm, excludeId?: string): CrmDuplicateProbe | null {
  if (type === "deal") return null;
  const first = hasField(type, "firstName") ? form.firstName.trim() : "";
  const last = hasField(type, "lastName") ? form.lastName.trim() : "";
  const title = type === "company" ? form.title.trim() : "";
  const companyTitle = type === "lead" ? form.companyTitle.trim() : "";
  const emails = form.email.trim() && isEmail(form.email) ? [form.email.trim().toLowerCase()] : [];
  const phones = form.phone.trim() && isPhone(form.phone) && digits(form.phone).length >= 5 ? [form.phone.trim()] : [];
  const named = Boolean(first && last) || title.length >= 2 || companyTitle.length >= 2;
  if (!named && !emails.length && !phones.length) return null;
  const probe: CrmDuplicateProbe = {
    type,
    first_name: first,
    last_name: last,
    title,
    company_title: companyTitle,
    emails,
    phones,
  };
  if (excludeId) probe.exclude_id = excludeId;
  return probe;
}

/** A stable key of a probe: the same key, the same question (no need to ask again). */
export function probeKey(probe: CrmDuplicateProbe | null): string {
  if (!probe) return "";
  return JSON.stringify([
    probe.type,
    fold(probe.first_name),
    fold(probe.last_name),
    fold(probe.title),
    fold(probe.company_title),
    [...probe.emails].sort(),
    [...probe.phones].map(digits).sort(),
    probe.exclude_id ?? "",
  ]);
}

export const MATCHED_LABELS: Record<CrmMatched, string> = {
  email: "same e-mail",
  phone: "same phone",
  name: "same name",
  company: "same company",
};

export function describeMatched(matched: readonly CrmMatched[]): string {
  return matched.map((m) => MATCHED_LABELS[m] ?? m).join(", ");
}

/** The duplicates of a 409 `possible-duplicates` answer; null for any other error. */
export function duplicatesOf(error: unknown): CrmDuplicates | null {
  if (!(error instanceof ApiError) || error.status !== 409 || error.slug !== "possible-duplicates") return null;
  const { duplicates, hidden } = error.problem as { duplicates?: unknown; hidden?: unknown };
  return { duplicates: Array.isArray(duplicates) ? (duplicates as CrmDuplicateMatch[]) : [], hidden: hidden === true };
}

// --- conversion ----------------------------------------------------------------------------

export interface ConversionOption {
  mode: CrmConversionMode;
  label: string;
  creates: CrmRecordType[];
}

export const CONVERSION_MODES: readonly ConversionOption[] = [
  { mode: "contact", label: "Contact", creates: ["contact"] },
  { mode: "company", label: "Company", creates: ["company"] },
  { mode: "contact+company", label: "Contact and company", creates: ["contact", "company"] },
  { mode: "deal", label: "Deal", creates: ["deal"] },
  { mode: "deal+contact", label: "Deal and contact", creates: ["deal", "contact"] },
  { mode: "deal+contact+company", label: "Deal, contact and company", creates: ["deal", "contact", "company"] },
];

/**
 * The body of POST /crm/leads/{id}/convert: the existing contact / company chosen (ids; "" to
 * make a new one) for the types the mode makes, where the e-mails go. The dialog showed the
 * existing records the duplicate rules found, so making new ones is a choice made:
 * `ignore_duplicates`.
 */
export function conversionBody(
  mode: CrmConversionMode,
  use: { contact?: string; company?: string },
  emailsTo: CrmRecordType | null,
): CrmConvertBody {
  const makes = CONVERSION_MODES.find((m) => m.mode === mode)?.creates ?? [];
  const body: CrmConvertBody = { mode, ignore_duplicates: true };
  if (makes.includes("contact") && use.contact) body.contact_id = use.contact;
  if (makes.includes("company") && use.company) body.company_id = use.company;
  if (emailsTo && makes.includes(emailsTo)) body.emails_to = emailsTo;
  return body;
}

/** A lead can be converted while it is neither converted nor junk. */
export function mayConvert(record: CrmRecord): boolean {
  return record.type === "lead" && record.status !== "converted" && record.status !== "junk";
}

// --- history -------------------------------------------------------------------------------

const FIELD_LABELS: Record<string, string> = {
  title: "the title",
  first_name: "the first name",
  last_name: "the last name",
  company_title: "the company name",
  status: "the status",
  stage_id: "the stage",
  amount: "the amount",
  currency: "the currency",
  responsible_id: "the responsible person",
  emails: "the e-mails",
  phones: "the phones",
  source: "the source",
  comments: "the comments",
  company_id: "the company",
  company_ids: "the companies",
  contact_ids: "the contacts",
  custom_fields: "the custom fields",
};

function plain(value: unknown): string {
  if (value === null || value === undefined || value === "") return "—";
  if (Array.isArray(value)) return value.length ? `${value.length} item${value.length === 1 ? "" : "s"}` : "none";
  if (typeof value === "object") return "…";
  return String(value);
}

/** One history line, after the person's name (which the page shows in front). */
export function describeCrmHistory(entry: CrmHistoryEntry, names: (id: string) => string = (id) => id): string {
  const after = (entry.after ?? {}) as Record<string, unknown>;
  switch (entry.kind) {
    case "created":
      return "created the record";
    case "field": {
      const what = FIELD_LABELS[entry.field ?? ""] ?? entry.field ?? "a field";
      if (entry.field === "responsible_id") {
        return `changed ${what}: ${entry.before ? names(String(entry.before)) : "—"} → ${entry.after ? names(String(entry.after)) : "—"}`;
      }
      if (["title", "first_name", "last_name", "company_title", "status", "stage_id", "amount", "currency", "source"].includes(entry.field ?? "")) {
        return `changed ${what}: ${plain(entry.before)} → ${plain(entry.after)}`;
      }
      return `changed ${what}`;
    }
    case "linked":
      return entry.field === "lead_id" ? "took over a lead converted into this record" : "linked a record";
    case "unlinked":
      return "unlinked a record";
    case "converted":
      return "converted the lead";
    case "activity_added": {
      // a received e-mail: no person added it, the sender wrote it
      const from = typeof after.from === "string" ? after.from : "";
      if (!entry.user_id && from) {
        const address = typeof after.from_address === "string" ? after.from_address : "";
        const who = address && address.toLowerCase() !== from.toLowerCase() ? `${from} <${address}>` : from;
        return `E-mail received from ${who}`;
      }
      return `added ${withArticle((after.type as CrmActivityType) ?? "task")}`;
    }
    case "activity_moved": {
      const before = (entry.before ?? {}) as Record<string, unknown>;
      const there = (after.record ?? {}) as { type?: string; id?: string; title?: string };
      const here = (before.record ?? {}) as { type?: string; id?: string; title?: string };
      const what = withArticle((((after.activity ?? {}) as { type?: string }).type as CrmActivityType) ?? "email");
      const name = (r: { type?: string; title?: string }) =>
        `${isRecordType(r.type) ? TYPE_LABELS[r.type].toLowerCase() : "record"} “${r.title ?? ""}”`;
      return there.id === entry.record_id ? `moved ${what} here from ${name(here)}` : `moved ${what} to ${name(there)}`;
    }
    case "activity_completed":
      return `completed ${withArticle((after.type as CrmActivityType) ?? "task")}`;
    case "activity_reopened":
      return `reopened ${withArticle((after.type as CrmActivityType) ?? "task")}`;
    case "activity_removed":
      return "deleted an activity";
    default:
      return entry.kind.replace(/_/g, " ");
  }
}

/**
 * The state of an activity now: the hub's `state` (for my time zone and the due window),
 * moved on by the clock where that needs no settings - a deadline passing makes it overdue.
 */
export function liveState(activity: CrmActivity, now: number): CrmActivityState {
  if (activity.completed) return "completed";
  if (activity.state === "incoming") return "incoming";
  if (activity.deadline && time(activity.deadline) <= now) return "overdue";
  return activity.state;
}

// --- the deals' Kanban board ---------------------------------------------------------------

/** Deals by stage id, each column newest first. */
export type Board = Record<string, CrmRecord[]>;

/** A deal taken off the board, wherever it is. */
export function removeFromBoard(board: Board, dealId: string): Board {
  let changed = false;
  const next: Board = {};
  for (const [stage, column] of Object.entries(board)) {
    const kept = column.filter((r) => r.id !== dealId);
    if (kept.length !== column.length) changed = true;
    next[stage] = kept;
  }
  return changed ? next : board;
}

/**
 * `crm.record.updated` of a deal on the board: into the column of its stage (out of any
 * other), if it matches the filters; a deal whose stage has no column, or that no longer
 * matches, leaves the board. When only the hub can tell, a deal on the board stays.
 */
export function applyBoardEvent(board: Board, deal: CrmRecord, filter: CrmListFilter): Board {
  if (deal.type !== "deal") return board;
  const known = Object.values(board).some((column) => column.some((r) => r.id === deal.id));
  const verdict = matchesFilter(deal, filter);
  const without = removeFromBoard(board, deal.id);
  const stage = deal.stage_id ?? "";
  if (verdict === false || !(stage in board) || (verdict === undefined && !known)) return without;
  return { ...without, [stage]: upsertRecord(without[stage] ?? [], deal) };
}

/** A deal dragged to another stage: shown there at once, before the hub answers. */
export function moveOnBoard(board: Board, deal: CrmRecord, stageId: string): Board {
  if (!(stageId in board)) return board;
  const without = removeFromBoard(board, deal.id);
  return { ...without, [stageId]: upsertRecord(without[stageId] ?? [], { ...deal, stage_id: stageId }) };
}

/** A column's head line: how many deals it shows, and their amounts per currency. */
export function columnSummary(column: readonly CrmRecord[]): string {
  const sums = new Map<string, number>();
  for (const r of column) {
    if (r.amount === null || r.amount === undefined) continue;
    const cur = r.currency ?? "";
    sums.set(cur, (sums.get(cur) ?? 0) + r.amount);
  }
  const money = [...sums.entries()].map(([cur, n]) => formatAmount(n, cur)).join(" + ");
  const count = `${column.length} ${column.length === 1 ? "deal" : "deals"}`;
  return money ? `${count} · ${money}` : count;
}

/** The names of a record's linked companies or contacts, from the titles known. */
export function linkedNames(ids: readonly (string | null | undefined)[], titles: Record<string, string>): string {
  return ids
    .filter((id): id is string => Boolean(id))
    .map((id) => titles[id] ?? "…")
    .join(", ");
}

/** The types whose duplicates can be merged (the hub's MERGEABLE_TYPES). */
export function mayMerge(record: CrmRecord): boolean {
  return record.type === "lead" || record.type === "contact" || record.type === "company";
}
