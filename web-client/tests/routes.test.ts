import { describe, expect, it } from "vitest";
import {
  chatPath,
  crmRecordPath,
  crmSectionPath,
  isId,
  parseScreen,
  pathOf,
  taskPath,
  userPath,
  type Screen,
} from "../src/core/routes";
import { oid } from "./fixtures";

const ID = oid(0xabc);

describe("addresses", () => {
  it("gives every screen a path that reads back as the same screen", () => {
    const screens: Screen[] = [
      { view: "messenger", chatId: null, messageId: null },
      { view: "messenger", chatId: ID, messageId: null },
      { view: "messenger", chatId: ID, messageId: oid(7) },
      { view: "employees", userId: null },
      { view: "employees", userId: ID },
      { view: "tasks", taskId: null },
      { view: "tasks", taskId: ID },
      { view: "crm", section: "deal", recordId: null, board: false },
      { view: "crm", section: "deal", recordId: null, board: true },
      { view: "crm", section: "lead", recordId: ID, board: false },
      { view: "crm", section: "company", recordId: ID, board: false },
      { view: "crm", section: "activities", recordId: null, board: false },
      { view: "crm", section: "unmatched", recordId: null, board: false },
      { view: "settings" },
    ];
    for (const screen of screens) {
      const path = pathOf(screen);
      const [bare, query = ""] = path.split("?");
      expect(parseScreen(bare ?? "", Object.fromEntries(new URLSearchParams(query)))).toEqual(screen);
    }
  });

  it("spells the paths people share", () => {
    expect(chatPath(ID)).toBe(`/messenger/${ID}`);
    expect(chatPath(ID, oid(7))).toBe(`/messenger/${ID}?message=${oid(7)}`);
    expect(taskPath(ID)).toBe(`/tasks/${ID}`);
    expect(userPath(ID)).toBe(`/employees/${ID}`);
    expect(crmRecordPath("company", ID)).toBe(`/crm/companies/${ID}`);
    expect(crmSectionPath("deal", true)).toBe("/crm/deals/kanban");
    expect(crmSectionPath("lead", true)).toBe("/crm/leads");
    expect(crmSectionPath("mail")).toBe("/crm/mail");
  });

  it("reads the root, the CRM's default tab, queries and trailing slashes", () => {
    expect(parseScreen("/")).toEqual({ view: "messenger", chatId: null, messageId: null });
    expect(parseScreen("/crm")).toEqual({ view: "crm", section: "deal", recordId: null, board: false });
    expect(parseScreen("/tasks/")).toEqual({ view: "tasks", taskId: null });
    expect(parseScreen(`/messenger/${ID}`, { message: [oid(3)] })).toEqual({
      view: "messenger",
      chatId: ID,
      messageId: oid(3),
    });
    // a message without a chat names nothing
    expect(parseScreen("/messenger", { message: oid(3) })).toEqual({ view: "messenger", chatId: null, messageId: null });
  });

  it("keeps a bad id on its screen, which then says it is not available", () => {
    expect(parseScreen("/tasks/not-a-task")).toEqual({ view: "tasks", taskId: "not-a-task" });
    expect(isId("not-a-task")).toBe(false);
    expect(isId(ID)).toBe(true);
    expect(isId(ID.toUpperCase())).toBe(false);
  });

  it("knows no other page", () => {
    for (const path of ["/nothing", "/tasks/a/b", "/crm/nothing", "/crm/deals/a/b", "/settings/x", "/crm/mail/x"]) {
      expect(parseScreen(path)).toEqual({ view: "notfound" });
    }
  });
});
