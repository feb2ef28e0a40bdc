import { describe, expect, it } from "vitest";
import {
  applyTemplate,
  attachmentProblem,
  contactIdsOf,
  emptyMailboxForm,
  emptySendForm,
  exceptionsFromText,
  formatSize,
  initialRecipients,
  isAssignable,
  isMailPending,
  mailboxBody,
  mailboxErrors,
  mailboxForm,
  mailboxPatch,
  mailboxStateView,
  mailHtmlDocument,
  mailSender,
  mailStatusView,
  matchLabel,
  MAX_ATTACHMENT_BYTES,
  optionsErrors,
  optionsForm,
  optionsPatch,
  recipientOptions,
  removeUnmatched,
  ruleErrors,
  rulesBody,
  flaggedText,
  receivedAt,
  replyPlan,
  replySubject,
  roleOf,
  sendEmailBody,
  sendFormErrors,
  unmatchedFromSnapshot,
  unmatchedSender,
  withRole,
} from "../src/core/mail";
import type { CrmActivity, CrmActivityMail, CrmRecord, Mailbox, MailSettings, UnmatchedMail } from "../src/core/types";
import { oid } from "./fixtures";

function mail(over: Partial<CrmActivityMail> = {}): CrmActivityMail {
  return {
    status: null,
    error: null,
    from_address: null,
    from_name: null,
    to: [],
    cc: [],
    message_id: null,
    code: null,
    match: null,
    flagged: false,
    suspicious: false,
    suspicious_reason: null,
    auto_reply: false,
    in_reply_to_activity: null,
    bounced_recipients: [],
    attachments: [],
    html: null,
    text: null,
    quoted: null,
    ...over,
  };
}

function activity(over: Partial<CrmActivity> = {}): CrmActivity {
  return {
    id: oid(1),
    owner_type: "deal",
    owner_id: oid(100),
    owner_title: "Big order",
    type: "email",
    direction: "outgoing",
    missed: false,
    subject: "Your quote",
    description: "Hello",
    responsible_id: "mary",
    deadline: null,
    completed: true,
    completed_at: "2026-03-01T12:00:00Z",
    state: "completed",
    created_by: "mary",
    created_at: "2026-03-01T12:00:00Z",
    modified_at: "2026-03-01T12:00:00Z",
    mail: mail({ status: "queued", to: ["carl@client.example"] }),
    ...over,
  };
}

function record(over: Partial<CrmRecord> = {}): CrmRecord {
  return {
    id: oid(100),
    type: "deal",
    title: "Big order",
    open: true,
    responsible_id: "mary",
    emails: [],
    phones: [],
    source: "",
    comments: "",
    custom_fields: {},
    created_by: "mary",
    created_at: "2026-03-01T12:00:00Z",
    modified_by: "mary",
    modified_at: "2026-03-01T12:00:00Z",
    open_activities: 0,
    indicator: { number: 0, colour: "none", dot: null },
    ...over,
  };
}

function contact(n: number, name: string, ...emails: string[]): CrmRecord {
  return record({ id: oid(n), type: "contact", title: name, emails: emails.map((value) => ({ type: "work", value })) });
}

