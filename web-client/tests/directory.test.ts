import { describe, expect, it } from "vitest";
import {
  buildTree,
  departmentScope,
  descendantIds,
  directoryQuery,
  flatten,
  departmentPath,
  inSubtree,
  initials,
  managerOf,
  membersOf,
  peopleByDepartment,
  toSearchParams,
} from "../src/core/directory";
import type { Department, User } from "../src/core/types";

const dept = (id: string, name: string, parent: string | null, head: string | null = null): Department => ({
  id,
  name,
  parent_id: parent,
  head_id: head,
});

const user = (id: string, name: string, department: string | null): User => {
  const [first = "", last = ""] = name.split(" ");
  return {
    id,
    login: first.toLowerCase(),
    email: `${first.toLowerCase()}@x.test`,
    first_name: first,
    last_name: last,
    name,
    position: "",
    phones: [],
    department_id: department,
    is_admin: false,
    is_external: false,
    is_active: true,
    created_at: "",
  };
};

const departments = [
  dept("root", "Company", null),
  dept("sales", "Sales", "root", "u3"),
  dept("eu", "Sales Europe", "sales"),
  dept("fin", "Finance", "root"),
  dept("orphan", "Orphan", "gone"),
];

describe("company structure", () => {
  it("builds the tree with sorted children and depth", () => {
    const flat = flatten(buildTree(departments));
    expect(flat.map((n) => `${n.depth}:${n.department.name}`)).toEqual([
      "0:Company",
      "1:Finance",
      "1:Sales",
      "2:Sales Europe",
      "0:Orphan",
    ]);
  });

  it("survives a cycle", () => {
    const flat = flatten(buildTree([dept("a", "A", "b"), dept("b", "B", "a"), dept("r", "R", null)]));
    expect(flat.map((n) => n.department.id)).toEqual(["r"]);
  });

  it("finds a department's subtree and its people", () => {
    expect([...descendantIds(departments, "sales")].sort()).toEqual(["eu", "sales"]);
    const users = [user("u1", "Ann Alpha", "eu"), user("u2", "Bob Beta", "fin"), user("u3", "Cid Gamma", "sales")];
    expect(membersOf(users, departments, "sales").map((u) => u.id)).toEqual(["u1", "u3"]);
  });

  it("groups people by department, heads first", () => {
    const users = [user("u1", "Ann Alpha", "sales"), user("u3", "Zed Head", "sales"), user("u4", "No Dept", null)];
    const map = peopleByDepartment(users, departments);
    expect(map.get("sales")?.map((u) => u.id)).toEqual(["u3", "u1"]);
    expect(map.get("")?.map((u) => u.id)).toEqual(["u4"]);
  });
});

describe("directory search", () => {
  it("sends one box as q: the hub looks in names, positions, departments, e-mails, phones", () => {
    expect(directoryQuery("mary", null, "all")).toEqual({ q: "mary" });
    expect(directoryQuery(" chief accountant ", null, "all")).toEqual({ q: "chief accountant" });
    expect(directoryQuery("+1 555 0100", null, "all")).toEqual({ q: "+1 555 0100" });
    expect(directoryQuery("  ", "d1", "online")).toEqual({ department_id: "d1", online: "true" });
    expect(directoryQuery("", null, "offline")).toEqual({ online: "false" });
  });

  it("builds the query string", () => {
    expect(toSearchParams({ q: "a b", online: "true" }, 50)).toBe("q=a+b&online=true&limit=50");
  });

  it("makes initials", () => {
    expect(initials({ first_name: "Mary", last_name: "Lopez", login: "mary" })).toBe("ML");
    expect(initials({ first_name: "", last_name: "", login: "root" })).toBe("RO");
  });
});

describe("department scope", () => {
  it("asks the hub for a leaf department and narrows a parent's subtree locally", () => {
    expect(departmentScope(departments, null)).toEqual({ param: null, subtree: null });
    expect(departmentScope(departments, "fin")).toEqual({ param: "fin", subtree: null });
    const scope = departmentScope(departments, "sales");
    expect(scope.param).toBeNull();
    const users = [user("u1", "Ann Alpha", "eu"), user("u2", "Bob Beta", "fin"), user("u5", "No One", null)];
    expect(inSubtree(users, scope.subtree).map((u) => u.id)).toEqual(["u1"]);
    expect(inSubtree(users, null)).toHaveLength(3);
  });
});

describe("profile", () => {
  it("names the manager: the department's head, or for the head the next head above", () => {
    // sales is headed by u3; eu (under sales) has no head; fin has none, nor has root
    expect(managerOf(user("u1", "Ann Alpha", "eu"), departments)).toBe("u3");
    expect(managerOf(user("u2", "Bob Beta", "sales"), departments)).toBe("u3");
    expect(managerOf(user("u3", "Cid Head", "sales"), departments)).toBeNull();
    expect(managerOf(user("u4", "Dan Fin", "fin"), departments)).toBeNull();
    expect(managerOf(user("u5", "No One", null), departments)).toBeNull();
    const looped = [dept("a", "A", "b", null), dept("b", "B", "a", null)];
    expect(managerOf(user("u6", "Loop", "a"), looped)).toBeNull();
  });

  it("spells the department's place in the company", () => {
    expect(departmentPath("eu", departments)).toBe("Company › Sales › Sales Europe");
    expect(departmentPath(null, departments)).toBe("");
    expect(departmentPath("gone", departments)).toBe("");
  });
});
