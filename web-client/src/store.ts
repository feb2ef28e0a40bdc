// Application state: REST loads, the live connection and the rules in core/ brought together.

import { computed, reactive } from "vue";
import { Api } from "./api";
import * as crm from "./core/crm";
import * as dialogs from "./core/dialogs";
import * as mail from "./core/mail";
import {
  idBefore,
  laterMark,
  mergeMessages,
  newClientId,
  newestConfirmed,
  oldestConfirmed,
  pendingMessage,
} from "./core/messages";
import * as outbox from "./core/outbox";
import * as presence from "./core/presence";
import { ApiError } from "./core/problem";
import {
  chatPath,
  crmRecordPath,
  crmSectionPath,
  isId,
  parseScreen,
  taskPath,
  userPath,
  type CrmSection,
  type Screen,
  type View,
} from "./core/routes";
import { isEnvelope, StreamTracker } from "./core/streams";
import * as tasks from "./core/tasks";
import {
  HEARTBEAT_EVERY_MS,
  IdleTracker,
  TypingThrottle,
  typingStarted,
  typingStopped,
  type Connection,
  type TypingMap,
} from "./core/timing";
import type {
  Chat,
  ChatJoinedData,
  CrmActivity,
  CrmActivityRemovedData,
  CrmConversionResult,
  CrmConvertBody,
  CrmDuplicateProbe,
  CrmDuplicates,
  CrmHistoryEntry,
  CrmMe,
  CrmRecord,
  CrmRecordDetail,
  CrmRecordRef,
  CrmRecordRemovedData,
  CrmRecordType,
  CrmSettings,
  SentEmail,
  ChatLeftData,
  ChatMembersData,
  Department,
  Dialog,
  ImCounters,
  ImSettings,
  MailAttachment,
  Message,
  Upload,
  PresenceStatus,
  PresenceView,
  Snapshot,
  Task,
  TaskComment,
  TaskHistoryEntry,
  TaskRemovedData,
  TaskUpdate,
  TaskUpdatedData,
  User,
  Workgroup,
} from "./core/types";
import * as unread from "./core/unread";
import { Realtime } from "./realtime";
import { beep, notifySystem } from "./notify";

const TOKEN_KEY = "portalhub.token";
const PAGE_SIZE = 50;
const TASK_PAGE = 500;

export type { View } from "./core/routes";

/**
 * The CRM's tabs: a record type's list, "my activities", and for administrators the settings,
 * the CRM inbox (mail options, rules, templates, IMAP mailboxes) and the unmatched mail.
 */
export type CrmTab = CrmSection;

/** The record form: a new record of `type` (with presets), or `edit`ing one. */
export interface CrmFormState {
  type: CrmRecordType;
  presets: Partial<crm.RecordForm>;
  edit?: CrmRecord;
}

function emptyCrmLists(): Record<CrmRecordType, CrmRecord[]> {
  return { deal: [], lead: [], contact: [], company: [] };
}

export interface Toast {
  id: number;
  title: string;
  text: string;
  chatId?: string;
  kind: "message" | "info" | "error";
}

export const api = new Api();
const tracker = new StreamTracker();
const idle = new IdleTracker(Date.now());
const typingThrottle = new TypingThrottle();

export const state = reactive({
  token: null as string | null,
  me: null as User | null,
  booting: true,
  bootMessage: "",
  sessionEndedReason: "",
  view: "messenger" as View,
  /** The screen the address shows (core/routes.ts); `view` and the open things follow it. */
  screen: parseScreen(location.pathname, Object.fromEntries(new URLSearchParams(location.search))) as Screen,
  /** The address of a thing the user may not see (or that does not exist): "not available". */
  unavailable: null as string | null,
  /** The employee whose profile page is open. */
  profileId: null as string | null,
  profileUser: null as User | null,
  connection: "offline" as Connection,
  everConnected: false,
  chats: [] as Chat[],
  dialogsLoaded: false,
  unread: unread.emptyUnread(),
  /** Private dialogs: how far the other person has read ("seen"), by chat. */
  peerRead: {} as Record<string, string>,
  presence: {} as presence.PresenceMap,
  own: null as PresenceView | null,
  settings: { sound: true, send_key: "enter" } as ImSettings,
  users: {} as Record<string, User>,
  departments: [] as Department[],
  openChatId: null as string | null,
  messages: {} as Record<string, Message[]>,
  loaded: {} as Record<string, boolean>,
  noOlder: {} as Record<string, boolean>,
  loadingOlder: {} as Record<string, boolean>,
  /** Chats showing a stretch of older history (a search result) rather than the newest. */
  detached: {} as Record<string, boolean>,
  loadingNewer: {} as Record<string, boolean>,
  /** The message a search result or link points at, shown highlighted in its chat. */
  highlight: null as { chatId: string; messageId: string } | null,
  typing: {} as TypingMap,
  /** Files being uploaded from this tab, by chat. */
  uploads: {} as Record<string, Upload[]>,
  now: Date.now(),
  toasts: [] as Toast[],
  composeOpen: false,
  pageVisible: true,
  pageFocused: true,
  // tasks
  tasks: {} as tasks.TaskMap,
  tasksLoaded: false,
  taskCounters: tasks.emptyTaskCounters(),
  workgroups: [] as Workgroup[],
  taskRole: "all" as tasks.RoleFilter,
  taskStatus: "all" as tasks.StatusFilter,
  /** Tasks whose subtasks are unfolded in the list. */
  taskExpanded: {} as Record<string, boolean>,
  openTaskId: null as string | null,
  taskComments: {} as Record<string, TaskComment[]>,
  taskHistory: {} as Record<string, TaskHistoryEntry[]>,
  /** The new-task form, open with these presets (e.g. the parent of a subtask); null: closed. */
  taskForm: null as Partial<tasks.TaskForm> | null,
  /** The edit form of the open task. */
  taskEdit: false,
  // crm
  crmCounters: crm.emptyCrmCounters(),
  crmMe: null as CrmMe | null,
  /** The caller has no CRM role: the hub refuses the CRM (403). */
  crmDenied: false,
  crmSettings: null as CrmSettings | null,
  crmTab: "deal" as CrmTab,
  crmLists: emptyCrmLists(),
  crmListLoaded: {} as Partial<Record<CrmRecordType, boolean>>,
  crmNextCursor: {} as Partial<Record<CrmRecordType, string | null>>,
  crmFilter: crm.emptyListFilter(),
  crmOpen: null as { type: CrmRecordType; id: string } | null,
  crmRecord: null as CrmRecordDetail | null,
  crmTimeline: [] as CrmActivity[],
  crmHistory: [] as CrmHistoryEntry[],
  crmMyActivities: [] as CrmActivity[],
  crmMyActivitiesLoaded: false,
  crmMyStatus: "open" as "open" | "all",
  crmForm: null as CrmFormState | null,
  /** The lead whose conversion dialog is open. */
  crmConvert: null as CrmRecord | null,
  /** Deals by stage, for the Kanban board. */
  crmBoard: {} as Record<string, CrmRecord[]>,
  crmBoardLoaded: false,
  crmBoardMore: {} as Record<string, string | null>,
  /** Titles of linked records (a deal's company and contacts...), for the list columns. */
  crmTitles: {} as Record<string, string>,
  /** The record whose merge dialog is open. */
  crmMerge: null as CrmRecordDetail | null,
  /** CRM administrators: how many mails wait on the unmatched list (live); null for others. */
  mailUnmatched: null as number | null,
});

export const totalUnread = computed(() => unread.total(state.unread));
/** The Tasks badge: see `tasksBadge` for what it counts. */
export const tasksBadgeCount = computed(() => tasks.tasksBadge(state.taskCounters));
/** The CRM item of the top bar: the four CRM counters together. */
export const crmNavBadge = computed(() => crm.crmNavBadge(state.crmCounters));
export const openTask = computed<Task | null>(() => (state.openTaskId ? (state.tasks[state.openTaskId] ?? null) : null));
export const openChat = computed(() => state.chats.find((c) => c.id === state.openChatId) ?? null);
export const ownStatus = computed<PresenceStatus>(() => {
  if (state.own && presence.isStatus(state.own.status)) return state.own.status;
  return state.me ? presence.statusOf(state.presence, state.me.id) : "offline";
});

export function userName(id: string | null | undefined): string {
  if (!id || id === "system") return "Portal";
  if (id === "email") return "E-mail"; // a lead the mail bridge made from a stranger's mail
  if (state.me && id === state.me.id) return state.me.name;
  return state.users[id]?.name ?? "Unknown user";
}

export function names(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const u of Object.values(state.users)) out[u.id] = u.name;
  return out;
}

// toasts ------------------------------------------------------------------------------------------

let toastSeq = 0;

export function toast(t: Omit<Toast, "id">, ms = 6000): void {
  const id = ++toastSeq;
  state.toasts = [...state.toasts.slice(-3), { ...t, id }];
  setTimeout(() => dismissToast(id), ms);
}

export function dismissToast(id: number): void {
  state.toasts = state.toasts.filter((t) => t.id !== id);
}

function reportError(error: unknown, what: string): void {
  const text = error instanceof Error ? error.message : String(error);
  toast({ kind: "error", title: what, text });
}

// addresses ---------------------------------------------------------------------------------------

type Navigate = (path: string, replace: boolean) => void;
let navigate: Navigate = (path, replace) => {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  applyScreen(parseScreen(location.pathname, Object.fromEntries(new URLSearchParams(location.search))));
};

/** The router (src/router.ts) moves between addresses; the store only asks it to. */
export function setNavigator(fn: Navigate): void {
  navigate = fn;
}

/** Go to an address: the router shows it (applyScreen), Back returns. */
export function goTo(path: string, replace = false): void {
  navigate(path, replace);
}

/** The address shows a thing the user may not see: the "not available" page. */
function markUnavailable(path: string): void {
  state.unavailable = path;
}

/**
 * Show the screen an address names: called by the router on every navigation (Back and
 * Forward included) and when a session starts. Idempotent: the same screen again only
 * reloads what is missing.
 */
