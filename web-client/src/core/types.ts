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
  /** IANA name; null: the portal's default (CRM "due today" is counted in it). */
  time_zone?: string | null;
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
  /** Private dialogs: the other person's read mark ("seen"); null for group chats. */
  peer_last_read_id?: string | null;
}

export interface ImCounters {
  unread: number;
  chats: Record<string, number>;
}

export interface ImSettings {
  sound: boolean;
  /** What sends a message: Enter (Shift+Enter a new line), or Ctrl+Enter (Enter a new line). */
  send_key?: "enter" | "ctrl_enter";
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
  counters?: { im?: ImCounters; tasks?: TaskCounters; crm?: Partial<Record<CrmRecordType, Partial<CrmBadge>>> };
  presence?: Record<string, PresenceStatus>;
  settings?: { im?: ImSettings };
  /** CRM administrators: how many mails wait on the unmatched list. */
  mail?: { unmatched?: number };
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
  /** The PATCH fields the caller may change now, field by field (the hub's own rule). */
  editable_fields?: string[];
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
  responsible_id?: string;
  participant_ids?: string[];
  observer_ids?: string[];
  group_id?: string | null;
  require_approval?: boolean;
  responsible_may_change_deadline?: boolean;
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

// CRM (server/crm/models.py, server/counters/rules.py) ---------------------------------------------

export type CrmRecordType = "lead" | "contact" | "company" | "deal";
export type CrmColour = "none" | "green" | "red" | "red-green" | "gray";
export type CrmDot = "blue" | "gray";

/** The activity column of a record list, for the caller. */
export interface CrmIndicator {
  number: number;
  colour: CrmColour;
  dot: CrmDot | null;
}

export interface TypedEmail {
  type: "work" | "home" | "other";
  value: string;
}

export interface TypedPhone {
  type: "work" | "mobile" | "home" | "fax" | "other";
  number: string;
}

/** RecordOut: a lead, contact, company or deal as one user sees it. */
export interface CrmRecord {
  id: string;
  type: CrmRecordType;
  /** Contacts: the full name. */
  title: string;
  first_name?: string | null;
  last_name?: string | null;
  company_title?: string | null;
  /** Leads: new, in_progress, processed, converted, junk. */
  status?: string | null;
  /** Deals. */
  stage_id?: string | null;
  open: boolean;
  amount?: number | null;
  currency?: string | null;
  responsible_id: string;
  emails: TypedEmail[];
  phones: TypedPhone[];
  source: string;
  comments: string;
  custom_fields: Record<string, unknown>;
  company_ids?: string[] | null;
  company_id?: string | null;
  contact_ids?: string[] | null;
  lead_id?: string | null;
  converted?: Record<string, string> | null;
  created_by: string;
  created_at: string;
  modified_by: string;
  modified_at: string;
  open_activities: number;
  indicator: CrmIndicator;
}

export interface CrmRecordRef {
  type: CrmRecordType;
  id: string;
  title: string;
}

export type CrmLinkKey = "company" | "contact" | "deal" | "converted";

/** RecordDetail: the record with its links. */
export interface CrmRecordDetail extends CrmRecord {
  links: Partial<Record<CrmLinkKey, CrmRecordRef[]>>;
}

export interface CrmRecordList {
  records: CrmRecord[];
  next_cursor: string | null;
  /** The companies and contacts the page links to that the caller may see, by id. */
  linked?: Record<string, CrmRecordRef>;
}

export interface CrmRecordQuery {
  q?: string;
  responsible_id?: string;
  activity_responsible_id?: string;
  status?: string;
  open?: boolean;
  counted?: boolean;
  limit?: number;
  cursor?: string;
}

/** The writable fields of a record (create and PATCH bodies). */
export interface CrmRecordBody {
  title?: string;
  first_name?: string;
  last_name?: string;
  company_title?: string;
  status?: string;
  stage_id?: string;
  amount?: number | null;
  currency?: string;
  responsible_id?: string;
  emails?: TypedEmail[];
  phones?: TypedPhone[];
  source?: string;
  comments?: string;
  company_id?: string | null;
  company_ids?: string[];
  contact_ids?: string[];
  ignore_duplicates?: boolean;
}

export type CrmMatched = "email" | "phone" | "name" | "company";

/** A matching record the caller may see. */
export interface CrmDuplicateMatch {
  type: CrmRecordType;
  id: string;
  title: string;
  responsible_id: string;
  matched: CrmMatched[];
}

/** What duplicate control answers: the visible matches, and whether records the caller may not
 * see match too (nothing else is told about those). */
export interface CrmDuplicates {
  duplicates: CrmDuplicateMatch[];
  hidden: boolean;
}

export interface CrmDuplicateProbe {
  type: CrmRecordType;
  first_name: string;
  last_name: string;
  title: string;
  company_title: string;
  emails: string[];
  phones: string[];
  exclude_id?: string;
}

export type CrmConversionMode =
  | "contact"
  | "company"
  | "contact+company"
  | "deal"
  | "deal+contact"
  | "deal+contact+company";

/** POST /crm/leads/{id}/convert */
export interface CrmConvertBody {
  mode: CrmConversionMode;
  /** An existing contact / company to use instead of making one. */
  contact_id?: string;
  company_id?: string;
  /** Where the lead's e-mails go (default: the deal, else the contact, else the company). */
  emails_to?: CrmRecordType;
  ignore_duplicates?: boolean;
}

/** GET /crm/leads/{id}/convert/candidates */
export interface CrmConversionCandidates {
  contacts: CrmDuplicateMatch[];
  companies: CrmDuplicateMatch[];
  hidden: boolean;
}

export interface CrmConversionResult {
  lead: CrmRecord;
  created: Partial<Record<CrmRecordType, CrmRecord>>;
}

export interface CrmHistoryEntry {
  id: string;
  record_type: CrmRecordType;
  record_id: string;
  user_id: string | null;
  kind: string;
  field?: string | null;
  before?: unknown;
  after?: unknown;
  at: string;
}

export type CrmActivityType = "call" | "meeting" | "email" | "task" | "message";
export type CrmActivityState = "incoming" | "overdue" | "due" | "future" | "completed";

export interface CrmActivity {
  id: string;
  owner_type: CrmRecordType;
  owner_id: string;
  owner_title: string;
  type: CrmActivityType;
  direction: "incoming" | "outgoing";
  missed: boolean;
  subject: string;
  description: string;
  responsible_id: string;
  deadline: string | null;
  completed: boolean;
  completed_at: string | null;
  /** For the receiver's time zone and the due-window setting. */
  state: CrmActivityState;
  created_by: string;
  created_at: string;
  modified_at: string;
  /** E-mail activities of the mail bridge: the mail (bodies only from GET /crm/activities/{id}). */
  mail?: CrmActivityMail | null;
}

export interface CrmActivityCreate {
  owner_type: CrmRecordType;
  owner_id: string;
  type: CrmActivityType;
  direction: "incoming" | "outgoing";
  subject: string;
  description?: string;
  responsible_id?: string;
  deadline?: string | null;
  completed?: boolean;
  missed?: boolean;
}

export interface CrmActivityUpdate {
  subject?: string;
  description?: string;
  responsible_id?: string;
  deadline?: string | null;
  completed?: boolean;
}

export interface CrmActivityQuery {
  responsible_id?: string;
  owner_type?: CrmRecordType;
  owner_id?: string;
  type?: CrmActivityType;
  status?: "open" | "completed" | "all";
  deadline?: "incoming" | "overdue" | "due" | "future";
  limit?: number;
}

export type CrmRoleName = "none" | "manager" | "head" | "chief" | "admin";

export interface CrmMe {
  role: CrmRoleName;
  sees_others: boolean;
  may_manage_settings: boolean;
  time_zone: string;
}

export interface CrmStage {
  id: string;
  name: string;
  semantics: "process" | "won" | "lost";
}

export interface CrmFieldDef {
  code: string;
  name: string;
  type: "string" | "number" | "date" | "bool" | "list";
  options: string[];
  required: boolean;
}

export interface CrmSettings {
  counter_mode: "item" | "activity";
  due_minutes_before: number | null;
  deal_stages: CrmStage[];
  custom_fields: Partial<Record<CrmRecordType, CrmFieldDef[]>>;
  default_role: CrmRoleName;
}

export interface CrmRoleGrant {
  id: string;
  role: CrmRoleName;
  subject_kind: "user" | "department" | "workgroup";
  subject_id: string;
}

/** One record type's counters (server/counters/rules.py `Badge.as_dict`). */
export interface CrmBadge {
  incoming: number;
  due: number;
  overdue: number;
  total: number;
  idle: number;
  colour: CrmColour;
}

export type CrmCounters = Record<CrmRecordType, CrmBadge>;

/** `crm.record.updated`: the record with the receiver's indicator. */
export interface CrmRecordUpdatedData {
  record: CrmRecord;
}

export interface CrmRecordRemovedData {
  type: CrmRecordType;
  id: string;
  /** Merged into this record (the survivor), which is shown instead. */
  merged_into?: string;
}

export interface CrmActivityUpdatedData {
  activity: CrmActivity;
}

export interface CrmActivityRemovedData {
  id: string;
  owner_id: string;
}

// mail bridge (server/mailbridge/models.py, server/crm/models.py ActivityMail) -----------------------

export type MailStatus = "queued" | "retrying" | "sent" | "failed" | "bounced";
export type MailMatch = "code" | "thread" | "rule" | "sender" | "new_lead" | "assigned";

export interface MailAttachment {
  /** For GET /mail/attachments/{id}; null: not kept. */
  id: string | null;
  filename: string;
  content_type: string;
  size: number;
}

/** The mail behind an e-mail activity. */
export interface CrmActivityMail {
  /** Outgoing: the delivery status; incoming: null. */
  status: MailStatus | null;
  error: string | null;
  from_address: string | null;
  from_name: string | null;
  to: string[];
  cc: string[];
  /** Outgoing: the blind copies. */
  bcc?: string[];
  /** Incoming: when the sender wrote it (its Date: header), and when the hub received it. */
  date?: string | null;
  received_at?: string | null;
  message_id: string | null;
  code: string | null;
  match: string | null;
  /** A valid code, or a reply in a thread of ours, from an address not on the record. */
  flagged: boolean;
  /** Incoming: the trusted mail server in front says the sender failed authentication. */
  suspicious: boolean;
  /** What failed, e.g. "dmarc=fail (header.from=client.example)". */
  suspicious_reason: string | null;
  auto_reply: boolean;
  in_reply_to_activity: string | null;
  bounced_recipients: string[];
  attachments: MailAttachment[];
  /** Bodies: only in GET /crm/activities/{id}. The sanitised HTML. */
  html: string | null;
  /** The whole text, quoted history included. */
  text: string | null;
  /** The quoted history that the activity's description leaves out. */
  quoted: string | null;
}

export interface SendEmailBody {
  to: string[];
  cc?: string[];
  bcc?: string[];
  /** The e-mail activity answered: the mail continues its thread and keeps its code. */
  in_reply_to?: string;
  subject?: string;
  text?: string;
  html?: string;
  template_id?: string;
  attachment_ids?: string[];
  bulk?: boolean;
}

export interface SentEmail {
  activity_id: string;
  to: string[];
  cc?: string[];
  bcc?: string[];
  message_id: string;
  code: string;
  status: string;
}

/** POST /mail/attachments */
export interface UploadedAttachment {
  id: string;
  filename: string;
  content_type: string;
  size: number;
}

export interface MailInfo {
  address: string;
  smtp_port: number | null;
  lmtp_port: number | null;
  relay_configured: boolean;
}

export interface SubjectRuleIn {
  pattern: string;
  record_type: CrmRecordType;
  field: string;
}

export interface SubjectRule extends SubjectRuleIn {
  id: string;
}

export interface MailSettings {
  code_in: "subject" | "body";
  create_leads: boolean;
  lead_exceptions: string[];
  max_new_leads_per_sender: number;
  lead_period_minutes: number;
  /** All senders together, per clock hour; past it mail waits in the unmatched list. */
  max_new_leads_per_hour?: number;
  lead_responsible_id: string | null;
  subject_rules: SubjectRule[];
}

/** POST /crm/{records}/{id}/emails/preview */
export interface EmailPreview {
  to: string[];
  subject: string;
  text: string;
  html: string | null;
}

export interface MailSettingsUpdate {
  code_in?: "subject" | "body";
  create_leads?: boolean;
  lead_exceptions?: string[];
  max_new_leads_per_sender?: number;
  max_new_leads_per_hour?: number;
  lead_period_minutes?: number;
  lead_responsible_id?: string | null;
  subject_rules?: SubjectRuleIn[];
}

export interface MailTemplateIn {
  name: string;
  subject: string;
  text: string;
}

export interface MailTemplate extends MailTemplateIn {
  id: string;
}

export type MailboxSecurity = "tls" | "starttls" | "none";
/** password: LOGIN; xoauth2: AUTHENTICATE XOAUTH2 with a token from the OAuth client. */
export type MailboxAuth = "password" | "xoauth2";

/** OAuthClientIn: the OAuth client XOAUTH2 gets its access tokens from (refresh flow). */
export interface OAuthClientIn {
  client_id: string;
  client_secret: string;
  token_url: string;
  refresh_token: string;
  scope: string | null;
}

/** OAuthClientOut: as shown, without the secret and the refresh token. */
export interface OAuthClientOut {
  client_id: string;
  token_url: string;
  scope: string | null;
}

/** MailboxIn: the body of POST /mail/mailboxes and /mail/mailboxes/test. */
export interface MailboxIn {
  name: string;
  host: string;
  port: number;
  security: MailboxSecurity;
  auth: MailboxAuth;
  login: string;
  /** For auth password. */
  password?: string;
  /** For auth xoauth2. */
  oauth?: OAuthClientIn;
  folder: string;
  processed_folder: string | null;
  delete_after_delivery: boolean;
  poll_seconds: number;
  enabled: boolean;
}

/** PATCH: fields left out keep their value; so do the OAuth client's secret and token. */
export type MailboxUpdate = Partial<Omit<MailboxIn, "oauth">> & { oauth?: Partial<OAuthClientIn> };

export interface MailboxState {
  uidvalidity?: number | null;
  last_uid?: number | null;
  connected?: boolean;
  idle?: boolean;
  last_error?: string | null;
  last_poll_at?: string | null;
}

/** A message the collector left on the IMAP server as too large. */
export interface SkippedMail {
  uid: number;
  size: number;
  reason: string;
  at: string;
}

export interface Mailbox extends Omit<MailboxIn, "password" | "oauth"> {
  id: string;
  oauth?: OAuthClientOut | null;
  state: MailboxState;
  /** The latest 20 messages left on the server as too large, newest first. */
  skipped?: SkippedMail[];
}

export interface ConnectionTest {
  ok: boolean;
  detail: string;
  capabilities: string[];
  messages: number | null;
}

export interface UnmatchedMail {
  id: string;
  received_at: string;
  from_address: string;
  subject: string;
  reason: string;
  candidates: CrmRecordRef[];
  /** refused: unsafe to parse; it can be downloaded or dismissed, not assigned. */
  status?: "unmatched" | "refused";
  /** Bytes as received. */
  size?: number;
  /** The sender failed authentication at the mail server in front: the candidates are whose
   * address it claims, not who wrote it. */
  suspicious?: boolean;
  from_name?: string;
  /** Its Date: header. */
  date?: string | null;
  /** The beginning of its new text. */
  preview?: string;
  /** How often it came (the same Message-ID by another path). */
  copies?: number;
}
