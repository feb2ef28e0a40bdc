// Clock-driven rules: idle detection, typing throttling and typing indicators. Time is passed
// in (milliseconds), so these are plain values to test. No Vue, no DOM.

export const IDLE_AFTER_MS = 5 * 60 * 1000;
export const HEARTBEAT_EVERY_MS = 60 * 1000;
export const TYPING_THROTTLE_MS = 3000;
export const TYPING_SHOWN_MS = 6000;

/** Idle = no input for five minutes. `update` reports when the active state changes. */
export class IdleTracker {
  private lastInput: number;
  private active = true;

  constructor(now: number, private readonly idleAfter = IDLE_AFTER_MS) {
    this.lastInput = now;
  }

  isActive(): boolean {
    return this.active;
  }

  /** User input: returns true when this made an idle user active again. */
  input(now: number): boolean {
    this.lastInput = now;
    if (this.active) return false;
    this.active = true;
    return true;
  }

  /** A periodic check: returns true when the user just became idle. */
  tick(now: number): boolean {
    if (this.active && now - this.lastInput >= this.idleAfter) {
      this.active = false;
      return true;
    }
    return false;
  }
}

/** At most one `im.typing` per chat per throttle window. */
export class TypingThrottle {
  private last = new Map<string, number>();

  constructor(private readonly every = TYPING_THROTTLE_MS) {}

  shouldSend(chatId: string, now: number): boolean {
    const previous = this.last.get(chatId);
    if (previous !== undefined && now - previous < this.every) return false;
    this.last.set(chatId, now);
    return true;
  }

  /** After sending a message, the next keystroke announces typing again. */
  reset(chatId: string): void {
    this.last.delete(chatId);
  }
}

/** Who is typing where: chat id -> user id -> until (ms). */
export type TypingMap = Record<string, Record<string, number>>;

export function typingStarted(map: TypingMap, chatId: string, userId: string, now: number, shown = TYPING_SHOWN_MS): TypingMap {
  return { ...map, [chatId]: { ...map[chatId], [userId]: now + shown } };
}

/** A message from the user ends their typing indicator. */
export function typingStopped(map: TypingMap, chatId: string, userId: string): TypingMap {
  const chat = map[chatId];
  if (!chat || !(userId in chat)) return map;
  const rest = { ...chat };
  delete rest[userId];
  return { ...map, [chatId]: rest };
}

export function typingUsers(map: TypingMap, chatId: string, now: number): string[] {
  return Object.entries(map[chatId] ?? {})
    .filter(([, until]) => until > now)
    .map(([user]) => user);
}

export function typingLabel(names: string[]): string {
  if (names.length === 0) return "";
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return `${names[0]} and ${names.length - 1} others are typing…`;
}

/** Reconnect back-off display: "reconnecting" vs "offline". */
export type Connection = "connecting" | "connected" | "reconnecting" | "offline";
