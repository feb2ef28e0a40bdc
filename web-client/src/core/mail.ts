// CRM mail: the rules of the mail screens, as plain functions. No Vue, no DOM.
//
// - the timeline shows e-mail activities as mails: direction, addresses, the delivery status
//   of outgoing mail (`mailStatusView`), how an incoming one found its record (`matchLabel`);
//   the original HTML goes into a sandboxed frame as a document that loads nothing
//   (`mailHtmlDocument`);
// - the send dialog: whom a record can be written to (`recipientOptions`: its own addresses,
//   a deal's or company's contacts'), templates, attachments and the request body;
// - the CRM inbox page (admins): options, subject rules, IMAP mailboxes, as forms and bodies.

import { isEmail } from "./crm";
import type {
  CrmActivity,
  CrmActivityMail,
  CrmRecord,
  CrmRecordType,
  Mailbox,
  MailboxAuth,
  MailboxIn,
  MailboxSecurity,
  MailboxUpdate,
  OAuthClientIn,
  MailSettings,
  MailSettingsUpdate,
  MailStatus,
  MailTemplate,
  SendEmailBody,
  SubjectRuleIn,
  UnmatchedMail,
  UploadedAttachment,
} from "./types";

/** The hub's limits for mail sent from a record (server/mailbridge/models.py, service.py). */
export const MAX_RECIPIENTS = 100;
export const MAX_ATTACHMENTS = 20;
export const MAX_ATTACHMENT_BYTES = 10 * 1024 * 1024;
export const MAX_SUBJECT = 500;

// --- the mail on the timeline ----------------------------------------------------------------

export const MAIL_STATUS_LABELS: Record<MailStatus, string> = {
  queued: "Queued",
  retrying: "Retrying",
  sent: "Sent",
  failed: "Failed",
  bounced: "Bounced",
};

export interface MailStatusView {
  status: MailStatus;
  label: string;
  /** CSS class of the badge. */
  cls: string;
  /** The longer explanation (a tooltip; the error under the badge). */
  title: string;
}

function isMailStatus(value: unknown): value is MailStatus {
  return typeof value === "string" && value in MAIL_STATUS_LABELS;
}

/** The delivery badge of an outgoing mail; null for incoming mail (or no status). */
export function mailStatusView(mail: CrmActivityMail | null | undefined): MailStatusView | null {
  if (!mail || !isMailStatus(mail.status)) return null;
  const status = mail.status;
  let title: string;
  switch (status) {
    case "queued":
      title = "Waiting in the outbox to be sent";
      break;
    case "retrying":
      title = mail.error ? `The relay did not take it yet: ${mail.error}. It is tried again.` : "Tried again later";
      break;
    case "sent":
      title = "Handed to the relay";
      break;
    case "failed":
      title = mail.error ? `Not sent: ${mail.error}` : "Not sent";
      break;
    case "bounced":
      title = mail.bounced_recipients.length
        ? `Bounced: ${mail.bounced_recipients.join(", ")} did not get it`
        : "A delivery failure came back";
      break;
  }
  const tone = status === "sent" ? "ok" : status === "failed" || status === "bounced" ? "bad" : "wait";
  return { status, label: MAIL_STATUS_LABELS[status], cls: `mail-status mail-status-${tone}`, title };
}

/** An outgoing mail the hub has not finished with: its status may still change. */
export function isMailPending(activity: CrmActivity): boolean {
  const status = activity.mail?.status;
  return activity.direction === "outgoing" && (status === "queued" || status === "retrying");
}

export const MATCH_LABELS: Record<string, string> = {
  code: "by its reply code",
  thread: "as a reply in the thread",
  rule: "by a subject rule",
  sender: "by the sender's address",
  new_lead: "as a new lead",
  assigned: "assigned by an administrator",
};

export function matchLabel(match: string | null | undefined): string {
  if (!match) return "";
  return MATCH_LABELS[match] ?? match.replace(/[_-]/g, " ");
}

/** "Carl Client <carl@client.example>", or the address alone. */
export function mailSender(mail: CrmActivityMail): string {
  const address = mail.from_address ?? "";
  const name = (mail.from_name ?? "").trim();
  if (name && address && name.toLowerCase() !== address.toLowerCase()) return `${name} <${address}>`;
  return name || address || "unknown sender";
}

