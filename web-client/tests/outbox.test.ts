import { describe, expect, it } from "vitest";
import { isRetryable, outboxKey, parseOutbox, retryDelay, serializeOutbox, withEntry, withoutEntry, type OutboxEntry } from "../src/core/outbox";
import { ApiError } from "../src/core/problem";

const entry = (n: number, over: Partial<OutboxEntry> = {}): OutboxEntry => ({
  chat_id: "c1",
  text: `text ${n}`,
  client_id: `web-${n}`,
  created_at: new Date(Date.UTC(2026, 0, 1, 12, 0, n)).toISOString(),
  ...over,
});

describe("the outbox", () => {
  it("survives a round trip through storage, oldest first", () => {
    const list = withEntry(withEntry([], entry(2)), entry(1));
    expect(list.map((e) => e.client_id)).toEqual(["web-1", "web-2"]);
    expect(parseOutbox(serializeOutbox(list))).toEqual(list);
    expect(outboxKey("u1")).toBe("portalhub.outbox.u1");
  });

  it("keeps one entry per client_id: a retry replaces it", () => {
    const list = withEntry([entry(1), entry(2)], entry(1, { text: "again" }));
    expect(list.map((e) => e.text)).toEqual(["again", "text 2"]);
    expect(withoutEntry(list, "web-1").map((e) => e.client_id)).toEqual(["web-2"]);
  });

  it("drops what it cannot read rather than breaking the app", () => {
    expect(parseOutbox(null)).toEqual([]);
    expect(parseOutbox("{not json")).toEqual([]);
    expect(parseOutbox('{"a":1}')).toEqual([]);
    expect(parseOutbox(JSON.stringify([entry(1), { chat_id: 1 }, { ...entry(2), text: "  " }]))).toEqual([entry(1)]);
  });

  it("tries again when the hub was not reached or busy, not when it refused the message", () => {
    for (const status of [0, 408, 429, 500, 502, 503, 507]) {
      expect(isRetryable(new ApiError(status, {}))).toBe(true);
    }
    for (const status of [400, 403, 404, 413, 422]) {
      expect(isRetryable(new ApiError(status, {}))).toBe(false);
    }
    expect(isRetryable(new TypeError("Failed to fetch"))).toBe(true);
  });

  it("waits longer after each failure, up to 30 s", () => {
    expect([0, 1, 2, 3, 4, 10].map(retryDelay)).toEqual([2000, 4000, 8000, 16000, 30000, 30000]);
  });
});