export function applyScreen(screen: Screen): void {
  const before = state.screen;
  state.screen = screen;
  if (before !== screen) state.unavailable = null;
  const me = state.me;
  if (!me) return;
  switch (screen.view) {
    case "messenger":
      state.view = "messenger";
      if (screen.chatId) void showChat(screen.chatId, screen.messageId);
      else {
        state.openChatId = null;
        state.highlight = null;
      }
      break;
    case "employees":
      state.view = "employees";
      state.profileId = screen.userId;
      if (screen.userId) void loadProfile(screen.userId);
      break;
    case "tasks":
      state.view = "tasks";
      if (!state.tasksLoaded) void loadTasks();
      void loadWorkgroups();
      if (screen.taskId) void showTask(screen.taskId);
      else state.openTaskId = null;
      break;
    case "crm":
      state.view = "crm";
      if (!state.crmMe) void loadCrmBasics();
      state.crmTab = screen.section;
      state.crmForm = null;
      if (screen.recordId && crm.isRecordType(screen.section)) {
        void showCrmRecord(screen.section, screen.recordId);
      } else {
        state.crmOpen = null;
        state.crmRecord = null;
        state.crmTimeline = [];
        state.crmHistory = [];
        if (screen.board) void loadCrmBoard();
        else loadCrmTab(screen.section);
      }
      break;
    case "settings":
      state.view = "settings";
      break;
    case "notfound":
      state.view = "notfound";
      break;
  }
}

/** The board is on screen (the deals' Kanban). */
export function onBoard(): boolean {
  return state.screen.view === "crm" && state.screen.board;
}

// session -----------------------------------------------------------------------------------------

const realtime = new Realtime({
  auth: () => ({ token: state.token ?? "", since: tracker.since(), active: idle.isActive() }),
  onEvent: (name, payload) => handleEvent(name, payload),
  onConnected: () => {
    // "connected" once the snapshot is in
  },
  onDisconnected: (reason) => {
    if (!state.token) return;
    state.connection = navigator.onLine === false ? "offline" : reason === "io client disconnect" ? "offline" : "reconnecting";
  },
  onRefused: (code, message) => {
    if (code === "invalid_token") {
      endSession("Your session has expired. Please log in again.");
    } else {
      state.connection = "offline";
      toast({ kind: "error", title: "Connection refused", text: message });
    }
  },
  onRetrying: () => {
    if (state.token) state.connection = navigator.onLine === false ? "offline" : "reconnecting";
  },
});

api.onUnauthorized = () => endSession("Your session has expired. Please log in again.");

export async function boot(): Promise<void> {
  installPageListeners();
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) {
    state.booting = false;
    return;
  }
  api.token = token;
  state.token = token;
  for (;;) {
    try {
      await startSession(token, await api.me());
      break;
    } catch (error) {
      if (error instanceof ApiError && (error.status === 0 || error.status >= 500)) {
        // The hub is unreachable for now: keep the login and try again.
        state.bootMessage = "The hub cannot be reached right now. Retrying…";
        await new Promise((resolve) => setTimeout(resolve, 3000));
        continue;
      }
      if (!state.me) clearSession();
      break;
    }
  }
  state.bootMessage = "";
  state.booting = false;
}

export async function login(loginName: string, password: string): Promise<void> {
  const { token, user } = await api.login(loginName, password);
  localStorage.setItem(TOKEN_KEY, token);
  await startSession(token, user);
}

async function startSession(token: string, me: User): Promise<void> {
  api.token = token;
  state.token = token;
  state.me = me;
  state.sessionEndedReason = "";
  state.users = { ...state.users, [me.id]: me };
  state.connection = "connecting";
  loadOutbox();
  realtime.start();
  startTimers();
  void loadDirectory();
  applyScreen(state.screen);
}

export async function logout(): Promise<void> {
  const had = state.token;
  realtime.stop();
  if (had) {
    try {
      await api.logout();
    } catch {
      // the token is dropped locally anyway
    }
  }
  clearSession();
  goTo("/", true);
}

/** The hub ended the session (token revoked or expired): back to the login screen. */
function endSession(reason: string): void {
  realtime.stop();
  clearSession();
  state.sessionEndedReason = reason;
}

function clearSession(): void {
  localStorage.removeItem(TOKEN_KEY);
  stopTimers();
  tracker.clear();
  askedForGroups.clear();
  api.token = null;
  Object.assign(state, {
    token: null,
    me: null,
    connection: "offline",
    everConnected: false,
    chats: [],
    dialogsLoaded: false,
    unread: unread.emptyUnread(),
    peerRead: {},
    presence: {},
    own: null,
    openChatId: null,
    messages: {},
    loaded: {},
    noOlder: {},
    loadingOlder: {},
    detached: {},
    loadingNewer: {},
    highlight: null,
    unavailable: null,
    profileId: null,
    profileUser: null,
    typing: {},
    toasts: [],
    composeOpen: false,
    view: "messenger",
    tasks: {},
    tasksLoaded: false,
    taskCounters: tasks.emptyTaskCounters(),
    workgroups: [],
    taskRole: "all",
    taskStatus: "all",
    taskExpanded: {},
    openTaskId: null,
    taskComments: {},
    taskHistory: {},
    taskForm: null,
    taskEdit: false,
    crmCounters: crm.emptyCrmCounters(),
    crmMe: null,
    crmDenied: false,
    crmSettings: null,
    crmTab: "deal",
    crmLists: emptyCrmLists(),
    crmListLoaded: {},
    crmNextCursor: {},
    crmFilter: crm.emptyListFilter(),
    crmOpen: null,
    crmRecord: null,
    crmTimeline: [],
    crmHistory: [],
    crmMyActivities: [],
    crmMyActivitiesLoaded: false,
    crmMyStatus: "open",
    crmForm: null,
    crmConvert: null,
    crmBoard: {},
    crmBoardLoaded: false,
    crmBoardMore: {},
    crmTitles: {},
    crmMerge: null,
    mailUnmatched: null,
  });
  crmListRuns.clear();
  outboxEntries = [];
  outboxUser = null;
}

// page state --------------------------------------------------------------------------------------

let listenersInstalled = false;

function installPageListeners(): void {
  if (listenersInstalled) return;
  listenersInstalled = true;
  const refresh = () => {
    state.pageVisible = document.visibilityState === "visible";
    state.pageFocused = document.hasFocus();
    if (state.openChatId) void markRead(state.openChatId);
    if (state.openTaskId) void markTaskSeen(state.openTaskId);
  };
  document.addEventListener("visibilitychange", refresh);
  window.addEventListener("focus", refresh);
  window.addEventListener("blur", refresh);
  refresh();
  const onInput = () => {
    if (idle.input(Date.now())) void heartbeat();
  };
  for (const name of ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focus"]) {
    window.addEventListener(name, onInput, { passive: true });
  }
  window.addEventListener("offline", () => {
    if (!state.token) return;
    state.connection = "offline";
    realtime.hold();
  });
  window.addEventListener("online", () => {
    if (!state.token) return;
    state.connection = "reconnecting";
    realtime.start();
    void flushOutbox();
  });
  // Another tab logged out (or in as someone else): follow it.
  window.addEventListener("storage", (event) => {
    if (outboxUser && event.key === outbox.outboxKey(outboxUser)) {
      syncOutbox(outbox.parseOutbox(event.newValue));
      return;
    }
    if (event.key !== TOKEN_KEY) return;
    if (!event.newValue && state.token) endSession("You logged out in another tab.");
  });
}

let timers: ReturnType<typeof setInterval>[] = [];

function startTimers(): void {
  stopTimers();
  timers.push(setInterval(() => void heartbeat(), HEARTBEAT_EVERY_MS));
  timers.push(
    setInterval(() => {
      if (idle.tick(Date.now())) void heartbeat();
    }, 15_000),
  );
  timers.push(setInterval(() => (state.now = Date.now()), 1000));
}

function stopTimers(): void {
  for (const t of timers) clearInterval(t);
  timers = [];
}

async function heartbeat(): Promise<void> {
  await realtime.emit("presence.heartbeat", { active: idle.isActive() });
}

/** The open dialog is being read: open, shown, the page visible and focused. */
export function readingNow(chatId: string): boolean {
  return (
    state.openChatId === chatId && state.view === "messenger" && state.pageVisible && state.pageFocused
  );
}

// live events -------------------------------------------------------------------------------------

function handleEvent(name: string, payload: unknown): void {
  if (isEnvelope(name, payload)) {
    const verdict = tracker.accept(payload.stream, payload.seq);
    if (verdict === "duplicate") return;
    const after = tracker.isAfterSnapshot(payload.stream, payload.seq);
    applyEnvelope(name, payload.data, after);
    if (verdict === "gap") void reloadStream(payload.stream);
    return;
  }
  const data = (payload ?? {}) as Record<string, unknown>;
  switch (name) {
    case "snapshot":
      void onSnapshot(payload as Snapshot);
      break;
    case "resync": {
      const stream = String(data.stream);
      tracker.resync(stream, Number(data.seq));
      void reloadStream(stream);
      break;
    }
    case "subscribe_error":
      tracker.forget(String(data.stream));
      break;
    case "presence.changed": {
      const view = data as unknown as PresenceView;
      state.presence = presence.applyChange(state.presence, view);
      if (state.me && view.user_id === state.me.id && "manual" in data) state.own = view;
      break;
    }
    case "counters.changed": {
      // One key per module ({im}, {tasks}, {crm}, or several): each one replaces only its own
      // part; crm carries only the numbers that changed, merged field by field.
      const im = data.im as ImCounters | undefined;
      if (im) state.unread = unread.applyCounters(state.unread, im);
      state.taskCounters = tasks.applyTaskCounters(state.taskCounters, data);
      state.crmCounters = crm.applyCrmCounters(state.crmCounters, data);
      onCrmCountersPushed(data.crm);
      break;
    }
    case "im.typing": {
      const chatId = String(data.chat_id);
      const userId = String(data.user_id);
      if (state.me && userId !== state.me.id) state.typing = typingStarted(state.typing, chatId, userId, Date.now());
      break;
    }
    case "im.read": {
      const chatId = String(data.chat_id);
      if (state.me && data.user_id === state.me.id) {
        state.unread = unread.markedRead(state.unread, chatId, String(data.up_to), false);
      } else if (state.chats.find((c) => c.id === chatId)?.kind === "private") {
        // the other person read: "seen" moves (group chats show no one's read mark)
        const mark = laterMark(state.peerRead[chatId], String(data.up_to));
        if (mark) state.peerRead = { ...state.peerRead, [chatId]: mark };
      }
      break;
    }
    case "mail.unmatched":
      state.mailUnmatched = mail.unmatchedFromSnapshot({ unmatched: data.count });
      break;
    case "session.revoked":
      endSession("Your session was ended. Please log in again.");
      break;
    case "error":
      console.warn("hub:", data.code, data.message);
      break;
  }
}