/** 48211 → "47.1 KB". */
export function formatSize(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) return "";
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB"];
  let n = bytes / 1024;
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit++;
  }
  return `${n >= 100 ? Math.round(n) : n.toFixed(1)} ${units[unit]}`;
}

/**
 * The sanitised HTML of a mail as the document of an `<iframe sandbox="">`: the hub has already
 * cleaned it (no scripts, styles, event attributes or frames); on top, the sandbox runs no
 * script and a content security policy loads nothing from outside (no tracking pixels, no
 * remote images or fonts), only inline images and the mail's own inline styles.
 */
export function mailHtmlDocument(html: string): string {
  const csp = "default-src 'none'; img-src data: cid:; style-src 'unsafe-inline'; font-src data:";
  return (
    "<!doctype html><html><head><meta charset=\"utf-8\">" +
    `<meta http-equiv="Content-Security-Policy" content="${csp}">` +
    '<meta name="referrer" content="no-referrer">' +
    "<style>body{font:14px/1.45 system-ui,sans-serif;color:#1d2633;margin:8px;overflow-wrap:anywhere}" +
    "img{max-width:100%;height:auto}blockquote{margin:0 0 0 .6rem;padding-left:.6rem;border-left:2px solid #dde2ea;color:#6b7686}</style>" +
    `</head><body>${html}</body></html>`
  );
}

// --- sending from a record -------------------------------------------------------------------

export interface RecipientOption {
  /** Lower case, as the hub compares them. */
  address: string;
  /** Whose address it is: the record's title, or a contact's name. */
  owner: string;
  source: "record" | "contact" | "typed";
}

/**
 * Whom a mail from `record` may go to: its own addresses, then those of its contacts (a
 * deal's contacts, a company's contacts) - the hub accepts exactly these. Each once.
 */
export function recipientOptions(record: CrmRecord, contacts: readonly CrmRecord[] = []): RecipientOption[] {
  const seen = new Set<string>();
  const out: RecipientOption[] = [];
  const add = (value: string, owner: string, source: RecipientOption["source"]) => {
    const address = value.trim().toLowerCase();
    if (!address || seen.has(address)) return;
    seen.add(address);
    out.push({ address, owner, source });
  };
  for (const e of record.emails) add(e.value, record.title, "record");
  if (record.type === "deal" || record.type === "company") {
    for (const c of contacts) if (c.id !== record.id) for (const e of c.emails) add(e.value, c.title, "contact");
  }
  return out;
}

/** The contacts whose addresses a record's mail may go to (their ids). */
export function contactIdsOf(record: CrmRecord & { links?: { contact?: { id: string }[] } }): string[] {
  if (record.type === "deal") return [...new Set(record.contact_ids ?? [])];
  if (record.type === "company") return [...new Set((record.links?.contact ?? []).map((r) => r.id))];
  return [];
}

export interface SendForm {
  to: string[];
  cc: string[];
  bcc: string[];
  subject: string;
  text: string;
  attachments: UploadedAttachment[];
  /** One mail per recipient instead of one to all. */
  bulk: boolean;
  /** The e-mail activity answered (a reply continues its thread), or null. */
  inReplyTo: string | null;
}

export function emptySendForm(over: Partial<SendForm> = {}): SendForm {
  return { to: [], cc: [], bcc: [], subject: "", text: "", attachments: [], bulk: false, inReplyTo: null, ...over };
}

/** How an address is sent to: to, a copy, a blind copy, or not at all. */
export type AddressRole = "to" | "cc" | "bcc" | "";

export function roleOf(form: SendForm, address: string): AddressRole {
  if (form.to.includes(address)) return "to";
  if (form.cc.includes(address)) return "cc";
  if (form.bcc.includes(address)) return "bcc";
  return "";
}

/** The form with `address` in one of To, Cc, Bcc (or none): an address is in one at most. */
export function withRole(form: SendForm, address: string, role: AddressRole): SendForm {
  const out = { ...form, to: form.to.filter((a) => a !== address), cc: form.cc.filter((a) => a !== address), bcc: form.bcc.filter((a) => a !== address) };
  if (role) out[role] = [...out[role], address];
  return out;
}

const REPLY_PREFIX = /^\s*(?:(?:re|aw|antw|sv|vs|odp|rif|fwd?|wg|tr|rv)\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a]\s*)+/i;
const CODE_IN_SUBJECT = /\s*\[\s*CRM[-\u2010-\u2014_ ]?[0-9A-Za-z]{37}\s*\]/g;

