// Shapes of the hub's REST resources and Socket.IO events (see server/*/models.py).

export type PresenceStatus = "online" | "away" | "dnd" | "offline";
export type ManualStatus = "away" | "dnd";

export interface Phone {
  type: "work" | "mobile" | "home" | "other";
  number: string;
}

export interface User {
  id: string;
  login: string;
  email: string;
  first_name: string;
  last_name: string;
  name: string;
  position: string;
  phones: Phone[];
  department_id: string | null;
  is_admin: boolean;
  is_external: boolean;
  is_active: boolean;
  created_at: string;
}

export interface Department {
  id: string;
  name: string;
  parent_id: string | null;
  head_id: string | null;
}

export interface Message {
  id: string;
  chat_id: string;
  author_id: string | null;
  text: string;
  created_at: string;
  edited_at: string | null;
  deleted: boolean;
  system: boolean;
  client_id: string | null;
  /** Client-only: an optimistic copy not yet confirmed by the hub. */
  pending?: boolean;
  /** Client-only: sending failed; the user may retry (same client_id). */
  failed?: boolean;
}

export type ChatKind = "private" | "group" | "system";

export interface Chat {
  id: string;
  kind: ChatKind;
  title: string;
  member_ids: string[];
  owner_id: string | null;
  workgroup_id: string | null;
  stream: string;
  created_at: string;
  last_message: Message | null;
}

export interface Dialog {
  chat: Chat;
  unread: number;
  last_read_id: string | null;
}

export interface ImCounters {
  unread: number;
  chats: Record<string, number>;
}

export interface ImSettings {
  sound: boolean;
}

export interface SendResult {
  messages: Message[];
  duplicate: boolean;
}

export interface PresenceView {
  user_id: string;
  status: PresenceStatus;
  last_seen?: string | null;
  until?: string | null;
  manual?: ManualStatus | null;
  invisible?: boolean | null;
}

export interface Snapshot {
  counters?: { im?: ImCounters };
  presence?: Record<string, PresenceStatus>;
  settings?: { im?: ImSettings };
  streams: Record<string, number>;
}

/** A persisted event as it travels over the wire, live or replayed. */
export interface Envelope<T = Record<string, unknown>> {
  stream: string;
  seq: number;
  type: string;
  data: T;
  ts: string;
}

export interface ChatJoinedData {
  chat: Chat;
  join_stream: string;
  from_seq: number;
}

export interface ChatLeftData {
  chat_id: string;
  leave_stream: string;
}

export interface ChatMembersData {
  chat_id: string;
  added: string[];
  removed: string[];
  member_ids: string[];
}

export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  errors?: { loc: string[]; msg: string; type: string }[];
}
