// The outbox: messages written while the hub cannot be reached. Each is kept (in the browser's
// localStorage, per user) until the hub has stored it, shown at the bottom of its chat as
// "sending", and sent again with the same client_id - which the hub stores at most once - when
// the connection is back, also after a reload. No Vue, no DOM: the store reads and writes the
// storage.

import { ApiError } from "./problem";

export interface OutboxEntry {
  chat_id: string;
  text: string;
  client_id: string;
  /** When it was written (ISO): the optimistic copy's time, and the sending order. */
  created_at: string;
}

export function outboxKey(userId: string): string {
  return `portalhub.outbox.${userId}`;
}

function isEntry(value: unknown): value is OutboxEntry {
  if (typeof value !== "object" || value === null) return false;
  const e = value as Record<string, unknown>;
  return (
    typeof e.chat_id === "string" &&
    typeof e.text === "string" &&
    typeof e.client_id === "string" &&
    typeof e.created_at === "string" &&
    e.text.trim() !== ""
  );
}

/** What the storage holds; anything unreadable is dropped rather than breaking the app. */
export function parseOutbox(raw: string | null): OutboxEntry[] {
  if (!raw) return [];
  try {
    const data: unknown = JSON.parse(raw);
    return Array.isArray(data) ? sortEntries(data.filter(isEntry)) : [];
  } catch {
    return [];
  }
}

export function serializeOutbox(entries: readonly OutboxEntry[]): string {
  return JSON.stringify(entries);
}

function sortEntries(entries: OutboxEntry[]): OutboxEntry[] {
  return entries.sort((a, b) => (a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0));
}

/** An entry added (a retry of the same client_id replaces the old one), oldest first. */
export function withEntry(entries: readonly OutboxEntry[], entry: OutboxEntry): OutboxEntry[] {
  return sortEntries([...entries.filter((e) => e.client_id !== entry.client_id), entry]);
}

export function withoutEntry(entries: readonly OutboxEntry[], clientId: string): OutboxEntry[] {
  return entries.filter((e) => e.client_id !== clientId);
}

/**
 * Whether a failed send should stay in the outbox and be tried again: the hub was not
 * reached (0), timed out, was busy (429, 503), failed (5xx) or was short of disk (507). A
 * refusal of the message itself (403 not a member, 404, 413 too long, 422) will not change
 * by trying again: the message is shown as not sent, with the reason.
 */
export function isRetryable(error: unknown): boolean {
  if (!(error instanceof ApiError)) return true;
  const s = error.status;
  return s === 0 || s === 408 || s === 429 || s >= 500;
}

/** The wait before the next try: 2 s, doubling to 30 s. */
export function retryDelay(attempt: number): number {
  return Math.min(2000 * 2 ** Math.max(0, attempt), 30_000);
}
