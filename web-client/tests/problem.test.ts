import { describe, expect, it } from "vitest";
import { ApiError, problemMessage } from "../src/core/problem";

describe("problem+json", () => {
  it("shows the detail", () => {
    expect(problemMessage(401, { title: "Invalid credentials", detail: "wrong login or password" })).toBe(
      "wrong login or password",
    );
  });

  it("spells out field errors", () => {
    const text = problemMessage(422, {
      detail: "the request body does not match the expected schema",
      errors: [{ loc: ["login"], msg: "String should have at least 1 character", type: "string_too_short" }],
    });
    expect(text).toBe(
      "the request body does not match the expected schema (login: String should have at least 1 character)",
    );
  });

  it("falls back to the title or the status", () => {
    expect(problemMessage(404, { title: "Not found" })).toBe("Not found");
    expect(problemMessage(502, undefined)).toBe("Request failed (502)");
  });

  it("exposes the problem slug", () => {
    const error = new ApiError(429, { type: "urn:portalhub:problem:login-throttled", detail: "wait" });
    expect(error.slug).toBe("login-throttled");
    expect(error.message).toBe("wait");
  });
});
