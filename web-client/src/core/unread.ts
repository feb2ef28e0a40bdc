// Unread counters: the hub's values are authoritative (snapshot, counters.changed, the answer
// to a read); between those, the client counts new messages by the same rules as the hub
// (server/im/service.py `_unread_in`): messages by others, not deleted, newer than the
// member's last read message. No Vue, no DOM.

import { compareIds } from "./messages";
import type { ImCounters, Message } from "./types";

export interface UnreadState {
  /** chat id -> unread messages (absent = 0) */
  chats: Record<string, number>;
  /** chat id -> id of the newest message the user has read */
  lastRead: Record<string, string | null>;
}

export function emptyUnread(): UnreadState {
  return { chats: {}, lastRead: {} };
}

export function total(state: UnreadState): number {
  let sum = 0;
  for (const n of Object.values(state.chats)) sum += n;
  return sum;
}

/** Replace the counts with the hub's (snapshot, counters.changed, read answer). */
export function applyCounters(state: UnreadState, counters: ImCounters): UnreadState {
  const chats: Record<string, number> = {};
  for (const [chat, n] of Object.entries(counters.chats ?? {})) if (n > 0) chats[chat] = n;
  return { ...state, chats };
}

export interface Context {
  /** The current user's id. */
  me: string;
  /** The message's chat is open, the page visible and focused: it is read at once. */
  readingNow: boolean;
  /** The event is newer than the counters the client already has (see StreamTracker). */
  afterSnapshot: boolean;
}

/** Whether a new message raises its chat's unread count. */
export function countsAsUnread(state: UnreadState, message: Message, ctx: Context): boolean {
  if (!ctx.afterSnapshot || ctx.readingNow) return false;
  if (message.author_id === ctx.me || message.deleted) return false;
  const lastRead = state.lastRead[message.chat_id];
  return lastRead == null || compareIds(message.id, lastRead) > 0;
}

/** A new message (im.message). */
export function onMessage(state: UnreadState, message: Message, ctx: Context): UnreadState {
  if (message.author_id === ctx.me) {
    // The hub moves the author's read mark to their own message.
    return markedRead(state, message.chat_id, message.id, false);
  }
  if (!countsAsUnread(state, message, ctx)) return state;
  const chats = { ...state.chats, [message.chat_id]: (state.chats[message.chat_id] ?? 0) + 1 };
  return { ...state, chats };
}

/** A message was deleted (im.message.deleted): an unread one stops counting. */
export function onDeleted(state: UnreadState, message: Message, ctx: Context): UnreadState {
  if (!ctx.afterSnapshot || message.author_id === ctx.me) return state;
  const n = state.chats[message.chat_id] ?? 0;
  const lastRead = state.lastRead[message.chat_id];
  if (n <= 0 || (lastRead != null && compareIds(message.id, lastRead) <= 0)) return state;
  return withCount(state, message.chat_id, n - 1);
}

/**
 * The user read up to `upTo` (im.read from one of their devices, or their own read call).
 * With `clear`, the chat's count is set to 0 (reading up to the newest message known);
 * counters.changed follows anyway with the exact value.
 */
export function markedRead(
  state: UnreadState,
  chatId: string,
  upTo: string,
  clear: boolean,
): UnreadState {
  const previous = state.lastRead[chatId];
  const lastRead =
    previous != null && compareIds(previous, upTo) >= 0
      ? state.lastRead
      : { ...state.lastRead, [chatId]: upTo };
  const next = { ...state, lastRead };
  return clear ? withCount(next, chatId, 0) : next;
}

export function forgetChat(state: UnreadState, chatId: string): UnreadState {
  const chats = { ...state.chats };
  delete chats[chatId];
  const lastRead = { ...state.lastRead };
  delete lastRead[chatId];
  return { chats, lastRead };
}

function withCount(state: UnreadState, chatId: string, n: number): UnreadState {
  const chats = { ...state.chats };
  if (n > 0) chats[chatId] = n;
  else delete chats[chatId];
  return { ...state, chats };
}

/** Whether the open dialog should be marked read now, and up to which message. */
export function readTarget(
  lastRead: string | null | undefined,
  newest: Message | undefined,
  unread: number,
): string | undefined {
  if (!newest) return undefined;
  if (lastRead != null && compareIds(newest.id, lastRead) <= 0 && unread === 0) return undefined;
  return newest.id;
}

/** The badge text: nothing for 0, "99+" past 99. */
export function badge(n: number): string {
  if (n <= 0) return "";
  return n > 99 ? "99+" : String(n);
}