async function onSnapshot(snapshot: Snapshot): Promise<void> {
  const first = !state.everConnected;
  const { reload } = tracker.onSnapshot(snapshot.streams ?? {});
  state.presence = presence.fromSnapshot(snapshot.presence, state.presence);
  if (snapshot.counters?.im) state.unread = unread.applyCounters(state.unread, snapshot.counters.im);
  state.taskCounters = tasks.applyTaskCounters(state.taskCounters, snapshot.counters);
  state.crmCounters = crm.applyCrmCounters(state.crmCounters, snapshot.counters);
  if (snapshot.settings?.im) state.settings = { ...snapshot.settings.im };
  state.mailUnmatched = mail.unmatchedFromSnapshot(snapshot.mail);
  state.connection = "connected";
  state.everConnected = true;
  const me = state.me;
  if (!me) return;
  if (first || reload.includes(`user:${me.id}`)) {
    void loadTasks();
    void loadWorkgroups();
    if (first) void loadCrmBasics();
    else void reloadCrm();
    await loadDialogs(!first);
    void loadOwnPresence();
  } else if (reload.length) {
    await loadDialogs(false);
    for (const stream of reload) if (stream.startsWith("chat:")) resetChat(stream.slice(5));
  }
  if (!first) void loadDirectory();
  if (state.openChatId) void markRead(state.openChatId);
  void flushOutbox();
}

function applyEnvelope(type: string, data: Record<string, unknown>, afterSnapshot: boolean): void {
  const me = state.me;
  if (!me) return;
  switch (type) {
    case "im.message":
      onNewMessage(data.message as Message, afterSnapshot);
      break;
    case "im.message.updated":
      putLive((data.message as Message).chat_id, data.message as Message);
      state.chats = dialogs.applyMessage(state.chats, data.message as Message);
      break;
    case "im.message.deleted": {
      const message = data.message as Message;
      putLive(message.chat_id, message);
      state.chats = dialogs.applyMessage(state.chats, message);
      state.unread = unread.onDeleted(state.unread, message, { me: me.id, readingNow: false, afterSnapshot });
      break;
    }
    case "im.chat.joined": {
      const joined = data as unknown as ChatJoinedData;
      tracker.join(joined.join_stream, joined.from_seq);
      state.chats = dialogs.upsertChat(state.chats, joined.chat);
      break;
    }
    case "im.chat.left": {
      const left = data as unknown as ChatLeftData;
      const title = state.chats.find((c) => c.id === left.chat_id)?.title;
      tracker.forget(left.leave_stream);
      state.chats = dialogs.removeChat(state.chats, left.chat_id);
      state.unread = unread.forgetChat(state.unread, left.chat_id);
      if (state.openChatId === left.chat_id) {
        state.openChatId = null;
        if (state.view === "messenger") {
          goTo("/messenger", true);
          if (!leaving.has(left.chat_id)) {
            toast({ kind: "info", title: "Chat closed", text: `You are no longer a member of “${title ?? "the chat"}”.` });
          }
        }
      }
      leaving.delete(left.chat_id);
      break;
    }
    case "im.chat.members": {
      const m = data as unknown as ChatMembersData;
      state.chats = dialogs.applyMembers(state.chats, m.chat_id, m.member_ids);
      // the owner may have changed (an owner who leaves hands the chat on)
      if (m.member_ids.includes(me.id)) void fetchChat(m.chat_id);
      break;
    }
    case "im.chat.updated": {
      const chatId = String(data.chat_id);
      if (typeof data.title === "string") state.chats = dialogs.renameChat(state.chats, chatId, data.title);
      break;
    }
    case "im.settings":
      state.settings = { ...(data.settings as ImSettings) };
      break;
    case "task.updated":
      onTaskUpdated(data as unknown as TaskUpdatedData);
      break;
    case "task.removed":
      onTaskRemoved(data as unknown as TaskRemovedData);
      break;
    case "crm.record.updated":
      onCrmRecordUpdated(data.record as CrmRecord);
      break;
    case "crm.record.removed":
      onCrmRecordRemoved(data as unknown as CrmRecordRemovedData);
      break;
    case "crm.activity.updated":
      onCrmActivityUpdated(data.activity as CrmActivity);
      break;
    case "crm.activity.removed":
      onCrmActivityRemoved(data as unknown as CrmActivityRemovedData);
      break;
    case "user.updated": {
      const user = data.user as User;
      state.users = { ...state.users, [user.id]: user };
      if (user.id === me.id) state.me = user;
      break;
    }
  }
}

function onNewMessage(message: Message, afterSnapshot: boolean): void {
  const me = state.me;
  if (!me) return;
  const chatId = message.chat_id;
  const reading = readingNow(chatId) && !state.detached[chatId];
  putLive(chatId, message);
  // One's own message stored (sent from here, whose answer may still be on its way or lost,
  // or from another tab): nothing is left to send.
  if (message.author_id === me.id && message.client_id && outboxEntries.some((e) => e.client_id === message.client_id)) {
    writeOutbox(outbox.withoutEntry(readOutbox(), message.client_id));
  }
  if (message.author_id) state.typing = typingStopped(state.typing, chatId, message.author_id);
  if (!state.chats.some((c) => c.id === chatId)) void fetchChat(chatId);
  state.chats = dialogs.applyMessage(state.chats, message);
  const ctx = { me: me.id, readingNow: reading, afterSnapshot };
  const counted = unread.countsAsUnread(state.unread, message, ctx);
  state.unread = unread.onMessage(state.unread, message, ctx);
  if (message.author_id === me.id) return;
  if (reading) {
    void markRead(chatId);
  } else if (counted) {
    notifyMessage(message);
  }
}

function notifyMessage(message: Message): void {
  const chat = state.chats.find((c) => c.id === message.chat_id);
  const author = userName(message.author_id);
  const title = chat && chat.kind === "group" ? `${author} in ${chat.title}` : author;
  const summary = dialogs.messageSummary(message);
  const text = summary.length > 140 ? `${summary.slice(0, 140)}…` : summary;
  const disturb = presence.mayDisturb(ownStatus.value);
  if (state.settings.sound && disturb) beep();
  const chatShown = state.openChatId === message.chat_id && state.view === "messenger" && state.pageVisible;
  if (!chatShown) toast({ kind: "message", title, text, chatId: message.chat_id });
  if (disturb && (!state.pageVisible || !state.pageFocused)) {
    notifySystem(title, text, () => {
      window.focus();
      openChatById(message.chat_id);
    });
  }
}

async function fetchChat(chatId: string): Promise<void> {
  try {
    const chat = await api.chat(chatId);
    state.chats = dialogs.upsertChat(state.chats, chat);
  } catch {
    // not ours (any more)
  }
}

async function reloadStream(stream: string): Promise<void> {
  const me = state.me;
  if (!me) return;
  if (stream === `user:${me.id}`) {
    try {
      const [fresh, settings] = await Promise.all([api.me(), api.settings()]);
      state.me = fresh;
      state.settings = settings;
    } catch (error) {
      reportError(error, "Reload failed");
    }
    await Promise.all([loadDialogs(true), loadTasks()]);
    if (state.openTaskId) void refreshOpenTask(state.openTaskId);
    void reloadCrm();
  } else if (stream.startsWith("chat:")) {
    await loadDialogs(false);
    resetChat(stream.slice(5));
  }
  try {
    const counters = await api.allCounters();
    state.unread = unread.applyCounters(state.unread, counters.im);
    state.taskCounters = tasks.applyTaskCounters(state.taskCounters, counters);
    state.crmCounters = crm.applyCrmCounters(state.crmCounters, counters);
  } catch {
    // the next counters.changed will do
  }
}

/** Forget what is cached of a chat's history; the open chat is loaded again. */
function resetChat(chatId: string): void {
  const messages = { ...state.messages };
  delete messages[chatId];
  state.messages = messages;
  state.loaded = { ...state.loaded, [chatId]: false };
  state.noOlder = { ...state.noOlder, [chatId]: false };
  state.detached = { ...state.detached, [chatId]: false };
  liveBuffer.delete(chatId);
  for (const e of outboxEntries) if (e.chat_id === chatId) putMessages(chatId, [pendingOf(e)]);
  if (state.openChatId === chatId) void loadLatest(chatId);
}

// loading -----------------------------------------------------------------------------------------

async function loadDialogs(replace: boolean): Promise<void> {
  try {
    const list: Dialog[] = await api.dialogs();
    // A full reload drops chats the answer does not have; live previews newer than it stay.
    const ids = new Set(list.map((d) => d.chat.id));
    let chats = replace ? state.chats.filter((c) => ids.has(c.id)) : [...state.chats];
    for (const d of list) chats = dialogs.upsertChat(chats, d.chat);
    state.chats = dialogs.sortChats(chats);
    let u = state.unread;
    for (const d of list) if (d.last_read_id) u = unread.markedRead(u, d.chat.id, d.last_read_id, false);
    state.unread = u;
    const peerRead = { ...state.peerRead };
    for (const d of list) {
      const mark = laterMark(peerRead[d.chat.id], d.peer_last_read_id);
      if (mark) peerRead[d.chat.id] = mark;
    }
    state.peerRead = peerRead;
    state.dialogsLoaded = true;
  } catch (error) {
    reportError(error, "Could not load dialogs");
  }
}

async function loadOwnPresence(): Promise<void> {
  const me = state.me;
  if (!me) return;
  try {
    const { presence: views } = await api.presence([me.id]);
    const mine = views.find((v) => v.user_id === me.id);
    if (mine) state.own = mine;
  } catch {
    // shown as online until told otherwise
  }
}

export async function loadDirectory(): Promise<void> {
  try {
    const departments = await api.departments();
    const users: User[] = [];
    for (let offset = 0; offset < 5000; offset += 500) {
      const page = await api.users(`limit=500&offset=${offset}`);
      users.push(...page);
      if (page.length < 500) break;
    }
    state.departments = departments;
    const map: Record<string, User> = {};
    for (const u of users) map[u.id] = u;
    if (state.me) map[state.me.id] = state.me;
    state.users = map;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) reportError(error, "Could not load the directory");
  }
}

function putMessages(chatId: string, incoming: Message[]): void {
  // Also for chats not loaded yet: live messages are kept, the history page merges in later.
  state.messages = { ...state.messages, [chatId]: mergeMessages(state.messages[chatId] ?? [], incoming) };
}

/** Live messages of a chat showing older history: kept here until the newest is shown. */
const liveBuffer = new Map<string, Message[]>();

/**
 * A live message (new, edited or deleted) into its chat; while the chat shows a stretch of
 * older history, one not on screen waits aside, so the stretch keeps no gap.
 */
function putLive(chatId: string, message: Message): void {
  if (state.detached[chatId] && !(state.messages[chatId] ?? []).some((m) => m.id === message.id)) {
    liveBuffer.set(chatId, mergeMessages(liveBuffer.get(chatId) ?? [], [message]));
    return;
  }
  putMessages(chatId, [message]);
}