/** "Re: " and the subject answered, without its reply prefixes and reply code (the hub adds
 * the thread's code again when it sends). */
export function replySubject(subject: string): string {
  const bare = subject.replace(CODE_IN_SUBJECT, "").replace(REPLY_PREFIX, "").trim();
  return bare ? `Re: ${bare}` : "Re:";
}

export interface ReplyPlan {
  form: SendForm;
  /** Addresses of the mail answered the record does not have: a reply cannot go to them. */
  leftOut: string[];
}

/**
 * Reply (the sender) or Reply all (the sender, and the mail's To and Cc as copies) to an
 * incoming mail: only addresses the record may be written to (`options`), never the CRM inbox
 * itself; the others are named so that the person knows who was left out.
 */
export function replyPlan(
  activity: CrmActivity,
  options: readonly RecipientOption[],
  all: boolean,
  inbox = "",
): ReplyPlan {
  const m = activity.mail;
  const allowed = new Set(options.map((o) => o.address));
  const ours = (a: string) => {
    const [local = "", domain = ""] = a.split("@");
    const [inboxLocal = "", inboxDomain = ""] = inbox.toLowerCase().split("@");
    return Boolean(inbox) && domain === inboxDomain && (local === inboxLocal || local.startsWith(`${inboxLocal}+`));
  };
  const leftOut: string[] = [];
  const pick = (list: readonly string[]) => {
    const out: string[] = [];
    for (const raw of list) {
      const a = raw.trim().toLowerCase();
      if (!a || ours(a) || out.includes(a)) continue;
      if (allowed.has(a)) out.push(a);
      else if (!leftOut.includes(a)) leftOut.push(a);
    }
    return out;
  };
  const to = pick(m?.from_address ? [m.from_address] : []);
  const cc = all ? pick([...(m?.to ?? []), ...(m?.cc ?? [])]).filter((a) => !to.includes(a)) : [];
  return {
    form: emptySendForm({ to, cc, subject: replySubject(activity.subject), inReplyTo: activity.id }),
    leftOut,
  };
}

