// What to type into a Jabber (XMPP) client: the hub's account settings turned into the values
// and per-client steps the profile page shows. No Vue, no DOM.

/** GET /api/v1/xmpp/account */
export interface XmppAccount {
  jid: string;
  login: string;
  domain: string;
  host: string;
  starttls_port: number;
  tls_port: number;
  fingerprint: string;
  fingerprint_sha1: string;
  self_signed: boolean;
  mechanisms: string[];
}

/** The values a person types, with the connect host worked out. */
export interface ConnectionSettings {
  jid: string;
  login: string;
  domain: string;
  /** Where the client connects ("connect server", "host"). */
  host: string;
  /** True when `host` is the page's own host because the hub listens on every address. */
  hostFromPage: boolean;
  /** True when the client must be told the host: it differs from the domain. */
  hostOverride: boolean;
  starttlsPort: number;
  tlsPort: number;
  fingerprint: string;
  fingerprintSha1: string;
  selfSigned: boolean;
}

// Addresses a server binds to listen everywhere: nobody can connect to them.
const WILDCARD_HOSTS = new Set(["", "0.0.0.0", "::", "[::]", "*"]);

/** Where a client should connect: the hub's host, or the page's host when the hub listens everywhere. */
export function connectHost(accountHost: string, pageHost: string): { host: string; fromPage: boolean } {
  const host = accountHost.trim();
  const page = pageHost.replace(/^\[(.*)\]$/, "$1"); // location.hostname keeps IPv6 brackets
  if (WILDCARD_HOSTS.has(host) && page) return { host: page, fromPage: true };
  return { host, fromPage: false };
}

export function settingsFor(account: XmppAccount, pageHost: string): ConnectionSettings {
  const { host, fromPage } = connectHost(account.host, pageHost);
  return {
    jid: account.jid,
    login: account.login,
    domain: account.domain,
    host,
    hostFromPage: fromPage,
    hostOverride: host.toLowerCase() !== account.domain.toLowerCase(),
    starttlsPort: account.starttls_port,
    tlsPort: account.tls_port,
    fingerprint: account.fingerprint,
    fingerprintSha1: account.fingerprint_sha1,
    selfSigned: account.self_signed,
  };
}

/**
 * A fingerprint ("AB:CD:…") cut into rows of `perRow` bytes, each row but the last keeping its
 * trailing colon: the rows join back to exactly the original, so text selected across them
 * copies as the fingerprint itself. A SHA-256 fingerprint makes two rows of 16 bytes.
 */
export function fingerprintRows(fingerprint: string, perRow = 16): string[] {
  const bytes = fingerprint.split(":").filter(Boolean);
  const rows: string[] = [];
  for (let i = 0; i < bytes.length; i += perRow) {
    const row = bytes.slice(i, i + perRow).join(":");
    rows.push(i + perRow < bytes.length ? `${row}:` : row);
  }
  return rows;
}

export type ClientId = "pidgin" | "miranda" | "psi" | "gajim" | "profanity";

export interface ClientGuide {
  id: ClientId;
  name: string;
  /** Steps; text between backticks is a value to type (shown in monospace). */
  steps: string[];
}

/** True when the client must be told host and port: DNS alone (domain, port 5222) will not do. */
export function needsManualHost(s: ConnectionSettings): boolean {
  return s.hostOverride || s.starttlsPort !== 5222;
}

