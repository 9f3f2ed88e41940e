// Vitest configuration for the convex-test harness (`npm test`). The file name has two dots, so
// `npx convex deploy` does not treat it as a function module.
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // convex-test runs the functions the way the Convex runtime does: a V8 isolate-like
    // environment without Node's APIs.
    environment: "edge-runtime",
    // convex-test must be transformed by Vite (it uses import.meta.glob internally).
    server: { deps: { inline: ["convex-test"] } },
    include: ["tests/**/*.test.ts"],
    // Each test resets KLIPSTREAM_CONVEX_SECRET with vi.stubEnv; undo it after every test.
    unstubEnvs: true,
  },
});