/** The chat shows the newest messages again: what waited aside joins the list. */
function reattach(chatId: string): void {
  state.detached = { ...state.detached, [chatId]: false };
  const waiting = liveBuffer.get(chatId);
  liveBuffer.delete(chatId);
  if (waiting?.length) putMessages(chatId, waiting);
}

async function loadLatest(chatId: string): Promise<void> {
  try {
    const page = await api.history(chatId, { limit: PAGE_SIZE });
    putMessages(chatId, page);
    state.loaded = { ...state.loaded, [chatId]: true };
    if (page.length < PAGE_SIZE) state.noOlder = { ...state.noOlder, [chatId]: true };
    void markRead(chatId);
  } catch (error) {
    reportError(error, "Could not load messages");
  }
}

/** Page back in the log: the messages before the oldest one shown. */
export async function loadOlder(chatId: string): Promise<number> {
  if (state.loadingOlder[chatId] || state.noOlder[chatId]) return 0;
  const oldest = oldestConfirmed(state.messages[chatId] ?? []);
  if (!oldest) return 0;
  state.loadingOlder = { ...state.loadingOlder, [chatId]: true };
  try {
    const page = await api.history(chatId, { before: oldest.id, limit: PAGE_SIZE });
    putMessages(chatId, page);
    if (page.length < PAGE_SIZE) state.noOlder = { ...state.noOlder, [chatId]: true };
    return page.length;
  } catch (error) {
    reportError(error, "Could not load older messages");
    return 0;
  } finally {
    state.loadingOlder = { ...state.loadingOlder, [chatId]: false };
  }
}

// actions -----------------------------------------------------------------------------------------

/** The address of a top-level screen: its list (the CRM: the tab last shown). */
export function viewPath(view: View): string {
  switch (view) {
    case "messenger":
      return "/messenger";
    case "employees":
      return "/employees";
    case "tasks":
      return "/tasks";
    case "crm":
      return crmSectionPath(state.crmTab);
    case "settings":
      return "/settings";
    default:
      return "/";
  }
}

export function setView(view: View): void {
  goTo(viewPath(view));
}

export function openChatById(chatId: string): void {
  goTo(chatPath(chatId));
}

/** Open a chat at a message (a search result): its history around that message. */
export function openMessage(chatId: string, messageId: string): void {
  goTo(chatPath(chatId, messageId));
}

/** The chat of the address: fetched if not known, its history loaded; or "not available". */
async function showChat(chatId: string, messageId: string | null): Promise<void> {
  const path = chatPath(chatId, messageId);
  state.openChatId = chatId;
  state.toasts = state.toasts.filter((t) => t.chatId !== chatId);
  if (!isId(chatId) || (messageId !== null && !isId(messageId))) {
    markUnavailable(path);
    return;
  }
  if (!state.chats.some((c) => c.id === chatId)) await fetchChat(chatId);
  if (state.openChatId !== chatId) return;
  if (!state.chats.some((c) => c.id === chatId)) {
    markUnavailable(path);
    return;
  }
  if (messageId) {
    await jumpToMessage(chatId, messageId);
    return;
  }
  state.highlight = null;
  if (state.detached[chatId]) await showLatest(chatId);
  else if (!state.loaded[chatId]) await loadLatest(chatId);
  else void markRead(chatId);
}

const JUMP_PAGE = 25;

/**
 * The history around a message: the page before it, and it with the page after. When the
 * chat's loaded history already holds the message, it is only shown; otherwise the chat shows
 * that stretch (detached from the newest) until scrolled down or sent in.
 */
async function jumpToMessage(chatId: string, messageId: string): Promise<void> {
  const path = chatPath(chatId, messageId);
  const known = (state.messages[chatId] ?? []).some((m) => m.id === messageId);
  if (!known) {
    const below = idBefore(messageId);
    try {
      const [older, from] = await Promise.all([
        api.history(chatId, { before: messageId, limit: JUMP_PAGE }),
        below ? api.history(chatId, { after: below, limit: JUMP_PAGE + 1 }) : Promise.resolve([]),
      ]);
      if (state.openChatId !== chatId) return;
      if (from[0]?.id !== messageId) {
        markUnavailable(path);
        return;
      }
      const pending = (state.messages[chatId] ?? []).filter((m) => m.pending || m.failed);
      state.messages = { ...state.messages, [chatId]: mergeMessages(pending, [...older, ...from]) };
      state.loaded = { ...state.loaded, [chatId]: true };
      state.noOlder = { ...state.noOlder, [chatId]: older.length < JUMP_PAGE };
      if (from.length < JUMP_PAGE + 1) reattach(chatId);
      else state.detached = { ...state.detached, [chatId]: true };
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) markUnavailable(path);
      else reportError(error, "Could not load the message");
      return;
    }
  }
  state.highlight = { chatId, messageId };
  if (!state.detached[chatId]) void markRead(chatId);
}

/** Back to the newest messages of a chat showing older history. */
export async function showLatest(chatId: string): Promise<void> {
  const messages = { ...state.messages };
  messages[chatId] = (state.messages[chatId] ?? []).filter((m) => m.pending || m.failed);
  state.messages = messages;
  state.noOlder = { ...state.noOlder, [chatId]: false };
  state.highlight = null;
  reattach(chatId);
  await loadLatest(chatId);
}

/** Scrolled down in a stretch of older history: the next page towards the newest. */
export async function loadNewer(chatId: string): Promise<void> {
  if (!state.detached[chatId] || state.loadingNewer[chatId]) return;
  const newest = newestConfirmed(state.messages[chatId] ?? []);
  if (!newest) return;
  state.loadingNewer = { ...state.loadingNewer, [chatId]: true };
  try {
    const page = await api.history(chatId, { after: newest.id, limit: PAGE_SIZE });
    putMessages(chatId, page);
    if (page.length < PAGE_SIZE) {
      reattach(chatId);
      void markRead(chatId);
    }
  } catch (error) {
    reportError(error, "Could not load newer messages");
  } finally {
    state.loadingNewer = { ...state.loadingNewer, [chatId]: false };
  }
}

/** Message search across the user's chats (only those they are in: the hub decides). */
export function searchMessages(q: string): Promise<Message[]> {
  return api.search(q);
}

/** The private dialog with a user: found in the list, or opened (created) on the hub. */
export async function openDialogWith(userId: string): Promise<void> {
  const me = state.me;
  if (!me) return;
  const known = dialogs.privateChatWith(state.chats, me.id, userId);
  if (known) return openChatById(known.id);
  try {
    const chat = await api.openDialog(userId);
    state.chats = dialogs.upsertChat(state.chats, chat);
    openChatById(chat.id);
  } catch (error) {
    reportError(error, "Could not open the dialog");
  }
}

const reads: Record<string, { running: boolean; again: boolean }> = {};

/** Mark the open dialog read up to its newest message, if it is being read. */
export async function markRead(chatId: string): Promise<void> {
  if (!readingNow(chatId) || !state.loaded[chatId] || state.detached[chatId]) return;
  const entry = (reads[chatId] ??= { running: false, again: false });
  if (entry.running) {
    entry.again = true;
    return;
  }
  const newest = newestConfirmed(state.messages[chatId] ?? []);
  const target = unread.readTarget(state.unread.lastRead[chatId], newest, state.unread.chats[chatId] ?? 0);
  if (!target) return;
  entry.running = true;
  try {
    state.unread = unread.markedRead(state.unread, chatId, target, true);
    const counters = await api.read(chatId, target);
    state.unread = unread.applyCounters(state.unread, counters);
  } catch {
    // counters.changed or the next read will correct it
  } finally {
    entry.running = false;
    if (entry.again) {
      entry.again = false;
      void markRead(chatId);
    }
  }
}

/**
 * Send a message to a chat. It goes into the outbox first (kept across reloads) and shows at
 * the bottom as "sending" until the hub has stored it; while the hub cannot be reached it is
 * sent again, with the same client_id, whenever the connection is back.
 */
export async function sendMessage(chatId: string, text: string, clientId = newClientId()): Promise<void> {
  const me = state.me;
  if (!me || !text.trim()) return;
  if (state.detached[chatId]) void showLatest(chatId);
  const entry: outbox.OutboxEntry = { chat_id: chatId, text, client_id: clientId, created_at: new Date().toISOString() };
  writeOutbox(outbox.withEntry(readOutbox(), entry));
  putMessages(chatId, [pendingOf(entry)]);
  typingThrottle.reset(chatId);
  await flushOutbox();
}

/** Send again with the same client_id: the hub stores it at most once. */
export function retryMessage(message: Message): Promise<void> {
  return sendMessage(message.chat_id, message.text, message.client_id ?? undefined);
}

// the outbox ------------------------------------------------------------------------------------

let outboxUser: string | null = null;
let outboxEntries: outbox.OutboxEntry[] = [];
const inFlight = new Set<string>();
const flushRun = { running: false, again: false };
let retryTimer: ReturnType<typeof setTimeout> | null = null;
let retryAttempt = 0;

function pendingOf(entry: outbox.OutboxEntry): Message {
  const me = state.me?.id ?? "";
  return pendingMessage(entry.chat_id, me, entry.text, entry.client_id, new Date(entry.created_at));
}

function readOutbox(): outbox.OutboxEntry[] {
  if (!outboxUser) return [];
  try {
    outboxEntries = outbox.parseOutbox(localStorage.getItem(outbox.outboxKey(outboxUser)));
  } catch {
    // storage unavailable: the copy in memory is all there is
  }
  return outboxEntries;
}

function writeOutbox(entries: outbox.OutboxEntry[]): void {
  outboxEntries = entries;
  if (!outboxUser) return;
  try {
    if (entries.length) localStorage.setItem(outbox.outboxKey(outboxUser), outbox.serializeOutbox(entries));
    else localStorage.removeItem(outbox.outboxKey(outboxUser));
  } catch {
    // full or disabled storage: the message is still sent from memory
  }
}

/** After a (re)load: the messages not sent yet are shown again, at the bottom of their chats. */
function loadOutbox(): void {
  outboxUser = state.me?.id ?? null;
  syncOutbox(readOutbox());
}

/** Another tab changed the outbox: show what it holds as sending. */
function syncOutbox(entries: outbox.OutboxEntry[]): void {
  outboxEntries = entries;
  for (const e of entries) putMessages(e.chat_id, [pendingOf(e)]);
}

/**
 * Send what the outbox holds, oldest first, one at a time (the order is kept). A send the hub
 * could not take stays and is tried again (2 s, doubling to 30 s; at once when the browser is
 * online again or the live connection is back); a message the hub refuses for what it is
 * (not a member, too long) is shown as not sent, with a retry button.
 */
