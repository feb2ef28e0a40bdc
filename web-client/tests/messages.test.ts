import { describe, expect, it } from "vitest";
import {
  compareIds,
  idBefore,
  laterMark,
  mergeMessages,
  newClientId,
  newestConfirmed,
  oldestConfirmed,
  pendingMessage,
  seenMessageId,
} from "../src/core/messages";
import { msg, oid } from "./fixtures";

const ids = (list: { id: string }[]) => list.map((m) => m.id);

describe("mergeMessages", () => {
  it("keeps each message once, oldest first", () => {
    const merged = mergeMessages([msg(3), msg(1)], [msg(2), msg(3), msg(1)]);
    expect(ids(merged)).toEqual([oid(1), oid(2), oid(3)]);
  });

  it("merges an older history page in front", () => {
    const merged = mergeMessages([msg(51), msg(52)], [msg(49), msg(50), msg(51)]);
    expect(ids(merged)).toEqual([oid(49), oid(50), oid(51), oid(52)]);
  });

  it("takes the edited copy over the original, whatever the arrival order", () => {
    const edited = msg(1, { text: "fixed", edited_at: "2026-01-01T13:00:00.000Z" });
    expect(mergeMessages([msg(1)], [edited])[0]?.text).toBe("fixed");
    expect(mergeMessages([edited], [msg(1)])[0]?.text).toBe("fixed");
  });

  it("never resurrects a deleted message", () => {
    const deleted = msg(1, { text: "", deleted: true, edited_at: "2026-01-01T13:00:00.000Z" });
    const later = msg(1, { text: "again", edited_at: "2026-01-01T12:30:00.000Z" });
    expect(mergeMessages([deleted], [later])[0]?.deleted).toBe(true);
  });

  it("replaces the optimistic copy with the stored message (same author and client_id)", () => {
    const pending = pendingMessage("c1", "me", "hi", "web-1");
    const stored = msg(5, { author_id: "me", text: "hi", client_id: "web-1" });
    const merged = mergeMessages([msg(4), pending], [stored]);
    expect(ids(merged)).toEqual([oid(4), oid(5)]);
    // the answer to the POST arriving after the live event changes nothing
    expect(ids(mergeMessages(merged, [stored]))).toEqual([oid(4), oid(5)]);
    // a late optimistic copy is dropped when its stored copy is there
    expect(ids(mergeMessages(merged, [pending]))).toEqual([oid(4), oid(5)]);
  });

  it("does not match another author's client_id", () => {
    const pending = pendingMessage("c1", "me", "hi", "1");
    const theirs = msg(5, { author_id: "other", client_id: "1" });
    const merged = mergeMessages([pending], [theirs]);
    expect(merged.map((m) => m.pending ?? false)).toEqual([false, true]);
  });

  it("keeps pending messages after confirmed ones, in sending order", () => {
    const a = pendingMessage("c1", "me", "a", "a", new Date(Date.UTC(2026, 0, 1, 12, 0, 1)));
    const b = pendingMessage("c1", "me", "b", "b", new Date(Date.UTC(2026, 0, 1, 12, 0, 2)));
    const merged = mergeMessages([b, msg(9), a], []);
    expect(merged.map((m) => m.text)).toEqual(["message 9", "a", "b"]);
  });

  it("replaces a failed copy by its retry", () => {
    const failed = { ...pendingMessage("c1", "me", "x", "k"), pending: false, failed: true };
    const retry = pendingMessage("c1", "me", "x", "k");
    const merged = mergeMessages([failed], [retry]);
    expect(merged).toHaveLength(1);
    expect(merged[0]?.pending).toBe(true);
  });
});

describe("helpers", () => {
  it("orders ids by creation", () => {
    expect(compareIds(oid(2), oid(10))).toBeLessThan(0);
    expect(compareIds(oid(10), oid(10))).toBe(0);
  });

  it("finds the newest and oldest confirmed messages", () => {
    const list = mergeMessages([msg(1), msg(2)], [pendingMessage("c1", "me", "p", "p")]);
    expect(newestConfirmed(list)?.id).toBe(oid(2));
    expect(oldestConfirmed(list)?.id).toBe(oid(1));
    expect(newestConfirmed([])).toBeUndefined();
  });

  it("makes distinct client ids that the hub accepts", () => {
    const a = newClientId(1000, () => 0.5);
    const b = newClientId(1000, () => 0.5);
    expect(a).not.toBe(b);
    for (const id of [a, b]) {
      expect(id).toMatch(/^[A-Za-z0-9._:-]{1,64}$/);
    }
  });
});

describe("unconfirmed messages", () => {
  it("keep a failed or sending message below the whole history, in the order written", () => {
    const failed = { ...pendingMessage("c1", "me", "first", "web-1", new Date(Date.UTC(2026, 0, 1, 11))), pending: false, failed: true };
    const sending = pendingMessage("c1", "me", "second", "web-2", new Date(Date.UTC(2026, 0, 1, 11, 1)));
    // older than every stored message, and still last
    const merged = mergeMessages([sending, failed], [msg(2), msg(1)]);
    expect(merged.map((m) => m.text)).toEqual(["message 1", "message 2", "first", "second"]);
  });
});

describe("the history around a message", () => {
  it("asks for the id just below it, so that the page starts with the message", () => {
    expect(idBefore(oid(0x100))).toBe(oid(0xff));
    expect(idBefore("65f0c0ffee00000000000000")).toBe("65f0c0ffedffffffffffffff");
    expect(idBefore(oid(0))).toBeNull();
    expect(idBefore("pending:web-1")).toBeNull();
  });
});

describe("seen in a private dialog", () => {
  const mine = (n: number, over = {}) => msg(n, { author_id: "me", ...over });

  it("marks the newest own message at or below the other person's read mark", () => {
    const list = [mine(1), msg(2), mine(3), mine(5)];
    expect(seenMessageId(list, "me", oid(4))).toBe(oid(3));
    expect(seenMessageId(list, "me", oid(5))).toBe(oid(5));
    expect(seenMessageId(list, "me", oid(9))).toBe(oid(5));
  });

  it("marks nothing before they have read one of the user's messages", () => {
    expect(seenMessageId([msg(1), mine(3)], "me", null)).toBeNull();
    expect(seenMessageId([msg(1), mine(3)], "me", oid(2))).toBeNull();
    expect(seenMessageId([msg(1), msg(2)], "me", oid(2))).toBeNull();
  });

  it("never marks a message not yet stored, nor a deleted one", () => {
    const sending = pendingMessage("c1", "me", "later", "cid-1");
    expect(seenMessageId([mine(1), mine(2, { deleted: true }), sending], "me", oid(9))).toBe(oid(1));
    expect(seenMessageId([mine(1), { ...mine(3), failed: true }], "me", oid(9))).toBe(oid(1));
  });

  it("a read mark only moves forward", () => {
    expect(laterMark(null, oid(3))).toBe(oid(3));
    expect(laterMark(oid(3), null)).toBe(oid(3));
    expect(laterMark(oid(5), oid(3))).toBe(oid(5));
    expect(laterMark(oid(3), oid(5))).toBe(oid(5));
    expect(laterMark(undefined, undefined)).toBeNull();
  });
});
