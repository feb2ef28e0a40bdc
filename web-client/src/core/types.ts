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
  counters?: { im?: ImCounters; tasks?: TaskCounters };
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

// tasks (server/tasks/models.py) -------------------------------------------------------------------

export type TaskStatusName =
  | "new"
  | "pending"
  | "in_progress"
  | "awaiting_control"
  | "completed"
  | "deferred"
  | "declined";

export type TaskPriority = "low" | "medium" | "high";

/** TaskOut: a task as one user sees it (`my_roles`, `allowed_actions` and `unseen_*` are theirs). */
export interface Task {
  id: string;
  title: string;
  description: string;
  /** 1 new, 2 pending, 3 in progress, 4 awaiting control, 5 completed, 6 deferred, 7 declined */
  status: number;
  status_name: TaskStatusName;
  overdue: boolean;
  author_id: string;
  responsible_id: string;
  participant_ids: string[];
  observer_ids: string[];
  group_id: string | null;
  parent_id: string | null;
  master_id: string | null;
  predecessor_ids: string[];
  tags: string[];
  priority: TaskPriority;
  deadline: string | null;
  planned_start: string | null;
  planned_end: string | null;
  require_approval: boolean;
  responsible_may_change_deadline: boolean;
  include_in_report: boolean;
  rating: "positive" | "negative" | null;
  time_spent_seconds: number;
  timer_started_at: string | null;
  created_at: string;
  updated_at: string;
  closed_at: string | null;
  comment_count: number;
  my_roles: string[];
  allowed_actions: string[];
  unseen_updates: number;
  unseen_comments: number;
}

/** TaskCreate: with several `responsible_ids` the hub makes a master task and one copy each. */
export interface TaskCreate {
  title: string;
  description?: string;
  responsible_ids: string[];
  participant_ids?: string[];
  observer_ids?: string[];
  group_id?: string | null;
  parent_id?: string | null;
  predecessor_ids?: string[];
  tags?: string[];
  priority?: TaskPriority;
  deadline?: string | null;
  planned_start?: string | null;
  planned_end?: string | null;
  require_approval?: boolean;
  responsible_may_change_deadline?: boolean;
  include_in_report?: boolean;
}

export interface TaskUpdate {
  title?: string;
  description?: string;
  priority?: TaskPriority;
  deadline?: string | null;
  rating?: "positive" | "negative" | null;
  [field: string]: unknown;
}

export interface TaskComment {
  id: string;
  task_id: string;
  author_id: string;
  text: string;
  created_at: string;
}

export interface TaskHistoryEntry {
  id: string;
  task_id: string;
  user_id: string | null;
  /** created, action, field, comment, overdue */
  kind: string;
  action?: string | null;
  field?: string | null;
  before?: unknown;
  after?: unknown;
  at: string;
}

/** One role's task counters (server/tasks/rules.py `RoleCounters`). */
export interface RoleCounters {
  new: number;
  in_progress: number;
  awaiting_control: number;
  overdue: number;
  expiring_soon: number;
  without_deadline: number;
  deferred: number;
  new_comments: number;
}

export interface TaskCounters {
  responsible: RoleCounters;
  participant: RoleCounters;
  observer: RoleCounters;
  author: RoleCounters;
  total: RoleCounters;
}

/** `task.updated` on the personal stream: the task with the recipient's roles and actions. */
export interface TaskUpdatedData {
  task: Task;
  changed: string[];
  by: string | null;
  action?: string;
  comment?: TaskComment;
}

export interface TaskRemovedData {
  task_id: string;
  by: string | null;
}

export interface Workgroup {
  id: string;
  name: string;
  description: string;
  owner_id: string;
  member_ids: string[];
  moderator_ids: string[];
}