export async function flushOutbox(): Promise<void> {
  if (flushRun.running) {
    flushRun.again = true;
    return;
  }
  if (!state.me || navigator.onLine === false) return;
  flushRun.running = true;
  if (retryTimer) clearTimeout(retryTimer);
  retryTimer = null;
  try {
    for (const entry of readOutbox()) {
      if (inFlight.has(entry.client_id)) continue;
      inFlight.add(entry.client_id);
      try {
        const result = await api.send({ chat_id: entry.chat_id, text: entry.text, client_id: entry.client_id });
        writeOutbox(outbox.withoutEntry(readOutbox(), entry.client_id));
        for (const m of result.messages) {
          putLive(m.chat_id, m);
          state.chats = dialogs.applyMessage(state.chats, m);
        }
        retryAttempt = 0;
      } catch (error) {
        if (outbox.isRetryable(error)) {
          retryTimer = setTimeout(() => void flushOutbox(), outbox.retryDelay(retryAttempt++));
          return;
        }
        writeOutbox(outbox.withoutEntry(readOutbox(), entry.client_id));
        putMessages(entry.chat_id, [{ ...pendingOf(entry), pending: false, failed: true }]);
        reportError(error, "Message not sent");
      } finally {
        inFlight.delete(entry.client_id);
      }
    }
  } finally {
    flushRun.running = false;
    if (flushRun.again) {
      flushRun.again = false;
      void flushOutbox();
    }
  }
}

export async function editMessage(message: Message, text: string): Promise<void> {
  try {
    const updated = await api.edit(message.id, text);
    putMessages(message.chat_id, [updated]);
    state.chats = dialogs.applyMessage(state.chats, updated);
  } catch (error) {
    reportError(error, "Could not edit the message");
  }
}

export async function deleteMessage(message: Message): Promise<void> {
  try {
    await api.remove(message.id);
    putMessages(message.chat_id, [{ ...message, deleted: true, text: "", edited_at: new Date().toISOString() }]);
  } catch (error) {
    reportError(error, "Could not delete the message");
  }
}

// files ------------------------------------------------------------------------------------------

let uploadCount = 0;

function setUploads(chatId: string, change: (uploads: Upload[]) => Upload[]): void {
  state.uploads = { ...state.uploads, [chatId]: change(state.uploads[chatId] ?? []) };
}

/**
 * Send files into a chat, one message each: upload (with progress shown under the
 * conversation), then the message naming the file. Not kept in the outbox: a file is not
 * stored in the browser, so an upload cut off by going offline is reported and can be redone.
 */
export async function sendFiles(chatId: string, files: File[]): Promise<void> {
  if (state.detached[chatId]) void showLatest(chatId);
  await Promise.all(
    files.map(async (file) => {
      const key = `u${++uploadCount}`;
      setUploads(chatId, (u) => [...u, { key, name: file.name, size: file.size, progress: 0 }]);
      try {
        const stored = await api.uploadFile(file, (progress) =>
          setUploads(chatId, (u) => u.map((x) => (x.key === key ? { ...x, progress } : x))),
        );
        const result = await api.send({ chat_id: chatId, text: "", client_id: newClientId(), file_ids: [stored.id] });
        for (const m of result.messages) {
          putLive(m.chat_id, m);
          state.chats = dialogs.applyMessage(state.chats, m);
        }
      } catch (error) {
        reportError(error, `${file.name} not sent`);
      } finally {
        setUploads(chatId, (u) => u.filter((x) => x.key !== key));
      }
    }),
  );
}

const fileUrls = new Map<string, Promise<string>>();

/** An object URL of a chat file's bytes (fetched with the token once, then kept). */
export function fileUrl(fileId: string): Promise<string> {
  let found = fileUrls.get(fileId);
  if (!found) {
    found = api.file(fileId).then((blob) => URL.createObjectURL(blob));
    found.catch(() => fileUrls.delete(fileId));
    fileUrls.set(fileId, found);
  }
  return found;
}

/** One message to several people (`to`) or a whole department (`to_department`). */
export async function sendToMany(
  target: { to: string[] } | { to_department: string },
  text: string,
): Promise<number> {
  const result = await api.send({ ...target, text, client_id: newClientId() });
  // New dialogs arrive as im.chat.joined events; known ones get the message now.
  for (const m of result.messages) {
    putMessages(m.chat_id, [m]);
    state.chats = dialogs.applyMessage(state.chats, m);
  }
  return result.messages.length;
}

// group chats ------------------------------------------------------------------------------------

/** Chats the user is leaving by their own hand: no "you are no longer a member" notice. */
const leaving = new Set<string>();

/** A new group chat with the given people; it opens at once. */
export async function createGroupChat(title: string, memberIds: string[]): Promise<Chat> {
  const chat = await api.createChat(title, memberIds);
  state.chats = dialogs.upsertChat(state.chats, chat);
  openChatById(chat.id);
  return chat;
}

export async function renameGroupChat(chatId: string, title: string): Promise<void> {
  const chat = await api.renameChat(chatId, title);
  state.chats = dialogs.upsertChat(state.chats, chat);
}

export async function addChatMembers(chatId: string, userIds: string[]): Promise<void> {
  const chat = await api.addChatMembers(chatId, userIds);
  state.chats = dialogs.upsertChat(state.chats, chat);
}

export async function removeChatMember(chatId: string, userId: string): Promise<void> {
  await api.removeChatMember(chatId, userId);
  const chat = state.chats.find((c) => c.id === chatId);
  if (chat) state.chats = dialogs.applyMembers(state.chats, chatId, chat.member_ids.filter((m) => m !== userId));
}

/** Leave a group chat: it goes from the list; the messenger shows no chat. */
export async function leaveChat(chatId: string): Promise<void> {
  const me = state.me;
  if (!me) return;
  leaving.add(chatId);
  try {
    await api.removeChatMember(chatId, me.id);
  } catch (error) {
    leaving.delete(chatId);
    throw error;
  }
  state.chats = dialogs.removeChat(state.chats, chatId);
  state.unread = unread.forgetChat(state.unread, chatId);
  if (state.openChatId === chatId) goTo("/messenger", true);
}

// employees ----------------------------------------------------------------------------------------

/** An employee's profile: known from the directory, or asked for; "not available" if hidden. */
async function loadProfile(userId: string): Promise<void> {
  state.profileUser = state.users[userId] ?? null;
  if (!isId(userId)) {
    markUnavailable(userPath(userId));
    return;
  }
  try {
    const user = await api.user(userId);
    if (state.profileId !== userId) return;
    state.profileUser = user;
    state.users = { ...state.users, [user.id]: user };
  } catch (error) {
    if (state.profileId !== userId) return;
    if (error instanceof ApiError && error.status === 404) {
      state.profileUser = null;
      markUnavailable(userPath(userId));
    } else reportError(error, "Could not load the profile");
  }
}

export function openProfile(userId: string): void {
  goTo(userPath(userId));
}

/** "Assign a task" from a profile: the task form, with them responsible. */
export function assignTaskTo(userId: string): void {
  goTo("/tasks");
  openTaskForm({ responsibleIds: [userId] });
}

export function typing(chatId: string): void {
  if (typingThrottle.shouldSend(chatId, Date.now())) void realtime.emit("im.typing", { chat_id: chatId });
}

/** Enter sends (Shift+Enter: a new line), or Ctrl+Enter sends (Enter: a new line). */
export async function setSendKey(sendKey: ImSettings["send_key"]): Promise<void> {
  const previous = state.settings;
  state.settings = { ...state.settings, send_key: sendKey };
  try {
    state.settings = await api.putSettings({ ...previous, send_key: sendKey });
  } catch (error) {
    state.settings = previous;
    reportError(error, "Could not change the setting");
  }
}

export async function setSound(sound: boolean): Promise<void> {
  const previous = state.settings.sound;
  state.settings = { ...state.settings, sound };
  try {
    state.settings = await api.putSettings({ ...state.settings, sound });
    if (sound) beep();
  } catch (error) {
    state.settings = { ...state.settings, sound: previous };
    reportError(error, "Could not change the sound setting");
  }
}

export async function setOwnPresence(choice: presence.OwnChoice): Promise<void> {
  try {
    state.own = await api.setPresence(choice === "auto" ? null : choice);
    if (state.me) state.presence = presence.applyChange(state.presence, state.own);
  } catch (error) {
    reportError(error, "Could not change your status");
  }
}

export async function reconnectNow(): Promise<void> {
  if (!state.token) return;
  realtime.start();
}

// tasks -------------------------------------------------------------------------------------------

/** Live changes seen while a full task reload is on its way (one map per reload running). */
const taskLoads = new Set<Map<string, tasks.Touch>>();

/** A task from the hub (event or REST answer) into the list; a newer copy known stays. */
function putTask(task: Task): void {
  state.tasks = tasks.upsertTask(state.tasks, task);
  const kept = state.tasks[task.id];
  if (kept) for (const touched of taskLoads) touched.set(task.id, { kind: "updated", task: kept });
  const group = task.group_id;
  if (group && !askedForGroups.has(group) && !state.workgroups.some((g) => g.id === group)) {
    askedForGroups.add(group); // once: a group I may not see stays "Other workgroup"
    void loadWorkgroups();
  }
}

const askedForGroups = new Set<string>();

function dropTask(taskId: string): void {
  state.tasks = tasks.removeTask(state.tasks, taskId);
  for (const touched of taskLoads) touched.set(taskId, { kind: "removed" });
}

/** Every task the user may see (the filters apply to this list, as the hub's would). */
export async function loadTasks(): Promise<void> {
  const touched = new Map<string, tasks.Touch>();
  taskLoads.add(touched);
  try {
    const all: Task[] = [];
    for (let offset = 0; offset < 10_000; offset += TASK_PAGE) {
      const page = (await api.tasks({ role: "all", limit: TASK_PAGE, offset })).tasks;
      all.push(...page);
      if (page.length < TASK_PAGE) break;
    }
    state.tasks = tasks.replaceTasks(all, touched);
    state.tasksLoaded = true;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) reportError(error, "Could not load tasks");
  } finally {
    taskLoads.delete(touched);
  }
}

const workgroupsCall = { running: false, again: false };

export async function loadWorkgroups(): Promise<void> {
  if (workgroupsCall.running) {
    workgroupsCall.again = true;
    return;
  }
  workgroupsCall.running = true;
  try {
    state.workgroups = await api.workgroups();
  } catch {
    // the list shows "Other workgroup" until the next load
  } finally {
    workgroupsCall.running = false;
    if (workgroupsCall.again) {
      workgroupsCall.again = false;
      void loadWorkgroups();
    }
  }
}

