import { describe, expect, it } from "vitest";
import {
  applyChange,
  chatPresence,
  describe as describePresence,
  fromSnapshot,
  mayDisturb,
  onlineMembers,
  ownChoice,
  statusOf,
  tally,
} from "../src/core/presence";
import { chat } from "./fixtures";

describe("presence", () => {
  it("reads the snapshot and ignores unknown values", () => {
    const map = fromSnapshot({ a: "online", b: "dnd", c: "weird" });
    expect(statusOf(map, "a")).toBe("online");
    expect(statusOf(map, "b")).toBe("dnd");
    expect(statusOf(map, "c")).toBe("offline");
    expect(statusOf(map, undefined)).toBe("offline");
  });

  it("applies presence.changed and keeps the last seen time", () => {
    let map = fromSnapshot({ a: "online" });
    map = applyChange(map, { user_id: "a", status: "offline", last_seen: "2026-01-01T10:00:00Z" });
    expect(map.a).toMatchObject({ status: "offline", lastSeen: "2026-01-01T10:00:00Z" });
    map = applyChange(map, { user_id: "a", status: "online" });
    expect(map.a?.lastSeen).toBe("2026-01-01T10:00:00Z");
  });

  it("shows the peer's status on a private dialog only", () => {
    const map = fromSnapshot({ other: "away" });
    expect(chatPresence(chat("p"), "me", map)).toBe("away");
    expect(chatPresence(chat("g", { kind: "group" }), "me", map)).toBeUndefined();
  });

  it("counts members who are around", () => {
    const map = fromSnapshot({ a: "online", b: "dnd", c: "offline", me: "online" });
    expect(onlineMembers(chat("g", { kind: "group", member_ids: ["me", "a", "b", "c", "d"] }), "me", map)).toBe(2);
    expect(tally(map, ["a", "b", "c", "zz"])).toEqual({ online: 1, away: 0, dnd: 1, offline: 2 });
  });

  it("describes statuses for people", () => {
    const now = new Date("2026-01-01T12:00:00Z");
    expect(describePresence({ status: "online" }, now)).toBe("Online");
    expect(describePresence(undefined, now)).toBe("Offline");
    expect(describePresence({ status: "offline", lastSeen: "2026-01-01T11:50:00Z" }, now)).toBe("Last seen 10 min ago");
    expect(describePresence({ status: "offline", lastSeen: "2026-01-01T09:00:00Z" }, now)).toBe("Last seen 3 h ago");
    expect(describePresence({ status: "dnd", until: "2026-01-01T18:00:00Z" }, now)).toMatch(/^Do not disturb until /);
  });

  it("maps the own state to the selector, and keeps quiet in do-not-disturb", () => {
    expect(ownChoice({ manual: null })).toBe("auto");
    expect(ownChoice({ manual: "dnd" })).toBe("dnd");
    expect(ownChoice(undefined)).toBe("auto");
    expect(mayDisturb("dnd")).toBe(false);
    expect(mayDisturb("away")).toBe(true);
  });
});
