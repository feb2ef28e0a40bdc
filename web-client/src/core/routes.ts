// The app's addresses: every screen has a path (history API routing), and a path says which
// screen to show. The hub serves the page for the first segments in CLIENT_PAGES
// (server/app.py), so a reload or a shared link lands on the same screen. No Vue, no DOM.

import { isRecordType, PLURAL } from "./crm";
import type { CrmRecordType } from "./types";

/** The CRM's sections: a record type's list, my activities, and the admins' pages. */
export type CrmSection = CrmRecordType | "activities" | "settings" | "mail" | "unmatched";

export type Screen =
  | { view: "messenger"; chatId: string | null; messageId: string | null }
  | { view: "employees"; userId: string | null }
  | { view: "tasks"; taskId: string | null }
  | { view: "crm"; section: CrmSection; recordId: string | null; board: boolean }
  | { view: "settings" }
  | { view: "notfound" };

export type View = Screen["view"];

/** The first path segments the hub answers with the page (server/app.py CLIENT_PAGES). */
export const CLIENT_PAGES = ["messenger", "employees", "tasks", "crm", "settings"] as const;

const BY_PLURAL: Record<string, CrmRecordType> = {
  deals: "deal",
  leads: "lead",
  contacts: "contact",
  companies: "company",
};

const CRM_PAGES: readonly string[] = ["activities", "settings", "mail", "unmatched"];

/** Ids are the hub's: 24 hex digits (ObjectId). Anything else names nothing. */
const ID = /^[0-9a-f]{24}$/;

export function isId(value: string | null | undefined): value is string {
  return typeof value === "string" && ID.test(value);
}

const enc = encodeURIComponent;

export function chatPath(chatId: string, messageId?: string | null): string {
  return messageId ? `/messenger/${enc(chatId)}?message=${enc(messageId)}` : `/messenger/${enc(chatId)}`;
}

export function taskPath(taskId: string): string {
  return `/tasks/${enc(taskId)}`;
}

export function userPath(userId: string): string {
  return `/employees/${enc(userId)}`;
}

export function crmRecordPath(type: CrmRecordType, id: string): string {
  return `/crm/${PLURAL[type]}/${enc(id)}`;
}

export function crmSectionPath(section: CrmSection, board = false): string {
  if (isRecordType(section)) return board && section === "deal" ? "/crm/deals/kanban" : `/crm/${PLURAL[section]}`;
  return `/crm/${section}`;
}

/** The path of a screen (the inverse of `parseScreen`). */
export function pathOf(screen: Screen): string {
  switch (screen.view) {
    case "messenger":
      return screen.chatId ? chatPath(screen.chatId, screen.messageId) : "/messenger";
    case "employees":
      return screen.userId ? userPath(screen.userId) : "/employees";
    case "tasks":
      return screen.taskId ? taskPath(screen.taskId) : "/tasks";
    case "crm":
      if (screen.recordId && isRecordType(screen.section)) return crmRecordPath(screen.section, screen.recordId);
      return crmSectionPath(screen.section, screen.board);
    case "settings":
      return "/settings";
    case "notfound":
      return "/";
  }
}

function segmentsOf(path: string): string[] {
  const bare = path.split(/[?#]/, 1)[0] ?? "";
  return bare
    .split("/")
    .filter(Boolean)
    .map((s) => {
      try {
        return decodeURIComponent(s);
      } catch {
        return s;
      }
    });
}

/**
 * The screen a path shows. `/` is the messenger. A path of a known screen with an id that
 * cannot be one (not 24 hex digits) still opens that screen, which then says the thing is not
 * available: a mistyped link gets the same clear page as one to something not for the user.
 */
export function parseScreen(path: string, query: Record<string, unknown> = {}): Screen {
  const [first, second, third, ...rest] = segmentsOf(path);
  if (first === undefined) return { view: "messenger", chatId: null, messageId: null };
  const single = (v: unknown): string | null => (typeof v === "string" && v ? v : Array.isArray(v) && typeof v[0] === "string" ? v[0] : null);
  switch (first) {
    case "messenger":
      if (third !== undefined) break;
      return { view: "messenger", chatId: second ?? null, messageId: second ? single(query.message) : null };
    case "employees":
      if (third !== undefined) break;
      return { view: "employees", userId: second ?? null };
    case "tasks":
      if (third !== undefined) break;
      return { view: "tasks", taskId: second ?? null };
    case "settings":
      if (second !== undefined) break;
      return { view: "settings" };
    case "crm": {
      if (second === undefined) return { view: "crm", section: "deal", recordId: null, board: false };
      const type = BY_PLURAL[second];
      if (type) {
        if (third === undefined) return { view: "crm", section: type, recordId: null, board: false };
        if (rest.length) break;
        if (type === "deal" && third === "kanban") return { view: "crm", section: "deal", recordId: null, board: true };
        return { view: "crm", section: type, recordId: third, board: false };
      }
      if (CRM_PAGES.includes(second) && third === undefined) {
        return { view: "crm", section: second as CrmSection, recordId: null, board: false };
      }
      break;
    }
  }
  return { view: "notfound" };
}

/** Two screens are the same place (the same path). */
export function sameScreen(a: Screen, b: Screen): boolean {
  return pathOf(a) === pathOf(b);
}