function onTaskUpdated(data: TaskUpdatedData): void {
  const task = data.task;
  putTask(task);
  if (data.comment) {
    const known = state.taskComments[task.id];
    if (known) state.taskComments = { ...state.taskComments, [task.id]: tasks.mergeComments(known, [data.comment]) };
  }
  if (state.openTaskId === task.id) {
    void loadTaskHistory(task.id);
    if (data.comment && !state.taskComments[task.id]) void loadTaskComments(task.id);
    void markTaskSeen(task.id);
  }
}

function onTaskRemoved(data: TaskRemovedData): void {
  const wasOpen = state.openTaskId === data.task_id;
  const title = state.tasks[data.task_id]?.title;
  dropTask(data.task_id);
  if (wasOpen) {
    state.openTaskId = null;
    if (state.view === "tasks") goTo("/tasks", true);
    const by = data.by && data.by !== state.me?.id ? ` by ${userName(data.by)}` : "";
    toast({
      kind: "info",
      title: "Task closed",
      text: `“${title ?? "The task"}” was deleted${by}, or is no longer visible to you.`,
    });
  }
}

/** The open task page is being read: shown, the page visible and focused. */
function readingTask(taskId: string): boolean {
  return state.openTaskId === taskId && state.view === "tasks" && state.pageVisible && state.pageFocused;
}

const seenCalls: Record<string, { running: boolean; again: boolean }> = {};

/**
 * Changes by others to the task on screen are read as they come: reading the task again
 * marks it seen on the hub (and its counters follow with counters.changed).
 */
async function markTaskSeen(taskId: string): Promise<void> {
  const task = state.tasks[taskId];
  if (!task || !readingTask(taskId) || (task.unseen_updates === 0 && task.unseen_comments === 0)) return;
  const entry = (seenCalls[taskId] ??= { running: false, again: false });
  if (entry.running) {
    entry.again = true;
    return;
  }
  entry.running = true;
  try {
    putTask(await api.task(taskId));
  } catch {
    // the next change or opening will do
  } finally {
    entry.running = false;
    if (entry.again) {
      entry.again = false;
      void markTaskSeen(taskId);
    }
  }
}

const historyCalls: Record<string, { running: boolean; again: boolean }> = {};

async function loadTaskHistory(taskId: string): Promise<void> {
  const entry = (historyCalls[taskId] ??= { running: false, again: false });
  if (entry.running) {
    entry.again = true;
    return;
  }
  entry.running = true;
  try {
    const { history } = await api.taskHistory(taskId);
    state.taskHistory = { ...state.taskHistory, [taskId]: history };
  } catch {
    // shown as it was
  } finally {
    entry.running = false;
    if (entry.again) {
      entry.again = false;
      void loadTaskHistory(taskId);
    }
  }
}

async function loadTaskComments(taskId: string): Promise<void> {
  try {
    const { comments } = await api.taskComments(taskId);
    state.taskComments = {
      ...state.taskComments,
      [taskId]: tasks.mergeComments(state.taskComments[taskId] ?? [], comments),
    };
  } catch {
    // shown as they were
  }
}

/** The task itself (marking it seen), its comments and its history, from the hub. */
async function refreshOpenTask(taskId: string): Promise<void> {
  try {
    putTask(await api.task(taskId));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      dropTask(taskId);
      if (state.openTaskId === taskId) markUnavailable(taskPath(taskId));
      return;
    }
    reportError(error, "Could not load the task");
    return;
  }
  await Promise.all([loadTaskComments(taskId), loadTaskHistory(taskId)]);
}

export function openTaskById(taskId: string): void {
  goTo(taskPath(taskId));
}

/** The task of the address; "not available" when the hub does not know it for the user. */
async function showTask(taskId: string): Promise<void> {
  state.openTaskId = taskId;
  state.taskForm = null;
  state.taskEdit = false;
  if (!isId(taskId)) {
    markUnavailable(taskPath(taskId));
    return;
  }
  await refreshOpenTask(taskId);
}

export function closeTask(): void {
  goTo("/tasks");
}

export function setTaskFilter(role: tasks.RoleFilter, status: tasks.StatusFilter): void {
  state.taskRole = role;
  state.taskStatus = status;
  if (state.openTaskId) goTo("/tasks");
}

export function toggleTaskExpanded(taskId: string): void {
  const next = { ...state.taskExpanded };
  if (next[taskId]) delete next[taskId];
  else next[taskId] = true;
  state.taskExpanded = next;
}

export function openTaskForm(presets: Partial<tasks.TaskForm> = {}): void {
  state.taskForm = presets;
  void loadWorkgroups();
}

/** Create the task(s) of the form: the answer (master first) goes into the list at once. */
export async function createTask(form: tasks.TaskForm): Promise<Task[]> {
  const created = (await api.createTask(tasks.taskCreateBody(form))).tasks;
  for (const t of created) putTask(t);
  if (form.parentId) state.taskExpanded = { ...state.taskExpanded, [form.parentId]: true };
  return created;
}

/** An action of the task page (one of the task's `allowed_actions`). */
export async function runTaskAction(taskId: string, action: string): Promise<void> {
  try {
    const answer = await api.taskAction(taskId, action);
    if (action === "delete") {
      dropTask(taskId);
      if (state.openTaskId === taskId) goTo("/tasks", true);
      return;
    }
    if (!answer) return;
    putTask(answer);
    if (action === "copy") openTaskById(answer.id);
  } catch (error) {
    reportError(error, "Could not do that");
    if (error instanceof ApiError && error.status === 409) void refreshOpenTask(taskId);
  }
}

export async function commentTask(taskId: string, text: string): Promise<boolean> {
  if (!text.trim()) return false;
  try {
    const comment = await api.commentTask(taskId, text);
    state.taskComments = {
      ...state.taskComments,
      [taskId]: tasks.mergeComments(state.taskComments[taskId] ?? [], [comment]),
    };
    return true;
  } catch (error) {
    reportError(error, "Comment not posted");
    return false;
  }
}

/** Change fields of a task (only those the caller may: `editable_fields`). */
export async function updateTask(taskId: string, patch: TaskUpdate): Promise<Task | null> {
  if (Object.keys(patch).length === 0) return null;
  const updated = await api.updateTask(taskId, patch);
  putTask(updated);
  void loadTaskHistory(taskId);
  return updated;
}

export async function rateTask(taskId: string, rating: "positive" | "negative" | null): Promise<void> {
  try {
    putTask(await api.updateTask(taskId, { rating }));
  } catch (error) {
    reportError(error, "Could not rate the task");
  }
}

export function workgroupName(groupId: string | null | undefined): string {
  if (!groupId) return tasks.NO_WORKGROUP;
  return state.workgroups.find((g) => g.id === groupId)?.name ?? "Other workgroup";
}

// crm ---------------------------------------------------------------------------------------------

/** The caller's CRM role and the portal's CRM settings (deal stages, due window). */
export async function loadCrmBasics(): Promise<void> {
  try {
    const [me, settings] = await Promise.all([api.crmMe(), api.crmSettings()]);
    state.crmMe = me;
    state.crmSettings = settings;
    state.crmDenied = me.role === "none";
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) state.crmDenied = true;
    // otherwise the CRM view asks again when opened
  }
}

/** After a reconnect that missed events: everything of the CRM on screen, loaded again. */
async function reloadCrm(): Promise<void> {
  await loadCrmBasics();
  for (const type of crm.RECORD_TYPES) if (state.crmListLoaded[type]) void loadCrmList(type);
  if (state.crmMyActivitiesLoaded) void loadMyActivities();
  if (state.crmBoardLoaded) void loadCrmBoard();
  if (state.crmOpen) void refreshCrmRecord(state.crmOpen.type, state.crmOpen.id);
}

/** Live events seen while a list load is on its way (one buffer per type's load running). */
type CrmTouch = { kind: "updated"; record: CrmRecord } | { kind: "removed"; id: string };
const crmListRuns = new Map<CrmRecordType, { seq: number; touched: CrmTouch[] }>();
let crmListSeq = 0;

/** The first page of a record type's list, with the filters; events during the load are kept. */
export async function loadCrmList(type: CrmRecordType): Promise<void> {
  const run = { seq: ++crmListSeq, touched: [] as CrmTouch[] };
  crmListRuns.set(type, run);
  const filter = state.crmFilter;
  try {
    const page = await api.crmRecords(type, {
      q: filter.q.trim() || undefined,
      activity_responsible_id: filter.activityResponsibleId ?? undefined,
      counted: filter.counted || undefined,
      limit: 50,
    });
    if (crmListRuns.get(type) !== run) return; // a newer load (other filters) won
    rememberTitles(page);
    let list = crm.sortRecords(page.records);
    for (const touch of run.touched) {
      list =
        touch.kind === "removed"
          ? crm.removeRecord(list, touch.id)
          : crm.applyRecordEvent(list, touch.record, state.crmFilter).list;
    }
    state.crmLists = { ...state.crmLists, [type]: list };
    state.crmNextCursor = { ...state.crmNextCursor, [type]: page.next_cursor };
    state.crmListLoaded = { ...state.crmListLoaded, [type]: true };
    state.crmDenied = false;
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) state.crmDenied = true;
    else if (!(error instanceof ApiError && error.status === 401)) reportError(error, "Could not load the CRM list");
  } finally {
    if (crmListRuns.get(type) === run) crmListRuns.delete(type);
  }
}

/** The next page of a list (older records). */
export async function loadMoreCrm(type: CrmRecordType): Promise<void> {
  const cursor = state.crmNextCursor[type];
  if (!cursor) return;
  const filter = state.crmFilter;
  try {
    const page = await api.crmRecords(type, {
      q: filter.q.trim() || undefined,
      activity_responsible_id: filter.activityResponsibleId ?? undefined,
      counted: filter.counted || undefined,
      limit: 50,
      cursor,
    });
    rememberTitles(page);
    let list = state.crmLists[type];
    for (const r of page.records) list = crm.upsertRecord(list, r);
    state.crmLists = { ...state.crmLists, [type]: list };
    state.crmNextCursor = { ...state.crmNextCursor, [type]: page.next_cursor };
  } catch (error) {
    reportError(error, "Could not load more");
  }
}

const listReloads: Partial<Record<CrmRecordType, ReturnType<typeof setTimeout>>> = {};

function scheduleListReload(type: CrmRecordType): void {
  if (listReloads[type]) return;
  listReloads[type] = setTimeout(() => {
    delete listReloads[type];
    if (state.crmListLoaded[type]) void loadCrmList(type);
  }, 300);
}

