import { describe, expect, it } from "vitest";
import {
  applyCounters,
  badge,
  emptyUnread,
  markedRead,
  onDeleted,
  onMessage,
  readTarget,
  total,
} from "../src/core/unread";
import { msg, oid } from "./fixtures";

const live = { me: "me", readingNow: false, afterSnapshot: true };

describe("unread counting", () => {
  it("counts new messages from others", () => {
    let s = emptyUnread();
    s = onMessage(s, msg(1), live);
    s = onMessage(s, msg(2), live);
    s = onMessage(s, msg(3, { chat_id: "c2" }), live);
    expect(s.chats).toEqual({ c1: 2, c2: 1 });
    expect(total(s)).toBe(3);
  });

  it("does not count one's own messages, and moves the read mark to them", () => {
    let s = onMessage(emptyUnread(), msg(1), live);
    s = onMessage(s, msg(2, { author_id: "me" }), live);
    expect(s.chats).toEqual({ c1: 1 });
    expect(s.lastRead.c1).toBe(oid(2));
  });

  it("does not count what is being read right now", () => {
    const s = onMessage(emptyUnread(), msg(1), { ...live, readingNow: true });
    expect(total(s)).toBe(0);
  });

  it("does not count replayed messages the snapshot's counters already include", () => {
    const s = onMessage(emptyUnread(), msg(1), { ...live, afterSnapshot: false });
    expect(total(s)).toBe(0);
  });

  it("does not count messages at or before the read mark", () => {
    let s = markedRead(emptyUnread(), "c1", oid(5), false);
    s = onMessage(s, msg(4), live);
    s = onMessage(s, msg(5), live);
    expect(total(s)).toBe(0);
    s = onMessage(s, msg(6), live);
    expect(total(s)).toBe(1);
  });

  it("takes the hub's counters as they are", () => {
    let s = onMessage(emptyUnread(), msg(1), live);
    s = applyCounters(s, { unread: 4, chats: { c9: 4, c0: 0 } });
    expect(s.chats).toEqual({ c9: 4 });
    expect(total(s)).toBe(4);
  });

  it("uncounts an unread message that is deleted, but not a read one", () => {
    let s = markedRead(emptyUnread(), "c1", oid(2), false);
    s = onMessage(s, msg(3), live);
    s = onMessage(s, msg(4), live);
    s = onDeleted(s, msg(4, { deleted: true }), live);
    expect(s.chats).toEqual({ c1: 1 });
    s = onDeleted(s, msg(1, { deleted: true }), live);
    expect(s.chats).toEqual({ c1: 1 });
    s = onDeleted(s, msg(3, { deleted: true }), live);
    expect(s.chats).toEqual({});
  });

  it("clears a chat read to its end; a read mark never moves back", () => {
    let s = onMessage(emptyUnread(), msg(1), live);
    s = markedRead(s, "c1", oid(1), true);
    expect(total(s)).toBe(0);
    s = markedRead(s, "c1", oid(0), false);
    expect(s.lastRead.c1).toBe(oid(1));
  });
});

describe("readTarget", () => {
  it("reads up to the newest message when there is something new", () => {
    expect(readTarget(null, msg(3), 0)).toBe(oid(3));
    expect(readTarget(oid(2), msg(3), 1)).toBe(oid(3));
  });

  it("does nothing when everything is read", () => {
    expect(readTarget(oid(3), msg(3), 0)).toBeUndefined();
    expect(readTarget(oid(3), undefined, 2)).toBeUndefined();
  });

  it("reads again when the counters disagree with the mark", () => {
    expect(readTarget(oid(3), msg(3), 2)).toBe(oid(3));
  });
});

describe("badge", () => {
  it("shows nothing, a number or 99+", () => {
    expect(badge(0)).toBe("");
    expect(badge(7)).toBe("7");
    expect(badge(250)).toBe("99+");
  });
});
