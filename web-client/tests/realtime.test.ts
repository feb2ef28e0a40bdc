import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

// A stand-in for socket.io-client's Socket: records listeners, lets the test fire events.
class FakeSocket {
  connected = false;
  active = false;
  connects = 0;
  private listeners = new Map<string, ((...args: unknown[]) => void)[]>();

  on(name: string, fn: (...args: unknown[]) => void): this {
    this.listeners.set(name, [...(this.listeners.get(name) ?? []), fn]);
    return this;
  }
  onAny(): this {
    return this;
  }
  offAny(): this {
    return this;
  }
  removeAllListeners(): this {
    this.listeners.clear();
    return this;
  }
  connect(): this {
    this.connects += 1;
    return this;
  }
  disconnect(): this {
    return this;
  }
  fire(name: string, ...args: unknown[]): void {
    for (const fn of this.listeners.get(name) ?? []) fn(...args);
  }
}

const sockets: FakeSocket[] = [];
vi.mock("socket.io-client", () => ({
  io: () => {
    const socket = new FakeSocket();
    sockets.push(socket);
    return socket;
  },
}));

const { Realtime } = await import("../src/realtime");

function started() {
  const handlers = {
    auth: () => ({ token: "t", since: {}, active: true }),
    onEvent: vi.fn(),
    onConnected: vi.fn(),
    onDisconnected: vi.fn(),
    onRefused: vi.fn(),
    onRetrying: vi.fn(),
  };
  const realtime = new Realtime(handlers);
  realtime.start();
  const socket = sockets[sockets.length - 1];
  return { realtime, socket, handlers };
}

describe("Realtime when the server drains", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("reconnects after the delay the server asked for", () => {
    const { socket } = started();
    expect(socket.connects).toBe(1);
    socket.fire("server.draining", { reconnect_after_ms: 2500 });
    socket.fire("disconnect", "io server disconnect");
    vi.advanceTimersByTime(2400);
    expect(socket.connects).toBe(1);
    vi.advanceTimersByTime(200);
    expect(socket.connects).toBe(2);
  });

  it("uses the usual second for any other server disconnect", () => {
    const { socket } = started();
    socket.fire("server.draining", { reconnect_after_ms: 2500 });
    socket.fire("disconnect", "io server disconnect");
    vi.advanceTimersByTime(2600);
    socket.fire("disconnect", "io server disconnect"); // e.g. a later one, not announced
    vi.advanceTimersByTime(1000);
    expect(socket.connects).toBe(3);
  });

  it("retries a refusal by a draining node instead of giving up", () => {
    const { socket, handlers } = started();
    const refusal = Object.assign(new Error("this node is shutting down"), { data: { code: "draining" } });
    socket.fire("connect_error", refusal);
    expect(handlers.onRefused).not.toHaveBeenCalled();
    expect(handlers.onRetrying).toHaveBeenCalled();
    vi.advanceTimersByTime(1000);
    expect(socket.connects).toBe(2);
  });

  it("still reports other refusals", () => {
    const { socket, handlers } = started();
    const refusal = Object.assign(new Error("invalid or expired token"), { data: { code: "invalid_token" } });
    socket.fire("connect_error", refusal);
    expect(handlers.onRefused).toHaveBeenCalledWith("invalid_token", "invalid or expired token");
    vi.advanceTimersByTime(5000);
    expect(socket.connects).toBe(1);
  });
});
