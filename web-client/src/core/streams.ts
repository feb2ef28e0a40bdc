// Stream positions: what the client has applied of each stream, so that a reconnect asks for
// exactly what was missed, and nothing is applied twice. No Vue, no DOM.

export type Verdict =
  /** Apply it: the next event of the stream. */
  | "apply"
  /** Already applied (replay overlap, a duplicate): ignore it. */
  | "duplicate"
  /** Apply it, but events before it were never seen: reload the stream's state. */
  | "gap";

export interface SnapshotOutcome {
  /** Streams the client had no position for: their state must be (re)loaded over REST. */
  reload: string[];
}

export class StreamTracker {
  private last = new Map<string, number>();
  /** Heads at the latest snapshot: events up to here are already in the snapshot's counters. */
  private snapshotHeads = new Map<string, number>();

  /** The `since` map for the connect handshake: every stream with a known position. */
  since(): Record<string, number> {
    return Object.fromEntries(this.last);
  }

  position(stream: string): number | undefined {
    return this.last.get(stream);
  }

  has(stream: string): boolean {
    return this.last.has(stream);
  }

  /**
   * The snapshot that opens every connection. Streams we had no position for start at the
   * snapshot's head (the server sends them live from there), and their state comes from REST.
   */
  onSnapshot(heads: Record<string, number>): SnapshotOutcome {
    const reload: string[] = [];
    this.snapshotHeads = new Map(Object.entries(heads));
    for (const [stream, head] of Object.entries(heads)) {
      if (!this.last.has(stream)) {
        this.last.set(stream, head);
        reload.push(stream);
      }
    }
    return { reload };
  }

  /** Judge an incoming envelope and, unless it is a duplicate, advance the position. */
  accept(stream: string, seq: number): Verdict {
    const last = this.last.get(stream);
    if (last !== undefined && seq <= last) return "duplicate";
    this.last.set(stream, seq);
    if (last !== undefined && seq > last + 1) return "gap";
    return "apply";
  }

  /**
   * Whether an (accepted) event is newer than the latest snapshot, i.e. not yet reflected in
   * the snapshot's counters. Replayed events up to the snapshot head must not be counted again.
   */
  isAfterSnapshot(stream: string, seq: number): boolean {
    const head = this.snapshotHeads.get(stream);
    return head === undefined || seq > head;
  }

  /** `resync {stream, seq}`: history was not replayable; the state is reloaded, go on from seq. */
  resync(stream: string, seq: number): void {
    this.last.set(stream, seq);
    this.snapshotHeads.set(stream, seq);
  }

  /** A membership announced on the personal stream: the chat stream is followed from `fromSeq`. */
  join(stream: string, fromSeq: number): void {
    if (!this.last.has(stream)) this.last.set(stream, fromSeq);
    if (!this.snapshotHeads.has(stream)) this.snapshotHeads.set(stream, fromSeq);
  }

  /** Left the stream (or the server refused it): stop asking for it. */
  forget(stream: string): void {
    this.last.delete(stream);
    this.snapshotHeads.delete(stream);
  }

  clear(): void {
    this.last.clear();
    this.snapshotHeads.clear();
  }
}

/** Whether a Socket.IO payload is a persisted-event envelope named `name`. */
export function isEnvelope(name: string, payload: unknown): payload is {
  stream: string;
  seq: number;
  type: string;
  data: Record<string, unknown>;
  ts: string;
} {
  if (typeof payload !== "object" || payload === null) return false;
  const p = payload as Record<string, unknown>;
  return (
    typeof p.stream === "string" &&
    typeof p.seq === "number" &&
    p.type === name &&
    typeof p.data === "object" &&
    p.data !== null
  );
}