/** "Received 24 Nov 2026, 09:15" of an incoming mail (its Date:, else when the hub got it). */
export function receivedAt(mail: CrmActivityMail | null | undefined, fallback: string): string {
  const iso = mail?.date || mail?.received_at || fallback;
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  return new Date(t).toLocaleString([], { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" });
}

/** The flagged warning's words: a code or a thread of this record, from an outsider. */
export function flaggedText(mail: CrmActivityMail): string {
  const who = mail.from_address || "an unknown address";
  const what = mail.match === "thread" ? "answers a mail sent from this record" : "carries the code of a mail from this record";
  return `⚠ This reply ${what}, but came from ${who}, which is not one of the record's addresses. Check who wrote it.`;
}

/** The first address is ticked when the dialog opens: the usual case is one person. */
export function initialRecipients(options: readonly RecipientOption[]): string[] {
  const first = options[0];
  return first ? [first.address] : [];
}

/** A template fills the subject and the text (its placeholders are filled by the hub). */
export function applyTemplate(form: SendForm, template: MailTemplate): SendForm {
  return { ...form, subject: template.subject, text: template.text };
}

export function sendFormErrors(form: SendForm): string[] {
  const errors: string[] = [];
  const everyone = [...form.to, ...form.cc, ...form.bcc];
  if (form.to.length === 0) errors.push("Choose at least one recipient.");
  if (everyone.length > MAX_RECIPIENTS) errors.push(`At most ${MAX_RECIPIENTS} recipients.`);
  for (const a of everyone) if (!isEmail(a)) errors.push(`${a} is not an e-mail address.`);
  if (form.bulk && form.to.length > 1 && (form.cc.length || form.bcc.length)) {
    errors.push("One mail per recipient goes to each alone: no copies (Cc, Bcc).");
  }
  if (/[\r\n\0]/.test(form.subject)) errors.push("The subject may not contain line breaks.");
  if (form.subject.length > MAX_SUBJECT) errors.push(`The subject is longer than ${MAX_SUBJECT} characters.`);
  if (!form.subject.trim() && !form.text.trim()) errors.push("Write a subject or a text.");
  if (form.attachments.length > MAX_ATTACHMENTS) errors.push(`At most ${MAX_ATTACHMENTS} attachments.`);
  return errors;
}

/** Why a file cannot be attached (null: it can). */
export function attachmentProblem(size: number, already: number): string | null {
  if (already >= MAX_ATTACHMENTS) return `At most ${MAX_ATTACHMENTS} attachments.`;
  if (size > MAX_ATTACHMENT_BYTES) return `Larger than ${formatSize(MAX_ATTACHMENT_BYTES)}.`;
  return null;
}

/** The body of POST /crm/{records}/{id}/emails. */
export function sendEmailBody(form: SendForm): SendEmailBody {
  const clean = (list: readonly string[]) => [...new Set(list.map((a) => a.trim().toLowerCase()))];
  const body: SendEmailBody = {
    to: clean(form.to),
    subject: form.subject.trim(),
    text: form.text,
  };
  const cc = clean(form.cc).filter((a) => !body.to.includes(a));
  const bcc = clean(form.bcc).filter((a) => !body.to.includes(a) && !cc.includes(a));
  if (cc.length) body.cc = cc;
  if (bcc.length) body.bcc = bcc;
  if (form.inReplyTo) body.in_reply_to = form.inReplyTo;
  if (form.attachments.length) body.attachment_ids = form.attachments.map((a) => a.id);
  if (form.bulk && body.to.length > 1) body.bulk = true;
  return body;
}

// --- the inbox options -----------------------------------------------------------------------

/** Addresses and domains, one a line (commas and spaces too), each once, in lower case. */
export function exceptionsFromText(text: string): string[] {
  const seen = new Set<string>();
  for (const part of text.split(/[\s,;]+/)) {
    const v = part.trim().toLowerCase();
    if (v) seen.add(v);
  }
  return [...seen];
}

export interface OptionsForm {
  codeIn: "subject" | "body";
  createLeads: boolean;
  exceptions: string;
  maxLeads: number;
  periodMinutes: number;
  leadResponsibleId: string | null;
}

export function optionsForm(settings: MailSettings): OptionsForm {
  return {
    codeIn: settings.code_in,
    createLeads: settings.create_leads,
    exceptions: settings.lead_exceptions.join("\n"),
    maxLeads: settings.max_new_leads_per_sender,
    periodMinutes: settings.lead_period_minutes,
    leadResponsibleId: settings.lead_responsible_id,
  };
}

export function optionsErrors(form: OptionsForm): string[] {
  const errors: string[] = [];
  if (!Number.isInteger(form.maxLeads) || form.maxLeads < 0 || form.maxLeads > 1000) {
    errors.push("Leads per sender: a whole number from 0 to 1000.");
  }
  if (!Number.isInteger(form.periodMinutes) || form.periodMinutes < 1 || form.periodMinutes > 525600) {
    errors.push("The period: a whole number of minutes from 1 to 525600 (a year).");
  }
  const long = exceptionsFromText(form.exceptions).find((e) => e.length > 254);
  if (long) errors.push(`${long.slice(0, 40)}… is longer than 254 characters.`);
  return errors;
}

/** PATCH /mail/settings for the options (the subject rules are saved on their own). */
export function optionsPatch(form: OptionsForm): MailSettingsUpdate {
  return {
    code_in: form.codeIn,
    create_leads: form.createLeads,
    lead_exceptions: exceptionsFromText(form.exceptions),
    max_new_leads_per_sender: form.maxLeads,
    lead_period_minutes: form.periodMinutes,
    lead_responsible_id: form.leadResponsibleId,
  };
}

export const RULE_TYPES: readonly CrmRecordType[] = ["deal", "lead", "contact", "company"];

/** The rules as PATCH /mail/settings takes them: trimmed, `field` "id" when left empty. */
export function rulesBody(rules: readonly SubjectRuleIn[]): SubjectRuleIn[] {
  return rules.map((r) => ({ pattern: r.pattern, record_type: r.record_type, field: r.field.trim() || "id" }));
}

export function ruleErrors(rules: readonly SubjectRuleIn[]): string[] {
  const errors: string[] = [];
  rules.forEach((r, i) => {
    if (!r.pattern) errors.push(`Rule ${i + 1}: write a pattern.`);
    else if (r.pattern.length > 500) errors.push(`Rule ${i + 1}: the pattern is longer than 500 characters.`);
  });
  if (rules.length > 50) errors.push("At most 50 rules.");
  return errors;
}

// --- IMAP mailboxes --------------------------------------------------------------------------

export interface MailboxForm {
  name: string;
  host: string;
  port: number;
  security: MailboxSecurity;
  auth: MailboxAuth;
  login: string;
  /** "" while editing: the password stays as it is. */
  password: string;
  /** XOAUTH2's OAuth client (Microsoft 365, Gmail): the secret and the refresh token are
   * "" while editing, and then stay as they are. */
  oauthClientId: string;
  oauthClientSecret: string;
  oauthTokenUrl: string;
  oauthRefreshToken: string;
  oauthScope: string;
  folder: string;
  /** false: delivered mail stays in the folder, marked seen. */
  moveProcessed: boolean;
  processedFolder: string;
  deleteAfterDelivery: boolean;
  pollSeconds: number;
  enabled: boolean;
}

export function emptyMailboxForm(): MailboxForm {
  return {
    name: "",
    host: "",
    port: 993,
    security: "tls",
    auth: "password",
    login: "",
    password: "",
    oauthClientId: "",
    oauthClientSecret: "",
    oauthTokenUrl: "",
    oauthRefreshToken: "",
    oauthScope: "",
    folder: "INBOX",
    moveProcessed: true,
    processedFolder: "Processed",
    deleteAfterDelivery: false,
    pollSeconds: 60,
    enabled: true,
  };
}

export function mailboxForm(mailbox: Mailbox): MailboxForm {
  return {
    name: mailbox.name,
    host: mailbox.host,
    port: mailbox.port,
    security: mailbox.security,
    auth: mailbox.auth ?? "password",
    login: mailbox.login,
    password: "",
    oauthClientId: mailbox.oauth?.client_id ?? "",
    oauthClientSecret: "",
    oauthTokenUrl: mailbox.oauth?.token_url ?? "",
    oauthRefreshToken: "",
    oauthScope: mailbox.oauth?.scope ?? "",
    folder: mailbox.folder,
    moveProcessed: mailbox.processed_folder !== null,
    processedFolder: mailbox.processed_folder ?? "Processed",
    deleteAfterDelivery: mailbox.delete_after_delivery,
    pollSeconds: mailbox.poll_seconds,
    enabled: mailbox.enabled,
  };
}

/** Whether a token endpoint is one the hub accepts: https, or http to this machine only. */
export function tokenUrlAllowed(url: string): boolean {
  let parsed: URL;
  try {
    parsed = new URL(url.trim());
  } catch {
    return false;
  }
  if (parsed.username || parsed.password) return false;
  if (parsed.protocol === "https:") return true;
  const host = parsed.hostname;
  const loopback = host === "localhost" || host === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(host);
  return parsed.protocol === "http:" && loopback && !parsed.username && !parsed.password;
}

/** What is wrong with the form; `needSecrets`: adding a mailbox, or testing one (the
 * password, or the OAuth client's secret and refresh token, must be typed then). */
export function mailboxErrors(form: MailboxForm, needSecrets: boolean, hadOAuth = false): string[] {
  const errors: string[] = [];
  if (!form.name.trim()) errors.push("Give the mailbox a name.");
  if (!form.host.trim()) errors.push("Write the IMAP server's host name.");
  if (!Number.isInteger(form.port) || form.port < 1 || form.port > 65535) errors.push("The port is a number from 1 to 65535.");
  if (!form.login.trim()) errors.push("Write the login.");
  if (form.auth === "password") {
    if (needSecrets && !form.password) errors.push("Write the password.");
  } else {
    if (!form.oauthClientId.trim()) errors.push("Write the OAuth client ID.");
    if (!form.oauthTokenUrl.trim()) errors.push("Write the OAuth token URL.");
    else if (!tokenUrlAllowed(form.oauthTokenUrl)) errors.push("The token URL must be https (or http to this machine).");
    // a client stored before keeps its secret and refresh token when these stay empty
    const typeSecrets = needSecrets || !hadOAuth;
    if (typeSecrets && !form.oauthClientSecret) errors.push("Write the OAuth client secret.");
    if (typeSecrets && !form.oauthRefreshToken) errors.push("Write the OAuth refresh token.");
  }
  if (!form.folder.trim()) errors.push("Write the folder to collect from.");
  if (form.moveProcessed && !form.deleteAfterDelivery && !form.processedFolder.trim()) {
    errors.push("Write the folder for delivered mail, or leave it in the folder.");
  }
  if (!Number.isInteger(form.pollSeconds) || form.pollSeconds < 5 || form.pollSeconds > 3600) {
    errors.push("Poll every 5 to 3600 seconds.");
  }
  return errors;
}

/** MailboxIn (add, test) from the form. */
export function mailboxBody(form: MailboxForm): MailboxIn {
  return {
    name: form.name.trim(),
    host: form.host.trim(),
    port: form.port,
    security: form.security,
    auth: form.auth,
    login: form.login.trim(),
    ...(form.auth === "password" ? { password: form.password } : { oauth: oauthBody(form) }),
    folder: form.folder.trim(),
    processed_folder: form.moveProcessed ? form.processedFolder.trim() : null,
    delete_after_delivery: form.deleteAfterDelivery,
    poll_seconds: form.pollSeconds,
    enabled: form.enabled,
  };
}

function oauthBody(form: MailboxForm): OAuthClientIn {
  return {
    client_id: form.oauthClientId.trim(),
    client_secret: form.oauthClientSecret,
    token_url: form.oauthTokenUrl.trim(),
    refresh_token: form.oauthRefreshToken,
    scope: form.oauthScope.trim() || null,
  };
}

/** PATCH /mail/mailboxes/{id}: what the form changed (the password, the OAuth client's
 * secret and refresh token only when typed). */
export function mailboxPatch(form: MailboxForm, mailbox: Mailbox): MailboxUpdate {
  const full = mailboxBody(form);
  const patch: MailboxUpdate = {};
  const current: Record<string, unknown> = { ...mailbox, auth: mailbox.auth ?? "password" };
  for (const [key, value] of Object.entries(full) as [keyof MailboxIn, unknown][]) {
    if (key === "password" || key === "oauth") continue;
    if (current[key] !== value) (patch as Record<string, unknown>)[key] = value;
  }
  if (form.auth === "password") {
    if (form.password) patch.password = form.password;
    return patch;
  }
  const wanted = oauthBody(form);
  const shown = mailbox.oauth;
  const oauth: Partial<OAuthClientIn> = {};
  if (wanted.client_id !== shown?.client_id) oauth.client_id = wanted.client_id;
  if (wanted.token_url !== shown?.token_url) oauth.token_url = wanted.token_url;
  if (wanted.scope !== (shown?.scope ?? null)) oauth.scope = wanted.scope;
  if (wanted.client_secret) oauth.client_secret = wanted.client_secret;
  if (wanted.refresh_token) oauth.refresh_token = wanted.refresh_token;
  if (Object.keys(oauth).length) patch.oauth = oauth;
  return patch;
}

export interface MailboxStateView {
  text: string;
  tone: "ok" | "bad" | "wait" | "off";
}

export function mailboxStateView(mailbox: Mailbox): MailboxStateView {
  const s = mailbox.state ?? {};
  if (!mailbox.enabled) return { text: "Turned off", tone: "off" };
  if (s.connected) return { text: s.idle ? "Connected, waiting for mail (IDLE)" : "Connected, polling", tone: "ok" };
  if (s.last_error) return { text: `Not connected: ${s.last_error}`, tone: "bad" };
  if (Object.keys(s).length === 0) return { text: "Not connected yet", tone: "wait" };
  return { text: "Connecting…", tone: "wait" };
}

// --- unmatched mail --------------------------------------------------------------------------

/** Refused mail (unsafe to parse) is listed, but cannot be put on a record. */
export function isAssignable(mail: UnmatchedMail): boolean {
  if (mail.status) return mail.status === "unmatched";
  return !mail.reason.startsWith("refused");
}

export function removeUnmatched(list: readonly UnmatchedMail[], id: string): UnmatchedMail[] {
  return list.filter((m) => m.id !== id);
}

/** The count of the snapshot's `mail` part: a number for CRM administrators, else null. */
export function unmatchedFromSnapshot(part: unknown): number | null {
  if (typeof part !== "object" || part === null) return null;
  const n = Number((part as Record<string, unknown>).unmatched);
  return Number.isFinite(n) && n >= 0 ? Math.floor(n) : null;
}

/** "Carl Client <carl@client.example>" of an unmatched mail, or its address. */
export function unmatchedSender(mail: UnmatchedMail): string {
  const name = (mail.from_name ?? "").trim();
  const address = mail.from_address || "no sender address";
  return name && name.toLowerCase() !== address.toLowerCase() ? `${name} <${address}>` : address;
}
