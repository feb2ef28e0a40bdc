// The Socket.IO connection: authenticates with the token, asks for what was missed (`since`)
// on every (re)connect, and hands events to the store. A node that shuts down sends
// `server.draining` {reconnect_after_ms} before disconnecting: the client then reconnects after
// that delay, through the load balancer to another node, with its `since` positions.

import { io, type Socket } from "socket.io-client";

export interface RealtimeHandlers {
  auth(): { token: string; since: Record<string, number>; active: boolean };
  onEvent(name: string, payload: unknown): void;
  onConnected(): void;
  onDisconnected(reason: string): void;
  onRefused(code: string | undefined, message: string): void;
  onRetrying(): void;
}

const RETRY_MS = 1000;
const MAX_DRAIN_DELAY_MS = 30_000;

export class Realtime {
  private socket: Socket | null = null;
  /** Set while the client itself keeps the socket closed (offline, logged out). */
  private held = false;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  /** Set by `server.draining`: how long to wait before reconnecting after the disconnect. */
  private drainDelayMs: number | null = null;

  constructor(private readonly handlers: RealtimeHandlers) {}

  get connected(): boolean {
    return this.socket?.connected ?? false;
  }

  start(): void {
    this.held = false;
    if (this.socket) {
      if (!this.socket.connected && !this.socket.active) this.socket.connect();
      return;
    }
    const socket = io({
      path: "/socket.io/",
      autoConnect: false,
      reconnection: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      timeout: 10000,
      // Called at every (re)connect: the positions are always current.
      auth: (cb) => cb(this.handlers.auth()),
    });
    socket.on("connect", () => this.handlers.onConnected());
    socket.on("server.draining", (data: { reconnect_after_ms?: unknown } | undefined) => {
      const ms = Number(data?.reconnect_after_ms);
      this.drainDelayMs = Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_DRAIN_DELAY_MS) : RETRY_MS;
    });
    socket.on("disconnect", (reason) => {
      this.handlers.onDisconnected(reason);
      // A server-side disconnect is not retried by socket.io itself: do it here, gently.
      const delay = this.drainDelayMs ?? RETRY_MS;
      this.drainDelayMs = null;
      if (reason === "io server disconnect" && !this.held) this.retryLater(delay);
    });
    socket.on("connect_error", (err: Error & { data?: { code?: string } }) => {
      if (!socket.active && err.data?.code === "draining") {
        // reached a node that is shutting down: another one will take us in a moment
        this.handlers.onRetrying();
        this.retryLater(RETRY_MS);
      } else if (!socket.active) this.handlers.onRefused(err.data?.code, err.message);
      else this.handlers.onRetrying();
    });
    socket.onAny((name: string, payload: unknown) => this.handlers.onEvent(name, payload));
    this.socket = socket;
    socket.connect();
  }

  private retryLater(delayMs: number): void {
    if (this.retryTimer) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (!this.held && this.socket && !this.socket.connected) this.socket.connect();
    }, delayMs);
  }

  /** Close the connection and keep it closed until start() (going offline). */
  hold(): void {
    this.held = true;
    this.socket?.disconnect();
  }

  stop(): void {
    this.held = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.socket?.removeAllListeners();
    this.socket?.offAny();
    this.socket?.disconnect();
    this.socket = null;
  }

  /** A client event with acknowledgement; resolves to the ack, or null when not connected. */
  async emit(name: string, data: unknown, timeoutMs = 5000): Promise<Record<string, unknown> | null> {
    const socket = this.socket;
    if (!socket?.connected) return null;
    try {
      return (await socket.timeout(timeoutMs).emitWithAck(name, data)) as Record<string, unknown>;
    } catch {
      return null;
    }
  }
}
