import { describe, expect, it } from "vitest";
import { isEnvelope, StreamTracker } from "../src/core/streams";

describe("StreamTracker", () => {
  it("starts unknown streams at the snapshot head and asks to reload them", () => {
    const t = new StreamTracker();
    const { reload } = t.onSnapshot({ "user:u": 4, "chat:c": 10 });
    expect(reload.sort()).toEqual(["chat:c", "user:u"]);
    expect(t.since()).toEqual({ "user:u": 4, "chat:c": 10 });
  });

  it("keeps known positions across a reconnect snapshot and reloads only new streams", () => {
    const t = new StreamTracker();
    t.onSnapshot({ "user:u": 4 });
    t.accept("user:u", 5);
    const { reload } = t.onSnapshot({ "user:u": 9, "chat:new": 3 });
    expect(reload).toEqual(["chat:new"]);
    expect(t.position("user:u")).toBe(5);
  });

  it("applies each seq once and ignores replays of what was applied", () => {
    const t = new StreamTracker();
    t.onSnapshot({ s: 2 });
    expect(t.accept("s", 3)).toBe("apply");
    expect(t.accept("s", 3)).toBe("duplicate");
    expect(t.accept("s", 2)).toBe("duplicate");
    expect(t.accept("s", 4)).toBe("apply");
    expect(t.since()).toEqual({ s: 4 });
  });

  it("reports a gap but still moves on", () => {
    const t = new StreamTracker();
    t.onSnapshot({ s: 2 });
    expect(t.accept("s", 5)).toBe("gap");
    expect(t.position("s")).toBe(5);
    expect(t.accept("s", 4)).toBe("duplicate");
  });

  it("accepts events of a stream it does not track yet", () => {
    const t = new StreamTracker();
    expect(t.accept("chat:x", 7)).toBe("apply");
    expect(t.position("chat:x")).toBe(7);
  });

  it("separates events already counted in the snapshot from newer ones", () => {
    const t = new StreamTracker();
    t.onSnapshot({ s: 1 });
    t.accept("s", 2);
    // reconnect: the snapshot's counters already include events up to 6
    t.onSnapshot({ s: 6 });
    expect(t.accept("s", 3)).toBe("apply");
    expect(t.isAfterSnapshot("s", 3)).toBe(false);
    expect(t.isAfterSnapshot("s", 6)).toBe(false);
    expect(t.isAfterSnapshot("s", 7)).toBe(true);
  });

  it("takes the resync position", () => {
    const t = new StreamTracker();
    t.onSnapshot({ s: 1 });
    t.resync("s", 40);
    expect(t.since()).toEqual({ s: 40 });
    expect(t.accept("s", 40)).toBe("duplicate");
    expect(t.accept("s", 41)).toBe("apply");
    expect(t.isAfterSnapshot("s", 41)).toBe(true);
  });

  it("follows a joined chat from the join position, unless it already has one", () => {
    const t = new StreamTracker();
    t.onSnapshot({ "user:u": 1 });
    t.join("chat:c", 12);
    expect(t.position("chat:c")).toBe(12);
    expect(t.isAfterSnapshot("chat:c", 13)).toBe(true);
    t.accept("chat:c", 13);
    t.join("chat:c", 12);
    expect(t.position("chat:c")).toBe(13);
  });

  it("forgets left streams", () => {
    const t = new StreamTracker();
    t.onSnapshot({ a: 1, b: 2 });
    t.forget("a");
    expect(t.since()).toEqual({ b: 2 });
  });
});

describe("isEnvelope", () => {
  it("recognises persisted events by shape and name", () => {
    const env = { stream: "s", seq: 1, type: "im.message", data: {}, ts: "" };
    expect(isEnvelope("im.message", env)).toBe(true);
    expect(isEnvelope("im.read", env)).toBe(false);
    expect(isEnvelope("im.typing", { chat_id: "c", user_id: "u" })).toBe(false);
    expect(isEnvelope("x", null)).toBe(false);
  });
});
