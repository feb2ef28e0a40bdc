// REST errors: RFC 9457 problem documents turned into one readable line. No Vue, no DOM.

import type { Problem } from "./types";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Problem,
  ) {
    super(problemMessage(status, problem));
    this.name = "ApiError";
  }

  get slug(): string {
    return (this.problem.type ?? "").split(":").pop() ?? "";
  }
}

/** What to show the user: the problem's detail, with field errors spelled out. */
export function problemMessage(status: number, problem: Problem | undefined): string {
  if (!problem) return `Request failed (${status})`;
  const fields = (problem.errors ?? [])
    .map((e) => (e.loc?.length ? `${e.loc.join(".")}: ${e.msg}` : e.msg))
    .filter(Boolean);
  const base = problem.detail || problem.title || `Request failed (${status})`;
  return fields.length ? `${base} (${fields.join("; ")})` : base;
}
