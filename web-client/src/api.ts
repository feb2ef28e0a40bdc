// REST client for /api/v1: JSON in, JSON out, problem+json errors as ApiError.

import type { XmppAccount } from "./core/jabber";
import { PLURAL } from "./core/crm";
import { ApiError } from "./core/problem";
import type {
  Chat,
  ConnectionTest,
  CrmActivity,
  CrmActivityCreate,
  CrmActivityQuery,
  CrmActivityUpdate,
  CrmConversionCandidates,
  CrmConvertBody,
  CrmConversionResult,
  CrmCounters,
  CrmDuplicateProbe,
  CrmDuplicates,
  CrmHistoryEntry,
  CrmMe,
  CrmRecordBody,
  CrmRecordDetail,
  CrmRecordList,
  CrmRecordQuery,
  CrmRecordType,
  CrmRoleGrant,
  CrmSettings,
  Department,
  Dialog,
  FileRef,
  ImCounters,
  ImSettings,
  Mailbox,
  MailboxIn,
  MailboxUpdate,
  MailInfo,
  MailSettings,
  MailSettingsUpdate,
  MailTemplate,
  MailTemplateIn,
  ManualStatus,
  Message,
  PresenceView,
  SendEmailBody,
  SendResult,
  EmailPreview,
  SentEmail,
  SubjectRuleIn,
  Task,
  TaskComment,
  TaskCounters,
  TaskCreate,
  TaskHistoryEntry,
  TaskUpdate,
  UnmatchedMail,
  UploadedAttachment,
  User,
  Workgroup,
} from "./core/types";

type Method = "GET" | "POST" | "PUT" | "PATCH" | "DELETE";

export class Api {
  token: string | null = null;
  /** Called when the hub says the token is no longer valid. */
  onUnauthorized: () => void = () => {};

  async call<T>(method: Method, path: string, body?: unknown): Promise<T> {
    const response = await this.fetch(method, path, {
      body: body === undefined ? undefined : JSON.stringify(body),
      contentType: body === undefined ? undefined : "application/json",
    });
    return this.answer<T>(response, path);
  }

  /** A request with the token; a network failure as ApiError(0). */
  private async fetch(
    method: Method,
    path: string,
    options: { body?: BodyInit; contentType?: string; accept?: string } = {},
  ): Promise<Response> {
    const headers: Record<string, string> = { Accept: options.accept ?? "application/json" };
    if (options.contentType) headers["Content-Type"] = options.contentType;
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    try {
      return await fetch(`/api/v1${path}`, { method, headers, body: options.body });
    } catch {
      throw new ApiError(0, { title: "Network error", detail: "The hub cannot be reached. Check your connection." });
    }
  }