/** Per-client steps, with this user's values filled in. */
export function clientGuides(s: ConnectionSettings): ClientGuide[] {
  const manual = needsManualHost(s);
  const asked = s.selfSigned
    ? "The certificate is self-signed, so the client asks about it on the first connection"
    : "If the client asks about the certificate";
  return [
    {
      id: "pidgin",
      name: "Pidgin",
      steps: [
        "Accounts → Manage Accounts → Add…, Protocol `XMPP`.",
        `Basic tab: Username \`${s.login}\`, Domain \`${s.domain}\`, Resource empty, Password: your portal password.`,
        manual
          ? `Advanced tab: Connection security \`Require encryption\`, Connect port \`${s.starttlsPort}\`, Connect server \`${s.host}\`.`
          : "Advanced tab: Connection security `Require encryption`; leave Connect port and Connect server as they are.",
        `For old-style SSL instead: Connection security \`Use old-style SSL\`, Connect port \`${s.tlsPort}\`.`,
        `${asked}: View Certificate…, compare the SHA-256 fingerprint with the one on this page, then Accept.`,
      ],
    },
    {
      id: "miranda",
      name: "Miranda NG",
      steps: [
        "Main menu → Accounts → +, any account name, protocol `Jabber`.",
        `User \`${s.login}\`, Domain/Server \`${s.domain}\`, Password: your portal password.`,
        manual
          ? `Tick \`Use custom connection host and port\`: \`${s.host}\` : \`${s.starttlsPort}\`.`
          : "Leave `Use custom connection host and port` unticked.",
        `In the account's options keep \`Use TLS\` ticked (STARTTLS, port ${s.starttlsPort}); \`Use SSL\` needs port \`${s.tlsPort}\`.`,
        "Miranda NG does not ask about certificates. With certificate validation on, it connects only once the portal's certificate is trusted by Windows: ask your administrator for the certificate file and check its fingerprint before importing it.",
      ],
    },
    {
      id: "psi",
      name: "Psi",
      steps: [
        `Account Setup → Add. Account tab: XMPP Address \`${s.jid}\`, Password: your portal password.`,
        manual
          ? `Connection tab: tick \`Manually Specify Server Host/Port\`, Host \`${s.host}\`, Port \`${s.starttlsPort}\`.`
          : "Connection tab: leave `Manually Specify Server Host/Port` unticked.",
        `Encrypt connection \`Always\`, or \`Legacy SSL\` with Port \`${s.tlsPort}\`. Allow plaintext authentication: \`Over encrypted connection\`.`,
        `${asked}: Details…, compare the SHA-256 fingerprint, then trust the certificate and continue.`,
      ],
    },
    {
      id: "gajim",
      name: "Gajim",
      steps: [
        `Add Account → Log In: XMPP Address \`${s.jid}\`, Password: your portal password.`,
        manual
          ? `Switch on Advanced before Log In, then: Hostname \`${s.host}\`, Port \`${s.starttlsPort}\`, Connection Type \`STARTTLS\` — or \`DIRECT TLS\` with Port \`${s.tlsPort}\`.`
          : `Nothing else to set (with Advanced: Connection Type \`STARTTLS\`, or \`DIRECT TLS\` with Port \`${s.tlsPort}\`).`,
        `${asked}: open the certificate details, compare the SHA-256 fingerprint, then trust it and connect.`,
      ],
    },
    {
      id: "profanity",
      name: "Profanity",
      steps: [
        `\`/account add portal\`, then \`/account set portal jid ${s.jid}\`.`,
        manual
          ? `\`/account set portal server ${s.host}\` and \`/account set portal port ${s.starttlsPort}\`.`
          : "No server or port to set.",
        `\`/account set portal tls force\` for STARTTLS, or \`tls legacy\` (\`tls direct\` from 0.15) with port \`${s.tlsPort}\`.`,
        `\`/connect portal\`. ${asked}: Profanity shows the SHA-1 fingerprint; compare it with the SHA-1 one on this page, then \`/tls always\`.`,
      ],
    },
  ];
}

export interface Segment {
  text: string;
  code: boolean;
}

/** A step split into plain text and values to type (the parts between backticks). */
export function segments(step: string): Segment[] {
  const parts = step.split("`");
  const out: Segment[] = [];
  parts.forEach((text, i) => {
    if (text) out.push({ text, code: i % 2 === 1 });
  });
  return out;
}
