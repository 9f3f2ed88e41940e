// Functions KlipStream Analysis calls over Convex's HTTP API (/api/mutation, /api/query).
//
// Writing functions are public (the HTTP API can call them) but each checks the shared secret
// `secret` against the deployment's KLIPSTREAM_CONVEX_SECRET environment variable, so only the
// analysis service can write. Set it with `npx convex env set KLIPSTREAM_CONVEX_SECRET <value>`
// and give the service the same value (docs/deploy.md).
//
// A row is found or created by twitchId inside the mutation; Convex runs every mutation as a
// serializable transaction, so two concurrent first updates for one video never create two rows.
import { ConvexError, type Infer, v } from "convex/values";
import { type Doc, type MutationCtx, mutation, query } from "./builders";
import { urlFields } from "./schema";

const displayStatus = v.union(
  v.literal("Queued"),
  v.literal("Downloading"),
  v.literal("Fetching chat"),
  v.literal("Processing audio"),
  v.literal("Transcribing"),
  v.literal("Analyzing"),
  v.literal("Finding highlights"),
  v.literal("Completed"),
  v.literal("Failed"),
  v.literal("Cancelled"),
);

const urls = v.object(urlFields);

function constantTimeEqual(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

function checkSecret(secret: string): void {
  const expected = process.env.KLIPSTREAM_CONVEX_SECRET;
  if (!expected) {
    throw new ConvexError("KLIPSTREAM_CONVEX_SECRET is not set on this Convex deployment");
  }
  if (!constantTimeEqual(secret, expected)) {
    throw new ConvexError("Unauthorized: wrong KLIPSTREAM_CONVEX_SECRET");
  }
}

async function findOrCreate(ctx: MutationCtx, twitchId: string): Promise<Doc> {
  const existing = await ctx.db
    .query("videos")
    .withIndex("by_twitchId", (q) => q.eq("twitchId", twitchId))
    .first();
  if (existing !== null) return existing;
  const id = await ctx.db.insert("videos", { twitchId, status: "Queued" });
  const created = await ctx.db.get(id);
  if (created === null) throw new Error("inserted video row vanished");
  return created;
}

// An update is stale when it is older than what the row already shows: an earlier state of the
// same job, or any state of an older job for this video (retries after a restart can arrive late).
function isStale(row: Doc, jobId: string, createdAt: number, updatedAt: number): boolean {
  if (row.jobId === jobId) return row.updatedAt !== undefined && updatedAt < row.updatedAt;
  return row.createdAt !== undefined && createdAt < row.createdAt;
}

const noError = { errorType: undefined, errorMessage: undefined, isRetryable: undefined };

const jobIdentity = {
  secret: v.string(),
  twitchId: v.string(),
  jobId: v.string(),
  createdAt: v.number(),
  updatedAt: v.number(),
  retryCount: v.number(),
  processingStartedAt: v.optional(v.number()),
  title: v.optional(v.string()),
  urls: v.optional(urls),
};

const jobIdentityObject = v.object(jobIdentity);
type JobIdentity = Infer<typeof jobIdentityObject>;

/** Check the secret, find or create the row, and apply `patch` plus the job's identity fields,
 * unless a newer update of this job (or a newer job) already reached the row. */
async function applyJobUpdate(
  ctx: MutationCtx,
  args: JobIdentity,
  patch: Partial<Doc>,
): Promise<{ applied: boolean }> {
  checkSecret(args.secret);
  const row = await findOrCreate(ctx, args.twitchId);
  if (isStale(row, args.jobId, args.createdAt, args.updatedAt)) return { applied: false };
  await ctx.db.patch(row._id, {
    ...(args.urls ?? {}),
    ...(args.title !== undefined ? { title: args.title } : {}),
    jobId: args.jobId,
    retryCount: args.retryCount,
    createdAt: args.createdAt,
    updatedAt: args.updatedAt,
    processingStartedAt: args.processingStartedAt,
    ...patch,
  });
  return { applied: true };
}

export const upsertJobProgress = mutation({
  args: {
    ...jobIdentity,
    status: displayStatus,
    currentStage: v.string(),
    progressPercentage: v.number(),
    estimatedCompletionSeconds: v.optional(v.number()),
  },
  handler: async (ctx, args) =>
    applyJobUpdate(ctx, args, {
      ...noError,
      status: args.status,
      currentStage: args.currentStage,
      progressPercentage: args.progressPercentage,
      estimatedCompletionSeconds: args.estimatedCompletionSeconds,
      processingCompletedAt: undefined,
    }),
});

export const markCompleted = mutation({
  args: { ...jobIdentity, processingCompletedAt: v.number() },
  handler: async (ctx, args) =>
    applyJobUpdate(ctx, args, {
      ...noError,
      status: "Completed",
      currentStage: "Completed",
      progressPercentage: 100,
      estimatedCompletionSeconds: 0,
      processingCompletedAt: args.processingCompletedAt,
    }),
});

export const markFailed = mutation({
  args: {
    ...jobIdentity,
    processingCompletedAt: v.number(),
    progressPercentage: v.number(),
    errorType: v.string(),
    errorMessage: v.string(),
    isRetryable: v.boolean(),
  },
  handler: async (ctx, args) =>
    applyJobUpdate(ctx, args, {
      status: "Failed",
      currentStage: "Failed",
      progressPercentage: args.progressPercentage,
      estimatedCompletionSeconds: undefined,
      errorType: args.errorType,
      errorMessage: args.errorMessage,
      isRetryable: args.isRetryable,
      processingCompletedAt: args.processingCompletedAt,
    }),
});

export const markCancelled = mutation({
  args: { ...jobIdentity, processingCompletedAt: v.number(), progressPercentage: v.number() },
  handler: async (ctx, args) =>
    applyJobUpdate(ctx, args, {
      ...noError,
      status: "Cancelled",
      currentStage: "Cancelled",
      progressPercentage: args.progressPercentage,
      estimatedCompletionSeconds: undefined,
      processingCompletedAt: args.processingCompletedAt,
    }),
});

// --- names the previous service used; kept so existing callers and dashboards keep working ---

export const updateStatusByTwitchId = mutation({
  args: { secret: v.string(), twitchId: v.string(), status: v.string() },
  handler: async (ctx, args) => {
    checkSecret(args.secret);
    const row = await findOrCreate(ctx, args.twitchId);
    await ctx.db.patch(row._id, { status: args.status, updatedAt: Date.now() });
    return row._id;
  },
});

export const updateStatus = mutation({
  args: { secret: v.string(), id: v.id("videos"), status: v.string() },
  handler: async (ctx, args) => {
    checkSecret(args.secret);
    await ctx.db.patch(args.id, { status: args.status, updatedAt: Date.now() });
    return null;
  },
});

export const updateUrls = mutation({
  args: { secret: v.string(), twitchId: v.string(), urls },
  handler: async (ctx, args) => {
    checkSecret(args.secret);
    const row = await findOrCreate(ctx, args.twitchId);
    await ctx.db.patch(row._id, { ...args.urls, updatedAt: Date.now() });
    return row._id;
  },
});

export const getByTwitchIdPublic = query({
  args: { twitchId: v.string() },
  handler: async (ctx, args) => {
    return await ctx.db
      .query("videos")
      .withIndex("by_twitchId", (q) => q.eq("twitchId", args.twitchId))
      .first();
  },
});