  /** The JSON of an answer, or its problem as ApiError. */
  private async answer<T>(response: Response, path: string): Promise<T> {
    if (response.status === 204) return undefined as T;
    const text = await response.text();
    let data: unknown = undefined;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = undefined;
      }
    }
    if (!response.ok) {
      const problem = typeof data === "object" && data !== null ? data : { detail: text.slice(0, 200) };
      const error = new ApiError(response.status, problem);
      if (response.status === 401 && this.token && !path.startsWith("/auth/login")) this.onUnauthorized();
      throw error;
    }
    return data as T;
  }

  login(login: string, password: string) {
    return this.call<{ token: string; user: User }>("POST", "/auth/login", { login, password });
  }
  logout() {
    return this.call<void>("POST", "/auth/logout");
  }
  me() {
    return this.call<User>("GET", "/users/me");
  }
  users(query: string) {
    return this.call<User[]>("GET", `/users?${query}`);
  }
  /** One user; 404 when they do not exist or the caller may not see them. */
  user(userId: string) {
    return this.call<User>("GET", `/users/${encodeURIComponent(userId)}`);
  }
  departments() {
    return this.call<Department[]>("GET", "/departments");
  }
  dialogs() {
    return this.call<Dialog[]>("GET", "/im/dialogs");
  }
  chat(chatId: string) {
    return this.call<Chat>("GET", `/im/chats/${encodeURIComponent(chatId)}`);
  }
  openDialog(userId: string) {
    return this.call<Chat>("POST", "/im/dialogs", { user_id: userId });
  }
  createChat(title: string, memberIds: string[]) {
    return this.call<Chat>("POST", "/im/chats", { title, member_ids: memberIds });
  }
  renameChat(chatId: string, title: string) {
    return this.call<Chat>("PATCH", `/im/chats/${encodeURIComponent(chatId)}`, { title });
  }
  addChatMembers(chatId: string, userIds: string[]) {
    return this.call<Chat>("POST", `/im/chats/${encodeURIComponent(chatId)}/members`, { user_ids: userIds });
  }
  /** Remove a member (the owner), or leave (oneself). */
  removeChatMember(chatId: string, userId: string) {
    return this.call<void>(
      "DELETE",
      `/im/chats/${encodeURIComponent(chatId)}/members/${encodeURIComponent(userId)}`,
    );
  }
  history(chatId: string, params: { before?: string; after?: string; limit?: number }) {
    const q = new URLSearchParams();
    if (params.before) q.set("before", params.before);
    if (params.after) q.set("after", params.after);
    q.set("limit", String(params.limit ?? 50));
    return this.call<Message[]>("GET", `/im/chats/${encodeURIComponent(chatId)}/messages?${q}`);
  }
  /**
   * A file for a chat, streamed as the request body. XMLHttpRequest rather than fetch: only it
   * reports upload progress (`onProgress` gets 0..1).
   */
  uploadFile(file: File, onProgress: (fraction: number) => void): Promise<FileRef> {
    const path = `/files?name=${encodeURIComponent(file.name || "file")}`;
    return new Promise<FileRef>((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/api/v1${path}`);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      if (this.token) xhr.setRequestHeader("Authorization", `Bearer ${this.token}`);
      xhr.upload.onprogress = (event) => {
        if (event.lengthComputable && event.total > 0) onProgress(event.loaded / event.total);
      };
      xhr.onerror = () =>
        reject(new ApiError(0, { title: "Network error", detail: "The hub cannot be reached. Check your connection." }));
      xhr.onload = () => {
        const response = new Response(xhr.responseText || null, {
          status: xhr.status,
          headers: { "Content-Type": xhr.getResponseHeader("Content-Type") ?? "" },
        });
        this.answer<FileRef>(response, path).then(resolve, reject);
      };
      xhr.send(file);
    });
  }
  /** A chat file's bytes (the token goes in the header, so no plain link). */
  file(fileId: string): Promise<Blob> {
    return this.blob(`/files/${encodeURIComponent(fileId)}`);
  }
  send(body: {
    chat_id?: string;
    to?: string[];
    to_department?: string;
    text: string;
    client_id: string;
    file_ids?: string[];
  }) {
    return this.call<SendResult>("POST", "/im/messages", body);
  }
  edit(messageId: string, text: string) {
    return this.call<Message>("PATCH", `/im/messages/${encodeURIComponent(messageId)}`, { text });
  }
  remove(messageId: string) {
    return this.call<void>("DELETE", `/im/messages/${encodeURIComponent(messageId)}`);
  }
  read(chatId: string, upTo: string) {
    return this.call<ImCounters>("POST", `/im/chats/${encodeURIComponent(chatId)}/read`, { up_to: upTo });
  }
  counters() {
    return this.call<ImCounters>("GET", "/im/counters");
  }
  search(q: string) {
    return this.call<Message[]>("GET", `/im/search?q=${encodeURIComponent(q)}&limit=50`);
  }
  settings() {
    return this.call<ImSettings>("GET", "/im/settings");
  }
  putSettings(settings: ImSettings) {
    return this.call<ImSettings>("PUT", "/im/settings", settings);
  }
  presence(ids: string[]) {
    return this.call<{ presence: PresenceView[] }>("GET", `/presence?ids=${ids.map(encodeURIComponent).join(",")}`);
  }
  setPresence(status: ManualStatus | null) {
    return this.call<PresenceView>("PUT", "/presence/me", { status });
  }
  /** Jabber client settings for the caller; 404 when XMPP is turned off. */
  xmppAccount() {
    return this.call<XmppAccount>("GET", "/xmpp/account");
  }

  // tasks -------------------------------------------------------------------------------------
  tasks(params: { role?: string; status?: string; limit?: number; offset?: number } = {}) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined) q.set(k, String(v));
    return this.call<{ tasks: Task[] }>("GET", `/tasks?${q}`);
  }
  /** The task; reading it marks it seen for the caller. */
  task(taskId: string) {
    return this.call<Task>("GET", `/tasks/${encodeURIComponent(taskId)}`);
  }
  createTask(body: TaskCreate) {
    return this.call<{ tasks: Task[] }>("POST", "/tasks", body);
  }
  updateTask(taskId: string, body: TaskUpdate) {
    return this.call<Task>("PATCH", `/tasks/${encodeURIComponent(taskId)}`, body);
  }
  /** Answers the task after the action (the new copy for `copy`), nothing for `delete`. */
  taskAction(taskId: string, action: string) {
    return this.call<Task | undefined>(
      "POST",
      `/tasks/${encodeURIComponent(taskId)}/actions/${encodeURIComponent(action)}`,
    );
  }
  taskComments(taskId: string) {
    return this.call<{ comments: TaskComment[] }>("GET", `/tasks/${encodeURIComponent(taskId)}/comments`);
  }
  commentTask(taskId: string, text: string) {
    return this.call<TaskComment>("POST", `/tasks/${encodeURIComponent(taskId)}/comments`, { text });
  }
  taskHistory(taskId: string) {
    return this.call<{ history: TaskHistoryEntry[] }>("GET", `/tasks/${encodeURIComponent(taskId)}/history`);
  }
  /** Every counter of the caller: messenger, tasks and CRM. */
  allCounters() {
    return this.call<{ im: ImCounters; tasks: TaskCounters; crm?: CrmCounters }>("GET", "/counters");
  }
  workgroups() {
    return this.call<Workgroup[]>("GET", "/workgroups");
  }

  // crm ---------------------------------------------------------------------------------------
  crmRecords(type: CrmRecordType, query: CrmRecordQuery = {}) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
    return this.call<CrmRecordList>("GET", `/crm/${PLURAL[type]}?${q}`);
  }
  crmRecord(type: CrmRecordType, id: string) {
    return this.call<CrmRecordDetail>("GET", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}`);
  }
  /** 409 `possible-duplicates` (with `duplicates`) unless `ignore_duplicates` is set. */
  createCrmRecord(type: CrmRecordType, body: CrmRecordBody) {
    return this.call<CrmRecordDetail>("POST", `/crm/${PLURAL[type]}`, body);
  }
  updateCrmRecord(type: CrmRecordType, id: string, body: CrmRecordBody) {
    return this.call<CrmRecordDetail>("PATCH", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}`, body);
  }
  deleteCrmRecord(type: CrmRecordType, id: string) {
    return this.call<void>("DELETE", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}`);
  }
  crmHistory(type: CrmRecordType, id: string) {
    return this.call<{ history: CrmHistoryEntry[] }>("GET", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}/history`);
  }
  crmDuplicates(probe: CrmDuplicateProbe) {
    return this.call<CrmDuplicates>("POST", "/crm/duplicates", probe);
  }
  /** Merge the duplicate `otherId` into the record `id`, which survives. */
  mergeCrmRecords(type: CrmRecordType, id: string, otherId: string) {
    return this.call<CrmRecordDetail>("POST", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}/merge`, {
      other_id: otherId,
    });
  }
  convertLead(id: string, body: CrmConvertBody) {
    return this.call<CrmConversionResult>("POST", `/crm/leads/${encodeURIComponent(id)}/convert`, body);
  }
  /** Existing contacts and companies the lead's conversion could use (the duplicate rules). */
  conversionCandidates(id: string) {
    return this.call<CrmConversionCandidates>("GET", `/crm/leads/${encodeURIComponent(id)}/convert/candidates`);
  }
  /** An e-mail activity put on another record. */
  moveCrmActivity(id: string, ownerType: CrmRecordType, ownerId: string) {
    return this.call<CrmActivity>("POST", `/crm/activities/${encodeURIComponent(id)}/move`, { owner_type: ownerType, owner_id: ownerId });
  }
  crmActivities(query: CrmActivityQuery = {}) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
    return this.call<{ activities: CrmActivity[] }>("GET", `/crm/activities?${q}`);
  }
  createCrmActivity(body: CrmActivityCreate) {
    return this.call<CrmActivity>("POST", "/crm/activities", body);
  }
  updateCrmActivity(id: string, body: CrmActivityUpdate) {
    return this.call<CrmActivity>("PATCH", `/crm/activities/${encodeURIComponent(id)}`, body);
  }
  deleteCrmActivity(id: string) {
    return this.call<void>("DELETE", `/crm/activities/${encodeURIComponent(id)}`);
  }
  crmMe() {
    return this.call<CrmMe>("GET", "/crm/me");
  }
  crmSettings() {
    return this.call<CrmSettings>("GET", "/crm/settings");
  }
  updateCrmSettings(body: Partial<CrmSettings>) {
    return this.call<CrmSettings>("PATCH", "/crm/settings", body);
  }
  crmRoles() {
    return this.call<{ grants: CrmRoleGrant[] }>("GET", "/crm/roles");
  }
  grantCrmRole(body: Omit<CrmRoleGrant, "id">) {
    return this.call<CrmRoleGrant>("PUT", "/crm/roles", body);
  }
  revokeCrmRole(id: string) {
    return this.call<void>("DELETE", `/crm/roles/${encodeURIComponent(id)}`);
  }
  /** One activity; e-mails with their bodies (text, quoted history, sanitised HTML). */
  crmActivity(id: string) {
    return this.call<CrmActivity>("GET", `/crm/activities/${encodeURIComponent(id)}`);
  }

  // mail --------------------------------------------------------------------------------------
  sendCrmEmail(type: CrmRecordType, id: string, body: SendEmailBody) {
    return this.call<{ emails: SentEmail[] }>("POST", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}/emails`, body);
  }
  /** The mails as they would go out, placeholders filled; nothing is sent. */
  previewCrmEmail(type: CrmRecordType, id: string, body: SendEmailBody) {
    return this.call<{ previews: EmailPreview[] }>("POST", `/crm/${PLURAL[type]}/${encodeURIComponent(id)}/emails/preview`, body);
  }
  /** Uploads a file to attach to a mail: the raw bytes, named by `?filename=`. */
  async uploadMailAttachment(file: Blob, filename: string) {
    const path = `/mail/attachments?filename=${encodeURIComponent(filename)}`;
    const response = await this.fetch("POST", path, { body: file, contentType: file.type || "application/octet-stream" });
    return this.answer<UploadedAttachment>(response, path);
  }
  /** An attachment of a mail, as bytes (the token goes in the header, so no plain link). */
  mailAttachment(fileId: string): Promise<Blob> {
    return this.blob(`/mail/attachments/${encodeURIComponent(fileId)}`);
  }
  /** An unmatched (or refused) mail exactly as received. */
  unmatchedMailRaw(id: string): Promise<Blob> {
    return this.blob(`/mail/unmatched/${encodeURIComponent(id)}/raw`);
  }
  private async blob(path: string): Promise<Blob> {
    const response = await this.fetch("GET", path, { accept: "application/octet-stream, application/problem+json" });
    if (!response.ok) return this.answer<never>(response, path);
    return response.blob();
  }
  mailInfo() {
    return this.call<MailInfo>("GET", "/mail/info");
  }
  mailSettings() {
    return this.call<MailSettings>("GET", "/mail/settings");
  }
  updateMailSettings(body: MailSettingsUpdate) {
    return this.call<MailSettings>("PATCH", "/mail/settings", body);
  }
  testMailRule(body: SubjectRuleIn & { subject: string }) {
    return this.call<{ code: string | null }>("POST", "/mail/rules/test", body);
  }
  mailTemplates() {
    return this.call<{ templates: MailTemplate[] }>("GET", "/mail/templates");
  }
  addMailTemplate(body: MailTemplateIn) {
    return this.call<MailTemplate>("POST", "/mail/templates", body);
  }
  putMailTemplate(id: string, body: MailTemplateIn) {
    return this.call<MailTemplate>("PUT", `/mail/templates/${encodeURIComponent(id)}`, body);
  }
  deleteMailTemplate(id: string) {
    return this.call<void>("DELETE", `/mail/templates/${encodeURIComponent(id)}`);
  }
  mailboxes() {
    return this.call<{ mailboxes: Mailbox[] }>("GET", "/mail/mailboxes");
  }
  addMailbox(body: MailboxIn) {
    return this.call<Mailbox>("POST", "/mail/mailboxes", body);
  }
  testMailbox(body: MailboxIn) {
    return this.call<ConnectionTest>("POST", "/mail/mailboxes/test", body);
  }
  updateMailbox(id: string, body: MailboxUpdate) {
    return this.call<Mailbox>("PATCH", `/mail/mailboxes/${encodeURIComponent(id)}`, body);
  }
  deleteMailbox(id: string) {
    return this.call<void>("DELETE", `/mail/mailboxes/${encodeURIComponent(id)}`);
  }
  unmatchedMail() {
    return this.call<{ mails: UnmatchedMail[]; count: number }>("GET", "/mail/unmatched");
  }
  dismissUnmatchedMail(id: string) {
    return this.call<void>("DELETE", `/mail/unmatched/${encodeURIComponent(id)}`);
  }
  assignUnmatchedMail(id: string, recordType: CrmRecordType, recordId: string) {
    return this.call<{ activity_id: string }>("POST", `/mail/unmatched/${encodeURIComponent(id)}/assign`, {
      record_type: recordType,
      record_id: recordId,
    });
  }
}
