import type { Chat, Message } from "../src/core/types";

/** ObjectId-like ids: 24 hex digits, ordered by `n`. */
export function oid(n: number): string {
  return n.toString(16).padStart(24, "0");
}

export function msg(n: number, over: Partial<Message> = {}): Message {
  return {
    id: oid(n),
    chat_id: "c1",
    author_id: "other",
    text: `message ${n}`,
    created_at: new Date(Date.UTC(2026, 0, 1, 12, 0, n)).toISOString(),
    edited_at: null,
    deleted: false,
    system: false,
    client_id: null,
    ...over,
  };
}

export function chat(id: string, over: Partial<Chat> = {}): Chat {
  return {
    id,
    kind: "private",
    title: `Chat ${id}`,
    member_ids: ["me", "other"],
    owner_id: null,
    workgroup_id: null,
    stream: `chat:${id}`,
    created_at: "2026-01-01T00:00:00.000Z",
    last_message: null,
    ...over,
  };
}
