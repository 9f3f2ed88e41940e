// The `videos` table the web frontend subscribes to. KlipStream Analysis writes the job fields and
// URLs through the mutations in video.ts; the frontend only reads.
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

// Artifact URLs: the snake_case names the frontend reads today, and the older camelCase names
// that earlier frontends still accept. The service fills both.
export const urlFields = {
  video_url: v.optional(v.string()),
  audio_url: v.optional(v.string()),
  waveform_url: v.optional(v.string()),
  transcript_url: v.optional(v.string()), // 60 s sliding-window segments CSV
  transcriptWords_url: v.optional(v.string()),
  chat_url: v.optional(v.string()),
  analysis_url: v.optional(v.string()), // audio sentiment CSV
  transcriptUrl: v.optional(v.string()),
  chatUrl: v.optional(v.string()),
  audiowaveUrl: v.optional(v.string()),
  transcriptAnalysisUrl: v.optional(v.string()),
  transcriptWordUrl: v.optional(v.string()),
};

// Job progress, mirrored from the analysis service. Times are milliseconds since the epoch.
export const jobFields = {
  jobId: v.optional(v.string()),
  progressPercentage: v.optional(v.number()),
  currentStage: v.optional(v.string()),
  estimatedCompletionSeconds: v.optional(v.number()),
  errorType: v.optional(v.string()),
  errorMessage: v.optional(v.string()),
  isRetryable: v.optional(v.boolean()),
  retryCount: v.optional(v.number()),
  createdAt: v.optional(v.number()),
  updatedAt: v.optional(v.number()),
  processingStartedAt: v.optional(v.number()),
  processingCompletedAt: v.optional(v.number()),
};

export default defineSchema({
  videos: defineTable({
    twitchId: v.string(),
    title: v.optional(v.string()),
    // Display string: Queued, Downloading, Fetching chat, Transcribing, Analyzing, Finding
    // highlights, Completed, Failed, Cancelled (older rows may hold other strings).
    status: v.string(),
    ...urlFields,
    ...jobFields,
  })
    .index("by_twitchId", ["twitchId"])
    .index("by_jobId", ["jobId"])
    .index("by_status", ["status"]),
});
