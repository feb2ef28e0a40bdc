import { describe, expect, it } from "vitest";
import {
  clientGuides,
  connectHost,
  fingerprintRows,
  needsManualHost,
  segments,
  settingsFor,
  type XmppAccount,
} from "../src/core/jabber";

const FP = "A6:03:C8:28:3F:93:FF:4F:71:C6:90:BC:31:17:D9:12:96:55:F3:EF:D3:2C:A7:A3:AF:7D:03:1D:76:4B:AC:4B";

function account(over: Partial<XmppAccount> = {}): XmppAccount {
  return {
    jid: "john@portal.example",
    login: "john",
    domain: "portal.example",
    host: "chat.portal.example",
    starttls_port: 15222,
    tls_port: 15223,
    fingerprint: FP,
    fingerprint_sha1: "AA:BB",
    self_signed: true,
    mechanisms: ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN (over TLS only)"],
    ...over,
  };
}

/** A guide's steps as plain text, backticks removed. */
function text(steps: string[]): string {
  return steps.map((s) => s.replaceAll("`", "")).join("\n");
}

describe("connect host", () => {
  it("keeps a real host", () => {
    expect(connectHost("chat.portal.example", "intranet.example")).toEqual({ host: "chat.portal.example", fromPage: false });
    expect(connectHost("127.0.0.1", "localhost")).toEqual({ host: "127.0.0.1", fromPage: false });
  });

  it("replaces a listen-everywhere address with the page's host", () => {
    for (const wildcard of ["0.0.0.0", "::", "[::]", "", " 0.0.0.0 "]) {
      expect(connectHost(wildcard, "intranet.example")).toEqual({ host: "intranet.example", fromPage: true });
    }
    expect(connectHost("::", "[fd00::5]")).toEqual({ host: "fd00::5", fromPage: true });
  });

  it("keeps the wildcard when the page has no host to offer", () => {
    expect(connectHost("0.0.0.0", "")).toEqual({ host: "0.0.0.0", fromPage: false });
  });
});

describe("settings", () => {
  it("needs a host override when the host is not the domain", () => {
    const s = settingsFor(account(), "intranet.example");
    expect(s.host).toBe("chat.portal.example");
    expect(s.hostOverride).toBe(true);
    expect(needsManualHost(s)).toBe(true);
  });

  it("needs nothing by hand when DNS and the standard port do", () => {
    const s = settingsFor(account({ host: "Portal.Example", starttls_port: 5222, tls_port: 5223 }), "x");
    expect(s.hostOverride).toBe(false);
    expect(needsManualHost(s)).toBe(false);
  });

  it("needs the port by hand when it is not 5222, even with the right host", () => {
    const s = settingsFor(account({ host: "portal.example" }), "x");
    expect(s.hostOverride).toBe(false);
    expect(needsManualHost(s)).toBe(true);
  });
});

describe("fingerprint", () => {
  it("is shown as two rows of 16 bytes that join back to exactly the original", () => {
    const rows = fingerprintRows(FP);
    expect(rows).toEqual([
      "A6:03:C8:28:3F:93:FF:4F:71:C6:90:BC:31:17:D9:12:",
      "96:55:F3:EF:D3:2C:A7:A3:AF:7D:03:1D:76:4B:AC:4B",
    ]);
    expect(rows.join("")).toBe(FP);
    expect(fingerprintRows("AB:CD", 16)).toEqual(["AB:CD"]);
    expect(fingerprintRows("")).toEqual([]);
  });
});

describe("client guides", () => {
  const s = settingsFor(account(), "intranet.example");
  const guides = clientGuides(s);

  it("covers the five clients", () => {
    expect(guides.map((g) => g.name)).toEqual(["Pidgin", "Miranda NG", "Psi", "Gajim", "Profanity"]);
  });

  it("puts this user's values into every guide", () => {
    for (const g of guides) {
      const all = text(g.steps);
      expect(all, g.name).toMatch(/john/);
      expect(all, g.name).toContain("chat.portal.example");
      expect(all, g.name).toContain("15222");
      expect(all, g.name).toContain("15223");
    }
  });

  it("uses each client's own words", () => {
    const by = Object.fromEntries(guides.map((g) => [g.id, text(g.steps)]));
    expect(by.pidgin).toContain("Connection security Require encryption, Connect port 15222, Connect server chat.portal.example");
    expect(by.pidgin).toContain("Use old-style SSL, Connect port 15223");
    expect(by.pidgin).toContain("Username john, Domain portal.example");
    expect(by.miranda).toContain("Use custom connection host and port: chat.portal.example : 15222");
    expect(by.psi).toContain("Legacy SSL with Port 15223");
    expect(by.gajim).toContain("Connection Type STARTTLS");
    expect(by.profanity).toContain("/account set portal jid john@portal.example");
    expect(by.profanity).toContain("/account set portal server chat.portal.example");
    expect(by.profanity).toContain("/tls always");
  });

  it("tells to leave host and port alone when DNS and 5222 do", () => {
    const plain = clientGuides(settingsFor(account({ host: "portal.example", starttls_port: 5222, tls_port: 5223 }), "x"));
    const pidgin = text(plain.find((g) => g.id === "pidgin")!.steps);
    expect(pidgin).toContain("leave Connect port and Connect server as they are");
    const profanity = text(plain.find((g) => g.id === "profanity")!.steps);
    expect(profanity).not.toContain("/account set portal server");
  });

  it("mentions the self-signed certificate only when it is", () => {
    const selfSigned = text(guides[0].steps);
    expect(selfSigned).toContain("self-signed");
    const signed = text(clientGuides(settingsFor(account({ self_signed: false }), "x"))[0].steps);
    expect(signed).not.toContain("self-signed");
    expect(signed).toContain("If the client asks about the certificate");
  });

  it("has balanced backticks in every step", () => {
    for (const g of guides) for (const step of g.steps) expect(step.split("`").length % 2, step).toBe(1);
  });
});

describe("segments", () => {
  it("splits a step into text and values to type", () => {
    expect(segments("Username `john`, Domain `portal.example`.")).toEqual([
      { text: "Username ", code: false },
      { text: "john", code: true },
      { text: ", Domain ", code: false },
      { text: "portal.example", code: true },
      { text: ".", code: false },
    ]);
    expect(segments("`/connect portal`")).toEqual([{ text: "/connect portal", code: true }]);
    expect(segments("no values")).toEqual([{ text: "no values", code: false }]);
  });
});
