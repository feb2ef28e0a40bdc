import { describe, expect, it } from "vitest";
import {
  IdleTracker,
  TypingThrottle,
  typingLabel,
  typingStarted,
  typingStopped,
  typingUsers,
} from "../src/core/timing";

describe("IdleTracker", () => {
  it("goes idle after five minutes without input and back on input", () => {
    const idle = new IdleTracker(0);
    expect(idle.tick(299_999)).toBe(false);
    expect(idle.isActive()).toBe(true);
    expect(idle.tick(300_000)).toBe(true);
    expect(idle.isActive()).toBe(false);
    expect(idle.tick(400_000)).toBe(false); // reported once
    expect(idle.input(400_001)).toBe(true);
    expect(idle.input(400_002)).toBe(false);
    expect(idle.tick(600_000)).toBe(false);
  });
});

describe("TypingThrottle", () => {
  it("sends at most one typing event per chat every three seconds", () => {
    const t = new TypingThrottle();
    expect(t.shouldSend("a", 0)).toBe(true);
    expect(t.shouldSend("a", 2999)).toBe(false);
    expect(t.shouldSend("b", 2999)).toBe(true);
    expect(t.shouldSend("a", 3000)).toBe(true);
    t.reset("a");
    expect(t.shouldSend("a", 3001)).toBe(true);
  });
});

describe("typing indicator", () => {
  it("shows typists until their time runs out or they send", () => {
    let map = typingStarted({}, "c", "u1", 0, 5000);
    map = typingStarted(map, "c", "u2", 1000, 5000);
    expect(typingUsers(map, "c", 4000)).toEqual(["u1", "u2"]);
    expect(typingUsers(map, "c", 5500)).toEqual(["u2"]);
    map = typingStopped(map, "c", "u2");
    expect(typingUsers(map, "c", 5500)).toEqual([]);
    expect(typingStopped(map, "zz", "u1")).toBe(map);
  });

  it("labels one, two or many", () => {
    expect(typingLabel([])).toBe("");
    expect(typingLabel(["Mary"])).toBe("Mary is typing…");
    expect(typingLabel(["Mary", "John"])).toBe("Mary and John are typing…");
    expect(typingLabel(["A", "B", "C"])).toBe("A and 2 others are typing…");
  });
});
