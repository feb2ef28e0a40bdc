// The dialog list: one entry per chat, newest activity first. No Vue, no DOM.

import { compareIds } from "./messages";
import type { Chat, Message } from "./types";

/** When a chat last saw activity: its newest message, or its creation. */
export function lastActivity(chat: Chat): string {
  return chat.last_message?.created_at ?? chat.created_at;
}

/** Newest activity first; ties by newest chat id, so the order is stable. */
export function compareChats(a: Chat, b: Chat): number {
  const ta = Date.parse(lastActivity(a));
  const tb = Date.parse(lastActivity(b));
  if (ta !== tb) return tb - ta;
  return compareIds(b.id, a.id);
}

export function sortChats(chats: readonly Chat[]): Chat[] {
  return [...chats].sort(compareChats);
}

/** Insert or replace a chat (e.g. im.chat.joined, a dialog opened), keeping a newer preview. */
export function upsertChat(chats: readonly Chat[], chat: Chat): Chat[] {
  const known = chats.find((c) => c.id === chat.id);
  const merged = known ? { ...chat, last_message: newerPreview(known.last_message, chat.last_message) } : chat;
  return sortChats([...chats.filter((c) => c.id !== chat.id), merged]);
}

export function removeChat(chats: readonly Chat[], chatId: string): Chat[] {
  return chats.filter((c) => c.id !== chatId);
}

function newerPreview(a: Message | null, b: Message | null): Message | null {
  if (!a) return b;
  if (!b) return a;
  const order = compareIds(a.id, b.id);
  if (order !== 0) return order > 0 ? a : b;
  return (b.edited_at ?? "") >= (a.edited_at ?? "") || b.deleted ? b : a;
}

/** A message arrived, was edited or deleted: refresh the chat's preview and order. */
export function applyMessage(chats: readonly Chat[], message: Message): Chat[] {
  const chat = chats.find((c) => c.id === message.chat_id);
  if (!chat) return [...chats];
  const last = newerPreview(chat.last_message, message);
  if (last === chat.last_message) return [...chats];
  return sortChats(chats.map((c) => (c.id === chat.id ? { ...c, last_message: last } : c)));
}

/** Members changed (im.chat.members). */
export function applyMembers(chats: readonly Chat[], chatId: string, memberIds: string[]): Chat[] {
  return chats.map((c) => (c.id === chatId ? { ...c, member_ids: [...memberIds] } : c));
}

/** The other member of a private dialog. */
export function peerOf(chat: Chat, me: string): string | undefined {
  if (chat.kind !== "private") return undefined;
  return chat.member_ids.find((m) => m !== me);
}

/** The private dialog with `userId`, if there is one. */
export function privateChatWith(chats: readonly Chat[], me: string, userId: string): Chat | undefined {
  return chats.find((c) => c.kind === "private" && peerOf(c, me) === userId);
}

/** A one-line preview of a chat's newest message. */
/** A message in one line: its text, or the names of its files when it has no text. */
export function messageSummary(m: Pick<Message, "text" | "files">): string {
  const text = m.text.replace(/\s+/g, " ").trim();
  if (text || !m.files?.length) return text;
  return `📎 ${m.files.map((f) => f.name).join(", ")}`;
}

export function previewText(chat: Chat, me: string, names: Record<string, string>): string {
  const m = chat.last_message;
  if (!m) return chat.kind === "group" ? `${chat.member_ids.length} members` : "No messages yet";
  const text = m.deleted ? "Message deleted" : messageSummary(m);
  if (m.author_id === me) return `You: ${text}`;
  if (chat.kind === "group" && m.author_id) {
    const name = names[m.author_id];
    if (name) return `${name.split(" ")[0]}: ${text}`;
  }
  return text;
}

/** Filter the dialog list by a search text (title). */
export function filterChats(chats: readonly Chat[], query: string): Chat[] {
  const q = query.trim().toLowerCase();
  if (!q) return [...chats];
  return chats.filter((c) => c.title.toLowerCase().includes(q));
}

/** A group chat renamed (im.chat.updated). */
export function renameChat(chats: readonly Chat[], chatId: string, title: string): Chat[] {
  return chats.map((c) => (c.id === chatId && c.kind === "group" ? { ...c, title } : c));
}

/** The first names of a group chat's other members, for its header. */
export function groupMembersLine(chat: Chat, names: Record<string, string>, me: string): string {
  return chat.member_ids
    .filter((m) => m !== me)
    .map((m) => (names[m] ?? "").split(" ")[0] ?? "")
    .filter(Boolean)
    .join(", ");
}
