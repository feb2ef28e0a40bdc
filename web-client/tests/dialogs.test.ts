import { describe, expect, it } from "vitest";
import {
  applyMembers,
  applyMessage,
  filterChats,
  peerOf,
  previewText,
  privateChatWith,
  removeChat,
  sortChats,
  upsertChat,
} from "../src/core/dialogs";
import { chat, msg, oid } from "./fixtures";

const at = (n: number) => msg(n, { created_at: new Date(Date.UTC(2026, 0, 2, 0, 0, n)).toISOString() });

describe("dialog order", () => {
  it("puts the latest activity first; a chat without messages counts from its creation", () => {
    const a = chat("a", { last_message: at(5) });
    const b = chat("b", { last_message: at(9) });
    const c = chat("c", { created_at: "2026-01-03T00:00:00.000Z" });
    expect(sortChats([a, b, c]).map((x) => x.id)).toEqual(["c", "b", "a"]);
  });

  it("moves a chat to the top when a message arrives", () => {
    let list = sortChats([chat("a", { last_message: at(5) }), chat("b", { last_message: at(9) })]);
    list = applyMessage(list, { ...at(20), chat_id: "a" });
    expect(list.map((x) => x.id)).toEqual(["a", "b"]);
    expect(list[0]?.last_message?.id).toBe(oid(20));
  });

  it("ignores an older message for the preview, but takes an edit of the newest", () => {
    let list = [chat("a", { last_message: { ...at(5), chat_id: "a" } })];
    list = applyMessage(list, { ...at(3), chat_id: "a" });
    expect(list[0]?.last_message?.id).toBe(oid(5));
    list = applyMessage(list, { ...at(5), chat_id: "a", text: "edited", edited_at: "2026-01-02T01:00:00.000Z" });
    expect(list[0]?.last_message?.text).toBe("edited");
  });

  it("upserts without losing a newer live preview", () => {
    const live = chat("a", { last_message: at(9) });
    const stale = chat("a", { last_message: at(5), title: "Renamed" });
    const list = upsertChat([live], stale);
    expect(list).toHaveLength(1);
    expect(list[0]?.title).toBe("Renamed");
    expect(list[0]?.last_message?.id).toBe(oid(9));
  });

  it("removes and updates members", () => {
    let list = [chat("a"), chat("b", { kind: "group", member_ids: ["me"] })];
    list = applyMembers(list, "b", ["me", "x"]);
    expect(list[1]?.member_ids).toEqual(["me", "x"]);
    expect(removeChat(list, "a").map((c) => c.id)).toEqual(["b"]);
  });
});

describe("dialog helpers", () => {
  it("finds the peer and the private dialog with a user", () => {
    const list = [chat("g", { kind: "group", member_ids: ["me", "x"] }), chat("p", { member_ids: ["me", "x"] })];
    expect(peerOf(list[0]!, "me")).toBeUndefined();
    expect(peerOf(list[1]!, "me")).toBe("x");
    expect(privateChatWith(list, "me", "x")?.id).toBe("p");
    expect(privateChatWith(list, "me", "y")).toBeUndefined();
  });

  it("previews the newest message", () => {
    const names = { other: "Mary Lopez" };
    expect(previewText(chat("a"), "me", names)).toBe("No messages yet");
    expect(previewText(chat("a", { last_message: msg(1, { text: "hi\nthere" }) }), "me", names)).toBe("hi there");
    const file = { id: "f", name: "plan.png", size: 1, content_type: "image/png", image: true };
    expect(previewText(chat("a", { last_message: msg(1, { text: "", files: [file] }) }), "me", names)).toBe(
      "📎 plan.png",
    );
    expect(previewText(chat("a", { last_message: msg(1, { text: "see", files: [file] }) }), "me", names)).toBe("see");
    expect(previewText(chat("a", { last_message: msg(1, { author_id: "me" }) }), "me", names)).toBe("You: message 1");
    const group = chat("g", { kind: "group", last_message: msg(1) });
    expect(previewText(group, "me", names)).toBe("Mary: message 1");
    expect(previewText(chat("a", { last_message: msg(1, { deleted: true, text: "" }) }), "me", names)).toBe(
      "Message deleted",
    );
  });

  it("filters by title", () => {
    const list = [chat("a", { title: "Mary Lopez" }), chat("b", { title: "Sales team" })];
    expect(filterChats(list, "sal").map((c) => c.id)).toEqual(["b"]);
    expect(filterChats(list, " ")).toHaveLength(2);
  });
});
