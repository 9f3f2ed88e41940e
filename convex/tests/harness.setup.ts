/// <reference types="vite/client" />
// Shared set-up for the convex-test suites. The file name has two dots, so `npx convex deploy`
// skips it (tests/*.test.ts likewise); vitest only runs files ending in .test.ts.
import { anyApi, type ApiFromModules, type FilterApi, type FunctionReference } from "convex/server";
import { convexTest } from "convex-test";
import { vi } from "vitest";
import schema, { type urlFields } from "../schema";
import type * as video from "../video";

// What `npx convex codegen` would write to _generated/api.d.ts, built from the module types.
export const api = anyApi as unknown as FilterApi<
  ApiFromModules<{ video: typeof video }>,
  FunctionReference<any, "public">
>;

// The deployable modules: every .ts file at the top of convex/ except those Convex skips (more
// than one dot: env.d.ts, vitest.config.ts). convex-test finds the functions' root from a path
// containing "_generated"; this repository has no generated folder (builders.ts replaces it), so
// an empty stand-in marks "../" as the root and "video:markCompleted" resolves to ../video.ts.
export const modules: Record<string, () => Promise<unknown>> = {
  ...import.meta.glob(["../*.ts", "!../*.*.ts"]),
  "../_generated/server.ts": async () => ({}),
};

export const SECRET = "test-secret-0123456789abcdef";

/** A fresh in-memory deployment whose KLIPSTREAM_CONVEX_SECRET is `secret`, as
 * `npx convex env set` would leave it; `null` for a deployment where it was never set. */
export function setup(secret: string | null = SECRET) {
  vi.stubEnv("KLIPSTREAM_CONVEX_SECRET", secret ?? undefined); // restored after each test (unstubEnvs)
  return convexTest(schema, modules);
}

export type T = ReturnType<typeof setup>;

/** Every row of the videos table, oldest first. */
export async function allVideos(t: T) {
  return await t.run(async (ctx) => await ctx.db.query("videos").collect());
}

/** The one row for a Twitch id (fails the test if there are two). */
export async function videoRow(t: T, twitchId: string) {
  const rows = (await allVideos(t)).filter((row) => row.twitchId === twitchId);
  if (rows.length > 1) throw new Error(`${rows.length} rows for twitchId ${twitchId}`);
  return rows[0] ?? null;
}

/** Drop the system fields so documents from two deployments can be compared. */
export function withoutSystemFields<D extends { _id: unknown; _creationTime: unknown }>(doc: D) {
  const { _id, _creationTime, ...rest } = doc;
  return rest;
}

// Arguments shaped like klipstream/integrations/convex.py's `convex_call`, secret included (the
// service's ConvexMirror.mutation adds it). Times are milliseconds since the epoch.
export const TWITCH_ID = "2345678901";
export const JOB = "job_01";
export const CREATED = 1_700_000_000_000;

export type Urls = Partial<Record<keyof typeof urlFields, string>>;
export type Stage =
  | "Queued"
  | "Downloading"
  | "Fetching chat"
  | "Processing audio"
  | "Transcribing"
  | "Analyzing"
  | "Finding highlights";

export type CallOptions = {
  secret?: string;
  twitchId?: string;
  jobId?: string;
  createdAt?: number;
  retryCount?: number;
  processingStartedAt?: number;
  title?: string;
  urls?: Urls;
};

/** The identity fields every job mutation takes; optional ones only when given, as the service does. */
export function jobIdentity(updatedAt: number, o: CallOptions = {}) {
  return {
    secret: o.secret ?? SECRET,
    twitchId: o.twitchId ?? TWITCH_ID,
    jobId: o.jobId ?? JOB,
    createdAt: o.createdAt ?? CREATED,
    updatedAt,
    retryCount: o.retryCount ?? 0,
    ...(o.processingStartedAt !== undefined ? { processingStartedAt: o.processingStartedAt } : {}),
    ...(o.title !== undefined ? { title: o.title } : {}),
    ...(o.urls !== undefined ? { urls: o.urls } : {}),
  };
}

export function progressArgs(
  updatedAt: number,
  status: Stage,
  progressPercentage: number,
  o: CallOptions & { estimatedCompletionSeconds?: number } = {},
) {
  return {
    ...jobIdentity(updatedAt, o),
    status,
    currentStage: status,
    progressPercentage,
    ...(o.estimatedCompletionSeconds !== undefined
      ? { estimatedCompletionSeconds: o.estimatedCompletionSeconds }
      : {}),
  };
}

export function completedArgs(updatedAt: number, o: CallOptions = {}) {
  return { ...jobIdentity(updatedAt, o), processingCompletedAt: updatedAt };
}

export function failedArgs(
  updatedAt: number,
  progressPercentage: number,
  o: CallOptions & { errorType?: string; errorMessage?: string; isRetryable?: boolean } = {},
) {
  return {
    ...jobIdentity(updatedAt, o),
    processingCompletedAt: updatedAt,
    progressPercentage,
    errorType: o.errorType ?? "download_failed",
    errorMessage: o.errorMessage ?? "The VOD could not be downloaded.",
    isRetryable: o.isRetryable ?? true,
  };
}

export function cancelledArgs(updatedAt: number, progressPercentage: number, o: CallOptions = {}) {
  return { ...jobIdentity(updatedAt, o), processingCompletedAt: updatedAt, progressPercentage };
}
