// A chat's message list: merged from history pages, live events and one's own optimistic
// sends, each message exactly once, oldest first. No Vue, no DOM.

import type { Message } from "./types";

/** Message ids are ObjectId hex strings: same length, and their order is creation order. */
export function compareIds(a: string, b: string): number {
  if (a.length !== b.length) return a.length - b.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Not (yet) stored by the hub: being sent, or failed. */
export function isUnconfirmed(m: Message): boolean {
  return Boolean(m.pending || m.failed);
}

function byOrder(a: Message, b: Message): number {
  // Unconfirmed messages (sending, or failed) have no server id yet: they go last, below the
  // whole history, in the order they were written.
  const ua = isUnconfirmed(a);
  const ub = isUnconfirmed(b);
  if (ua !== ub) return ua ? 1 : -1;
  if (ua && ub) return a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : 0;
  return compareIds(a.id, b.id);
}

/** The newer of two copies of one message (an edit or a deletion beats the original). */
export function newerCopy(a: Message, b: Message): Message {
  if (a.deleted !== b.deleted) return a.deleted ? a : b;
  const ea = a.edited_at ?? "";
  const eb = b.edited_at ?? "";
  return eb >= ea ? b : a;
}

/** Identifies one send of one author: a retry carries the same key. */
function sendKey(m: Message): string | undefined {
  return m.client_id ? `${m.author_id ?? ""}|${m.client_id}` : undefined;
}

/**
 * Merge `incoming` into `existing`. A message with a known id replaces the older copy; a
 * confirmed message replaces the optimistic copy with the same `client_id` (from the same
 * author). Returns a new array, oldest first, with no id twice.
 */
export function mergeMessages(existing: readonly Message[], incoming: readonly Message[]): Message[] {
  const byId = new Map<string, Message>();
  const pending = new Map<string, Message>();
  const put = (m: Message) => {
    if (m.pending || m.failed) {
      pending.set(sendKey(m) ?? m.id, m);
      return;
    }
    const known = byId.get(m.id);
    byId.set(m.id, known ? newerCopy(known, m) : m);
  };
  for (const m of existing) put(m);
  for (const m of incoming) put(m);
  // An optimistic copy goes as soon as its confirmed copy is there.
  for (const m of byId.values()) {
    const key = sendKey(m);
    if (key) pending.delete(key);
  }
  return [...byId.values(), ...pending.values()].sort(byOrder);
}

/** The newest confirmed message: what "read up to" points at. */
export function newestConfirmed(messages: readonly Message[]): Message | undefined {
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i];
    if (m && !m.pending && !m.failed) return m;
  }
  return undefined;
}

/** The oldest confirmed message: the `before` of the next history page. */
export function oldestConfirmed(messages: readonly Message[]): Message | undefined {
  return messages.find((m) => !m.pending && !m.failed);
}

let counter = 0;

/** A fresh client_id for one message; a retry of that message reuses it. */
export function newClientId(now: number = Date.now(), random: () => number = Math.random): string {
  counter = (counter + 1) % 1_000_000;
  const rand = Math.floor(random() * 0x7fffffff).toString(36);
  return `web-${now.toString(36)}-${counter.toString(36)}-${rand}`;
}

/** The optimistic copy shown while a send is in flight. */
export function pendingMessage(
  chatId: string,
  authorId: string,
  text: string,
  clientId: string,
  now: Date = new Date(),
): Message {
  return {
    id: `pending:${clientId}`,
    chat_id: chatId,
    author_id: authorId,
    text,
    created_at: now.toISOString(),
    edited_at: null,
    deleted: false,
    system: false,
    client_id: clientId,
    pending: true,
  };
}

/**
 * The id just below `id` (ObjectId hex, minus one): `after` of it asks the hub's history for
 * that message itself and the newer ones, to load the history around a message. null for an
 * id that is not 24 hex digits.
 */
export function idBefore(id: string): string | null {
  if (!/^[0-9a-f]{24}$/.test(id)) return null;
  const value = BigInt(`0x${id}`);
  if (value === 0n) return null;
  return (value - 1n).toString(16).padStart(24, "0");
}

/**
 * Where a private dialog shows "seen": the newest of the user's own stored messages the other
 * person has read up to (`peerReadId`, their read mark). null when they have read none of
 * them. Messages not yet stored, and deleted ones, are never marked.
 */
export function seenMessageId(messages: readonly Message[], meId: string, peerReadId: string | null | undefined): string | null {
  if (!peerReadId) return null;
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i];
    if (isUnconfirmed(m) || m.deleted || m.author_id !== meId) continue;
    if (compareIds(m.id, peerReadId) <= 0) return m.id;
  }
  return null;
}

/** The later of two read marks (a mark only moves forward). */
export function laterMark(a: string | null | undefined, b: string | null | undefined): string | null {
  if (!a) return b ?? null;
  if (!b) return a;
  return compareIds(a, b) >= 0 ? a : b;
}

/** Group a message list by calendar day (local time) for day separators in the log. */
export function dayKey(iso: string): string {
  const d = new Date(iso);
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}