/**
 * The first page of a list read again and merged in (not replaced: pages loaded with "Show
 * more" stay). Indicators change with time too - a planned activity turning due at midnight -
 * and the hub then pushes only the counters, not the records.
 */
async function refreshCrmListInPlace(type: CrmRecordType): Promise<void> {
  if (crmListRuns.has(type) || !state.crmListLoaded[type]) return;
  const filter = state.crmFilter;
  try {
    const page = await api.crmRecords(type, {
      q: filter.q.trim() || undefined,
      activity_responsible_id: filter.activityResponsibleId ?? undefined,
      counted: filter.counted || undefined,
      limit: 50,
    });
    if (crmListRuns.has(type) || filter !== state.crmFilter || !state.crmListLoaded[type]) return;
    rememberTitles(page);
    let list = state.crmLists[type];
    for (const r of page.records) list = crm.upsertRecord(list, r);
    state.crmLists = { ...state.crmLists, [type]: list };
  } catch {
    // the next event or load will do
  }
}

const indicatorRefreshes: Partial<Record<CrmRecordType, ReturnType<typeof setTimeout>>> = {};

/** CRM counters changed: the indicators on screen of that type may have too. */
function onCrmCountersPushed(part: unknown): void {
  if (typeof part !== "object" || part === null) return;
  for (const type of Object.keys(part)) {
    if (!crm.isRecordType(type) || indicatorRefreshes[type]) continue;
    indicatorRefreshes[type] = setTimeout(() => {
      delete indicatorRefreshes[type];
      if (state.view !== "crm") return;
      if (state.crmOpen?.type === type) scheduleOpenRefresh();
      else if (state.crmTab === type) void refreshCrmListInPlace(type);
    }, 1000);
  }
}

/** Titles of linked records, for the company and contact columns. */
function rememberTitles(page: { linked?: Record<string, { title: string }> }): void {
  const linked = page.linked ?? {};
  if (!Object.keys(linked).length) return;
  const titles = { ...state.crmTitles };
  for (const [id, ref] of Object.entries(linked)) titles[id] = ref.title;
  state.crmTitles = titles;
}

/** A record from the hub (event or REST answer) into its list and onto the open page. */
function putCrmRecord(given: CrmRecord): void {
  const record = crm.plainRecord(given);
  if (state.crmTitles[record.id] !== record.title && (record.type === "company" || record.type === "contact")) {
    state.crmTitles = { ...state.crmTitles, [record.id]: record.title };
  }
  if (record.type === "deal" && state.crmBoardLoaded) {
    const board = crm.applyBoardEvent(state.crmBoard, record, state.crmFilter);
    if (board !== state.crmBoard) state.crmBoard = board;
  }
  const run = crmListRuns.get(record.type);
  if (run) run.touched.push({ kind: "updated", record });
  if (state.crmListLoaded[record.type]) {
    const { list, needsReload } = crm.applyRecordEvent(state.crmLists[record.type], record, state.crmFilter);
    if (list !== state.crmLists[record.type]) state.crmLists = { ...state.crmLists, [record.type]: list };
    if (needsReload) scheduleListReload(record.type);
  }
  if (state.crmRecord && state.crmRecord.id === record.id) state.crmRecord = crm.mergeDetail(state.crmRecord, record);
}

function dropCrmRecord(type: CrmRecordType, id: string): void {
  if (type === "deal" && state.crmBoardLoaded) state.crmBoard = crm.removeFromBoard(state.crmBoard, id);
  const run = crmListRuns.get(type);
  if (run) run.touched.push({ kind: "removed", id });
  const list = crm.removeRecord(state.crmLists[type], id);
  if (list !== state.crmLists[type]) state.crmLists = { ...state.crmLists, [type]: list };
}

function onCrmRecordUpdated(record: CrmRecord): void {
  if (!record || !crm.isRecordType(record.type)) return;
  putCrmRecord(record);
  const open = state.crmRecord;
  if (open && (open.id === record.id || linksTo(open, record.id))) scheduleOpenRefresh();
}

function linksTo(detail: CrmRecordDetail, id: string): boolean {
  return Object.values(detail.links).some((refs) => refs?.some((r) => r.id === id));
}

function onCrmRecordRemoved(data: CrmRecordRemovedData): void {
  if (!crm.isRecordType(data.type)) return;
  dropCrmRecord(data.type, data.id);
  if (state.crmOpen?.id === data.id) {
    const title = state.crmRecord?.title;
    state.crmOpen = null;
    state.crmRecord = null;
    if (data.merged_into) {
      if (state.view === "crm") goTo(crmRecordPath(data.type, data.merged_into), true);
      toast({
        kind: "info",
        title: `${crm.TYPE_LABELS[data.type]} merged`,
        text: `“${title ?? "The record"}” was merged into another record, shown now.`,
      });
      return;
    }
    if (state.view === "crm") goTo(crmSectionPath(data.type), true);
    toast({
      kind: "info",
      title: `${crm.TYPE_LABELS[data.type]} closed`,
      text: `“${title ?? "The record"}” was deleted, or is no longer visible to you.`,
    });
  } else if (state.crmRecord && linksTo(state.crmRecord, data.id)) {
    scheduleOpenRefresh();
  }
}

function acceptsMine(activity: CrmActivity): boolean {
  if (!state.me || activity.responsible_id !== state.me.id) return false;
  return state.crmMyStatus === "all" || !activity.completed;
}

function onCrmActivityUpdated(activity: CrmActivity): void {
  if (!activity) return;
  if (state.crmOpen && activity.owner_id === state.crmOpen.id) {
    state.crmTimeline = crm.upsertActivity(state.crmTimeline, activity);
    scheduleOpenRefresh();
    watchPendingMail();
  }
  if (state.crmMyActivitiesLoaded) {
    state.crmMyActivities = crm.applyActivityEvent(state.crmMyActivities, activity, acceptsMine);
  }
}

function onCrmActivityRemoved(data: CrmActivityRemovedData): void {
  state.crmTimeline = crm.removeActivity(state.crmTimeline, data.id);
  state.crmMyActivities = crm.removeActivity(state.crmMyActivities, data.id);
  if (state.crmOpen && data.owner_id === state.crmOpen.id) scheduleOpenRefresh();
}

let openRefreshTimer: ReturnType<typeof setTimeout> | null = null;

/** The open record's links and history follow its changes (several events, one reload). */
function scheduleOpenRefresh(): void {
  if (openRefreshTimer) return;
  openRefreshTimer = setTimeout(() => {
    openRefreshTimer = null;
    const open = state.crmOpen;
    if (open) void refreshCrmRecord(open.type, open.id, false);
  }, 250);
}

/** Show a tab of the CRM (the list of a record type, my activities, the settings). */
export function setCrmTab(tab: CrmTab): void {
  goTo(crmSectionPath(tab));
}

function loadCrmTab(tab: CrmTab): void {
  if (crm.isRecordType(tab)) {
    if (state.crmListLoaded[tab]) void refreshCrmListInPlace(tab);
    else if (!crmListRuns.has(tab)) void loadCrmList(tab);
  } else if (tab === "activities") {
    void loadMyActivities();
  } else if (tab === "settings") {
    void loadCrmBasics();
  }
}

/** New filters: every list is loaded again (the one shown now, the others when shown). */
export function setCrmFilter(filter: Partial<crm.CrmListFilter>): void {
  state.crmFilter = { ...state.crmFilter, ...filter };
  state.crmListLoaded = {};
  state.crmBoardLoaded = false;
  if (onBoard()) void loadCrmBoard();
  else if (crm.isRecordType(state.crmTab)) void loadCrmList(state.crmTab);
}

// the deals' Kanban board ---------------------------------------------------------------------

const BOARD_PAGE = 50;
let boardSeq = 0;

/** The board: the first deals of each stage, with the list's filters. */
export async function loadCrmBoard(): Promise<void> {
  const seq = ++boardSeq;
  if (!state.crmSettings) await loadCrmBasics();
  const stages = state.crmSettings?.deal_stages ?? [];
  const filter = state.crmFilter;
  try {
    const pages = await Promise.all(
      stages.map((stage) =>
        api.crmRecords("deal", {
          status: stage.id,
          q: filter.q.trim() || undefined,
          activity_responsible_id: filter.activityResponsibleId ?? undefined,
          counted: filter.counted || undefined,
          limit: BOARD_PAGE,
        }),
      ),
    );
    if (seq !== boardSeq) return;
    const board: Record<string, CrmRecord[]> = {};
    const more: Record<string, string | null> = {};
    stages.forEach((stage, i) => {
      const page = pages[i];
      if (!page) return;
      rememberTitles(page);
      board[stage.id] = crm.sortRecords(page.records);
      more[stage.id] = page.next_cursor;
    });
    state.crmBoard = board;
    state.crmBoardMore = more;
    state.crmBoardLoaded = true;
    state.crmDenied = false;
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) state.crmDenied = true;
    else if (!(error instanceof ApiError && error.status === 401)) reportError(error, "Could not load the deals");
  }
}

/** More deals of one stage. */
export async function loadMoreOfStage(stageId: string): Promise<void> {
  const cursor = state.crmBoardMore[stageId];
  if (!cursor) return;
  const filter = state.crmFilter;
  try {
    const page = await api.crmRecords("deal", {
      status: stageId,
      q: filter.q.trim() || undefined,
      activity_responsible_id: filter.activityResponsibleId ?? undefined,
      counted: filter.counted || undefined,
      limit: BOARD_PAGE,
      cursor,
    });
    rememberTitles(page);
    let column = state.crmBoard[stageId] ?? [];
    for (const r of page.records) column = crm.upsertRecord(column, r);
    state.crmBoard = { ...state.crmBoard, [stageId]: column };
    state.crmBoardMore = { ...state.crmBoardMore, [stageId]: page.next_cursor };
  } catch (error) {
    reportError(error, "Could not load more");
  }
}

/** A deal dragged to another stage: moved at once, put back if the hub refuses. */
export async function moveDealToStage(deal: CrmRecord, stageId: string): Promise<void> {
  if (deal.stage_id === stageId) return;
  const before = state.crmBoard;
  state.crmBoard = crm.moveOnBoard(state.crmBoard, deal, stageId);
  try {
    const updated = await api.updateCrmRecord("deal", deal.id, { stage_id: stageId });
    putCrmRecord(updated);
  } catch (error) {
    state.crmBoard = before;
    reportError(error, "Could not move the deal");
  }
}

/** The list or the board of deals. */
export function showDealsBoard(board: boolean): void {
  goTo(crmSectionPath("deal", board));
}

