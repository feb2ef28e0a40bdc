import type { Chat, Message, Task } from "../src/core/types";

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

export function task(id: string, over: Partial<Task> = {}): Task {
  return {
    id,
    title: `Task ${id}`,
    description: "",
    status: 1,
    status_name: "new",
    overdue: false,
    author_id: "boss",
    responsible_id: "me",
    participant_ids: [],
    observer_ids: [],
    group_id: null,
    parent_id: null,
    master_id: null,
    predecessor_ids: [],
    tags: [],
    priority: "medium",
    deadline: null,
    planned_start: null,
    planned_end: null,
    require_approval: false,
    responsible_may_change_deadline: false,
    include_in_report: true,
    rating: null,
    time_spent_seconds: 0,
    timer_started_at: null,
    created_at: "2026-03-01T09:00:00.000Z",
    updated_at: "2026-03-01T09:00:00.000Z",
    closed_at: null,
    comment_count: 0,
    my_roles: ["responsible"],
    allowed_actions: ["accept", "comment", "complete", "copy", "decline", "defer", "start"],
    unseen_updates: 0,
    unseen_comments: 0,
    ...over,
  };
}
