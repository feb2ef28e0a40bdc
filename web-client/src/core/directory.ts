// The company structure and directory search. No Vue, no DOM.

import type { Department, User } from "./types";

export interface DepartmentNode {
  department: Department;
  children: DepartmentNode[];
  depth: number;
}

/** The department forest, children sorted by name; a parent that is missing makes a root. */
export function buildTree(departments: readonly Department[]): DepartmentNode[] {
  const ids = new Set(departments.map((d) => d.id));
  const children = new Map<string | null, Department[]>();
  for (const d of departments) {
    const parent = d.parent_id && ids.has(d.parent_id) ? d.parent_id : null;
    const list = children.get(parent) ?? [];
    list.push(d);
    children.set(parent, list);
  }
  const seen = new Set<string>();
  const build = (parent: string | null, depth: number): DepartmentNode[] =>
    (children.get(parent) ?? [])
      .sort((a, b) => a.name.localeCompare(b.name))
      .filter((d) => !seen.has(d.id) && (seen.add(d.id), true))
      .map((d) => ({ department: d, depth, children: build(d.id, depth + 1) }));
  return build(null, 0);
}

/** Depth-first list of the tree (for selects and indented lists). */
export function flatten(nodes: readonly DepartmentNode[]): DepartmentNode[] {
  const out: DepartmentNode[] = [];
  const walk = (list: readonly DepartmentNode[]) => {
    for (const n of list) {
      out.push(n);
      walk(n.children);
    }
  };
  walk(nodes);
  return out;
}

/** A department and everything below it. */
export function descendantIds(departments: readonly Department[], rootId: string): Set<string> {
  const found = new Set<string>([rootId]);
  let grew = true;
  while (grew) {
    grew = false;
    for (const d of departments) {
      if (d.parent_id && found.has(d.parent_id) && !found.has(d.id)) {
        found.add(d.id);
        grew = true;
      }
    }
  }
  return found;
}

/** People by department id ("" for those without one), heads first, then by name. */
export function peopleByDepartment(
  users: readonly User[],
  departments: readonly Department[],
): Map<string, User[]> {
  const heads = new Map(departments.map((d) => [d.id, d.head_id]));
  const map = new Map<string, User[]>();
  for (const u of users) {
    const key = u.department_id ?? "";
    const list = map.get(key) ?? [];
    list.push(u);
    map.set(key, list);
  }
  for (const [key, list] of map) {
    const head = heads.get(key);
    list.sort((a, b) => (a.id === head ? -1 : b.id === head ? 1 : a.name.localeCompare(b.name)));
  }
  return map;
}

/** Everyone in a department and its subdepartments. */
export function membersOf(
  users: readonly User[],
  departments: readonly Department[],
  departmentId: string,
): User[] {
  const ids = descendantIds(departments, departmentId);
  return users.filter((u) => u.department_id !== null && ids.has(u.department_id));
}

export interface DirectoryQuery {
  q?: string;
  department_id?: string;
  online?: "true" | "false";
}

export type OnlineFilter = "all" | "online" | "offline";

/**
 * One search box for the directory: the hub looks for every word in the name, login,
 * position, department name, e-mail and phone digits (`q`).
 */
export function directoryQuery(
  text: string,
  departmentId: string | null,
  online: OnlineFilter,
): DirectoryQuery {
  const query: DirectoryQuery = {};
  const t = text.trim();
  if (t) query.q = t;
  if (departmentId) query.department_id = departmentId;
  if (online !== "all") query.online = online === "online" ? "true" : "false";
  return query;
}

export function toSearchParams(query: DirectoryQuery, limit = 200): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== "") params.set(k, v);
  params.set("limit", String(limit));
  return params.toString();
}

/** Initials for an avatar. */
export function initials(user: Pick<User, "first_name" | "last_name" | "login">): string {
  const a = user.first_name.trim()[0] ?? "";
  const b = user.last_name.trim()[0] ?? "";
  return (a + b || user.login.slice(0, 2)).toUpperCase();
}

/**
 * How to ask the hub for a department's people including its subdepartments: the hub's
 * `department_id` filter matches one department exactly, so a department with children is
 * fetched unfiltered and narrowed here to its subtree.
 */
export function departmentScope(
  departments: readonly Department[],
  departmentId: string | null,
): { param: string | null; subtree: Set<string> | null } {
  if (!departmentId) return { param: null, subtree: null };
  const subtree = descendantIds(departments, departmentId);
  return subtree.size > 1 ? { param: null, subtree } : { param: departmentId, subtree: null };
}

export function inSubtree(users: readonly User[], subtree: Set<string> | null): User[] {
  if (!subtree) return [...users];
  return users.filter((u) => u.department_id !== null && subtree.has(u.department_id));
}

/**
 * A person's manager: the head of their department, or, for the head themself (or a
 * department without one), the nearest head above. null at the top.
 */
export function managerOf(user: Pick<User, "id" | "department_id">, departments: readonly Department[]): string | null {
  const byId = new Map(departments.map((d) => [d.id, d]));
  const seen = new Set<string>();
  let current = user.department_id ? byId.get(user.department_id) : undefined;
  while (current && !seen.has(current.id)) {
    seen.add(current.id);
    if (current.head_id && current.head_id !== user.id) return current.head_id;
    current = current.parent_id ? byId.get(current.parent_id) : undefined;
  }
  return null;
}

/** The department and the ones above it, top first: "Demo Company › Finance › Paris". */
export function departmentPath(departmentId: string | null, departments: readonly Department[]): string {
  const byId = new Map(departments.map((d) => [d.id, d]));
  const names: string[] = [];
  const seen = new Set<string>();
  let current = departmentId ? byId.get(departmentId) : undefined;
  while (current && !seen.has(current.id)) {
    seen.add(current.id);
    names.unshift(current.name);
    current = current.parent_id ? byId.get(current.parent_id) : undefined;
  }
  return names.join(" › ");
}