describe("the mail on the timeline", () => {
  it("shows the delivery status of outgoing mail, none for incoming", () => {
    expect(mailStatusView(mail({ status: "sent" }))).toMatchObject({ status: "sent", label: "Sent", cls: "mail-status mail-status-ok" });
    expect(mailStatusView(mail({ status: "queued" }))?.cls).toBe("mail-status mail-status-wait");
    expect(mailStatusView(mail({ status: null }))).toBeNull();
    expect(mailStatusView(null)).toBeNull();
    expect(mailStatusView(mail({ status: "nonsense" as never }))).toBeNull();
  });

  it("says why a mail failed, is retried or bounced", () => {
    const failed = mailStatusView(mail({ status: "failed", error: "550 5.1.1 no such user" }));
    expect(failed).toMatchObject({ label: "Failed", cls: "mail-status mail-status-bad", title: "Not sent: 550 5.1.1 no such user" });
    expect(mailStatusView(mail({ status: "retrying", error: "connection refused" }))?.title).toContain("connection refused");
    const bounced = mailStatusView(mail({ status: "bounced", bounced_recipients: ["carl@client.example"] }));
    expect(bounced?.title).toBe("Bounced: carl@client.example did not get it");
    expect(bounced?.cls).toBe("mail-status mail-status-bad");
  });

  it("watches outgoing mail until the hub is done with it", () => {
    expect(isMailPending(activity())).toBe(true);
    expect(isMailPending(activity({ mail: mail({ status: "retrying" }) }))).toBe(true);
    expect(isMailPending(activity({ mail: mail({ status: "sent" }) }))).toBe(false);
    expect(isMailPending(activity({ direction: "incoming", mail: mail() }))).toBe(false);
    expect(isMailPending(activity({ type: "call", mail: null }))).toBe(false);
  });

  it("names how a reply found its record and who sent it", () => {
    expect(matchLabel("code")).toBe("by its reply code");
    expect(matchLabel("assigned")).toBe("assigned by an administrator");
    expect(matchLabel("something_new")).toBe("something new");
    expect(matchLabel(null)).toBe("");
    expect(mailSender(mail({ from_name: "Carl Client", from_address: "carl@client.example" }))).toBe("Carl Client <carl@client.example>");
    expect(mailSender(mail({ from_name: "carl@client.example", from_address: "carl@client.example" }))).toBe("carl@client.example");
    expect(mailSender(mail({ from_address: "carl@client.example" }))).toBe("carl@client.example");
    expect(mailSender(mail())).toBe("unknown sender");
  });

  it("formats sizes", () => {
    expect(formatSize(20)).toBe("20 B");
    expect(formatSize(48211)).toBe("47.1 KB");
    expect(formatSize(10 * 1024 * 1024)).toBe("10.0 MB");
    expect(formatSize(300 * 1024)).toBe("300 KB");
    expect(formatSize(-1)).toBe("");
  });

  it("puts the HTML into a document that loads nothing from outside", () => {
    const doc = mailHtmlDocument('<p>Signed <img src="https://tracker.example/p.gif"></p>');
    expect(doc).toContain("Content-Security-Policy");
    expect(doc).toContain("default-src 'none'");
    expect(doc).not.toMatch(/img-src[^;"]*https?:/);
    expect(doc).toContain('<body><p>Signed <img src="https://tracker.example/p.gif"></p></body>');
    expect(doc.indexOf("Content-Security-Policy")).toBeLessThan(doc.indexOf("<body>"));
  });
});

describe("sending from a record", () => {
  it("offers the record's addresses, then its contacts', each once and in lower case", () => {
    const deal = record({ emails: [{ type: "work", value: "Orders@Client.example" }] });
    const options = recipientOptions(deal, [
      contact(1, "Carl Client", "carl@client.example", "orders@client.example"),
      contact(2, "Dora Doe", "dora@client.example"),
    ]);
    expect(options).toEqual([
      { address: "orders@client.example", owner: "Big order", source: "record" },
      { address: "carl@client.example", owner: "Carl Client", source: "contact" },
      { address: "dora@client.example", owner: "Dora Doe", source: "contact" },
    ]);
    expect(initialRecipients(options)).toEqual(["orders@client.example"]);
    expect(initialRecipients([])).toEqual([]);
  });

  it("takes contacts' addresses only for deals and companies", () => {
    const lead = record({ type: "lead", title: "Lead", emails: [{ type: "work", value: "lead@x.example" }] });
    expect(recipientOptions(lead, [contact(1, "Carl", "carl@client.example")]).map((o) => o.address)).toEqual(["lead@x.example"]);
  });

  it("knows whose addresses to load: a deal's contacts, a company's linked contacts", () => {
    expect(contactIdsOf(record({ contact_ids: ["c1", "c2", "c1"] }))).toEqual(["c1", "c2"]);
    const company = { ...record({ type: "company" }), links: { contact: [{ type: "contact" as const, id: "c3", title: "Carl" }] } };
    expect(contactIdsOf(company)).toEqual(["c3"]);
    expect(contactIdsOf(record({ type: "contact" }))).toEqual([]);
  });

  it("checks the form before sending", () => {
    expect(sendFormErrors(emptySendForm())).toEqual(["Choose at least one recipient.", "Write a subject or a text."]);
    expect(sendFormErrors(emptySendForm({ to: ["carl@client.example"], subject: "Quote" }))).toEqual([]);
    expect(sendFormErrors(emptySendForm({ to: ["carl@client.example"], text: "Hello" }))).toEqual([]);
    expect(sendFormErrors(emptySendForm({ to: ["nobody"], subject: "x" }))).toEqual(["nobody is not an e-mail address."]);
    expect(sendFormErrors(emptySendForm({ to: ["a@b.example"], subject: "a\nb" }))).toContain("The subject may not contain line breaks.");
  });

  it("builds the request: addresses once, attachments by id, bulk only for several", () => {
    const attachment = { id: oid(7), filename: "quote.pdf", content_type: "application/pdf", size: 20 };
    const form = emptySendForm({ to: ["Carl@Client.example", "carl@client.example"], subject: "  Quote ", text: "Hi", attachments: [attachment], bulk: true });
    expect(sendEmailBody(form)).toEqual({ to: ["carl@client.example"], subject: "Quote", text: "Hi", attachment_ids: [oid(7)] });
    const two = emptySendForm({ to: ["a@x.example", "b@x.example"], text: "Hi", bulk: true });
    expect(sendEmailBody(two)).toEqual({ to: ["a@x.example", "b@x.example"], subject: "", text: "Hi", bulk: true });
  });

  it("fills the subject and text from a template", () => {
    const form = emptySendForm({ to: ["a@x.example"], subject: "old", text: "old" });
    const filled = applyTemplate(form, { id: "t", name: "Quote", subject: "Your quote: {{record.title}}", text: "Hello {{record.first_name}}" });
    expect(filled).toMatchObject({ to: ["a@x.example"], subject: "Your quote: {{record.title}}", text: "Hello {{record.first_name}}" });
  });

  it("refuses files over 10 MiB and more than 20 attachments", () => {
    expect(attachmentProblem(100, 0)).toBeNull();
    expect(attachmentProblem(MAX_ATTACHMENT_BYTES + 1, 0)).toBe("Larger than 10.0 MB.");
    expect(attachmentProblem(1, 20)).toBe("At most 20 attachments.");
  });
});

describe("the inbox options", () => {
  const settings: MailSettings = {
    code_in: "subject",
    create_leads: true,
    lead_exceptions: ["@partner.example", "noreply@shop.example"],
    max_new_leads_per_sender: 3,
    lead_period_minutes: 1440,
    lead_responsible_id: null,
    subject_rules: [{ id: "r1", pattern: "Order #(\\d+)", record_type: "deal", field: "order_no" }],
  };

  it("reads exceptions one a line (or separated by commas), once each", () => {
    expect(exceptionsFromText("@Partner.example\n noreply@shop.example, @partner.example\n\n")).toEqual(["@partner.example", "noreply@shop.example"]);
    expect(exceptionsFromText("")).toEqual([]);
  });

  it("turns the settings into a form and back into a patch without the rules", () => {
    const form = optionsForm(settings);
    expect(form.exceptions).toBe("@partner.example\nnoreply@shop.example");
    form.createLeads = false;
    form.leadResponsibleId = "u1";
    expect(optionsPatch(form)).toEqual({
      code_in: "subject",
      create_leads: false,
      lead_exceptions: ["@partner.example", "noreply@shop.example"],
      max_new_leads_per_sender: 3,
      lead_period_minutes: 1440,
      lead_responsible_id: "u1",
    });
  });

  it("checks the numbers", () => {
    const form = optionsForm(settings);
    expect(optionsErrors(form)).toEqual([]);
    expect(optionsErrors({ ...form, maxLeads: 1001, periodMinutes: 0 })).toHaveLength(2);
    expect(optionsErrors({ ...form, maxLeads: 1.5 })).toHaveLength(1);
  });

  it("sends rules without ids, with the field id by default", () => {
    expect(rulesBody([{ pattern: "Order #(\\d+)", record_type: "deal", field: " " }])).toEqual([{ pattern: "Order #(\\d+)", record_type: "deal", field: "id" }]);
    expect(ruleErrors([{ pattern: "", record_type: "lead", field: "id" }])).toEqual(["Rule 1: write a pattern."]);
  });
});

describe("IMAP mailboxes", () => {
  const mailbox: Mailbox = {
    id: "m1",
    name: "CRM inbox",
    host: "imap.example.com",
    port: 993,
    security: "tls",
    auth: "password",
    login: "crm",
    folder: "INBOX",
    processed_folder: null,
    delete_after_delivery: false,
    poll_seconds: 60,
    enabled: true,
    state: {},
  };

  it("asks for a password when adding or testing, not when changing", () => {
    const form = { ...emptyMailboxForm(), name: "CRM", host: "imap.example.com", login: "crm" };
    expect(mailboxErrors(form, true)).toEqual(["Write the password."]);
    expect(mailboxErrors(form, false)).toEqual([]);
    expect(mailboxErrors({ ...form, port: 0, pollSeconds: 1 }, false)).toHaveLength(2);
  });

  it("leaves delivered mail in the folder when not moving it", () => {
    const form = mailboxForm(mailbox);
    expect(form.moveProcessed).toBe(false);
    expect(mailboxBody({ ...form, password: "s" })).toMatchObject({ processed_folder: null, password: "s", port: 993 });
    expect(mailboxBody({ ...form, moveProcessed: true, processedFolder: " Done " }).processed_folder).toBe("Done");
  });

  it("patches only what changed, and the password only when typed", () => {
    const form = mailboxForm(mailbox);
    expect(mailboxPatch(form, mailbox)).toEqual({});
    expect(mailboxPatch({ ...form, pollSeconds: 30, password: "new" }, mailbox)).toEqual({ poll_seconds: 30, password: "new" });
    expect(mailboxPatch({ ...form, moveProcessed: true, processedFolder: "Processed" }, mailbox)).toEqual({ processed_folder: "Processed" });
  });

  it("takes an OAuth client for XOAUTH2, its secrets only when typed", () => {
    const form = { ...emptyMailboxForm(), name: "M365", host: "outlook.office365.com", login: "crm@corp.example", auth: "xoauth2" as const };
    expect(mailboxErrors(form, true)).toEqual([
      "Write the OAuth client ID.",
      "Write the OAuth token URL.",
      "Write the OAuth client secret.",
      "Write the OAuth refresh token.",
    ]);
    const filled = {
      ...form,
      oauthClientId: "app-1",
      oauthClientSecret: "s3cret",
      oauthTokenUrl: "https://login.example/token",
      oauthRefreshToken: "r1",
      oauthScope: " ",
    };
    expect(mailboxErrors(filled, true)).toEqual([]);
    expect(mailboxErrors({ ...filled, oauthTokenUrl: "http://idp.example/token" }, true)).toEqual(["The token URL must be https (or http to this machine)."]);
    expect(mailboxErrors({ ...filled, oauthTokenUrl: "http://127.0.0.1:8080/token" }, true)).toEqual([]);
    const body = mailboxBody(filled);
    expect(body.password).toBeUndefined();
    expect(body).toMatchObject({
      auth: "xoauth2",
      oauth: { client_id: "app-1", client_secret: "s3cret", token_url: "https://login.example/token", refresh_token: "r1", scope: null },
    });
    // a stored client: unchanged secrets stay out of the patch; changing only the scope sends it
    const stored: Mailbox = { ...mailbox, auth: "xoauth2", oauth: { client_id: "app-1", token_url: "https://login.example/token", scope: null } };
    const edit = mailboxForm(stored);
    expect(edit.oauthClientId).toBe("app-1");
    expect(edit.oauthClientSecret).toBe("");
    expect(mailboxErrors(edit, false, true)).toEqual([]);
    expect(mailboxPatch(edit, stored)).toEqual({});
    expect(mailboxPatch({ ...edit, oauthScope: "IMAP.AccessAsUser.All", oauthRefreshToken: "r2" }, stored)).toEqual({
      oauth: { scope: "IMAP.AccessAsUser.All", refresh_token: "r2" },
    });
    // switching a password mailbox to XOAUTH2 needs the whole client
    const switched = { ...mailboxForm(mailbox), auth: "xoauth2" as const, oauthClientId: "app-2", oauthTokenUrl: "https://idp.example/t" };
    expect(mailboxErrors(switched, false, false)).toEqual(["Write the OAuth client secret.", "Write the OAuth refresh token."]);
    expect(mailboxPatch({ ...switched, oauthClientSecret: "x", oauthRefreshToken: "y" }, mailbox)).toEqual({
      auth: "xoauth2",
      oauth: { client_id: "app-2", token_url: "https://idp.example/t", client_secret: "x", refresh_token: "y" },
    });
  });

  it("says how the collector is doing", () => {
    expect(mailboxStateView(mailbox)).toEqual({ text: "Not connected yet", tone: "wait" });
    expect(mailboxStateView({ ...mailbox, state: { connected: true, idle: true } }).tone).toBe("ok");
    expect(mailboxStateView({ ...mailbox, state: { connected: false, last_error: "login failed" } })).toEqual({
      text: "Not connected: login failed",
      tone: "bad",
    });
    expect(mailboxStateView({ ...mailbox, enabled: false }).tone).toBe("off");
  });
});

describe("unmatched mail", () => {
  const one: UnmatchedMail = { id: "u1", received_at: "2026-03-01T12:00:00Z", from_address: "x@y.example", subject: "Hi", reason: "unknown sender", candidates: [] };

  it("cannot assign refused mail, and drops assigned mail from the list", () => {
    expect(isAssignable(one)).toBe(true);
    expect(isAssignable({ ...one, reason: "refused: too many parts" })).toBe(false);
    expect(isAssignable({ ...one, status: "refused", reason: "refused: nested too deep" })).toBe(false);
    expect(isAssignable({ ...one, status: "unmatched" })).toBe(true);
    expect(removeUnmatched([one, { ...one, id: "u2" }], "u1").map((m) => m.id)).toEqual(["u2"]);
  });
});

describe("replies, copies and blind copies", () => {
  const carl = contact(1, "Carl Client", "carl@client.example");
  const cleo = contact(2, "Cleo Colleague", "cleo@client.example");
  const deal = record({ contact_ids: [carl.id, cleo.id] });
  const options = recipientOptions(deal, [carl, cleo]);
  const answer = activity({
    id: oid(7),
    direction: "incoming",
    subject: "AW: RE: Your quote [CRM-0123456789ABCDEFGHJKMNPQRSTVWXYZ01234]",
    mail: mail({
      from_address: "Carl@Client.example",
      to: ["crm+0123456789ABCDEFGHJKMNPQRSTVWXYZ01234@portal.example", "cleo@client.example"],
      cc: ["stranger@elsewhere.example", "crm@portal.example"],
    }),
  });

  it("answers the sender, or everyone the record may be written to, in the thread", () => {
    const one = replyPlan(answer, options, false, "crm@portal.example");
    expect(one.form.to).toEqual(["carl@client.example"]);
    expect(one.form.cc).toEqual([]);
    expect(one.form.subject).toBe("Re: Your quote");
    expect(one.form.inReplyTo).toBe(oid(7));
    const all = replyPlan(answer, options, true, "crm@portal.example");
    expect(all.form.to).toEqual(["carl@client.example"]);
    expect(all.form.cc).toEqual(["cleo@client.example"]); // never the CRM inbox itself
    expect(all.leftOut).toEqual(["stranger@elsewhere.example"]);
    expect(sendEmailBody(all.form)).toEqual({
      to: ["carl@client.example"],
      cc: ["cleo@client.example"],
      subject: "Re: Your quote",
      text: "",
      in_reply_to: oid(7),
    });
  });

  it("puts an address in one of To, Cc and Bcc", () => {
    let form = emptySendForm({ to: ["a@x.example"] });
    form = withRole(form, "a@x.example", "bcc");
    expect([form.to, form.cc, form.bcc]).toEqual([[], [], ["a@x.example"]]);
    expect(roleOf(form, "a@x.example")).toBe("bcc");
    form = withRole(form, "a@x.example", "");
    expect(roleOf(form, "a@x.example")).toBe("");
    const body = sendEmailBody(emptySendForm({ to: ["a@x.example"], cc: ["A@x.example", "b@x.example"], bcc: ["b@x.example", "c@x.example"], text: "Hi" }));
    expect(body.cc).toEqual(["b@x.example"]);
    expect(body.bcc).toEqual(["c@x.example"]);
    expect(sendFormErrors(emptySendForm({ to: ["a@x.example", "b@x.example"], cc: ["c@x.example"], bulk: true, text: "x" }))).toEqual([
      "One mail per recipient goes to each alone: no copies (Cc, Bcc).",
    ]);
    expect(sendFormErrors(emptySendForm({ to: ["a@x.example"], cc: ["nobody"], text: "x" }))).toEqual(["nobody is not an e-mail address."]);
  });

  it("makes reply subjects", () => {
    expect(replySubject("RE[2]: Aw: offer")).toBe("Re: offer");
    expect(replySubject("")).toBe("Re:");
  });
});

describe("received mail", () => {
  it("shows when it was written, else when it came", () => {
    const written = receivedAt(mail({ date: "2026-11-24T08:15:00Z", received_at: "2026-11-24T08:16:00Z" }), "2026-11-24T09:00:00Z");
    expect(written).toBe(new Date("2026-11-24T08:15:00Z").toLocaleString([], { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" }));
    expect(receivedAt(mail(), "2026-11-24T09:00:00Z")).toBe(
      new Date("2026-11-24T09:00:00Z").toLocaleString([], { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" }),
    );
    expect(receivedAt(mail(), "nonsense")).toBe("");
  });

  it("warns of outsiders in a thread as of outsiders with a code", () => {
    expect(flaggedText(mail({ match: "thread", from_address: "olaf@x.example" }))).toContain("answers a mail sent from this record");
    expect(flaggedText(mail({ match: "code", from_address: "olaf@x.example" }))).toContain("carries the code");
  });

  it("reads the unmatched count of the snapshot (administrators only)", () => {
    expect(unmatchedFromSnapshot({ unmatched: 4 })).toBe(4);
    expect(unmatchedFromSnapshot({})).toBeNull();
    expect(unmatchedFromSnapshot(undefined)).toBeNull();
    expect(unmatchedFromSnapshot({ unmatched: -1 })).toBeNull();
  });

  it("names the sender of an unmatched mail", () => {
    const base: UnmatchedMail = { id: "m", received_at: "2026-11-24T08:00:00Z", from_address: "p@x.example", subject: "", reason: "", candidates: [] };
    expect(unmatchedSender({ ...base, from_name: "Pat" })).toBe("Pat <p@x.example>");
    expect(unmatchedSender(base)).toBe("p@x.example");
  });
});
