// Presence for display: colleagues' statuses from the snapshot and presence.changed, and the
// user's own state (automatic or set by hand). No Vue, no DOM.

import { peerOf } from "./dialogs";
import type { Chat, ManualStatus, PresenceStatus, PresenceView } from "./types";

export interface PresenceEntry {
  status: PresenceStatus;
  lastSeen?: string | null;
  until?: string | null;
}

export type PresenceMap = Record<string, PresenceEntry>;

const STATUSES: readonly PresenceStatus[] = ["online", "away", "dnd", "offline"];

export function isStatus(value: unknown): value is PresenceStatus {
  return typeof value === "string" && (STATUSES as readonly string[]).includes(value);
}

/** The snapshot's `presence` part (user id -> status) replaces what was known. */
export function fromSnapshot(
  snapshot: Record<string, unknown> | undefined,
  previous: PresenceMap = {},
): PresenceMap {
  const map: PresenceMap = {};
  for (const [id, status] of Object.entries(snapshot ?? {})) {
    if (isStatus(status)) map[id] = { ...previous[id], status };
  }
  return map;
}

/** One presence.changed (or a REST presence view). */
export function applyChange(map: PresenceMap, view: PresenceView): PresenceMap {
  if (!view || typeof view.user_id !== "string" || !isStatus(view.status)) return map;
  return {
    ...map,
    [view.user_id]: { status: view.status, lastSeen: view.last_seen ?? map[view.user_id]?.lastSeen, until: view.until ?? null },
  };
}

export function statusOf(map: PresenceMap, userId: string | undefined): PresenceStatus {
  if (!userId) return "offline";
  return map[userId]?.status ?? "offline";
}

export const STATUS_LABELS: Record<PresenceStatus, string> = {
  online: "Online",
  away: "Away",
  dnd: "Do not disturb",
  offline: "Offline",
};

/** The presence dot of a dialog: the peer's status for a private dialog, none otherwise. */
export function chatPresence(chat: Chat, me: string, map: PresenceMap): PresenceStatus | undefined {
  const peer = peerOf(chat, me);
  return peer ? statusOf(map, peer) : undefined;
}

/** How many members of a chat (other than oneself) are not offline. */
export function onlineMembers(chat: Chat, me: string, map: PresenceMap): number {
  return chat.member_ids.filter((m) => m !== me && statusOf(map, m) !== "offline").length;
}

/** Count of users per status, for the directory's summary line. */
export function tally(map: PresenceMap, ids: readonly string[]): Record<PresenceStatus, number> {
  const counts: Record<PresenceStatus, number> = { online: 0, away: 0, dnd: 0, offline: 0 };
  for (const id of ids) counts[statusOf(map, id)] += 1;
  return counts;
}

/** "last seen 5 min ago" and the like; empty when nothing useful is known. */
export function describe(entry: PresenceEntry | undefined, now: Date = new Date()): string {
  if (!entry) return STATUS_LABELS.offline;
  if (entry.status === "dnd" && entry.until) {
    return `Do not disturb until ${formatClock(entry.until)}`;
  }
  if (entry.status !== "offline" || !entry.lastSeen) return STATUS_LABELS[entry.status];
  const seconds = Math.max(0, (now.getTime() - Date.parse(entry.lastSeen)) / 1000);
  if (!Number.isFinite(seconds)) return STATUS_LABELS.offline;
  if (seconds < 60) return "Last seen just now";
  if (seconds < 3600) return `Last seen ${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `Last seen ${Math.floor(seconds / 3600)} h ago`;
  return `Last seen ${Math.floor(seconds / 86400)} d ago`;
}

function formatClock(iso: string): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** The own-status selector: "auto" follows activity; away/dnd are set by hand. */
export type OwnChoice = "auto" | ManualStatus;

export function ownChoice(view: Pick<PresenceView, "manual"> | undefined): OwnChoice {
  return view?.manual === "away" || view?.manual === "dnd" ? view.manual : "auto";
}

/** Sound and system notifications stay quiet while the user is in do-not-disturb. */
export function mayDisturb(ownStatus: PresenceStatus): boolean {
  return ownStatus !== "dnd";
}