export async function loadMyActivities(): Promise<void> {
  try {
    const { activities } = await api.crmActivities({ status: state.crmMyStatus, limit: 500 });
    state.crmMyActivities = crm.sortActivities(activities);
    state.crmMyActivitiesLoaded = true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) state.crmDenied = true;
    else reportError(error, "Could not load your activities");
  }
}

export function setMyActivitiesStatus(status: "open" | "all"): void {
  state.crmMyStatus = status;
  void loadMyActivities();
}

/** Open a record's page (from a list, a link, a duplicate warning). */
export function openCrmRecord(type: CrmRecordType, id: string): void {
  goTo(crmRecordPath(type, id));
}

/** The record of the address; "not available" when the user may not see it. */
async function showCrmRecord(type: CrmRecordType, id: string): Promise<void> {
  state.crmTab = type;
  state.crmForm = null;
  if (!isId(id)) {
    state.crmOpen = { type, id };
    state.crmRecord = null;
    markUnavailable(crmRecordPath(type, id));
    return;
  }
  if (state.crmOpen?.id !== id) {
    state.crmRecord = null;
    state.crmTimeline = [];
    state.crmHistory = [];
    mailWatchDelay = MAIL_WATCH_FIRST_MS;
  }
  state.crmOpen = { type, id };
  if (!state.crmSettings) void loadCrmBasics();
  await refreshCrmRecord(type, id);
}

export function closeCrmRecord(): void {
  goTo(crmSectionPath(state.crmTab));
}

/** The open record, its timeline (open and completed activities) and its history. */
async function refreshCrmRecord(type: CrmRecordType, id: string, loud = true): Promise<void> {
  try {
    const [detail, timeline, history] = await Promise.all([
      api.crmRecord(type, id),
      api.crmActivities({ owner_type: type, owner_id: id, status: "all", limit: 500 }),
      api.crmHistory(type, id),
    ]);
    if (state.crmOpen?.id !== id) return;
    state.crmRecord = detail;
    state.crmTimeline = crm.sortActivities(timeline.activities);
    state.crmHistory = [...history.history].sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
    putCrmRecord(detail);
    watchPendingMail();
  } catch (error) {
    if (state.crmOpen?.id !== id) return;
    if (error instanceof ApiError && error.status === 403) {
      state.crmDenied = true;
      return;
    }
    if (error instanceof ApiError && error.status === 404) {
      dropCrmRecord(type, id);
      state.crmRecord = null;
      markUnavailable(crmRecordPath(type, id));
      return;
    }
    if (loud) reportError(error, "Could not load the record");
  }
}

export function openCrmForm(type: CrmRecordType, presets: Partial<crm.RecordForm> = {}, edit?: CrmRecord): void {
  state.crmForm = { type, presets, edit };
  if (!state.crmSettings) void loadCrmBasics();
}

export function closeCrmForm(): void {
  state.crmForm = null;
}

/** Create a record; a 409 with possible duplicates is thrown for the form to show. */
export async function createCrmRecord(type: CrmRecordType, form: crm.RecordForm, ignoreDuplicates = false): Promise<CrmRecordDetail> {
  const created = await api.createCrmRecord(type, crm.recordCreateBody(type, form, ignoreDuplicates));
  putCrmRecord(created);
  return created;
}

export async function updateCrmRecord(record: CrmRecord, form: crm.RecordForm): Promise<CrmRecordDetail | null> {
  const patch = crm.recordPatchBody(record, form);
  if (Object.keys(patch).length === 0) return null;
  const updated = await api.updateCrmRecord(record.type, record.id, patch);
  putCrmRecord(updated);
  if (state.crmRecord?.id === updated.id) state.crmRecord = updated;
  scheduleOpenRefresh();
  return updated;
}

/** A quick change of the open record (a deal's company or contacts, a stage, a status). */
export async function patchCrmRecord(record: CrmRecord, patch: Parameters<Api["updateCrmRecord"]>[2]): Promise<void> {
  try {
    const updated = await api.updateCrmRecord(record.type, record.id, patch);
    putCrmRecord(updated);
    if (state.crmRecord?.id === updated.id) state.crmRecord = updated;
    scheduleOpenRefresh();
  } catch (error) {
    reportError(error, "Could not change the record");
  }
}

export async function deleteCrmRecord(record: CrmRecord): Promise<void> {
  try {
    await api.deleteCrmRecord(record.type, record.id);
    dropCrmRecord(record.type, record.id);
    if (state.crmOpen?.id === record.id) goTo(crmSectionPath(record.type), true);
  } catch (error) {
    reportError(error, "Could not delete the record");
  }
}

export function checkCrmDuplicates(probe: CrmDuplicateProbe): Promise<CrmDuplicates> {
  return api.crmDuplicates(probe);
}

export async function addCrmActivity(owner: CrmRecord, form: crm.ActivityForm): Promise<CrmActivity> {
  const activity = await api.createCrmActivity(crm.activityCreateBody(owner, form));
  if (state.crmOpen?.id === owner.id) state.crmTimeline = crm.upsertActivity(state.crmTimeline, activity);
  scheduleOpenRefresh();
  return activity;
}

export async function setCrmActivityCompleted(activity: CrmActivity, completed: boolean): Promise<void> {
  try {
    const updated = await api.updateCrmActivity(activity.id, { completed });
    onCrmActivityUpdated(updated);
  } catch (error) {
    reportError(error, completed ? "Could not complete the activity" : "Could not reopen the activity");
  }
}

export async function deleteCrmActivity(activity: CrmActivity): Promise<void> {
  try {
    await api.deleteCrmActivity(activity.id);
    onCrmActivityRemoved({ id: activity.id, owner_id: activity.owner_id });
  } catch (error) {
    reportError(error, "Could not delete the activity");
  }
}

export function openMergeDialog(record: CrmRecordDetail): void {
  state.crmMerge = record;
}

export function closeMergeDialog(): void {
  state.crmMerge = null;
}

/** Merge `other` into `survivor`: the other's links, activities and mail move; it goes. */
export async function mergeCrmRecords(survivor: CrmRecord, otherId: string): Promise<CrmRecordDetail> {
  const merged = await api.mergeCrmRecords(survivor.type, survivor.id, otherId);
  dropCrmRecord(survivor.type, otherId);
  putCrmRecord(merged);
  if (state.crmRecord?.id === merged.id) state.crmRecord = merged;
  scheduleOpenRefresh();
  return merged;
}

export function openConvertDialog(lead: CrmRecord): void {
  state.crmConvert = lead;
}

export function closeConvertDialog(): void {
  state.crmConvert = null;
}

export async function convertLead(lead: CrmRecord, body: CrmConvertBody): Promise<CrmConversionResult> {
  const result = await api.convertLead(lead.id, body);
  putCrmRecord(result.lead);
  for (const record of Object.values(result.created)) if (record) putCrmRecord(record);
  if (state.crmOpen?.id === lead.id) void refreshCrmRecord("lead", lead.id, false);
  return result;
}

export async function saveCrmSettings(patch: Partial<CrmSettings>): Promise<boolean> {
  try {
    state.crmSettings = await api.updateCrmSettings(patch);
    // the indicators of the lists depend on the counter settings
    state.crmListLoaded = {};
    if (crm.isRecordType(state.crmTab)) void loadCrmList(state.crmTab);
    return true;
  } catch (error) {
    reportError(error, "Could not save the CRM settings");
    return false;
  }
}

// crm mail ----------------------------------------------------------------------------------------

const MAIL_WATCH_FIRST_MS = 1000;
const MAIL_WATCH_MAX_MS = 30_000;
let mailWatchTimer: ReturnType<typeof setTimeout> | null = null;
let mailWatchDelay = MAIL_WATCH_FIRST_MS;

/**
 * While the open record has outgoing mail that is queued or retrying, its mails are asked for
 * again now and then (1 s, doubling to 30 s): the hub's outbox changes a mail's delivery
 * status without an event, so this is how "queued" becomes "sent" on screen.
 */
function watchPendingMail(): void {
  if (mailWatchTimer) return;
  const open = state.crmOpen;
  if (!open || !state.crmTimeline.some(mail.isMailPending)) {
    mailWatchDelay = MAIL_WATCH_FIRST_MS;
    return;
  }
  mailWatchTimer = setTimeout(async () => {
    try {
      const { activities } = await api.crmActivities({ owner_type: open.type, owner_id: open.id, type: "email", status: "all", limit: 500 });
      if (state.crmOpen?.id === open.id) {
        let timeline = state.crmTimeline;
        for (const a of activities) if (timeline.some((known) => known.id === a.id)) timeline = crm.upsertActivity(timeline, a);
        state.crmTimeline = timeline;
      }
    } catch {
      // tried again at the next turn
    } finally {
      mailWatchTimer = null;
      mailWatchDelay = Math.min(mailWatchDelay * 2, MAIL_WATCH_MAX_MS);
    }
    watchPendingMail();
  }, mailWatchDelay);
}

/** Put an e-mail on another record; both timelines follow by events. */
export async function moveCrmActivity(activity: CrmActivity, to: CrmRecordRef): Promise<CrmActivity> {
  const moved = await api.moveCrmActivity(activity.id, to.type, to.id);
  // off the page at once (the events say the same, a moment later)
  if (state.crmOpen?.id === activity.owner_id) state.crmTimeline = crm.removeActivity(state.crmTimeline, activity.id);
  if (state.crmOpen) scheduleOpenRefresh();
  return moved;
}

/** Send a mail from a record; its outgoing activities come by events (and are watched). */
export async function sendCrmEmail(record: CrmRecord, form: mail.SendForm): Promise<SentEmail[]> {
  const { emails } = await api.sendCrmEmail(record.type, record.id, mail.sendEmailBody(form));
  if (state.crmOpen?.id === record.id) {
    mailWatchDelay = MAIL_WATCH_FIRST_MS;
    scheduleOpenRefresh();
  }
  return emails;
}

/** Hand bytes to the browser as a file to save. */
function saveBlob(blob: Blob, filename: string): void {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.rel = "noopener";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** Save an attachment of a mail: fetched with the token, then handed to the browser as a file. */
export async function saveMailAttachment(attachment: MailAttachment): Promise<void> {
  if (!attachment.id) return;
  try {
    saveBlob(await api.mailAttachment(attachment.id), attachment.filename || "attachment");
  } catch (error) {
    reportError(error, `Could not download ${attachment.filename}`);
  }
}

/** Save an unmatched mail as received (an .eml file, to open in a mail program). */
export async function saveUnmatchedMail(id: string): Promise<void> {
  try {
    saveBlob(await api.unmatchedMailRaw(id), `${id}.eml`);
  } catch (error) {
    reportError(error, "Could not download the mail");
  }
}
