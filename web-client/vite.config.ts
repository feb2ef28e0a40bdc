import vue from "@vitejs/plugin-vue";
import { defineConfig } from "vitest/config";

// The hub serves dist/index.html at "/" and everything else in dist under "/static/".
export default defineConfig({
  base: "/static/",
  plugins: [vue()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
  },
  server: {
    // `npm run dev` against a hub on :8080
    proxy: {
      "/api": "http://127.0.0.1:8080",
      "/socket.io": { target: "http://127.0.0.1:8080", ws: true },
    },
  },
  test: {
    include: ["tests/**/*.test.ts"],
    environment: "node",
  },
});
